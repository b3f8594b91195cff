"""Modern models on an8Flower (issue 25, item 5): a mobile CNN, a ConvNeXt and a small ViT,
trained here on an8Flower single-6c (blocks split), scored with Table 1's rows, Grad-CAM (the
token reshape done by :mod:`vxnb.baselines`) and, for the ViT, lxt's AttnLRP
(:func:`vxnb.baselines.attnlrp`), the IoU area beside Quantus's localisation metrics.

A small Swin and a small MaxViT (:data:`LAYER_STUDY_ARCHS`) are built and trained the same way
for the layer-choice measurement of item 4 (:data:`LAYER_CHOICES`, :func:`layer_choice_table`;
``bench_modern.py --archs swin maxvit --layer-choices``).

``modern_benchmark(folds=(0, 1, 2, 3, 4))`` is the full setting; ``benchmarks/bench_modern.py``
and notebook 05 (full report only) call it. Each architecture is trained with its own recipe
(:data:`MODERN_RECIPES`, the settings of :func:`vxnb.models.train_model` plus the model's own)
and stored by content key in the run folder of its fold (:func:`get_modern_model`: the recipe,
the architecture, the image size, the seed and the data's fingerprint), so a second call loads
the models instead of training them; the features and μ-lasso paths are cached by
:func:`vxnb.studies.runs.get_features` / :func:`~vxnb.studies.runs.get_lasso_path`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import _store
from ..utils import describe, json_ready
from . import benchmark, runs, table1

__all__ = ["MODERN_ARCHS", "LAYER_STUDY_ARCHS", "ALL_MODERN_ARCHS", "LAYER_CHOICES", "MODERN_ROWS", "MODERN_SCORES", "MODERN_RECIPES", "MODERN_SIZE", "MODERN_MODEL_VERSION", "modern_model",
           "modern_recipe", "modern_model_key", "get_modern_model", "modern_benchmark", "modern_rows", "modern_table",
           "modern_times", "layer_choice_table",
           "lasso_r2"]

#: The architectures: a mobile CNN, a reduced ConvNeXt, a reduced torchvision ViT.
MODERN_ARCHS: tuple[str, ...] = ("mobilenet_v3_small", "convnext", "vit")
#: Two more transformers for the layer-choice measurement of issue 25 item 4 (not in notebook 05's
#: section nor the default benchmark run): a small torchvision Swin (patch 4, width 32, depths 2, 2,
#: heads 2, 4, window 4) and a small torchvision MaxViT (stem 16, partition 4, widths 32, 64, one
#: layer per block, head dimension 16).
LAYER_STUDY_ARCHS: tuple[str, ...] = ("swin", "maxvit")
#: Every architecture :func:`modern_model` builds.
ALL_MODERN_ARCHS: tuple[str, ...] = MODERN_ARCHS + LAYER_STUDY_ARCHS
#: The layer choices of issue 25 item 4, per architecture, for :func:`modern_benchmark`'s ``layers``:
#: the same trained model described by its block outputs and by its MLPs' hidden units (after the
#: GELU), beside the default (:func:`vxnb.features.default_layers`, the arch's own row). ViT: the
#: encoder blocks; the default before the measurement (patch embedding and the encoder's
#: normalised output). Swin: the Swin blocks ``features.k.j`` (the default adds the patch
#: embedding's conv and the patch merging's reduction; two more choices add only one of the two);
#: their MLPs' GELU ``features.k.j.mlp.1``.
#: MaxViT: the MBConv, window- and grid-attention outputs (the default adds the stem and the
#: head's pre-logits; two more choices add only one of the two to the blocks); the window and grid
#: attention's ``mlp_layer`` GELU.
LAYER_CHOICES: dict[str, dict[str, Any]] = {
    "vit": {"vit:blocks": "encoder.layers.*", "vit:mlp_hidden": "encoder.layers.*.mlp.1",
            "vit:encoder_out": ["conv_proj", "encoder"]},
    "swin": {"swin:blocks": ["features.1.*", "features.3.*"],
             "swin:mlp_hidden": ["features.1.*.mlp.1", "features.3.*.mlp.1"],
             "swin:embed_blocks": ["features.0.0", "features.1.*", "features.3.*"],
             "swin:blocks_merging": ["features.1.*", "features.2.reduction", "features.3.*"]},
    "maxvit": {"maxvit:blocks": "blocks.*.layers.*.layers.*",
               "maxvit:mlp_hidden": "blocks.*.layers.*.layers.*_attention.mlp_layer.2",
               "maxvit:stem_blocks": ["stem.0.2", "stem.1.0", "blocks.*.layers.*.layers.*"],
               "maxvit:blocks_head": ["blocks.*.layers.*.layers.*", "classifier.4"]},
}
#: The rows: Table 1's (our features drawn three ways), Grad-CAM, AttnLRP (transformers only).
MODERN_ROWS: tuple[str, ...] = ("ours", "ours_deconv", "ours_upsampled", "gradcam", "attnlrp")

#: The scores of a row: the IoU area (%) and Quantus's localisation metrics.
MODERN_SCORES: tuple[str, ...] = ("iou_auc", "pointing_game", "relevance_mass", "relevance_rank", "auc", "top_k")

#: The training recipe of each architecture on an8Flower single-6c (64 px, 4,800 training images
#: of a blocks-split fold), all of it in the stored model's key. ``epochs``, ``batch_size``, ``lr``
#: (the peak of :func:`vxnb.models.train_model`'s one-cycle schedule: AdamW, linear warm-up over
#: the first 20 % of the steps, cosine decay), ``weight_decay`` (AdamW's, decoupled) and
#: ``augment`` (random shifts up to 1/14 of the image) go to ``train_model``; ``bn_momentum`` and
#: ``layer_scale`` are the model's (:func:`modern_model`). The BatchNorm model: torchvision's
#: MobileNetV3 uses BatchNorm momentum 0.01, whose running statistics lag a few hundred steps
#: behind the weights of a short run (the test accuracy stayed at chance while the training
#: accuracy was 99 %), so it is set to PyTorch's 0.1, with shifts against the viewpoint gap of the
#: blocks split. The LayerNorm models take the transformer recipe (weight decay 0.05, batch 32):
#: the ConvNeXt with layer scale 1 instead of torchvision's 1e-6, which leaves the blocks of a
#: two-block network near identity so long that fold 1 stayed at chance for 6 epochs at lr 5e-3
#: (fold 0: 99.0 %); the ViT at lr 1e-3. Measured test accuracies: docs/ARCHITECTURE.md,
#: "Modern models on an8Flower".
MODERN_RECIPES: dict[str, dict[str, Any]] = {
    "mobilenet_v3_small": {"epochs": 6, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4, "augment": True,
                           "bn_momentum": 0.1},
    "convnext": {"epochs": 6, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.05, "augment": False,
                 "layer_scale": 1.0},
    "vit": {"epochs": 6, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.05, "augment": False},
    "swin": {"epochs": 6, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.05, "augment": False},
    "maxvit": {"epochs": 6, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.05, "augment": False,
               "bn_momentum": 0.1},
}
#: The image size the recipes were measured at (notebook 05's section uses it whatever the run's size:
#: at 128 px the ViT has four times the tokens and the training four times the time).
MODERN_SIZE = 64
#: The size each architecture needs a multiple of: the ViT's patch 8; MaxViT's partition 4 after
#: three halvings (stem, two blocks).
_SIZE_STEP = {"vit": 8, "swin": 4, "maxvit": 32}
#: The recipe keys that configure the model rather than :func:`vxnb.models.train_model`.
_MODEL_OPTIONS = ("bn_momentum", "layer_scale")
#: The recipe keys :func:`modern_recipe` accepts.
_RECIPE_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "augment", "bn_momentum", "layer_scale")
#: Format version of the stored modern models (part of their key).
MODERN_MODEL_VERSION = 1
runs.register_artifact("modern-model", MODERN_MODEL_VERSION)


def modern_model(arch: str, n_classes: int, size: int, seed: int = 0, *, bn_momentum: float | None = None,
                 layer_scale: float | None = None) -> nn.Module:
    """A freshly initialised model of ``arch`` (:data:`ALL_MODERN_ARCHS`) for ``size``-pixel images:
    torchvision's MobileNetV3-small; a ConvNeXt of two stages (widths 32, 64; depths 1, 1); a
    ViT of patch 8, 4 layers, 4 heads, width 64, MLP 128 (torchvision zero-initialises the head);
    a Swin of patch 4, width 32, depths 2, 2, heads 2, 4, window 4; a MaxViT of stem 16,
    partition 4, widths 32, 64, one layer per block, head dimension 16 (both without stochastic
    depth). ``bn_momentum``: set on every BatchNorm layer (None: torchvision's). ``layer_scale``: the
    ConvNeXt blocks' initial layer scale (None: torchvision's 1e-6)."""
    import torchvision
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.maxvit import MaxVit
    from torchvision.models.swin_transformer import SwinTransformer

    _check_arch(arch)
    if isinstance(size, bool) or not isinstance(size, int) or size < 32 or size % _SIZE_STEP.get(arch, 1):
        raise ValueError(f"size: expected an int >= 32 (a multiple of {_SIZE_STEP.get(arch, 1)} for {arch!r}), "
                         f"got {size!r}")
    if bn_momentum is not None and (isinstance(bn_momentum, bool) or not isinstance(bn_momentum, (int, float))
                                    or not 0 < bn_momentum <= 1):
        raise ValueError(f"bn_momentum: expected a number in (0, 1] or None, got {bn_momentum!r}")
    if layer_scale is not None and (arch != "convnext" or isinstance(layer_scale, bool)
                                    or not isinstance(layer_scale, (int, float)) or not layer_scale > 0):
        raise ValueError(f"layer_scale: expected a positive number for the convnext (or None), got {layer_scale!r} "
                         f"for {arch!r}")
    torch.manual_seed(seed)
    if arch == "mobilenet_v3_small":
        model = torchvision.models.mobilenet_v3_small(num_classes=n_classes)
    elif arch == "convnext":
        model = ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)], stochastic_depth_prob=0.0,
                         num_classes=n_classes, **({} if layer_scale is None else {"layer_scale": float(layer_scale)}))
    elif arch == "vit":
        model = torchvision.models.VisionTransformer(image_size=size, patch_size=8, num_layers=4, num_heads=4,
                                                     hidden_dim=64, mlp_dim=128, num_classes=n_classes)
    elif arch == "swin":
        model = SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                                stochastic_depth_prob=0.0, num_classes=n_classes)
    else:
        model = MaxVit(input_size=(size, size), stem_channels=16, partition_size=4, block_channels=[32, 64],
                       block_layers=[1, 1], head_dim=16, stochastic_depth_prob=0.0, num_classes=n_classes)
    if bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.momentum = float(bn_momentum)
    return model


def _check_arch(arch: Any) -> None:
    if arch not in ALL_MODERN_ARCHS:
        raise ValueError(f"arch: expected one of {', '.join(ALL_MODERN_ARCHS)}, got {arch!r}")


def modern_recipe(arch: str, epochs: int | None = None, overrides: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
    """The recipe ``arch`` is trained with: :data:`MODERN_RECIPES` with ``overrides`` (keys among
    epochs, batch_size, lr, weight_decay, augment, bn_momentum) and ``epochs`` (None: the
    recipe's) applied."""
    _check_arch(arch)
    overrides = dict(overrides or {})
    bad = [k for k in overrides if k not in _RECIPE_KEYS]
    if bad:
        raise ValueError(f"recipes: expected keys among {', '.join(_RECIPE_KEYS)}, got {bad} for {arch!r}")
    recipe = {**MODERN_RECIPES[arch], **overrides}
    if epochs is not None:
        recipe["epochs"] = epochs
    e = recipe["epochs"]
    if isinstance(e, bool) or not isinstance(e, int) or e < 1:
        raise ValueError(f"epochs: expected a positive int, got {e!r}")
    return recipe


def modern_model_key(cfg: Any, arch: str, recipe: Mapping[str, Any], n_classes: int) -> str:
    """The content key of ``arch`` trained with ``recipe`` on the run ``cfg`` (its data's
    fingerprint, test fold, training subset, size and seed)."""
    return _store.key("modern-model", _model_settings(cfg, arch, recipe, n_classes),
                      {"data": runs.data_record(cfg)["fingerprint"]}, MODERN_MODEL_VERSION)


def _model_settings(cfg: Any, arch: str, recipe: Mapping[str, Any], n_classes: int) -> dict[str, Any]:
    return {"arch": arch, "recipe": dict(recipe), "n_classes": int(n_classes), "size": cfg.size,
            "seed": cfg.seed, "train_limit": cfg.train_limit, "variant": cfg.variant, "folds": cfg.folds,
            "test_fold": cfg.test_fold, "train_threads": runs.TRAIN_THREADS}


def get_modern_model(cfg: Any, arch: str, recipe: Mapping[str, Any] | None = None, *,
                     data: tuple | None = None, retrain: bool = False, progress: bool = True
                     ) -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode, meta)``: ``arch`` trained on the run ``cfg``'s training split with
    ``recipe`` (default :func:`modern_recipe`), loaded from
    ``runs/<run>/modern/<arch>-<key>.pt`` when there, else trained on the CPU and stored there
    atomically under its key (:func:`modern_model_key`). ``meta``: ``test_accuracy`` (the whole
    held-out split), ``train_seconds``, ``history``, ``recipe``, ``key``, ``loaded`` (True: read from the store)."""
    from ..models import train_model

    if not isinstance(cfg, runs.RunConfig):
        raise TypeError(f"cfg: expected a vxnb.studies.runs.RunConfig, got {describe(cfg)}")
    recipe = modern_recipe(arch, overrides=recipe)
    train, test, classes = data if data is not None else runs.load_data(cfg, progress=progress)
    n_classes = len(classes)
    model_opts = {k: recipe[k] for k in _MODEL_OPTIONS if k in recipe}
    train_opts = {k: v for k, v in recipe.items() if k not in _MODEL_OPTIONS and k != "epochs"}
    settings = _model_settings(cfg, arch, recipe, n_classes)
    key = modern_model_key(cfg, arch, recipe, n_classes)
    record = runs.data_record(cfg)
    file = runs.run_dir(cfg) / "modern" / f"{arch}-{key}.pt"

    def build() -> nn.Module:
        return modern_model(arch, n_classes, cfg.size, cfg.seed, **model_opts)

    def compute() -> dict[str, Any]:
        model = build()
        # one torch thread, as every reference model: on the CPU the weights depend on the thread count
        hist = train_model(model, train, test, epochs=recipe["epochs"], seed=cfg.seed, device="cpu",
                           progress=progress, threads=runs.TRAIN_THREADS, **train_opts)
        meta = {"arch": arch, "key": key, "recipe": dict(recipe), "classes": list(classes),
                "test_accuracy": hist.get("final_test_accuracy"), "train_seconds": hist["seconds"],
                "train_cpu_seconds": hist["cpu_seconds"], "history": hist}
        return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "meta": json_ready(meta)}

    def load(path: Path) -> dict[str, Any]:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("meta", {}).get("key") != key:
            raise ValueError(f"{path}: not the stored {arch} of key {key}")
        return obj

    obj, hit = _store.load_or_compute(file, key, "modern-model", compute, load=load,
                                    save=lambda o, tmp: torch.save(o, tmp), recompute=retrain,
                                    settings=settings, inputs={"data": record["fingerprint"]}, data=[record],
                                    version=MODERN_MODEL_VERSION, root=cfg.runs_dir)
    model = build()
    model.load_state_dict(obj["state_dict"], strict=True)
    return model.eval(), {**obj["meta"], "loaded": bool(hit)}


def modern_rows(arch: str) -> tuple[str, ...]:
    """The rows that apply to ``arch``: every row, AttnLRP for the ViT only (lxt's AttnLRP patches
    ``nn.MultiheadAttention``). Upsam. Act. draws a token layer's channel on the patch grid and a
    channels-last map (Swin) permuted (:func:`vxnb.baselines.layer_maps`)."""
    _check_arch(arch)
    return tuple(r for r in MODERN_ROWS if r != "attnlrp" or arch == "vit")


def _heatmaps(row: str, model: nn.Module, images: torch.Tensor, preds: torch.Tensor, relevant: Any,
              k: int, batch_size: int) -> torch.Tensor:
    if row == "attnlrp":
        from ..baselines import attnlrp

        return torch.cat([attnlrp(model, images[i:i + batch_size], preds[i:i + batch_size]).cpu()
                          for i in range(0, len(images), batch_size)])
    return benchmark.method_heatmaps(row, model, images, preds, relevant=relevant if row in table1.OURS_METHODS
                                     else None, k=k, batch_size=batch_size)


def modern_benchmark(*, archs: Sequence[str] = MODERN_ARCHS, folds: Sequence[int] = (0,), size: int = MODERN_SIZE,
                     epochs: int | None = None, recipes: Mapping[str, Mapping[str, Any]] | None = None,
                     train_limit: int | None = None, n_test_images: int | None = 120,
                     mu: float = 10.0, k: int = 5, batch_size: int = 32, seed: int = 0,
                     data_root: str | None = None, runs_root: str | None = None,
                     layers: Mapping[str, Any] | None = None, retrain: bool = False,
                     progress: bool = True) -> pd.DataFrame:
    """Train (or load, :func:`get_modern_model`) each of ``archs`` on each fold of an8Flower
    single-6c (blocks split), select its relevant features (μ-lasso on the default layers'
    responses of the training split), and score every row of :func:`modern_rows` on
    ``n_test_images`` of the held-out fold.

    ``epochs`` (None: each recipe's) and ``recipes`` (per arch, keys of :data:`MODERN_RECIPES`
    to replace) change the recipes, and so the stored models' keys. Returns one row per (arch,
    fold, method): ``test_accuracy`` (on the whole held-out fold), ``m`` (features),
    ``n_relevant``, ``lasso_r2``, ``iou_auc`` (%, :func:`vxnb.evaluate.iou_auc`), Quantus's
    localisation metrics (:func:`vxnb.evaluate.quantus_metrics.localisation_metrics`, fast
    judge), ``seconds`` (of the row's heatmaps and scores), ``train_seconds`` (of the training,
    as measured when the model was trained), ``trained`` (False: loaded from the store),
    ``features_seconds`` (features and μ-lasso path of this call). ``layers``: per arch, the
    described layers (names or glob patterns, see :func:`vxnb.features.select_layers`; default
    :func:`vxnb.features.default_layers`); a key ``"<arch>:<tag>"`` adds the same trained model
    described by those layers as the arch ``"<arch>:<tag>"``, scored with "Ours" only (the
    layer-choice measurement). Means over folds: :func:`modern_table`.
    """
    from ..evaluate.occlusion import batched_logits
    from ..features import select_layers
    from ..relevance import Relevance

    if isinstance(archs, str) or not archs or not all(a in ALL_MODERN_ARCHS for a in archs):
        raise ValueError(f"archs: expected a non-empty list of {', '.join(ALL_MODERN_ARCHS)}, got {describe(archs)}")
    layers = dict(layers or {})
    if any(a.split(":")[0] not in ALL_MODERN_ARCHS for a in layers):
        raise ValueError(f"layers: expected keys among {', '.join(ALL_MODERN_ARCHS)} (or '<arch>:<tag>'), "
                         f"got {list(layers)}")
    recipes = dict(recipes or {})
    if any(a not in ALL_MODERN_ARCHS for a in recipes):
        raise ValueError(f"recipes: expected keys among {', '.join(ALL_MODERN_ARCHS)}, got {list(recipes)}")
    chosen_recipes = {a: modern_recipe(a, epochs, recipes.get(a)) for a in archs}
    if isinstance(folds, (str, int)) or not folds or any(isinstance(f, bool) or f not in range(5) for f in folds):
        raise ValueError(f"folds: expected a non-empty list of folds in 0..4, got {describe(folds)}")
    base = runs.RunConfig(dataset="an8flower", variant="single-6c", size=size, folds="blocks",
                          train_limit=train_limit, seed=seed, data_root=data_root, runs_root=runs_root)
    records: list[dict] = []
    for fold in [int(f) for f in folds]:
        cfg = benchmark.fold_config(base, "single-6c", fold)
        data = runs.load_data(cfg, progress=progress)
        images, labels, masks, _ = benchmark.fold_data(cfg, n_test_images, data=data, progress=progress)
        for arch in tqdm(archs, desc=f"single-6c fold {fold}", disable=None if progress else True):
            model, meta = get_modern_model(cfg, arch, chosen_recipes[arch], data=data, retrain=retrain,
                                           progress=progress)
            preds = batched_logits(model, images, batch_size=64).argmax(1)
            info = {"test_accuracy": meta["test_accuracy"], "eval_accuracy": float((preds == labels).float().mean()),
                    "train_seconds": float(meta["train_seconds"]), "train_cpu_seconds": float(meta["train_cpu_seconds"]),
                    "trained": not meta["loaded"]}
            choices = [(arch, layers.get(arch))] + [(n, v) for n, v in layers.items() if n.startswith(arch + ":")]
            for name, chosen in choices:
                t0 = time.perf_counter()
                feats = runs.get_features(cfg, model, data=data, layers=select_layers(model, chosen), batch_size=64,
                                          device="cpu", progress=progress)
                path = runs.get_lasso_path(cfg, feats, mu_max=max(50.0, mu), tag=name.replace(":", "-"))
                relevant = Relevance.from_path(path, feats, mu)
                info["features_seconds"] = time.perf_counter() - t0
                rows = modern_rows(arch) if name == arch else ("ours",)
                records += _score(name, fold, rows, model, images, masks, preds, relevant, feats, k, batch_size,
                                  info, path.coef(mu))
    return pd.DataFrame.from_records(records)


def _score(arch, fold, rows, model, images, masks, preds, relevant, feats, k, batch_size, info, W) -> list[dict]:
    from ..evaluate import iou_auc
    from ..evaluate.quantus_metrics import localisation_metrics

    out = []
    fit = lasso_r2(feats, W)
    for row in dict.fromkeys(rows):
        t0 = time.perf_counter()
        h = _heatmaps(row, model, images, preds, relevant, k, batch_size)
        q = localisation_metrics(h, masks)
        iou = iou_auc(h, masks)
        out.append({"arch": arch, "fold": fold, "method": row, "label": table1.METHOD_LABELS.get(row, "AttnLRP (lxt)"),
                    **info, "m": int(feats.G.shape[0]), "n_relevant": int(np.count_nonzero(relevant.W)),
                    "lasso_r2": fit, "iou_auc": iou, **benchmark.quantus_row(q),
                    "seconds": time.perf_counter() - t0})
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
    rows in the order run; the accuracy, m, the heatmap seconds and the training seconds beside them."""
    if not isinstance(df, pd.DataFrame) or not {"arch", "label", "fold", *MODERN_SCORES} <= set(df.columns):
        raise ValueError(f"df: expected the DataFrame of modern_benchmark, got {describe(df)}")
    g = df.groupby(["arch", "label"], sort=False)
    table = g[["test_accuracy", "m", *MODERN_SCORES, "seconds", "train_seconds"]].mean()
    if df["fold"].nunique() > 1:
        table.insert(table.columns.get_loc("iou_auc") + 1, "iou_auc_std", g["iou_auc"].std())
    return table


def modern_times(df: pd.DataFrame) -> pd.DataFrame:
    """Per (arch, fold): the test accuracy, the lasso's fit and size, the training seconds (as
    measured when the model was trained, and its CPU seconds, less sensitive to a shared machine's
    load; ``trained`` False: loaded from the store this call), the
    features + μ-lasso seconds and the seconds of scoring all the arch's rows, and
    ``total_seconds`` (the three together: what training and scoring that model costs)."""
    if not isinstance(df, pd.DataFrame) or not {"arch", "fold", "seconds", "train_seconds",
                                                "features_seconds"} <= set(df.columns):
        raise ValueError(f"df: expected the DataFrame of modern_benchmark, got {describe(df)}")
    g = df.groupby(["arch", "fold"], sort=False)
    out = g[["test_accuracy", "n_relevant", "lasso_r2", "train_seconds", "train_cpu_seconds", "features_seconds"]].first()
    out.insert(0, "trained", g["trained"].first())
    out["score_seconds"] = g["seconds"].sum()
    out["total_seconds"] = out["train_seconds"] + out["features_seconds"] + out["score_seconds"]
    return out


def layer_choice_table(df: pd.DataFrame) -> pd.DataFrame:
    """The layer-choice measurement (issue 25 item 4): for "Ours" of each arch and each
    ``"<arch>:<tag>"`` layer choice of :func:`modern_benchmark`, the IoU area (%) per fold and its
    mean, and the means over folds of m, the lasso's R² (:func:`lasso_r2`), the number of nonzero
    weights and the pointing game."""
    if not isinstance(df, pd.DataFrame) or not {"arch", "fold", "method", "m", "lasso_r2", "iou_auc",
                                                "pointing_game", "n_relevant"} <= set(df.columns):
        raise ValueError(f"df: expected the DataFrame of modern_benchmark, got {describe(df)}")
    ours = df[df["method"] == "ours"]
    if ours.empty:
        raise ValueError("df: has no 'ours' rows")
    per_fold = ours.pivot_table(index="arch", columns="fold", values="iou_auc", sort=False)
    per_fold.columns = [f"iou_fold{f}" for f in per_fold.columns]
    g = ours.groupby("arch", sort=False)
    out = per_fold.join(g[["iou_auc", "m", "lasso_r2", "n_relevant", "pointing_game"]].mean())
    return out.rename(columns={"iou_auc": "iou_mean"}).loc[list(g.groups)]
