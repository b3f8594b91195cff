"""The :class:`Features` of a dataset (X's statistics and the meaning of its columns) and its file."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ..utils import atomic_savez, read_npz
from .layers import COLUMN_NAMES

__all__ = ["Features", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


@dataclass
class Features:
    """Filter-wise responses of a dataset and their streamed statistics.

    Attributes:
        G: XᵀX, (m, m) float64.
        XtL: XᵀL, (m, C) float64, L the (N, C) one-hot label matrix (column j = sum of x over
            the images of class j).
        labels: (N,) int64 class of each row, in the order the data was read.
        index: (N,) int64 dataset index of each row (the sampler's order for a DataLoader).
        columns: metadata of the m entries of x (``feature, layer, layer_number, kind, channel``).
        layers: the described modules, in the order of x.
        n_classes: C.
        classes: class names (from ``dataset.classes``) or None.
        X: (N, m) float32, or None when it was not kept (see ``keep_X``).
        meta: options of the extraction (JSON-serialisable).
    """

    G: np.ndarray
    XtL: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    columns: pd.DataFrame
    layers: list[str]
    n_classes: int
    classes: list[str] | None = None
    X: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        """N, the number of images."""
        return int(self.labels.shape[0])

    @property
    def m(self) -> int:
        """m, the length of x."""
        return int(self.G.shape[0])

    @property
    def class_sums(self) -> np.ndarray:
        """(C, m) float64: the sum of x over the images of each class (= XtL.T)."""
        return self.XtL.T

    @property
    def class_counts(self) -> np.ndarray:
        """(C,) int64 images per class."""
        return np.bincount(self.labels, minlength=self.n_classes).astype(np.int64)

    @property
    def lasso_tol(self) -> float | None:
        """The ``tol`` to give ``vxnb.lasso`` for this G: 1e-5 when G was accumulated from float32
        products (relative error ~1e-7, so a column that depends linearly on the active set
        shows a pivot of ~1e-7, not ~1e-16), else None (the lasso's float64 default, 1e-10)."""
        return 1e-5 if self.meta.get("gram_dtype") == str(torch.float32) else None

    @property
    def L(self) -> np.ndarray:
        """(N, C) float64 one-hot label matrix (rows in the order of X)."""
        out = np.zeros((self.n, self.n_classes))
        out[np.arange(self.n), self.labels] = 1.0
        return out

    @property
    def class_names(self) -> list[str]:
        return list(self.classes) if self.classes is not None else [str(j) for j in range(self.n_classes)]

    def select(self, layers: Sequence[str] | str | None = None, kind: str | Sequence[str] | None = None) -> "Features":
        """The statistics restricted to some layers and/or kinds (e.g. ``kind="conv"``: the
        OnlyConv pool out of the All pool — x is L1-normalised per layer, so a subset of layers
        gives exactly the descriptor those layers alone would). Columns are renumbered."""
        mask = np.ones(self.m, dtype=bool)
        if layers is not None:
            layers = [layers] if isinstance(layers, str) else list(layers)
            unknown = [l for l in layers if l not in self.layers]
            if unknown:
                raise ValueError(f"layers: {unknown} are not among the described layers {self.layers}")
            mask &= self.columns["layer"].isin(layers).to_numpy()
        if kind is not None:
            kinds = [kind] if isinstance(kind, str) else list(kind)
            bad = [k for k in kinds if k not in ("conv", "fc", "other")]
            if bad:
                raise ValueError(f"kind: expected 'conv', 'fc' or 'other', got {bad}")
            mask &= self.columns["kind"].isin(kinds).to_numpy()
        if not mask.any():
            raise ValueError(f"select: no column matches layers={layers!r}, kind={kind!r}")
        idx = np.flatnonzero(mask)
        cols = self.columns.iloc[idx].reset_index(drop=True)
        cols["feature"] = np.arange(len(cols), dtype=np.int64)
        kept_layers = [l for l in self.layers if l in set(cols["layer"])]
        return replace(self, G=self.G[np.ix_(idx, idx)].copy(), XtL=self.XtL[idx].copy(), columns=cols,
                       layers=kept_layers, X=None if self.X is None else self.X[:, idx].copy(),
                       meta={**self.meta, "selected": {"layers": layers, "kind": kind}})

    # ---- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (an ``.npz`` file, written atomically; no pickles)."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "format_version": np.array(FORMAT_VERSION),
            "G": np.asarray(self.G, dtype=np.float64),
            "XtL": np.asarray(self.XtL, dtype=np.float64),
            "labels": np.asarray(self.labels, dtype=np.int64),
            "index": np.asarray(self.index, dtype=np.int64),
            "n_classes": np.array(int(self.n_classes)),
            "layers": np.array(list(self.layers), dtype=str),
            "meta_json": np.array(json.dumps(_json_safe(self.meta))),
        }
        for c in COLUMN_NAMES:
            col = self.columns[c].to_numpy()
            arrays[f"columns_{c}"] = col.astype(str) if c in ("layer", "kind") else col.astype(np.int64)
        if self.classes is not None:
            arrays["classes"] = np.array([str(c) for c in self.classes], dtype=str)
        if self.X is not None:
            arrays["X"] = np.asarray(self.X, dtype=np.float32)
        atomic_savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Features":
        """Read a file written by :meth:`save`."""
        need = {"format_version", "G", "XtL", "labels", "index", "n_classes", "layers", "meta_json"} | \
            {f"columns_{c}" for c in COLUMN_NAMES}
        data = read_npz(path, "path", "vxnb features file", need)
        if int(data["format_version"]) != FORMAT_VERSION:
            raise ValueError(f"path: {path} has format version {int(data['format_version'])}, "
                             f"this vxnb reads {FORMAT_VERSION}; recompute the features")
        columns = pd.DataFrame({c: data[f"columns_{c}"].tolist() if c in ("layer", "kind") else data[f"columns_{c}"]
                                for c in COLUMN_NAMES})
        return cls(G=data["G"], XtL=data["XtL"], labels=data["labels"], index=data["index"], columns=columns,
                   layers=[str(s) for s in data["layers"]], n_classes=int(data["n_classes"]),
                   classes=[str(s) for s in data["classes"]] if "classes" in data else None,
                   X=data.get("X"), meta=json.loads(str(data["meta_json"])))

    def __repr__(self) -> str:
        x = "None" if self.X is None else f"array{self.X.shape}"
        return (f"Features(n={self.n}, m={self.m}, n_classes={self.n_classes}, layers={len(self.layers)}, "
                f"X={x})")
