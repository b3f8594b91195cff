"""The an8Flower benchmark of the paper (Sec. 4.3, Table 1; box occlusion of Sec. 4.2).

Protocol (five folds grouped by viewpoint, ``vxnb.data.an8flower``):

for every variant and every fold ``f``

1. the reference model (FlowerNet) is trained on the other four folds — through
   :func:`vxnb.studies.runs.get_model` with ``RunConfig(test_fold=f)``, so every fold has its own run
   folder holding its checkpoint, features and μ-lasso path;
2. the relevant features are selected with the μ-lasso on the **training** folds
   (:func:`vxnb.studies.runs.get_features` on all conv + FC layers, :func:`vxnb.studies.runs.get_lasso_path`
   → ``W = path.coef(mu)``, default μ = 10 as in the paper, Sec. 4.1);
3. on the held-out fold (a class-stratified subset of ``n_test_images`` images, seeded) every
   method produces one heatmap per image **for the class the model predicts** — the paper
   explains the prediction ĵ = F(I) (Sec. 3.2) — and the heatmaps are compared with the
   ground-truth mask of the image's class part: the IoU curve over the thresholds
   0, 0.01, …, 1 of the per-image min-max normalised heatmap and its area in percent
   (:func:`vxnb.evaluate.iou.iou_curve`). A misclassified image keeps its true-class mask;
4. optionally, the box-occlusion study (:func:`vxnb.evaluate.occlusion.occlusion_study`) on a
   subset of those images: the confidence of the predicted class as patches sampled from each
   heatmap cover 0, 5, …, 30 % of the image.

Methods (:data:`METHODS`), as the paper defines Table 1's rows (Sec. 4.3): ``"ours_upsampled"``
("Upsam. Act."), ``"ours_deconv"`` ("Deconv+GB") and ``"ours"`` are the **same** top-``k``
μ-lasso-selected features of the predicted class (largest responses r = w_ĵ ∘ x, default
k = 5), drawn three ways (:func:`vxnb.explanations.feature_heatmaps`): upsampled activation maps,
plain DeconvNet+GB and resampled DeconvNet+GB, then combined into one map per image by
``combine`` (:func:`vxnb.explanations.combine_heatmaps`: ``"weighted"`` response-weighted sum,
``"max"`` pixel-wise maximum as in the authors' code; both can be scored in one run, the
features are drawn once). Upsampled activation maps of fully connected features do not exist:
they are left out of that row's combination and counted (``n_left_out``). The class-level
baselines are Grad-CAM, Guided Grad-CAM, Grad-CAM++ and Guided Grad-CAM++; two more
class-level maps stay as extra rows with their own labels and no paper number beside them:
``"activation"`` (channel mean of the last conv layer's activation) and ``"deconv_gb"``
(guided backprop from the logit), all :func:`vxnb.baselines.attribution`.

Second judge: Quantus's localisation metrics on the same heatmaps and masks
(:mod:`vxnb.evaluate.quantus_metrics`). The resampling's own effect (``ours`` −
``ours_deconv``) with a paired Wilcoxon test over images: :meth:`BenchmarkResult.resampling_effect`.

Table 1 reports the area under the IoU curve (percent), mean ± std over the folds
(``std`` with ``ddof=1``, the sample standard deviation; NaN for a single fold).

Resumption: each finished fold writes ``benchmark-<key>.json`` atomically into its fold's run
folder through :mod:`vxnb._store` (``<key>`` hashes the settings, the checkpoint's key — its
training settings and the dataset's manifest — and the result format); the next run reads it
back instead of recomputing. A fold interrupted before that file is written has no file and is
recomputed (its trained checkpoint, written atomically by ``get_model``, is reused).
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from vxnb._checks import check_choice, check_int, check_positive_int, check_positive_number, check_unique_items
from vxnb.data.an8flower import N_FOLDS, check_fold
from vxnb.data.an8flower.render import check_variant
from vxnb.evaluate.iou import DEFAULT_THRESHOLDS, curve_area, iou_auc, iou_curve, iou_per_image
from vxnb.evaluate.occlusion import DEFAULT_COVERAGE, occlusion_study
from vxnb import _store
from vxnb.explanations import COMBINES, DEFAULT_COMBINE
from vxnb.utils import describe, json_ready
from vxnb.studies import runs
from vxnb.studies import table1
from vxnb.studies.table1 import (METHOD_LABELS, PAPER_TABLE1, VARIANTS, BenchmarkResult, compare_with_paper, format_table, paper_table, row_labels, row_name,
                                 tables_with_paper)

__all__ = [
    "METHODS",
    "BASELINE_METHODS",
    "OURS_METHODS",
    "COMBINES",
    "METHOD_LABELS",
    "VARIANTS",
    "N_FOLDS",
    "PAPER_TABLE1",
    "paper_table",
    "method_heatmaps",
    "stratified_indices",
    "fold_config",
    "fold_data",
    "fold_relevant",
    "evaluate_fold",
    "run_fold",
    "run_benchmark",
    "benchmark_config",
    "BenchmarkResult",
    "explain_examples",
    "folder_plan",
    "masks_note",
    "compare_with_paper",
    "format_table",
    "tables_with_paper",
    "row_name",
    "part_reliance",
    "fold_diagnosis",
    "fold_inputs",
    "quantus_row",
    "fold_key",
    "score_callable",
    "score_fold",
    "check_explain_func",
    "check_maps",
    "method_fingerprint",
    "SCORE_COLUMNS",
]


_RESULT_VERSION = 2


def __getattr__(name: str):
    """``METHODS``, ``OURS_METHODS``, ``BASELINE_METHODS``: read from the method registry
    (:data:`vxnb.studies.table1.METHOD_REGISTRY`) when asked, so a method registered later is in them."""
    if name in ("METHODS", "OURS_METHODS", "BASELINE_METHODS"):
        return getattr(table1, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: The format version of a fold's result file (public: part of the artifact store's keys).
RESULT_VERSION = _RESULT_VERSION
runs.register_artifact("benchmark-fold", RESULT_VERSION)


def _check_combines(combine: Any) -> tuple[str, ...]:
    return _check_names(combine, "combine", COMBINES, _check_combine, "a combination or a sequence of them")


def _check_combine(value: Any, arg: str = "combine") -> str:
    return check_choice(value, arg, COMBINES)


# ============================================================================ checks
def _check_method(method: Any, arg: str = "method") -> str:
    return check_choice(method, arg, table1.METHODS)  # METHODS: the registry's names, in order


def _check_names(values: Any, arg: str, known: Sequence[str], check_one: Callable[[Any, str], Any],
                 what: str) -> tuple[str, ...]:
    """A name or a non-empty sequence of unique names, each checked by ``check_one``."""
    return check_unique_items(values, arg, check_one, is_one=lambda v: isinstance(v, str), what=what,
                              known=", ".join(known), noun="names")


def _check_methods(methods: Any) -> tuple[str, ...]:
    if methods is None:
        return table1.METHODS
    return _check_names(methods, "methods", table1.METHODS, _check_method, "a sequence of method names")


def _check_folds(folds: Any, arg: str = "folds") -> tuple[int, ...]:
    return check_unique_items(folds, arg, check_fold, is_one=lambda v: isinstance(v, (int, np.integer))
                              and not isinstance(v, (bool, np.bool_)), what="a sequence of fold numbers",
                              known=f"0..{N_FOLDS - 1}", noun="folds")


def _check_mu(mu: Any) -> float:
    return check_positive_number(mu, "mu", "the paper uses 10")


# ============================================================================ heatmaps
def method_heatmaps(method: str, model: torch.nn.Module, images: torch.Tensor, targets: Any, *,
                    relevant: Any = None, k: int = 5, layer: str | None = None,
                    batch_size: int = 32, combine: str = DEFAULT_COMBINE) -> torch.Tensor:
    """One heatmap per image for ``targets`` by one benchmark method: (N, H, W) float32 on the CPU.

    Args:
        method: one of :data:`METHODS`.
        model: the classifier (left as it was).
        images: (N, C, H, W) float images.
        targets: (N,) class per image (the benchmark passes the predicted classes), or an int.
        relevant: our methods only (:data:`OURS_METHODS`): the relevant features, a
            :class:`vxnb.relevance.Relevance` (:func:`fold_relevant`) or the DataFrame of
            :func:`vxnb.relevance.relevant_features`.
        k: our methods only: the number of top-responding relevant features combined.
        layer: the layer of the activation / Grad-CAM family (default: the last conv's ReLU).
        batch_size: images per call.
        combine: our methods only: ``"weighted"`` or ``"max"`` (:func:`vxnb.explanations.combine_heatmaps`).
    """
    method = _check_method(method)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images: expected a (N, C, H, W) tensor, got {describe(images)}")
    n = images.shape[0]
    batch_size = check_positive_int(batch_size, "batch_size")
    if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
        targets = torch.full((n,), int(targets), dtype=torch.long)
    targets = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets)
    if targets.shape != (n,) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets: expected ({n},) integer classes (one per image), got {describe(targets)}")
    combine = _check_combine(combine)
    spec = table1.METHOD_REGISTRY[method]
    if spec.ours:
        from vxnb.explanations import combine_heatmaps, feature_heatmaps
        from vxnb.relevance import Relevance

        if not isinstance(relevant, (Relevance, pd.DataFrame)):
            raise ValueError(f"relevant: method {method!r} needs the relevant features (a vxnb.relevance.Relevance or "
                             f"the DataFrame of vxnb.relevance.relevant_features), got {describe(relevant)}")
        k = check_positive_int(k, "k")
    else:
        from vxnb.baselines import attribution
    out = []
    for start in range(0, n, batch_size):
        x = images[start:start + batch_size]
        t = targets[start:start + batch_size]
        if spec.ours:
            hk, r, _ = feature_heatmaps(model, relevant, x, k, t, draw=spec.draw, batch_size=batch_size)
            h = combine_heatmaps(hk, r, combine)
        elif spec.heatmaps is not None:
            h = spec.heatmaps(model, x, t, layer=layer)
        else:
            h = attribution(method, model, x, t, layer=layer)
        h = torch.as_tensor(h).detach().float().cpu()
        if h.shape != (x.shape[0], x.shape[2], x.shape[3]):
            raise RuntimeError(f"method {method!r} returned heatmaps of shape {tuple(h.shape)} for images of "
                               f"shape {tuple(x.shape)}; expected {(x.shape[0], x.shape[2], x.shape[3])}")
        out.append(h)
    return torch.cat(out)


# ============================================================================ data of a fold
def stratified_indices(labels: Any, n: int | None, seed: int = 0) -> np.ndarray:
    """Positions of a class-stratified random subset of ``n`` items (sorted), all when ``n`` is None.

    Every class gets ``n // C`` items (the first ``n % C`` classes, in a seeded random order,
    one more); a class with fewer items gives all it has.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array of class labels, got shape {labels.shape}")
    n = check_positive_int(n, "n", allow_none=True)
    if n is None or n >= labels.size:
        return np.arange(labels.size)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = np.full(classes.size, n // classes.size)
    per[rng.permutation(classes.size)[: n % classes.size]] += 1
    keep = [rng.permutation(np.flatnonzero(labels == c))[:p] for c, p in zip(classes, per)]
    return np.sort(np.concatenate(keep))


def fold_config(config: Any, variant: str, fold: int):
    """The :class:`vxnb.studies.runs.RunConfig` of one fold: ``config`` with this variant and test fold."""

    if not isinstance(config, runs.RunConfig):
        raise TypeError(f"config: expected a vxnb.studies.runs.RunConfig, got {describe(config)}")
    _check_benchmarkable(config)
    if config.spec.benchmark == "split" and variant == FOLDER:
        return config  # your images: one split, the validation split
    if config.spec.benchmark != "folds":
        raise ValueError(f"variant: a {config.dataset!r} run has one split, the variant {FOLDER!r}; got {variant!r}")
    return dataclasses.replace(config, variant=check_variant(variant), test_fold=check_fold(fold), name=None)


def fold_data(cfg: Any, n_test_images: int | None = None, *, data=None, progress: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """The evaluated test images of a fold: ``(images (N,3,S,S), labels (N,), masks (N,S,S) bool,
    positions in the test split (N,))`` — a class-stratified subset seeded by ``cfg.seed`` and the
    fold."""

    _, test, _ = data if data is not None else runs.load_data(cfg, progress=progress)
    labels = _dataset_labels(test)
    pos = stratified_indices(labels, n_test_images, seed=cfg.seed * 100 + cfg.test_fold)
    items = [test[int(i)] for i in pos]
    if not items or len(items[0]) < 3:
        raise ValueError("data: the benchmark needs items (image, label, mask) with ground-truth masks")
    images = torch.stack([it[0] for it in items]).float()
    labels_t = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
    masks = torch.stack([torch.as_tensor(it[2]).bool() for it in items])
    return images, labels_t, masks, pos


def _dataset_labels(ds: Any) -> np.ndarray:
    """Labels of a dataset (fast for an ``An8Flower`` or a ``Subset`` of one)."""
    from torch.utils.data import Subset

    if isinstance(ds, Subset) and hasattr(ds.dataset, "targets"):
        return np.asarray(ds.dataset.targets)[np.asarray(ds.indices)]
    if hasattr(ds, "targets"):
        return np.asarray(ds.targets)
    return np.array([int(ds[i][1]) for i in range(len(ds))])


def fold_relevant(cfg: Any, model: torch.nn.Module, mu: float = 10.0, *, data=None,
                  progress: bool = True):
    """The relevant features of a fold: μ-lasso on the training folds' responses (all conv + FC
    layers), ``W = path.coef(mu)`` → :class:`vxnb.relevance.Relevance` (features and path cached in
    the fold's run folder)."""
    from vxnb.relevance import Relevance

    mu = _check_mu(mu)
    data = data if data is not None else runs.load_data(cfg, progress=progress)
    feats = runs.get_features(cfg, model, "train", data=data, progress=progress)
    path = runs.get_lasso_path(cfg, feats, mu_max=max(50.0, mu))
    return Relevance.from_path(path, feats, mu)


# ============================================================================ one fold
def _settings(methods, mu, k, n_test_images, occlusion, occlusion_images, coverage, layer, thresholds,
              combine=("weighted",), quantus=False, quantus_images=100) -> dict:
    return {"methods": list(methods), "mu": float(mu), "k": int(k), "n_test_images": n_test_images,
            "occlusion": bool(occlusion), "occlusion_images": occlusion_images,
            "coverage": [float(c) for c in coverage], "layer": layer,
            "thresholds": [float(t) for t in np.asarray(thresholds)],
            "combine": list(combine), "quantus": bool(quantus), "quantus_images": quantus_images}


def quantus_row(q: Mapping[str, Any]) -> dict[str, Any]:
    """One fold's :func:`vxnb.evaluate.quantus_metrics.localisation_metrics` result as a flat row:
    the scores and counts, the images Quantus refused per metric (``refused_<metric>``) and its
    errors (``errors``: "metric: message; …", empty when none), none of them dropped."""
    row = {k: v for k, v in q.items() if not isinstance(v, dict)}
    for metric, n in (q.get("refused_by_quantus") or {}).items():
        row[f"refused_{metric}"] = int(n)
    row["errors"] = "; ".join(f"{m}: {e}" for m, e in sorted((q.get("errors") or {}).items()))
    return row


def fold_inputs(cfg: Any) -> dict[str, Any]:
    """What a fold's result is computed from besides its checkpoint (whose key holds the data,
    the split and the training settings): the run's settings that pick the relevant features,
    ``layers`` (described by the μ-lasso) and ``train_limit`` (the training images they are
    selected on; a user's model's key does not hold it)."""
    return {"layers": cfg.layers, "train_limit": cfg.train_limit}


def _result_file(folder: Path, settings: dict, checkpoint_key: str,
                 inputs: dict[str, Any] | None = None) -> tuple[Path, str]:
    key = _store.key("benchmark-fold", settings, {"checkpoint": checkpoint_key, **(inputs or {})}, _RESULT_VERSION)
    return folder / f"benchmark-{key}.json", key


def _check_judge(judge: Any) -> str:
    from vxnb.evaluate.quantus_metrics import JUDGES

    if judge not in JUDGES:
        raise ValueError(f"judge: expected one of {', '.join(JUDGES)}, got {judge!r}")
    return judge


def _read_fold(file: Path, key: str) -> dict:
    res = json.loads(file.read_text())
    if res.get("version") != _RESULT_VERSION or res.get("key") != key:
        raise ValueError(f"it holds version {res.get('version')} key {res.get('key')}, expected {key}")
    return res


def evaluate_fold(cfg: Any, *, methods: Sequence[str] | None = None, mu: float = 10.0, k: int = 5,
                  n_test_images: int | None = 300, occlusion: bool = True, occlusion_images: int | None = 100,
                  coverage: Sequence[float] = DEFAULT_COVERAGE, layer: str | None = None,
                  thresholds: Any = None, batch_size: int = 32, combine: Sequence[str] = ("weighted",),
                  quantus: bool = False, quantus_images: int | None = 100, judge: str = "fast",
                  progress: bool = True) -> dict:
    """Run one fold of the protocol (no caching; :func:`run_fold` caches). Returns a JSON-ready dict.

    Keys: ``variant, fold, run, folds`` (the split), ``n_images, accuracy`` (of the model on the
    evaluated images), ``model_test_accuracy`` (on the whole held-out fold, from training),
    ``n_relevant``, ``thresholds``; per result row (:func:`row_name`: the method, for our
    methods with the combination, e.g. ``"ours[max]"``): ``auc`` {row: %}, ``curve`` {row:
    IoU per threshold}, ``image_auc`` {row: area per image}, ``quantus`` {row:
    :func:`vxnb.evaluate.quantus_metrics.localisation_metrics`} (with ``quantus=True``, on a
    class-stratified subset of ``quantus_images`` of the evaluated images, computed by ``judge``:
    "fast", batched numpy, under 1 ms per image for all five metrics, or "quantus", Quantus itself,
    ~0.03 s per image and metric; the same values);
    per draw of our features: ``grid`` {method: mean grid score of each image's drawn maps,
    at each feature's layer's total stride (NaN: no feature)}; ``top_features`` (records:
    class, layer, kind, channel, n (images where it is in the top-k), mean_response);
    ``n_top`` (top-k features over all images), ``n_left_out`` (of them, the fully connected
    ones "ours_upsampled" cannot draw); ``occlusion`` (records: method, level, coverage,
    confidence, confidence_std, n_images; our rows with the first combination);
    ``seconds`` {phase: s} (``model``: loading, or training when ``trained_now``),
    ``training_seconds`` (the checkpoint's recorded training time).
    """
    methods = _check_methods(methods)
    combines = _check_combines(combine)
    mu = _check_mu(mu)
    k = check_positive_int(k, "k")
    t = np.array(DEFAULT_THRESHOLDS) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    data = runs.load_data(cfg, progress=progress)
    trained_now = cfg.spec.reference_model is not None and not runs.checkpoint_dir(cfg).exists()
    model, meta = runs.get_model(cfg, data=data, progress=progress)
    model.eval()
    seconds["model"] = time.perf_counter() - t0
    relevant = None
    if any(m in table1.OURS_METHODS for m in methods):
        t0 = time.perf_counter()
        relevant = fold_relevant(cfg, model, mu, data=data, progress=progress)
        seconds["features+lasso"] = time.perf_counter() - t0
    images, labels, masks, _ = fold_data(cfg, n_test_images, data=data, progress=progress)
    from vxnb.evaluate.occlusion import batched_logits

    preds = batched_logits(model, images, batch_size=64).argmax(1)
    heatmaps, grid, extra = _fold_heatmaps(cfg, model, images, preds, relevant, methods, combines, k=k, layer=layer,
                                           batch_size=batch_size, progress=progress, seconds=seconds)
    t0 = time.perf_counter()
    qsel = stratified_indices(labels.numpy(), quantus_images, seed=cfg.seed + 11) if quantus else None
    scores = _fold_scores(heatmaps, masks, t, qsel, judge)
    seconds["scores"] = time.perf_counter() - t0
    occ_records: list[dict] = []
    if occlusion:
        t0 = time.perf_counter()
        sel = stratified_indices(labels.numpy(), occlusion_images, seed=cfg.seed + 7)
        study = occlusion_study(model, images[sel], {m: heatmaps[row_name(m, combines[0])][sel] for m in methods},
                                target=preds[sel], coverage=coverage, seed=cfg.seed, progress=False)
        occ_records = study.to_dict("records")
        seconds["occlusion"] = time.perf_counter() - t0
    return {
        "version": _RESULT_VERSION,
        "variant": _variant_of(cfg), "fold": int(cfg.test_fold),
        "folds": getattr(cfg, "folds", "views"), "run": cfg.run_name,
        "n_images": int(images.shape[0]),
        "accuracy": float((preds == labels).float().mean()),
        "model_test_accuracy": meta.get("test_accuracy"),
        "trained_now": trained_now,
        "training_seconds": (meta.get("history") or {}).get("seconds"),
        "n_relevant": None if relevant is None else int(np.count_nonzero(relevant.W)),
        "combine": list(combines),
        "thresholds": t.tolist(), **scores, "grid": grid,
        "top_features": extra.get("top_features", []),
        "n_top": extra.get("n_top"), "n_left_out": extra.get("n_left_out"),
        "occlusion": occ_records, "seconds": seconds,
    }


def _fold_heatmaps(cfg: Any, model: torch.nn.Module, images: torch.Tensor, preds: torch.Tensor, relevant: Any,
                   methods: Sequence[str], combines: Sequence[str], *, k: int, layer: str | None, batch_size: int,
                   progress: bool, seconds: dict[str, float]) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Every method's heatmaps of a fold's images, by result row (:func:`row_name`): our features
    drawn once per draw and combined each way; the grid score of each draw; the top features.
    Each method's time goes into ``seconds``."""
    from vxnb.deconv import grid_score
    from vxnb.explanations import combine_heatmaps, feature_heatmaps, total_stride

    heatmaps: dict[str, torch.Tensor] = {}
    grid: dict[str, list[float]] = {}
    extra: dict[str, Any] = {}
    strides: dict[str, int] = {}
    bar = tqdm(methods, desc=f"{_variant_of(cfg)} fold {cfg.test_fold}: methods",
               leave=False, disable=None if progress else True)
    for method in bar:
        bar.set_postfix(method=method)
        t0 = time.perf_counter()
        draw = table1.METHOD_REGISTRY[method].draw
        if draw is not None:  # our features: drawn once, combined each way
            hk, r, feats = feature_heatmaps(model, relevant, images, k, preds, draw=draw,
                                            batch_size=batch_size)
            for c in combines:
                heatmaps[row_name(method, c)] = combine_heatmaps(hk, r, c).float().cpu()
            if draw == "upsampled":
                extra["n_top"], extra["n_left_out"] = int(len(feats)), int((~feats["drawn"]).sum())
            else:
                grid[method] = _grid_per_image(model, images, hk, feats, strides, grid_score, total_stride)
            if "top_features" not in extra and len(feats):
                g = feats.groupby(["class", "layer", "kind", "channel"], sort=True)["response"]
                extra["top_features"] = g.agg(n="size", mean_response="mean").reset_index().to_dict("records")
        else:
            heatmaps[method] = method_heatmaps(method, model, images, preds, layer=layer, batch_size=batch_size)
        seconds[method] = time.perf_counter() - t0
        _store.fault_point("benchmark-fold")
    bar.close()
    return heatmaps, grid, extra


def _fold_scores(heatmaps: Mapping[str, torch.Tensor], masks: torch.Tensor, thresholds: np.ndarray,
                 quantus_subset: np.ndarray | None, judge: str = "fast") -> dict[str, dict]:
    """Per result row: the IoU curve (``curve``), its area (``auc``, :func:`vxnb.evaluate.iou.curve_area`)
    and each image's area (``image_auc``); Quantus's localisation metrics on ``quantus_subset``
    of the images (``quantus``; none when it is None), computed by ``judge`` (see
    :func:`vxnb.evaluate.quantus_metrics.localisation_metrics`: the same values either way)."""
    out: dict[str, dict] = {"auc": {}, "curve": {}, "image_auc": {}, "quantus": {}}
    for name, h in heatmaps.items():
        thr, c = iou_curve(h, masks, thresholds)
        out["curve"][name] = c.tolist()
        out["auc"][name] = curve_area(c, thr)
        out["image_auc"][name] = curve_area(iou_per_image(h, masks, thresholds), thr).tolist()
        if quantus_subset is not None:
            from vxnb.evaluate.quantus_metrics import localisation_metrics

            out["quantus"][name] = localisation_metrics(h[quantus_subset], masks[quantus_subset], judge=judge)
    return out


def _grid_per_image(model, images, hk, feats, strides, grid_score, total_stride) -> list[float]:
    """Per image: the mean grid score of its drawn top-k maps, each at its layer's total stride."""
    out = np.full(images.shape[0], np.nan)
    if len(feats) == 0:
        return out.tolist()
    scores = np.empty(len(feats))
    for i, (b, rk, layer) in enumerate(zip(feats["image"], feats["rank"], feats["layer"])):
        if layer not in strides:
            strides[layer] = total_stride(model, images[:1], layer)
        scores[i] = float(grid_score(hk[int(b), int(rk)], strides[layer]))
    per = pd.Series(scores).groupby(feats["image"].to_numpy()).mean()
    out[per.index.to_numpy()] = per.to_numpy()
    return out.tolist()


def _fold_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``run_fold``'s options with their defaults, checked, and the settings of its key."""
    defaults = dict(methods=None, mu=10.0, k=5, n_test_images=300, occlusion=True, occlusion_images=100,
                    coverage=DEFAULT_COVERAGE, layer=None, thresholds=None, combine=("weighted",), quantus=False,
                    quantus_images=100, judge="fast")
    unknown = set(options) - set(defaults) - {"batch_size"}
    if unknown:
        raise TypeError(f"run_fold: unexpected option(s) {sorted(unknown)}; known: {sorted(defaults)}")
    opts = {**defaults, **options}
    opts["methods"] = _check_methods(opts["methods"])
    opts["combine"] = _check_combines(opts["combine"])
    _check_mu(opts["mu"])
    check_positive_int(opts["k"], "k")
    check_positive_int(opts["n_test_images"], "n_test_images", allow_none=True)
    check_positive_int(opts["occlusion_images"], "occlusion_images", allow_none=True)
    check_positive_int(opts["quantus_images"], "quantus_images", allow_none=True)
    _check_judge(opts["judge"])  # not in the key: both judges give the same values (to 1e-6, tested)
    thr = DEFAULT_THRESHOLDS if opts["thresholds"] is None else opts["thresholds"]
    settings = _settings(opts["methods"], opts["mu"], opts["k"], opts["n_test_images"], opts["occlusion"],
                         opts["occlusion_images"], opts["coverage"], opts["layer"], thr, opts["combine"],
                         opts["quantus"], opts["quantus_images"])
    return opts, settings


def fold_key(cfg: Any, **options: Any) -> str:
    """The content key of :func:`run_fold`'s result for ``cfg`` and these options (its settings,
    the checkpoint's key and :func:`fold_inputs`)."""
    _, settings = _fold_options(options)
    return _result_file(runs.run_dir(cfg), settings, runs.checkpoint_key(cfg), fold_inputs(cfg))[1]


def run_fold(cfg: Any, *, recompute: bool = False, progress: bool = True, **options: Any) -> dict:
    """:func:`evaluate_fold` with its result cached in the fold's run folder.

    The file ``benchmark-<key>.json`` (key: the settings and the checkpoint's key) is written
    atomically once the fold is finished and read back by later calls (``"cached": True`` in the
    returned dict). A fold interrupted before that has no file and is recomputed.
    """

    opts, settings = _fold_options(options)
    ckey = runs.checkpoint_key(cfg)
    file, key = _result_file(runs.run_dir(cfg), settings, ckey, fold_inputs(cfg))

    def compute() -> dict:
        return json_ready({**evaluate_fold(cfg, progress=progress, **opts), "settings": settings, "key": key})

    res, hit = _store.load_or_compute(
        file, key, "benchmark-fold", compute, load=lambda f: _read_fold(f, key),
        save=lambda r, tmp: tmp.write_text(json.dumps(r, indent=2, sort_keys=True)), recompute=recompute,
        settings=settings, inputs={"checkpoint": ckey, **fold_inputs(cfg)}, upstream=[ckey], version=_RESULT_VERSION,
        root=cfg.runs_dir)
    res = dict(res)
    res["cached"] = hit
    return res


#: The "variant" of a run on one split (train / validation) instead of folds: your images with masks.
FOLDER = "folder"


def _variant_of(cfg: Any) -> str:
    """The variant a fold's results are filed under: an8Flower's, or :data:`FOLDER` for one split."""
    return FOLDER if cfg.spec.benchmark == "split" else cfg.variant


def _check_benchmarkable(config: Any) -> None:
    if not isinstance(config, runs.RunConfig):
        raise TypeError(f"config: expected a vxnb.studies.runs.RunConfig, got {describe(config)}")
    ok = [n for n, s in runs.DATASET_SPECS.items() if s.benchmark]
    if config.spec.benchmark is None or not config.has_masks:
        raise ValueError(f"config: the benchmark needs ground-truth masks: {' or '.join(f'dataset={n!r}' for n in ok)} "
                         f"(a folder needs mask_root), got dataset={config.dataset!r}")


def folder_plan(config: Any, variants: Sequence[str], plan: Mapping[str, Sequence[int]]
                ) -> tuple[list[str], dict[str, list[int]]]:
    """Notebook 05's ``(variants, plan)``: unchanged for an8Flower; for a folder run
    ``(["folder"], {"folder": [0]})``, the one split of your images."""
    if config.spec.benchmark == "split":
        return [FOLDER], {FOLDER: [0]}
    return list(variants), {v: list(f) for v, f in plan.items()}


def masks_note(config: Any) -> str:
    """A Markdown paragraph on what the benchmark measures with this run's data, or what it needs."""
    if config.spec.masks_note:
        return config.spec.masks_note
    if config.has_masks:
        return (f"**Your images.** Every method is scored against your masks (`mask_root = {config.mask_root}`) "
                "on the validation split: one split instead of the paper's five folds, so no ± over folds. "
                "The paper's numbers are an8Flower's and are not shown.")
    return ("**No ground-truth masks, so no localisation benchmark.** It scores each heatmap against a mask of "
            "the part of the image that defines its class. To run it on your images, give `mask_root`: a "
            "folder with the same relative paths as `data_root`, one mask per image (any image format, the "
            "image's size, non-zero = on), e.g. `-p mask_root path/to/masks`. The cells below are skipped.")


def _folds_by_variant(variants: Any, folds: Any) -> dict[str, tuple[int, ...]]:
    if list(variants) == [FOLDER]:
        return {FOLDER: (0,)}
    variants = _check_names(variants, "variants", VARIANTS, check_variant, "a variant name or a sequence of them")
    if isinstance(folds, Mapping):
        extra = set(folds) - set(variants)
        if extra:
            raise ValueError(f"folds: has entries for variants not run: {sorted(extra)} (variants: {list(variants)})")
        return {v: _check_folds(folds.get(v, tuple(range(N_FOLDS))), f"folds[{v!r}]") for v in variants}
    f = _check_folds(folds)
    return {v: f for v in variants}


def benchmark_config(config: Any):
    """The run folder of the aggregated tables:
    ``benchmark-an8flower-s<size>-seed<seed>[-blocks][-quick]``."""
    if config.spec.benchmark == "split":
        return dataclasses.replace(config, name=f"benchmark-{config.run_name}")
    tag = ("-blocks" if getattr(config, "folds", "views") == "blocks" else "") + ("-quick" if config.quick else "")
    return dataclasses.replace(config, name=f"benchmark-an8flower-s{config.size}-seed{config.seed}{tag}",
                               test_fold=0)


def run_benchmark(config: Any = None, *, variants: str | Sequence[str] = ("single-6c",),
                  folds: Sequence[int] | Mapping[str, Sequence[int]] = (0, 1, 2, 3, 4),
                  methods: Sequence[str] | None = None, mu: float = 10.0, k: int = 5,
                  n_test_images: int | None = 300, occlusion: bool = True, occlusion_images: int | None = 100,
                  coverage: Sequence[float] = DEFAULT_COVERAGE, layer: str | None = None,
                  combine: str | Sequence[str] = ("weighted", "max"), quantus: bool = True,
                  quantus_images: int | None = 100, judge: str = "fast",
                  recompute: bool = False, save: bool = True, progress: bool = True,
                  train_workers: int | None = None) -> BenchmarkResult:
    """The five-fold an8Flower benchmark (Table 1) and the box-occlusion study.

    Args:
        config: a :class:`vxnb.studies.runs.RunConfig` template (size, epochs, train_limit, seed, quick,
            folds (the split: "views" or "blocks"), data_root, runs_root); its variant and test
            fold are replaced per fold. Default:
            ``RunConfig()`` (size 128, the default epochs).
        variants: one or several of :data:`VARIANTS`.
        folds: the folds to run (0..4), or ``{variant: folds}``.
        methods: a subset of :data:`METHODS`.
        mu: the μ-lasso sparsity (the paper: 10). k: the top-k relevant features of "ours".
        n_test_images: evaluated images per fold (a seeded class-stratified subset of the
            held-out fold; None: all of it, 200 images per class).
        occlusion: also run the box-occlusion study, on ``occlusion_images`` of those images.
        coverage: occlusion levels. layer: layer of the activation / Grad-CAM family.
        combine: how our top-k maps combine, one or both of "weighted", "max" (each is a row).
        quantus: also score every row with Quantus's localisation metrics, on ``quantus_images``
            of the evaluated images (a seeded class-stratified subset; None: all).
        judge: who computes those metrics: "fast" (batched numpy, the default) or "quantus"
            (Quantus itself); the same values either way, so a cached fold is reused by both.
        recompute: ignore finished folds' cached results.
        save: write per_fold, table1, curves, occlusion and timings as CSV into the benchmark's
            run folder (:func:`benchmark_config`) with :func:`vxnb.studies.runs.save_table`.
        progress: progress bars (folds, methods, training).
        train_workers: the fold models whose checkpoints are missing are trained first, this many
            at a time in worker processes (:func:`vxnb.studies.runs.train_models`; 1: in this
            process; None: one per CPU core). The same weights for any value, so it is in no key;
            each fold's share of the wall time is its ``training`` row in ``timings``.
    """

    if config is None:
        config = runs.RunConfig()
    _check_benchmarkable(config)
    if config.spec.benchmark == "split":
        variants = [FOLDER]
    plan = _folds_by_variant(variants, folds)
    methods = _check_methods(methods)
    options = dict(methods=methods, mu=_check_mu(mu), k=check_positive_int(k, "k"),
                   n_test_images=check_positive_int(n_test_images, "n_test_images", allow_none=True),
                   occlusion=bool(occlusion),
                   occlusion_images=check_positive_int(occlusion_images, "occlusion_images", allow_none=True),
                   coverage=tuple(coverage), layer=layer, combine=_check_combines(combine), quantus=bool(quantus),
                   quantus_images=check_positive_int(quantus_images, "quantus_images", allow_none=True),
                   judge=_check_judge(judge))
    if train_workers is not None:
        train_workers = check_int(train_workers, "train_workers", 1, None, "or None (one per CPU core)")
    jobs = [(v, f) for v, fs in plan.items() for f in fs]
    frames: dict[str, list] = {name: [] for name in ("per_fold", "curves", "occlusion", "timings", "per_image",
                                                     "quantus", "top_features")}
    _train_fold_models(config, jobs, train_workers, progress, frames["timings"])
    bar = tqdm(jobs, desc="an8Flower folds", disable=None if progress else True)
    for variant, fold in bar:
        bar.set_postfix(variant=variant, fold=fold)
        cfg = fold_config(config, variant, fold)
        res = run_fold(cfg, recompute=recompute, progress=progress, **options)
        _add_fold_rows(frames, res, variant, fold, methods, options["combine"])
    bar.close()
    occ_cols = ["variant", "fold", "method", "label", "level", "coverage", "confidence", "confidence_std", "n_images"]
    occ, per_image, tops = frames["occlusion"], frames["per_image"], frames["top_features"]
    result = BenchmarkResult(
        per_fold=pd.DataFrame(frames["per_fold"]),
        curves=pd.concat(frames["curves"], ignore_index=True),
        occlusion=pd.concat(occ, ignore_index=True) if occ else pd.DataFrame(columns=occ_cols),
        timings=pd.DataFrame(frames["timings"]),
        per_image=pd.concat(per_image, ignore_index=True) if per_image else pd.DataFrame(),
        quantus=pd.DataFrame(frames["quantus"]),
        top_features=pd.concat(tops, ignore_index=True) if tops else pd.DataFrame(),
        settings={"config": config.to_dict(), "folds": {v: list(f) for v, f in plan.items()},
                  **{k_: (list(v_) if isinstance(v_, tuple) else v_) for k_, v_ in options.items()}},
    )
    if save:
        result.files = _save_tables(result, benchmark_config(config), "-".join(plan))
    return result


def _train_fold_models(config: Any, jobs: list[tuple[str, int]], workers: int | None, progress: bool,
                       timings: list[dict]) -> None:
    """Train the missing fold models of ``jobs`` ((variant, fold) pairs) up front, ``workers`` at
    a time (:func:`vxnb.studies.runs.train_models`); each trained fold gets a ``training`` row in
    ``timings`` with its share of the wall time."""
    if config.spec.reference_model is None:  # the user's model: never trained here
        return
    configs = {}
    for v, f in jobs:
        cfg = fold_config(config, v, f)
        configs[cfg.run_name] = (v, f, cfg)
    done = runs.train_models([c for _, _, c in configs.values()], workers=workers, progress=progress)
    for name in done["trained"]:
        v, f, _ = configs[name]
        timings.append({"variant": v, "fold": f, "phase": "training", "cached": False,
                        "seconds": done["seconds"] / len(done["trained"])})


def _add_fold_rows(frames: dict[str, list], res: Mapping[str, Any], variant: str, fold: int,
                   methods: Sequence[str], combines: Sequence[str]) -> None:
    """Append one fold's result (:func:`run_fold`) to the rows of each of
    :class:`BenchmarkResult`'s frames."""
    for m in methods:
        for c in (combines if m in table1.OURS_METHODS else ("",)):
            name = row_name(m, c)
            label = row_labels(pd.DataFrame({"method": [m], "combine": [c]}))[0]
            base = {"variant": variant, "fold": fold, "method": m, "combine": c}
            upsampled = table1.METHOD_REGISTRY[m].draw == "upsampled"
            frames["per_fold"].append({
                **base, "label": label, "auc": res["auc"][name], "n_images": res["n_images"],
                "accuracy": res["accuracy"], "model_test_accuracy": res.get("model_test_accuracy"),
                "n_relevant": res.get("n_relevant"), "n_top": res.get("n_top"),
                "n_left_out": res.get("n_left_out") if upsampled else None, "cached": res["cached"]})
            frames["curves"].append(pd.DataFrame({**base, "label": label, "threshold": res["thresholds"],
                                                  "iou": res["curve"][name]}))
            areas = res["image_auc"][name]
            frames["per_image"].append(pd.DataFrame({**base, "image": np.arange(len(areas)), "auc": areas,
                                                     "grid": res["grid"].get(m, [np.nan] * len(areas))}))
            if name in res.get("quantus", {}):
                frames["quantus"].append({**base, "label": label, **quantus_row(res["quantus"][name])})
                for metric, err in res["quantus"][name].get("errors", {}).items():
                    warnings.warn(f"Quantus refused {metric} for {label} on {variant} fold {fold}: {err}; its "
                                  "score is NaN (counted in quantus_summary's refused and errors columns)",
                                  RuntimeWarning, stacklevel=3)
    if res.get("top_features"):
        frames["top_features"].append(pd.DataFrame(res["top_features"]).assign(variant=variant, fold=fold))
    if res["occlusion"]:
        o = pd.DataFrame(res["occlusion"])
        o.insert(0, "fold", fold)
        o.insert(0, "variant", variant)
        o.insert(3, "label", o["method"].map(METHOD_LABELS))
        frames["occlusion"].append(o)
    frames["timings"].extend({"variant": variant, "fold": fold, "phase": p, "seconds": s, "cached": res["cached"]}
                             for p, s in res["seconds"].items())


def _save_tables(result: BenchmarkResult, bcfg: Any, tag: str) -> dict[str, Path]:
    """Write the result's tables as CSV into the benchmark's run folder; returns name → path."""
    files = {
        "per_fold": runs.save_table(bcfg, f"table1-{tag}-per-fold", result.per_fold),
        "table1": runs.save_table(bcfg, f"table1-{tag}", result.summary()),
        "curves": runs.save_table(bcfg, f"iou-curves-{tag}", result.mean_curves()),
        "timings": runs.save_table(bcfg, f"timings-{tag}", result.timings),
    }
    if not result.quantus.empty:
        files["quantus"] = runs.save_table(bcfg, f"quantus-{tag}", result.quantus_summary())
    if not result.per_image.empty:
        files["resampling"] = runs.save_table(bcfg, f"resampling-{tag}", result.resampling_effect())
    if not result.occlusion.empty:
        files["occlusion"] = runs.save_table(bcfg, f"occlusion-{tag}", result.occlusion_curves())
    return files


# ============================================================================ examples (figures)
def explain_examples(config: Any, variant: str, fold: int, positions: Sequence[int] | None = None, *,
                     n: int = 6, methods: Sequence[str] | None = None, mu: float = 10.0, k: int = 5,
                     layer: str | None = None, combine: str = DEFAULT_COMBINE, progress: bool = False) -> dict:
    """Heatmaps of every method for a few held-out images of one fold (Fig. 8, centre).

    ``positions``: indices into the fold's test split (default: ``n`` class-stratified ones).
    Returns ``{"images" (n,3,S,S), "masks" (n,S,S), "labels" (n,), "preds" (n,), "classes",
    "positions", "heatmaps": {method: (n,S,S)}}``; the predicted class is explained.
    Uses (or trains) the fold's model from its run folder.
    """
    from vxnb.evaluate.occlusion import batched_logits

    methods = _check_methods(methods)
    cfg = fold_config(config, variant, fold)
    data = runs.load_data(cfg, progress=progress)
    model, _ = runs.get_model(cfg, data=data, progress=progress)
    model.eval()
    test = data[1]
    if positions is None:
        positions = stratified_indices(_dataset_labels(test), check_positive_int(n, "n"), seed=cfg.seed)
    positions = [int(p) for p in positions]
    bad = [p for p in positions if not 0 <= p < len(test)]
    if bad:
        raise ValueError(f"positions: expected indices in 0..{len(test) - 1} of fold {fold}'s test split, got {bad}")
    items = [test[p] for p in positions]
    images = torch.stack([it[0] for it in items])
    relevant = (fold_relevant(cfg, model, mu, data=data, progress=progress)
                if any(m in table1.OURS_METHODS for m in methods) else None)
    preds = batched_logits(model, images).argmax(1)
    heat = {m: method_heatmaps(m, model, images, preds, relevant=relevant, k=k, layer=layer, combine=combine)
            for m in methods}
    return {"images": images, "masks": torch.stack([torch.as_tensor(it[2]).bool() for it in items]),
            "labels": np.array([int(it[1]) for it in items]), "preds": preds.numpy(), "classes": list(data[2]),
            "positions": positions, "heatmaps": heat}


# ============================================================================ why a fold fails
def part_reliance(model: torch.nn.Module, images: torch.Tensor, labels: Any, masks: torch.Tensor) -> pd.DataFrame:
    """Is the model right for the right reason? Its accuracy on ``images`` as they are, with the
    class-defining part (``masks``) filled with the image's mean colour ("part removed"), and
    with everything but the part so filled ("only the part"). A model that reads the part drops
    to chance without it and stays accurate on it alone.

    Returns one row per condition: ``condition, accuracy, n_images`` and ``accuracy[<c>]`` per
    class label c present (a two-class model may recognise one class by the *absence* of the
    other's part: then its accuracy does not drop without its own part).
    """
    from vxnb.evaluate.occlusion import batched_logits

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images: expected a (N, C, H, W) tensor, got {describe(images)}")
    masks = torch.as_tensor(masks).bool()
    if masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"masks: expected shape {(images.shape[0], *images.shape[2:])}, got {tuple(masks.shape)}")
    labels = torch.as_tensor(labels).long()
    mean = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    m = masks[:, None].expand_as(images)
    rows = []
    for name, x in (("as is", images), ("part removed", torch.where(m, mean, images)),
                    ("only the part", torch.where(m, images, mean))):
        hit = (batched_logits(model, x).argmax(1) == labels).float()
        rows.append({"condition": name, "accuracy": float(hit.mean()), "n_images": int(len(labels)),
                     **{f"accuracy[{int(c)}]": float(hit[labels == c].mean()) for c in torch.unique(labels)}})
    return pd.DataFrame(rows)


def fold_diagnosis(config: Any, variant: str, fold: int, *, mu: float = 10.0, k: int = 5,
                   n_test_images: int | None = 300, progress: bool = False) -> dict:
    """Why "ours" scores what it scores on one fold: which features are selected, where they
    respond, and whether the model is right for the right reason.

    Returns ``{"relevant"``: the selected features per class (``Relevance.frame``),
    ``"top"``: per top-k feature (class, layer, kind, channel): ``n`` (images where it is in the
    top-k of the predicted class), ``mean_response``, ``in_mask`` (mean share of its resampled
    heatmap's mass inside the image's part mask) and ``mask_share`` (the mask's share of the
    image, what a map spread uniformly would get), ``"reliance"``: :func:`part_reliance`,
    ``"auc"``: the area of ours and of Deconv+GB from the logit on these images}``.
    """
    from vxnb.evaluate.occlusion import batched_logits
    from vxnb.explanations import combine_heatmaps, feature_heatmaps

    cfg = fold_config(config, variant, fold)
    data = runs.load_data(cfg, progress=progress)
    model, _ = runs.get_model(cfg, data=data, progress=progress)
    model.eval()
    relevant = fold_relevant(cfg, model, mu, data=data, progress=progress)
    images, labels, masks, _ = fold_data(cfg, n_test_images, data=data, progress=progress)
    preds = batched_logits(model, images).argmax(1)
    hk, r, feats = feature_heatmaps(model, relevant, images, k, preds, draw="resampled")
    mk = masks.float()
    mass = hk.sum(dim=(-2, -1)).clamp_min(1e-12)
    inside = (hk * mk[:, None]).sum(dim=(-2, -1)) / mass                     # (N, k)
    img = torch.as_tensor(feats["image"].to_numpy(dtype=np.int64).copy())
    rank = torch.as_tensor(feats["rank"].to_numpy(dtype=np.int64).copy())
    feats = feats.assign(in_mask=inside[img, rank].numpy(), mask_share=mk.mean(dim=(1, 2))[img].numpy())
    top = (feats.groupby(["class", "layer", "kind", "channel"], sort=True)
           .agg(n=("response", "size"), mean_response=("response", "mean"), in_mask=("in_mask", "mean"),
                mask_share=("mask_share", "mean")).reset_index().sort_values(["class", "n"], ascending=[True, False]))
    top.insert(1, "class_name", [data[2][int(j)] for j in top["class"]])
    ours = combine_heatmaps(hk, r, "weighted")
    gb = method_heatmaps("deconv_gb", model, images, preds)
    frame = relevant.frame.assign(class_name=lambda f: [data[2][int(j)] for j in f["class"]])
    return {"relevant": frame, "top": top.reset_index(drop=True),
            "reliance": part_reliance(model, images, labels, masks),
            "auc": {"ours": float(iou_auc(ours, masks)), "deconv_gb": float(iou_auc(gb, masks))},
            "accuracy": float((preds == labels).float().mean()), "n_relevant": int(np.count_nonzero(relevant.W))}




# ============================================================================ any method: score_callable
#: The format version of one fold's scores of a callable (``score-<key>.json`` in the fold's run folder).
SCORE_VERSION = 1
runs.register_artifact("benchmark-score", SCORE_VERSION)

#: The tidy table's columns (:func:`score_callable`), one row per method, variant and fold.
SCORE_COLUMNS: tuple[str, ...] = (
    "method", "variant", "fold", "iou_area", "pointing_game", "relevance_mass", "relevance_rank", "auc", "top_k",
    "randomisation_spearman", "random_logit_ssim", "n_images", "n_scored", "n_failed", "n_refused",
    "accuracy", "seconds", "errors")


def method_fingerprint(fn: Any) -> str:
    """What identifies a callable in a score's key: its module, qualified name and source (the
    source of a ``functools.partial``'s function and its bound arguments; ``repr`` when no source)."""
    import functools
    import hashlib
    import inspect

    parts = []
    while isinstance(fn, functools.partial):
        parts.append(repr((fn.args, sorted(fn.keywords.items()))))
        fn = fn.func
    target = getattr(fn, "__func__", fn)
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError):
        source = repr(target)
    parts += [getattr(target, "__module__", "") or "", getattr(target, "__qualname__", type(target).__qualname__),
              source]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def check_explain_func(explain_func: Any, name: Any) -> str:
    """``explain_func`` is a callable taking ``(model, inputs, targets)`` positionally (Quantus's
    signature), ``name`` a non-empty string; returns the name. Refusals name the method."""
    import inspect

    if not isinstance(name, str) or not name.strip() or "[" in name:
        raise ValueError(f"name: expected a non-empty method name without '[', got {describe(name)}")
    if not callable(explain_func):
        raise TypeError(f"explain_func of method {name!r}: expected a callable explain_func(model, inputs, targets, "
                        f"**kw) -> (B, H, W), got {describe(explain_func)}")
    try:
        sig = inspect.signature(explain_func)
    except (TypeError, ValueError):
        return name  # a builtin without a signature: its calls will tell
    try:
        sig.bind(None, None, None)
    except TypeError as err:
        raise TypeError(f"explain_func of method {name!r}: expected Quantus's signature explain_func(model, inputs, "
                        f"targets, **kw) -> (B, H, W), got {name}{sig} ({err})") from None
    return name


def check_maps(maps: Any, name: str, shape: tuple[int, int, int]) -> np.ndarray:
    """One batch of an explain function's output as float64 (B, H, W): (B, 1, H, W) is squeezed;
    another shape, a non-numeric output or NaN/inf is refused naming the method."""
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().float().cpu().numpy()
    try:
        arr = np.asarray(maps, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"method {name!r}: expected heatmaps, an array (B, H, W) = {shape}, "
                        f"got {describe(maps)}") from None
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.shape != shape:
        raise ValueError(f"method {name!r}: expected heatmaps of shape (B, H, W) = {shape} (one map per input "
                         f"image, the image's size), got {tuple(np.shape(maps))}")
    if not np.isfinite(arr).all():
        raise ValueError(f"method {name!r}: returned {int((~np.isfinite(arr)).sum())} NaN or inf values in its "
                         f"heatmaps of shape {shape}; expected finite numbers")
    return arr


def _explainer(explain_func: Callable, name: str, as_numpy: bool, kwargs: Mapping[str, Any]) -> Callable:
    """``fn(model, x, t) -> (B, H, W)`` float64, checked: the method called with numpy arrays
    (Quantus's convention) or tensors, and ``kwargs``."""
    def fn(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
        inputs, targets = (x.detach().cpu().numpy(), t.detach().cpu().numpy()) if as_numpy else (x, t)
        return check_maps(explain_func(model, inputs, targets, **kwargs), name,
                          (x.shape[0], x.shape[2], x.shape[3]))
    return fn


def _explain_all(fn: Callable, name: str, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 batch_size: int, progress: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Maps of every image (NaN where the method failed), which failed, and their errors. A batch
    that raises is retried image by image, so one bad image fails alone; a wrong output is refused."""
    n, (h, w) = images.shape[0], images.shape[2:]
    out = np.full((n, h, w), np.nan)
    failed = np.zeros(n, dtype=bool)
    errors: list[str] = []
    for start in tqdm(range(0, n, batch_size), desc=f"{name}: heatmaps", leave=False,
                      disable=None if progress else True):
        sl = slice(start, min(n, start + batch_size))
        try:
            out[sl] = fn(model, images[sl], targets[sl])
            continue
        except (ValueError, TypeError) as err:
            if str(err).startswith(f"method {name!r}"):
                raise  # the output was refused: a broken contract, not a failed image
        except Exception:  # noqa: BLE001 - a method's own failure: retried per image below
            pass
        for i in range(sl.start, sl.stop):
            try:
                out[i] = fn(model, images[i:i + 1], targets[i:i + 1])[0]
            except (ValueError, TypeError) as err:
                if str(err).startswith(f"method {name!r}"):
                    raise
                failed[i] = True
                errors.append(f"image {i}: {type(err).__name__}: {err}")
            except Exception as err:  # noqa: BLE001 - recorded as this image's failure, counted
                failed[i] = True
                errors.append(f"image {i}: {type(err).__name__}: {err}")
    return out, failed, errors


def _sanity_scores(fn: Callable, name: str, model: torch.nn.Module, images: torch.Tensor, preds: torch.Tensor,
                   n_classes: int, seed: int) -> tuple[dict[str, float], str]:
    """Cascading randomisation (mean Spearman of the maps after every layer is randomised with
    the originals; near 0 passes) and random logit (mean SSIM of the maps of the predicted class
    and of a random other class; low passes). NaN and the error when the method fails here."""
    from vxnb.evaluate.sanity import randomization_curve, ssim

    try:
        curve = randomization_curve({name: fn}, model, images, preds, seed=seed, batch_size=len(images))
        rng = np.random.default_rng(seed)
        other = torch.as_tensor((preds.numpy() + rng.integers(1, n_classes, size=len(preds))) % n_classes)
        with torch.enable_grad():
            a, b = fn(model, images, preds), fn(model, images, other)
        return {"randomisation_spearman": float(curve["spearman"].iloc[-1]),
                "random_logit_ssim": float(np.nanmean(ssim(a, b)))}, ""
    except (ValueError, TypeError) as err:
        if str(err).startswith(f"method {name!r}"):
            raise
        return {"randomisation_spearman": float("nan"), "random_logit_ssim": float("nan")}, f"sanity: {err}"
    except Exception as err:  # noqa: BLE001 - the sanity checks of a failing method: NaN, the error kept
        return {"randomisation_spearman": float("nan"), "random_logit_ssim": float("nan")}, f"sanity: {err}"


def score_fold(explain_func: Callable, cfg: Any, *, name: str, n_images: int | None = None,
               sanity_images: int = 16, as_numpy: bool = True, explain_kwargs: Mapping[str, Any] | None = None,
               fold_kwargs: Callable | None = None, batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
    """One row of :func:`score_callable`'s table: ``explain_func`` on one fold (uncached)."""
    from vxnb.evaluate.iou import curve_area, iou_curve
    from vxnb.evaluate.occlusion import batched_logits
    from vxnb.evaluate.quantus_metrics import localisation_metrics

    t0 = time.perf_counter()
    data = runs.load_data(cfg, progress=progress)
    model, _ = runs.get_model(cfg, data=data, progress=progress)
    model.eval()
    images, labels, masks, _ = fold_data(cfg, n_images, data=data, progress=progress)
    logits = batched_logits(model, images, batch_size=64)
    preds = logits.argmax(1)
    kwargs = {**(explain_kwargs or {}), **(fold_kwargs(cfg, model, data) if fold_kwargs is not None else {})}
    fn = _explainer(explain_func, name, as_numpy, kwargs)
    maps, failed, errors = _explain_all(fn, name, model, images, preds, batch_size, progress)
    ok = ~failed
    row: dict[str, Any] = {"method": name, "variant": _variant_of(cfg), "fold": int(cfg.test_fold),
                           "n_images": int(len(images)), "n_failed": int(failed.sum()),
                           "accuracy": float((preds == labels).float().mean())}
    if ok.any():
        thr, curve = iou_curve(maps[ok], masks[ok].numpy())
        q = localisation_metrics(maps[ok], masks[ok].numpy(), judge="fast")
        row["iou_area"] = float(curve_area(curve, thr))
        row.update({k: q[k] for k in ("pointing_game", "relevance_mass", "relevance_rank", "auc", "top_k")})
        row["n_scored"], row["n_refused"] = q["n_scored"], q["n_refused"]
        sel = np.flatnonzero(ok)[:int(check_positive_int(sanity_images, "sanity_images"))]
        sanity, err = _sanity_scores(fn, name, model, images[sel], preds[sel], logits.shape[1], cfg.seed)
        row.update(sanity)
        errors += [err] if err else []
    else:
        row.update({c: float("nan") for c in SCORE_COLUMNS[3:11]})
        row["n_scored"], row["n_refused"] = 0, 0
    row["errors"] = "; ".join(errors[:5]) + (f"; … {len(errors) - 5} more" if len(errors) > 5 else "")
    row["seconds"] = time.perf_counter() - t0
    return row


def score_callable(explain_func: Callable, *, name: str, variant: str = "single-6c", split: str = "blocks",
                   folds: Sequence[int] = (0, 1, 2, 3, 4), n_images: int | None = None, config: Any = None,
                   sanity_images: int = 16, as_numpy: bool = True, explain_kwargs: Mapping[str, Any] | None = None,
                   fold_kwargs: Callable | None = None, batch_size: int = 16, recompute: bool = False,
                   save: bool = True, progress: bool = True) -> pd.DataFrame:
    """Score any attribution method on the an8Flower benchmark: one row per fold (:data:`SCORE_COLUMNS`).

    ``explain_func(model, inputs, targets, **kw) -> (B, H, W)`` is Quantus's signature: ``inputs``
    (B, 3, S, S) float32 and ``targets`` (B,) int64 as numpy arrays (``as_numpy=False``: tensors),
    the predicted classes; (B, 1, H, W) is accepted too. It runs on each fold's own model and
    held-out images (:func:`fold_config`, :func:`fold_data`, the fold's checkpoint, trained once
    and shared with :func:`run_benchmark`), and is judged by the IoU area (Table 1's score),
    Quantus's five localisation metrics (``judge="fast"``) and two sanity checks on
    ``sanity_images`` of the images: ``randomisation_spearman`` (cascading randomisation, all
    layers: near 0 passes) and ``random_logit_ssim`` (the map of a random other class: low passes).

    A callable with the wrong signature, a map of the wrong shape or with NaN is refused
    (TypeError/ValueError naming the method). An exception inside the method fails that image
    only: counted in ``n_failed`` (with the first errors in ``errors``) and left out of the scores.

    Args:
        name: the method's name in the table. variant, split ("blocks" or "views"), folds:
            an8Flower's variant, fold split and folds. n_images: evaluated images per fold (a
            class-stratified subset; None: the whole fold). config: a RunConfig template (default
            ``RunConfig(folds=split)``; its ``folds`` is replaced by ``split``).
        explain_kwargs: passed to every call; fold_kwargs: ``f(cfg, model, data) -> dict`` of
            per-fold keyword arguments (e.g. a fold's relevant features).
        recompute: ignore cached fold scores (``score-<key>.json``, keyed by the name, the settings,
            :func:`method_fingerprint` and the checkpoint). save: write the table (CSV, atomically,
            keyed) into the benchmark's run folder (``result.attrs["file"]``).
    """
    name = check_explain_func(explain_func, name)
    variant = check_variant(variant)
    split = check_choice(split, "split", ("blocks", "views"))
    folds = _check_folds(folds)
    n_images = check_positive_int(n_images, "n_images", allow_none=True)
    check_positive_int(sanity_images, "sanity_images")
    check_positive_int(batch_size, "batch_size")
    if explain_kwargs is not None and not isinstance(explain_kwargs, Mapping):
        raise TypeError(f"explain_kwargs: expected a dict of keyword arguments, got {describe(explain_kwargs)}")
    if fold_kwargs is not None and not callable(fold_kwargs):
        raise TypeError(f"fold_kwargs: expected a callable f(cfg, model, data) -> dict, got {describe(fold_kwargs)}")
    config = runs.RunConfig() if config is None else config
    _check_benchmarkable(config)
    config = dataclasses.replace(config, folds=split)
    settings = {"name": name, "n_images": n_images, "sanity_images": sanity_images, "as_numpy": bool(as_numpy),
                "method": method_fingerprint(explain_func),
                "explain_kwargs": _store.stable_json(json_ready(dict(explain_kwargs or {}))),
                "fold_kwargs": None if fold_kwargs is None else method_fingerprint(fold_kwargs)}
    rows = []
    for fold in tqdm(folds, desc=f"{name}: folds", disable=None if progress else True):
        cfg = fold_config(config, variant, fold)
        ckey = runs.checkpoint_key(cfg)
        key = _store.key("benchmark-score", settings, {"checkpoint": ckey, **fold_inputs(cfg)}, SCORE_VERSION)
        file = runs.run_dir(cfg) / f"score-{key}.json"

        def compute(cfg=cfg, key=key) -> dict:
            row = score_fold(explain_func, cfg, name=name, n_images=n_images, sanity_images=sanity_images,
                             as_numpy=as_numpy, explain_kwargs=explain_kwargs, fold_kwargs=fold_kwargs,
                             batch_size=batch_size, progress=progress)
            return json_ready({"version": SCORE_VERSION, "key": key, "row": row})

        def load(f: Path, key=key) -> dict:
            res = json.loads(f.read_text())
            if res.get("version") != SCORE_VERSION or res.get("key") != key:
                raise ValueError(f"it holds version {res.get('version')} key {res.get('key')}, expected {key}")
            return res

        res, _ = _store.load_or_compute(
            file, key, "benchmark-score", compute, load=load,
            save=lambda r, tmp: tmp.write_text(json.dumps(r, indent=2, sort_keys=True)), recompute=recompute,
            settings=settings, inputs={"checkpoint": ckey, **fold_inputs(cfg)}, upstream=[ckey],
            version=SCORE_VERSION, root=cfg.runs_dir)
        rows.append(res["row"])
    table = pd.DataFrame(rows).reindex(columns=list(SCORE_COLUMNS))
    if save:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).lstrip(".")
        table.attrs["file"] = runs.save_table(benchmark_config(config),
                                              f"scores-{safe}-{variant}-f{''.join(map(str, folds))}", table)
    return table
