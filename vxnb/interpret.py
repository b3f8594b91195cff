"""Interpretation of relevant features: receptive fields and top-k patches (the average images
built from them are in :mod:`vxnb.averages`).

Sec. 4.1 "Qualitative Analysis" (Fig. 5) and the supplementary "Visual Interpretation"
section of the paper: for every class and each of its relevant features (layer p, channel q)
take the top-100 training images by that feature's response, crop each at the receptive
field around the position of the channel's maximum, and average the crops. For comparison
the same crops of three heatmaps are averaged too: our resampled DeconvNet+GB, plain
DeconvNet+GB and the upsampled activation map (the latter only exists for convolutional
features).

The pieces, each usable on its own:

- :func:`receptive_field` / :func:`receptive_fields` — geometry of a layer's units in input
  pixels, computed from the modules' kernel / stride / padding / dilation, through residual
  blocks (torch.fx traces any module that is not a plain ``nn.Sequential``).
- :class:`TopPatches` — a callback for ``vxnb.features.extract_features(..., callbacks=[cb])``
  that keeps, in O(features × k) memory, the top-k images of each tracked feature with the
  position of the channel map's maximum; :func:`collect_top_patches` runs its own pass.
- :func:`top_patch_table` — the top patches as a table, cached as CSV.
- :func:`vxnb.averages.average_images` — the averages, as a tidy ``AverageImages`` result.

Receptive-field convention
--------------------------
Input pixel ``k`` has coordinate ``k`` (its centre). A unit at output position ``(i, j)``
depends on the input pixels with rows ``offset_h + i*stride_h ± (size_h - 1)/2`` and columns
``offset_w + j*stride_w ± (size_w - 1)/2`` (inclusive): ``size`` is the extent in pixels,
``offset`` the centre of unit (0, 0)'s field (it may be negative or half-integer), ``stride``
the distance in input pixels between neighbouring units. :meth:`ReceptiveField.box` gives
the integer box ``(top, left, bottom, right)`` (bottom/right exclusive), *not* clipped to
the image: padding makes the fields of border units stick out of it. Where branches merge
(a residual sum, a concatenation) the field is the union of the branches' fields — the
largest extent, the downsample branch included. Units after a Flatten, a Linear layer, an
adaptive pooling (unless ``input_size`` shows it is the identity) or any global reduction
see the whole image: ``size = stride = offset = None`` and ``whole_image = True``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ._graph import first_conv_in_channels
from .relevance import feature_pairs
from .utils import check_image_batch, check_layer_names, describe, eval_mode, get_module, model_device

__all__ = [
    "ReceptiveField",
    "receptive_field",
    "receptive_fields",
    "TopPatches",
    "collect_top_patches",
    "top_patch_table",
    "SCORES",
]

SCORES = ("descriptor", "norm", "max")

# ============================================================================ receptive fields


@dataclass(frozen=True)
class ReceptiveField:
    """Where the units of a layer look in the input image (see the module docstring).

    size: (height, width) extent in input pixels; None for whole-image units.
    stride: (height, width) input pixels between neighbouring units; None for whole-image units.
    offset: (row, col) centre of unit (0, 0)'s field in input pixel coordinates; None likewise.
    """

    size: tuple[int, int] | None
    stride: tuple[int, int] | None
    offset: tuple[float, float] | None

    @property
    def whole_image(self) -> bool:
        """True when every unit sees the whole image (FC layers, after Flatten / global pooling)."""
        return self.size is None

    def center(self, row: int, col: int) -> tuple[float, float]:
        """Centre (row, col) in input pixel coordinates of the field of unit (row, col)."""
        if self.whole_image:
            raise ValueError("center: this layer's units see the whole image; they have no position")
        return (self.offset[0] + row * self.stride[0], self.offset[1] + col * self.stride[1])

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Integer box (top, left, bottom, right) of unit (row, col), bottom/right exclusive.

        Not clipped to the image: border units of padded layers reach outside it.
        """
        if self.whole_image:
            raise ValueError("box: this layer's units see the whole image; use the image bounds")
        cy, cx = self.center(row, col)
        top = int(round(cy - (self.size[0] - 1) / 2))
        left = int(round(cx - (self.size[1] - 1) / 2))
        return top, left, top + self.size[0], left + self.size[1]

    def clipped_box(self, row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
        """:meth:`box` clipped to an image of ``height`` × ``width`` (the whole image for FC units)."""
        if self.whole_image:
            return 0, 0, height, width
        t, l, b, r = self.box(row, col)
        return max(t, 0), max(l, 0), min(b, height), min(r, width)


class _Whole:
    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return "WHOLE"


_WHOLE = _Whole()  # state of a tensor whose every element sees the whole image


@dataclass(frozen=True)
class _Geo:
    """Field of a spatial tensor: element i (per axis) sees input pixels [lo + i*jump, hi + i*jump]."""

    jump: tuple[int, int]
    lo: tuple[int, int]
    hi: tuple[int, int]

    def window(self, kernel, stride, padding, dilation) -> "_Geo":
        """The field after a sliding window (conv / pooling) with these per-axis parameters."""
        jump, lo, hi = [], [], []
        for a in range(2):
            j, k, s, p, d = self.jump[a], kernel[a], stride[a], padding[a], dilation[a]
            jump.append(j * s)
            lo.append(self.lo[a] - p * j)
            hi.append(self.hi[a] + (d * (k - 1) - p) * j)
        return _Geo(tuple(jump), tuple(lo), tuple(hi))

    def to_rf(self) -> ReceptiveField:
        size = tuple(h - l + 1 for l, h in zip(self.lo, self.hi))
        offset = tuple((l + h) / 2 for l, h in zip(self.lo, self.hi))
        return ReceptiveField(size=size, stride=tuple(self.jump), offset=offset)


_INPUT = _Geo((1, 1), (0, 0), (0, 0))


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _union(states: Iterable[Any], where: str) -> Any:
    """Union of the fields of the tensors merged at one operation (None = not a spatial tensor)."""
    geos = []
    for s in states:
        if s is _WHOLE:
            return _WHOLE
        if isinstance(s, _Geo):
            geos.append(s)
    if not geos:
        return None
    jumps = {g.jump for g in geos}
    if len(jumps) > 1:
        raise ValueError(f"receptive_field: {where} merges feature maps with different strides "
                         f"{sorted(jumps)} (e.g. an upsampling path); this is not supported")
    lo = tuple(min(g.lo[a] for g in geos) for a in range(2))
    hi = tuple(max(g.hi[a] for g in geos) for a in range(2))
    return _Geo(geos[0].jump, lo, hi)


# Modules that act pixel-wise (or across channels only): the field passes through.
_IDENTITY_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.BatchNorm2d, nn.GroupNorm, nn.LocalResponseNorm, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
    nn.Softmax2d,
)
# Modules whose every output element depends on every input position.
_WHOLE_MODULES: tuple[type, ...] = (nn.Flatten, nn.Linear, nn.InstanceNorm2d, nn.LayerNorm, nn.Softmax,
                                    nn.LogSoftmax)
_ADAPTIVE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)

_IDENTITY_FUNCS = {
    "add", "sub", "mul", "truediv", "div", "iadd", "isub", "imul", "itruediv", "neg", "abs", "pow",
    "add_", "sub_", "mul_", "div_", "relu", "relu_", "relu6", "leaky_relu", "gelu", "silu", "mish", "elu",
    "selu", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish", "hardsigmoid", "hardtanh", "softplus",
    "dropout", "dropout2d", "contiguous", "clone", "detach", "float", "double", "half", "to", "type_as",
    "clamp", "clamp_", "clamp_min", "clamp_max", "sqrt", "exp", "squeeze", "unsqueeze", "local_response_norm",
    "batch_norm", "cat", "concat", "chunk", "split", "getitem", "sign", "maximum", "minimum",
}
_WHOLE_FUNCS = {
    "flatten", "view", "reshape", "mean", "sum", "amax", "amin", "adaptive_avg_pool2d", "adaptive_max_pool2d",
    "linear", "matmul", "mm", "bmm", "softmax", "log_softmax", "permute", "transpose", "layer_norm",
    "instance_norm", "norm",
}
_NONSPATIAL_FUNCS = {"size", "dim", "getattr", "numel", "shape"}


def _func_name(node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _flat_nodes(obj: Any) -> list:
    import torch.fx as fx

    out: list = []
    if isinstance(obj, fx.Node):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            out.extend(_flat_nodes(o))
    elif isinstance(obj, dict):
        for o in obj.values():
            out.extend(_flat_nodes(o))
    return out


def _get_arg(node, pos: int, name: str, default: Any) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


class _Walker:
    """Propagates fields through a model, recording the field of every named module's output."""

    def __init__(self, shapes: Mapping[str, tuple] | None = None) -> None:
        self.record: dict[str, list[Any]] = {}
        self.types: dict[str, str] = {}
        self.shapes = shapes or {}

    def walk(self, module: nn.Module, name: str, inputs: list[Any]) -> Any:
        out = self._walk(module, name, inputs)
        if name:
            self.record.setdefault(name, []).append(out)
            self.types[name] = type(module).__name__
        return out

    def _walk(self, module: nn.Module, name: str, inputs: list[Any]) -> Any:
        where = f"module {name or '<model>'!r} ({type(module).__name__})"
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            state = _union(inputs, where)
            if not isinstance(state, _Geo):
                return state
            k = _pair(module.kernel_size)
            s = _pair(module.stride if module.stride is not None else module.kernel_size)
            d = _pair(getattr(module, "dilation", 1))
            pad = module.padding
            if isinstance(module, nn.Conv2d):
                if module.padding_mode == "circular":
                    raise ValueError(f"receptive_field: {where} uses circular padding, which wraps the field "
                                     "around the image; not supported")
                if pad == "valid":
                    pad = 0
                elif pad == "same":
                    pad = tuple((d[a] * (k[a] - 1)) // 2 for a in range(2))
            return state.window(k, s, _pair(pad), d)
        if isinstance(module, _IDENTITY_MODULES):
            return _union(inputs, where)
        if isinstance(module, _WHOLE_MODULES):
            return _WHOLE if _union(inputs, where) is not None else None
        if isinstance(module, _ADAPTIVE):
            state = _union(inputs, where)
            shp = self.shapes.get(name)
            if state is not None and shp is not None and shp[0] == shp[1]:
                return state  # adaptive pooling to the size it already has: the identity
            return _WHOLE if state is not None else None
        if isinstance(module, nn.Sequential):
            states = inputs
            out = _union(inputs, where)
            for child_name, child in module.named_children():
                out = self.walk(child, f"{name}.{child_name}" if name else child_name, states)
                states = [out]
            return out
        if isinstance(module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                               nn.MaxPool1d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool3d, nn.Upsample,
                               nn.MaxUnpool2d, nn.PixelShuffle, nn.Fold, nn.Unfold, nn.LPPool2d,
                               nn.FractionalMaxPool2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
                               nn.ReplicationPad2d)):
            raise ValueError(f"receptive_field: {where} is not supported (supported: Conv2d, MaxPool2d, "
                             "AvgPool2d, pixel-wise layers, Linear/Flatten/adaptive pooling, residual sums)")
        return self._trace(module, name, inputs, where)

    def _trace(self, module: nn.Module, name: str, inputs: list[Any], where: str) -> Any:
        import torch.fx as fx

        class _OneLevel(fx.Tracer):
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # every called child is a leaf
                return True

        try:
            graph = _OneLevel().trace(module)
        except Exception as err:  # noqa: BLE001 - any tracing failure becomes a clear error
            raise ValueError(f"receptive_field: cannot trace {where} with torch.fx ({type(err).__name__}: "
                             f"{err}); write it as an nn.Sequential or use supported operations") from err
        env: dict = {}
        n_placeholder = 0
        for node in graph.nodes:
            if node.op == "placeholder":
                env[node] = inputs[n_placeholder] if n_placeholder < len(inputs) else None
                n_placeholder += 1
            elif node.op == "get_attr":
                env[node] = None
            elif node.op == "call_module":
                child = module.get_submodule(node.target)
                args = [env[n] for n in _flat_nodes((node.args, node.kwargs))]
                env[node] = self.walk(child, f"{name}.{node.target}" if name else str(node.target), args)
            elif node.op in ("call_function", "call_method"):
                env[node] = self._function(node, env, where)
            elif node.op == "output":
                return _union([env[n] for n in _flat_nodes(node.args)], where)
        return None

    def _function(self, node, env: dict, where: str) -> Any:
        fname = _func_name(node)
        states = [env[n] for n in _flat_nodes((node.args, node.kwargs))]
        here = f"{fname!r} in {where}"
        if fname in _NONSPATIAL_FUNCS:
            return None
        if fname in ("max_pool2d", "avg_pool2d", "max_pool2d_with_indices"):
            state = _union(states[:1], here)
            if not isinstance(state, _Geo):
                return state
            k = _get_arg(node, 1, "kernel_size", None)
            s = _get_arg(node, 2, "stride", None) or k
            p = _get_arg(node, 3, "padding", 0)
            d = _get_arg(node, 4, "dilation", 1) if fname != "avg_pool2d" else 1
            return state.window(_pair(k), _pair(s), _pair(p), _pair(d))
        if fname in ("cat", "concat"):
            dim = _get_arg(node, 1, "dim", 0)
            if dim in (2, 3, -1, -2):
                raise ValueError(f"receptive_field: {here} concatenates along a spatial dimension; not supported")
        if fname == "getitem" and len(node.args) > 1 and isinstance(node.args[1], tuple):
            idx = node.args[1]
            if any(not (isinstance(i, slice) and i == slice(None)) for i in idx[2:]):
                raise ValueError(f"receptive_field: {here} slices a spatial dimension; not supported")
        if fname in _IDENTITY_FUNCS:
            return _union(states, here)
        if fname in _WHOLE_FUNCS:
            return _WHOLE if _union(states, here) is not None else None
        if all(s is None for s in states):
            return None  # arithmetic on shapes / constants
        raise ValueError(f"receptive_field: unsupported operation {here}; supported are sliding windows "
                         "(conv2d, max/avg pooling), pixel-wise functions, sums and channel concatenation, "
                         "and global operations (flatten, linear, adaptive pooling)")


def _input_channels(model: nn.Module) -> int:
    c = first_conv_in_channels(model)
    if c is not None:
        return c
    raise ValueError("input_size: give (C, H, W); the model has no Conv2d to read C from")


def _module_shapes(model: nn.Module, input_size: Any) -> dict[str, tuple]:
    """Spatial (input, output) sizes of every module on a zero image of ``input_size``."""
    if isinstance(input_size, (int, np.integer)) and not isinstance(input_size, bool):
        input_size = (input_size, input_size)
    if isinstance(input_size, torch.Size):
        input_size = tuple(input_size)
    if (not isinstance(input_size, (tuple, list)) or len(input_size) not in (2, 3)
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in input_size)):
        raise ValueError(f"input_size: expected an int S, (H, W) or (C, H, W) of positive ints, got {input_size!r}")
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) == 2:
        input_size = (_input_channels(model),) + tuple(input_size)
    shapes: dict[str, tuple] = {}
    handles = []

    def hook(name):
        def fn(mod, inp, out):
            i = inp[0] if isinstance(inp, tuple) and inp else inp
            if isinstance(i, torch.Tensor) and isinstance(out, torch.Tensor):
                shapes[name] = (tuple(i.shape[2:]) if i.dim() == 4 else None,
                                tuple(out.shape[2:]) if out.dim() == 4 else None)
        return fn

    for n, m in model.named_modules():
        if n:
            handles.append(m.register_forward_hook(hook(n)))
    try:
        p = next(iter(model.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        with eval_mode(model), torch.no_grad():
            model(torch.zeros((1,) + tuple(input_size), device=dev, dtype=dtype))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"input_size: the model does not run on an input of size {tuple(input_size)} "
                         f"({type(err).__name__}: {err})") from err
    finally:
        for h in handles:
            h.remove()
    return shapes


def walk_model(model: nn.Module, input_size: Any = None) -> tuple[_Walker, dict[str, tuple]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    shapes = _module_shapes(model, input_size) if input_size is not None else {}
    walker = _Walker(shapes)
    walker.walk(model, "", [_INPUT])
    return walker, shapes


def state_to_rf(state: Any, layer: str) -> ReceptiveField:
    if state is _WHOLE:
        return ReceptiveField(None, None, None)
    if isinstance(state, _Geo):
        return state.to_rf()
    raise ValueError(f"layer: module {layer!r} does not output a feature map of the input image")


def receptive_field(model: nn.Module, layer: str, input_size: Any = None) -> ReceptiveField:
    """The receptive field of the units of ``layer``'s output (see the module docstring).

    model: a CNN (``nn.Sequential`` reference models, torchvision ResNets/VGGs, or any module
        torch.fx can trace whose operations are supported).
    layer: a name from ``model.named_modules()``.
    input_size: optional S, (H, W) or (C, H, W); when given the model is run once on zeros of
        that size so adaptive pooling that does not change the map size counts as the identity
        (VGG's ``avgpool`` at 224 px). Without it adaptive pooling sees the whole image.

    A module called several times (torchvision's BasicBlock reuses ``relu``) reports the field
    of its last call — the one a forward hook keeps.
    """
    get_module(model, layer)  # clear error for a name that does not exist
    walker, _ = walk_model(model, input_size)
    if layer not in walker.record:
        raise ValueError(f"layer: module {layer!r} is not called in the model's forward pass")
    return state_to_rf(walker.record[layer][-1], layer)


def receptive_fields(model: nn.Module, input_size: Any = None) -> pd.DataFrame:
    """The receptive field of every module called in the forward pass, in call order.

    Columns: layer, type, whole_image, size_h, size_w, stride_h, stride_w, offset_h, offset_w,
    calls (how many times the module runs; the field is the last call's), and with
    ``input_size`` the output map size out_h, out_w. Whole-image rows have NaN geometry.
    """
    walker, shapes = walk_model(model, input_size)
    rows = []
    for name, states in walker.record.items():
        state = states[-1]
        if state is None:
            continue
        rf = state_to_rf(state, name)
        row = {"layer": name, "type": walker.types[name], "whole_image": rf.whole_image}
        for key, val in (("size", rf.size), ("stride", rf.stride), ("offset", rf.offset)):
            row[f"{key}_h"] = np.nan if val is None else val[0]
            row[f"{key}_w"] = np.nan if val is None else val[1]
        row["calls"] = len(states)
        if input_size is not None:
            out = shapes.get(name, (None, None))[1]
            row["out_h"], row["out_w"] = (out if out is not None else (np.nan, np.nan))
        rows.append(row)
    return pd.DataFrame(rows)


# ============================================================================ top-k patches


def _channel_scores(out: torch.Tensor, score: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel ranking scores, peak values and argmax positions of one layer output.

    out: (B, C, H, W) or (B, C). Returns scores (B, C) float64, peaks (B, C) float64 and
    positions (B, C, 2) int64 (row, col of the first maximum; -1 for (B, C) outputs).
    ``descriptor`` = the per-channel L2 norm L1-normalised over the layer's channels (the
    paper's filter-wise response, as in ``vxnb.features``); ``norm`` = the L2 norm alone;
    ``max`` = the map's maximum.
    """
    out = out.detach().to(torch.float64)
    b, c = out.shape[:2]
    if out.dim() == 4:
        flat = out.flatten(2)
        peak, arg = flat.max(dim=2)
        w = out.shape[3]
        pos = torch.stack([arg // w, arg % w], dim=-1)
        norms = flat.norm(dim=2)
    else:
        peak = out
        pos = torch.full((b, c, 2), -1, dtype=torch.long, device=out.device)
        norms = out.abs()
    if score == "max":
        scores = peak
    elif score == "norm":
        scores = norms
    else:
        total = norms.sum(dim=1, keepdim=True)
        scores = norms / torch.where(total > 0, total, torch.ones_like(total))
    return scores, peak, pos


def _parse_features(model: nn.Module, layers: Any, features: Any) -> dict[str, list[int] | None]:
    """{layer: channels (None = all)} from the TopPatches arguments."""
    if features is None:
        if layers is None:
            raise ValueError("layers/features: give the layers to track (all their channels) or the features "
                             "(a columns DataFrame, (layer, channel) pairs or {layer: channels})")
        names = check_layer_names(model, layers, "layers")
        return {n: None for n in names}
    pairs = feature_pairs(features)  # checks the form and the channels
    if not pairs:
        raise ValueError("features: no feature given")
    spec: dict[str, list[int]] = {}
    for lay, ch in pairs:
        spec.setdefault(str(lay), [])
        if ch not in spec[str(lay)]:
            spec[str(lay)].append(ch)
    check_layer_names(model, list(spec), "features")
    if layers is not None:
        allowed = set(check_layer_names(model, layers, "layers"))
        extra = sorted(set(spec) - allowed)
        if extra:
            raise ValueError(f"features: layers {extra} are not among layers={sorted(allowed)}")
    return spec


def _check_top_args(model: Any, k: Any, score: Any) -> None:
    """The arguments :class:`TopPatches` and :func:`top_patch_table` share."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")


class TopPatches:
    """Running top-k images per feature, with the position of the channel map's maximum.

    A callback for ``vxnb.features.extract_features(..., callbacks=[cb])``: each call
    ``cb(outputs, index)`` gets the raw outputs of the hooked layers for one batch
    (``{layer: (B, C, H, W) or (B, C)}``) and the dataset indices of the batch (``(B,)``).
    Memory is O(features × k) whatever the dataset size.

    model: the network (used to check layer names and for :meth:`receptive_field`).
    layers: track every channel of these layers (channel count read from the first batch).
    features: or track only these features — a columns DataFrame (layer, channel[, feature]),
        ``(layer, channel)`` pairs or ``{layer: channels}``.
    k: images kept per feature.
    score: how images are ranked — ``"descriptor"`` (default; the paper ranks images by the
        feature's response, the channel's L2 norm L1-normalised over its layer, i.e. the
        entry of x the lasso sees), ``"norm"`` (the L2 norm alone) or ``"max"`` (the map's
        maximum). The position is always the argmax of the channel map (first one in
        row-major order); ``peak`` is the map's value there. FC outputs have no position
        (row = col = -1). Ties go to the image seen first (dataset order for a sequential pass).

    After a pass: ``to_frame()`` (one row per feature and rank), ``top(layer, channel)``,
    ``n_seen_`` (images seen).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | str | None = None, features: Any = None,
                 k: int = 100, *, score: str = "descriptor") -> None:
        _check_top_args(model, k, score)
        self.model = model
        self.k = int(k)
        self.score = score
        self.spec = _parse_features(model, layers, features)
        self.layers = list(self.spec)
        self.n_seen_ = 0
        self._state: dict[str, dict[str, torch.Tensor]] = {}
        self._kind: dict[str, str] = {}

    # -- the callback ---------------------------------------------------------------------
    def __call__(self, outputs: Mapping[str, torch.Tensor], index: torch.Tensor) -> None:
        if not isinstance(outputs, Mapping):
            raise TypeError(f"outputs: expected a dict {{layer: tensor}}, got {describe(outputs)}")
        index = torch.as_tensor(index)
        if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"index: expected a 1-D integer tensor of dataset indices, got {describe(index)}")
        missing = [l for l in self.layers if l not in outputs]
        if missing:
            raise ValueError(f"outputs: tracked layers {missing} missing from the batch (got {sorted(outputs)}); "
                             "hook them in the extraction pass")
        for layer in self.layers:
            out = outputs[layer]
            if not isinstance(out, torch.Tensor) or out.dim() not in (2, 4):
                raise ValueError(f"outputs[{layer!r}]: expected a (B, C, H, W) or (B, C) tensor, got {describe(out)}")
            if out.shape[0] != index.shape[0]:
                raise ValueError(f"index: {index.shape[0]} indices for a batch of {out.shape[0]} "
                                 f"(outputs[{layer!r}] has shape {tuple(out.shape)})")
            if not torch.isfinite(out).all():
                raise ValueError(f"outputs[{layer!r}]: contains NaN or inf")
            self._update(layer, out, index)
        self.n_seen_ += int(index.shape[0])

    def _update(self, layer: str, out: torch.Tensor, index: torch.Tensor) -> None:
        scores, peak, pos = _channel_scores(out, self.score)
        n_ch = out.shape[1]
        st = self._state.get(layer)
        if st is None:
            chans = self.spec[layer]
            if chans is None:
                chans = list(range(n_ch))
            bad = [c for c in chans if c >= n_ch]
            if bad:
                raise ValueError(f"features: layer {layer!r} has {n_ch} channels (0..{n_ch - 1}); "
                                 f"channel(s) {bad} do not exist")
            f = len(chans)
            st = {
                "channels": torch.tensor(chans, dtype=torch.long),
                "score": torch.full((f, self.k), -math.inf, dtype=torch.float64),
                "peak": torch.full((f, self.k), math.nan, dtype=torch.float64),
                "index": torch.full((f, self.k), -1, dtype=torch.long),
                "pos": torch.full((f, self.k, 2), -1, dtype=torch.long),
                "n_channels": torch.tensor(n_ch),
            }
            self._state[layer] = st
            self._kind[layer] = "conv" if out.dim() == 4 else "fc"
        elif int(st["n_channels"]) != n_ch:
            raise ValueError(f"outputs[{layer!r}]: {n_ch} channels, earlier batches had {int(st['n_channels'])}")
        ch = st["channels"]
        s_new = scores[:, ch].T.cpu()                         # (F, B)
        p_new = peak[:, ch].T.cpu()
        pos_new = pos[:, ch].transpose(0, 1).cpu()            # (F, B, 2)
        i_new = index.to(torch.long).cpu().expand(len(ch), -1)
        s_all = torch.cat([st["score"], s_new], dim=1)
        order = torch.sort(s_all, dim=1, descending=True, stable=True).indices[:, : self.k]
        st["score"] = torch.gather(s_all, 1, order)
        st["peak"] = torch.gather(torch.cat([st["peak"], p_new], 1), 1, order)
        st["index"] = torch.gather(torch.cat([st["index"], i_new], 1), 1, order)
        pos_all = torch.cat([st["pos"], pos_new], 1)
        st["pos"] = torch.gather(pos_all, 1, order.unsqueeze(-1).expand(-1, -1, 2))

    # -- checkpoints and torch.distributed (used by extract_features) ---------------------
    def state_dict(self) -> dict[str, Any]:
        """What the tracker has collected (tensors, ints and strs only)."""
        return {"n_seen": self.n_seen_, "kind": dict(self._kind),
                "state": {layer: dict(st) for layer, st in self._state.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (a resumed extraction pass)."""
        self.n_seen_ = int(state["n_seen"])
        self._kind = dict(state["kind"])
        self._state = {layer: dict(st) for layer, st in state["state"].items()}

    def sync_distributed(self) -> None:
        """Merge the trackers of all ranks of the process group (each saw its shard) into the
        one a single pass over all the data gives: the same top-k, ties broken by dataset index."""
        from .distributed import all_gather_object, merge_topk

        states = all_gather_object(self.state_dict(), "gathering the top patches")
        self.n_seen_ = sum(int(s["n_seen"]) for s in states)
        for s in states:
            self._kind.update(s["kind"])
        layers = [l for l in self.layers if any(l in s["state"] for s in states)]
        self._state = {l: merge_topk([s["state"][l] for s in states if l in s["state"]], self.k) for l in layers}

    # -- results --------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self._state:
            raise RuntimeError("TopPatches: no batch seen yet; pass it as a callback to "
                               "vxnb.features.extract_features or use collect_top_patches")

    def to_frame(self) -> pd.DataFrame:
        """One row per (feature, rank): layer, channel, kind, rank, index, row, col, score, peak.

        ``index`` is the dataset index; ``row``/``col`` the argmax of the channel map (-1 for
        FC features); ``score`` the ranking score (see ``score``); ``peak`` the map's value at
        the argmax. Features seen on fewer than k images have fewer rows.
        """
        self._check_fitted()
        frames = []
        for layer in self.layers:
            st = self._state[layer]
            f, k = st["score"].shape
            valid = (st["index"] >= 0).numpy()
            frame = pd.DataFrame({
                "layer": layer,
                "channel": np.repeat(st["channels"].numpy(), k),
                "kind": self._kind[layer],
                "rank": np.tile(np.arange(k), f),
                "index": st["index"].numpy().ravel(),
                "row": st["pos"][..., 0].numpy().ravel(),
                "col": st["pos"][..., 1].numpy().ravel(),
                "score": st["score"].numpy().ravel(),
                "peak": st["peak"].numpy().ravel(),
            })
            frames.append(frame[valid.ravel()])
        return pd.concat(frames, ignore_index=True)

    def top(self, layer: str, channel: int) -> pd.DataFrame:
        """The top rows of one feature (rank order)."""
        self._check_fitted()
        if layer not in self._state:
            raise ValueError(f"layer: {layer!r} is not tracked; tracked layers: {self.layers}")
        chans = self._state[layer]["channels"].tolist()
        if channel not in chans:
            raise ValueError(f"channel: {channel!r} of layer {layer!r} is not tracked "
                             f"(layer has {int(self._state[layer]['n_channels'])} channels, tracked {len(chans)})")
        frame = self.to_frame()
        return frame[(frame["layer"] == layer) & (frame["channel"] == channel)].reset_index(drop=True)

    def receptive_field(self, layer: str, input_size: Any = None) -> ReceptiveField:
        """The receptive field of ``layer`` in this model (see :func:`receptive_field`)."""
        return receptive_field(self.model, layer, input_size)

    def __repr__(self) -> str:
        n = sum(len(s["channels"]) for s in self._state.values()) if self._state else "?"
        return f"TopPatches(layers={self.layers}, k={self.k}, score={self.score!r}, features={n}, seen={self.n_seen_})"


def as_dataset(data: Any, arg: str = "data"):
    """(dataset-like with __len__/__getitem__, loader factory) for a Dataset or an image tensor."""
    if isinstance(data, torch.Tensor):
        check_image_batch(data, arg)
        return torch.utils.data.TensorDataset(data)
    if isinstance(data, torch.utils.data.DataLoader):
        raise TypeError(f"{arg}: pass the Dataset (dataset indices are needed), not a DataLoader")
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"{arg}: expected a Dataset of (image, label[, mask]) items or an image tensor "
                        f"(N, C, H, W), got {describe(data)}")
    if len(data) == 0:
        raise ValueError(f"{arg}: the dataset is empty")
    return data


def collate_images(batch: list) -> torch.Tensor:
    imgs = [b[0] if isinstance(b, (tuple, list)) else b for b in batch]
    try:
        return torch.stack([torch.as_tensor(i) for i in imgs]).float()
    except RuntimeError as err:
        raise ValueError(f"data: images of one batch differ in size ({err}); resize them to a common size") from err


def collect_top_patches(model: nn.Module, data: Any, features: Any = None, k: int = 100, *,
                        layers: Sequence[str] | None = None, score: str = "descriptor", batch_size: int = 64,
                        num_workers: int = 0, progress: bool | None = True) -> TopPatches:
    """Run one forward pass over ``data`` and return the filled :class:`TopPatches`.

    Use it when no ``extract_features`` pass is at hand. ``data`` is a Dataset of
    ``(image, label[, mask])`` items (dataset index = position) or an image tensor
    (N, C, H, W) in [0, 1]. The model runs on the device its parameters are on, in eval mode.
    """
    from tqdm.auto import tqdm

    tracker = TopPatches(model, layers=layers, features=features, k=k, score=score)
    dataset = as_dataset(data)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate_images)
    modules = {name: get_module(model, name) for name in tracker.layers}
    captured: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, name=name: captured.__setitem__(name, out))
               for name, m in modules.items()]
    device = model_device(model)
    start = 0
    try:
        with eval_mode(model), torch.no_grad():
            for x in tqdm(loader, desc="top patches", disable=None if progress else True, leave=False):
                captured.clear()
                model(x.to(device))
                idx = torch.arange(start, start + x.shape[0])
                tracker(dict(captured), idx)
                start += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    return tracker


# ============================================================================ average images


_TOP_COLUMNS = ["layer", "channel", "kind", "rank", "index", "row", "col", "score", "peak"]


def _model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's class and state_dict (names, shapes, dtypes and bytes)."""
    import hashlib

    h = hashlib.blake2b(digest_size=12)
    h.update(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        a = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(a.shape)}:{a.dtype}".encode())
        if a.numel():
            h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _wanted_pairs(model: nn.Module, features: Any) -> list[tuple[str, int]]:
    """Distinct (layer, channel) pairs of ``features``; [] for an empty DataFrame or list."""
    if isinstance(features, pd.DataFrame) and len(features) == 0:
        missing = {"layer", "channel"} - set(features.columns)
        if missing:
            raise ValueError(f"features: the DataFrame needs columns 'layer' and 'channel', missing {sorted(missing)}")
        return []
    if isinstance(features, (list, tuple)) and len(features) == 0:
        return []
    spec = _parse_features(model, None, features)
    return [(layer, ch) for layer, chans in spec.items() for ch in chans]


def _read_top_table(file: Any) -> pd.DataFrame | None:
    """The table in ``file``, or None (with a warning) when it is not a readable top-patch table."""
    try:
        table = pd.read_csv(file, dtype={"layer": str, "kind": str})
    except Exception as err:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
        warnings.warn(f"top_patch_table: ignoring unreadable cache {file} ({type(err).__name__}: {err})")
        return None
    if list(table.columns) != _TOP_COLUMNS:
        warnings.warn(f"top_patch_table: ignoring {file}: columns {list(table.columns)}, expected {_TOP_COLUMNS}")
        return None
    return table


def top_patch_table(model: nn.Module, data: Any, features: Any, k: int = 100, *,
                    cache_dir: Any = None, data_key: str | None = None, score: str = "descriptor",
                    tracker: TopPatches | None = None, batch_size: int = 64,
                    progress: bool | None = True) -> pd.DataFrame:
    """The top-k rows (:meth:`TopPatches.to_frame`) of ``features``, collected at most once.

    model, data: as for :func:`collect_top_patches` (``data`` a Dataset; its positions are the
        indices stored in the table).
    features: the features needed — ``vxnb.relevance.relevant_features`` rows or any
        DataFrame with ``layer, channel``, ``(layer, channel)`` pairs or ``{layer: channels}``.
        An empty DataFrame / list gives an empty table.
    k, score: as for :class:`TopPatches`.
    cache_dir: keep the table as ``<cache_dir>/top_patches-<key>.csv``, the key hashing the
        model (class and state_dict bytes), the data (``data_key``, else its type and length:
        pass a ``data_key`` that names the split), ``k`` and ``score``. Features already in the
        file are read from it; only the missing ones are collected (one forward pass over
        ``data``, tracking only them) and added to the file, written atomically. A damaged
        file is ignored (with a warning) and rewritten.
    tracker: a filled :class:`TopPatches` of this model over this whole ``data`` (e.g. the one
        passed to ``vxnb.features.extract_features(..., callbacks=[tracker])`` so the top
        images come with the extraction pass); its rows (ranks < k) are added first. It must
        use the same ``score`` and a ``k`` at least this one.

    Returns the rows of the requested features, sorted by (layer, channel, rank), with columns
    layer, channel, kind, rank, index, row, col, score, peak.
    """
    import hashlib
    import json
    from pathlib import Path

    from .utils import atomic_path

    _check_top_args(model, k, score)
    if data_key is not None and not isinstance(data_key, str):
        raise TypeError(f"data_key: expected a str or None, got {describe(data_key)}")
    dataset = as_dataset(data, "data")
    wanted = _wanted_pairs(model, features)
    table = pd.DataFrame({c: pd.Series(dtype=object if c in ("layer", "kind") else np.int64) for c in _TOP_COLUMNS})
    file = None
    if cache_dir is not None:
        if not isinstance(cache_dir, (str, Path)):
            raise TypeError(f"cache_dir: expected a folder path (str or Path) or None, got {describe(cache_dir)}")
        info = {"model": _model_fingerprint(model), "data": data_key or f"{type(dataset).__name__}/{len(dataset)}",
                "k": int(k), "score": score}
        key = hashlib.blake2b(json.dumps(info, sort_keys=True).encode(), digest_size=10).hexdigest()
        file = Path(cache_dir) / f"top_patches-{key}.csv"
        if file.is_file():
            cached = _read_top_table(file)
            if cached is not None:
                table = cached
    changed = False
    if tracker is not None:
        if not isinstance(tracker, TopPatches):
            raise TypeError(f"tracker: expected a filled vxnb.interpret.TopPatches or None, got {describe(tracker)}")
        if tracker.model is not model:
            raise ValueError("tracker: it was built for another model object; pass the model it tracked")
        if tracker.score != score or tracker.k < k:
            raise ValueError(f"tracker: expected score={score!r} and k >= {k}, got score={tracker.score!r}, "
                             f"k={tracker.k}")
        if tracker.n_seen_ != len(dataset):
            raise ValueError(f"tracker: it saw {tracker.n_seen_} images, but data has {len(dataset)}; "
                             "it must have seen one whole pass over the same data")
        frame = tracker.to_frame()
        frame = frame[frame["rank"] < k]
        have = set(zip(table["layer"], table["channel"]))
        new = [p not in have for p in zip(frame["layer"], frame["channel"])]
        if any(new):
            table = pd.concat([table, frame.loc[np.array(new, dtype=bool)]], ignore_index=True)
            changed = True
    have = set(zip(table["layer"], table["channel"]))
    missing = [p for p in wanted if p not in have]
    if missing:
        found = collect_top_patches(model, dataset, missing, k=int(k), score=score, batch_size=batch_size,
                                    progress=progress)
        table = pd.concat([table, found.to_frame()], ignore_index=True)
        changed = True
    if changed and file is not None:
        with atomic_path(file) as tmp:
            table[_TOP_COLUMNS].to_csv(tmp, index=False)
    keep = set(wanted)
    out = table.loc[np.array([p in keep for p in zip(table["layer"], table["channel"])], dtype=bool)]
    out = out.sort_values(["layer", "channel", "rank"], kind="mergesort").reset_index(drop=True)
    for c in ("channel", "rank", "index", "row", "col"):
        out[c] = out[c].astype(np.int64)
    for c in ("score", "peak"):
        out[c] = out[c].astype(np.float64)
    for c in ("layer", "kind"):  # plain str objects, whether read back from CSV or fresh
        out[c] = pd.Series([str(v) for v in out[c]], index=out.index, dtype=object)
    return out[_TOP_COLUMNS]
