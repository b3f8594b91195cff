"""Benchmark: ``vxnb bench --quick`` (issue 27, item 1): one fold, 100 images, the quick model.

Goal: under 5 minutes on 2 cores, the quick fold model's training included when it is not
cached. Prints, in one run: the time to get the fold's model (trained now, or loaded), the time
``score_callable`` takes to score a plain saliency method (heatmaps, IoU, Quantus's five metrics
and both sanity checks; ``recompute=True``), and the reference measured in the same run: the
benchmark's own Grad-CAM heatmaps and IoU area on the same images (``method_heatmaps``), with
the ratio of the two.

    VXNB_HOME=/tmp/somewhere python benchmarks/bench_score_callable.py     # a fresh home: training included
"""
from __future__ import annotations

import time

import numpy as np
import torch

from vxnb.evaluate.iou import iou_auc
from vxnb.studies import benchmark, runs

GOAL_S = 300.0


def saliency(model, inputs, targets):
    x = torch.as_tensor(inputs).requires_grad_(True)
    with torch.enable_grad():
        score = model(x).gather(1, torch.as_tensor(targets)[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x)
    return grad.abs().amax(1).numpy()


def main() -> None:
    config = runs.RunConfig.from_params(quick=True, folds="blocks")
    cfg = benchmark.fold_config(config, "single-6c", 0)
    t0 = time.perf_counter()
    trained = not runs.checkpoint_dir(cfg).exists()
    data = runs.load_data(cfg, progress=False)
    model, _ = runs.get_model(cfg, data=data, progress=False)
    t_model = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = benchmark.score_callable(saliency, name="saliency", folds=(0,), n_images=100, config=config,
                                     recompute=True, progress=False)
    t_score = time.perf_counter() - t0
    t0 = time.perf_counter()
    images, _, masks, _ = benchmark.fold_data(cfg, 100, data=data, progress=False)
    preds = model(images).argmax(1)
    ref = iou_auc(benchmark.method_heatmaps("gradcam", model, images, preds), masks)
    t_ref = time.perf_counter() - t0
    total = t_model + t_score
    print(f"fold model: {t_model:.1f} s ({'trained now' if trained else 'loaded from cache'})")
    print(f"score_callable (saliency, 100 images, all metrics + sanity): {t_score:.1f} s; "
          f"IoU area {table['iou_area'].iloc[0]:.2f}")
    print(f"reference, same run: Grad-CAM heatmaps + IoU area on the same images: {t_ref:.1f} s (area {ref:.2f}); "
          f"ratio {t_score / max(t_ref, 1e-9):.1f}x")
    print(f"quick total {total:.1f} s; goal {GOAL_S:.0f} s: {'met' if total < GOAL_S else 'NOT met'}"
          f" (numbers {np.round(table[['pointing_game', 'randomisation_spearman']].to_numpy()[0], 3)})")


if __name__ == "__main__":
    main()
