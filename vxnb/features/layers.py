"""Which layers x describes, and the metadata of its columns.

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
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from torch import nn

from .._graph import LayerAnalysis as _Analysis, analyse_layers as _analyse
from ..utils import check_layer_names, describe
from .._checks import check_bool

__all__ = ["COLUMN_NAMES", "layer_numbers", "default_layers", "select_layers", "feature_columns",
           "default_layers_of", "resolve_layers", "check_columns", "layers_of_columns"]

#: Columns of the metadata DataFrame describing every entry of x.
COLUMN_NAMES = ("feature", "layer", "layer_number", "kind", "channel")


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
    check_bool(only_conv, "only_conv")
    if mode not in ("blocks", "all"):
        raise ValueError(f"mode: expected 'blocks' or 'all', got {mode!r}")
    return default_layers_of(_analyse(model), bool(only_conv), mode)


def default_layers_of(a: _Analysis, only_conv: bool, mode: str = "blocks") -> list[str]:
    """:func:`default_layers` from a model analysis (``vxnb._graph.analyse_layers``)."""
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


def check_columns(columns: Any) -> pd.DataFrame:
    if not isinstance(columns, pd.DataFrame):
        raise TypeError(f"columns: expected the column metadata DataFrame ({', '.join(COLUMN_NAMES)}), "
                        f"got {describe(columns)}")
    missing = [c for c in ("layer", "channel") if c not in columns.columns]
    if missing:
        raise ValueError(f"columns: missing column(s) {missing}; expected {list(COLUMN_NAMES)}")
    if len(columns) == 0:
        raise ValueError("columns: empty")
    return columns


def layers_of_columns(columns: pd.DataFrame) -> tuple[list[str], list[int]]:
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


def resolve_layers(model: nn.Module, layers: Any, only_conv: bool, analysis: _Analysis | None = None) -> list[str]:
    check_bool(only_conv, "only_conv")
    if layers is None:
        out = default_layers_of(analysis if analysis is not None else _analyse(model), bool(only_conv))
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
