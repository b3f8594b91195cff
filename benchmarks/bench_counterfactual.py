"""Benchmark: the cost of an8Flower's difficulty knobs and counterfactual renders, and the
counterfactual interpretation study's figures (issue 27, items 3 and 4).

Part 1 renders the same views of single-6c in memory (``render_view``) with the default knobs
(the reference, timed in the same run), with every knob on (part size 0.8, distractor rate 0.5,
5 clutter balls) and as counterfactuals (shift 1), and prints seconds per view, the ratio
to the reference and the time they add to a whole cache (40 views; goal: at most 10 s added to
a cache, a sixth of the 60 s goal of ``bench_an8flower.py`` for writing one).

Part 2 (``--study``) runs ``vxnb.studies.counterfactual.counterfactual_study`` on a small
configuration (the quick setting: 1200 training images, quick epochs; two folds, one seed) and prints, per selector, the mean ± 95 %
interval of the causal specificity (drop) and the part precision with the Wilcoxon p of the
μ-lasso against each; the random selector is the reference a useful selector must beat.

    python benchmarks/bench_counterfactual.py                 # part 1 at size 128, 8 views
    python benchmarks/bench_counterfactual.py --quick         # part 1 at size 64, 4 views
    python benchmarks/bench_counterfactual.py --study [--size 64] [--folds 0 1]
    python benchmarks/bench_counterfactual.py --shortcut [--rate 1.0] [--size 64] [--folds 0]

Part 3 (``--shortcut``) runs ``vxnb.studies.counterfactual.shortcut_study`` in the quick
setting: a model trained at distractor rate 0 and one at ``--rate`` (the planted shortcut), and
prints the share of classes whose μ-lasso features (k = 5, μ = 10) have at least half their
top-20 patches' receptive fields on the distractor of the probe images (every test image
rendered again with a distractor): the detection rate (rate > 0) and the false-alarm rate
(rate 0), with the accuracies on the clean test split and on the probe.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from vxnb.data.an8flower import Knobs, render_view

KNOBS = Knobs(part_scale=0.8, distractor_rate=0.5, clutter=5)
GOAL_ADDED_S = 10.0  # per 40-view cache


def render_costs(size: int, n_views: int, repeats: int = 5) -> None:
    """Seconds per view of ``render_view`` (all six classes) in each setting; the settings are
    timed in turn within every repeat (so a busy spell hits them alike), best of ``repeats``."""
    views = list(range(0, 40, 40 // n_views))[:n_views]
    settings = {"default knobs (reference)": {}, f"knobs {KNOBS.tag()[1:]}": {"knobs": KNOBS},
                "counterfactual shift 1": {"counterfactual": 1},
                "counterfactual shift 1 + knobs": {"knobs": KNOBS, "counterfactual": 1}}
    render_view("single-6c", views[0], size)  # warm the gather matrix cache
    best = dict.fromkeys(settings, np.inf)
    for _ in range(repeats):
        for label, kw in settings.items():
            t0 = time.perf_counter()
            for v in views:
                render_view("single-6c", v, size, **kw)
            best[label] = min(best[label], (time.perf_counter() - t0) / len(views))
    ref = best["default knobs (reference)"]
    print(f"render_view single-6c, size {size}, {len(views)} views, best of {repeats} "
          f"(s per view, 6 classes x 25 items)")
    for label, t in best.items():
        added = 40 * (t - ref)
        verdict = "" if t is ref else (f"  {added:+6.1f} s per cache, " +
                                       ("ok" if added <= GOAL_ADDED_S else f"over the {GOAL_ADDED_S:g} s goal"))
        print(f"  {label:<34} {t:8.3f} s   {t / ref:4.2f} x{verdict}")


def study(size: int, folds: list[int]) -> None:
    from vxnb.studies.counterfactual import counterfactual_study
    from vxnb.studies.runs import RunConfig

    with tempfile.TemporaryDirectory() as d:
        cfg = RunConfig.from_params(quick=True, size=size, data_root=f"{d}/data", runs_root=f"{d}/runs")
        t0 = time.perf_counter()
        table, summary = counterfactual_study(cfg, folds=tuple(folds), seeds=(0,), k=5, progress=False)
        print(f"\ncounterfactual study: single-6c, size {size}, quick setting, folds {folds}, seed 0, k = 5 "
              f"({time.perf_counter() - t0:.0f} s)")
        for measure, frame in summary.items():
            print(f"  {measure}:")
            for row in frame.itertuples():
                p = "" if np.isnan(row.wilcoxon_p) else f"  Wilcoxon p vs mu-lasso {row.wilcoxon_p:.3f}"
                print(f"    {row.selector:<11} {row.mean:+.3f}  [{row.ci_low:+.3f}, {row.ci_high:+.3f}]  n={row.n}{p}")


def shortcut(size: int, folds: list[int], rate: float) -> None:
    from vxnb.studies.counterfactual import shortcut_study
    from vxnb.studies.runs import RunConfig

    with tempfile.TemporaryDirectory() as d:
        cfg = RunConfig.from_params(quick=True, size=size, data_root=f"{d}/data", runs_root=f"{d}/runs")
        t0 = time.perf_counter()
        table, summary = shortcut_study(cfg, rate=rate, folds=tuple(folds), seeds=(0,), k=5, progress=False)
        print(f"\nshortcut study: single-6c, size {size}, quick setting, folds {folds}, seed 0, k = 5, "
              f"planted rate {rate:g}, probe rate 1 ({time.perf_counter() - t0:.0f} s)")
        for row in summary.itertuples():
            ci = "" if np.isnan(row.ci_low) else f"  [{row.ci_low:+.2f}, {row.ci_high:+.2f}]"
            print(f"  {row.role:<11} (trained at rate {row.distractor_rate:g}): {row.rate_found:.2f} of {row.n} "
                  f"classes{ci}  test acc {row.test_accuracy:.3f}, probe acc {row.probe_accuracy:.3f}")
        print("  per class (best share of a feature's top patches on the distractor):")
        print(table.pivot_table(index="class_name", columns="distractor_rate", values="best").round(2).to_string())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="size 64, 4 views")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--study", action="store_true", help="also run the counterfactual study (trains models)")
    ap.add_argument("--folds", type=int, nargs="+", default=None, help="default: 0 1 (--study), 0 (--shortcut)")
    ap.add_argument("--shortcut", action="store_true", help="only the shortcut study (trains two models per fold)")
    ap.add_argument("--rate", type=float, default=1.0, help="the planted shortcut's distractor rate (--shortcut)")
    args = ap.parse_args()
    if args.shortcut:
        shortcut(args.size or 64, args.folds or [0], args.rate)
        return
    size = args.size or (64 if args.quick else 128)
    render_costs(size, 4 if args.quick else 8)
    if args.study:
        study(args.size or 64, args.folds or [0, 1])


if __name__ == "__main__":
    main()
