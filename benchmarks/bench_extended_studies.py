"""Benchmark: notebook 05's extended studies (issue 27) at full size, each timed per phase,
with what it trained or computed and what it loaded from the store.

The setting is the notebook's full one: an8Flower single-6c at size 128, the blocks split,
five folds, seed 0, μ = 10, k = 5. Phases, in order, each timed on its own:

* ``table1``: what Table 1's benchmark builds for those folds and the studies reuse -- each
  fold's model, training features and μ-lasso path (``benchmark.fold_relevant``). This is the
  reference: its cost is paid by Table 1 whether the studies run or not.
* ``counterfactual``: ``counterfactual.counterfactual_study`` (five selectors, drop and part
  precision, mean ± 95 % interval over folds, Wilcoxon of the μ-lasso against each).
* ``shortcut``: ``counterfactual.shortcut_study`` at ``--rate`` (a model trained at rate 0 --
  Table 1's fold model -- and one with the planted shortcut).
* ``leaderboard``: ``leaderboard.leaderboard_page`` (every registry method and built-in peer,
  ``--n-images`` per fold, the fast judge).

After the first pass every study runs again (``second run``): all of it is read back from the
store. Each phase prints its seconds (wall, and this process's CPU seconds: the less noisy
figure on a shared machine), the ratio to the ``table1`` phase of the same run (the reference),
and the store's events of that phase per artifact kind (``computed``/``loaded``): a study that
retrained a fold model Table 1 has would show ``checkpoint: 1 computed``.

    python benchmarks/bench_extended_studies.py --home /tmp/x                 # the full setting
    python benchmarks/bench_extended_studies.py --home /tmp/x --folds 0 1     # two folds
    python benchmarks/bench_extended_studies.py --home /tmp/x --size 32 --quick --folds 0   # smoke

``--home`` holds ``data/`` and ``runs/`` (kept between calls, so a second call measures a
report run over a warm store from its first phase on).
"""
from __future__ import annotations

import argparse
import collections
import os
import time
from pathlib import Path

import numpy as np


def store_events(runs_root: Path, since: float) -> str:
    """This process's store events since ``since``, as "kind: n computed, m loaded; …"."""
    from vxnb._store import read_events

    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in read_events(runs_root):
        if e["pid"] == os.getpid() and e["t"] >= since and e["event"] in ("hit", "miss"):
            counts[e["kind"]]["computed" if e["event"] == "miss" else "loaded"] += 1
    return "; ".join(f"{k}: {c['computed']} computed, {c['loaded']} loaded" for k, c in sorted(counts.items())) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", required=True, help="folder for data/ and runs/ (kept)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="the quick setting's models (smoke test)")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rate", type=float, default=1.0, help="the planted shortcut's distractor rate")
    ap.add_argument("--n-images", type=int, default=100, help="leaderboard images per fold")
    ap.add_argument("--only", nargs="+", default=["counterfactual", "shortcut", "leaderboard"],
                    choices=["counterfactual", "shortcut", "leaderboard"])
    ap.add_argument("--no-second", action="store_true", help="skip the second pass")
    args = ap.parse_args()

    import pandas as pd

    from vxnb.studies import benchmark, counterfactual, leaderboard, runs

    home = Path(args.home)
    cfg = runs.RunConfig(size=args.size, quick=args.quick, folds="blocks", data_root=str(home / "data"),
                         runs_root=str(home / "runs"))
    folds = tuple(args.folds)
    pd.set_option("display.width", 200)
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}  # CPU seconds of this process (all threads): less noisy than wall on a shared machine

    def phase(name: str, fn):
        t0_wall = time.time()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times[name] = time.perf_counter() - t0
        cpu[name] = time.process_time() - c0
        ref = times.get("table1")
        ratio = f"  {times[name] / ref:5.2f} x table1 (CPU {cpu[name] / cpu['table1']:5.2f} x)" if ref else ""
        print(f"[{name}] {times[name]:7.1f} s wall, {cpu[name]:7.1f} s CPU{ratio}   "
              f"store: {store_events(cfg.runs_dir, t0_wall)}", flush=True)
        return out

    def table1():
        for f in folds:
            c = benchmark.fold_config(cfg, "single-6c", f)
            data = runs.load_data(c, progress=False)
            model, _ = runs.get_model(c, data=data, progress=False)
            benchmark.fold_relevant(c, model, 10.0, data=data, progress=False)

    studies = {
        "counterfactual": lambda: counterfactual.counterfactual_study(cfg, folds=folds, seeds=(0,), k=5, mu=10.0,
                                                                      progress=False),
        "shortcut": lambda: counterfactual.shortcut_study(cfg, rate=args.rate, folds=folds, seeds=(0,), k=5, mu=10.0,
                                                          progress=False),
        "leaderboard": lambda: leaderboard.leaderboard_page(cfg, split="blocks", folds=folds, n_images=args.n_images,
                                                            mu=10.0, k=5, path=home / "reports" / "benchmark.html",
                                                            progress=False),
    }
    print(f"an8Flower single-6c, size {args.size}{', quick' if args.quick else ''}, blocks split, folds "
          f"{list(folds)}, seed 0, mu = 10, k = 5; shortcut rate {args.rate:g}; leaderboard {args.n_images} images/fold")
    phase("table1", table1)
    results = {name: phase(name, studies[name]) for name in args.only}
    if not args.no_second:
        for name in args.only:
            phase(f"{name} (second run)", studies[name])

    if "counterfactual" in results:
        _, summary = results["counterfactual"]
        for measure, frame in summary.items():
            print(f"\ncounterfactual {measure} (mean [95 % CI] over folds; Wilcoxon p of mu-lasso vs each):")
            for r in frame.itertuples():
                p = "" if np.isnan(r.wilcoxon_p) else f"  p = {r.wilcoxon_p:.3f}"
                print(f"  {r.selector:<11} {r.mean:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]  n={r.n}{p}")
    if "shortcut" in results:
        table, summary = results["shortcut"]
        print("\nshortcut (share of classes whose features found the distractor; mean [95 % CI] over folds):")
        for r in summary.itertuples():
            print(f"  {r.role:<11} rate {r.distractor_rate:g}: {r.rate_found:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] "
                  f"of {r.n} classes; test acc {r.test_accuracy:.3f}, probe acc {r.probe_accuracy:.3f}")
    if "leaderboard" in results:
        board = results["leaderboard"]
        cols = ["label", "iou_area", "ci_low", "ci_high", "n_folds", "pointing_game", "relevance_mass",
                "randomisation_spearman", "random_logit_ssim", "n_images", "n_failed"]
        print(f"\nleaderboard ({board.attrs['file']}):")
        print(board[[c for c in cols if c in board]].round(3).to_string(index=False))
        scores = leaderboard.collect_scores(cfg, split="blocks")
        scores = scores[scores["fold"].isin(folds)]
        print("leaderboard: seconds per method when scored (sum over folds, as stored in its table):")
        print(scores.groupby("method")["seconds"].sum().sort_values(ascending=False).round(1).to_string())
    first = sum(v for k, v in times.items() if k in args.only)
    second = sum(v for k, v in times.items() if k.endswith("(second run)"))
    print(f"\nstudies, first run: {first:.0f} s ({first / times['table1']:.2f} x table1's {times['table1']:.0f} s); "
          f"second run: {second:.1f} s")


if __name__ == "__main__":
    main()
