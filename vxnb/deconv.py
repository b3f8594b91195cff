"""DeconvNet + guided backpropagation, plain and resampled (Sec. 3.2-3.3 of the paper).

:func:`visualize` pushes an image forward until a layer ``p``, keeps the activation map of
filter ``q`` (every other channel zeroed) and carries it back to the input space. Every
module on the way is carried back by a *rule* (a small object bound to a module type, as
in zennit), applied in a context manager that leaves the model exactly as it was:

- ``nn.ReLU`` (also ``inplace=True``): guided backprop, the signal passes where the
  forward input > 0 AND the signal > 0.
- ``nn.Conv2d``: the transpose convolution. With ``resample=True`` and stride S > 1 the
  incoming B x B signal is resized (nearest neighbour) to A + 2O - M_eff + 1 and passed
  through the stride-1 transpose (same padding, dilation, groups): exactly A x A again,
  also when the forward rounded. Computed without the resize: rows the resize copies r
  times go through one stride-r transpose with the kernel convolved by an r x r box
  (the same sums; the cost of the plain strided backward; see ``_box_transpose``).
- ``nn.MaxPool2d``: the switches; resampled: resize, then the switches of the stride-1
  max-pooling of the same forward input (windows sharing a maximum add up).
- ``nn.AvgPool2d``: the average transpose; resampled: resize, then the stride-1 one.
- ``nn.Linear``, ``nn.BatchNorm2d`` (eval statistics: the call runs in eval mode),
  ``nn.AdaptiveAvgPool2d``, ``nn.Dropout`` (identity in eval), ``nn.Flatten``,
  ``nn.Identity``, and the structural operations of a custom ``forward`` (additions as
  in ResNet's ``out += identity``, ``torch.cat``, view / reshape / flatten, mean,
  slicing, products with constants): their transpose, i.e. plain autograd -- linear
  maps whose biases drop out, as in DeconvNet.

Anything else on the path from the input to the seed layer is an error, never a silent
plain gradient: a leaf module with parameters and no rule (``LayerNorm``, a custom
layer), a module or functional call with a nonlinearity (``nn.Sigmoid``, ``nn.GELU``,
``F.relu`` in a custom ``forward``, ``torch.sigmoid``, upsampling), the product of two
signals (gating, attention), and -- with ``resample=True`` -- a *functional* strided
convolution or pooling (``F.conv2d(x, w, stride=2)``), which would escape resampling.
This is checked on the autograd graph of each call (see :func:`visualize`).

Speed (issue 16; the same maps as before to float rounding, tested against the earlier
implementation kept behind ``_reference_mode``): stride-1 transposes run as ``conv2d`` with
the flipped, channel-swapped weight (flipped once per forward, so a model changed in place
is never served stale weights); the first transpose at a conv seed uses only the seed's
non-zero channel; the resampled max-pool's stride-1 switches are found once per forward (and its
poolings run on a channels-last copy: the same maxima and switches, faster); the
K signals reuse one recorded forward (:class:`RecordedForward`), which
``vxnb.explanations.explain`` shares with its prediction.
"""
from __future__ import annotations

import contextlib
import functools
import re
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from vxnb._graph import first_conv_in_channels, forward_to, model_device_dtype
from vxnb.utils import check_image_batch, eval_mode, get_module

__all__ = [
    "visualize",
    "heatmap",
    "signed_rgb",
    "grid_score",
    "applied_rules",
    "Rule",
    "TransposeRule",
    "GuidedReLURule",
    "ConvRule",
    "MaxPoolRule",
    "AvgPoolRule",
    "BatchNormRule",
    "RULES",
    "UnsupportedModuleError",
]


class UnsupportedModuleError(TypeError):
    """A module or an operation on the backward path has no DeconvNet rule."""


# --------------------------------------------------------------------------------------
# Resampled backward passes (Sec. 3.3): resize the incoming signal to the stride-1 output
# size A + 2O - M_eff + 1, then run the stride-1 transpose.
# --------------------------------------------------------------------------------------

def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))
    return int(v), int(v)


def _stride1_size(in_size: Sequence[int], kernel: tuple[int, int], padding: tuple[int, int],
                  dilation: tuple[int, int]) -> tuple[int, int]:
    """A' = A + 2 O - M_eff + 1 per spatial dimension, M_eff = d (M - 1) + 1."""
    return tuple(int(a) + 2 * o - (d * (m - 1) + 1) + 1
                 for a, m, o, d in zip(in_size, kernel, padding, dilation))  # type: ignore[return-value]


def _resize(g: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(g.shape[-2:]) == tuple(size):
        return g
    return F.interpolate(g, size=size, mode="nearest")


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x > 0)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return g.clamp_min(0).mul_(mask)  # in place on the new tensor: one pass less


class _ResampledConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, module: nn.Conv2d) -> Tensor:  # type: ignore[override]
        ctx.module = module
        ctx.in_size = tuple(x.shape[-2:])
        return module._conv_forward(x, module.weight, module.bias)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        m: nn.Conv2d = ctx.module
        padding, dilation = _conv_padding(m), _pair(m.dilation)
        size = _stride1_size(ctx.in_size, _pair(m.kernel_size), padding, dilation)
        runs = [_replication_runs(b, a) for b, a in zip(g.shape[-2:], size)]
        if len(runs[0]) * len(runs[1]) <= _MAX_BOX_PIECES:
            return _box_transpose(g, m.weight, runs, padding, dilation, m.groups, ctx.in_size), None
        gx = F.conv_transpose2d(_resize(g, size), m.weight, None, stride=1, padding=padding,
                                groups=m.groups, dilation=dilation)
        return gx, None


#: the resampled conv backward goes the strided way (:func:`_box_transpose`) when the
#: nearest-neighbour resize splits into at most this many pieces (runs of rows × runs of
#: columns replicated the same number of times); 1 where every row is replicated S times.
_MAX_BOX_PIECES = 64


@functools.lru_cache(maxsize=256)
def _replication_runs(n_in: int, n_out: int) -> tuple[tuple[int, int, int, int], ...]:
    """How ``F.interpolate(mode="nearest")`` from ``n_in`` to ``n_out`` replicates rows, as
    runs ``(first source row, number of rows, copies of each, first output row)`` of
    consecutive source rows copied the same number of times (one run when every row is
    copied S times). Read off torch's own index map, so it is exact by construction."""
    src = F.interpolate(torch.arange(n_in, dtype=torch.float64).view(1, 1, n_in, 1), size=(n_out, 1),
                        mode="nearest").view(-1).long()
    if src.numel() > 1 and bool((src[1:] < src[:-1]).any()):  # never for nearest; keep it exact
        return tuple((b, 1, 0, 0) for b in range(n_in)) * (_MAX_BOX_PIECES + 1)
    counts = torch.bincount(src, minlength=n_in).tolist()
    runs: list[list[int]] = []
    start = 0
    for b, c in enumerate(counts):
        if runs and runs[-1][2] == c:
            runs[-1][1] += 1
        else:
            runs.append([b, 1, c, start])
        start += c
    return tuple(tuple(r) for r in runs if r[2] > 0)


def _box_transpose(g: Tensor, weight: Tensor, runs: list[tuple[tuple[int, int, int, int], ...]],
                   padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                   in_size: tuple[int, int]) -> Tensor:
    """``conv_transpose2d(resize(g), weight, stride=1)``, computed without the resize.

    Where the resize copies each of n consecutive rows r times, the stride-1 transpose of
    the copies is the stride-r transpose of those n rows with the kernel convolved by an
    r-long box (both sums run over the same products): the cost of the plain strided
    backward. Each (row run, column run) piece is one such transpose, placed at its output
    offset; the pieces add up (one piece when every row is copied S times).
    """
    (ph, pw), (dh, dw) = padding, dilation
    kh, kw = weight.shape[-2:]
    Mh, Mw = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    dense = weight.new_zeros(*weight.shape[:2], Mh, Mw)
    dense[..., ::dh, ::dw] = weight
    boxed: dict[tuple[int, int], Tensor] = {}
    out = None
    for b0, nb, rh, oh in runs[0]:
        for c0, nc, rw, ow in runs[1]:
            k = boxed.get((rh, rw))
            if k is None:
                k = weight.new_zeros(*weight.shape[:2], Mh + rh - 1, Mw + rw - 1)
                for s in range(rh):
                    for t in range(rw):
                        k[..., s:s + Mh, t:t + Mw] += dense
                boxed[(rh, rw)] = k
            if len(runs[0]) == 1 and len(runs[1]) == 1:  # the whole signal: padding crops
                return F.conv_transpose2d(g, k, None, stride=(rh, rw), padding=(ph, pw), groups=groups)
            piece = _window(g, b0, nb, c0, nc)
            z = F.conv_transpose2d(piece, k, None, stride=(rh, rw), groups=groups)
            if out is None:  # rows and columns of the output padded by (ph, pw) on each side
                out = z.new_zeros(*z.shape[:-2], in_size[0] + 2 * ph, in_size[1] + 2 * pw)
            _window(out, oh, z.shape[-2], ow, z.shape[-1]).add_(z)
    return _window(out, ph, in_size[0], pw, in_size[1])


def _window(t: Tensor, r0: int, nr: int, c0: int, nc: int) -> Tensor:
    """``t[..., r0:r0 + nr, c0:c0 + nc]``, leaving out full slices (an ``alias``, which the
    vmapped backward cannot batch)."""
    if nr != t.shape[-2]:
        t = t.narrow(-2, r0, nr)
    return t if nc == t.shape[-1] else t.narrow(-1, c0, nc)


class _ResampledMaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, module: nn.MaxPool2d) -> Tensor:  # type: ignore[override]
        ctx.module = module
        ctx.save_for_backward(x)
        return F.max_pool2d(x, module.kernel_size, module.stride, module.padding, module.dilation,
                            ceil_mode=module.ceil_mode)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        m: nn.MaxPool2d = ctx.module
        (x,) = ctx.saved_tensors
        k, p, d = _pair(m.kernel_size), _pair(m.padding), _pair(m.dilation)
        size = _stride1_size(x.shape[-2:], k, p, d)
        # switches of the stride-1 max-pooling of the same forward input; overlapping
        # windows that share a maximum add up (the transpose of the selection)
        _, idx = F.max_pool2d(x, k, 1, p, d, return_indices=True)
        gx = torch.ops.aten.max_pool2d_with_indices_backward(_resize(g, size), x, list(k), [1, 1],
                                                             list(p), list(d), False, idx)
        return gx, None


class _ResampledAvgPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, module: nn.AvgPool2d) -> Tensor:  # type: ignore[override]
        ctx.module = module
        ctx.save_for_backward(x)
        return F.avg_pool2d(x, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                            module.count_include_pad, module.divisor_override)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        m: nn.AvgPool2d = ctx.module
        (x,) = ctx.saved_tensors
        k, p = _pair(m.kernel_size), _pair(m.padding)
        size = _stride1_size(x.shape[-2:], k, p, (1, 1))
        gx = torch.ops.aten.avg_pool2d_backward(_resize(g, size), x, list(k), [1, 1], list(p), False,
                                                m.count_include_pad, m.divisor_override)
        return gx, None


_OUR_FUNCTIONS = (_GuidedReLU, _ResampledConv2d, _ResampledMaxPool2d, _ResampledAvgPool2d)


# --------------------------------------------------------------------------------------
# The fast path (issue 16): the same maps as the functions above (the *reference*, still
# selected by :func:`_reference_mode`), computed with less work per backward. The K
# signals of a call go back one after the other through one recorded forward
# (``retain_graph``) on the CPU, where a batch of K is no faster per signal than K
# batches of one (measured: slower at 224 px), and vmapped (``is_grads_batched``) elsewhere.
# --------------------------------------------------------------------------------------

#: True: rules, backward and explain() as before issue 16 (tests compare the two paths).
_REFERENCE = False
#: None: the K signals go back one by one on the CPU and vmapped elsewhere; True / False
#: forces the vmapped / the one-by-one backward (tests run both).
_BATCHED: bool | None = None
# Measured and left out: channels-last signals (oneDNN's conv2d is faster on them at 224 px /
# 64 channels, but converting them to and from the NCHW masks and pool inputs costs as much;
# a channels-last forward rounds activations differently and flips ReLU masks: not exact).


@contextlib.contextmanager
def _reference_mode(on: bool = True) -> Iterator[None]:
    """Run the implementation as it was before the fast path (for tests and the benchmark)."""
    global _REFERENCE
    old, _REFERENCE = _REFERENCE, on
    try:
        yield
    finally:
        _REFERENCE = old


def _flip_weight(weight: Tensor, groups: int) -> Tensor:
    """The weight of the conv2d equal to the stride-1 ``conv_transpose2d`` with ``weight``:
    flipped in space, in/out channels swapped within each group, (in, out / groups, kh, kw)."""
    o, ig, kh, kw = weight.shape
    wf = weight.detach().flip(-2, -1).reshape(groups, o // groups, ig, kh, kw).transpose(1, 2)
    wf = wf.reshape(groups * ig, o // groups, kh, kw)
    return wf.contiguous()


def _fast_conv_ok(m: nn.Conv2d, resample: bool) -> bool:
    """Conv2d modules :class:`_FastConv2d` carries back: zero padding given as numbers (or
    'valid'), at stride 1, or strided with ``resample``; others keep autograd's transpose."""
    if m.padding_mode != "zeros" or (isinstance(m.padding, str) and m.padding != "valid"):
        return False
    return resample or not _strided(m.stride)


def _nonzero_channels(g: Tensor) -> Tensor | None:
    """The channels of the signal ``g`` (B, C, H, W) that are not all zero, where at most half
    are (the seed at a conv layer: one channel per filter), else None (all channels; also
    inside the vmapped backward, whose tensors cannot be sliced by their values). Asked for
    the seed only: guided ReLU zeroes 5-25 % of the channels of later signals (random-init
    VGG-16), but finding them and slicing cost about what the smaller conv saves."""
    if g.dim() != 4 or _is_batched(g):
        return None
    nz = g.flatten(2).ne(0).any(2).any(0).nonzero().flatten()
    if 2 * nz.numel() > g.shape[1]:
        return None
    return nz if nz.numel() else nz.new_zeros(1)  # all zero: one (zero) channel gives the zeros


def _is_batched(g: Tensor) -> bool:
    """Whether ``g`` is a vmapped tensor (``is_grads_batched`` uses the legacy batching)."""
    fn = torch._C._functorch
    return any(bool(getattr(fn, name)(g)) for name in ("is_batchedtensor", "is_legacy_batchedtensor")
               if hasattr(fn, name))


def _finite(weight: Tensor, cache: dict[str, Tensor]) -> bool:
    """Whether ``weight`` is all finite (once per forward): a non-finite weight times a zero
    channel of the signal is NaN in the full transpose, which must then show, not be sliced
    away."""
    if "finite" not in cache:
        cache["finite"] = torch.isfinite(weight).all()
    return bool(cache["finite"])


def _conv_transpose(m: nn.Conv2d, g: Tensor, in_size: tuple[int, int], resample: bool,
                    cache: dict[str, Tensor], seed: bool = False) -> Tensor:
    """The DeconvNet transpose of conv ``m`` (stride 1, or resampled when strided) applied to
    ``g``. With ``seed`` (``g`` is the seed at this conv's output), its all-zero channels are
    left out (groups = 1; with the weight's slice: the same sums without the zero terms).
    ``cache`` keeps the flipped weight for the later signals of the same forward."""
    weight = m.weight.detach()
    channels = _nonzero_channels(g) if seed and m.groups == 1 and _finite(weight, cache) else None
    if channels is not None:
        g = g.index_select(1, channels)
    padding, dilation = _conv_padding(m), _pair(m.dilation)
    if _strided(m.stride):  # resampled: as _ResampledConv2d.backward
        if channels is not None:
            weight = weight.index_select(0, channels)
        size = _stride1_size(in_size, _pair(m.kernel_size), padding, dilation)
        runs = [_replication_runs(b, a) for b, a in zip(g.shape[-2:], size)]
        if len(runs[0]) * len(runs[1]) <= _MAX_BOX_PIECES:
            return _box_transpose(g, weight, runs, padding, dilation, m.groups, in_size)
        return F.conv_transpose2d(_resize(g, size), weight, None, stride=1, padding=padding,
                                  groups=m.groups, dilation=dilation)
    kh, kw = weight.shape[-2:]
    flipped_pad = (dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1])
    if min(flipped_pad) < 0:  # padding wider than the kernel: the transpose as it is
        if channels is not None:
            weight = weight.index_select(0, channels)
        return F.conv_transpose2d(g, weight, None, stride=1, padding=padding, groups=m.groups,
                                  dilation=dilation)
    wf = cache.get("flipped")
    if wf is None:
        wf = cache["flipped"] = _flip_weight(weight, m.groups)
    if channels is not None:
        wf = wf.index_select(1, channels)
    return F.conv2d(g, wf, None, 1, flipped_pad, dilation, m.groups)


class _FastConv2d(torch.autograd.Function):
    """Conv2d at stride 1 (or strided and resampled): the backward is :func:`_conv_transpose`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: nn.Conv2d, resample: bool) -> Tensor:  # type: ignore[override]
        ctx.module, ctx.resample, ctx.cache, ctx.seed = module, resample, {}, False
        ctx.in_size = tuple(x.shape[-2:])
        return module._conv_forward(x, module.weight, module.bias)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return _conv_transpose(ctx.module, g, ctx.in_size, ctx.resample, ctx.cache, ctx.seed), None, None





def _max_pool2d(x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """``F.max_pool2d`` computed on a channels-last copy of an NCHW ``x`` and returned in NCHW:
    the same maxima and switches (first maximum of each window), 2-4x faster on one CPU
    thread for VGG-16's pools (the channels-last kernel runs along the channels)."""
    if x.dim() != 4 or x.device.type != "cpu" or not x.is_contiguous():
        return F.max_pool2d(x, *args, **kwargs)
    out = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), *args, **kwargs)
    return tuple(t.contiguous() for t in out) if isinstance(out, tuple) else out.contiguous()


class _FastMaxPool2d(torch.autograd.Function):
    """Resampled MaxPool2d; the stride-1 switches are found once per forward (at the first
    backward), not once per signal."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: nn.MaxPool2d) -> Tensor:  # type: ignore[override]
        ctx.module, ctx.idx = module, None
        ctx.save_for_backward(x)
        return _max_pool2d(x, module.kernel_size, module.stride, module.padding, module.dilation,
                           ceil_mode=module.ceil_mode)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        m: nn.MaxPool2d = ctx.module
        (x,) = ctx.saved_tensors
        k, p, d = _pair(m.kernel_size), _pair(m.padding), _pair(m.dilation)
        size = _stride1_size(x.shape[-2:], k, p, d)
        if ctx.idx is None:
            ctx.idx = _max_pool2d(x, k, 1, p, d, return_indices=True)[1]
        gx = torch.ops.aten.max_pool2d_with_indices_backward(_resize(g, size), x, list(k), [1, 1],
                                                             list(p), list(d), False, ctx.idx)
        return gx, None


_OUR_FUNCTIONS = _OUR_FUNCTIONS + (_FastConv2d, _FastMaxPool2d)


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if isinstance(m.padding, str):  # 'valid' (0); 'same' only exists at stride 1
        if m.padding == "valid":
            return (0, 0)
        raise UnsupportedModuleError(f"Conv2d with padding={m.padding!r} and stride {m.stride}")
    return _pair(m.padding)


# --------------------------------------------------------------------------------------
# Rules: small objects bound to module types.
# --------------------------------------------------------------------------------------

class Rule:
    """How one module type is carried backward.

    ``check(module, name, resample)`` raises :class:`UnsupportedModuleError` for a
    configuration the rule cannot handle; ``forward(module, resample)`` returns a
    replacement forward ``f(x) -> Tensor`` (whose autograd backward is the rule), or
    ``None`` to keep the module's own forward because its autograd transpose already is
    the DeconvNet rule.
    """

    def check(self, module: nn.Module, name: str, resample: bool) -> None:
        return None

    def forward(self, module: nn.Module, resample: bool) -> Callable[[Tensor], Tensor] | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TransposeRule(Rule):
    """Linear maps and structural ops: the backward is the transpose (plain autograd)."""


class GuidedReLURule(Rule):
    """ReLU: pass the signal where the forward input > 0 and the signal > 0 (also for
    ``inplace=True``: the replacement forward is out of place)."""

    def forward(self, module: nn.Module, resample: bool) -> Callable[[Tensor], Tensor]:
        return _GuidedReLU.apply


def _strided(stride: Any) -> bool:
    return any(s > 1 for s in _pair(stride))


class ConvRule(Rule):
    """Conv2d: transpose convolution; resampled at stride 1 when ``resample`` and S > 1."""

    def check(self, module: nn.Module, name: str, resample: bool) -> None:
        if resample and _strided(module.stride):
            if module.padding_mode != "zeros":
                raise UnsupportedModuleError(
                    f"module {name!r} ({type(module).__name__}): resampling supports padding_mode='zeros' "
                    f"only, got {module.padding_mode!r}; use resample=False")
            _conv_padding(module)

    def forward(self, module: nn.Module, resample: bool) -> Callable[[Tensor], Tensor] | None:
        if not _REFERENCE and _fast_conv_ok(module, resample):
            return lambda x: _FastConv2d.apply(x, module, resample)
        if resample and _strided(module.stride):
            return lambda x: _ResampledConv2d.apply(x, module)
        return None


class MaxPoolRule(Rule):
    """MaxPool2d: switches; resampled: switches of the stride-1 pooling of the same input."""

    def check(self, module: nn.Module, name: str, resample: bool) -> None:
        if module.return_indices:
            raise UnsupportedModuleError(
                f"module {name!r} ({type(module).__name__}) with return_indices=True has no rule")

    def forward(self, module: nn.Module, resample: bool) -> Callable[[Tensor], Tensor] | None:
        if resample and _strided(module.stride):
            if not _REFERENCE:
                return lambda x: _FastMaxPool2d.apply(x, module)
            return lambda x: _ResampledMaxPool2d.apply(x, module)
        return None


class AvgPoolRule(Rule):
    """AvgPool2d: the average transpose; resampled: the stride-1 average transpose."""

    def forward(self, module: nn.Module, resample: bool) -> Callable[[Tensor], Tensor] | None:
        if resample and _strided(module.stride):
            return lambda x: _ResampledAvgPool2d.apply(x, module)
        return None


class BatchNormRule(Rule):
    """BatchNorm2d in eval mode is an affine map: its transpose (scale by w / sqrt(var + eps))."""

    def check(self, module: nn.Module, name: str, resample: bool) -> None:
        if module.running_mean is None:
            raise UnsupportedModuleError(
                f"module {name!r} ({type(module).__name__}) has track_running_stats=False: it normalises "
                "with batch statistics even in eval mode, which is not an affine map")


#: Module type -> rule. Register a rule for your own module type here (a subclass that
#: overrides ``forward`` does not inherit its base class's rule).
RULES: dict[type, Rule] = {
    nn.ReLU: GuidedReLURule(),
    nn.Conv2d: ConvRule(),
    nn.MaxPool2d: MaxPoolRule(),
    nn.AvgPool2d: AvgPoolRule(),
    nn.BatchNorm2d: BatchNormRule(),
    nn.Linear: TransposeRule(),
    nn.AdaptiveAvgPool2d: TransposeRule(),
    nn.Dropout: TransposeRule(),
    nn.Dropout2d: TransposeRule(),
    nn.Flatten: TransposeRule(),
    nn.Unflatten: TransposeRule(),
    nn.Identity: TransposeRule(),
}


def _rule_for(module: nn.Module) -> Rule | None:
    for cls in type(module).__mro__:
        if cls in RULES:
            # a subclass with its own forward may compute anything: no inherited rule
            return RULES[cls] if type(module).forward is cls.forward else None
    return None


# --------------------------------------------------------------------------------------
# Applying the rules; recording which module produced which autograd node.
# --------------------------------------------------------------------------------------

class _Tracer(TorchFunctionMode):
    """Maps each autograd node created during the forward to (module name, op name)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = [""]
        self.origin: dict[Any, tuple[str, str]] = {}
        self.refused: dict[str, str] = {}  # module name -> why its rule refused it

    def enter(self, name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, inp: Any) -> None:
            self.stack.append(name)
        return pre_hook

    def leave(self, module: nn.Module, inp: Any, out: Any) -> None:
        if len(self.stack) > 1:
            self.stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and t.grad_fn is not None and t.grad_fn not in self.origin:
                self.origin[t.grad_fn] = (self.stack[-1], getattr(func, "__name__", str(func)))
        return out


@contextlib.contextmanager
def applied_rules(model: nn.Module, *, resample: bool = True,
                  _tracer: _Tracer | None = None) -> Iterator[nn.Module]:
    """Run ``model`` with the DeconvNet + guided-backprop rules for the block.

    The model runs in eval mode; ruled modules whose backward differs from autograd's
    (ReLU; strided Conv2d / MaxPool2d / AvgPool2d when ``resample``) get a replacement
    ``forward``. On exit (also on an exception) the replacements are removed and every
    module's training flag is restored; parameters and ``requires_grad`` are never touched.
    No check of unruled operations happens here: :func:`visualize` does that on the
    autograd graph.
    """
    patched: list[tuple[nn.Module, bool, Any]] = []
    handles: list[Any] = []
    with eval_mode(model):
        try:
            for name, module in model.named_modules():
                rule = _rule_for(module)
                if rule is not None:
                    try:
                        rule.check(module, name, resample)
                    except UnsupportedModuleError as err:
                        if _tracer is None:
                            raise
                        # only an error if the module is on the path: see _check_graph
                        _tracer.refused[name] = str(err)
                        rule = None
                if rule is not None:
                    fwd = rule.forward(module, resample)
                    if fwd is not None:
                        had = "forward" in module.__dict__
                        patched.append((module, had, module.__dict__.get("forward")))
                        module.forward = fwd  # instance attribute shadows the class method
                if _tracer is not None:
                    handles.append(module.register_forward_pre_hook(_tracer.enter(name)))
                    handles.append(module.register_forward_hook(_tracer.leave))
            yield model
        finally:
            for h in handles:
                h.remove()
            for module, had, old in reversed(patched):
                if had:
                    module.forward = old
                else:
                    del module.forward


# Autograd nodes that carry the DeconvNet signal unchanged in kind (linear, structural).
_STRUCTURAL = {
    "Add", "Sub", "Neg", "Cat", "Stack", "View", "UnsafeView", "Reshape", "ReshapeAlias", "Alias",
    "Clone", "Permute", "Transpose", "T", "Squeeze", "Unsqueeze", "Expand", "Slice", "Select",
    "Split", "SplitWithSizes", "Unbind", "Mean", "Sum", "AdaptiveAvgPool2D", "ToCopy",
    "ConstantPadNd", "Repeat", "RepeatInterleave", "IndexSelect", "Index", "Flip", "AsStrided",
    "Narrow", "Chunk", "Contiguous", "ViewAsReal", "Flatten", "Unflatten", "Identity",
}
_PRODUCTS = {"Mul", "Div", "Mm", "Bmm", "Addmm", "Addbmm", "Baddbmm", "Matmul", "Linear", "Mv", "Dot"}
_STRIDED = {"Convolution", "MaxPool2DWithIndices", "AvgPool2D"}


def _op_name(node: Any) -> str:
    return re.sub(r"Backward\d*$", "", node.name())


def _check_graph(root: Any, x_leaf: Tensor, tracer: _Tracer,
                 modules: dict[str, nn.Module], resample: bool) -> None:
    """Raise UnsupportedModuleError for any node between ``x_leaf`` and ``root`` without a rule."""
    reach: dict[Any, bool] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if node in reach:
            continue
        children = [n for n, _ in node.next_functions if n is not None]
        if done:
            reach[node] = (getattr(node, "variable", None) is x_leaf) or any(reach[c] for c in children)
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in reach)
    problems: list[tuple[int, str]] = []
    for node, on_path in reach.items():
        if not on_path or getattr(node, "variable", None) is x_leaf:
            continue
        if getattr(node, "_forward_cls", None) in _OUR_FUNCTIONS:
            continue
        msg = _classify(node, reach, tracer, modules, resample)
        if msg is not None:
            problems.append((node._sequence_nr(), msg))
    if problems:
        problems.sort()
        more = f" (and {len(problems) - 1} more problem(s) further on)" if len(problems) > 1 else ""
        raise UnsupportedModuleError(problems[0][1] + more)


def _classify(node: Any, reach: dict[Any, bool], tracer: _Tracer,
              modules: dict[str, nn.Module], resample: bool) -> str | None:
    op = _op_name(node)
    origin = tracer.origin
    if node not in origin:
        return (f"operation {node.name()} of unknown origin (a custom autograd.Function?) is on the "
                "backward path and has no DeconvNet rule")
    mname, fname = origin[node]
    module = modules[mname]
    where = f"module {mname!r} ({type(module).__name__})" if mname else f"the top-level forward of {type(module).__name__}"
    if mname in tracer.refused:
        return tracer.refused[mname]
    rule = _rule_for(module)
    if rule is not None and not any(True for _ in module.children()):
        return None  # produced inside a ruled module: its rule vouches for it
    if not any(True for _ in module.children()) and any(True for _ in module.parameters(recurse=False)):
        return (f"{where} has parameters but no DeconvNet rule; supported: "
                f"{', '.join(sorted(c.__name__ for c in RULES))} (register one in vxnb.deconv.RULES)")
    if op in _STRUCTURAL:
        return None
    if op in _PRODUCTS:
        signals = sum(1 for c, _ in node.next_functions if c is not None and reach.get(c, False))
        if signals <= 1:
            return None
        return (f"{where}: {fname} multiplies two signals that both depend on the input "
                f"({node.name()}: gating/attention), which has no DeconvNet rule")
    if op in _STRIDED:
        stride = tuple(getattr(node, "_saved_stride", None) or ())
        if not stride:  # pooling with stride=None: the stride is the kernel size
            stride = tuple(getattr(node, "_saved_kernel_size", None) or (1,))
        if not resample or all(s == 1 for s in stride):
            return None
        return (f"{where}: functional {fname} with stride {tuple(stride)} cannot be resampled; use the "
                "nn.Conv2d / nn.MaxPool2d / nn.AvgPool2d module so its rule applies (or resample=False)")
    if op == "NativeBatchNorm" and getattr(node, "_saved_training", True) is False:
        return None
    hint = " (use an nn.ReLU module so the guided-backprop rule applies)" if op in {"Relu", "Threshold"} else ""
    return f"{where}: operation {fname} ({node.name()}) has no DeconvNet rule{hint}"


# --------------------------------------------------------------------------------------
# visualize
# --------------------------------------------------------------------------------------

def _check_channels(channels: Any) -> list[int]:
    if isinstance(channels, (bool, np.bool_)):
        raise TypeError(f"channels: expected an int or a sequence of ints, got {channels!r}")
    if isinstance(channels, (int, np.integer)):
        return [int(channels)]
    if isinstance(channels, Tensor):
        if channels.dim() > 1 or channels.is_floating_point() or channels.dtype == torch.bool:
            raise TypeError(f"channels: expected a 1-D integer tensor, got dtype {channels.dtype} "
                            f"shape {tuple(channels.shape)}")
        channels = channels.reshape(-1).tolist()
    if isinstance(channels, np.ndarray):
        channels = channels.reshape(-1).tolist() if channels.ndim <= 1 else channels
    if not isinstance(channels, (list, tuple, np.ndarray)):
        raise TypeError(f"channels: expected an int or a sequence of ints, got {type(channels).__name__}")
    out = []
    for c in channels:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
            raise TypeError(f"channels: expected ints, got {c!r} ({type(c).__name__})")
        out.append(int(c))
    if not out:
        raise ValueError("channels: expected at least one channel index, got an empty sequence")
    return out


class RecordedForward:
    """One forward of ``model`` on ``x`` under the rules, kept to carry signals back from the
    first output of any of ``layers`` (:meth:`backward`) as often as needed: the forward of
    :func:`visualize` (stopped at its layer) or, in ``vxnb.explanations.explain``, the
    prediction's own forward (run through :meth:`forward`), so the network runs once.

    A layer whose output a later in-place operation changed (a ``+=`` after it) is not
    served (:meth:`output` returns None): its seed would no longer be its output.
    """

    def __init__(self, model: nn.Module, x: Tensor, resample: bool, layers: Sequence[str]) -> None:
        self.model, self.resample, self.layers = model, resample, list(layers)
        self.tracer = _Tracer()
        self.modules = dict(model.named_modules())
        self.x_leaf = x.detach().requires_grad_(True)
        self.outputs: dict[str, tuple[Tensor, int]] = {}
        self.checked: set[str] = set()

    @contextlib.contextmanager
    def forward(self) -> Iterator[Tensor]:
        """Run the model on ``self.x_leaf`` (yielded) inside the block: rules applied, grad on,
        the first output of each of ``layers`` kept."""
        def hook(name: str) -> Callable[..., None]:
            def fn(module: nn.Module, inp: Any, out: Any) -> None:
                if name not in self.outputs and isinstance(out, Tensor):
                    self.outputs[name] = (out, out._version)
            return fn

        with torch.enable_grad(), applied_rules(self.model, resample=self.resample, _tracer=self.tracer):
            handles = [self.modules[n].register_forward_hook(hook(n)) for n in dict.fromkeys(self.layers)]
            try:
                with self.tracer:
                    yield self.x_leaf
            finally:
                for h in handles:
                    h.remove()

    def output(self, layer: str) -> Tensor | None:
        """The output of ``layer`` (its graph checked), None if not recorded or changed in place."""
        if layer not in self.outputs:
            return None
        a, version = self.outputs[layer]
        if a._version != version:
            return None
        if a.grad_fn is None:
            raise ValueError(f"layer: the output of {layer!r} does not depend on the input")
        if layer not in self.checked:
            _check_graph(a.grad_fn, self.x_leaf, self.tracer, self.modules, self.resample)
            self.checked.add(layer)
        return a

    def visualize(self, layer: str, channels: list[int]) -> Tensor | None:
        """:func:`visualize` of the recorded image (already checked) at ``layer``; None where
        the recording cannot serve ``layer`` (not called, changed in place, or the vmapped
        backward failed): the caller then runs :func:`visualize`."""
        if self.output(layer) is None:
            return None
        try:
            out = self.backward(layer, _channel_seed(channels, layer), len(channels))
        except _VmapFailed:
            return None
        return _check_finite(out, channels, layer)

    def backward(self, layer: str, seed: Callable[[Tensor, int], Tensor], K: int,
                 batched: bool | None = None) -> Tensor:
        """(B, K, C, H, W): the K signals ``seed(a, k)`` at ``layer``'s output ``a`` carried back."""
        a = self.output(layer)
        if a is None:
            raise ValueError(f"layer: module {layer!r} was not called during the forward pass, or its output "
                             "was changed in place")
        a_det = a.detach()
        seeds = [seed(a_det, k) for k in range(K)]
        if batched is None:
            batched = _BATCHED if _BATCHED is not None else a.device.type != "cpu"
        if batched and K > 1:
            try:
                (gx,) = torch.autograd.grad(a, self.x_leaf, torch.stack(seeds), is_grads_batched=True,
                                            retain_graph=True)
            except RuntimeError as err:
                raise _VmapFailed(str(err)) from err
            return gx.transpose(0, 1).contiguous()
        if getattr(a.grad_fn, "_forward_cls", None) is _FastConv2d:
            a.grad_fn.seed = True  # the seed's zero channels can be left out of the first transpose
        out = []
        for g in seeds:
            (gx,) = torch.autograd.grad(a, self.x_leaf, g, retain_graph=True)
            out.append(gx.contiguous())
        return torch.stack(out, 1)


def record_forward(model: nn.Module, x: Tensor, resample: bool, layers: Sequence[str]) -> RecordedForward | None:
    """A :class:`RecordedForward` of ``model`` on the checked batch ``x`` (None on the
    reference path, :func:`_reference_mode`, where every visualisation runs its own forward)."""
    return None if _REFERENCE else RecordedForward(model, x, resample, layers)


def _backward(model: nn.Module, x: Tensor, layer: str | None, resample: bool,
              seed: Callable[[Tensor, int], Tensor], K: int, *, expand: bool = False) -> Tensor:
    """Core: one forward to ``layer`` under the rules (a :class:`RecordedForward`), then the K
    signals back (see :meth:`RecordedForward.backward`); the reference path (issue 16's
    starting point) with :func:`_reference_mode` or ``expand``."""
    if _REFERENCE or expand or layer is None:
        return _backward_reference(model, x, layer, resample, seed, K, expand=expand)
    rec = RecordedForward(model, x, resample, [layer])
    with rec.forward() as x_leaf:
        forward_to(model, x_leaf, layer)
    return rec.backward(layer, seed, K)


def _backward_reference(model: nn.Module, x: Tensor, layer: str | None, resample: bool,
                        seed: Callable[[Tensor, int], Tensor], K: int, *, expand: bool = False) -> Tensor:
    """The reference core (before issue 16's fast path; also the B*K ``expand`` fallback and
    ``layer=None``): forward to ``layer`` under the rules, check the graph, one batched backward.

    ``seed(a, k)`` gives the k-th signal (shape of ``a``) at the layer output ``a`` (B, ...).
    Returns (B, K, C, H, W). With ``expand`` the batch is expanded to B*K at the input
    (K forwards); otherwise one forward and a vmapped backward (``is_grads_batched``).
    """
    modules = dict(model.named_modules())
    B = x.shape[0]
    tracer = _Tracer()
    with torch.enable_grad(), applied_rules(model, resample=resample, _tracer=tracer):
        expand = expand and K > 1
        x_leaf = (x.repeat_interleave(K, 0) if expand else x).detach().requires_grad_(True)
        with tracer:
            a = forward_to(model, x_leaf, layer)
        if a.grad_fn is None:
            raise ValueError(f"layer: the output of {layer!r} does not depend on the input")
        _check_graph(a.grad_fn, x_leaf, tracer, modules, resample)
        a_det = a.detach()
        if expand:  # batch (B*K) ordered as (b, k); sample b*K + k carries seed k
            a_k = a_det.reshape(B, K, *a.shape[1:])
            g = torch.stack([seed(a_k[:, k], k) for k in range(K)], dim=1).reshape(a.shape)
            (gx,) = torch.autograd.grad(a, x_leaf, g)
            return gx.reshape(B, K, *x.shape[1:])
        seeds = torch.stack([seed(a_det, k) for k in range(K)])  # (K, B, ...)
        if K == 1:
            (gx,) = torch.autograd.grad(a, x_leaf, seeds[0])
            return gx.unsqueeze(1)
        try:
            (gx,) = torch.autograd.grad(a, x_leaf, seeds, is_grads_batched=True)
        except RuntimeError as err:
            raise _VmapFailed(str(err)) from err
        return gx.transpose(0, 1).contiguous()


class _VmapFailed(Exception):
    """The vmapped (is_grads_batched) backward hit an op it cannot batch."""


def _channel_seed(channels: list[int], layer: str) -> Callable[[Tensor, int], Tensor]:
    def seed(a: Tensor, k: int) -> Tensor:
        if a.dim() < 2:
            raise ValueError(f"layer: expected the output of {layer!r} to be (B, C, ...), got shape {tuple(a.shape)}")
        n = a.shape[1]
        q = channels[k]
        if not 0 <= q < n:
            raise IndexError(f"channels: channel {q} is out of range for layer {layer!r}, which has "
                             f"{n} channels (valid: 0..{n - 1})")
        g = torch.zeros_like(a)
        g[:, q] = a[:, q]
        return g
    return seed


def visualize(model: nn.Module, x: Tensor, layer: str, channels: int | Sequence[int], *,
              resample: bool = True) -> Tensor:
    """DeconvNet + guided-backprop visualisation of filters ``channels`` at ``layer``.

    For each channel q the activation map ``a[:, q]`` of ``layer``'s output (every other
    channel zero) is carried back to the input space with the rules of this module (see
    the module docstring): the gradient of ``0.5 * ||a_q||^2`` under the DeconvNet/GB
    rules. With ``resample=False`` this is guided backpropagation (equal to Captum's
    ``NeuronGuidedBackprop`` with that seed); with ``resample=True`` (the paper's
    Sec. 3.3) every strided Conv2d / MaxPool2d / AvgPool2d runs its backward at stride 1
    on the nearest-neighbour-resized signal, which removes the grid artifacts.

    Args:
        model: an ``nn.Module`` built from the supported modules (``RULES``); torchvision
            AlexNet / VGG / ResNet and ``nn.Sequential`` reference models work. It is left
            as it was (mode, parameters, hooks), also when an error is raised.
        x: float images (B, C, H, W); C must match the first Conv2d's ``in_channels``.
        layer: a name from ``model.named_modules()``; its output (B, C', h, w) or (B, N)
            (FC layer: ``channels`` are unit indices) is the seed. For a module called
            several times (a shared ReLU) the first call counts. The forward stops there.
        channels: an int or a sequence of K channel indices in [0, C').
        resample: use the paper's resampled (stride-1) backward for strided operations.

    Returns:
        (B, K, C, H, W) tensor on the model's device: the input-space visualisation of
        each of the K channels for each image. All K travel back through a single forward:
        on the CPU one after the other (``retain_graph``; a batch of K is no faster per
        signal there), elsewhere in one vmapped backward (``is_grads_batched``; if it cannot
        be vmapped, the batch is expanded to B*K at the input instead).

    Raises:
        TypeError: ``x`` is not a float tensor; ``channels`` are not ints.
        ValueError: ``x`` is not (B, C, H, W) with the model's C; unknown ``layer`` (the
            message lists the names); ``layer`` is not reached by the forward.
        IndexError: a channel is out of range (naming it and the number of channels).
        UnsupportedModuleError (a TypeError): a module or an operation on the path from
            the input to ``layer`` has no rule. Caught on the autograd graph of the call:
            leaf modules with parameters but no rule, nonlinear autograd nodes
            (ReLU/Threshold/Sigmoid/Tanh/GELU/Softmax/LayerNorm/upsampling, ...) created
            outside a ruled module (e.g. ``F.relu`` in a custom ``forward``), products of
            two input-dependent signals, custom autograd Functions, and (with
            ``resample``) functional strided conv/pooling. Linear structural ops (add,
            cat, view/reshape/flatten, mean, slicing, scalar products) pass.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(resample, bool):
        raise TypeError(f"resample: expected a bool, got {type(resample).__name__}")
    get_module(model, layer)  # unknown layer -> ValueError listing the names
    chans = _check_channels(channels)
    x = check_image_batch(x, "x", channels=first_conv_in_channels(model))
    device, dtype = model_device_dtype(model, x)
    x = x.to(device=device, dtype=dtype)
    out = run_backward(model, x, layer, resample, _channel_seed(chans, layer), len(chans))
    return _check_finite(out, chans, layer)


def _check_finite(out: Tensor, chans: list[int], layer: str) -> Tensor:
    bad = ~torch.isfinite(out).flatten(2).all(2)  # (B, K)
    if bool(bad.any()):
        b, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"layer {layer!r}, channel {chans[k]}: the visualisation of image {b} contains NaN or "
                         "inf (non-finite activations or weights); no heatmap is made from it")
    return out


def run_backward(model: nn.Module, x: Tensor, layer: str | None, resample: bool,
                  seed: Callable[[Tensor, int], Tensor], K: int) -> Tensor:
    try:
        return _backward(model, x, layer, resample, seed, K)
    except _VmapFailed as err:  # an op in the backward that the vmapped backward cannot batch
        warnings.warn(f"vxnb.deconv: batched backward failed ({str(err).splitlines()[0][:200]}); "
                      "expanding the batch to B*K instead", RuntimeWarning, stacklevel=3)
        return _backward(model, x, layer, resample, seed, K, expand=True)


# --------------------------------------------------------------------------------------
# Display helpers and the grid-artifact score
# --------------------------------------------------------------------------------------

def _as_tensor(v: Any, arg: str, min_dim: int) -> Tensor:
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(v)
    if not isinstance(v, Tensor):
        raise TypeError(f"{arg}: expected a torch.Tensor or numpy array, got {type(v).__name__}")
    if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{arg}: expected a real-valued tensor, got dtype {v.dtype}")
    if v.dim() < min_dim:
        raise ValueError(f"{arg}: expected at least {min_dim} dimensions, got shape {tuple(v.shape)}")
    return v.float() if not v.is_floating_point() else v


def heatmap(v: Tensor) -> Tensor:
    """Heatmaps (..., H, W) in [0, 1] from visualisations ``v`` (..., C, H, W).

    The sum of ``|v|`` over the colour channels, min-max normalised per map (a constant
    map gives zeros). E.g. ``heatmap(visualize(...))`` is (B, K, H, W).
    """
    v = _as_tensor(v, "v", 3)
    if not bool(torch.isfinite(v).all()):
        where = tuple(int(i) for i in (~torch.isfinite(v)).nonzero()[0][:-3])
        raise ValueError(f"v: the visualisation at index {where} contains NaN or inf; a heatmap would hide "
                         "it as zeros")
    h = v.abs().sum(dim=-3)
    lo = h.amin(dim=(-2, -1), keepdim=True)
    hi = h.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (h - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(h))


def signed_rgb(v: Tensor) -> Tensor:
    """Visualisations (..., C, H, W) as images (..., 3, H, W) in [0, 1], as DeconvNet
    images are usually shown: ``0.5 + v / (2 max|v|)`` with the maximum per image (over
    C, H, W); grey is zero. C = 1 is repeated to 3 channels."""
    v = _as_tensor(v, "v", 3)
    if v.shape[-3] not in (1, 3):
        raise ValueError(f"v: expected 1 or 3 colour channels in dim -3, got shape {tuple(v.shape)}")
    m = v.abs().amax(dim=(-3, -2, -1), keepdim=True)
    out = 0.5 + v / (2 * torch.where(m > 0, m, torch.ones_like(m)))
    if v.shape[-3] == 1:
        out = out.expand(*v.shape[:-3], 3, *v.shape[-2:])
    return out.clamp(0, 1)


def grid_score(heatmaps: Tensor, strides: int | Sequence[int]) -> Tensor:
    """Grid-artifact score of heatmaps (..., H, W), one value per map (...,).

    The share of the spectral energy at the grid frequencies: with P = |FFT2(h)|^2 (the
    power spectrum of each map) and, for each stride S in ``strides``, the lattice of
    frequencies (round(i H / S) mod H, round(j W / S) mod W), i, j = 0..S-1 -- where a
    pattern repeating every S pixels puts its energy -- the score is
    ``sum_{lattice \\ DC} P / sum_{all \\ DC} P`` (DC, the mean, excluded). It is 0 for
    a map with no period-S component, 1 for a purely S-periodic map and about
    (S^2 - 1) / (H W - 1) for white noise. Pass the total stride of the layer (the product
    of the strides before it; its lattice contains those of its divisors).
    """
    h = _as_tensor(heatmaps, "heatmaps", 2).double()
    if isinstance(strides, (int, np.integer)) and not isinstance(strides, bool):
        strides = [int(strides)]
    try:
        strides = [int(s) for s in strides]  # type: ignore[union-attr]
    except TypeError as err:
        raise TypeError(f"strides: expected an int or a sequence of ints, got {strides!r}") from err
    if not strides or any(s < 1 for s in strides):
        raise ValueError(f"strides: expected positive ints, got {strides}")
    H, W = h.shape[-2:]
    power = torch.fft.fft2(h).abs() ** 2
    mask = torch.zeros(H, W, dtype=torch.bool, device=h.device)
    for s in strides:
        rows = torch.tensor(sorted({round(i * H / s) % H for i in range(s)}), device=h.device)
        cols = torch.tensor(sorted({round(j * W / s) % W for j in range(s)}), device=h.device)
        mask[rows[:, None], cols[None, :]] = True
    mask[0, 0] = False
    total = power.sum(dim=(-2, -1)) - power[..., 0, 0]
    grid = (power * mask).sum(dim=(-2, -1))
    return torch.where(total > 0, grid / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(total)).float()
