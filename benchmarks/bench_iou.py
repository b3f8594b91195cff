"""Benchmark: ``vxnb.evaluate.iou_curve`` against a straightforward reference.

The reference thresholds the normalised heatmaps one threshold at a time, broadcasting over
all images (``on = n >= t``; sums of ``on & mask`` and ``on | mask``), which is what one
writes first. Both run in the same process on the same data; the script prints their times,
the ratio and the largest difference between the curves.

    python benchmarks/bench_iou.py            # 1000 heatmaps of 128 x 128, 101 thresholds
    python benchmarks/bench_iou.py --quick    # 200 heatmaps
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vxnb.evaluate.iou import DEFAULT_THRESHOLDS, iou_curve, normalize_heatmaps


def reference_curve(heatmaps: np.ndarray, masks: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    n = normalize_heatmaps(heatmaps).reshape(len(heatmaps), -1)
    m = masks.reshape(len(masks), -1)
    curve = np.empty(len(thresholds))
    for k, t in enumerate(thresholds):
        on = n >= t
        curve[k] = ((on & m).sum(1) / (on | m).sum(1)).mean()
    return curve


def _best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 heatmaps instead of 1000")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = 200 if args.quick else 1000
    rng = np.random.default_rng(0)
    # Smooth-ish heatmaps (blobs) and masks that partly overlap them.
    yy, xx = np.mgrid[: args.size, : args.size] / args.size
    cy, cx = rng.random((2, n, 1, 1))
    heat = (np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02) + 0.1 * rng.random((n, args.size, args.size)))
    heat = heat.astype(np.float32)
    masks = ((yy - cy - 0.05) ** 2 + (xx - cx) ** 2) < 0.03
    t = DEFAULT_THRESHOLDS

    t_fast, (_, fast) = _best_of(lambda: iou_curve(heat, masks), args.repeats)
    t_ref, ref = _best_of(lambda: reference_curve(heat, masks, t), max(1, args.repeats - 1))
    print(f"heatmaps: {n} x {args.size} x {args.size} float32, {len(t)} thresholds")
    print(f"iou_curve (sort + binary search): {t_fast:8.3f} s")
    print(f"reference (broadcast per threshold): {t_ref:8.3f} s")
    print(f"speed-up: {t_ref / t_fast:.1f}x   max |difference|: {np.abs(fast - ref).max():.2e}")


if __name__ == "__main__":
    main()
