"""Benchmark: the batched localisation metrics (``judge="fast"``) against Quantus itself.

Both judges score the same heatmaps and masks through
``vxnb.evaluate.quantus_metrics.localisation_metrics`` (all five metrics: Pointing Game,
Relevance Mass, Relevance Rank, AUC, Top-K) in the same process; the script prints both times,
the ratio (goal: ≥ 10×, issue 26) and the largest difference of the means (goal: ≤ 1e-6), and
checks the per-image values against Quantus's too.

    python benchmarks/bench_localisation.py            # 100 heatmaps of 128 x 128 (the benchmark's subset)
    python benchmarks/bench_localisation.py --n 1000   # every image of a fold
"""
from __future__ import annotations

import argparse
import timeit
import warnings

import numpy as np
import torch

from vxnb.evaluate.localisation import localisation_scores
from vxnb.evaluate.quantus_metrics import QUANTUS_METRICS, localisation_metrics


def _best_of(fn, repeats: int) -> tuple[float, object]:
    """The shortest of ``repeats`` timings (timeit) and one result."""
    return min(timeit.repeat(fn, number=1, repeat=repeats)), fn()


def _quantus_per_image(h: np.ndarray, m: np.ndarray, k: int) -> dict[str, np.ndarray]:
    import quantus

    a, s = h[:, None], m[:, None].astype(np.float32)
    out = {}
    for name, cls in QUANTUS_METRICS.items():
        metric = getattr(quantus, cls)(disable_warnings=True, display_progressbar=False,
                                       **({"k": k} if name == "top_k" else {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[name] = np.asarray(metric(model=None, x_batch=np.repeat(a, 3, axis=1), y_batch=np.zeros(len(a), int),
                                          a_batch=a, s_batch=s, channel_first=True), dtype=np.float64)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="heatmaps (default 100, the benchmark's subset)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, size = args.n, args.size
    rng = np.random.default_rng(0)
    # Smooth-ish heatmaps (blobs, a floor of zeros as our ReLU'd heatmaps have) and masks that partly overlap them.
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx = rng.random((2, n, 1, 1))
    heat = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02) + 0.1 * rng.random((n, size, size)) - 0.05
    heat = np.clip(heat, 0, None).astype(np.float32)
    masks = ((yy - cy - 0.05) ** 2 + (xx - cx) ** 2) < 0.03

    t_fast, fast = _best_of(lambda: localisation_metrics(heat, masks), args.repeats)
    t_q, slow = _best_of(lambda: localisation_metrics(heat, masks, judge="quantus"), max(1, args.repeats - 1))
    k = max(1, round(0.02 * size * size))
    per_fast = localisation_scores(heat, masks)
    per_q = _quantus_per_image(heat, masks, k)
    per_diff = max(float(np.nanmax(np.abs(per_fast[m] - per_q[m]))) for m in QUANTUS_METRICS)
    mean_diff = max(abs(fast[m] - slow[m]) for m in QUANTUS_METRICS)
    print(f"heatmaps: {n} x {size} x {size} float32, 5 metrics, top_k={k}")
    print(f"judge='fast'    (batched numpy): {t_fast:8.3f} s  ({1e3 * t_fast / n:.2f} ms per image, all metrics)")
    print(f"judge='quantus' (Quantus 0.6):   {t_q:8.3f} s  ({1e3 * t_q / n:.2f} ms per image, all metrics)")
    print(f"speed-up: {t_q / t_fast:.1f}x (goal >= 10x)   max |difference|: means {mean_diff:.1e}, "
          f"per image {per_diff:.1e} (goal <= 1e-6)")
    print("means:", {m: round(fast[m], 4) for m in QUANTUS_METRICS})


if __name__ == "__main__":
    main()
