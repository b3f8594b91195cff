"""Filter-wise responses x_i (Sec. 3.1 of the paper) and the statistics the μ-lasso needs.

For each selected layer the output of every channel is reduced to one number — its L2 norm
over the spatial positions (conv maps (B, C, H, W); FC outputs (B, C) give ``|a|`` per unit) —
the layer's descriptor is L1-normalised per image (a layer whose descriptor is all zero stays
zero) and the layer descriptors are concatenated into ``x_i`` (m entries). Over a dataset of N
images that gives the matrix X (N, m); the μ-lasso ``min ‖X W − L‖²_F s.t. ‖w_j‖₁ ≤ μ`` only
needs ``G = XᵀX`` (m, m) and ``XᵀL`` (m, C), which :func:`extract_features` accumulates while
streaming, so ImageNet-size datasets never need X in memory.

Layer selection (:func:`default_layers`): the output of every convolutional and fully connected
block after its nonlinearity, i.e. the ReLU (or other activation module) that follows a
Conv/Linear, possibly after a normalisation layer (BatchNorm, GroupNorm, …) or dropout. The
classifier (the last Conv/Linear in forward order — the last Linear in every classification
network) and anything after it are excluded, as in the paper. Where no nonlinearity module
follows (a convolution whose output is summed with a skip connection first, e.g. ``conv2`` of a
torchvision ResNet ``BasicBlock``), or where the nonlinearity module is reused by several calls
(the shared ``relu`` of torchvision's ``BasicBlock``/``Bottleneck``, whose output is not
addressable by name), the hook point is the last normalisation module after the Conv/Linear
(``bn1``, ``bn2``, ``downsample.1``: in eval mode a per-channel affine map of the convolution,
and what the next layers see) or, without one, the Conv/Linear itself.

Layer numbers (``columns.layer_number``): every Conv and Linear module of the model is
numbered 1, 2, 3, … in forward order (order of first call, found with ``torch.fx``; registration
order where the model cannot be traced), the classifier included — so ``relu3`` after the third
convolution has layer number 3 and the classifier of an 8-layer network is layer 8, as the
paper numbers layers. A module that belongs to a Conv/Linear block (its normalisation, dropout
or nonlinearity) gets the block's number and kind (``"conv"`` / ``"fc"``); any other module
(pooling, a residual block such as ResNet's ``layer1.0``, …) is of kind ``"other"`` with the
number of the last Conv/Linear that ran before its output was produced (0 if none).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from . import _store
from . import distributed as _distributed
from ._graph import LayerAnalysis as _Analysis, analyse_layers as _analyse, residual_blocks
from ._gram import SyrkGram
from .utils import atomic_savez, check_layer_names, describe, eval_mode, get_device, get_module, model_device

__all__ = [
    "Features",
    "extract_features",
    "default_layers",
    "select_layers",
    "residual_blocks",
    "layer_numbers",
    "descriptors",
    "feature_columns",
    "COLUMN_NAMES",
]

#: Columns of the metadata DataFrame describing every entry of x.
COLUMN_NAMES = ("feature", "layer", "layer_number", "kind", "channel")

FORMAT_VERSION = 1

#: Rows of X gathered before one float64 update of G (a larger GEMM is cheaper per row than
#: one per batch); capped so that the buffer stays under ~64 MiB.
_GRAM_BLOCK_ROWS = 1024
_GRAM_BLOCK_BYTES = 64 * 2**20
#: G is computed in column blocks of at least this many columns, at most this many blocks.
_GRAM_MIN_SPLIT = 1536
_GRAM_MAX_SPLITS = 6
_GRAM_MIN_ROWS_SPLIT = 128
#: On the CPU, G is updated by BLAS syrk (the upper triangle only: half the flops of a GEMM).
_CPU_SYRK = True


def layer_numbers(model: nn.Module) -> pd.DataFrame:
    """One row per Conv/Linear module in forward order: ``layer_number, name, kind, hook, calls,
    classifier`` — ``hook`` is the module :func:`default_layers` picks for it (its nonlinearity,
    see the module docstring), ``classifier`` marks the last one (excluded from the defaults)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    a = _analyse(model)
    names = sorted(a.numbers, key=a.numbers.get)
    rows = [dict(layer_number=a.numbers[n], name=n, kind=a.kinds[n], hook=a.hook[n], calls=a.calls[n],
                 classifier=(n == names[-1])) for n in names]
    return pd.DataFrame(rows, columns=["layer_number", "name", "kind", "hook", "calls", "classifier"])


def default_layers(model: nn.Module, only_conv: bool = False, mode: str = "blocks") -> list[str]:
    """The layers whose outputs make up x by default, in forward order.

    ``mode="all"``: the output of every convolutional and fully connected block after its
    nonlinearity (see the module docstring for the exact rule and the ResNet case), the
    classifier (last Conv/Linear) and everything after it excluded. ``mode="blocks"`` (the
    default) is the same, except that in a residual network (:func:`residual_blocks`) each
    residual block is described by its output — after the addition and its ReLU, e.g.
    ``layer3.4`` of a ResNet-50 — instead of the blocks inside it; a network without residual
    blocks gets the same layers in both modes. ``only_conv=True`` keeps the convolutional
    blocks (and residual blocks) only (the paper's *OnlyConv* pool). A Conv/Linear module
    called more than once per forward pass (weight sharing) has no single output and is skipped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    if not isinstance(only_conv, (bool, np.bool_)):
        raise TypeError(f"only_conv: expected a bool, got {describe(only_conv)}")
    if mode not in ("blocks", "all"):
        raise ValueError(f"mode: expected 'blocks' or 'all', got {mode!r}")
    return _default_layers(_analyse(model), bool(only_conv), mode)


def _default_layers(a: _Analysis, only_conv: bool, mode: str = "blocks") -> list[str]:
    names = sorted(a.numbers, key=a.numbers.get)[:-1]  # drop the classifier
    out = []
    for n in names:
        if only_conv and a.kinds[n] != "conv":
            continue
        if a.calls[n] != 1:
            continue
        out.append(a.hook[n])
    if mode == "all" or not a.blocks:
        return out
    inside = tuple(b + "." for b in a.blocks)
    kept = [n for n in out if not n.startswith(inside)] + list(a.blocks)

    def last_call(name: str) -> int:
        hits = [i for i, t in enumerate(a.node_target) if t == name or t.startswith(name + ".")]
        return hits[-1] if hits else -1
    return sorted(kept, key=last_call)


def _glob(pattern: str) -> "re.Pattern[str]":
    """A layer pattern: ``*`` matches within one dotted name part, ``?`` one character."""
    rx = "".join("[^.]*" if c == "*" else "[^.]" if c == "?" else re.escape(c) for c in pattern)
    return re.compile(rx + r"\Z")


def select_layers(model: nn.Module, layers: Any = None, only_conv: bool = False) -> list[str]:
    """The module names a run describes: ``None`` or ``"blocks"``: :func:`default_layers`;
    ``"all"``: ``default_layers(mode="all")``; a name, a glob pattern (``"layer4.*"``: ``*``
    stays within one part of the dotted name) or a list of names and patterns (in the order
    given, each pattern's matches in registration order)."""
    if layers is None or (isinstance(layers, str) and layers in ("blocks", "all")):
        return default_layers(model, only_conv, "all" if layers == "all" else "blocks")
    items = [layers] if isinstance(layers, str) else layers
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(i, str) and i for i in items):
        raise ValueError(f"layers: expected 'blocks', 'all', a module name, a glob pattern or a list of them, "
                         f"got {layers!r}")
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for item in items:
        if any(c in item for c in "*?"):
            rx = _glob(item)
            hits = [n for n in names if rx.match(n)]
            if not hits:
                raise ValueError(f"layers: the pattern {item!r} matches no module; the model has e.g. "
                                 f"{', '.join(names[:20])}")
            out += [h for h in hits if h not in out]
        elif item not in out:
            out.append(item)
    return check_layer_names(model, out)


def _layer_meta(model: nn.Module, layers: Sequence[str], a: _Analysis | None = None) -> dict[str, tuple[str, int]]:
    """(kind, layer_number) for each named module (see the module docstring)."""
    a = a if a is not None else _analyse(model)
    order_conv: list[tuple[int, int]] = []  # (call position, number) of conv/linear calls
    for i, t in enumerate(a.node_target):
        if t in a.numbers:
            order_conv.append((i, a.numbers[t]))
    meta: dict[str, tuple[str, int]] = {}
    for name in layers:
        if name in a.numbers:
            meta[name] = (a.kinds[name], a.numbers[name])
            continue
        prefix = name + "."
        positions = [i for i, t in enumerate(a.node_target) if t == name or t.startswith(prefix)]
        if not positions:  # not reached by the trace (or no leaf inside): place by registration
            meta[name] = ("other", 0)
            continue
        last = positions[-1]
        owner = a.node_member[last]
        if owner is not None and owner in a.numbers:
            meta[name] = (a.kinds[owner], a.numbers[owner])
            continue
        before = [num for i, num in order_conv if i <= last]
        meta[name] = ("conv" if name in a.blocks else "other", before[-1] if before else 0)
    return meta


def feature_columns(model: nn.Module, layers: Sequence[str], widths: Sequence[int],
                    _analysis: _Analysis | None = None) -> pd.DataFrame:
    """The column metadata of x for ``layers`` with ``widths`` channels each:
    ``feature, layer, layer_number, kind, channel`` (one row per entry of x)."""
    layers = check_layer_names(model, layers)
    if len(widths) != len(layers):
        raise ValueError(f"widths: expected one channel count per layer ({len(layers)}), got {len(widths)}")
    meta = _layer_meta(model, layers, _analysis)
    parts = []
    for name, w in zip(layers, widths):
        kind, num = meta[name]
        parts.append(pd.DataFrame({"layer": name, "layer_number": num, "kind": kind,
                                   "channel": np.arange(int(w), dtype=np.int64)}))
    cols = pd.concat(parts, ignore_index=True)
    cols.insert(0, "feature", np.arange(len(cols), dtype=np.int64))
    cols["layer_number"] = cols["layer_number"].astype(np.int64)
    return cols


# ============================================================================ descriptors
def _channel_norms(out: Any, name: str) -> torch.Tensor:
    """(B, C) float32: L2 norm of every channel over all positions; |a| for (B, C) outputs."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"layers: module {name!r} returns {describe(out)}, not a tensor; "
                        "choose a module whose output is a single (B, C, ...) tensor")
    if out.dim() < 2:
        raise ValueError(f"layers: module {name!r} has an output of shape {tuple(out.shape)}; "
                         "expected (B, C) or (B, C, H, W)")
    out = out.detach()
    if out.dim() == 2:
        return out.abs().float()
    return torch.linalg.vector_norm(out, ord=2, dim=tuple(range(2, out.dim())), dtype=torch.float32)


def _column_layers(widths: Sequence[int], device: torch.device) -> torch.Tensor:
    """(m,) LongTensor: the index of the layer of every entry of x."""
    return torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(list(widths))).to(device)


def _l1_normalise(raws: Sequence[torch.Tensor], col_layer: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw concatenated (B, m), per-layer L1-normalised (B, m), per-layer sums (B, layers)).
    Entries are ≥ 0, so the L1 norm is the sum, and a NaN or inf anywhere in a layer shows in
    its sum; a layer whose descriptor sums to 0 stays 0. A fixed number of kernels whatever
    the number of layers (``col_layer`` from :func:`_column_layers`), two of them on (B, m)."""
    raw = torch.cat(list(raws), dim=1)
    if col_layer is None:
        col_layer = _column_layers([r.shape[1] for r in raws], raw.device)
    sums = raw.new_zeros((raw.shape[0], len(raws))).index_add_(1, col_layer, raw)   # (B, layers)
    inv = torch.where(sums > 0, sums.reciprocal(), sums.new_zeros(()))
    return raw, raw * inv.index_select(1, col_layer), sums


class _Recorder:
    """Forward hooks computing each selected layer's channel norms inside the hook (so that a
    later in-place op — torchvision's ``ReLU(inplace=True)``, ResNet's ``+=`` — cannot alter
    them), optionally keeping a clone of the raw output for callbacks."""

    def __init__(self, model: nn.Module, layers: Sequence[str], keep_outputs: bool = False):
        self.layers = list(layers)
        self.modules = {n: get_module(model, n) for n in self.layers}
        self.keep_outputs = keep_outputs
        self.raw: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: Counter = Counter()
        self.handles: list[Any] = []

    def _hook(self, name: str) -> Callable:
        def fn(module: nn.Module, inputs: Any, output: Any) -> None:
            self.calls[name] += 1
            self.raw[name] = _channel_norms(output, name)
            if self.keep_outputs:
                self.outputs[name] = output.detach().clone()
        return fn

    def __enter__(self) -> "_Recorder":
        try:
            for n, m in self.modules.items():
                self.handles.append(m.register_forward_hook(self._hook(n)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def reset(self) -> None:
        self.raw.clear()
        self.outputs.clear()
        self.calls.clear()

    def collect(self, batch: int, widths: Sequence[int] | None = None) -> list[torch.Tensor]:
        missing = [n for n in self.layers if self.calls[n] == 0]
        if missing:
            raise ValueError(f"layers: module(s) {missing} did not run in the forward pass, so they have no "
                             "output to describe; choose modules the forward pass calls")
        shared = {n: self.calls[n] for n in self.layers if self.calls[n] > 1}
        if shared:
            raise ValueError(f"layers: module(s) {shared} ran more than once in one forward pass (a reused "
                             "module, e.g. the shared ReLU of torchvision's ResNet blocks), so their output is "
                             "ambiguous; choose the module before it (e.g. '...bn1') or the enclosing block")
        raws = [self.raw[n] for n in self.layers]
        for n, r in zip(self.layers, raws):
            if r.shape[0] != batch:
                raise ValueError(f"layers: module {n!r} has an output with batch size {r.shape[0]}, the input "
                                 f"has {batch}; choose modules with batch-first outputs")
        if widths is not None:
            for n, r, w in zip(self.layers, raws, widths):
                if r.shape[1] != w:
                    raise ValueError(f"layers: module {n!r} has {r.shape[1]} channels in this batch, "
                                     f"{w} in the first one")
        return raws


def _locate_bad(raw: torch.Tensor, columns: pd.DataFrame | None, layers: Sequence[str],
                widths: Sequence[int]) -> str:
    bad = torch.nonzero(~torch.isfinite(raw))[0].tolist()
    col = int(bad[1])
    if columns is not None:
        row = columns.iloc[col]
        layer, ch = row["layer"], int(row["channel"])
    else:
        edges = np.cumsum([0] + list(widths))
        li = int(np.searchsorted(edges, col, side="right") - 1)
        layer, ch = layers[li], col - int(edges[li])
    value = raw[bad[0], col].item()
    return f"layer {layer!r}, channel {ch} (image {bad[0]} of the batch: {value})"


def _check_nonfinite(raw: torch.Tensor, columns: pd.DataFrame | None, layers: Sequence[str],
                     widths: Sequence[int]) -> None:
    if not bool(torch.isfinite(raw).all()):
        raise ValueError(f"descriptor: NaN or inf in the response of {_locate_bad(raw, columns, layers, widths)}; "
                         "check the input images and the model weights")


def _check_columns(columns: Any) -> pd.DataFrame:
    if not isinstance(columns, pd.DataFrame):
        raise TypeError(f"columns: expected the column metadata DataFrame ({', '.join(COLUMN_NAMES)}), "
                        f"got {describe(columns)}")
    missing = [c for c in ("layer", "channel") if c not in columns.columns]
    if missing:
        raise ValueError(f"columns: missing column(s) {missing}; expected {list(COLUMN_NAMES)}")
    if len(columns) == 0:
        raise ValueError("columns: empty")
    return columns


def _layers_of_columns(columns: pd.DataFrame) -> tuple[list[str], list[int]]:
    layers = list(dict.fromkeys(columns["layer"].tolist()))
    widths = []
    for name in layers:
        ch = columns.loc[columns["layer"] == name, "channel"].to_numpy()
        if not np.array_equal(ch, np.arange(len(ch))):
            raise ValueError(f"columns: the channels of layer {name!r} must be 0..C-1 in order and contiguous "
                             "(columns as extract_features builds them)")
        widths.append(len(ch))
    starts = columns["layer"].ne(columns["layer"].shift()).sum()
    if starts != len(layers):
        raise ValueError("columns: each layer's rows must be contiguous")
    return layers, widths


def _resolve_layers(model: nn.Module, layers: Any, only_conv: bool, analysis: _Analysis | None = None) -> list[str]:
    if not isinstance(only_conv, (bool, np.bool_)):
        raise TypeError(f"only_conv: expected a bool, got {describe(only_conv)}")
    if layers is None:
        out = _default_layers(analysis if analysis is not None else _analyse(model), bool(only_conv))
        if not out:
            raise ValueError("layers: the model has no Conv/Linear block besides its classifier; "
                             "name the modules to describe with layers=[...]")
        return out
    if only_conv:
        raise ValueError("only_conv: applies to the default layers only; give either layers=[...] or only_conv=True")
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Iterable):
        raise TypeError(f"layers: expected a list of module names, got {describe(layers)}")
    layers = list(layers)
    if not layers:
        raise ValueError("layers: empty list; give at least one module name (or None for the defaults)")
    return check_layer_names(model, layers)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the block with the model on ``device``; move it back afterwards."""
    old = model_device(model)
    if _same_device(old, device) or next(iter(model.parameters()), None) is None:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to(old)


def resolve_device(model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        return get_device(device)
    own = model_device(model)
    return own if own.type != "cpu" else get_device(None)


def descriptors(model: nn.Module, x: torch.Tensor, layers: Sequence[str] | str | None = None,
                columns: pd.DataFrame | None = None, *, only_conv: bool = False,
                return_output: bool = False, keep_graph: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The filter-wise responses x of one batch: (B, m) float32 on the model's device.

    x: images (B, C, H, W) (moved to the model's device). layers: the modules to describe
    (default: the layers of ``columns`` when given, else :func:`default_layers`). columns: the
    metadata of a :class:`Features` — the result is then checked to have the same layers and
    channel counts, so that ``W`` learnt on it applies (``r = w_j ∘ x``). With
    ``return_output=True`` also returns the model output (logits) of the batch. The model runs
    in eval mode (restored afterwards) under ``torch.no_grad`` (``keep_graph=True``: in the
    caller's grad mode, for ``vxnb.explanations.explain``, which carries signals back through
    this forward).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor (B, C, H, W), got {describe(x)}")
    if not torch.is_floating_point(x) or x.dim() < 2:
        raise ValueError(f"x: expected a batched float tensor (B, C, H, W), got {describe(x)}")
    widths = None
    if columns is not None:
        columns = _check_columns(columns)
        col_layers, widths = _layers_of_columns(columns)
        if layers is None and not only_conv:
            layers = check_layer_names(model, col_layers, "columns")
        else:
            layers = _resolve_layers(model, layers, only_conv)
            if layers != col_layers:
                raise ValueError(f"layers: {layers} differ from the layers of columns {col_layers}")
    else:
        layers = _resolve_layers(model, layers, only_conv)
    device = model_device(model)
    with eval_mode(model), contextlib.nullcontext() if keep_graph else torch.no_grad(), _Recorder(model, layers) as rec:
        out = model(x.to(device))
        raws = rec.collect(x.shape[0], widths)
    raw, desc, _ = _l1_normalise(raws)
    _check_nonfinite(raw, columns, layers, [r.shape[1] for r in raws])
    return (desc, out) if return_output else desc


# ============================================================================ Features
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
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no features file at {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"path: {path} is not a readable features file ({err}); delete it to recompute") from err
        need = {"format_version", "G", "XtL", "labels", "index", "n_classes", "layers", "meta_json"} | \
            {f"columns_{c}" for c in COLUMN_NAMES}
        missing = sorted(need - set(data))
        if missing:
            raise ValueError(f"path: {path} lacks {missing}; not a vxnb features file")
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


# ============================================================================ data
class _IndexedFetch(Dataset):
    """Wraps a map-style dataset so that each fetch (a list of indices from a batch sampler)
    returns ``(indices, collated batch)``: the dataset indices survive any sampler."""

    def __init__(self, dataset: Any, collate_fn: Callable, auto_collation: bool):
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.auto_collation = auto_collation

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: Any) -> tuple[torch.Tensor, Any]:
        if self.auto_collation:
            idx = list(idx)
            return torch.as_tensor(idx, dtype=torch.long), self.collate_fn([self.dataset[i] for i in idx])
        return torch.as_tensor(idx, dtype=torch.long).reshape(-1), self.collate_fn(self.dataset[idx])


def _identity(x: Any) -> Any:
    return x


def as_loader(data: Any, batch_size: int, num_workers: int, pin: bool,
              arg: str = "data") -> tuple[Iterable, Any, int | None, bool]:
    """(iterable of (index, batch), dataset, expected N or None, index_known)."""
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if not isinstance(num_workers, (int, np.integer)) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int ≥ 0, got {num_workers!r}")
    if isinstance(data, DataLoader):
        ds = data.dataset
        if isinstance(ds, IterableDataset):
            return _count_index(data), ds, None, False
        sampler = data.batch_sampler if data.batch_sampler is not None else data.sampler
        auto = data.batch_sampler is not None
        kwargs: dict[str, Any] = dict(batch_size=None, sampler=sampler, num_workers=data.num_workers,
                                      collate_fn=_identity, pin_memory=data.pin_memory, timeout=data.timeout,
                                      worker_init_fn=data.worker_init_fn, generator=data.generator,
                                      multiprocessing_context=data.multiprocessing_context,
                                      persistent_workers=data.persistent_workers)
        if data.num_workers > 0:
            kwargs["prefetch_factor"] = data.prefetch_factor
        loader = DataLoader(_IndexedFetch(ds, data.collate_fn, auto), **kwargs)
        try:
            n = len(data.sampler)
        except TypeError:
            n = None
        return loader, ds, n, True
    if isinstance(data, IterableDataset):
        loader = DataLoader(data, batch_size=int(batch_size), num_workers=int(num_workers), pin_memory=pin)
        return _count_index(loader), data, None, False
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if len(data) == 0:
            raise ValueError(f"{arg}: the dataset is empty")
        from torch.utils.data import BatchSampler, SequentialSampler
        from torch.utils.data.dataloader import default_collate
        sampler = BatchSampler(SequentialSampler(range(len(data))), int(batch_size), drop_last=False)
        loader = DataLoader(_IndexedFetch(data, default_collate, True), batch_size=None, sampler=sampler,
                            num_workers=int(num_workers), collate_fn=_identity, pin_memory=pin)
        return loader, data, len(data), True
    raise TypeError(f"{arg}: expected a Dataset or DataLoader yielding (image, label[, mask]), got {describe(data)}")


class _count_index:
    """Iterable over a loader yielding (running index, batch) — for iterable datasets."""

    def __init__(self, loader: Iterable):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        start = 0
        for batch in self.loader:
            b = split_batch(batch)[0].shape[0]
            yield torch.arange(start, start + b), batch
            start += b


def split_batch(batch: Any, n_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"data: expected items (image, label) or (image, label, mask), got a batch of "
                         f"{describe(batch)}")
    images, labels = batch[0], batch[1]
    if not isinstance(images, torch.Tensor) or not torch.is_floating_point(images) or images.dim() < 2:
        raise ValueError(f"data: images must collate to a float tensor (B, C, H, W), got {describe(images)}")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool \
            or labels.shape[0] != images.shape[0]:
        raise ValueError(f"data: labels must collate to an integer tensor (B,) matching the {images.shape[0]} "
                         f"images, got {describe(labels)}")
    labels = labels.to(torch.long)
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"data: labels must be ≥ 0, got {int(labels.min())}")
    if n_classes is not None and labels.numel() and int(labels.max()) >= n_classes:
        raise ValueError(f"data: label {int(labels.max())} out of range for n_classes={n_classes}")
    return images, labels


def _dataset_classes(ds: Any) -> list[str] | None:
    classes = getattr(ds, "classes", None)
    if classes is None:
        return None
    try:
        return [str(c) for c in classes]
    except TypeError:
        return None


# ============================================================================ cache keys
def _hash_update(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (tuple, list)):
        h.update(f"L{len(obj)}".encode())
        for o in obj:
            _hash_update(h, o)
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _hash_update(h, obj[k])
    else:
        h.update(repr(obj).encode())


def _data_key(data: Any, ds: Any) -> str | None:
    h = hashlib.blake2b(digest_size=16)
    if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
        return None
    n = len(ds)
    h.update(f"{type(ds).__qualname__}:{n}".encode())
    for i in sorted({0, n // 2, n - 1}):
        _hash_update(h, ds[i])
    if isinstance(data, DataLoader):
        sampler = data.sampler
        h.update(type(sampler).__qualname__.encode())
        try:
            h.update(str(len(sampler)).encode())
        except TypeError:
            pass
        _hash_update(h, list(getattr(sampler, "indices", [])))
    return h.hexdigest()


# ============================================================================ extraction
#: gram_dtype="auto" on the CPU: float32 products when N·m² exceeds this (the rule of
#: ``vxnb.lasso.gram_statistics``: where G is a noticeable part of the work), else float64.
_AUTO_SINGLE_FLOPS = 2e9


def _auto_gram_dtype(device: torch.device, n_rows: int | None, m: int) -> torch.dtype:
    """The dtype of the products accumulating G for ``gram_dtype="auto"``.

    CUDA: float64 on datacenter GPUs of compute capability x.0 ≥ 6.0 (P100, V100, A100, H100,
    B200), where float64 GEMMs are fast, float32 elsewhere (consumer GPUs run float64 at
    1/32–1/64 of float32). CPU: float32 when N·m² > 2·10⁹ (N unknown counts as large): there
    the float64 syrk (and its float32→float64 copy) cost FlowerNet ~6 % of its forward pass
    (``benchmarks/bench_features.py --float64``); float64 below."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return torch.float64 if (minor == 0 and major >= 6) else torch.float32
    if n_rows is not None and n_rows * m * m <= _AUTO_SINGLE_FLOPS:
        return torch.float64
    return torch.float32


class _Gram:
    """Streams rows of X into G = XᵀX (float64).

    Rows are gathered in a float32 buffer and added one block at a time (a larger product
    costs less per row than one per batch). On the CPU each block is one BLAS syrk into the
    upper triangle of a Fortran-ordered G (half the flops of XᵀX), in float64, or in float32
    into a scratch matrix whose upper triangle is then added to G; the lower triangle is
    mirrored once at the end. On CUDA, where there is no syrk in torch, only the column
    blocks on and above the diagonal are multiplied (up to 6 blocks: ~40 % fewer flops than
    XᵀX) and mirrored likewise. The first block overwrites G, so G is never zero-filled.
    ``per_batch`` (the overlap thread of :func:`extract_features`): one syrk per batch and G's
    pages touched at once (zero-filled), both on that thread while the forward pass runs.
    """

    def __init__(self, m: int, device: torch.device, dtype: torch.dtype = torch.float64, batch: int = 1,
                 n_rows: int | None = None, per_batch: bool = False):
        self.m, self.dtype = m, dtype
        self.rows = max(batch, min(_GRAM_BLOCK_ROWS, max(1, _GRAM_BLOCK_BYTES // (4 * m))))
        if per_batch and device.type == "cpu" and _CPU_SYRK:
            # overlap thread: one syrk per batch, so that the products run beside the forward pass
            # (not in one block after the last batch); the pages of G are touched now, on that
            # thread, not in the first fold (after the last batch, for N < FOLD_ROWS)
            self.rows = max(1, batch)
        self.buf = torch.empty((self.rows, m), dtype=torch.float32, device=device)
        self.filled = 0
        self.started = False
        self.syrk = device.type == "cpu" and _CPU_SYRK
        self.scratch: Any = None
        if self.syrk:  # the one CPU Gram kernel (vxnb._gram), shared with vxnb.lasso
            self.kernel = SyrkGram(m, np.float64 if dtype == torch.float64 else np.float32)
            if per_batch:
                self.kernel.G.fill(0.0)
            return
        self.G = torch.empty((m, m), dtype=torch.float64, device=device)
        splits = max(1, min(_GRAM_MAX_SPLITS, m // _GRAM_MIN_SPLIT))
        if n_rows is not None and n_rows < _GRAM_MIN_ROWS_SPLIT:
            splits = 1
        self.edges = [round(i * m / splits) for i in range(splits + 1)]
        # float32 mode: each block's product goes to a reused float32 scratch, then into G
        if dtype == torch.float32:
            biggest = max((hi - lo) * (m - lo) for lo, hi in zip(self.edges[:-1], self.edges[1:]))
            self.scratch = torch.empty(biggest, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        start, n = 0, x.shape[0]
        while start < n:
            take = min(n - start, self.rows - self.filled)
            self.buf[self.filled:self.filled + take] = x[start:start + take]
            self.filled += take
            start += take
            if self.filled == self.rows:
                self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        if self.syrk:
            self._flush_syrk()
        else:
            self._flush_blocks()
        self.started = True
        self.filled = 0

    def _flush_syrk(self) -> None:
        self.kernel.add(self.buf[:self.filled].numpy())

    def _flush_blocks(self) -> None:
        b = self.buf[:self.filled]
        if self.dtype == torch.float64:
            b = b.double()
        for lo, hi in zip(self.edges[:-1], self.edges[1:]):
            out = self.G[lo:hi, lo:]
            if self.dtype == torch.float64:
                out.addmm_(b[:, lo:hi].T, b[:, lo:], beta=1.0 if self.started else 0.0)
            else:
                prod = self.scratch[: (hi - lo) * (self.m - lo)].view(hi - lo, self.m - lo)
                torch.mm(b[:, lo:hi].T, b[:, lo:], out=prod)
                out.add_(prod) if self.started else out.copy_(prod)

    def result(self) -> np.ndarray:
        """G as a float64 numpy array (symmetric)."""
        self.flush()
        if self.syrk:
            return self.kernel.result()
        if not self.started:
            return self.G.zero_().cpu().numpy()
        e = self.edges
        for i in range(len(e) - 1):
            for j in range(i + 1, len(e) - 1):
                self.G[e[j]:e[j + 1], e[i]:e[i + 1]] = self.G[e[i]:e[i + 1], e[j]:e[j + 1]].T
        return self.G.cpu().numpy()


class _Rows:
    """A growing (n, m) float32 array (preallocated when the number of rows is known)."""

    def __init__(self, m: int, capacity: int | None = None):
        self.buf = np.empty((max(1, capacity or 256), m), dtype=np.float32)
        self.n = 0

    @property
    def nbytes(self) -> int:
        return self.n * self.buf.shape[1] * 4

    def add(self, rows: np.ndarray) -> None:
        need = self.n + rows.shape[0]
        if need > self.buf.shape[0]:
            new = np.empty((max(need, 2 * self.buf.shape[0]), self.buf.shape[1]), dtype=np.float32)
            new[: self.n] = self.buf[: self.n]
            self.buf = new
        self.buf[self.n:need] = rows
        self.n = need

    def result(self) -> np.ndarray:
        return self.buf if self.n == self.buf.shape[0] else self.buf[: self.n].copy()


class _Pending:
    """One batch whose host copies may still be in flight (CUDA) — finished one batch later,
    so that the GPU keeps working while the host waits."""

    def __init__(self, raw: torch.Tensor, bad: torch.Tensor, x_host: torch.Tensor | None,
                 event: Any, labels: torch.Tensor, index: torch.Tensor):
        self.raw, self.bad, self.x_host, self.event = raw, bad, x_host, event
        self.labels, self.index = labels, index

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


def _check_extract_args(model: Any, layers: Any, only_conv: bool, keep_X: Any, max_bytes: Any, n_classes: Any,
                        gram_dtype: Any, callbacks: Any, data_key: Any
                        ) -> tuple[_Analysis, list[str], list[Callable[..., Any]]]:
    """Validate :func:`extract_features`' arguments; (model analysis, layer names, callbacks)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    analysis = _analyse(model)
    layers = _resolve_layers(model, layers, only_conv, analysis)
    if not (keep_X is True or keep_X is False or (isinstance(keep_X, str) and keep_X == "auto")):
        raise ValueError(f"keep_X: expected True, False or 'auto', got {keep_X!r}")
    if not isinstance(max_bytes, (int, np.integer)) or isinstance(max_bytes, bool) or max_bytes < 0:
        raise ValueError(f"max_bytes: expected an int ≥ 0, got {max_bytes!r}")
    if n_classes is not None and (not isinstance(n_classes, (int, np.integer)) or isinstance(n_classes, bool)
                                  or n_classes < 1):
        raise ValueError(f"n_classes: expected a positive int or None, got {n_classes!r}")
    if not (gram_dtype in (torch.float64, torch.float32) or (isinstance(gram_dtype, str) and gram_dtype == "auto")):
        raise ValueError(f"gram_dtype: expected 'auto', torch.float64 or torch.float32, got {gram_dtype!r}")
    if callable(callbacks):
        callbacks = [callbacks]
    callbacks = list(callbacks)
    for i, cb in enumerate(callbacks):
        if not callable(cb):
            raise TypeError(f"callbacks[{i}]: expected a callable cb(outputs, index), got {describe(cb)}")
    if data_key is not None and not isinstance(data_key, str):
        raise TypeError(f"data_key: expected a str, got {describe(data_key)}")
    return analysis, layers, callbacks


def _cache_key(model: nn.Module, data: Any, ds: Any, layers: list[str], cache_dir: Any, data_key: str | None,
               n_classes: int | None, gram_dtype: Any, keep_X: Any, max_bytes: int
               ) -> tuple[Path | None, dict[str, Any], str | None]:
    """(cache file, what its key hashes, the key) through :mod:`vxnb._store`; (None, {}, None)
    without a cache."""
    if cache_dir is None:
        return None, {}, None
    dkey = data_key if data_key is not None else _data_key(data, ds)
    if dkey is None:
        warnings.warn("cache_dir: an iterable dataset cannot be fingerprinted; pass data_key=... to cache it")
        return None, {}, None
    key_info = dict(model=_store.model_fingerprint(model), data=dkey, layers=list(layers), n_classes=n_classes,
                    gram_dtype=str(gram_dtype), keep_X=keep_X, max_bytes=int(max_bytes) if keep_X == "auto" else None)
    key = _store.key("features", key_info, version=FORMAT_VERSION)
    return Path(cache_dir) / f"features-{key}.npz", key_info, key


def _load_cached(path: Path, key: str) -> Features:
    f = Features.load(path)
    if f.meta.get("store_key") != key:
        raise ValueError(f"it holds the features of key {f.meta.get('store_key')}, not {key}")
    f.meta["cache_hit"] = True
    return f


def _cached_features(cache_path: Path, key: str, callbacks: list, shard: Any) -> Features | None:
    """Under a shard (``torch.distributed`` or checkpoints) every rank takes part in the pass, so
    there is no lock: rank 0 reads the file (a damaged one is removed with a warning) and the
    other ranks follow its decision. None: compute."""
    if callbacks:
        return None
    hit, cached = False, None
    if shard.rank == 0:
        hit, cached = _store.try_load(cache_path, lambda p: _load_cached(p, key), "features")
    if shard.decide(bool(hit), "sharing rank 0's cache check"):
        cached = cached if cached is not None else _load_cached(cache_path, key)
        shard.finish()
        return cached
    return None


#: overlap: batches of descriptors waiting for the accumulating thread (bounded: the forward
#: pass runs at most this many batches ahead of the G update, and their (B, m) rows are all
#: the extra memory).
_OVERLAP_DEPTH = 2
_STOP = object()


def _cpu_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _resolve_overlap(overlap: Any, device: torch.device) -> bool:
    """``overlap="auto"``: on for a CPU pass on a machine with ≥ 2 cores (the G update then runs
    beside the forward pass), off on CUDA (the device already runs asynchronously to the host;
    not measured) and on one core (the two threads would only take turns)."""
    if overlap is True or overlap is False:
        return overlap
    return device.type == "cpu" and _cpu_cores() >= 2


#: the name of the accumulating thread (tests check that none is left behind)
WORKER_NAME = "vxnb-features-accumulate"

class _Worker:
    """One thread applying ``fn(*item)`` to the items :meth:`submit` hands it, in order, through
    a bounded queue (``submit`` blocks while ``depth`` items wait).

    An exception raised by ``fn`` is kept and raised — the same exception object, with its
    message and traceback — by the next :meth:`submit` or :meth:`drain` in the caller's thread;
    the items after it are discarded. :meth:`close` (always called, also when the caller fails
    or is interrupted) drops what is still queued and joins the thread, so no thread outlives
    the pass."""

    def __init__(self, fn: Callable[..., None], depth: int = _OVERLAP_DEPTH, context: Callable[[], Any] | None = None):
        self.fn, self.context = fn, context
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self.error: BaseException | None = None
        self.cancelled = False
        self.thread = threading.Thread(target=self._loop, name=WORKER_NAME, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        with contextlib.ExitStack() as stack:
            try:
                if self.context is not None:
                    stack.enter_context(self.context())
            except BaseException as err:  # noqa: BLE001 — raised by the next submit; the loop still consumes
                self.error = err
            while True:
                item = self.queue.get()
                try:
                    if item is _STOP:
                        return
                    if self.error is None and not self.cancelled:
                        self.fn(*item)
                except BaseException as err:  # noqa: BLE001 — handed to the caller's thread
                    self.error = err
                finally:
                    self.queue.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            self.cancelled = True  # nothing after a failed item is applied
            raise err

    def submit(self, *item: Any) -> None:
        self._raise()
        self.queue.put(item)

    def drain(self) -> None:
        """Wait until every submitted item is applied; raise the first error."""
        self.queue.join()
        self._raise()

    def close(self) -> None:
        self.cancelled = True
        self.queue.put(_STOP)  # the loop keeps consuming, so this cannot block for long
        self.thread.join()


class _Stream:
    """The pass of :func:`extract_features` over the data and what it accumulates.

    Per batch: the layers' outputs → descriptors x (B, m) → G += xᵀx (:class:`_Gram`),
    S[label] += x (XᵀL), the rows of X while they fit. The first batch fixes m (:meth:`_setup`).
    On CUDA the host copies of x and of the non-finite flag are asynchronous and finished one
    batch later (:meth:`_finish`), so the device never waits for the host. On the CPU with
    ``overlap`` all of it runs on a :class:`_Worker` thread (:meth:`_accumulate`), the forward
    pass of the next batch beside it. Under
    ``torch.distributed`` / with checkpoints (``shard``, ``vxnb.distributed.Shard``) it resumes
    from the checkpointed part, checkpoints as it goes and combines the ranks' parts.
    """

    def __init__(self, model: nn.Module, layers: list[str], analysis: _Analysis, dev: torch.device,
                 n_expected: int | None, n_total: int | None, n_classes: int | None, classes: list[str] | None,
                 keep_X: Any, max_bytes: int, gram_dtype: Any, shard: Any, callbacks: list) -> None:
        self.model, self.layers, self.analysis, self.dev = model, layers, analysis, dev
        self.n_expected, self.n_classes, self.classes, self.max_bytes = n_expected, n_classes, classes, max_bytes
        self.n_total = n_total  # the whole dataset's N (n_expected: this process's shard)
        self.shard, self.callbacks = shard, callbacks
        self.gram_dtype = gram_dtype
        self.keep: bool | None = None if keep_X == "auto" else bool(keep_X)
        self.is_cuda = dev.type == "cuda"
        self.gram: _Gram | None = None
        self.gram_args: tuple = ()
        self.overlap = False
        self.S: torch.Tensor | None = None
        self.columns: pd.DataFrame | None = None
        self.widths: list[int] | None = None
        self.col_layer: torch.Tensor | None = None
        self.x_rows: _Rows | None = None
        self.label_chunks: list[np.ndarray] = []
        self.index_chunks: list[np.ndarray] = []
        if shard is not None:  # a resumed shard: its checkpointed part
            self.label_chunks, self.index_chunks = shard.restored()
            shard.restore_callbacks(callbacks)
            if shard.gram_dtype is not None and isinstance(gram_dtype, str):
                self.gram_dtype = getattr(torch, shard.gram_dtype.replace("torch.", ""))
        self.c_cap = n_classes if n_classes is not None else (len(classes) if classes is not None else 1)

    def _setup(self, raws: Sequence[torch.Tensor], bsz: int) -> None:
        """First batch: now m is known."""
        self.widths = [r.shape[1] for r in raws]
        self.columns = feature_columns(self.model, self.layers, self.widths, self.analysis)
        m = len(self.columns)
        if isinstance(self.gram_dtype, str):  # "auto": needs m, known from the first batch
            self.gram_dtype = _auto_gram_dtype(self.dev, self.n_total, m)
        self.gram_args = (m, self.dev, self.gram_dtype, bsz, self.n_expected, self.overlap)  # made by _add
        self.col_layer = _column_layers(self.widths, self.dev)
        self.S = torch.zeros((self.c_cap, m), dtype=torch.float64, device=self.dev)
        if self.keep is None and self.n_total is not None:
            self.keep = self.n_total * m * 4 <= self.max_bytes

    def _add(self, raws: Sequence[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> _Pending:
        """Accumulate one batch on the device; its host side is finished later (:meth:`_finish`)."""
        dev, S = self.dev, self.S
        raw, x, sums = _l1_normalise(raws, self.col_layer)
        bad = ~torch.isfinite(sums).all()  # (B, layers), not (B, m): a NaN or inf shows in its layer's sum
        if self.gram is None:  # here, not in _setup: on the overlap thread it allocates G beside the forward
            self.gram = _Gram(*self.gram_args)
        self.gram.add(x)
        # XᵀL: class sums
        ymax = int(labels.max())
        if ymax >= S.shape[0]:
            S = self.S = torch.cat([S, torch.zeros((ymax + 1 - S.shape[0], S.shape[1]), dtype=S.dtype, device=dev)])
        S.index_add_(0, labels.to(dev, non_blocking=True), x.double())
        # host copies (asynchronous on CUDA, finished one batch later)
        x_host = None
        event = None
        if self.keep is not False:
            if self.is_cuda:
                x_host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                x_host.copy_(x, non_blocking=True)
            else:
                x_host = x
        if self.is_cuda:
            bad_host = torch.empty((), dtype=torch.bool, pin_memory=True)
            bad_host.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            bad = bad_host
        return _Pending(raw, bad, x_host, event, labels, index)

    def _finish(self, p: _Pending) -> None:
        p.wait()
        if bool(p.bad):
            _check_nonfinite(p.raw, self.columns, self.layers, self.widths)  # raises, naming layer and channel
        self.label_chunks.append(p.labels.numpy())
        self.index_chunks.append(p.index.numpy())
        if p.x_host is not None and self.keep is not False:
            if self.x_rows is None:
                self.x_rows = _Rows(p.x_host.shape[1], self.n_expected if self.keep else None)
            self.x_rows.add(p.x_host.numpy())  # copied: the batch's tensor is freed at once
            if self.keep is None and self.x_rows.nbytes > self.max_bytes:  # auto, N unknown: give up on X
                self.keep = False
                self.x_rows = None
                warnings.warn(f"keep_X='auto': X exceeds max_bytes={self.max_bytes}; only G and XtL are kept")

    def _accumulate(self, raws: Sequence[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> None:
        """A CPU batch, whole: :meth:`_add` and :meth:`_finish` (on the overlap thread)."""
        self._finish(self._add(raws, labels, index))

    def run(self, loader: Iterable, callbacks: list, progress: bool, overlap: bool = False) -> None:
        """One pass over ``loader``: hooks on, model on the device in eval mode, all undone after.

        ``overlap`` (CPU only): everything after the hooks — descriptors, G, XᵀL, X — runs on a
        :class:`_Worker` thread while the forward pass of the next batches goes on; it is drained
        before a checkpoint is written and before G is read, and closed whatever happens."""
        total = None
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError:
            pass
        pending: _Pending | None = None
        overlap = self.overlap = overlap and not self.is_cuda
        with contextlib.ExitStack() as stack:
            stack.enter_context(on_device(self.model, self.dev))
            stack.enter_context(eval_mode(self.model))
            rec = stack.enter_context(_Recorder(self.model, self.layers, keep_outputs=bool(callbacks)))
            stack.enter_context(torch.inference_mode())
            if self.dev.type == "cpu":  # syrk runs in numpy's BLAS: as many threads as torch uses
                # (with the overlap thread: beside the forward's threads, on the cores they leave, ≥ 1)
                blas = torch.get_num_threads()
                if overlap:
                    blas = max(1, min(blas, _cpu_cores() - blas))
                stack.enter_context(threadpool_limits(limits=blas, user_api="blas"))
            worker = None
            if overlap:  # closed (queue dropped, thread joined) on any exit, the worker's errors raised
                worker = _Worker(self._accumulate, context=torch.inference_mode)
                stack.callback(worker.close)
            for index, batch in tqdm(loader, total=total, desc="features", disable=None if progress else True,
                                     leave=False):
                images, labels = split_batch(batch, self.n_classes)
                index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
                bsz = images.shape[0]
                if bsz == 0:
                    continue
                if index.shape[0] != bsz:
                    raise ValueError(f"data: {index.shape[0]} indices for a batch of {bsz} images")
                rec.reset()
                self.model(images.to(self.dev, non_blocking=True))
                raws = rec.collect(bsz, self.widths)
                if self.widths is None:
                    self._setup(raws, bsz)
                if worker is not None:
                    worker.submit(raws, labels, index)
                else:
                    added = self._add(raws, labels, index)
                for cb in callbacks:
                    cb(dict(rec.outputs), index)
                if worker is None:
                    if pending is not None:
                        self._finish(pending)
                    pending = added
                _store.fault_point("extract")
                if self.shard is not None and self.shard.due():  # a checkpoint: everything up to this batch
                    if worker is not None:
                        worker.drain()
                    if pending is not None:
                        self._finish(pending)
                    pending = None
                    self.gram.flush()
                    self.shard.save(self.gram.result(), self.S, self.label_chunks, self.index_chunks,
                                    None if self.x_rows is None else self.x_rows.result(), self.widths,
                                    self.gram_dtype, callbacks)
            if worker is not None:
                worker.drain()
            if pending is not None:
                self._finish(pending)
            if self.gram is None and self.shard is None:
                raise ValueError("data: no images (the data yielded no non-empty batch)")
            self.G = None if self.gram is None else self.gram.result()
            self.S_np = None if self.S is None else self.S.cpu().numpy()

    def features(self, only_conv: bool, index_known: bool, key_info: dict[str, Any]) -> Features:
        """The :class:`Features` of the finished pass."""
        labels_np = np.concatenate(self.label_chunks).astype(np.int64) if self.label_chunks else np.zeros(0, np.int64)
        index_np = np.concatenate(self.index_chunks).astype(np.int64) if self.index_chunks else np.zeros(0, np.int64)
        X = self.x_rows.result() if self.keep is not False and self.x_rows is not None else None
        G, S_np, widths, columns, shard = self.G, self.S_np, self.widths, self.columns, self.shard
        if shard is not None:  # the resumed part and the other ranks' parts
            G, S_np, labels_np, index_np, X, widths = shard.combine(G, S_np, labels_np, index_np, X, widths)
            shard.sync(self.callbacks)
            if columns is None:
                columns = feature_columns(self.model, self.layers, widths, self.analysis)
        C, classes = S_np.shape[0], self.classes
        if self.n_classes is None:
            C = len(classes) if classes is not None else int(labels_np.max()) + 1
            if classes is not None and int(labels_np.max()) >= C:
                raise ValueError(f"data: label {int(labels_np.max())} out of range for the dataset's {C} classes")
        XtL = np.ascontiguousarray(S_np[:C].T)
        meta = dict(layers=list(self.layers), only_conv=bool(only_conv), gram_dtype=str(self.gram_dtype),
                    index_known=index_known, device=str(self.dev), key=key_info or None, cache_hit=False,
                    world_size=1 if shard is None else shard.world)
        return Features(G=G, XtL=XtL, labels=labels_np, index=index_np, columns=columns,
                        layers=list(self.layers), n_classes=int(C), classes=classes, X=X, meta=meta)


def extract_features(model: nn.Module, data: Any, layers: Sequence[str] | str | None = None,
                     only_conv: bool = False, *, batch_size: int = 64, num_workers: int = 0,
                     device: str | torch.device | None = None, keep_X: bool | str = "auto",
                     max_bytes: int = 2**30, n_classes: int | None = None, cache_dir: str | os.PathLike | None = None,
                     data_key: str | None = None, gram_dtype: torch.dtype | str = "auto",
                     callbacks: Sequence[Callable[[dict[str, torch.Tensor], torch.Tensor], Any]] = (),
                     progress: bool = True, checkpoint_dir: str | os.PathLike | None = None,
                     checkpoint_every: int = 100, overlap: bool | str = "auto") -> Features:
    """Filter-wise responses x of every image of ``data`` and the statistics G = XᵀX, XᵀL.

    Args:
        model: the network (left as it was: hooks removed, train/eval modes restored, moved back
            to its device).
        data: a Dataset or DataLoader yielding ``(image, label[, mask])`` (labels int class ids).
            A DataLoader keeps its sampler, workers and collate function; its dataset indices are
            recovered for every row (``Features.index``).
        layers: module names to describe (any module: activations, pooling, normalisation,
            residual blocks such as ResNet's ``layer1.0``); default :func:`default_layers`.
        only_conv: with ``layers=None``, the OnlyConv pool (convolutional blocks only).
        batch_size, num_workers: for a Dataset (a DataLoader brings its own).
        device: where to run; default the model's device if it is a GPU, else CUDA when present
            (the model is moved there for the pass and back afterwards), else the CPU.
        keep_X: also return the matrix X (N, m) float32: ``"auto"`` when N·m·4 ≤ ``max_bytes``,
            True always, False never. G, XtL, labels are always returned.
        n_classes: C (default: ``len(dataset.classes)`` or the largest label + 1).
        cache_dir: reuse/store the result as ``<cache_dir>/features-<key>.npz`` through
            :mod:`vxnb._store`, the key hashing the model (class, structure and state_dict
            bytes), the data (``data_key`` if given, else its class, length, sampler and a hash
            of its first, middle and last items), the layers and the options. Written
            atomically under a file lock (a concurrent process waits and reads it); a damaged
            file is recomputed with a warning. Not read when ``callbacks`` are given (they need
            the pass); an iterable dataset without ``data_key`` is not cached.
        gram_dtype: dtype of the GEMMs accumulating G (always summed into float64):
            ``torch.float64`` (exact to float64 rounding), ``torch.float32`` (blocks of ≤ 1024
            rows multiplied in float32, then added in float64: relative error ~1e-7, twice as
            fast on CPUs, far faster on GPUs with slow float64) or ``"auto"`` (default: on the CPU
            float32 when N·m² > 2·10⁹ — where float64 products would cost a small network several
            per cent of its forward pass — else float64; float64 on datacenter GPUs, float32 on
            consumer GPUs). The choice is recorded in ``meta["gram_dtype"]``; pass
            :attr:`Features.lasso_tol` to ``vxnb.lasso`` (``runs.get_lasso_path`` does).
        callbacks: callables ``cb(outputs, index)`` called after each batch's forward pass, with
            ``outputs`` = ``{layer: tensor}`` the raw outputs of the described layers for that
            batch ((B, C, H, W) or (B, C), on the device, detached clones taken inside the hook
            so in-place ops later in the network cannot change them) and ``index`` = LongTensor
            (B,) of the batch's dataset indices. E.g. ``vxnb.interpret.TopPatches`` collects the
            top images per feature in the same pass. Keeping the clones costs the memory of
            one batch of those layers' outputs.
        progress: tqdm progress bar.
        checkpoint_dir, checkpoint_every: write this process's partial sums (and the callbacks'
            states) to ``checkpoint_dir`` every ``checkpoint_every`` batches, atomically; a
            restarted pass resumes from them (see ``vxnb.distributed``). ``data`` must then be a
            Dataset.
        overlap: on the CPU, accumulate each batch (descriptors, G, XᵀL, X) on a second thread,
            fed through a bounded queue (2 batches), while the forward pass of the next batch
            runs; torch and the BLAS syrk of ``vxnb._gram`` (called so that it releases the GIL)
            run outside the GIL, so on ≥ 2 cores the G update is hidden behind the forward pass.
            With the thread, G gets one syrk per batch (not one per ~1024 rows, which would leave
            the last block's product after the last forward pass): the same sums rounded
            differently, within the accuracy of ``gram_dtype`` (relative ~1e-7 for float32
            products, float64 rounding otherwise); XᵀL, X, labels and index are bit-identical.
            An error on the thread is raised here (the same exception), nothing is written, and
            the thread never outlives the call (also on an exception or KeyboardInterrupt in the
            forward pass). ``"auto"`` (default): on for a CPU pass when the process may use ≥ 2
            cores; off on CUDA (the device already runs the G update asynchronously to the host;
            not measured with the thread) and on one core. True / False force it (True is
            ignored on CUDA). With the thread, numpy's BLAS gets the cores torch's threads leave
            (at least 1). See ``benchmarks/bench_features.py`` for the measured effect.

    Under ``torch.distributed`` (an initialised process group, e.g. started by ``torchrun``) each
    rank streams its shard of ``data`` (a Dataset; every image counted once), the sums are
    all-reduced in float64, labels/indices/X gathered in dataset order and callbacks with
    ``sync_distributed()`` (``TopPatches``) merged: every rank returns what one process would.
    Rank 0 writes the cache; the others wait for it at a barrier. See ``vxnb.distributed``.

    Returns:
        :class:`Features`.

    Memory: G takes m²·8 bytes (m = number of channels described; e.g. ~1 GB for VGG-11 with its
    two 4096-unit FC layers).
    """
    if not (overlap is True or overlap is False or (isinstance(overlap, str) and overlap == "auto")):
        raise ValueError(f"overlap: expected True, False or 'auto', got {overlap!r}")
    analysis, layers, callbacks = _check_extract_args(model, layers, only_conv, keep_X, max_bytes, n_classes,
                                                      gram_dtype, callbacks, data_key)
    dev = resolve_device(model, device)
    # torch.distributed / checkpoints: this process's shard (None for a plain single-process pass)
    shard = _distributed.Shard.open(data, batch_size=batch_size, num_workers=num_workers, pin=dev.type == "cuda",
                                    fingerprint=lambda: {"model": _store.model_fingerprint(model),
                                                         "layers": list(layers),
                                                         "data": data_key or _data_key(data, data),
                                                         "n_classes": n_classes, "gram_dtype": str(gram_dtype),
                                                         "keep_X": keep_X},
                                    checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    progress = progress and (shard is None or shard.rank == 0)  # one progress bar, rank 0's
    loader, ds, n_expected, index_known = as_loader(data if shard is None else shard.loader, batch_size,
                                                    num_workers, pin=dev.type == "cuda")
    n_total = n_expected if shard is None else shard.n  # the whole dataset's N, for the "auto" choices
    classes = _dataset_classes(ds)
    if n_classes is not None and classes is not None and len(classes) != n_classes:
        raise ValueError(f"n_classes: {n_classes} given, but the dataset has {len(classes)} classes")
    cache_path, key_info, key = _cache_key(model, data, ds, layers, cache_dir, data_key, n_classes, gram_dtype,
                                           keep_X, max_bytes)
    if cache_path is not None and shard is None:  # one process: load or compute under the artifact's lock
        def compute() -> Features:
            f = extract_features(model, data, layers, batch_size=batch_size, num_workers=num_workers, device=device,
                                 keep_X=keep_X, max_bytes=max_bytes, n_classes=n_classes, gram_dtype=gram_dtype,
                                 callbacks=callbacks, progress=progress, overlap=overlap)  # layers resolved already
            f.meta["only_conv"] = bool(only_conv)
            return f

        def save(f: Features, tmp: Path) -> None:
            f.meta.update(key=key_info, store_key=key)
            f.save(tmp)

        feats, _ = _store.load_or_compute(cache_path, key, "features", compute, load=lambda p: _load_cached(p, key),
                                          save=save, recompute=bool(callbacks), settings=key_info,
                                          version=FORMAT_VERSION)
        return feats
    if cache_path is not None:
        cached = _cached_features(cache_path, key, callbacks, shard)
        if cached is not None:
            return cached
    stream = _Stream(model, layers, analysis, dev, n_expected, n_total, n_classes, classes, keep_X, max_bytes,
                     gram_dtype, shard, callbacks)
    stream.run(loader, callbacks, progress, _resolve_overlap(overlap, dev))
    feats = stream.features(only_conv, index_known, key_info)
    if cache_path is not None and shard.rank == 0:  # a shard's result: rank 0 writes it for all
        feats.meta["store_key"] = key
        _store.load_or_compute(cache_path, key, "features", lambda: feats, load=None, save=lambda f, tmp: f.save(tmp),
                               recompute=True, lock=False, settings=key_info, version=FORMAT_VERSION)
    if shard is not None:
        shard.finish()
    return feats
