"""Evaluation of visual explanations: IoU against ground-truth masks, ablation, box occlusion
and sanity checks (Sec. 4 of the paper); the counterfactual measures of the interpretation
itself (causal specificity and part precision of selected features, issue 27).

The submodules hold the details; the main entry points are re-exported here, so
``vxnb.evaluate.iou_curve`` is the contract of the design notes.
"""
from .ablation import ablation_curve, class_reconstruction
from .counterfactual import SELECTORS, causal_specificity, compare_selectors, part_precision, select_features
from .iou import DEFAULT_THRESHOLDS, iou_auc, iou_curve, iou_per_image
from .occlusion import box_occlusion_curve, mean_confidence_difference, occlusion_study
from .sanity import (abs_spearman, class_sensitivity, randomization_curve, randomize_cascade, spearman,
                     ssim)

__all__ = [
    "ablation_curve", "class_reconstruction",
    "SELECTORS", "causal_specificity", "compare_selectors", "part_precision", "select_features",
    "DEFAULT_THRESHOLDS", "iou_auc", "iou_curve", "iou_per_image",
    "box_occlusion_curve", "mean_confidence_difference", "occlusion_study",
    "abs_spearman", "class_sensitivity", "randomization_curve", "randomize_cascade", "spearman", "ssim",
]
