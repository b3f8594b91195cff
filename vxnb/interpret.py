"""Interpretation of relevant features: receptive fields, top-k patches and average images.

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
- :func:`average_images` — the averages, as a tidy :class:`AverageImages` result.

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

Average images
--------------
Images are ranked per feature by its response (default: the entry of the descriptor x the
lasso sees — the channel's L2 norm, L1-normalised over its layer, as ``vxnb.features``
computes it); the crop is centred on the argmax of the channel map. Crops that leave the
image are padded with zeros (or the image mean, ``pad="mean"``), also when the field is
larger than the whole image; every crop is resized to ``size`` × ``size`` (bilinear,
antialiased) before averaging. FC features crop the whole image, and have no upsampled
activation average (None). The heatmap averages use ``vxnb.deconv.visualize`` /
``heatmap``; without that module they raise NotImplementedError (``methods=("activation",)``
still works).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .utils import check_image_batch, check_layer_names, describe, eval_mode, get_module, model_device

__all__ = [
    "ReceptiveField",
    "receptive_field",
    "receptive_fields",
    "TopPatches",
    "collect_top_patches",
    "crop_patch",
    "AverageImage",
    "AverageImages",
    "average_images",
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
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
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


def _walk_model(model: nn.Module, input_size: Any = None) -> tuple[_Walker, dict[str, tuple]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    shapes = _module_shapes(model, input_size) if input_size is not None else {}
    walker = _Walker(shapes)
    walker.walk(model, "", [_INPUT])
    return walker, shapes


def _state_to_rf(state: Any, layer: str) -> ReceptiveField:
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
    walker, _ = _walk_model(model, input_size)
    if layer not in walker.record:
        raise ValueError(f"layer: module {layer!r} is not called in the model's forward pass")
    return _state_to_rf(walker.record[layer][-1], layer)


def receptive_fields(model: nn.Module, input_size: Any = None) -> pd.DataFrame:
    """The receptive field of every module called in the forward pass, in call order.

    Columns: layer, type, whole_image, size_h, size_w, stride_h, stride_w, offset_h, offset_w,
    calls (how many times the module runs; the field is the last call's), and with
    ``input_size`` the output map size out_h, out_w. Whole-image rows have NaN geometry.
    """
    walker, shapes = _walk_model(model, input_size)
    rows = []
    for name, states in walker.record.items():
        state = states[-1]
        if state is None:
            continue
        rf = _state_to_rf(state, name)
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
    spec: dict[str, list[int]] = {}
    if isinstance(features, pd.DataFrame):
        missing = {"layer", "channel"} - set(features.columns)
        if missing:
            raise ValueError(f"features: the DataFrame needs columns 'layer' and 'channel', missing {sorted(missing)}")
        pairs = list(zip(features["layer"], features["channel"]))
    elif isinstance(features, Mapping):
        pairs = []
        for lay, chans in features.items():
            if isinstance(chans, (int, np.integer)):
                chans = [chans]
            pairs.extend((lay, c) for c in chans)
    elif isinstance(features, Iterable) and not isinstance(features, (str, bytes)):
        pairs = list(features)
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise TypeError("features: expected a DataFrame (layer, channel), a {layer: channels} dict or "
                            f"(layer, channel) pairs, got {describe(features)}")
    else:
        raise TypeError("features: expected a DataFrame (layer, channel), a {layer: channels} dict or "
                        f"(layer, channel) pairs, got {describe(features)}")
    if not pairs:
        raise ValueError("features: no feature given")
    for lay, ch in pairs:
        if not isinstance(ch, (int, np.integer)) or isinstance(ch, bool) or ch < 0:
            raise ValueError(f"features: channel of layer {lay!r} must be a non-negative int, got {ch!r}")
        spec.setdefault(str(lay), [])
        if int(ch) not in spec[str(lay)]:
            spec[str(lay)].append(int(ch))
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


def _as_dataset(data: Any, arg: str = "data"):
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


def _collate_images(batch: list) -> torch.Tensor:
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
    dataset = _as_dataset(data)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=_collate_images)
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


def crop_patch(image: torch.Tensor, box: Sequence[int], pad: str | float = "zeros") -> torch.Tensor:
    """Crop ``box = (top, left, bottom, right)`` (exclusive) from ``image`` (C, H, W) or (H, W).

    Parts of the box outside the image are padded: ``pad="zeros"`` (default) fills 0,
    ``"mean"`` the image's per-channel mean, a float that value. The result always has the
    box's size (bottom - top, right - left), also when the box is larger than the image.
    """
    if not isinstance(image, torch.Tensor) or image.dim() not in (2, 3):
        raise ValueError(f"image: expected a (C, H, W) or (H, W) tensor, got {describe(image)}")
    if len(box) != 4 or not all(isinstance(v, (int, np.integer)) for v in box):
        raise ValueError(f"box: expected 4 ints (top, left, bottom, right), got {box!r}")
    top, left, bottom, right = (int(v) for v in box)
    if bottom <= top or right <= left:
        raise ValueError(f"box: expected bottom > top and right > left, got {tuple(box)}")
    squeeze = image.dim() == 2
    img = image.unsqueeze(0) if squeeze else image
    c, h, w = img.shape
    if pad == "zeros":
        fill = torch.zeros(c, 1, 1, dtype=img.dtype, device=img.device)
    elif pad == "mean":
        fill = img.mean(dim=(1, 2), keepdim=True)
    elif isinstance(pad, (int, float)) and not isinstance(pad, bool):
        fill = torch.full((c, 1, 1), float(pad), dtype=img.dtype, device=img.device)
    else:
        raise ValueError(f"pad: expected 'zeros', 'mean' or a number, got {pad!r}")
    out = fill.expand(c, bottom - top, right - left).clone()
    t, l, b, r = max(top, 0), max(left, 0), min(bottom, h), min(right, w)
    if b > t and r > l:
        out[:, t - top:b - top, l - left:r - left] = img[:, t:b, l:r]
    return out[0] if squeeze else out


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) → (N, C, *size), bilinear with antialiasing when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


@dataclass
class AverageImage:
    """The average crops of one (class, feature).

    image: (C, S, S) float32 average of the image crops, in [0, 1].
    ours, deconv, activation: (S, S) float32 averages of the same crops of our resampled
        DeconvNet+GB heatmaps, plain DeconvNet+GB heatmaps and upsampled activation maps
        (each map min-max normalised to [0, 1] per image before cropping), or None when not
        computed — ``activation`` is always None for FC features, which have no map.
    indices: (n,) dataset indices of the images used (rank order); boxes: (n, 4) crop boxes
        (top, left, bottom, right) in image pixels (may extend beyond the image: padded).
    """

    klass: Any
    feature: Any
    layer: str
    channel: int
    kind: str
    weight: float
    rf: ReceptiveField
    indices: np.ndarray
    boxes: np.ndarray
    image: np.ndarray
    ours: np.ndarray | None = None
    deconv: np.ndarray | None = None
    activation: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(len(self.indices))


@dataclass
class AverageImages:
    """Result of :func:`average_images`.

    items: {(class, feature): AverageImage} in class order, features in ``relevant``'s order.
    summary: one row per item (class, class_name, feature, layer, layer_number, channel, kind,
        weight, n, whole_image, rf_size_h, rf_size_w, crop_padded — the fraction of crop
        pixels that were padding).
    messages: notes such as "class 3 has no relevant feature".
    """

    items: dict = field(default_factory=dict)
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    messages: list[str] = field(default_factory=list)

    def __getitem__(self, key) -> AverageImage:
        return self.items[key]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items.values())

    def for_class(self, klass: Any) -> list[AverageImage]:
        return [v for (c, _), v in self.items.items() if c == klass]


_METHODS = ("ours", "deconv", "activation")


def _top_table(top_patches: Any) -> pd.DataFrame:
    if isinstance(top_patches, TopPatches):
        return top_patches.to_frame()
    if isinstance(top_patches, pd.DataFrame):
        need = {"layer", "channel", "rank", "index", "row", "col"}
        missing = need - set(top_patches.columns)
        if missing:
            raise ValueError(f"top_patches: the DataFrame lacks columns {sorted(missing)} "
                             "(expected TopPatches.to_frame())")
        return top_patches
    raise TypeError(f"top_patches: expected a TopPatches or its to_frame() DataFrame, got {describe(top_patches)}")


def _check_relevant(relevant: Any) -> pd.DataFrame:
    if not isinstance(relevant, pd.DataFrame):
        raise TypeError("relevant: expected the DataFrame of vxnb.relevance.relevant_features (class, feature, "
                        f"layer, layer_number, kind, channel, weight), got {describe(relevant)}")
    missing = {"class", "feature", "layer", "channel"} - set(relevant.columns)
    if missing:
        raise ValueError(f"relevant: missing columns {sorted(missing)}; expected class, feature, layer, "
                         "layer_number, kind, channel, weight")
    return relevant


def _heatmap_fn():
    """vxnb.deconv's (visualize, heatmap), or a clear NotImplementedError when it is missing."""
    try:
        from .deconv import heatmap, visualize
    except ImportError as err:
        raise NotImplementedError(
            "average_images: the heatmap averages ('ours', 'deconv') need vxnb.deconv.visualize/heatmap, "
            f"which could not be imported ({err}); pass methods=('activation',) or methods=()") from err
    return visualize, heatmap


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation of (N, H, W) to [0, 1]; constant maps become 0."""
    flat = x.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    rng = hi - lo
    return torch.where(rng > 0, (x - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(x))


def average_images(model: nn.Module, dataset: Any, top_patches: Any, relevant: pd.DataFrame, *,
                   classes: Sequence[Any] | None = None, n: int = 100, size: int = 64,
                   methods: Sequence[str] = _METHODS, pad: str | float = "zeros", batch_size: int = 50,
                   input_size: Any = None, progress: bool | None = True) -> AverageImages:
    """Average crops of the top images of each class's relevant features (paper Fig. 5).

    model: the network the features come from (run on the device its parameters are on).
    dataset: the dataset ``top_patches`` indexes (the training split in the paper): items
        ``(image, label[, mask])`` with images (C, H, W) in [0, 1] of one common size, or an
        image tensor (N, C, H, W).
    top_patches: a filled :class:`TopPatches` (or its ``to_frame()``) that tracks every
        relevant feature with k ≥ n.
    relevant: ``vxnb.relevance.relevant_features(...)`` rows (class, feature, layer,
        layer_number, kind, channel, weight).
    classes: the classes to do (values of ``relevant["class"]``, or of ``relevant["class_name"]``
        when given as strings); default every class of
        ``dataset.classes`` when ``relevant`` uses integer class ids, else every class in
        ``relevant``. A class without relevant feature gives no item and a message.
    n: images per feature (the paper: 100). size: display size S of every crop.
    methods: which heatmap averages to add next to the image average — any of "ours"
        (resampled DeconvNet+GB, ``vxnb.deconv.visualize(resample=True)``), "deconv" (plain
        DeconvNet+GB, ``resample=False``) and "activation" (the layer's channel map upsampled
        bilinearly to the image; None for FC features, which have no map).
    pad: what fills crop pixels outside the image: "zeros" (default), "mean" (the image's
        per-channel mean) or a number. Heatmaps are always padded with 0.
    input_size: the input size for :func:`receptive_field` (default: the images' size).
    batch_size: images per forward/backward pass.

    For each feature the crop is the receptive field (:func:`receptive_field`) of the unit
    at the argmax of the channel map, padded where it leaves the image (fields larger than
    the image are padded all round), then resized to S × S (bilinear, antialiased) and
    averaged. FC features see the whole image: their crops are the whole images.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    data = _as_dataset(dataset, "dataset")
    table = _top_table(top_patches)
    relevant = _check_relevant(relevant)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size: expected a positive int, got {size!r}")
    if isinstance(methods, str):
        methods = [methods]
    methods = list(methods)
    bad = [m for m in methods if m not in _METHODS]
    if bad:
        raise ValueError(f"methods: expected a subset of {_METHODS}, got {bad}")
    if pad not in ("zeros", "mean") and not (isinstance(pad, (int, float)) and not isinstance(pad, bool)):
        raise ValueError(f"pad: expected 'zeros', 'mean' or a number, got {pad!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    visualize = heatmap = None
    if "ours" in methods or "deconv" in methods:
        visualize, heatmap = _heatmap_fn()

    # -- which classes and features -------------------------------------------------------
    result = AverageImages()
    if classes is None:
        ids = relevant["class"].tolist()
        dataset_classes = getattr(dataset, "classes", None)
        if dataset_classes is None and hasattr(dataset, "dataset"):  # torch Subset
            dataset_classes = getattr(dataset.dataset, "classes", None)
        if dataset_classes is not None and all(isinstance(c, (int, np.integer)) for c in ids):
            classes = list(range(len(dataset_classes)))
        else:
            classes = list(dict.fromkeys(ids))
    elif isinstance(classes, (str, int, np.integer)):
        classes = [classes]
    classes = list(classes)
    work: list[tuple[Any, pd.Series]] = []
    for c in classes:
        rows = relevant[relevant["class"] == c]
        if rows.empty and "class_name" in relevant.columns and isinstance(c, str):
            rows = relevant[relevant["class_name"] == c]  # a class given by name
        if rows.empty:
            msg = f"class {c!r} has no relevant feature (at this μ); nothing to average"
            result.messages.append(msg)
            warnings.warn(msg, stacklevel=2)
        for _, row in rows.iterrows():
            work.append((c, row))
    if not work:
        result.summary = _summary_frame([])
        return result

    # -- check every feature before the expensive part ------------------------------------
    modules = dict(model.named_modules())
    tracked = table.groupby(["layer", "channel"], sort=False)
    groups = {key: g.sort_values("rank") for key, g in tracked}
    max_index = len(data)
    for key, g in groups.items():
        if (g["index"] >= max_index).any():
            raise ValueError(f"top_patches: image indices up to {int(g['index'].max())} for feature {key}, "
                             f"but the dataset has {max_index} items (wrong dataset?)")
    if input_size is None:  # the images' size: adaptive pooling that keeps the map size is the identity
        first = int(table["index"].iloc[0]) if len(table) else 0
        item = data[first]
        input_size = tuple(torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item).shape)
    walker, _ = _walk_model(model, input_size)
    rfs: dict[str, ReceptiveField] = {}
    for c, row in work:
        layer, ch = str(row["layer"]), row["channel"]
        if layer not in modules or layer == "":
            raise ValueError(f"relevant: feature {row['feature']!r} of class {c!r} names layer {layer!r}, which "
                             f"the model does not have; it has: {', '.join(n_ for n_ in modules if n_)}")
        if (layer, ch) not in groups:
            raise ValueError(f"relevant: feature {row['feature']!r} (layer {layer!r}, channel {ch!r}) of class {c!r} "
                             "is not tracked by top_patches (a wrong feature index, or track it: "
                             "TopPatches(model, layers=[...]) in the extraction pass)")
        if layer not in rfs:
            if layer not in walker.record:
                raise ValueError(f"relevant: layer {layer!r} is not called in the model's forward pass")
            rfs[layer] = _state_to_rf(walker.record[layer][-1], layer)

    # -- one computation per distinct feature ---------------------------------------------
    device = model_device(model)
    cache: dict[tuple[str, int], dict] = {}
    images = _ImageCache()
    distinct = list(dict.fromkeys((str(r["layer"]), int(r["channel"])) for _, r in work))
    bar = tqdm(distinct, desc="average images", disable=None if progress else True, leave=False)
    with eval_mode(model):
        for layer, ch in bar:
            top = groups[(layer, ch)].head(n)
            cache[(layer, ch)] = _average_one(model, data, layer, ch, top, rfs[layer], modules[layer], size=size,
                                              methods=methods, pad=pad, batch_size=batch_size, device=device,
                                              visualize=visualize, heatmap=heatmap, images=images)
    rows = []
    for c, row in work:
        layer, ch = str(row["layer"]), int(row["channel"])
        res = cache[(layer, ch)]
        item = AverageImage(klass=c, feature=row["feature"], layer=layer, channel=ch,
                            kind=str(row.get("kind", res["kind"])), weight=float(row.get("weight", np.nan)),
                            rf=rfs[layer], indices=res["indices"], boxes=res["boxes"], image=res["image"],
                            ours=res.get("ours"), deconv=res.get("deconv"), activation=res.get("activation"))
        result.items[(c, row["feature"])] = item
        rows.append({"class": c, "class_name": row.get("class_name", str(c)), "feature": row["feature"],
                     "layer": layer, "layer_number": row.get("layer_number", np.nan), "channel": ch, "kind": item.kind,
                     "weight": item.weight, "n": item.n, "whole_image": item.rf.whole_image,
                     "rf_size_h": np.nan if item.rf.whole_image else item.rf.size[0],
                     "rf_size_w": np.nan if item.rf.whole_image else item.rf.size[1],
                     "crop_padded": res["padded"]})
    result.summary = _summary_frame(rows)
    return result


def _summary_frame(rows: list[dict]) -> pd.DataFrame:
    cols = ["class", "class_name", "feature", "layer", "layer_number", "channel", "kind", "weight", "n",
            "whole_image", "rf_size_h", "rf_size_w", "crop_padded"]
    return pd.DataFrame(rows, columns=cols)


class _ImageCache:
    """Dataset images by index, kept up to ``budget`` bytes (features share many top images)."""

    def __init__(self, budget: int = 512 * 2**20) -> None:
        self.budget, self.used, self.store = budget, 0, {}

    def get(self, data: Any, i: int) -> torch.Tensor:
        img = self.store.get(i)
        if img is None:
            item = data[i]
            img = torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item)
            nbytes = img.numel() * img.element_size()
            if self.used + nbytes <= self.budget:
                self.store[i] = img
                self.used += nbytes
        return img


def _average_one(model, data, layer, ch, top, rf, module, *, size, methods, pad, batch_size, device,
                 visualize, heatmap, images) -> dict:
    """Averages of one feature over its top images (see :func:`average_images`)."""
    indices = top["index"].to_numpy().astype(np.int64)
    positions = top[["row", "col"]].to_numpy().astype(np.int64)
    S = (int(size), int(size))
    sums: dict[str, torch.Tensor] = {}
    boxes = []
    padded = 0.0
    total = 0.0
    kind = "fc" if rf.whole_image or (positions < 0).any() else "conv"
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        pos = positions[start:start + batch_size]
        x = _collate_images([images.get(data, int(i)) for i in idx])
        h, w = x.shape[-2:]
        bxs = []
        for (r, c) in pos:
            if rf.whole_image or r < 0:
                bxs.append((0, 0, int(h), int(w)))
            else:
                bxs.append(rf.box(int(r), int(c)))
        boxes.extend(bxs)
        for (t, l, b, rr) in bxs:
            area = (b - t) * (rr - l)
            inside = max(0, min(b, h) - max(t, 0)) * max(0, min(rr, w) - max(l, 0))
            padded += area - inside
            total += area
        maps: dict[str, torch.Tensor] = {"image": x}
        xd = x.to(device)
        need_act = "activation" in methods and kind == "conv"
        captured: dict[str, torch.Tensor] = {}

        def keep_first(m, i, o):  # the layer output, caught during the first forward that runs
            if "out" not in captured:
                captured["out"] = o[:, ch:ch + 1].detach().float().cpu()

        handle = module.register_forward_hook(keep_first) if need_act else None
        try:
            for key, resample in (("ours", True), ("deconv", False)):
                if key in methods:
                    v = visualize(model, xd, layer, [ch], resample=resample)
                    maps[key] = heatmap(v)[:, 0].detach().float().cpu()
            if need_act and "out" not in captured:
                with torch.no_grad():
                    model(xd)
        finally:
            if handle is not None:
                handle.remove()
        if need_act:
            up = F.interpolate(captured["out"], size=(int(h), int(w)), mode="bilinear", align_corners=False)[:, 0]
            maps["activation"] = _minmax(up)
        for key, m in maps.items():
            fill = pad if key == "image" else "zeros"
            crops = torch.stack([crop_patch(m[i], bxs[i], fill) for i in range(len(bxs))])
            if crops.dim() == 3:
                crops = crops.unsqueeze(1)
            crops = _resize(crops.float(), S).sum(dim=0)
            sums[key] = crops if key not in sums else sums[key] + crops
    count = max(len(indices), 1)
    out = {"indices": indices, "boxes": np.asarray(boxes, dtype=np.int64).reshape(-1, 4), "kind": kind,
           "padded": padded / total if total else 0.0}
    for key, s in sums.items():
        avg = (s / count).numpy().astype(np.float32)
        out[key] = avg if key == "image" else avg[0]
    for key in _METHODS:
        out.setdefault(key, None)
    return out


# ============================================================================ cached top-patch tables, mask overlap

__all__ += ["top_patch_table", "mask_overlap"]

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
    dataset = _as_dataset(data, "data")
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


def _item_mask(data: Any, i: int) -> np.ndarray:
    item = data[i]
    if not isinstance(item, (tuple, list)) or len(item) < 3:
        raise ValueError(f"dataset: expected items (image, label, mask) with a ground-truth mask, got item {i} "
                         f"with {len(item) if isinstance(item, (tuple, list)) else 1} element(s)")
    m = torch.as_tensor(item[2]).detach().cpu()
    if m.dim() == 3 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise ValueError(f"dataset: expected a (H, W) mask in item {i}, got {describe(m)}")
    return (m > 0.5).numpy() if m.is_floating_point() else m.numpy().astype(bool)


def mask_overlap(average_images: AverageImages, dataset: Any, *, per: str = "feature") -> pd.DataFrame:
    """How much the crops behind the average images fall on the ground-truth masks.

    For every (class, feature) item of ``average_images`` and every crop of it (the receptive
    field box of the unit at the channel's maximum in one of the feature's top images), with
    the box clipped to the image and ``mask`` the ground-truth mask of that image (an8Flower:
    the part that defines the image's class):

    - ``overlap``: 1 if the box contains at least one mask pixel (large fields make this
      trivially 1 — compare the other two columns);
    - ``box_on_mask``: the fraction of the box's pixels on the mask;
    - ``center_on_mask``: 1 if the box's centre pixel (the centre of the unit's field) is on
      the mask;
    - ``chance``: the fraction of the whole image on the mask — what ``box_on_mask`` and
      ``center_on_mask`` would be for a box placed at random.

    Each is averaged over the crops. Features whose units see the whole image (FC layers) have
    no location: NaN for the first three (``chance`` is still given).

    average_images: the result of :func:`average_images`. dataset: the dataset it was
    computed on (its indices), with ``(image, label, mask)`` items.
    per: ``"feature"`` (one row per item: class, class_name, feature, layer, layer_number,
        kind, channel, weight, n, whole_image, overlap, box_on_mask, center_on_mask, chance)
        or ``"class"`` (one row per class, pooling the crops of its located features: class,
        class_name, n_features, n_located, n_crops, overlap, box_on_mask, center_on_mask,
        chance; NaN when the class has no located feature).
    """
    if not isinstance(average_images, AverageImages):
        raise TypeError(f"average_images: expected the AverageImages of vxnb.interpret.average_images, "
                        f"got {describe(average_images)}")
    if per not in ("feature", "class"):
        raise ValueError(f"per: expected 'feature' or 'class', got {per!r}")
    data = _as_dataset(dataset, "dataset")
    summary = average_images.summary
    meta: dict = {}
    if isinstance(summary, pd.DataFrame) and len(summary):
        for r in summary.to_dict("records"):
            meta[(r["class"], r["feature"])] = r
    masks: dict[int, np.ndarray] = {}
    rows, crops = [], []
    for (klass, feature), item in average_images.items.items():
        info = meta.get((klass, feature), {})
        located = not item.rf.whole_image
        vals: dict[str, list] = {"overlap": [], "box_on_mask": [], "center_on_mask": [], "chance": []}
        for i, box in zip(np.asarray(item.indices).tolist(), np.asarray(item.boxes).reshape(-1, 4).tolist()):
            if i < 0 or i >= len(data):
                raise ValueError(f"dataset: item {(klass, feature)!r} uses image {i}, but the dataset has "
                                 f"{len(data)} items (the dataset average_images was computed on?)")
            if i not in masks:
                masks[i] = _item_mask(data, i)
            mask = masks[i]
            h, w = mask.shape
            vals["chance"].append(float(mask.mean()))
            if not located:
                continue
            t, l, b, r = box
            tc, lc, bc, rc = max(t, 0), max(l, 0), min(b, h), min(r, w)
            area = max(bc - tc, 0) * max(rc - lc, 0)
            on = int(mask[tc:bc, lc:rc].sum()) if area else 0
            cy = min(max(int(math.floor((t + b - 1) / 2 + 0.5)), 0), h - 1)
            cx = min(max(int(math.floor((l + r - 1) / 2 + 0.5)), 0), w - 1)
            vals["overlap"].append(float(on > 0))
            vals["box_on_mask"].append(on / area if area else 0.0)
            vals["center_on_mask"].append(float(mask[cy, cx]))
        n = len(vals["chance"])
        row = {"class": klass, "class_name": info.get("class_name", str(klass)), "feature": feature,
               "layer": item.layer, "layer_number": info.get("layer_number", np.nan), "kind": item.kind,
               "channel": item.channel, "weight": item.weight, "n": n, "whole_image": not located}
        for key in ("overlap", "box_on_mask", "center_on_mask"):
            row[key] = float(np.mean(vals[key])) if located and n else np.nan
        row["chance"] = float(np.mean(vals["chance"])) if n else np.nan
        rows.append(row)
        crops.append(vals)
    feat_cols = ["class", "class_name", "feature", "layer", "layer_number", "kind", "channel", "weight", "n",
                 "whole_image", "overlap", "box_on_mask", "center_on_mask", "chance"]
    per_feature = pd.DataFrame(rows, columns=feat_cols)
    if per == "feature":
        return per_feature
    out = []
    for klass in dict.fromkeys(per_feature["class"].tolist()):
        sel = [j for j, r in enumerate(rows) if r["class"] == klass]
        located = [j for j in sel if not rows[j]["whole_image"]]
        pooled = {key: [v for j in located for v in crops[j][key]]
                  for key in ("overlap", "box_on_mask", "center_on_mask", "chance")}
        rec = {"class": klass, "class_name": rows[sel[0]]["class_name"], "n_features": len(sel),
               "n_located": len(located), "n_crops": len(pooled["overlap"])}
        for key, v in pooled.items():
            rec[key] = float(np.mean(v)) if v else np.nan
        out.append(rec)
    return pd.DataFrame(out, columns=["class", "class_name", "n_features", "n_located", "n_crops", "overlap",
                                      "box_on_mask", "center_on_mask", "chance"])
