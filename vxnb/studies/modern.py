"""Modern models on an8Flower (issue 25, item 5): a mobile CNN, a ConvNeXt and a small ViT,
trained here on an8Flower single-6c (blocks split), scored with Table 1's rows, Grad-CAM (the
token reshape done by :mod:`vxnb.baselines`) and, for the ViT, lxt's AttnLRP
(:func:`vxnb.baselines.attnlrp`), the IoU area beside Quantus's localisation metrics.

``modern_benchmark(folds=(0, 1, 2, 3, 4))`` is the full setting; ``benchmarks/bench_modern.py``
and notebook 05 (full report only) call it. The models are trained with
:func:`vxnb.models.train_model` as it is and are not cached (each call trains them again).
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..utils import describe
from . import benchmark, runs, table1

__all__ = ["MODERN_ARCHS", "MODERN_ROWS", "MODERN_SCORES", "modern_model", "modern_benchmark", "modern_rows",
           "modern_table", "lasso_r2"]

#: The architectures: a mobile CNN, a reduced ConvNeXt, a reduced torchvision ViT.
MODERN_ARCHS: tuple[str, ...] = ("mobilenet_v3_small", "convnext", "vit")
#: The rows: Table 1's (our features drawn three ways), Grad-CAM, AttnLRP (transformers only).
MODERN_ROWS: tuple[str, ...] = ("ours", "ours_deconv", "ours_upsampled", "gradcam", "attnlrp")

#: The scores of a row: the IoU area (%) and Quantus's localisation metrics.
MODERN_SCORES: tuple[str, ...] = ("iou_auc", "pointing_game", "relevance_mass", "relevance_rank", "auc", "top_k")


def modern_model(arch: str, n_classes: int, size: int, seed: int = 0) -> nn.Module:
    """A freshly initialised model of ``arch`` (:data:`MODERN_ARCHS`) for ``size``-pixel images:
    torchvision's MobileNetV3-small; a ConvNeXt of two stages (widths 32, 64; depths 1, 1); a
    ViT of patch 8, 4 layers, 4 heads, width 64, MLP 128 (torchvision zero-initialises the head)."""
    import torchvision
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    if arch not in MODERN_ARCHS:
        raise ValueError(f"arch: expected one of {', '.join(MODERN_ARCHS)}, got {arch!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32 or (arch == "vit" and size % 8):
        raise ValueError(f"size: expected an int >= 32 (a multiple of 8 for the ViT), got {size!r}")
    torch.manual_seed(seed)
    if arch == "mobilenet_v3_small":
        return torchvision.models.mobilenet_v3_small(num_classes=n_classes)
    if arch == "convnext":
        return ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)], stochastic_depth_prob=0.0,
                        num_classes=n_classes)
    return torchvision.models.VisionTransformer(image_size=size, patch_size=8, num_layers=4, num_heads=4,
                                                hidden_dim=64, mlp_dim=128, num_classes=n_classes)


def modern_rows(arch: str) -> tuple[str, ...]:
    """The rows that apply to ``arch``: AttnLRP for the ViT only."""
    return tuple(r for r in MODERN_ROWS if r != "attnlrp" or arch == "vit")


def _heatmaps(row: str, model: nn.Module, images: torch.Tensor, preds: torch.Tensor, relevant: Any,
              k: int, batch_size: int) -> torch.Tensor:
    if row == "attnlrp":
        from ..baselines import attnlrp

        return torch.cat([attnlrp(model, images[i:i + batch_size], preds[i:i + batch_size]).cpu()
                          for i in range(0, len(images), batch_size)])
    return benchmark.method_heatmaps(row, model, images, preds, relevant=relevant if row in table1.OURS_METHODS
                                     else None, k=k, batch_size=batch_size)


def modern_benchmark(*, archs: Sequence[str] = MODERN_ARCHS, folds: Sequence[int] = (0,), size: int = 64,
                     epochs: int = 10, train_limit: int | None = None, n_test_images: int | None = 120,
                     mu: float = 10.0, k: int = 5, batch_size: int = 32, seed: int = 0,
                     data_root: str | None = None, runs_root: str | None = None,
                     layers: Mapping[str, Any] | None = None, progress: bool = True) -> pd.DataFrame:
    """Train each of ``archs`` on each fold of an8Flower single-6c (blocks split), select its
    relevant features (μ-lasso on the default layers' responses of the training split), and
    score every row of :func:`modern_rows` on ``n_test_images`` of the held-out fold.

    Returns one row per (arch, fold, method): ``test_accuracy`` (on the whole held-out fold),
    ``m`` (features), ``n_relevant``, ``iou_auc`` (%, :func:`vxnb.evaluate.iou_auc`), Quantus's
    localisation metrics (:func:`vxnb.evaluate.quantus_metrics.localisation_metrics`, fast
    judge), ``seconds`` (of the row's heatmaps), ``train_seconds``. ``layers``: per arch, the
    described layers (names or glob patterns, see :func:`vxnb.features.select_layers`; default
    :func:`vxnb.features.default_layers`); a key ``"vit:<tag>"`` adds the ViT described by those
    layers as the arch ``"vit:<tag>"`` (the same trained model: the layer-choice measurement). Means over folds:
    ``df.groupby(["arch", "method"]).mean(numeric_only=True)``.
    """
    from ..evaluate.occlusion import batched_logits
    from ..features import extract_features, select_layers
    from ..lasso import lasso_path
    from ..models import train_model
    from ..relevance import Relevance

    if isinstance(archs, str) or not all(a in MODERN_ARCHS for a in archs) or not archs:
        raise ValueError(f"archs: expected a non-empty list of {', '.join(MODERN_ARCHS)}, got {describe(archs)}")
    layers = dict(layers or {})
    if any(a.split(":")[0] not in MODERN_ARCHS for a in layers):
        raise ValueError(f"layers: expected keys among {', '.join(MODERN_ARCHS)} (or 'vit:<tag>'), got {list(layers)}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: expected a positive int, got {epochs!r}")
    base = runs.RunConfig(dataset="an8flower", variant="single-6c", size=size, folds="blocks",
                          train_limit=train_limit, seed=seed, data_root=data_root, runs_root=runs_root)
    records: list[dict] = []
    if isinstance(folds, (str, int)) or not folds or any(isinstance(f, bool) or f not in range(5) for f in folds):
        raise ValueError(f"folds: expected a non-empty list of folds in 0..4, got {describe(folds)}")
    for fold in [int(f) for f in folds]:
        cfg = benchmark.fold_config(base, "single-6c", fold)
        data = runs.load_data(cfg, progress=progress)
        train, test, classes = data
        images, labels, masks, _ = benchmark.fold_data(cfg, n_test_images, data=data, progress=progress)
        for arch in tqdm(archs, desc=f"single-6c fold {fold}", disable=None if progress else True):
            model = modern_model(arch, len(classes), size, seed)
            t0 = time.perf_counter()
            hist = train_model(model, train, test, epochs=epochs, seed=seed, device="cpu", progress=progress)
            train_s = time.perf_counter() - t0
            model.eval()
            preds = batched_logits(model, images, batch_size=64).argmax(1)
            acc = hist.get("final_test_accuracy")
            choices = [(arch, layers.get(arch))] + [(name, v) for name, v in layers.items()
                                                    if name.startswith(arch + ":")]
            for name, chosen in choices:
                feats = extract_features(model, train, layers=select_layers(model, chosen), n_classes=len(classes), batch_size=64,
                                         device="cpu", progress=progress)
                path = lasso_path(feats.G, feats.XtL, mu_max=max(50.0, mu))
                relevant = Relevance.from_path(path, feats, mu)
                rows = modern_rows(arch) if name == arch else table1.OURS_METHODS[-1:] + ("ours",)
                records += _score(name, fold, rows, model, images, labels, masks, preds, relevant, feats,
                                  k, batch_size, acc, train_s, path.coef(mu), mu)
    return pd.DataFrame.from_records(records)


def _score(arch, fold, rows, model, images, labels, masks, preds, relevant, feats, k, batch_size, acc, train_s,
           W, mu) -> list[dict]:
    from ..evaluate import iou_auc
    from ..evaluate.quantus_metrics import localisation_metrics

    out = []
    fit = lasso_r2(feats, W)
    for row in dict.fromkeys(rows):
        t0 = time.perf_counter()
        h = _heatmaps(row, model, images, preds, relevant, k, batch_size)
        sec = time.perf_counter() - t0
        q = localisation_metrics(h, masks)
        out.append({"arch": arch, "fold": fold, "method": row, "label": table1.METHOD_LABELS.get(row, "AttnLRP (lxt)"),
                    "test_accuracy": acc, "eval_accuracy": float((preds == labels).float().mean()),
                    "m": int(feats.G.shape[0]), "n_relevant": int(np.count_nonzero(relevant.W)),
                    "lasso_r2": fit, "iou_auc": iou_auc(h, masks), **benchmark.quantus_row(q),
                    "seconds": sec, "train_seconds": train_s})
    return out


def lasso_r2(feats: Any, W: Any) -> float:
    """R² of the lasso's fit X W ≈ L (L one-hot) on the training split, from the sums G = XᵀX,
    XᵀL and the class counts: 1 - ‖XW - L‖² / ‖L - mean L‖², over all classes together."""
    W = np.asarray(W, dtype=np.float64)
    counts = np.asarray(feats.class_counts, dtype=np.float64)
    rss = counts.sum() - 2 * np.sum(W * feats.XtL) + np.sum(W * (feats.G @ W))
    tss = np.sum(counts - counts ** 2 / feats.n)
    return float(1 - rss / tss)


def modern_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean (and std over folds, where there are several) of each score per (arch, method label),
    rows in the order run; the accuracy, m and the heatmap seconds beside them."""
    if not isinstance(df, pd.DataFrame) or not {"arch", "label", "fold", *MODERN_SCORES} <= set(df.columns):
        raise ValueError(f"df: expected the DataFrame of modern_benchmark, got {describe(df)}")
    g = df.groupby(["arch", "label"], sort=False)
    table = g[["test_accuracy", "m", *MODERN_SCORES, "seconds"]].mean()
    if df["fold"].nunique() > 1:
        table.insert(table.columns.get_loc("iou_auc") + 1, "iou_auc_std", g["iou_auc"].std())
    return table
