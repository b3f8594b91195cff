"""vxnb: Visual Explanation by Interpretation (Oramas, Wang, Tuytelaars, ICLR 2019).

The pipeline is a chain of plain functions over plain data; see README.md,
docs/ARCHITECTURE.md and the numbered notebooks for the tour:

    data  ->  models  ->  features (X, XᵀX, XᵀL)  ->  lasso (W)  ->  relevance
          ->  deconv / explanations (heatmaps)  ->  interpret / evaluate  ->  studies

The paper's steps are one import away (loaded on first use, so ``import vxnb`` stays cheap):

>>> feats = vxnb.extract_features(model, data)             # Sec. 3.1: filter-wise responses
>>> path = vxnb.lasso_path(feats.G, feats.XtL, mu_max=50)  # Sec. 3.1: the μ-lasso path
>>> rel = vxnb.Relevance.from_path(path, feats, mu=10.0)   # the relevant features
>>> e = vxnb.explain(model, rel, image, k=5)               # Sec. 3.2: per-prediction explanation
>>> v = vxnb.visualize(model, x, layer, channels)          # Sec. 3.3: resampled DeconvNet + GB
>>> avg = vxnb.average_images(model, data, top, rel.frame) # Sec. 3.1: interpretation (top: top patches)
>>> h = vxnb.attribution("gradcam", model, x, target)      # the baselines of Table 1
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that owns it.
_EXPORTS = {
    "extract_features": "vxnb.features",
    "lasso_path": "vxnb.lasso",
    "Relevance": "vxnb.relevance",
    "explain": "vxnb.explanations",
    "visualize": "vxnb.deconv",
    "average_images": "vxnb.averages",
    "attribution": "vxnb.baselines",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vxnb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
