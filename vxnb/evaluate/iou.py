"""IoU of thresholded heatmaps against ground-truth masks (Sec. 4.3 of the paper, Table 1).

The protocol (the paper's Sec. 4.3, as this package measures it):

* each heatmap is min-max normalised to [0, 1] on its own,
  ``n = (h - h.min()) / (h.max() - h.min())``, computed in float64; a constant heatmap
  becomes all zeros;
* at threshold ``t`` a pixel is *on* where ``n >= t`` (so ``t = 0`` turns every pixel on);
* the IoU of an image is ``|on ∩ mask| / |on ∪ mask|``; the curve is the mean over images;
* the default thresholds are ``numpy.linspace(0, 1, 101)``;
* the area under the curve is the trapezoid rule over the thresholds divided by their range,
  in percent (a curve that is 1 everywhere has an area of 100).

Images whose mask is empty are skipped (their IoU is undefined: with a non-empty mask the
union is never empty, so "both empty" only happens for empty masks) and counted in a
``UserWarning``. :func:`iou_per_image` reports them as rows of NaN.

Speed: per image, the normalised values are sorted once (as integer keys that also carry the
mask bit) and the counts above each threshold are read off with a binary search, so nothing
of size N x T x H x W is ever built; 1000 heatmaps of 128 x 128 take a fraction of a second
(``benchmarks/bench_iou.py``).
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["DEFAULT_THRESHOLDS", "normalize_heatmaps", "iou_per_image", "iou_curve", "iou_auc", "curve_area"]

#: The thresholds used when none are given: 0, 0.01, ..., 1.
DEFAULT_THRESHOLDS: np.ndarray = np.linspace(0.0, 1.0, 101)
DEFAULT_THRESHOLDS.setflags(write=False)

_MASK_BIT = np.int64(1) << np.int64(62)  # above the bit pattern of any float64 in [0, 1]
_CHUNK_PIXELS = 1 << 22  # pixels processed per chunk (bounds memory to a few 100 MB)


def to_numpy(x: Any, arg: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)):
        try:
            return np.asarray(x)
        except ValueError as err:
            raise ValueError(f"{arg}: could not be converted to an array ({err})") from err
    raise TypeError(f"{arg}: expected a numpy array or a torch tensor of shape (N, H, W), "
                    f"got {type(x).__name__}")


def check_heatmaps(heatmaps: Any, arg: str = "heatmaps") -> np.ndarray:
    h = to_numpy(heatmaps, arg)
    if h.dtype == bool:
        h = h.astype(np.float64)
    if not (np.issubdtype(h.dtype, np.floating) or np.issubdtype(h.dtype, np.integer)):
        raise TypeError(f"{arg}: expected real numbers, got dtype {h.dtype}")
    if h.ndim != 3:
        hint = " (add a batch dimension, e.g. heatmap[None])" if h.ndim == 2 else ""
        raise ValueError(f"{arg}: expected shape (N, H, W), got {tuple(h.shape)}{hint}")
    if h.shape[0] == 0 or h.shape[1] == 0 or h.shape[2] == 0:
        raise ValueError(f"{arg}: expected a non-empty (N, H, W) array, got shape {tuple(h.shape)}")
    if np.issubdtype(h.dtype, np.floating):
        bad = ~np.isfinite(h)
        if bad.any():
            images = np.flatnonzero(bad.any(axis=(1, 2)))
            raise ValueError(f"{arg}: contains NaN or inf in {images.size} heatmap(s) "
                             f"(first indices {images[:5].tolist()})")
    return h


def _check_masks(masks: Any, shape: tuple[int, ...], arg: str = "masks") -> np.ndarray:
    m = to_numpy(masks, arg)
    if m.shape != shape:
        raise ValueError(f"{arg}: expected the shape of heatmaps {shape}, got {tuple(m.shape)}")
    if m.dtype != bool:
        if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
            raise TypeError(f"{arg}: expected a bool array, got dtype {m.dtype}")
        if not np.isin(m, (0, 1)).all():
            raise ValueError(f"{arg}: expected a bool array (or only 0/1 values), got dtype "
                             f"{m.dtype} with other values")
        m = m.astype(bool)
    return m


def _check_thresholds(thresholds: Any) -> np.ndarray:
    if thresholds is None:
        return np.array(DEFAULT_THRESHOLDS)
    t = to_numpy(thresholds, "thresholds")
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"thresholds: expected a non-empty 1-D sequence, got shape {tuple(t.shape)}")
    if not (np.issubdtype(t.dtype, np.floating) or np.issubdtype(t.dtype, np.integer)):
        raise TypeError(f"thresholds: expected real numbers, got dtype {t.dtype}")
    t = t.astype(np.float64)
    if not np.isfinite(t).all():
        raise ValueError("thresholds: contains NaN or inf")
    if t.min() < 0 or t.max() > 1:
        raise ValueError(f"thresholds: expected values in [0, 1], got min {t.min():g}, max {t.max():g}")
    if t.size > 1 and not (np.diff(t) > 0).all():
        raise ValueError("thresholds: expected strictly increasing values")
    return t + 0.0  # turns -0.0 into +0.0 (its bit pattern must sort first)


def normalize_heatmaps(heatmaps: Any) -> np.ndarray:
    """Min-max normalise each heatmap to [0, 1] on its own, in float64.

    Args:
        heatmaps: (N, H, W) real numbers, numpy or torch.

    Returns:
        (N, H, W) float64 array ``(h - min) / (max - min)`` per heatmap; a constant heatmap
        becomes all zeros. This is exactly the normalisation :func:`iou_curve` uses.
    """
    h = check_heatmaps(heatmaps)
    return normalize_flat(h.reshape(h.shape[0], -1)).reshape(h.shape)


def normalize_flat(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=True)
    lo = x.min(axis=1, keepdims=True)
    span = x.max(axis=1, keepdims=True) - lo
    x -= lo
    np.divide(x, span, out=x, where=span > 0)
    x[(span == 0).ravel()] = 0.0
    return x


def _counts(h: np.ndarray, m: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image and threshold: |on ∩ mask|, |on \\ mask|, and |mask| per image."""
    n, p = h.shape[0], h.shape[1] * h.shape[2]
    t_bits = t.view(np.int64)
    inter = np.empty((n, t.size), dtype=np.int64)
    outside = np.empty((n, t.size), dtype=np.int64)
    mask_size = m.reshape(n, p).sum(axis=1)
    chunk = max(1, _CHUNK_PIXELS // p)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        x = normalize_flat(h[start:stop].reshape(stop - start, p))
        # Non-negative float64 values sort like their bit patterns read as int64; adding
        # 2**62 to the mask pixels puts them after every non-mask pixel, exactly.
        keys = x.view(np.int64)
        keys += m[start:stop].reshape(stop - start, p).astype(np.int64) << 62
        keys.sort(axis=1)
        for j, row in enumerate(keys):
            i = start + j
            n_out = p - mask_size[i]
            below_out = np.searchsorted(row, t_bits, side="left")  # non-mask keys < t
            below_in = np.searchsorted(row, t_bits + _MASK_BIT, side="left") - n_out
            outside[i] = n_out - below_out
            inter[i] = mask_size[i] - below_in
    return inter, outside, mask_size


def _per_image(heatmaps: Any, masks: Any, thresholds: Any, stacklevel: int) -> tuple[np.ndarray, np.ndarray]:
    h = check_heatmaps(heatmaps)
    m = _check_masks(masks, h.shape)
    t = _check_thresholds(thresholds)
    inter, outside, mask_size = _counts(h, m, t)
    empty = mask_size == 0
    union = outside + mask_size[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        ious = inter / union
    ious[empty] = np.nan
    if empty.any():
        if empty.all():
            raise ValueError(f"masks: all {empty.size} masks are empty; the IoU is undefined")
        warnings.warn(f"masks: {int(empty.sum())} of {empty.size} masks are empty; those images are "
                      "skipped (IoU undefined)", UserWarning, stacklevel=stacklevel + 1)
    return t, ious


def iou_per_image(heatmaps: Any, masks: Any, thresholds: Any = None) -> np.ndarray:
    """IoU of each thresholded heatmap with its mask, at every threshold.

    Args:
        heatmaps: (N, H, W) real numbers (numpy or torch); normalised per image as in
            :func:`normalize_heatmaps`.
        masks: (N, H, W) bool (0/1 integers are accepted).
        thresholds: 1-D, strictly increasing, in [0, 1]; default ``linspace(0, 1, 101)``.

    Returns:
        (N, T) float64 array; rows of images with an empty mask are NaN (and a warning
        says how many there are).
    """
    return _per_image(heatmaps, masks, thresholds, stacklevel=2)[1]


def iou_curve(heatmaps: Any, masks: Any, thresholds: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean IoU over images of the thresholded heatmaps with the masks, per threshold.

    Args:
        heatmaps: (N, H, W) real numbers (numpy or torch), min-max normalised per image.
        masks: (N, H, W) bool ground-truth masks.
        thresholds: 1-D, strictly increasing, in [0, 1]; default ``linspace(0, 1, 101)``.

    Returns:
        ``(thresholds, ious)``: two (T,) float64 arrays; ``ious[k]`` is the mean over images
        (with a non-empty mask) of ``|{n >= t_k} ∩ mask| / |{n >= t_k} ∪ mask|``.

    Raises:
        ValueError: shapes differ, NaN/inf heatmaps, thresholds outside [0, 1] or not
            strictly increasing, or every mask empty.
    """
    t, ious = _per_image(heatmaps, masks, thresholds, stacklevel=2)
    return t, np.nanmean(ious, axis=0)


def iou_auc(heatmaps: Any, masks: Any, thresholds: Any = None) -> float:
    """Area under the IoU curve, in percent: ``100 * trapezoid(ious, t) / (t[-1] - t[0])``.

    Same arguments as :func:`iou_curve`; needs at least two thresholds.
    """
    t = _check_thresholds(thresholds)
    if t.size < 2:
        raise ValueError(f"thresholds: the area needs at least 2 thresholds, got {t.size}")
    t, curve = _per_image(heatmaps, masks, t, stacklevel=2)
    return float(curve_area(np.nanmean(curve, axis=0), t))


def curve_area(curves: Any, thresholds: Any) -> np.ndarray | float:
    """Area under IoU curve(s) in percent: ``100 * trapezoid(curve, t) / (t[-1] - t[0])`` along
    the last axis — of a (T,) curve (a float) or of (N, T) per-image curves (N,)."""
    t = np.asarray(thresholds, dtype=np.float64)
    c = np.asarray(curves, dtype=np.float64)
    if t.ndim != 1 or t.size < 2 or c.shape[-1:] != t.shape:
        raise ValueError(f"curves: expected (..., {t.size}) IoU values over {t.size} >= 2 thresholds, "
                         f"got shape {c.shape}")
    out = 100.0 * np.trapezoid(c, t, axis=-1) / (t[-1] - t[0])
    return float(out) if out.ndim == 0 else out
