"""Benchmark: modern models measured on an8Flower single-6c, blocks split (issue 25, item 5).

Trains a MobileNetV3-small, a reduced ConvNeXt and a reduced ViT here, each with its recipe
(:data:`vxnb.studies.modern.MODERN_RECIPES`; stored by content key under ``--runs-root``, so a
second run with the same root loads them), selects each one's relevant features with the
μ-lasso, and scores Table 1's rows (Ours, Deconv+GB, Upsam. Act.), Grad-CAM (token layers
reshaped by ``vxnb.baselines``) and, for the ViT, lxt's AttnLRP: area under the IoU curve (%)
beside Quantus's localisation metrics (fast judge), mean (std) over the folds run.

    python benchmarks/bench_modern.py --folds 0 1 2 3 4                 # the full setting
    python benchmarks/bench_modern.py --folds 0 --layer-choices --runs-root /tmp/modern-runs   # one fold, layer choices
    python benchmarks/bench_modern.py --archs swin maxvit --layer-choices --folds 0 1 2 3 4   # Swin and MaxViT layers
    python benchmarks/bench_modern.py --folds 0 --epochs 1 --train-limit 600 --images 60   # a smoke run

Prints, per architecture and fold, the test accuracy, the training time (as measured when the
model was trained; "stored" where it was loaded), the features + μ-lasso time and the scoring
time of the rows, and the wall-clock of the whole run; with ``--layer-choices``, the layer-choice
table (:func:`vxnb.studies.modern.layer_choice_table`: Ours' IoU area per fold, m, lasso R²,
pointing game) for each architecture's choices in :data:`vxnb.studies.modern.LAYER_CHOICES`.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import pandas as pd
import torch

from vxnb.utils import atomic_path
from vxnb.studies.modern import (ALL_MODERN_ARCHS, LAYER_CHOICES, LAYER_STUDY_ARCHS, MODERN_ARCHS, layer_choice_table,
                                 modern_benchmark, modern_table, modern_times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--archs", nargs="+", default=list(MODERN_ARCHS), choices=ALL_MODERN_ARCHS,
                    help=f"default: {' '.join(MODERN_ARCHS)}; the layer study adds {' '.join(LAYER_STUDY_ARCHS)}")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=None, help="replaces every recipe's epochs (default: the recipes')")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--images", type=int, default=120, help="evaluated test images per fold")
    ap.add_argument("--data-root", default=None, help="an8Flower cache (default: a temporary folder)")
    ap.add_argument("--runs-root", default=None, help="run folders holding the stored models (default: a temporary folder)")
    ap.add_argument("--csv", default=None, help="also write every row (arch, fold, method) to this CSV file")
    ap.add_argument("--merge", nargs="+", default=None, metavar="CSV",
                    help="print the tables of CSV files written by --csv (folds run apart) and train nothing")
    ap.add_argument("--layer-choices", "--vit-layers", action="store_true",
                    help="also score Ours on the same models (ViT, Swin, MaxViT) described by their block outputs and "
                         "by their MLPs' hidden units (modern.LAYER_CHOICES)")
    args = ap.parse_args()
    pd.set_option("display.width", 200)
    if args.merge:
        df = pd.concat([pd.read_csv(f, keep_default_na=False, na_values=[""]) for f in args.merge], ignore_index=True)
        print(f"merged {len(args.merge)} files: folds {sorted(df['fold'].unique().tolist())}")
        print(modern_times(df).round(3).to_string())
        print(modern_table(df).round(3).to_string())
        if df["arch"].str.contains(":").any():
            print(layer_choice_table(df).round(3).to_string())
        return
    with tempfile.TemporaryDirectory(prefix="vxnb-modern-") as tmp:
        t0 = time.perf_counter()
        df = modern_benchmark(archs=args.archs, folds=args.folds, size=args.size, epochs=args.epochs,
                              train_limit=args.train_limit, n_test_images=args.images,
                              data_root=args.data_root or f"{tmp}/data", runs_root=args.runs_root or f"{tmp}/runs",
                              layers={k: v for a in args.archs for k, v in LAYER_CHOICES.get(a, {}).items()}
                              if args.layer_choices else None)
        total = time.perf_counter() - t0
    if args.csv:
        with atomic_path(args.csv) as tmp:
            df.to_csv(tmp, index=False)
    print(f"an8Flower single-6c (blocks), folds {args.folds}, size {args.size}, epochs {args.epochs}, "
          f"train_limit {args.train_limit}, {args.images} test images per fold; {total:.0f} s in all")
    print(f"torch threads: {torch.get_num_threads()}")
    print(modern_times(df).round(3).to_string())
    print(modern_table(df).round(3).to_string())
    if args.layer_choices:
        print(layer_choice_table(df).round(3).to_string())


if __name__ == "__main__":
    main()
