"""The model graph: the one analysis of a network's structure that the pipeline shares.

- :func:`analyse_layers` — layer numbers and kinds (``"conv"`` / ``"fc"``) of the Conv/Linear
  blocks in forward order, their default hook points and which module calls belong to which
  block (a flat ``torch.fx`` trace; registration order, with a warning, where the model cannot
  be traced). Used by :mod:`vxnb.features` (see its docstring for the numbering rules).
- :func:`walk_model` — the receptive field (size, total stride, offset) of every module's
  output, propagated through the graph one ``torch.fx`` level at a time, and with
  ``input_size`` the spatial sizes (:func:`module_shapes`). Used by :mod:`vxnb.interpret`
  (:func:`vxnb.interpret.receptive_field`), :mod:`vxnb.averages` and, through
  :func:`stride_at`, the grid period in :mod:`vxnb.explanations`.
- small facts: the input channels a model expects, the device and dtype it runs in, and
  running it up to one layer.
"""
from __future__ import annotations

import warnings
from collections import Counter
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.fx
from torch import Tensor, nn

from .utils import describe, eval_mode, get_module

__all__ = ["first_conv_in_channels", "model_device_dtype", "forward_to", "LayerAnalysis", "analyse_layers",
           "residual_blocks", "ReceptiveField", "walk_model", "module_shapes", "state_to_rf", "stride_at"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FC = (nn.Linear,)
_NORM = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
         nn.LocalResponseNorm)
_PASS = (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity)
_NONLIN = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
           nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
           nn.Tanhshrink, nn.Threshold, nn.LogSigmoid)


class _StopForward(Exception):
    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output


def first_conv_in_channels(model: nn.Module) -> int | None:
    """in_channels of the first Conv2d (None if the model has none)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def model_device_dtype(model: nn.Module, x: Tensor) -> tuple[torch.device, torch.dtype]:
    """Device and float dtype of the first parameter (those of ``x`` for a model without any)."""
    for p in model.parameters():
        return p.device, (p.dtype if p.is_floating_point() else x.dtype)
    return x.device, x.dtype


def forward_to(model: nn.Module, x: Tensor, layer: str | None) -> Tensor:
    """Run ``model`` on ``x`` until ``layer``'s first output (the model output if None)."""
    if layer is None:
        out = model(x)
    else:
        target = get_module(model, layer)

        def stop(module: nn.Module, inp: Any, output: Any) -> None:
            raise _StopForward(output)

        handle = target.register_forward_hook(stop)
        try:
            model(x)
        except _StopForward as s:
            out = s.output
        else:
            raise ValueError(f"layer: module {layer!r} was not called during the forward pass")
        finally:
            handle.remove()
    if not isinstance(out, Tensor):
        raise TypeError(f"layer: expected {layer or 'the model'!r} to output a Tensor, got {type(out).__name__}")
    return out


# ============================================================================ model analysis
@dataclass
class LayerAnalysis:
    """What the forward structure tells about a model's Conv/Linear blocks (:func:`analyse_layers`)."""

    numbers: dict[str, int]            # conv/linear module -> layer number (1-based, forward order)
    kinds: dict[str, str]              # conv/linear module -> "conv" | "fc"
    hook: dict[str, str]               # conv/linear module -> default hook point
    calls: Counter                     # leaf module -> number of calls per forward pass
    node_member: list[str | None]      # per call (forward order): the conv/linear block it belongs to
    node_target: list[str]             # per call: the module called
    traced: bool
    blocks: list[str] = field(default_factory=list)  # outermost residual blocks (see residual_blocks)


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and next(iter(m.children()), None) is None]


def _trace_calls(model: nn.Module) -> list[tuple[str, list[int]]] | None:
    """Module calls in forward order with, for each, the indices of the calls using its output
    directly (None, with a warning, where ``torch.fx`` cannot trace the model)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.fx.Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure: registration order, said out loud
        warnings.warn(f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {str(err)[:200]}); "
                      "layer numbers and kinds come from the modules' registration order, which may differ "
                      "from the forward order", RuntimeWarning, stacklevel=3)
        return None
    nodes = [n for n in graph.nodes if n.op == "call_module"]
    pos = {n: i for i, n in enumerate(nodes)}
    out = []
    for n in nodes:
        users = list(n.users)
        # a user that is not a module call (add, flatten, …) breaks a chain: mark it with -1
        out.append((str(n.target), [pos.get(u, -1) for u in users]))
    return out


def analyse_layers(model: nn.Module) -> LayerAnalysis:
    """Layer numbers, kinds and default hook points of ``model``'s Conv/Linear blocks (see
    :mod:`vxnb.features` for the rules)."""
    modules = dict(model.named_modules())
    calls_list = _trace_calls(model)
    traced = calls_list is not None
    if calls_list is None:  # registration order, each leaf feeding the next
        leaves = [n for n, _ in _leaf_modules(model)]
        calls_list = [(n, [i + 1] if i + 1 < len(leaves) else []) for i, n in enumerate(leaves)]
    targets = [t for t, _ in calls_list]
    calls = Counter(targets)
    numbers: dict[str, int] = {}
    kinds: dict[str, str] = {}
    hook: dict[str, str] = {}
    member: list[str | None] = [None] * len(calls_list)
    for i, (target, _) in enumerate(calls_list):
        mod = modules.get(target)
        if not isinstance(mod, _CONV + _FC):
            continue
        first = target not in numbers
        if first:
            numbers[target] = len(numbers) + 1
            kinds[target] = "conv" if isinstance(mod, _CONV) else "fc"
        member[i] = target
        # follow the chain conv/linear -> [norm | dropout]* -> [nonlinearity]
        chain_norm: str | None = None
        nonlin: str | None = None
        cur = i
        while True:
            users = calls_list[cur][1]
            if len(users) != 1 or users[0] < 0:
                break
            nxt = users[0]
            nmod = modules.get(calls_list[nxt][0])
            if isinstance(nmod, _NORM + _PASS):
                member[nxt] = target
                if isinstance(nmod, _NORM):
                    chain_norm = calls_list[nxt][0]
                cur = nxt
                continue
            if isinstance(nmod, _NONLIN):
                member[nxt] = target
                nonlin = calls_list[nxt][0]
                # dropout / identity right after the nonlinearity still belong to the block
                cur = nxt
                while len(calls_list[cur][1]) == 1 and calls_list[cur][1][0] >= 0 and \
                        isinstance(modules.get(calls_list[calls_list[cur][1][0]][0]), _PASS):
                    cur = calls_list[cur][1][0]
                    member[cur] = target
            break
        if first:
            if nonlin is not None and calls[nonlin] == 1:
                hook[target] = nonlin
            elif chain_norm is not None and calls[chain_norm] == 1:
                hook[target] = chain_norm
            else:
                hook[target] = target
    return LayerAnalysis(numbers, kinds, hook, calls, member, targets, traced, _residual_blocks(model))


class _ShallowTracer(torch.fx.Tracer):
    """Traces one module's own forward: every submodule is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}


def _adds_a_skip(module: nn.Module) -> bool:
    """Whether the module's own forward adds two computed tensors (a skip connection); adding one
    of the module's own parameters or buffers (a ViT encoder's position embedding) is not one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _ShallowTracer().trace(module)
    except Exception:  # noqa: BLE001 - untraceable: not recognised as a residual block
        return False
    for node in graph.nodes:
        if node.op in ("call_function", "call_method") and node.target in _ADD:
            operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
            if len(operands) == 2 and not any(a.op == "get_attr" for a in operands):
                return True
    return False


def _residual_blocks(model: nn.Module) -> list[str]:
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or next(iter(module.children()), None) is None:
            continue
        if any(name.startswith(b + ".") for b in found):
            continue  # only the outermost blocks
        if _adds_a_skip(module):
            found.append(name)
    return found


def residual_blocks(model: nn.Module) -> list[str]:
    """The outermost submodules whose own forward adds a skip connection to their result, e.g.
    every ``BasicBlock``/``Bottleneck`` of a torchvision ResNet (``layer1.0`` … ``layer4.2``).
    Their output is taken after the addition and its ReLU."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    return _residual_blocks(model)


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


@dataclass(frozen=True)
class _Whole:
    """State of a tensor whose every element sees the whole image; ``jump`` is the total stride of
    the last feature map it was computed from (the grid a plain DeconvNet leaves, :func:`stride_at`)."""

    jump: tuple[int, int]


def _whole(state: Any) -> Any:
    """The state after a global operation on ``state`` (None stays None: not an image tensor)."""
    return None if state is None else _Whole(state.jump)


def _strided(state: Any, stride: tuple[int, int]) -> Any:
    """A whole-image map (e.g. after a squeeze-excitation product) through a sliding window: its
    field stays the whole image, its grid gets coarser."""
    return _Whole(tuple(j * s for j, s in zip(state.jump, stride))) if isinstance(state, _Whole) else state


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
    geos, wholes = [], []
    for s in states:
        if isinstance(s, _Whole):
            wholes.append(s)
        elif isinstance(s, _Geo):
            geos.append(s)
    if wholes:
        return _Whole(tuple(max(g.jump[a] for g in wholes + geos) for a in range(2)))
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
                                    nn.LogSoftmax, nn.MultiheadAttention)
_ADAPTIVE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)

_IDENTITY_FUNCS = {
    "add", "sub", "mul", "truediv", "div", "iadd", "isub", "imul", "itruediv", "neg", "abs", "pow",
    "add_", "sub_", "mul_", "div_", "relu", "relu_", "relu6", "leaky_relu", "gelu", "silu", "mish", "elu",
    "selu", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish", "hardsigmoid", "hardtanh", "softplus",
    "dropout", "dropout2d", "stochastic_depth", "contiguous", "clone", "detach", "float", "double", "half", "to", "type_as",
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
            s = _pair(module.stride if module.stride is not None else module.kernel_size)
            if not isinstance(state, _Geo):
                return _strided(state, s)
            k = _pair(module.kernel_size)
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
            return _whole(_union(inputs, where))
        if isinstance(module, _ADAPTIVE):
            state = _union(inputs, where)
            shp = self.shapes.get(name)
            if state is not None and shp is not None and shp[0] == shp[1]:
                return state  # adaptive pooling to the size it already has: the identity
            return _whole(state)
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
            k = _get_arg(node, 1, "kernel_size", None)
            s = _get_arg(node, 2, "stride", None) or k
            if not isinstance(state, _Geo):
                return _strided(state, _pair(s))
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
            return _whole(_union(states, here))
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


def module_shapes(model: nn.Module, input_size: Any) -> dict[str, tuple]:
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
    """The field of every named module's output (``walker.record[name]``: one state per call, in
    call order; :func:`state_to_rf` turns one into a :class:`ReceptiveField`) and, with
    ``input_size``, the spatial sizes of :func:`module_shapes` (else ``{}``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    shapes = module_shapes(model, input_size) if input_size is not None else {}
    walker = _Walker(shapes)
    walker.walk(model, "", [_INPUT])
    return walker, shapes


def state_to_rf(state: Any, layer: str) -> ReceptiveField:
    if isinstance(state, _Whole):
        return ReceptiveField(None, None, None)
    if isinstance(state, _Geo):
        return state.to_rf()
    raise ValueError(f"layer: module {layer!r} does not output a feature map of the input image")


def stride_at(model: nn.Module, layer: str, input_size: Any) -> tuple[int, bool]:
    """(total stride, whether the output is a spatial map (B, C, h, w)) of ``layer``'s first output
    on an input of ``input_size`` ((C, H, W) or (H, W)).

    The total stride is the larger of the two axes' products of the strides of the sliding windows
    (Conv2d, max/avg pooling) on the path from the input to that output — the period of the grid a
    plain DeconvNet leaves there. Parallel branches (a ResNet's downsample) count once. A
    whole-image output (Linear, after Flatten / global pooling) has the stride of the last
    feature map it was computed from.
    """
    get_module(model, layer)  # clear error for a name that does not exist
    walker, shapes = walk_model(model, input_size)
    if layer not in walker.record:
        raise ValueError(f"layer: module {layer!r} was not called during the forward pass")
    state = walker.record[layer][0]
    if state is None:
        raise ValueError(f"layer: module {layer!r} does not output a feature map of the input image")
    return int(max(state.jump)), shapes.get(layer, (None, None))[1] is not None
