"""A second judge of the heatmaps: the localisation metrics of Quantus (Hedström et al., 2023).

:func:`localisation_metrics` scores precomputed heatmaps (N, H, W) against binary masks
(N, H, W) with Quantus 0.6's Pointing Game, Relevance Mass Accuracy, Relevance Rank Accuracy,
AUC and Top-K Intersection (``a_batch`` / ``s_batch`` given, no model or explain function is
called). Quantus wants (N, 1, H, W) heatmaps and masks, and refuses constant maps (an
all-zero heatmap fails its assertions, and per image it would divide by zero or point at an
arbitrary pixel): constant heatmaps and images with an empty mask are left out and counted
(``n_refused``), never passed on; a metric that Quantus still refuses on the rest is counted
as refused for every image, never raised.

Metrics (all in [0, 1], larger is better, mean over the scored images):

- ``pointing_game``: the maximum of the heatmap lies in the mask;
- ``relevance_mass``: the share of the heatmap's total (non-negative) mass inside the mask;
- ``relevance_rank``: the share of the |mask| highest pixels that lie in the mask;
- ``auc``: ROC-AUC of the heatmap as a score for the mask's pixels;
- ``top_k``: the share of the k highest pixels inside the mask (default k = 2 % of the
  pixels: Quantus's default of 1000 on 224 × 224 images).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from ..utils import describe

__all__ = ["QUANTUS_METRICS", "localisation_metrics", "metrics_table"]

#: Our metric names → Quantus class names.
QUANTUS_METRICS: dict[str, str] = {
    "pointing_game": "PointingGame",
    "relevance_mass": "RelevanceMassAccuracy",
    "relevance_rank": "RelevanceRankAccuracy",
    "auc": "AUC",
    "top_k": "TopKIntersection",
}


def _array(x: Any, arg: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{arg}: expected a numpy array or a torch tensor (N, H, W), got {describe(x)}")
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(f"{arg}: expected a non-empty (N, H, W) array, got shape {tuple(x.shape)}")
    return x


def localisation_metrics(heatmaps: Any, masks: Any, *, top_k: int | None = None,
                         metrics: tuple[str, ...] = tuple(QUANTUS_METRICS)) -> dict[str, Any]:
    """Quantus's localisation metrics of ``heatmaps`` against ``masks``.

    Args:
        heatmaps: (N, H, W) real; negative values are clipped to 0 (Quantus's ``abs=False``
            metrics assume non-negative relevance, as all our heatmaps are).
        masks: (N, H, W) bool (or 0/1).
        top_k: k of Top-K Intersection (default 2 % of H·W).
        metrics: a subset of :data:`QUANTUS_METRICS`.

    Returns ``{metric: mean over scored images, "n_images", "n_scored", "n_refused"
    (constant heatmaps or empty masks left out), "refused_by_quantus" {metric: images}}``;
    a metric with no scored image is NaN.
    """
    import quantus

    h = _array(heatmaps, "heatmaps").astype(np.float32)
    m = _array(masks, "masks")
    if m.shape != h.shape:
        raise ValueError(f"masks: expected the shape of heatmaps {h.shape}, got {m.shape}")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError("masks: expected binary masks (bool or 0/1)")
        m = m.astype(bool)
    if not np.isfinite(h).all():
        raise ValueError("heatmaps: contain NaN or inf")
    unknown = [k for k in metrics if k not in QUANTUS_METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics: expected some of {', '.join(QUANTUS_METRICS)}, got {list(metrics)}")
    N, H, W = h.shape
    k = max(1, round(0.02 * H * W)) if top_k is None else top_k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < H * W:
        raise ValueError(f"top_k: expected an int in 1..{H * W - 1}, got {describe(top_k)}")
    h = np.clip(h, 0, None)
    flat = h.reshape(N, -1)
    ok = (flat.max(1) > flat.min(1)) & m.reshape(N, -1).any(1)
    out: dict[str, Any] = {"n_images": int(N), "n_scored": int(ok.sum()), "n_refused": int(N - ok.sum()),
                           "refused_by_quantus": {}}
    if not ok.any():
        out.update({name: float("nan") for name in metrics})
        return out
    a = h[ok][:, None]
    s = m[ok][:, None].astype(np.float32)
    x = np.repeat(a, 3, axis=1)  # Quantus checks shapes against an input batch; it is not used
    y = np.zeros(a.shape[0], dtype=np.int64)
    for name in metrics:
        kwargs = {"k": int(k)} if name == "top_k" else {}
        metric = getattr(quantus, QUANTUS_METRICS[name])(disable_warnings=True, display_progressbar=False, **kwargs)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = np.asarray(metric(model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s,
                                           channel_first=True), dtype=np.float64)
        except (AssertionError, ValueError) as err:  # Quantus refuses the batch: count, never crash
            out[name] = float("nan")
            out["refused_by_quantus"][name] = int(a.shape[0])
            out.setdefault("errors", {})[name] = str(err).splitlines()[0] if str(err) else type(err).__name__
            continue
        bad = ~np.isfinite(scores)
        if bad.any():
            out["refused_by_quantus"][name] = int(bad.sum())
        out[name] = float(scores[~bad].mean()) if (~bad).any() else float("nan")
    return out


def metrics_table(results: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """``{method: localisation_metrics(...)}`` → one row per method: the metrics, n_scored, n_refused."""
    rows = []
    for method, res in results.items():
        rows.append({"method": method, **{k: res.get(k, float("nan")) for k in QUANTUS_METRICS},
                     "n_scored": res.get("n_scored"), "n_refused": res.get("n_refused")})
    return pd.DataFrame(rows, columns=["method", *QUANTUS_METRICS, "n_scored", "n_refused"])
