"""Evaluation of visual explanations: IoU against ground-truth masks, ablation, box occlusion
and sanity checks (Sec. 4 of the paper)."""
