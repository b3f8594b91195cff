"""Quantus's localisation metrics, batched: the same values, without Quantus's per-call overhead.

:func:`localisation_scores` computes, per image, Quantus 0.6's Pointing Game, Relevance Mass
Accuracy, Relevance Rank Accuracy, AUC and Top-K Intersection of heatmaps (N, H, W) against
binary masks (N, H, W), with Quantus's defaults and preprocessing, so that its values equal
Quantus's (``tests/test_localisation.py`` compares them on random maps and masks with ties,
empty masks and constant maps; ``benchmarks/bench_localisation.py`` times both):

- heatmaps are clipped at 0 (our heatmaps are non-negative; Quantus's ``abs=False`` metrics
  assume so), cast to float32 and divided by their maximum over the whole batch (Quantus's
  default ``normalise_by_max`` over all axes). No metric depends on that scale, but rounding
  may merge neighbouring values into ties, and ties decide Pointing Game, Rank and Top-K;
- ``pointing_game``: 1 if a pixel of the heatmap's maximum (any of them, on ties) lies in the
  mask, else 0;
- ``relevance_mass``: the heatmap's sum inside the mask over its total sum (float32, as Quantus);
- ``relevance_rank``: of the |mask| highest pixels, the share inside the mask;
- ``top_k``: of the ``k`` highest pixels, the share inside the mask;
- ``auc``: ROC-AUC of the heatmap as a score for the mask's pixels (tied scores count half,
  as the trapezoid over scikit-learn's ``roc_curve`` does); NaN for a mask that covers every pixel.

"Highest pixels" follow the order of ``numpy.argsort(-a, axis=-1)`` exactly as Quantus does,
so pixels tied at the cut-off are taken in the same (implementation-defined) order. An image
with an empty mask scores NaN on every metric (Quantus: NaN, except Pointing Game's ``True``).

Speed: one ``argsort`` per image serves Rank, Top-K and AUC; everything else is a vectorised
reduction over a chunk of images (no per-image Python, no scikit-learn).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..utils import describe

__all__ = ["LOCALISATION_METRICS", "check_localisation_inputs", "localisation_scores"]

#: The metrics, in the order of the tables.
LOCALISATION_METRICS: tuple[str, ...] = ("pointing_game", "relevance_mass", "relevance_rank", "auc", "top_k")

_CHUNK_PIXELS = 1 << 22  # pixels per chunk: bounds the argsort's int64 buffers to ~100 MB


def _array(x: Any, arg: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{arg}: expected a numpy array or a torch tensor (N, H, W), got {describe(x)}")
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(f"{arg}: expected a non-empty (N, H, W) array, got shape {tuple(x.shape)}")
    return x


def check_localisation_inputs(heatmaps: Any, masks: Any, top_k: Any = None,
                              metrics: Any = LOCALISATION_METRICS) -> tuple[np.ndarray, np.ndarray, int, tuple[str, ...]]:
    """Validate the arguments of the localisation metrics.

    Returns ``(heatmaps float32 (N, H, W) clipped at 0, masks bool (N, H, W), k, metrics)``;
    ``k`` defaults to 2 % of H·W (Quantus's 1000 on 224 × 224 images).
    """
    h = _array(heatmaps, "heatmaps")
    if not (np.issubdtype(h.dtype, np.floating) or np.issubdtype(h.dtype, np.integer) or h.dtype == bool):
        raise TypeError(f"heatmaps: expected real numbers, got dtype {h.dtype}")
    h = h.astype(np.float32)
    m = _array(masks, "masks")
    if m.shape != h.shape:
        raise ValueError(f"masks: expected the shape of heatmaps {h.shape}, got {m.shape}")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError("masks: expected binary masks (bool or 0/1)")
        m = m.astype(bool)
    if not np.isfinite(h).all():
        raise ValueError("heatmaps: contain NaN or inf")
    if isinstance(metrics, str) or not all(isinstance(k, str) for k in metrics):
        raise TypeError(f"metrics: expected a sequence of metric names, got {describe(metrics)}")
    metrics = tuple(metrics)
    unknown = [k for k in metrics if k not in LOCALISATION_METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics: expected some of {', '.join(LOCALISATION_METRICS)}, got {list(metrics)}")
    _, H, W = h.shape
    k = max(1, round(0.02 * H * W)) if top_k is None else top_k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < H * W:
        raise ValueError(f"top_k: expected an int in 1..{H * W - 1}, got {describe(top_k)}")
    return np.clip(h, 0, None), m, int(k), metrics


def localisation_scores(heatmaps: Any, masks: Any, *, top_k: int | None = None,
                        metrics: tuple[str, ...] = LOCALISATION_METRICS) -> dict[str, np.ndarray]:
    """Per-image localisation metrics of ``heatmaps`` against ``masks``, equal to Quantus 0.6's.

    Args:
        heatmaps: (N, H, W) real (numpy or torch); negative values are clipped to 0.
        masks: (N, H, W) bool or 0/1.
        top_k: k of Top-K Intersection (default 2 % of H·W).
        metrics: a subset of :data:`LOCALISATION_METRICS`.

    Returns ``{metric: float64 (N,)}``; NaN where a metric is undefined (empty mask; AUC of a
    mask covering every pixel). The scale of the heatmaps is the batch's (see the module notes).
    """
    h, m, k, metrics = check_localisation_inputs(heatmaps, masks, top_k, metrics)
    n = h.shape[0]
    a = h.reshape(n, -1)
    s = m.reshape(n, -1)
    top = a.max()
    if top != 0:  # Quantus's normalise_by_max over the batch (it leaves an all-zero batch as is)
        a = np.divide(a, top)
    out = {name: np.empty(n, np.float64) for name in metrics}
    need_order = any(name in metrics for name in ("relevance_rank", "auc", "top_k"))
    step = max(1, _CHUNK_PIXELS // a.shape[1])
    for lo in range(0, n, step):
        ac, sc = a[lo:lo + step], s[lo:lo + step]
        for name, values in _chunk_scores(ac, sc, k, metrics, need_order).items():
            out[name][lo:lo + step] = values
    return out


def _chunk_scores(a: np.ndarray, s: np.ndarray, k: int, metrics: tuple[str, ...],
                  need_order: bool) -> dict[str, np.ndarray]:
    b, p = a.shape
    n_in = s.sum(-1)
    empty = n_in == 0
    res: dict[str, np.ndarray] = {}
    if "pointing_game" in metrics:
        res["pointing_game"] = np.any(s & (a == a.max(-1, keepdims=True)), axis=-1).astype(np.float64)
    if "relevance_mass" in metrics:
        with np.errstate(invalid="ignore", divide="ignore"):
            res["relevance_mass"] = ((a * s).sum(-1) / a.sum(-1)).astype(np.float64)
    if need_order:
        neg = -a
        order = np.argsort(neg, axis=-1)  # Quantus's order, ties included
        hits = np.take_along_axis(s, order, axis=-1)
        cum = np.cumsum(hits, axis=-1, dtype=np.int64)  # mask pixels among the first i + 1
        rows = np.arange(b)
        if "relevance_rank" in metrics:
            with np.errstate(invalid="ignore", divide="ignore"):
                res["relevance_rank"] = cum[rows, np.maximum(n_in, 1) - 1] / n_in
        if "top_k" in metrics:
            res["top_k"] = cum[:, k - 1] / k
        if "auc" in metrics:
            res["auc"] = _auc_sorted(np.take_along_axis(neg, order, axis=-1), cum, n_in)
    for values in res.values():
        values[empty] = np.nan
    return res


def _auc_sorted(v: np.ndarray, cum: np.ndarray, n_in: np.ndarray) -> np.ndarray:
    """ROC-AUC per row from the scores sorted best first (``v`` ascending = heatmap descending)
    and the cumulative count of positives: the trapezoid over the ends of runs of tied scores."""
    b, p = v.shape
    ends = np.ones((b, p), bool)
    ends[:, :-1] = v[:, 1:] != v[:, :-1]
    idx = np.flatnonzero(ends)
    row = idx // p
    tp = cum.ravel()[idx].astype(np.float64)
    fp = (idx % p + 1) - tp
    first = np.ones(idx.size, bool)
    first[1:] = row[1:] != row[:-1]
    tp_prev = np.where(first, 0.0, np.roll(tp, 1))
    fp_prev = np.where(first, 0.0, np.roll(fp, 1))
    area = np.bincount(row, weights=(fp - fp_prev) * (tp + tp_prev) / 2.0, minlength=b)
    n_out = p - n_in
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_out > 0, area / (n_in * n_out.astype(np.float64)), np.nan)
