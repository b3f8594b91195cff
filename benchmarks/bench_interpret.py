"""Benchmark: average images (paper Fig. 5) for every class of an8Flower single-6c at μ = 10.

Pipeline: an8Flower single-6c training split (folds ≠ 0) → FlowerNet (the trained run
checkpoint under ``runs/`` when there is one, else random weights) → one feature-extraction
pass with a :class:`vxnb.interpret.TopPatches` callback on every descriptor layer (top-100
images per feature) → μ-lasso at μ = 10 → relevant features → ``average_images`` for every
class with all three comparison heatmaps (ours, DeconvNet+GB, upsampled activations).

The timed figure is ``average_images``. The reference measured in the same run is one plain
forward pass over the same images ``average_images`` touches (the top-100 of every distinct
relevant feature, loaded from the dataset the same way); the script prints both times, their
ratio (≈ the cost of the method per image in forward passes), and whether the target
(≤ 120 s) is met.

When a piece of the pipeline is missing (renderer, features, lasso, relevance, deconv) the
script says so and stands in: random images, a TopPatches pass of its own, 10 random
relevant features per class, no heatmap averages.

    python benchmarks/bench_interpret.py            # size 128, all training images, 2 threads
    python benchmarks/bench_interpret.py --quick    # size 64, 600 training images
"""
from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Subset, TensorDataset

from vxnb.averages import average_images
from vxnb.interpret import TopPatches, collect_top_patches

REPO = Path(__file__).resolve().parent.parent
TARGET_S = 120.0


def _try(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        print(f"  [missing] {module}: {err}")
        return None


def _data(args, notes: list[str]):
    an8 = _try("vxnb.data.an8flower")
    if an8 is not None:
        t0 = time.perf_counter()
        full = an8.An8Flower(args.data_root, variant="single-6c", size=args.size, generate=True, seed=0,
                             progress=True)
        train_idx, _ = full.fold_indices(0)
        if args.limit is not None and args.limit < len(train_idx):
            rng = np.random.default_rng(0)
            train_idx = np.sort(rng.choice(train_idx, args.limit, replace=False))
        print(f"  data: an8Flower single-6c, size {args.size}, {len(train_idx)} training images "
              f"(ready in {time.perf_counter() - t0:.1f} s)")
        return Subset(full, train_idx.tolist()), list(full.classes)
    notes.append("synthetic random images instead of an8Flower")
    n = args.limit or 4800
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, args.size, args.size, generator=g)
    y = torch.arange(n) % 6
    print(f"  data: {n} random images {args.size}×{args.size} (stand-in)")
    return TensorDataset(x, y), [f"class{i}" for i in range(6)]


def _model(args, classes, notes: list[str]):
    models = _try("vxnb.models")
    if models is None:
        raise SystemExit("vxnb.models is needed for the reference FlowerNet")
    try:
        from vxnb.studies.runs import RunConfig
        run = RunConfig(dataset="an8flower", variant="single-6c", size=args.size, runs_root=args.runs_root).run_name
    except Exception:  # noqa: BLE001 - the run naming is a convenience only
        run = f"an8flower-single-6c-s{args.size}-f0-seed0"
    ckpt = Path(args.weights) if args.weights else Path(args.runs_root) / run / "model.pt"
    if ckpt.is_dir():
        ckpt = ckpt / "model.pt"
    if ckpt.exists() and (ckpt.parent / "meta.json").exists():
        model, _ = models.load_checkpoint(ckpt.parent)
        print(f"  model: trained FlowerNet from {ckpt.parent}")
    elif ckpt.exists():
        model = models.FlowerNet(len(classes), size=args.size)
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        print(f"  model: FlowerNet weights from {ckpt}")
    else:
        torch.manual_seed(0)
        model = models.FlowerNet(len(classes), size=args.size)
        notes.append("random-init FlowerNet (no trained checkpoint found)")
        print("  model: FlowerNet with random weights (no checkpoint under runs/)")
    return model.eval()


def _forward_reference(model, data, tp, relevant, n: int, batch_size: int = 50) -> tuple[float, int]:
    """One plain forward pass over the images ``average_images`` touches (the top-n of every
    distinct relevant feature, loaded from the dataset the same way, in the same batches)."""
    table = tp.to_frame()
    keys = relevant[["layer", "channel"]].drop_duplicates().itertuples(index=False)
    t0 = time.perf_counter()
    count = 0
    with torch.no_grad():
        for layer, channel in keys:
            idx = table[(table.layer == layer) & (table.channel == channel)].sort_values("rank")["index"].head(n)
            idx = idx.tolist()
            for s in range(0, len(idx), batch_size):
                x = torch.stack([data[int(i)][0] for i in idx[s:s + batch_size]])
                model(x)
                count += len(x)
    return time.perf_counter() - t0, count


def _relevant(args, model, data, classes, notes: list[str]):
    """(TopPatches, relevant DataFrame) — the real pipeline when its modules exist."""
    features, lasso, relevance = (_try(m) for m in ("vxnb.features", "vxnb.lasso", "vxnb.relevance"))
    t0 = time.perf_counter()
    if features is not None and lasso is not None and relevance is not None:
        layers = features.default_layers(model)
        tp = TopPatches(model, layers=layers, k=args.k)
        feats = features.extract_features(model, data, layers=layers, n_classes=len(classes), callbacks=[tp],
                                          batch_size=args.batch_size, progress=True)
        t_extract = time.perf_counter() - t0
        W = lasso.mu_lasso_gram(feats.G, feats.XtL, args.mu, tol=feats.lasso_tol)
        relevant = relevance.relevant_features(W, feats.columns, classes)
        print(f"  feature pass + top-{args.k} tracking: {t_extract:.1f} s "
              f"({feats.columns.shape[0]} features); μ-lasso at μ = {args.mu:g}")
        return tp, relevant
    notes.append("random relevant features (features/lasso/relevance missing)")
    layers = [n for n, m in model.named_children() if isinstance(m, (torch.nn.ReLU,))]
    tp = collect_top_patches(model, data, layers=layers, k=args.k, batch_size=args.batch_size)
    print(f"  own top-{args.k} pass over {len(layers)} layers: {time.perf_counter() - t0:.1f} s")
    frame = tp.to_frame()[["layer", "channel", "kind"]].drop_duplicates().reset_index(drop=True)
    frame["feature"] = np.arange(len(frame))
    rng = np.random.default_rng(0)
    rows = []
    for c in range(len(classes)):
        pick = frame.iloc[rng.choice(len(frame), 10, replace=False)]
        for _, r in pick.iterrows():
            rows.append({"class": c, "feature": int(r["feature"]), "layer": r["layer"], "layer_number": -1,
                         "kind": r["kind"], "channel": int(r["channel"]), "weight": float(rng.random())})
    return tp, pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="size 64 and 600 training images")
    parser.add_argument("--size", type=int, default=None, help="image size (default 128; 64 with --quick)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many training images")
    parser.add_argument("--mu", type=float, default=10.0)
    parser.add_argument("--k", type=int, default=100, help="top images per feature")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-root", default=str(REPO / "data"))
    parser.add_argument("--runs-root", default=str(REPO / "runs"))
    parser.add_argument("--weights", default=None,
                        help="a run folder / model.pt checkpoint or a FlowerNet state_dict file "
                             "(default: the run folder of this setting under --runs-root, if trained)")
    args = parser.parse_args()
    args.size = args.size or (64 if args.quick else 128)
    if args.quick and args.limit is None:
        args.limit = 600
    torch.set_num_threads(args.threads)
    notes: list[str] = []

    print(f"bench_interpret: an8Flower single-6c, size {args.size}, μ = {args.mu:g}, {args.threads} thread(s)")
    data, classes = _data(args, notes)
    model = _model(args, classes, notes)
    tp, relevant = _relevant(args, model, data, classes, notes)
    methods = ["activation"]
    if _try("vxnb.deconv") is not None:
        methods = ["ours", "deconv", "activation"]
    else:
        notes.append("no heatmap averages (vxnb.deconv missing)")
    counts = relevant.groupby("class").size()
    print(f"  relevant features per class: {counts.to_dict()} "
          f"({relevant[['layer', 'channel']].drop_duplicates().shape[0]} distinct)")

    t_ref, n_ref = _forward_reference(model, data, tp, relevant, args.k)
    t0 = time.perf_counter()
    result = average_images(model, data, tp, relevant, n=args.k, methods=methods, batch_size=50, progress=True)
    t_avg = time.perf_counter() - t0
    n_items = len(result)
    print()
    print(f"average images: {n_items} (class, feature) items, methods = {methods}")
    print(f"  average_images           {t_avg:8.2f} s")
    print(f"  reference: plain forward {t_ref:8.2f} s  (the same {n_ref} images: load + one forward each)")
    print(f"  ratio                    {t_avg / t_ref:8.2f} ×")
    verdict = "meets" if t_avg <= TARGET_S else "MISSES"
    print(f"  target ≤ {TARGET_S:.0f} s: {verdict}" + (" (quick setting)" if args.quick else ""))
    for msg in result.messages:
        print(f"  note: {msg}")
    if notes:
        print("  stand-ins: " + "; ".join(notes))


if __name__ == "__main__":
    main()
