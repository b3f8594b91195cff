"""Benchmark: training the an8Flower fold models, as the benchmark (notebook 05) trains them,
today's way and the new way, in the same run (issue 26: ≤ 0.4× today's total at the same
per-fold accuracy, 99–100 %).

For every (variant, split, fold) asked for, FlowerNet is built and trained exactly as
``vxnb.studies.runs`` trains a fold model (same seed, epochs, batch size, learning rate), once
per recipe:

- ``today``: ``preload=False`` — every item read (PNG decoded, mask included) on every epoch,
  and the held-out fold read again for the test accuracy of every epoch;
- ``new``: the default ``preload`` — both splits read once into uint8 tensors (the same run bit
  for bit: at the same epochs the script checks that the weights are equal) — and the default
  epochs (``--epochs`` to try others).

It prints wall-clock and CPU seconds of each, their ratio, and the test accuracy of each fold;
also how long loading the fold's data (``load_data``) takes, outside the training. Timings on a
shared machine are noisy: compare the ratio, measured in the same run, and the CPU seconds.

    python benchmarks/bench_training.py                          # single-6c, views split, fold 0
    python benchmarks/bench_training.py --variants single-6c double-12c part-2c --folds 0 1 --splits views blocks
"""
from __future__ import annotations

import argparse
import time

import torch

from vxnb import models
from vxnb.studies import runs
from vxnb.utils import seed_everything


#: The fold models' epochs before issue 26.
TODAY_EPOCHS = 5


def _train(cfg, data, preload: bool, epochs: int):
    train, test, classes = data
    seed_everything(cfg.seed)  # as vxnb.studies.runs trains the first attempt
    model = models.build_model("flowernet", num_classes=len(classes), size=cfg.size)
    t0, c0 = time.perf_counter(), time.process_time()
    hist = models.train_model(model, train, test, epochs=epochs, seed=cfg.seed, progress=False, preload=preload)
    return model, hist, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["single-6c"])
    parser.add_argument("--splits", nargs="+", default=["views"], choices=["views", "blocks"])
    parser.add_argument("--folds", nargs="+", type=int, default=[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the report's machine: 2 cores)")
    parser.add_argument("--data-root", default=None, help="where an8Flower is cached (default: data/)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the new recipe (default: vxnb.models.default_epochs('an8flower'))")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    total = {"today": [0.0, 0.0], "new": [0.0, 0.0]}
    print(f"today: {TODAY_EPOCHS} epochs, preload=False; new: {args.epochs or models.default_epochs('an8flower')} epochs, "
          f"preload default; {args.threads} torch thread(s)")
    print(f"{'variant':<11} {'split':<6} fold | load s | today wall/cpu s, acc | new wall/cpu s, acc | same weights")
    for variant in args.variants:
        for split in args.splits:
            for fold in args.folds:
                cfg = runs.RunConfig(variant=variant, size=args.size, test_fold=fold, folds=split,
                                     data_root=args.data_root)
                t0 = time.perf_counter()
                data = runs.load_data(cfg, progress=False)
                t_load = time.perf_counter() - t0
                res = {}
                new_epochs = args.epochs or models.default_epochs("an8flower")
                for recipe, preload, epochs in (("today", False, TODAY_EPOCHS), ("new", None, new_epochs)):
                    model, hist, wall, cpu = _train(cfg, data, preload, epochs)
                    res[recipe] = (model.state_dict(), hist["final_test_accuracy"], wall, cpu)
                    print(f"  {recipe}: test accuracy per epoch {[round(100 * a, 1) for a in hist['test_accuracy']]}")
                    total[recipe][0] += wall
                    total[recipe][1] += cpu
                same = (all(torch.equal(v, res["new"][0][k]) for k, v in res["today"][0].items())
                        if new_epochs == TODAY_EPOCHS else f"n/a ({new_epochs} epochs)")
                print(f"{variant:<11} {split:<6} {fold:>4} | {t_load:6.2f} | "
                      f"{res['today'][2]:6.1f} / {res['today'][3]:6.1f}, {100 * res['today'][1]:5.1f} % | "
                      f"{res['new'][2]:6.1f} / {res['new'][3]:6.1f}, {100 * res['new'][1]:5.1f} % | {same}")
    (tw, tc), (nw, nc) = total["today"], total["new"]
    print(f"total: today {tw:.1f} s wall / {tc:.1f} s CPU; new {nw:.1f} s wall / {nc:.1f} s CPU; "
          f"ratio new/today {nw / tw:.2f} wall, {nc / tc:.2f} CPU (goal <= 0.4)")


if __name__ == "__main__":
    main()
