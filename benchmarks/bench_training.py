"""Benchmark: training the an8Flower fold models, as notebook 05 trains them, today's way and the
new way, in the same run (issue 26: ≤ 0.4× today's total at the same per-fold accuracy, 99–100 %).

For every (variant, split, fold) asked for, FlowerNet is trained from the same seed twice:

- ``today``: the recipe before issue 26, as the report trained the folds: one after the other,
  ``--today-threads`` torch threads (the report's machine: 2), 5 epochs at lr 1e-3, batch 32,
  ``preload=False`` (every item read, PNG decoded, on every epoch, and the held-out fold read
  again for the test accuracy of every epoch);
- ``new``: what ``vxnb.studies.benchmark.run_benchmark`` does now: every fold model trained up
  front by ``vxnb.studies.runs.train_models`` in ``--workers`` spawned processes of one torch
  thread each (``runs.TRAIN_THREADS``), the data preloaded, ``vxnb.models.FOLD_RECIPE``
  (empty now: the plain recipe; the figures in the README were taken with channels-last), into a
  temporary runs folder; its wall time includes starting the workers
  and each worker reading its fold.

The folds are measured in chunks of ``--chunk`` (default 2: the workers), the new way then
today's way for each chunk, with the ratio after each chunk, so that a cut run still has
figures. It prints, per fold, the wall seconds of each (the new one: that fold's training inside its
worker, while the other workers train too, and that divided by the workers), the test accuracy
(the held-out fold) of each, and at the end the total wall times and their ratio (the goal).
The machine may be shared: compare the ratio, measured in the same run.

    python benchmarks/bench_training.py                          # single-6c, views split, fold 0
    python benchmarks/bench_training.py --variants single-6c --folds 0 1 2 --splits views blocks
    python benchmarks/bench_training.py --jobs single-6c/views/0 single-6c/views/1 double-12c/blocks/0
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from vxnb import models
from vxnb.studies import runs
from vxnb.utils import seed_everything


#: The fold models' recipe before issue 26: epochs and train_model arguments.
TODAY_EPOCHS = 5
TODAY_OPTIONS = {"lr": 1e-3, "batch_size": 32, "preload": False}


def _today(cfg, threads: int) -> tuple[float, float, float]:
    """(wall s, CPU s, final test accuracy) of training ``cfg``'s fold model today's way."""
    train, test, classes = runs.load_data(cfg, progress=False)
    seed_everything(cfg.seed)  # as vxnb.studies.runs trains the first attempt
    model = cfg.spec.build_reference_model(cfg, classes)
    torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    hist = models.train_model(model, train, test, epochs=TODAY_EPOCHS, seed=cfg.seed, progress=False, **TODAY_OPTIONS)
    return time.perf_counter() - t0, time.process_time() - c0, hist["final_test_accuracy"]


def _jobs(args) -> list[tuple[str, str, int]]:
    if args.jobs:
        out = []
        for job in args.jobs:
            variant, split, fold = job.split("/")
            out.append((variant, split, int(fold)))
        return out
    return [(v, s, f) for v in args.variants for s in args.splits for f in args.folds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["single-6c"])
    parser.add_argument("--splits", nargs="+", default=["views"], choices=["views", "blocks"])
    parser.add_argument("--folds", nargs="+", type=int, default=[0])
    parser.add_argument("--jobs", nargs="+", default=None, help="variant/split/fold items instead of the product")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--today-threads", type=int, default=2, help="torch threads of today's way (2 cores)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the new way")
    parser.add_argument("--chunk", type=int, default=2, help="folds per measured chunk (new way, then today's)")
    parser.add_argument("--data-root", default=None, help="where an8Flower is cached (default: data/)")
    args = parser.parse_args()
    jobs = _jobs(args)
    cfgs = [runs.RunConfig(variant=v, size=args.size, test_fold=f, folds=s, data_root=args.data_root)
            for v, s, f in jobs]
    for cfg in cfgs:
        runs.data_record(cfg)  # render what is missing before anything is timed
    print(f"today: {TODAY_EPOCHS} epochs, {TODAY_OPTIONS}, one fold after the other, {args.today_threads} thread(s); "
          f"new: runs.train_models, {args.workers} workers x {runs.TRAIN_THREADS} thread(s), "
          f"FOLD_RECIPE {models.FOLD_RECIPE}, preloaded; in chunks of {args.chunk} folds (new, then today)")
    print(f"{'variant':<11} {'split':<6} fold | today wall s / CPU s, acc % | new wall s in its worker (/ workers) "
          "/ CPU s, acc %, epochs | ratio new/today: wall share, CPU")
    totals = {"today": 0.0, "new": 0.0, "today_cpu": 0.0, "new_cpu": 0.0}
    accs: list[float] = []
    for at in range(0, len(jobs), args.chunk):
        chunk = list(zip(jobs[at:at + args.chunk], cfgs[at:at + args.chunk]))
        new_wall, metas = _new([c for _, c in chunk], args.workers, args.today_threads)
        today = [_today(cfg, args.today_threads) for _, cfg in chunk]
        for ((v, s, f), _), (tw, tc, tacc), meta in zip(chunk, today, metas):
            h = meta["history"]
            share = h["seconds"] / args.workers
            accs += [tacc, meta["test_accuracy"]]
            totals["today_cpu"] += tc
            totals["new_cpu"] += h["cpu_seconds"]
            print(f"{v:<11} {s:<6} {f:>4} | {tw:6.1f} / {tc:6.1f}, {100 * tacc:5.1f} | {h['seconds']:6.1f} ({share:5.1f}) "
                  f"/ {h['cpu_seconds']:6.1f}, {100 * meta['test_accuracy']:5.1f}, {h['stopped_at']} | {share / tw:.2f}, "
                  f"{h['cpu_seconds'] / tc:.2f}")
        totals["today"] += sum(t[0] for t in today)
        totals["new"] += new_wall
        print(f"  chunk: today {sum(t[0] for t in today):.1f} s, new {new_wall:.1f} s, ratio "
              f"{new_wall / sum(t[0] for t in today):.2f}; so far: today {totals['today']:.1f} s, new "
              f"{totals['new']:.1f} s, ratio {totals['new'] / totals['today']:.2f}", flush=True)
    print(f"total wall: today {totals['today']:.1f} s; new {totals['new']:.1f} s (starting {args.workers} workers and "
          f"reading the data included); ratio new/today {totals['new'] / totals['today']:.2f} (goal <= 0.4); "
          f"lowest fold accuracy {100 * min(accs):.1f} %; CPU s: today {totals['today_cpu']:.1f}, new (in the workers' "
          f"training) {totals['new_cpu']:.1f}, ratio {totals['new_cpu'] / totals['today_cpu']:.2f}")


def _new(cfgs, workers: int, threads: int):
    """(wall s, checkpoint metas) of training ``cfgs``' fold models the new way, in a temporary runs folder."""
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        new_cfgs = [runs.RunConfig(**{**cfg.to_dict(), "runs_root": tmp}) for cfg in cfgs]
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        runs.train_models(new_cfgs, workers=workers, progress=False)
        wall = time.perf_counter() - t0
        return wall, [models.load_checkpoint(runs.checkpoint_dir(cfg))[1] for cfg in new_cfgs]


if __name__ == "__main__":
    main()
