"""From the μ-lasso weights W to relevant features, their responses and their ablation.

Every non-zero entry W[k, j] marks the feature k — a (layer, channel) pair, described by the
column metadata of :class:`vxnb.features.Features` — as relevant for class j (Sec. 3.1). At
test time the response of the features to an image with (predicted) class ĵ is
``r = w_ĵ ∘ x`` (Sec. 3.2); the top-k features by response are the ones visualised.
:func:`ablate` zeroes features inside the network to measure their importance (Sec. 4.1).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ._checks import check_class, check_positive_int
from .features import COLUMN_NAMES
from .utils import ForwardHooks, check_layer_names, describe, get_module

__all__ = [
    "Relevance",
    "relevant_features",
    "feature_counts",
    "FeatureCounts",
    "rank_features",
    "responses",
    "top_features",
    "ablate",
    "Ablator",
    "feature_pairs",
]

_META = COLUMN_NAMES  # the column metadata of vxnb.features.Features


# ============================================================================ checks
def _as_matrix(W: Any, arg: str = "W") -> np.ndarray:
    if isinstance(W, torch.Tensor):
        W = W.detach().cpu().numpy()
    if not isinstance(W, np.ndarray):
        raise TypeError(f"{arg}: expected a (m, C) numpy array or torch tensor, got {describe(W)}")
    if W.ndim != 2:
        raise ValueError(f"{arg}: expected shape (m, C) (one column per class), got shape {W.shape}")
    if not np.issubdtype(W.dtype, np.number) or np.issubdtype(W.dtype, np.complexfloating):
        raise TypeError(f"{arg}: expected real numbers, got dtype {W.dtype}")
    W = W.astype(np.float64, copy=False)
    if not np.isfinite(W).all():
        raise ValueError(f"{arg}: contains NaN or inf")
    return W


def _check_columns(columns: Any, m: int | None = None, arg: str = "columns") -> pd.DataFrame:
    if not isinstance(columns, pd.DataFrame):
        raise TypeError(f"{arg}: expected the column metadata DataFrame ({', '.join(_META)}) of the features, "
                        f"got {describe(columns)}")
    missing = [c for c in _META if c not in columns.columns]
    if missing:
        raise ValueError(f"{arg}: missing column(s) {missing}; expected {list(_META)} (Features.columns)")
    if m is not None and len(columns) != m:
        raise ValueError(f"{arg}: {len(columns)} rows, but W has m = {m} rows (one per feature); "
                         "use the columns of the Features W was learnt on")
    return columns


def _class_names(classes: Any, C: int) -> list[str]:
    if classes is None:
        return [str(j) for j in range(C)]
    if isinstance(classes, str) or not isinstance(classes, Iterable):
        raise TypeError(f"classes: expected a list of {C} class names, got {describe(classes)}")
    names = [str(c) for c in classes]
    if len(names) != C:
        raise ValueError(f"classes: expected {C} names (one per column of W), got {len(names)}")
    return names


# ============================================================================ relevant features
def relevant_features(W: Any, columns: pd.DataFrame, classes: Sequence[str] | None = None,
                      tol: float = 0.0) -> pd.DataFrame:
    """The relevant features of every class: the entries of W with ``|w| > tol``.

    W: (m, C) weights (numpy or torch), columns: the m rows of column metadata
    (``Features.columns``), classes: C class names (default "0", "1", …).

    Returns a DataFrame with one row per (class, relevant feature): ``class, class_name,
    feature, layer, layer_number, kind, channel, weight``, classes in order and, within a
    class, by weight (descending; ties by feature index).
    """
    W = _as_matrix(W)
    m, C = W.shape
    columns = _check_columns(columns, m)
    names = _class_names(classes, C)
    if not isinstance(tol, (int, float, np.integer, np.floating)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol: expected a number ≥ 0, got {tol!r}")
    rows, cls = np.nonzero(np.abs(W) > tol)
    out = pd.DataFrame({"class": cls.astype(np.int64),
                        "class_name": pd.Series([names[j] for j in cls], dtype=object)})
    meta = columns.iloc[rows].reset_index(drop=True)
    for c in _META:
        out[c] = meta[c].to_numpy()
    out["weight"] = W[rows, cls]
    out = out.sort_values(["class", "weight", "feature"], ascending=[True, False, True], kind="mergesort")
    out = out.reset_index(drop=True)
    out["feature"] = out["feature"].astype(np.int64)
    out["channel"] = out["channel"].astype(np.int64)
    out["layer_number"] = out["layer_number"].astype(np.int64)
    return out[["class", "class_name", *_META, "weight"]]


def _check_relevant(relevant: Any, arg: str = "relevant") -> pd.DataFrame:
    if not isinstance(relevant, pd.DataFrame):
        raise TypeError(f"{arg}: expected the DataFrame of relevant_features, got {describe(relevant)}")
    need = ["class", "layer", "layer_number", "kind", "channel", "weight"]
    missing = [c for c in need if c not in relevant.columns]
    if missing:
        raise ValueError(f"{arg}: missing column(s) {missing}; expected the output of relevant_features")
    return relevant


@dataclass
class FeatureCounts:
    """Counts of relevant features (see :func:`feature_counts`).

    distinct: distinct (layer, channel) pairs over all classes (the number the paper reports,
        e.g. 92 | 101 for All | OnlyConv on MNIST at μ = 10).
    total: (class, feature) pairs, i.e. the number of non-zero weights.
    by_class: per class: ``class, class_name, n`` and ``n_conv, n_fc, n_other``.
    by_layer: per layer (in layer order): ``layer, layer_number, kind, distinct, total``.
    by_kind: per kind: ``kind, distinct, total``.
    """

    distinct: int
    total: int
    by_class: pd.DataFrame
    by_layer: pd.DataFrame
    by_kind: pd.DataFrame

    def __repr__(self) -> str:
        kinds = ", ".join(f"{k}={int(d)}" for k, d in zip(self.by_kind["kind"], self.by_kind["distinct"]))
        return (f"FeatureCounts(distinct={self.distinct}, total={self.total}, classes={len(self.by_class)}, "
                f"layers={len(self.by_layer)}, distinct by kind: {kinds})")


def feature_counts(relevant: pd.DataFrame) -> FeatureCounts:
    """Counts per class, layer and kind, and the union over classes, of :func:`relevant_features`."""
    rel = _check_relevant(relevant)
    pairs = rel[["layer", "channel"]].drop_duplicates()
    if "class_name" not in rel.columns:
        rel = rel.assign(class_name=rel["class"].astype(str))
    by_class = rel.groupby(["class", "class_name"], sort=True).size().rename("n").reset_index()
    kinds = rel.pivot_table(index="class", columns="kind", values="channel", aggfunc="size", fill_value=0)
    for k in ("conv", "fc", "other"):
        by_class[f"n_{k}"] = by_class["class"].map(kinds[k] if k in kinds.columns else {}).fillna(0).astype(np.int64)
    layer_meta = rel.groupby("layer", sort=False).agg(layer_number=("layer_number", "first"), kind=("kind", "first"))
    by_layer = layer_meta.assign(
        distinct=rel.drop_duplicates(["layer", "channel"]).groupby("layer").size(),
        total=rel.groupby("layer").size(),
    ).reset_index()
    by_layer = by_layer.sort_values(["layer_number", "layer"], kind="mergesort").reset_index(drop=True)
    by_kind = pd.DataFrame({
        "distinct": rel.drop_duplicates(["layer", "channel"]).groupby("kind").size(),
        "total": rel.groupby("kind").size(),
    }).reindex(["conv", "fc", "other"]).fillna(0).astype(np.int64).rename_axis("kind").reset_index()
    return FeatureCounts(distinct=int(len(pairs)), total=int(len(rel)), by_class=by_class, by_layer=by_layer,
                         by_kind=by_kind)


def rank_features(relevant: pd.DataFrame, by: str = "max") -> pd.DataFrame:
    """The distinct (layer, channel) pairs of :func:`relevant_features`, most relevant first.

    by: ``"max"`` ranks a feature by its largest weight over the classes (a feature decisive
    for one class ranks high), ``"sum"`` by the sum of its weights over classes, ``"abs"`` by
    the sum of absolute weights. Ties by layer number, then channel.

    Returns ``rank, layer, layer_number, kind, channel, score, n_classes`` (rank from 0).
    """
    rel = _check_relevant(relevant)
    if by not in ("max", "sum", "abs"):
        raise ValueError(f"by: expected 'max', 'sum' or 'abs', got {by!r}")
    cols = ["rank", "layer", "layer_number", "kind", "channel", "score", "n_classes"]
    if rel.empty:
        return pd.DataFrame(columns=cols)
    w = rel["weight"].abs() if by == "abs" else rel["weight"]
    agg = "max" if by == "max" else "sum"
    g = rel.assign(_w=w).groupby(["layer", "channel"], sort=False)
    out = g.agg(layer_number=("layer_number", "first"), kind=("kind", "first"), score=("_w", agg),
                n_classes=("class", "nunique")).reset_index()
    out = out.sort_values(["score", "layer_number", "channel"], ascending=[False, True, True], kind="mergesort")
    out = out.reset_index(drop=True)
    out.insert(0, "rank", np.arange(len(out), dtype=np.int64))
    return out[cols]


# ============================================================================ responses
def _class_index(cls: Any, C: int, batch: int | None) -> np.ndarray | int:
    if isinstance(cls, torch.Tensor):
        cls = cls.detach().cpu().numpy()
    if isinstance(cls, (int, np.integer)) and not isinstance(cls, bool):
        if not 0 <= int(cls) < C:
            raise ValueError(f"cls: class index {int(cls)} out of range for W with {C} classes")
        return int(cls)
    arr = np.asarray(cls)
    if arr.ndim == 0 and np.issubdtype(arr.dtype, np.integer):
        return _class_index(int(arr), C, batch)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"cls: expected a class index or a (B,) integer array of class indices, got {describe(cls)}")
    if batch is None:
        raise ValueError("cls: one class per image needs x of shape (B, m)")
    if arr.shape[0] != batch:
        raise ValueError(f"cls: {arr.shape[0]} classes for {batch} images")
    if arr.size and (arr.min() < 0 or arr.max() >= C):
        raise ValueError(f"cls: class indices must be in 0..{C - 1}, got {arr.min()}..{arr.max()}")
    return arr.astype(np.int64)


def responses(W: Any, x: Any, cls: Any) -> Any:
    """r = w_cls ∘ x: the response of every feature for class ``cls``.

    W: (m, C). x: (m,) or (B, m) descriptors (numpy or torch). cls: a class index, or one per
    image ((B,) for a batch x). Returns r of the shape of x, as a numpy array for numpy x and
    as a tensor on x's device (x's float dtype) for torch x.
    """
    Wn = _as_matrix(W)
    m, C = Wn.shape
    is_torch = isinstance(x, torch.Tensor)
    if not is_torch and not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a (m,) or (B, m) numpy array or torch tensor, got {describe(x)}")
    if x.ndim not in (1, 2) or x.shape[-1] != m:
        raise ValueError(f"x: expected shape ({m},) or (B, {m}) to match W of shape {Wn.shape}, got {tuple(x.shape)}")
    batch = x.shape[0] if x.ndim == 2 else None
    j = _class_index(cls, C, batch)
    w = Wn[:, j].T if isinstance(j, np.ndarray) else Wn[:, j]           # (B, m) or (m,)
    if is_torch:
        dtype = x.dtype if torch.is_floating_point(x) else torch.float32
        return x.to(dtype) * torch.as_tensor(w, dtype=dtype, device=x.device)
    return np.asarray(x, dtype=np.float64) * w


def top_features(W: Any, x: Any, cls: Any, columns: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """The top-k features by response r = w_cls ∘ x (only features with r > 0).

    x: (m,) or (B, m); cls: a class or one per image. Returns one row per (image, rank):
    ``image`` (0 for a single x), ``rank`` (0 = strongest), ``class``, ``feature, layer,
    layer_number, kind, channel, weight, x, response``.
    """
    check_positive_int(k, "k")
    r = responses(W, x, cls)
    Wn = _as_matrix(W)
    columns = _check_columns(columns, Wn.shape[0])
    r = r.detach().cpu().double().numpy() if isinstance(r, torch.Tensor) else np.asarray(r, dtype=np.float64)
    xs = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if r.ndim == 1:
        r, xs = r[None], xs[None]
    j = _class_index(cls, Wn.shape[1], r.shape[0] if np.ndim(cls) else None)
    cls_arr = np.broadcast_to(np.asarray(j), (r.shape[0],))
    frames = []
    for b in range(r.shape[0]):
        order = np.argsort(-r[b], kind="stable")
        order = order[r[b, order] > 0][: int(k)]
        meta = columns.iloc[order].reset_index(drop=True)
        f = pd.DataFrame({"image": b, "rank": np.arange(len(order), dtype=np.int64), "class": int(cls_arr[b])})
        for c in _META:
            f[c] = meta[c].to_numpy()
        f["weight"] = Wn[order, cls_arr[b]]
        f["x"] = xs[b, order]
        f["response"] = r[b, order]
        frames.append(f)
    out = pd.concat(frames, ignore_index=True)
    for c in ("feature", "layer_number", "channel"):
        out[c] = out[c].astype(np.int64)
    return out


# ============================================================================ the Relevance container
@dataclass(eq=False)
class Relevance:
    """What the μ-lasso selected: the weights W and the meaning of their rows.

    Attributes:
        W: (m, C) float64, ``W[i, j]`` the weight of feature i for class j (non-zero =
            relevant; the output of ``vxnb.lasso``).
        columns: m rows of feature metadata ``feature, layer, layer_number, kind, channel``
            (``Features.columns``; a subset of the layers/channels is fine: positions in the
            descriptor are found by (layer, channel), not by row number).
        classes: C class names (default ``"0"``, ``"1"``, …).
        mu: the μ W was solved at (informative; None if unknown).

    Build it with :meth:`from_path` (a ``LassoPath`` and the ``Features`` it was fitted on),
    :meth:`from_frame` (the DataFrame of ``vxnb.relevance.relevant_features``) or directly.
    """

    W: np.ndarray
    columns: pd.DataFrame
    classes: list[str] | None = None
    mu: float | None = None

    def __post_init__(self) -> None:
        W = _as_matrix(self.W).copy()
        if not isinstance(self.columns, pd.DataFrame):
            raise TypeError(f"columns: expected the feature metadata DataFrame ({', '.join(_META)}), "
                            f"got {describe(self.columns)}")
        missing = [c for c in _META[1:] if c not in self.columns.columns]
        if missing:
            raise ValueError(f"columns: missing column(s) {missing}; expected {list(_META)} (Features.columns)")
        if len(self.columns) != W.shape[0]:
            raise ValueError(f"columns: {len(self.columns)} rows, but W has m = {W.shape[0]} rows (one per feature)")
        cols = self.columns.reset_index(drop=True).copy()
        if "feature" not in cols.columns:
            cols.insert(0, "feature", np.arange(len(cols), dtype=np.int64))
        if cols.duplicated(["layer", "channel"]).any():
            dup = cols[cols.duplicated(["layer", "channel"])].iloc[0]
            raise ValueError(f"columns: (layer, channel) = ({dup['layer']!r}, {dup['channel']}) appears twice")
        for c in ("feature", "layer_number", "channel"):
            cols[c] = cols[c].astype(np.int64)
        if (cols["channel"] < 0).any():
            raise ValueError("columns: channels must be >= 0")
        C = W.shape[1]
        self.classes = _class_names(self.classes, C)
        if self.mu is not None:
            self.mu = float(self.mu)
        self.W, self.columns = W, cols

    # ---- builders
    @classmethod
    def from_path(cls, path: Any, features: Any, mu: float, classes: Sequence[str] | None = None) -> "Relevance":
        """``W = path.coef(mu)`` with the columns of ``features`` (the ``vxnb.features.Features``
        the path was fitted on); class names from ``classes``, else ``features.class_names``."""
        if not callable(getattr(path, "coef", None)):
            raise TypeError(f"path: expected a vxnb.lasso.LassoPath (with .coef(mu)), got {describe(path)}")
        if not isinstance(getattr(features, "columns", None), pd.DataFrame):
            raise TypeError(f"features: expected a vxnb.features.Features (with .columns), got {describe(features)}")
        W = np.asarray(path.coef(mu))
        if W.ndim != 2 or W.shape[0] != len(features.columns):
            raise ValueError(f"features: has m = {len(features.columns)} features but the path gives W of shape "
                             f"{W.shape}; use the Features the path was fitted on")
        names = classes if classes is not None else getattr(features, "class_names", None)
        if classes is None and names is not None and len(names) != W.shape[1]:
            names = None
        return cls(W, features.columns, names, mu=float(mu))

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, n_classes: int | None = None,
                   classes: Sequence[str] | None = None, mu: float | None = None) -> "Relevance":
        """From the DataFrame of ``vxnb.relevance.relevant_features`` (``class, layer,
        layer_number, kind, channel, weight``; ``feature`` optional). W then has one row per
        distinct (layer, channel) of the frame. ``n_classes`` defaults to ``len(classes)`` or
        the largest class + 1."""
        _check_relevant(frame, "frame")
        if n_classes is None:
            if classes is not None:
                n_classes = len(classes)
            else:
                n_classes = int(frame["class"].max()) + 1 if len(frame) else 1
        n_classes = check_positive_int(n_classes, "n_classes")
        cl = frame["class"].to_numpy()
        if len(cl) and (not np.issubdtype(cl.dtype, np.integer) or cl.min() < 0 or cl.max() >= n_classes):
            raise ValueError(f"frame: 'class' must hold class indices in 0..{n_classes - 1}")
        keys = ["layer", "channel"]
        meta_cols = [c for c in _META if c in frame.columns]
        cols = frame[meta_cols].drop_duplicates(keys)
        cols = cols.sort_values(["layer_number", "layer", "channel"], kind="mergesort")
        cols = cols.reset_index(drop=True)
        if "feature" not in cols.columns:
            cols.insert(0, "feature", np.arange(len(cols), dtype=np.int64))
        row = {(l, int(c)): i for i, (l, c) in enumerate(zip(cols["layer"], cols["channel"]))}
        W = np.zeros((len(cols), int(n_classes)))
        for l, c, j, w in zip(frame["layer"], frame["channel"], frame["class"], frame["weight"]):
            W[row[(l, int(c))], int(j)] = float(w)
        return cls(W, cols[list(_META)], classes, mu=mu)

    # ---- views
    @property
    def n_classes(self) -> int:
        return int(self.W.shape[1])

    @property
    def m(self) -> int:
        return int(self.W.shape[0])

    @property
    def frame(self) -> pd.DataFrame:
        """The relevant features of every class (``vxnb.relevance.relevant_features``)."""
        return relevant_features(self.W, self.columns, self.classes)

    @property
    def pairs(self) -> list[tuple[str, int]]:
        """The relevant (layer, channel) pairs of any class, in row order of W (:func:`feature_pairs`)."""
        return feature_pairs(self.columns[(self.W != 0).any(axis=1)])

    def for_class(self, j: int) -> pd.DataFrame:
        """The relevant features of class ``j``, by weight (descending)."""
        j = check_class(j, self.n_classes, "j")
        f = self.frame
        return f[f["class"] == j].reset_index(drop=True)

    @property
    def layers(self) -> list[str]:
        """The layers holding at least one relevant feature (of any class), by layer number."""
        return _layers_of(self.columns[(self.W != 0).any(axis=1)])

    def counts(self) -> pd.DataFrame:
        """Relevant features per class: ``class, class_name, n, n_conv, n_fc, n_other``."""
        nz = self.W != 0
        kinds = self.columns["kind"].to_numpy()
        return pd.DataFrame({"class": np.arange(self.n_classes), "class_name": self.classes,
                             "n": nz.sum(0), **{f"n_{k}": nz[kinds == k].sum(0) for k in ("conv", "fc", "other")}})

    def _padded(self, C: int) -> "Relevance":
        if C == self.n_classes:
            return self
        W = np.zeros((self.m, C))
        W[:, :self.n_classes] = self.W
        return Relevance(W, self.columns, None, self.mu)

    def __repr__(self) -> str:
        nz = int((self.W != 0).sum())
        mu = f", μ={self.mu:g}" if self.mu is not None else ""
        return (f"Relevance(m={self.m}, C={self.n_classes}{mu}: {nz} relevant (class, feature) pairs "
                f"in {len(self.layers)} layer(s))")


def _layers_of(cols: pd.DataFrame) -> list[str]:
    order = cols.drop_duplicates("layer").sort_values(["layer_number", "feature"], kind="mergesort")
    return order["layer"].tolist()


# ============================================================================ ablation
def feature_pairs(features: Any, arg: str = "features") -> list[tuple[str, int]]:
    """(layer, channel) pairs from a DataFrame with ``layer, channel`` columns, a
    ``{layer: channels}`` dict or an iterable of pairs."""
    if isinstance(features, pd.DataFrame):
        missing = [c for c in ("layer", "channel") if c not in features.columns]
        if missing:
            raise ValueError(f"{arg}: the DataFrame needs columns 'layer' and 'channel', missing {missing}")
        pairs = list(zip(features["layer"].tolist(), features["channel"].tolist()))
    elif isinstance(features, Mapping):
        pairs = []
        for layer, chans in features.items():
            chans = [chans] if isinstance(chans, (int, np.integer)) else list(chans)
            pairs.extend((layer, c) for c in chans)
    elif isinstance(features, Iterable) and not isinstance(features, (str, bytes)):
        pairs = []
        for p in features:
            if not isinstance(p, (tuple, list)) or len(p) != 2:
                raise TypeError(f"{arg}: expected (layer, channel) pairs, got the item {describe(p)}")
            pairs.append((p[0], p[1]))
    else:
        raise TypeError(f"{arg}: expected a DataFrame (layer, channel), a {{layer: channels}} dict or "
                        f"(layer, channel) pairs, got {describe(features)}")
    out = []
    for layer, ch in pairs:
        if not isinstance(layer, str):
            raise TypeError(f"{arg}: layer names must be str, got {describe(layer)}")
        if isinstance(ch, bool) or not isinstance(ch, (int, np.integer)) or ch < 0:
            raise ValueError(f"{arg}: channel of layer {layer!r} must be an int ≥ 0, got {ch!r}")
        out.append((layer, int(ch)))
    return out


class Ablator(ForwardHooks):
    """Forward hooks that zero chosen channels of chosen layers; the set can be switched
    between forward passes with :meth:`set` without re-registering hooks.

    A context manager: hooks are registered on entry and removed on exit, even on error.
    ``layers`` fixes the hooked modules (default: those of the first ``features``). A channel
    ``c`` of a layer is zeroed in its output ``out[:, c]`` (conv maps: the whole map; FC outputs:
    the unit). A module run several times per forward pass is zeroed at every call.
    """

    def __init__(self, model: nn.Module, features: Any = (), layers: Sequence[str] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
        self.model = model
        pairs = feature_pairs(features)
        if layers is None:
            layers = list(dict.fromkeys(l for l, _ in pairs))
        self.layers = check_layer_names(model, layers, "layers")
        self.hooked = {n: get_module(model, n) for n in self.layers}
        self._index: dict[str, torch.Tensor] = {}
        self.set(pairs)

    def set(self, features: Any) -> "Ablator":
        """Zero these features from now on (replacing the previous set)."""
        pairs = feature_pairs(features)
        unknown = sorted({l for l, _ in pairs} - set(self.layers))
        if unknown:
            check_layer_names(self.model, unknown, "features")
            raise ValueError(f"features: layers {unknown} are not hooked by this Ablator (layers={self.layers})")
        index: dict[str, list[int]] = {}
        for layer, ch in pairs:
            index.setdefault(layer, []).append(ch)
        self._index = {l: torch.tensor(sorted(set(c)), dtype=torch.long) for l, c in index.items()}
        return self

    def _hook(self, name: str):
        def fn(module: nn.Module, inputs: Any, output: Any) -> Any:
            idx = self._index.get(name)
            if idx is None or idx.numel() == 0:
                return None
            if not isinstance(output, torch.Tensor) or output.dim() < 2:
                raise ValueError(f"features: cannot ablate channels of {name!r}: its output is {describe(output)}")
            if int(idx[-1]) >= output.shape[1]:
                raise ValueError(f"features: layer {name!r} has {output.shape[1]} channels (0..{output.shape[1] - 1}), "
                                 f"got channel {int(idx[-1])}")
            if idx.device != output.device:
                idx = idx.to(output.device)
                self._index[name] = idx
            return output.index_fill(1, idx, 0)
        return fn



@contextlib.contextmanager
def ablate(model: nn.Module, features: Any) -> Iterator[nn.Module]:
    """Zero the outputs of the given (layer, channel) features inside the block.

    features: (layer, channel) pairs, a ``{layer: channels}`` dict or a DataFrame with
    ``layer, channel`` columns (e.g. rows of :func:`relevant_features`). Conv channels are
    zeroed over their whole map, FC units individually. Hooks are removed on exit, even when
    the block raises. Yields the model::

        with ablate(model, [("relu3", 5), ("relu6", 17)]):
            logits = model(x)
    """
    with Ablator(model, features):
        yield model
