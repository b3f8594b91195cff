"""A second judge of the heatmaps: the localisation metrics of Quantus (Hedström et al., 2023).

:func:`localisation_metrics` scores precomputed heatmaps (N, H, W) against binary masks
(N, H, W) with Quantus 0.6's Pointing Game, Relevance Mass Accuracy, Relevance Rank Accuracy,
AUC and Top-K Intersection (``a_batch`` / ``s_batch`` given, no model or explain function is
called). Quantus wants (N, 1, H, W) heatmaps and masks, and refuses constant maps (an
all-zero heatmap fails its assertions, and per image it would divide by zero or point at an
arbitrary pixel): constant heatmaps and images with an empty mask are left out and counted
(``n_refused``), never passed on; a metric that Quantus still refuses on the rest is counted
as refused for every image, never raised.

Two judges give the same values: ``judge="fast"`` (the default) computes them with batched
numpy (:mod:`vxnb.evaluate.localisation`, equal to Quantus's to 1e-6 with ties resolved as
Quantus resolves them, tested against it); ``judge="quantus"`` calls Quantus itself.

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

from ..utils import describe
from .localisation import check_localisation_inputs, localisation_scores

__all__ = ["JUDGES", "QUANTUS_METRICS", "localisation_metrics", "metrics_table"]

#: Our metric names → Quantus class names.
QUANTUS_METRICS: dict[str, str] = {
    "pointing_game": "PointingGame",
    "relevance_mass": "RelevanceMassAccuracy",
    "relevance_rank": "RelevanceRankAccuracy",
    "auc": "AUC",
    "top_k": "TopKIntersection",
}


JUDGES: tuple[str, ...] = ("fast", "quantus")


def localisation_metrics(heatmaps: Any, masks: Any, *, top_k: int | None = None,
                         metrics: tuple[str, ...] = tuple(QUANTUS_METRICS), judge: str = "fast") -> dict[str, Any]:
    """Quantus's localisation metrics of ``heatmaps`` against ``masks``.

    Args:
        heatmaps: (N, H, W) real; negative values are clipped to 0 (Quantus's ``abs=False``
            metrics assume non-negative relevance, as all our heatmaps are).
        masks: (N, H, W) bool (or 0/1).
        top_k: k of Top-K Intersection (default 2 % of H·W).
        metrics: a subset of :data:`QUANTUS_METRICS`.
        judge: ``"fast"`` (default): :func:`vxnb.evaluate.localisation.localisation_scores`,
            Quantus's values from batched numpy, tens of times faster; ``"quantus"``: Quantus
            itself (the test oracle of the fast one).

    Returns ``{metric: mean over scored images, "n_images", "n_scored", "n_refused"
    (constant heatmaps or empty masks left out), "refused_by_quantus" {metric: images whose
    score is undefined (NaN), e.g. AUC of a mask that covers the image}, "judge"}``;
    a metric with no scored image is NaN.
    """
    if judge not in JUDGES:
        raise ValueError(f"judge: expected one of {', '.join(JUDGES)}, got {describe(judge)}")
    h, m, k, metrics = check_localisation_inputs(heatmaps, masks, top_k, metrics)
    N = h.shape[0]
    flat = h.reshape(N, -1)
    ok = (flat.max(1) > flat.min(1)) & m.reshape(N, -1).any(1)
    out: dict[str, Any] = {"n_images": int(N), "n_scored": int(ok.sum()), "n_refused": int(N - ok.sum()),
                           "refused_by_quantus": {}, "judge": judge}
    if not ok.any():
        out.update({name: float("nan") for name in metrics})
        return out
    if judge == "fast":
        per_image = localisation_scores(h[ok], m[ok], top_k=k, metrics=metrics)
        for name in metrics:
            _summarise(out, name, per_image[name])
        return out
    import quantus

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
        _summarise(out, name, scores)
    return out


def _summarise(out: dict[str, Any], name: str, scores: np.ndarray) -> None:
    bad = ~np.isfinite(scores)
    if bad.any():
        out["refused_by_quantus"][name] = int(bad.sum())
    out[name] = float(scores[~bad].mean()) if (~bad).any() else float("nan")


def metrics_table(results: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """``{method: localisation_metrics(...)}`` → one row per method: the metrics, n_scored, n_refused."""
    rows = []
    for method, res in results.items():
        rows.append({"method": method, **{k: res.get(k, float("nan")) for k in QUANTUS_METRICS},
                     "n_scored": res.get("n_scored"), "n_refused": res.get("n_refused")})
    return pd.DataFrame(rows, columns=["method", *QUANTUS_METRICS, "n_scored", "n_refused"])
