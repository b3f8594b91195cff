"""DeconvNet + guided backpropagation, plain and resampled (Sec. 3.2-3.3 of the paper), for
ReLU CNNs and for the modern CNNs and vision transformers of torchvision (issue 25).

:func:`visualize` pushes an image forward until a layer ``p``, keeps the activation map of
filter ``q`` (every other channel zeroed) and carries it back to the input space. Every
operation on the way is carried back by a *rule*. Rules come in a :class:`Composite`
passed per call (``visualize(..., composite=...)``, ``vxnb.explanations.explain(...,
composite=...)``; default :data:`DEFAULT_COMPOSITE`), as in zennit: nothing global is
edited, and ``DEFAULT_COMPOSITE.with_rules({...})`` (or a plain dict, merged onto the
default) adds or replaces a rule for one call. A composite maps

- an *operation name* (``"relu"``, ``"gelu"``, ``"layer_norm"``, ``"conv2d"``, ``"mul"``, ...:
  the name of the torch function, in-place and operator spellings folded, so ``F.relu``,
  ``torch.relu``, ``x.relu()`` and ``x.relu_()`` are all ``"relu"``) to an :class:`OpRule`.
  Op rules attach where autograd records the operation -- whichever module or custom
  ``forward`` calls it -- through a ``TorchFunctionMode`` active during the call;
- a *module type* to a :class:`Rule` (modules with parameters must have one; a rule may
  replace the module's forward, zennit-style).

The default rules, each with its source:

- **ReLU in any form** (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``.relu_()`` in place):
  guided backprop, g_in = max(g, 0) * 1[x > 0] (Springenberg et al. 2015, "Striving for
  simplicity"; the DeconvNet half, max(g, 0), is Zeiler & Fergus 2014).
- **Any other pointwise activation f** (ReLU6/Hardtanh, LeakyReLU, ELU, SELU, CELU, SiLU,
  GELU, Hardswish, Mish, Softplus, Tanh, Sigmoid, Hardsigmoid): g_in = max(g, 0) *
  max(f'(x), 0) -- the same two halves (signal > 0, the local gate opened by the forward),
  which reduces to guided backprop for ReLU (:class:`GuidedActivationRule`).
- **Multiplicative gates and attention weights** (squeeze-excitation ``x * sigmoid(s)``,
  ``softmax(q k^T) @ v``): the output of a sigmoid, hard-sigmoid or softmax used as a factor of
  a product (``*``, ``matmul``, ``bmm``, ``einsum``) with another signal is held constant:
  g_x = g * s and nothing flows into the gate branch (Arras et al. 2017, "signal-take-all";
  Ali et al., ICML 2022, "XAI for Transformers", for the attention weights).
  ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``
  (``F.multi_head_attention_forward``) are computed with their softmax weights held
  constant: the signal flows through the values (Ali et al. 2022).
- **LayerNorm, LayerNorm2d (torchvision's ConvNeXt), GroupNorm**: sigma held constant, the
  centring kept: y = (x - mean(x)) / sigma.detach() * w + b (Ali et al. 2022).
- **Conv2d** (module or ``F.conv2d``): the transpose convolution. With ``resample=True`` and
  stride S > 1 (patch embeddings such as ViT-B/16's 16x16 stride 16 and Swin's 4x4 stride 4,
  strided depthwise convolutions, downsampling layers) the incoming B x B signal is resized
  (nearest neighbour) to A + 2O - M_eff + 1 and passed through the stride-1 transpose (same
  padding, dilation, groups): exactly A x A again, also when the forward rounded. Computed
  without the resize: rows the resize copies r times go through one stride-r transpose with
  the kernel convolved by an r x r box, which is the plain stride-r transpose with its output
  box-summed (the same sums; see ``_box_transpose``).
- **Swin's patch merging** (a 2x2 stride-2 space-to-depth selection before its norm and
  linear reduction): resampled the same way (:class:`PatchMergingRule`).
- **max_pool2d** (module or functional, e.g. Inception-v3's ``F.max_pool2d(x, 3, 2)``): the
  switches; resampled: resize, then the switches of the stride-1 max-pooling of the same
  forward input (windows sharing a maximum add up). **avg_pool2d**: the average transpose;
  resampled: resize, then the stride-1 one.
- Linear maps and structure, passed as they are (their transpose, plain autograd, biases
  dropping out as in DeconvNet): ``nn.Linear``, ``nn.BatchNorm2d`` (eval statistics: the call
  runs in eval mode), adaptive average pooling, dropout and stochastic depth (identity in
  eval), flatten, permutes, reshapes, rolls, slicing, padding, concatenations, additions,
  means, products with constants or parameters (ConvNeXt's layer scale).

Anything else on the path from the input to the seed layer is an error naming the module and
the operation, never a silent plain gradient: a leaf module with parameters and no rule, an
operation without a rule (upsampling, a softmax that is not a gate, ...), the product of two
signals neither of which is a gate, and -- with ``resample=True`` -- a strided operation no
rule resamples. This is checked on the autograd graph of each call (see :func:`visualize`).

Speed (issues 16 and 25): ``explain()`` costs about what one forward plus K plain autograd
backwards cost (``benchmarks/bench_deconv.py --only latency``). A convolution that is not
resampled keeps autograd's own backward (its transpose), except at a conv seed, whose
transpose uses only the seed's non-zero channels; every other transpose is autograd's own input
gradient (``aten::convolution_backward``), so no weight is copied per forward. A resampled
strided conv is the plain strided transpose with its output box-summed (dense kernels), or
with the boxed kernel (depthwise ones); a strided 1x1 conv is the resized channel transpose,
or for a small signal copied evenly the box-summed strided transpose (faster on one CPU
thread: :data:`_MAX_1X1_BOX_PIXELS`); where the resize splits the signal into pieces (a
patchify conv: 28 -> 55 rows), the channel products of all kernel taps are one product W^T g
and each piece is folded at its stride. Guided ReLU's backward is autograd's
``threshold_backward`` then max(., 0); an activation's f'(x) comes from the kernel autograd
itself calls (no engine run per activation); an activation right after an eval-mode BatchNorm
(EfficientNet's, MobileNet's and ResNet's conv-BN-activation blocks) carries the signal back
through both in one node, the BatchNorm's per-channel scale folded into the saved f'(x) once per
forward (the same values: the BatchNorm's transpose after the activation's rule); a resize by a
whole factor is one broadcast copy; the module stack the rules read is kept by two global module
hooks (not two per module), and an eval model is not put into eval mode again. The resampled
max-pool's stride-1 switches are found once per forward (on a channels-last copy: the same
maxima and switches, faster); the K signals reuse one recorded forward
(:class:`RecordedForward`), which ``vxnb.explanations.explain`` shares with its prediction.
The plain implementation these are tested against lives in ``tests/deconv_reference.py``.
"""
from __future__ import annotations

import contextlib
import functools
import math
import re
import warnings
import weakref
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from vxnb._graph import first_conv_in_channels, forward_to, model_device_dtype
from vxnb.utils import all_finite, check_image_batch, eval_mode, get_module

__all__ = [
    "visualize",
    "heatmap",
    "signed_rgb",
    "grid_score",
    "applied_rules",
    "Composite",
    "DEFAULT_COMPOSITE",
    "as_composite",
    "Rule",
    "TransposeRule",
    "ParameterRule",
    "BatchNormRule",
    "OpRule",
    "GuidedReLURule",
    "GuidedActivationRule",
    "HeldGateRule",
    "NormRule",
    "AttentionRule",
    "ConvRule",
    "PoolRule",
    "PatchMergingRule",
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
    """``F.interpolate(g, size, mode="nearest")``; where it copies every row S and every column
    S' times (torch's own index map, :func:`_replication_runs`), as one broadcast copy: the
    same values, about 3x faster on the CPU (ResNet's downsampling 1x1 convs and max-pool)."""
    (h, w), (H, W) = g.shape[-2:], size
    if (h, w) == (H, W):
        return g
    if g.dim() != 4 or len(_replication_runs(h, H)) != 1 or len(_replication_runs(w, W)) != 1:
        return F.interpolate(g, size=size, mode="nearest")
    N, C = g.shape[:2]
    return g[:, :, :, None, :, None].expand(N, C, h, H // h, w, W // w).reshape(N, C, H, W)


def _strided(stride: Any) -> bool:
    return any(s > 1 for s in _pair(stride))


class _ConvSpec(NamedTuple):
    """The arguments of one ``F.conv2d`` call (an ``nn.Conv2d`` has the same attributes)."""
    weight: Tensor
    stride: Any
    padding: Any
    dilation: Any
    groups: int


class _PoolSpec(NamedTuple):
    """The arguments of one ``F.max_pool2d`` / ``F.avg_pool2d`` call."""
    kernel_size: Any
    stride: Any
    padding: Any
    dilation: Any = 1
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None


def _conv_padding(m: Any) -> tuple[int, int]:
    if isinstance(m.padding, str):  # 'valid' (0); 'same' only exists at stride 1
        if m.padding == "valid":
            return (0, 0)
        raise UnsupportedModuleError(f"Conv2d with padding={m.padding!r} and stride {m.stride}")
    return _pair(m.padding)


# --------------------------------------------------------------------------------------
# The backward passes of the rules (autograd Functions)
# --------------------------------------------------------------------------------------

class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward is guided backprop: max(g, 0) * 1[x > 0]. The output y is kept
    (y > 0 exactly where x > 0), as autograd's own ReLU keeps it: a later in-place change of
    it is refused by autograd, as for a plain backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, inplace: bool = False) -> Tensor:  # type: ignore[override]
        if inplace:
            ctx.mark_dirty(x)
            y = x.clamp_min_(0)
        else:
            y = x.clamp_min(0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        # autograd's ReLU backward (g where y > 0, else 0: one vectorised pass), then max(., 0) in
        # place; a product with a bool mask would first copy the mask to floats, torch.where is slower
        return torch.ops.aten.threshold_backward(g, y, 0).clamp_min_(0), None


class _GuidedActivation(torch.autograd.Function):
    """A pointwise activation ``f`` whose backward is max(g, 0) * max(f'(x), 0); f'(x) is
    autograd's own derivative of ``f`` at the forward input, found once per forward: ``df(x,
    y)`` where given (the derivative kernel autograd itself calls, :data:`_DERIVATIVES`),
    else through autograd.

    With ``pre`` and ``scale``: ``f`` is applied to ``pre``, the output of an eval-mode
    BatchNorm of ``x`` (pre = x * scale + shift per channel), and the backward goes straight to
    ``x``: scale * max(g, 0) * max(f'(pre), 0), which is the BatchNorm's own backward (its
    transpose, :class:`BatchNormRule`) after the activation's, with the per-channel scale folded
    into the saved derivative once per forward -- one pass and one autograd node less per
    signal (EfficientNet's and MobileNet's conv-BN-activation blocks)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, f: Callable[[Tensor], Tensor], inplace: bool = False,  # type: ignore[override]
                df: Callable[[Tensor, Tensor], Tensor] | None = None, pre: Tensor | None = None,
                scale: Tensor | None = None) -> Tensor:
        src = x if pre is None else pre
        if df is _relu_derivative:  # 1[y > 0] (times the scale) in one pass: nothing to clamp
            xd = src.detach()
            y = f(xd)
            d = _aten.threshold_backward(_ones(y) if scale is None else scale.expand_as(y), y, 0)
            scale = None
        elif df is not None:
            xd = src.detach()
            y = f(xd)
            d = df(xd, y).clamp_min_(0)
        else:
            with torch.enable_grad():
                xd = src.detach().requires_grad_(True)
                y = f(xd)
                (d,) = torch.autograd.grad(y, xd, _ones(y))
            d = d.clamp_min_(0)
        ctx.save_for_backward(d if scale is None else d.mul_(scale))
        y = y.detach()
        if inplace:
            ctx.mark_dirty(x)
            return x.copy_(y)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None, None, None]:  # type: ignore[override]
        (d,) = ctx.saved_tensors
        return g.clamp_min(0).mul_(d), None, None, None, None, None


def _ones(t: Tensor) -> Tensor:
    """Ones shaped like ``t`` without writing them (a broadcast scalar): the seed of a derivative."""
    return torch.ones((), dtype=t.dtype, device=t.device).expand_as(t)


_aten = torch.ops.aten

#: f'(x) of activations by the kernel autograd's own backward of f calls (derivatives.yaml; with
#: a seed of ones, so the same values as through autograd, without starting its engine once per
#: activation of each forward): op name -> (x, y = f(x), the call's other args, kwargs) -> f'(x).
_DERIVATIVES: dict[str, Callable[[Tensor, Tensor, list, dict], Tensor]] = {
    "silu": lambda x, y, rest, kw: _aten.silu_backward(_ones(x), x),
    "sigmoid": lambda x, y, rest, kw: _aten.sigmoid_backward(_ones(y), y),
    "tanh": lambda x, y, rest, kw: _aten.tanh_backward(_ones(y), y),
    "hardswish": lambda x, y, rest, kw: _aten.hardswish_backward(_ones(x), x),
    "hardsigmoid": lambda x, y, rest, kw: _aten.hardsigmoid_backward(_ones(x), x),
    "mish": lambda x, y, rest, kw: _aten.mish_backward(_ones(x), x),
    "gelu": lambda x, y, rest, kw: _aten.gelu_backward(_ones(x), x, approximate=kw.get(
        "approximate", rest[0] if rest else "none")),
}


def _relu_derivative(x: Tensor, y: Tensor) -> Tensor:
    """1[x > 0] (= 1[y > 0]) as autograd's ReLU backward gives it (``threshold_backward``)."""
    return _aten.threshold_backward(_ones(y), y, 0)


class _HeldSigmaNorm(torch.autograd.Function):
    """LayerNorm (``shape``) or GroupNorm (``groups``) forward (the fused kernels); backward with
    sigma held constant, the centring kept: t = g * w / sigma, g_in = t - mean(t) over the
    normalised elements (the transpose of x -> (x - mean(x)) w / sigma)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor | None, b: Tensor | None, eps: float,  # type: ignore[override]
                shape: tuple[int, ...] | None, groups: int | None) -> Tensor:
        if shape is not None:
            y, _, rstd = torch.native_layer_norm(x, shape, w, b, eps)
        else:
            N, C = x.shape[:2]
            y, _, rstd = torch.native_group_norm(x, w, b, N, C, x[0, 0].numel(), groups, eps)
        ctx.save_for_backward(rstd, w)
        ctx.shape, ctx.groups = shape, groups
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        rstd, w = ctx.saved_tensors
        if ctx.shape is not None:
            t = (g * w if w is not None else g) * rstd
            dims = tuple(range(-len(ctx.shape), 0))
            return t - t.mean(dims, keepdim=True), None, None, None, None, None
        shape = g.shape
        if w is not None:
            g = g * w.reshape((1, -1) + (1,) * (g.dim() - 2))
        t = g.reshape(shape[0], ctx.groups, -1) * rstd.unsqueeze(-1)
        return (t - t.mean(-1, keepdim=True)).reshape(shape), None, None, None, None, None


class _SpaceToDepth(torch.autograd.Function):
    """(..., H, W, C), H and W even -> (..., H/2, W/2, 4C), the phases (0, 0), (1, 0), (0, 1),
    (1, 1) concatenated as torchvision's Swin patch merging does: a 2x2 stride-2 selection. The
    backward is resampled: the signal resized to the stride-1 size (H - 1, W - 1), each phase's
    share added back at its offset (the stride-1 transpose of the selection)."""

    _PHASES = ((0, 0), (1, 0), (0, 1), (1, 1))

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shape = x.shape
        return torch.cat([x[..., dy::2, dx::2, :] for dy, dx in _SpaceToDepth._PHASES], -1)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:  # type: ignore[override]
        H, W, C = ctx.shape[-3:]
        gm = g.reshape(-1, H // 2, W // 2, 4 * C).permute(0, 3, 1, 2)
        gr = _resize(gm, (H - 1, W - 1))
        out = sum(F.pad(gr[:, k * C:(k + 1) * C], (dx, 1 - dx, dy, 1 - dy))
                  for k, (dy, dx) in enumerate(_SpaceToDepth._PHASES))
        return out.permute(0, 2, 3, 1).reshape(ctx.shape)


#: the resampled conv backward goes the strided way (:func:`_box_transpose`) when the
#: nearest-neighbour resize splits into at most this many pieces (runs of rows x runs of
#: columns replicated the same number of times); 1 where every row is replicated S times.
#: (Not the resize: the stride-1 backward of ViT-B/16's 16x16 patch embedding on the resized
#: 209 x 209 signal costs about 60x the strided one.)
_MAX_BOX_PIECES = 64


#: a strided 1x1 conv whose signal has at most this many pixels, every row copied S times, goes
#: back as the plain strided transpose box-summed (:func:`_box_transpose`), not as the resized
#: channel transpose: the same products, but at one CPU thread and batch 1 the strided backward
#: runs on oneDNN and the stride-1 one on a plain GEMM, which is slow for so few columns
#: (ResNet-50's downsampling at 224 px, measured: 14 x 14 signal 2.4 -> 1.6 ms, 7 x 7 3.4 -> 2.1
#: ms; 28 x 28 2.4 -> 2.8 ms, so it stays).
_MAX_1X1_BOX_PIXELS = 256


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


def _conv_input_grad(g: Tensor, in_size: Sequence[int], weight: Tensor, stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """The transpose of ``conv2d(x, weight, stride, padding, dilation, groups)`` applied to
    ``g``, for an input x of spatial size ``in_size``: autograd's own input gradient
    (``aten::convolution_backward``, the kernel a plain backward runs, chosen the same way),
    with no copy of the weight. The input's values are never read, only its shape: an
    uninitialised stand-in is passed."""
    x = torch.empty((g.shape[0], weight.shape[1] * groups, *in_size), dtype=g.dtype, device=g.device)
    return torch.ops.aten.convolution_backward(g, x, weight, None, list(stride), list(padding), list(dilation),
                                               False, [0, 0], groups, [True, False, False])[0]


def _box_transpose(g: Tensor, weight: Tensor, runs: list[tuple[tuple[int, int, int, int], ...]],
                   padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                   in_size: tuple[int, int], boxed: dict[tuple[int, int], Tensor] | None = None) -> Tensor:
    """``conv_transpose2d(resize(g), weight, stride=1)``, computed without the resize.

    Where the resize copies each of n consecutive rows r times, the stride-1 transpose of
    the copies is the stride-r transpose of those n rows with the kernel convolved by an
    r-long box (both sums run over the same products). The transpose is linear in the kernel
    and a kernel shifted by s shifts its output by s, so that is also the stride-r transpose
    with the kernel itself followed by the r-long box sum of its output: the cost of the plain
    strided backward (the same ``aten::convolution_backward``) plus a few passes over the
    output. The boxed kernel is used where its extra products are fewer than those passes
    (:func:`_box_the_kernel`: depthwise and other thin convolutions), kept in ``boxed`` for
    the later signals of the same forward. Each (row run, column run) piece is one such
    transpose, placed at its output offset; the pieces add up (one piece when every row is
    copied S times).
    """
    (ph, pw), (dh, dw) = padding, dilation
    kh, kw = weight.shape[-2:]
    Mh, Mw = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    whole = len(runs[0]) == 1 and len(runs[1]) == 1
    if not whole and groups == 1:
        return _folded_pieces(g, weight, runs, padding, dilation, in_size)
    out = None
    for b0, nb, rh, oh in runs[0]:
        for c0, nc, rw, ow in runs[1]:
            piece = g if whole else _window(g, b0, nb, c0, nc)
            size = (nb * rh + Mh - 1, nc * rw + Mw - 1)
            if _box_the_kernel(weight, groups, rh, rw):
                k = boxed.get((rh, rw)) if boxed is not None else None
                if k is None:
                    dense = weight
                    if (dh, dw) != (1, 1):
                        dense = weight.new_zeros(*weight.shape[:2], Mh, Mw)
                        dense[..., ::dh, ::dw] = weight
                    k = _box_sum(_box_sum(dense, rh, -2), rw, -1)
                    if boxed is not None:
                        boxed[(rh, rw)] = k
                z = _conv_input_grad(piece, size, k, (rh, rw), (0, 0), (1, 1), groups)
            else:
                z = _conv_input_grad(piece, ((nb - 1) * rh + Mh, (nc - 1) * rw + Mw), weight, (rh, rw), (0, 0),
                                     (dh, dw), groups)
                z = _box_sum(_box_sum(z, rh, -2), rw, -1)
            if whole:  # the whole signal: nb rh + Mh - 1 = in_size + 2 padding
                return _window(z, ph, in_size[0], pw, in_size[1])
            if out is None:  # rows and columns of the output padded by (ph, pw) on each side
                out = z.new_zeros(*z.shape[:-2], in_size[0] + 2 * ph, in_size[1] + 2 * pw)
            _window(out, oh, z.shape[-2], ow, z.shape[-1]).add_(z)
    return _window(out, ph, in_size[0], pw, in_size[1])


def _folded_pieces(g: Tensor, weight: Tensor, runs: list[tuple[tuple[int, int, int, int], ...]],
                   padding: tuple[int, int], dilation: tuple[int, int], in_size: tuple[int, int]) -> Tensor:
    """:func:`_box_transpose` of a signal the resize splits into several pieces (ConvNeXt's
    2x2 stride-2 downsampling from 28 to 55 rows, patch embeddings): the channel products of
    every kernel tap for the whole signal in one product, W^T g (the weight read once: a
    transpose per piece reads it once per piece, which costs more than the products where
    pieces are small), then each piece's columns folded at its stride (``F.fold``, col2im),
    box-summed and placed at its offset. The same sums as the transpose of each piece."""
    (ph, pw), (dh, dw) = padding, dilation
    O, C, kh, kw = weight.shape
    Mh, Mw = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    N = g.shape[0]
    z = _conv_input_grad(g, g.shape[-2:], weight.reshape(O, C * kh * kw, 1, 1), (1, 1), (0, 0), (1, 1), 1)
    out = z.new_zeros(N, C, in_size[0] + 2 * ph, in_size[1] + 2 * pw)
    for b0, nb, rh, oh in runs[0]:
        for c0, nc, rw, ow in runs[1]:
            cols = _window(z, b0, nb, c0, nc).reshape(N, C * kh * kw, nb * nc)
            y = F.fold(cols, ((nb - 1) * rh + Mh, (nc - 1) * rw + Mw), (kh, kw), dilation=(dh, dw), stride=(rh, rw))
            y = _box_sum(_box_sum(y, rh, -2), rw, -1)
            _window(out, oh, y.shape[-2], ow, y.shape[-1]).add_(y)
    return _window(out, ph, in_size[0], pw, in_size[1])


def _box_the_kernel(weight: Tensor, groups: int, rh: int, rw: int) -> bool:
    """Whether the strided transpose with the boxed kernel is cheaper than the box sum of its
    output: the boxed kernel's extra products per output element, (O / groups) ((kh + rh - 1)
    (kw + rw - 1) - kh kw) / (rh rw), against about 8 (the box sum's passes, measured on one
    CPU thread). Depthwise convolutions (O / groups = 1) take the boxed kernel, dense ones the
    box sum."""
    kh, kw = weight.shape[-2:]
    extra = (weight.shape[0] // groups) * ((kh + rh - 1) * (kw + rw - 1) - kh * kw) / (rh * rw)
    return extra <= 8


def _box_sum(t: Tensor, r: int, dim: int) -> Tensor:
    """out[i] = sum_{s < r} t[i - s] along ``dim`` (length n + r - 1): the full convolution
    with an r-long box, as a padded copy and r - 1 shifted additions."""
    if r == 1:
        return t
    n = t.shape[dim]
    pad = [0, 0] * (-dim - 1) + [0, r - 1]
    out = F.pad(t, pad)
    for s in range(1, r):
        out.narrow(dim, s, n).add_(t)
    return out


def _window(t: Tensor, r0: int, nr: int, c0: int, nc: int) -> Tensor:
    """``t[..., r0:r0 + nr, c0:c0 + nc]``, leaving out full slices (an ``alias``, which the
    vmapped backward cannot batch)."""
    if nr != t.shape[-2]:
        t = t.narrow(-2, r0, nr)
    return t if nc == t.shape[-1] else t.narrow(-1, c0, nc)



def _stride1_pool_backward(m: Any, x: Tensor, g: Tensor, switches: Callable[..., Tensor]) -> Tensor:
    """The resampled max-pool backward: ``g`` resized to the stride-1 pooling's size, carried
    to the switches ``switches(x, k, 1, p, d)`` of the stride-1 max-pooling of the same forward
    input; overlapping windows that share a maximum add up (the transpose of the selection)."""
    k, p, d = _pair(m.kernel_size), _pair(m.padding), _pair(m.dilation)
    size = _stride1_size(x.shape[-2:], k, p, d)
    idx = switches(x, k, 1, p, d)
    return torch.ops.aten.max_pool2d_with_indices_backward(_resize(g, size), x, list(k), [1, 1],
                                                           list(p), list(d), False, idx)


class _ResampledAvgPool2d(torch.autograd.Function):
    """Strided average pooling whose backward is the stride-1 one on the resized signal."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, m: _PoolSpec) -> Tensor:  # type: ignore[override]
        ctx.m = m
        ctx.save_for_backward(x)
        return F.avg_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                            m.divisor_override)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        m = ctx.m
        (x,) = ctx.saved_tensors
        k, p = _pair(m.kernel_size), _pair(m.padding)
        size = _stride1_size(x.shape[-2:], k, p, (1, 1))
        gx = torch.ops.aten.avg_pool2d_backward(_resize(g, size), x, list(k), [1, 1], list(p), False,
                                                m.count_include_pad, m.divisor_override)
        return gx, None


# The K signals of a call go back one after the other through one recorded forward
# (``retain_graph``) on the CPU, where a batch of K is no faster per signal than K batches of
# one (measured: slower at 224 px), and vmapped (``is_grads_batched``) elsewhere.
#: None: the K signals go back one by one on the CPU and vmapped elsewhere; True / False
#: forces the vmapped / the one-by-one backward (tests run both).
_BATCHED: bool | None = None
# Measured and left out: channels-last signals (oneDNN's conv2d is faster on them at 224 px /
# 64 channels, but converting them to and from the NCHW masks and pool inputs costs as much;
# a channels-last forward rounds activations differently and flips ReLU masks: not exact).


def _fast_conv_ok(m: Any, resample: bool) -> bool:
    """Convolutions :class:`_FastConv2d` carries back: padding given as numbers (or 'valid'),
    at stride 1, or strided with ``resample``; others keep autograd's transpose."""
    if getattr(m, "padding_mode", "zeros") != "zeros" or (isinstance(m.padding, str) and m.padding != "valid"):
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
        cache["finite"] = all_finite(weight)
    return bool(cache["finite"])


def _conv_transpose(m: Any, g: Tensor, in_size: tuple[int, int], resample: bool,
                    cache: dict[str, Tensor], seed: bool = False) -> Tensor:
    """The DeconvNet transpose of the convolution ``m`` (an ``nn.Conv2d`` or a
    :class:`_ConvSpec`; stride 1, or resampled when strided) applied to ``g``. With ``seed``
    (``g`` is the seed at this conv's output), its all-zero channels are left out (groups = 1;
    with the weight's slice: the same sums without the zero terms). ``cache`` keeps what is
    found once per forward (whether the weight is finite). Every transpose is autograd's own
    input gradient (:func:`_conv_input_grad`), so none costs more than the plain backward's."""
    weight = m.weight.detach()
    channels = _nonzero_channels(g) if seed and m.groups == 1 and _finite(weight, cache) else None
    if channels is not None:
        g = g.index_select(1, channels)
        weight = weight.index_select(0, channels)
    padding, dilation = _conv_padding(m), _pair(m.dilation)
    if not _strided(m.stride):
        return _conv_input_grad(g, in_size, weight, (1, 1), padding, dilation, m.groups)
    # resampled: resize to the stride-1 size, stride-1 transpose
    size = _stride1_size(in_size, tuple(weight.shape[-2:]), padding, dilation)
    runs = [_replication_runs(b, a) for b, a in zip(g.shape[-2:], size)]
    if tuple(weight.shape[-2:]) == (1, 1) and not (len(runs[0]) == len(runs[1]) == 1 and
                                                   g.shape[-2] * g.shape[-1] <= _MAX_1X1_BOX_PIXELS):
        # a 1x1 kernel mixes channels only: the stride-1 transpose of the resized signal is the
        # resized channel transpose (ResNet's downsampling: S^2 times fewer products than boxed)
        z = _resize(_conv_input_grad(g, g.shape[-2:], weight, (1, 1), (0, 0), (1, 1), m.groups), size)
        return _window(z, padding[0], in_size[0], padding[1], in_size[1])
    if len(runs[0]) * len(runs[1]) <= _MAX_BOX_PIECES:
        boxed = cache.setdefault("boxed", {}) if channels is None else None  # sliced weights differ
        return _box_transpose(g, weight, runs, padding, dilation, m.groups, in_size, boxed)
    return _conv_input_grad(_resize(g, size), in_size, weight, (1, 1), padding, dilation, m.groups)


class _FastConv2d(torch.autograd.Function):
    """Conv2d at stride 1 (or strided and resampled): the backward is :func:`_conv_transpose`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, spec: _ConvSpec, bias: Tensor | None, resample: bool) -> Tensor:  # type: ignore[override]
        ctx.spec, ctx.resample, ctx.cache, ctx.seed = spec, resample, {}, False
        ctx.in_size = tuple(x.shape[-2:])
        return F.conv2d(x, spec.weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        return _conv_transpose(ctx.spec, g, ctx.in_size, ctx.resample, ctx.cache, ctx.seed), None, None, None


def _max_pool2d(x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """``F.max_pool2d`` computed on a channels-last copy of an NCHW ``x`` and returned in NCHW:
    the same maxima and switches (first maximum of each window), 2-4x faster on one CPU
    thread for VGG-16's pools (the channels-last kernel runs along the channels)."""
    if x.dim() != 4 or x.device.type != "cpu" or not x.is_contiguous():
        return F.max_pool2d(x, *args, **kwargs)
    out = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), *args, **kwargs)
    return tuple(t.contiguous() for t in out) if isinstance(out, tuple) else out.contiguous()




class _FastMaxPool2d(torch.autograd.Function):
    """Resampled max-pooling; the stride-1 switches are found once per forward (at the first
    backward), not once per signal."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, m: _PoolSpec) -> Tensor:  # type: ignore[override]
        ctx.m, ctx.idx = m, None
        ctx.save_for_backward(x)
        return _max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors

        def switches(*args: Any) -> Tensor:
            if ctx.idx is None:
                ctx.idx = _max_pool2d(*args, return_indices=True)[1]
            return ctx.idx

        return _stride1_pool_backward(ctx.m, x, g, switches), None


_OUR_FUNCTIONS = (_GuidedReLU, _GuidedActivation, _HeldSigmaNorm, _SpaceToDepth, _FastConv2d, _FastMaxPool2d,
                  _ResampledAvgPool2d)


# --------------------------------------------------------------------------------------
# Rules. Module rules: small objects bound to module types. Op rules: small objects bound
# to operation names, applied where the operation is called (see _Tracer).
# --------------------------------------------------------------------------------------

class Rule:
    """How one module type is carried backward.

    ``check(module, name, resample)`` raises :class:`UnsupportedModuleError` for a
    configuration the rule cannot handle; ``forward(module, resample)`` returns a
    replacement forward ``f(x) -> Tensor`` (whose autograd backward is the rule), or
    ``None`` to keep the module's own forward. ``vouches``: the operations inside the module
    are covered by the rule (True), or each is checked against the op rules (False).
    """

    vouches = True

    def check(self, module: nn.Module, name: str, resample: bool) -> None:
        return None

    def forward(self, module: nn.Module, resample: bool) -> Callable[[Tensor], Tensor] | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TransposeRule(Rule):
    """A linear module carried back by its transpose (plain autograd), e.g. your own
    ``nn.Module`` type: ``composite=DEFAULT_COMPOSITE.with_rules({MyLinearLayer: TransposeRule()})``."""


class ParameterRule(Rule):
    """A module with parameters whose operations are each carried back by the op rules
    (Conv2d, Linear, LayerNorm, LayerNorm2d, GroupNorm): allowed on the path, nothing vouched."""

    vouches = False


class BatchNormRule(Rule):
    """BatchNorm in eval mode is an affine map: its transpose (scale by w / sqrt(var + eps))."""

    def check(self, module: nn.Module, name: str, resample: bool) -> None:
        if module.running_mean is None:
            raise UnsupportedModuleError(
                f"module {name!r} ({type(module).__name__}) has track_running_stats=False: it normalises "
                "with batch statistics even in eval mode, which is not an affine map")


class PatchMergingRule(Rule):
    """Swin's patch merging (torchvision's ``PatchMerging`` / ``PatchMergingV2``): its 2x2
    stride-2 space-to-depth selection is a downsampling layer; with ``resample`` it runs its
    backward at stride 1 on the nearest-neighbour-resized signal (:class:`_SpaceToDepth`), the
    norm and the linear reduction after it under their own rules."""

    def forward(self, module: nn.Module, resample: bool) -> Callable[[Tensor], Tensor] | None:
        if not resample:
            return None
        v2 = type(module).__name__ == "PatchMergingV2"

        def merged(x: Tensor) -> Tensor:
            H, W = x.shape[-3:-1]
            x = _SpaceToDepth.apply(F.pad(x, (0, 0, 0, W % 2, 0, H % 2)))
            return module.norm(module.reduction(x)) if v2 else module.reduction(module.norm(x))
        return merged


class OpRule:
    """How one operation is carried backward, wherever autograd records it.

    ``__call__(func, args, kwargs, ctx)`` computes the operation (the same forward values)
    so that its autograd backward is the rule; ``ctx`` tells ``resample``, where the call is
    (``ctx.where()``) and which tensors are gates. ``vouches``: the autograd nodes the rule's
    own computation creates are its responsibility (True, the default: a rule that computes
    the operation itself, e.g. :class:`NormRule` or your own autograd Function), or each is
    checked like any other node (False: a rule that hands the call on unchanged in some cases,
    e.g. :class:`ConvRule` for a convolution it does not resample).
    """

    vouches = True

    def __call__(self, func: Callable[..., Any], args: tuple, kwargs: dict, ctx: "_Tracer") -> Any:
        return func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _arg(args: Sequence[Any], kwargs: Mapping[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _needs_rule(x: Any) -> bool:
    return isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled()


#: activation modules whose forward returns the activation: an ``inplace=True`` there runs out
#: of place (the module's output is what the network uses; earlier outputs stay intact).
_ACTIVATION_MODULES = (nn.ReLU, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.Hardswish,
                       nn.Mish, nn.Hardsigmoid, nn.RReLU, nn.Threshold)


class GuidedReLURule(OpRule):
    """ReLU in any form: guided backprop, g_in = max(g, 0) * 1[x > 0] (Springenberg et al.
    2015; the DeconvNet half max(g, 0) from Zeiler & Fergus 2014). In place where the caller
    asked for it (``x.relu_()``, ``F.relu(x, inplace=True)`` in a custom forward)."""

    vouches = False

    def __call__(self, func: Callable[..., Any], args: tuple, kwargs: dict, ctx: "_Tracer") -> Any:
        if not _needs_rule(args[0]):
            return func(*args, **kwargs)
        inplace = ctx.inplace(func, args, kwargs, 1)
        src = None if inplace else ctx.batch_norm_input(args[0])
        if src is not None:  # after an eval BatchNorm: both backwards in one (see _GuidedActivation)
            return _GuidedActivation.apply(src[0], torch.relu, False, _relu_derivative, args[0], src[1])
        return _GuidedReLU.apply(args[0], inplace)


class GuidedActivationRule(OpRule):
    """A pointwise activation f: g_in = max(g, 0) * max(f'(x), 0), f' autograd's derivative of
    the same call (Springenberg et al. 2015's guided backprop, generalised: the signal's
    positive part through the positive part of the local slope; 1[x > 0] for ReLU).
    ``inplace_arg``: the position of the function's ``inplace`` argument (None: it has none)."""

    vouches = False

    def __init__(self, inplace_arg: int | None = None) -> None:
        self.inplace_arg = inplace_arg

    def __call__(self, func: Callable[..., Any], args: tuple, kwargs: dict, ctx: "_Tracer") -> Any:
        x = args[0]
        if not _needs_rule(x):
            return func(*args, **kwargs)
        inplace = ctx.inplace(func, args, kwargs, self.inplace_arg)
        rest, kw = list(args[1:]), dict(kwargs)
        kw.pop("inplace", None)
        if self.inplace_arg is not None and len(args) > self.inplace_arg:
            rest[self.inplace_arg - 1] = False
        if getattr(func, "__name__", "").endswith("_"):  # x.hardtanh_(...): on a copy
            def f(t: Tensor) -> Tensor:
                return func(t.clone(), *rest, **kw)
        else:
            def f(t: Tensor) -> Tensor:
                return func(t, *rest, **kw)
        deriv = _DERIVATIVES.get(_op_key(func))
        df = None if deriv is None else (lambda xd, y: deriv(xd, y, rest, kw))
        src = None if inplace else ctx.batch_norm_input(x)
        if src is not None:  # after an eval BatchNorm: both backwards in one (see _GuidedActivation)
            return _GuidedActivation.apply(src[0], f, False, df, x, src[1])
        return _GuidedActivation.apply(x, f, inplace, df)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(inplace_arg={self.inplace_arg})"


def _map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    return obj


def _collect(obj: Any, out: list[Tensor]) -> None:
    if isinstance(obj, Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _collect(o, out)


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors in ``obj`` (a tensor, nested lists / tuples, or a mapping of them)."""
    out: list[Tensor] = []
    if isinstance(obj, (Tensor, list, tuple)):  # first: the abc check of Mapping costs ~1 us per op call
        _collect(obj, out)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _collect(v, out)
    return out


class HeldGateRule(OpRule):
    """A product (``*``, ``matmul``, ``bmm``, ``einsum``) of a signal with a *gate* -- the
    output of one of ``producers`` (sigmoid, hard-sigmoid, softmax), also after dropout, a
    view or a transpose: the gate is held constant, g_x = g * s, nothing flows into the gate
    branch (Arras et al. 2017, "signal-take-all"; the attention weights of Ali et al., ICML
    2022). Products of two signals neither of which is a gate keep autograd's backward, and
    the graph check refuses them."""

    vouches = False

    def __init__(self, producers: Sequence[str] = ("sigmoid", "hardsigmoid", "softmax")) -> None:
        self.producers = tuple(producers)

    def __call__(self, func: Callable[..., Any], args: tuple, kwargs: dict, ctx: "_Tracer") -> Any:
        ts = _tensors(args)
        gates = [t for t in ts if ctx.is_gate(t)]
        if gates and any(t.requires_grad and not ctx.is_gate(t) for t in ts) and torch.is_grad_enabled():
            args = _map_tensors(args, lambda t: t.detach() if ctx.is_gate(t) else t)
        return func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(producers={self.producers})"


class NormRule(OpRule):
    """LayerNorm (also torchvision's LayerNorm2d, which permutes around ``F.layer_norm``) and
    GroupNorm: y = (x - mean(x)) / sigma.detach() * w + b -- the standard deviation held
    constant, the centring kept (Ali et al., ICML 2022, "XAI for Transformers")."""

    vouches = False

    def __call__(self, func: Callable[..., Any], args: tuple, kwargs: dict, ctx: "_Tracer") -> Any:
        x = args[0]
        if not _needs_rule(x):
            return func(*args, **kwargs)
        w, b, eps = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5)
        if _op_key(func) == "layer_norm":
            shape = _arg(args, kwargs, 1, "normalized_shape")
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            return _HeldSigmaNorm.apply(x, w, b, float(eps), shape, None)
        return _HeldSigmaNorm.apply(x, w, b, float(eps), None, int(_arg(args, kwargs, 1, "num_groups")))


def _held_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                    bool_allows: bool) -> tuple[Tensor, Tensor]:
    """softmax(q k^T scale + mask), held constant, times v. ``bool_allows``: a boolean mask
    marks the allowed positions (scaled_dot_product_attention) or the masked ones (MHA)."""
    logits = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask if bool_allows else mask, float("-inf"))
        else:
            logits = logits + mask
    w = torch.softmax(logits, dim=-1).detach()
    return w @ v, w


_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")


class AttentionRule(OpRule):
    """Attention (``F.scaled_dot_product_attention``; ``nn.MultiheadAttention`` through
    ``F.multi_head_attention_forward``): the softmax weights held constant, the signal flows
    through the values (Ali et al., ICML 2022). Computed as softmax(q k^T / sqrt(d) + mask) @ v
    (the same outputs to float rounding); dropout must be off (the call runs in eval mode)."""

    def __call__(self, func: Callable[..., Any], args: tuple, kwargs: dict, ctx: "_Tracer") -> Any:
        if not any(_needs_rule(t) for t in args[:3]):
            return func(*args, **kwargs)
        if _op_key(func) == "scaled_dot_product_attention":
            return self._sdpa(args, kwargs, ctx)
        return self._mha({**dict(zip(_MHA_ARGS, args)), **kwargs}, ctx)

    @staticmethod
    def _sdpa(args: tuple, kwargs: dict, ctx: "_Tracer") -> Tensor:
        q, k, v = args[:3]
        mask, p = _arg(args, kwargs, 3, "attn_mask"), _arg(args, kwargs, 4, "dropout_p", 0.0)
        causal, scale = _arg(args, kwargs, 5, "is_causal", False), _arg(args, kwargs, 6, "scale")
        if p or kwargs.get("enable_gqa"):
            raise UnsupportedModuleError(f"{ctx.where()}: scaled_dot_product_attention with dropout_p={p} or "
                                         "enable_gqa has no DeconvNet rule")
        if causal:
            L, S = q.shape[-2], k.shape[-2]
            mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return _held_attention(q, k, v, mask, scale, bool_allows=True)[0]

    @staticmethod
    def _mha(a: dict, ctx: "_Tracer") -> tuple[Tensor, Tensor | None]:
        bad = [n for n in ("bias_k", "bias_v", "static_k", "static_v", "key_padding_mask") if a.get(n) is not None]
        bad += [n for n in ("add_zero_attn", "is_causal") if a.get(n)]
        if a.get("dropout_p") and a.get("training", True):
            bad.append("dropout_p")
        if bad:
            raise UnsupportedModuleError(f"{ctx.where()}: multi_head_attention_forward with {', '.join(bad)} has "
                                         "no DeconvNet rule")
        q_in, k_in, v_in = a["query"], a["key"], a["value"]
        unbatched = q_in.dim() == 2
        if unbatched:
            q_in, k_in, v_in = q_in.unsqueeze(1), k_in.unsqueeze(1), v_in.unsqueeze(1)
        L, N, E = q_in.shape
        S, h = k_in.shape[0], int(a["num_heads"])
        d = E // h
        bias = a.get("in_proj_bias")
        bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
        if a.get("use_separate_proj_weight"):
            wq, wk, wv = a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]
        else:
            wq, wk, wv = a["in_proj_weight"].chunk(3)
        q = F.linear(q_in, wq, bq).reshape(L, N * h, d).transpose(0, 1)
        k = F.linear(k_in, wk, bk).reshape(S, N * h, -1).transpose(0, 1)
        v = F.linear(v_in, wv, bv).reshape(S, N * h, -1).transpose(0, 1)
        mask = a.get("attn_mask")
        if mask is not None and mask.dim() == 3:
            mask = mask.reshape(N * h, L, S)
        out, w = _held_attention(q, k, v, mask, 1.0 / math.sqrt(d), bool_allows=False)
        out = F.linear(out.transpose(0, 1).reshape(L, N, -1), a["out_proj_weight"], a.get("out_proj_bias"))
        weights = None
        if a.get("need_weights", True):
            weights = w.view(N, h, L, S)
            weights = weights.mean(1) if a.get("average_attn_weights", True) else weights
            weights = weights.squeeze(0) if unbatched else weights
        return (out.squeeze(1) if unbatched else out), weights


class ConvRule(OpRule):
    """Conv2d (module or ``F.conv2d``): the transpose convolution (DeconvNet, Zeiler & Fergus
    2014); with ``resample`` and stride S > 1 the stride-1 transpose of the nearest-neighbour
    resized signal (the paper's Sec. 3.3) -- patch embeddings included."""

    vouches = False

    def __call__(self, func: Callable[..., Any], args: tuple, kwargs: dict, ctx: "_Tracer") -> Any:
        x = args[0]
        if not _needs_rule(x) or x.dim() != 4:
            return func(*args, **kwargs)
        spec = _ConvSpec(_arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 3, "stride", 1),
                         _arg(args, kwargs, 4, "padding", 0), _arg(args, kwargs, 5, "dilation", 1),
                         int(_arg(args, kwargs, 6, "groups", 1)))
        if not _strided(spec.stride) and ctx.stack[-1] not in ctx.seed_layers:
            return func(*args, **kwargs)  # autograd's own backward is the transpose
        if _fast_conv_ok(spec, ctx.resample):
            return _FastConv2d.apply(x, spec, _arg(args, kwargs, 2, "bias"), ctx.resample)
        return func(*args, **kwargs)  # the graph check refuses a strided one that is not resampled


class PoolRule(OpRule):
    """max_pool2d / avg_pool2d (module or functional): the switches / the average transpose;
    with ``resample`` and stride S > 1 those of the stride-1 pooling of the same forward input
    on the nearest-neighbour resized signal (the paper's Sec. 3.3)."""

    vouches = False

    def __call__(self, func: Callable[..., Any], args: tuple, kwargs: dict, ctx: "_Tracer") -> Any:
        x = args[0]
        kernel, stride = _arg(args, kwargs, 1, "kernel_size"), _arg(args, kwargs, 2, "stride")
        if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
            stride = kernel
        if not (ctx.resample and _needs_rule(x) and x.dim() == 4 and _strided(stride)):
            return func(*args, **kwargs)
        padding = _arg(args, kwargs, 3, "padding", 0)
        if _op_key(func) == "max_pool2d":
            if _arg(args, kwargs, 6, "return_indices", False):
                return func(*args, **kwargs)  # the graph check refuses it
            spec = _PoolSpec(kernel, stride, padding, _arg(args, kwargs, 4, "dilation", 1),
                             bool(_arg(args, kwargs, 5, "ceil_mode", False)))
            return _FastMaxPool2d.apply(x, spec)
        spec = _PoolSpec(kernel, stride, padding, 1, bool(_arg(args, kwargs, 4, "ceil_mode", False)),
                         bool(_arg(args, kwargs, 5, "count_include_pad", True)),
                         _arg(args, kwargs, 6, "divisor_override"))
        return _ResampledAvgPool2d.apply(x, spec)


def _op_key(func: Any) -> str:
    """The name an operation has in a composite: the torch function's name, in-place and
    operator spellings folded (``relu_`` and ``relu``; ``__rmul__``, ``__imul__``, ``mul_``
    and ``mul``; ``__matmul__`` and ``matmul``). Kept per function (it runs for every op of
    a forward)."""
    try:
        return _OP_KEYS[func]
    except (KeyError, TypeError):
        pass
    key = _fold_name(getattr(func, "__name__", "") or "")
    try:
        _OP_KEYS[func] = key
    except TypeError:  # an unhashable callable: not kept
        pass
    return key


_OP_KEYS: dict[Any, str] = {}


def _fold_name(name: str) -> str:
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name[:1] in ("r", "i") and name[1:] in ("mul", "matmul", "add", "sub", "truediv"):
            name = name[1:]
    elif name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name


def _torchvision_rules() -> dict[type, Rule]:
    try:  # torchvision's ConvNeXt LayerNorm2d (permute, F.layer_norm, permute); Swin's patch merging
        from torchvision.models.convnext import LayerNorm2d
        from torchvision.models.swin_transformer import PatchMerging, PatchMergingV2
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return {}
    return {LayerNorm2d: ParameterRule(), PatchMerging: PatchMergingRule(), PatchMergingV2: PatchMergingRule()}


class Composite(Mapping):
    """The rules of one call: module types -> :class:`Rule`, operation names -> :class:`OpRule`.

    ``DEFAULT_COMPOSITE.with_rules({"gelu": MyRule(), MyLayer: TransposeRule()})`` gives a
    copy with those rules added or replaced (``None`` removes one); pass it as
    ``visualize(..., composite=...)``. A plain dict passed as ``composite`` is merged onto
    :data:`DEFAULT_COMPOSITE` the same way.
    """

    def __init__(self, rules: Mapping[type | str, Rule | OpRule]) -> None:
        if not isinstance(rules, Mapping):
            raise TypeError(f"rules: expected a mapping of module types / operation names to rules, got "
                            f"{type(rules).__name__}")
        self._rules: dict[type | str, Rule | OpRule] = {}
        for key, rule in rules.items():
            if isinstance(key, type) and issubclass(key, nn.Module):
                if not isinstance(rule, Rule):
                    raise TypeError(f"rules[{key.__name__}]: expected a vxnb.deconv.Rule for a module type, got "
                                    f"{type(rule).__name__}")
            elif isinstance(key, str):
                if not isinstance(rule, OpRule):
                    raise TypeError(f"rules[{key!r}]: expected a vxnb.deconv.OpRule for an operation name, got "
                                    f"{type(rule).__name__}")
            else:
                raise TypeError(f"rules: keys must be nn.Module subclasses or operation names (str), got {key!r}")
            self._rules[key] = rule

    def __getitem__(self, key: type | str) -> Rule | OpRule:
        return self._rules[key]

    def __iter__(self) -> Iterator[type | str]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def with_rules(self, rules: Mapping[type | str, Rule | OpRule | None]) -> "Composite":
        """A copy with ``rules`` added or replaced; a key mapped to None is removed."""
        if not isinstance(rules, Mapping):
            raise TypeError(f"rules: expected a mapping, got {type(rules).__name__}")
        merged = dict(self._rules)
        for key, rule in rules.items():
            if rule is None:
                merged.pop(key, None)
            else:
                merged[key] = rule
        return Composite(merged)

    def module_rule(self, module: nn.Module) -> Rule | None:
        for cls in type(module).__mro__:
            if cls in self._rules:
                # a subclass with its own forward may compute anything: no inherited rule
                return self._rules[cls] if type(module).forward is cls.forward else None  # type: ignore[return-value]
        return None

    def op_rules(self) -> dict[str, OpRule]:
        return {k: v for k, v in self._rules.items() if isinstance(k, str)}  # type: ignore[misc]

    def __repr__(self) -> str:
        keys = [k.__name__ if isinstance(k, type) else repr(k) for k in self._rules]
        return f"Composite({', '.join(keys)})"


def _default_composite() -> Composite:
    act = {"relu6": 1, "hardtanh": 3, "leaky_relu": 2, "elu": 2, "selu": 1, "celu": 2, "silu": 1,
           "gelu": None, "hardswish": 1, "mish": 1, "softplus": None, "tanh": None, "sigmoid": None,
           "hardsigmoid": 1}
    gate = HeldGateRule()
    params = ParameterRule()
    rules: dict[type | str, Rule | OpRule] = {
        "relu": GuidedReLURule(),
        **{name: GuidedActivationRule(pos) for name, pos in act.items()},
        **{name: gate for name in ("mul", "matmul", "bmm", "einsum")},
        "layer_norm": NormRule(), "group_norm": NormRule(),
        "scaled_dot_product_attention": AttentionRule(), "multi_head_attention_forward": AttentionRule(),
        "conv2d": ConvRule(),
        "max_pool2d": PoolRule(), "avg_pool2d": PoolRule(),
        nn.Conv2d: params, nn.Linear: params,
        nn.BatchNorm1d: BatchNormRule(), nn.BatchNorm2d: BatchNormRule(),
        nn.LayerNorm: params, nn.GroupNorm: params,
        **_torchvision_rules(),
    }
    return Composite(rules)


#: The rules every call uses unless given others (see the module docstring).
DEFAULT_COMPOSITE = _default_composite()


def as_composite(composite: Any) -> Composite:
    """The :class:`Composite` a call uses: ``composite`` itself, a dict merged onto
    :data:`DEFAULT_COMPOSITE`, or the default for None (else a TypeError naming the argument)."""
    if composite is None:
        return DEFAULT_COMPOSITE
    if isinstance(composite, Composite):
        return composite
    if isinstance(composite, Mapping):
        return DEFAULT_COMPOSITE.with_rules(composite)
    raise TypeError(f"composite: expected a vxnb.deconv.Composite, a dict of rules or None, got "
                    f"{type(composite).__name__}")


# --------------------------------------------------------------------------------------
# Applying the rules; recording which module produced which autograd node.
# --------------------------------------------------------------------------------------

#: operations whose output is still the same gate (dropout in eval, views, transposes).
_GATE_KEEPERS = {"dropout", "contiguous", "view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze",
                 "transpose", "permute", "flatten", "to", "type_as"}


class _Tracer(TorchFunctionMode):
    """Applies the op rules of ``composite`` to every torch function called during the forward
    and maps each autograd node created to (module name, op name)."""

    def __init__(self, composite: Composite | None = None, resample: bool = True,
                 modules: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.composite = composite if composite is not None else DEFAULT_COMPOSITE
        self.resample = resample
        self.modules = modules or {}
        self.ops = self.composite.op_rules()
        self.gate_producers = {p for r in self.ops.values() if isinstance(r, HeldGateRule) for p in r.producers}
        self.gates: dict[int, weakref.ref] = {}
        self.stack: list[str] = [""]
        self.origin: dict[Any, tuple[str, str]] = {}
        self.vouched: set[Any] = set()
        self.refused: dict[str, str] = {}  # module name -> why its rule refused it
        self.seed_layers: set[str] = set()
        #: module -> name of the modules whose operations are attributed to them (set by applied_rules)
        self.names: dict[nn.Module, str] = {}
        #: id(output) -> (output, its version, input, its version, running_var, weight, eps) of eval-mode
        #: BatchNorm calls (weak references to the tensors), for the activation after them
        #: (:meth:`batch_norm_input`)
        self.batch_norms: dict[int, tuple[weakref.ref, int, weakref.ref, int, Tensor, Tensor | None, float]] = {}
        self._bn_ruled: dict[str, bool] = {}

    def enter(self, module: nn.Module, inp: Any) -> None:
        """Global forward pre-hook: a module of ``self.names`` starts (others are ignored)."""
        name = self.names.get(module)
        if name is not None:
            self.stack.append(name)

    def leave(self, module: nn.Module, inp: Any, out: Any) -> None:
        """Global forward hook: a module of ``self.names`` returned."""
        if module in self.names and len(self.stack) > 1:
            self.stack.pop()

    # -- for the op rules
    def where(self) -> str:
        name = self.stack[-1]
        module = self.modules.get(name)
        kind = type(module).__name__ if module is not None else "?"
        return f"module {name!r} ({kind})" if name else f"the top-level forward ({kind})"

    def is_gate(self, t: Any) -> bool:
        ref = self.gates.get(id(t))
        return ref is not None and ref() is t

    def _note_batch_norm(self, args: tuple, kwargs: dict, out: Any) -> None:
        """Remember an eval-mode ``F.batch_norm`` (running statistics) of a module whose rule is
        :class:`BatchNormRule`: an activation right after it may carry the signal back through
        both at once (:meth:`batch_norm_input`)."""
        x, rv = args[0] if args else kwargs.get("input"), _arg(args, kwargs, 2, "running_var")
        if (_arg(args, kwargs, 5, "training", False) or rv is None or _arg(args, kwargs, 1, "running_mean") is None
                or not isinstance(out, Tensor) or not isinstance(x, Tensor) or not x.requires_grad or x.dim() < 2):
            return
        name = self.stack[-1]
        ruled = self._bn_ruled.get(name)
        if ruled is None:
            module = self.modules.get(name)
            ruled = self._bn_ruled[name] = (module is not None and name not in self.refused
                                            and isinstance(self.composite.module_rule(module), BatchNormRule))
        if ruled:
            self.batch_norms[id(out)] = (weakref.ref(out), out._version, weakref.ref(x), x._version, rv,
                                         _arg(args, kwargs, 3, "weight"), float(_arg(args, kwargs, 7, "eps", 1e-5)))

    def batch_norm_input(self, t: Tensor) -> tuple[Tensor, Tensor] | None:
        """For ``t`` the output of a remembered eval BatchNorm (:meth:`_note_batch_norm`), neither
        it (ResNet's ``out += identity``) nor the BatchNorm's input x changed in place since: x and
        the per-channel scale weight / sqrt(running_var + eps) of t = x * scale + shift, shaped to
        broadcast along dim 1; else None."""
        entry = self.batch_norms.get(id(t))
        if entry is None or entry[0]() is not t or t._version != entry[1]:
            return None
        x = entry[2]()
        if x is None or x._version != entry[3] or t.shape != x.shape:
            return None
        rv, w, eps = entry[4:]
        scale = torch.rsqrt(rv.detach().to(t.dtype) + eps)
        if w is not None:
            scale = scale * w.detach().to(t.dtype)
        return x, scale.reshape((1, -1) + (1,) * (t.dim() - 2))

    def _mark_gate(self, t: Any) -> None:
        if isinstance(t, Tensor):
            self.gates[id(t)] = weakref.ref(t)

    def inplace(self, func: Any, args: tuple, kwargs: dict, pos: int | None) -> bool:
        """Whether the call asked for an in-place result that must be honoured: ``x.relu_()``
        always; ``inplace=True`` except inside an activation module (which returns it)."""
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):
            return True
        flag = bool(_arg(args, kwargs, pos, "inplace", False)) if pos is not None else bool(kwargs.get("inplace"))
        return flag and not isinstance(self.modules.get(self.stack[-1]), _ACTIVATION_MODULES)

    def _record(self, out: Any, stop: set[Any], label: str, vouch: bool) -> None:
        """Every autograd node one call created between its inputs and its output gets its
        origin (one builtin such as ``F.linear`` on a 3-D input creates several); with
        ``vouch`` (an op rule's own computation) the rule answers for them."""
        todo = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
        where = (self.stack[-1], label)
        while todo:
            node = todo.pop()
            if node is None or node in stop or node in self.origin or hasattr(node, "variable"):
                continue
            self.origin[node] = where
            if vouch:
                self.vouched.add(node)
            todo.extend(n for n, _ in node.next_functions if n is not None)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        key = _op_key(func)
        rule = self.ops.get(key)
        grad = torch.is_grad_enabled()
        ruled = rule is not None and grad
        if grad:
            stop = {t.grad_fn for t in _tensors(args)}
            if kwargs:
                stop.update(t.grad_fn for t in _tensors(kwargs))
        out = rule(func, args, kwargs, self) if ruled else func(*args, **kwargs)
        if grad and func is F.batch_norm:
            self._note_batch_norm(args, kwargs, out)
        if key in self.gate_producers or (key in _GATE_KEEPERS and args and self.is_gate(args[0])):
            self._mark_gate(out)
        if grad:
            vouch = ruled and bool(getattr(rule, "vouches", False))
            self._record(out, stop, key if ruled else getattr(func, "__name__", str(func)), vouch)
        return out


def _only_calls_children(module: nn.Module) -> bool:
    """An ``nn.Sequential`` (or a subclass keeping its forward, e.g. torchvision's
    ``Conv2dNormActivation``): its forward calls its children and no torch function, so no
    operation is attributed to it (the module stack leaves it out)."""
    return type(module).forward is nn.Sequential.forward


def _output_module(modules: Mapping[str, nn.Module], name: str) -> str:
    """The module whose output is the output of module ``name``: itself, or for an
    ``nn.Sequential`` (:func:`_only_calls_children`) that of its last child."""
    module = modules.get(name)
    while module is not None and _only_calls_children(module) and len(module) > 0:
        name = f"{name}.{list(module._modules)[-1]}" if name else list(module._modules)[-1]
        module = modules.get(name)
    return name


@contextlib.contextmanager
def applied_rules(model: nn.Module, *, resample: bool = True, composite: Composite | Mapping | None = None,
                  _tracer: _Tracer | None = None) -> Iterator[nn.Module]:
    """Run ``model`` with the DeconvNet + guided-backprop rules of ``composite`` for the block.

    The model runs in eval mode; module rules that replace a forward do so for the block, op
    rules apply to every torch function called (a ``TorchFunctionMode``). On exit (also on an
    exception) the replacements and hooks are removed and every module's training flag is
    restored; parameters and ``requires_grad`` are never touched. No check of unruled
    operations happens here: :func:`visualize` does that on the autograd graph.
    """
    composite = as_composite(composite)
    # a RecordedForward's tracer has just listed the modules: not walked again
    modules = _tracer.modules if _tracer is not None and _tracer.modules else dict(model.named_modules())
    tracer = _tracer if _tracer is not None else _Tracer(composite, resample, modules)
    patched: list[tuple[nn.Module, bool, Any]] = []
    handles: list[Any] = []
    names: dict[nn.Module, str] = {}
    with eval_mode(model):
        try:
            for name, module in modules.items():
                rule = composite.module_rule(module)
                if rule is not None:
                    try:
                        rule.check(module, name, resample)
                    except UnsupportedModuleError as err:
                        # only an error if the module is on the path: see _check_graph
                        tracer.refused[name] = str(err)
                        rule = None
                if rule is not None:
                    fwd = rule.forward(module, resample)
                    if fwd is not None:
                        had = "forward" in module.__dict__
                        patched.append((module, had, module.__dict__.get("forward")))
                        module.forward = fwd  # instance attribute shadows the class method
                if not _only_calls_children(module):  # its ops are attributed to it
                    names[module] = name
            # two global hooks that look the module up, not two hooks per module: registering and
            # removing ~500 handles cost ~1.5 ms per call on EfficientNet-B0, the calls the same
            tracer.names = names
            handles.append(register_module_forward_pre_hook(tracer.enter))
            handles.append(register_module_forward_hook(tracer.leave))
            with tracer:
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
    "Narrow", "Chunk", "Contiguous", "ViewAsReal", "Flatten", "Unflatten", "Identity", "Roll",
    "ReflectionPad1D", "ReflectionPad2D", "ReplicationPad1D", "ReplicationPad2D",
    "UnsafeSplit", "UnsafeSplitWithSizes", "MaskedFill",
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
        if getattr(node, "_forward_cls", None) in _OUR_FUNCTIONS or node in tracer.vouched:
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
    rule = tracer.composite.module_rule(module)
    leaf = not any(True for _ in module.children())
    if rule is not None and leaf and rule.vouches:
        return None  # produced inside a ruled module: its rule vouches for it
    if rule is None and leaf and any(True for _ in module.parameters(recurse=False)):
        return (f"{where} has parameters but no DeconvNet rule; pass one for its type, e.g. "
                f"composite=DEFAULT_COMPOSITE.with_rules({{{type(module).__name__}: TransposeRule()}}) if it is "
                "linear in its input")
    if op in _STRUCTURAL:
        return None
    if op in _PRODUCTS:
        signals = sum(1 for c, _ in node.next_functions if c is not None and reach.get(c, False))
        if signals <= 1:
            return None
        return (f"{where}: {fname} multiplies two signals that both depend on the input "
                f"({node.name()}), and neither is a gate (a sigmoid or softmax output) the rules hold "
                "constant: no DeconvNet rule")
    if op in _STRIDED:
        stride = tuple(getattr(node, "_saved_stride", None) or ())
        if not stride:  # pooling with stride=None: the stride is the kernel size
            stride = tuple(getattr(node, "_saved_kernel_size", None) or (1,))
        if not resample or all(s == 1 for s in stride):
            return None
        return (f"{where}: {fname} with stride {tuple(stride)} cannot be resampled (no rule in the composite "
                "resamples it in this form); use resample=False")
    if op in ("NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm") and getattr(node, "_saved_training", True) is False:
        return None
    return f"{where}: operation {fname} ({node.name()}) has no DeconvNet rule in the composite"


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
    """One forward of ``model`` on ``x`` under the rules of ``composite``, kept to carry
    signals back from the first output of any of ``layers`` (:meth:`backward`) as often as
    needed: the forward of :func:`visualize` (stopped at its layer) or, in
    ``vxnb.explanations.explain``, the prediction's own forward (run through :meth:`forward`),
    so the network runs once.

    A layer whose output a later in-place operation changed (a ``+=`` after it) is not
    served (:meth:`output` returns None): its seed would no longer be its output.
    """

    def __init__(self, model: nn.Module, x: Tensor, resample: bool, layers: Sequence[str],
                 composite: Composite | Mapping | None = None) -> None:
        self.model, self.resample, self.layers = model, resample, list(layers)
        self.composite = as_composite(composite)
        self.modules = dict(model.named_modules())
        self.tracer = _Tracer(self.composite, resample, self.modules)
        # a conv whose output is a seed keeps its Function (its seed's zero channels left out)
        self.tracer.seed_layers = {_output_module(self.modules, n) for n in self.layers}
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

        with torch.enable_grad(), applied_rules(self.model, resample=self.resample, composite=self.composite,
                                                _tracer=self.tracer):
            handles = [self.modules[n].register_forward_hook(hook(n)) for n in dict.fromkeys(self.layers)]
            try:
                yield self.x_leaf
            finally:
                for h in handles:
                    h.remove()

    def check(self, a: Tensor, layer: str | None) -> None:
        """Refuse (UnsupportedModuleError) an operation without a rule between the input and ``a``."""
        if a.grad_fn is None:
            raise ValueError(f"layer: the output of {layer if layer is not None else 'the model'!r} does not "
                             "depend on the input")
        if layer not in self.checked:
            _check_graph(a.grad_fn, self.x_leaf, self.tracer, self.modules, self.resample)
            if layer is not None:
                self.checked.add(layer)

    def output(self, layer: str) -> Tensor | None:
        """The output of ``layer`` (its graph checked), None if not recorded or changed in place."""
        if layer not in self.outputs:
            return None
        a, version = self.outputs[layer]
        if a._version != version:
            return None
        self.check(a, layer)
        return a

    def visualize(self, layer: str, channels: list[int], layout: tuple[str, int] | None = None) -> Tensor | None:
        """:func:`visualize` of the recorded image (already checked) at ``layer``; None where
        the recording cannot serve ``layer`` (not called, or changed in place): the caller
        then runs :func:`visualize`."""
        if self.output(layer) is None:
            return None
        return _check_finite(run_backward(self, layer, _channel_seed(channels, layer, layout), len(channels)),
                             channels, layer)

    def backward(self, layer: str, seed: Callable[[Tensor, int], Tensor], K: int,
                 batched: bool | None = None) -> Tensor:
        """(B, K, C, H, W): the K signals ``seed(a, k)`` at ``layer``'s output ``a`` carried back."""
        a = self.output(layer)
        if a is None:
            raise ValueError(f"layer: module {layer!r} was not called during the forward pass, or its output "
                             "was changed in place")
        return self.backward_from(a, seed, K, batched)

    def backward_from(self, a: Tensor, seed: Callable[[Tensor, int], Tensor], K: int,
                      batched: bool | None = None) -> Tensor:
        """:meth:`backward` from a checked output ``a`` of the recorded forward."""
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


def record_forward(model: nn.Module, x: Tensor, resample: bool, layers: Sequence[str],
                   composite: Composite | Mapping | None = None) -> RecordedForward:
    """A :class:`RecordedForward` of ``model`` on the checked batch ``x``."""
    return RecordedForward(model, x, resample, layers, composite)


def _backward(model: nn.Module, x: Tensor, layer: str | None, resample: bool,
              seed: Callable[[Tensor, int], Tensor], K: int, composite: Composite | Mapping | None = None,
              batched: bool | None = None) -> Tensor:
    """Core: one forward to ``layer`` (the whole model if None) under the rules (a
    :class:`RecordedForward`), then the K signals back (see :meth:`RecordedForward.backward`)."""
    rec = RecordedForward(model, x, resample, [layer] if layer is not None else [], composite)
    with rec.forward() as x_leaf:
        out = forward_to(model, x_leaf, layer)
    if layer is not None:
        return rec.backward(layer, seed, K, batched)
    if not isinstance(out, Tensor):
        raise ValueError(f"model: expected a tensor output, got {type(out).__name__}")
    rec.check(out, None)
    return rec.backward_from(out, seed, K, batched)


class _VmapFailed(Exception):
    """The vmapped (is_grads_batched) backward hit an op it cannot batch."""


def _channel_seed(channels: list[int], layer: str, layout: tuple[str, int] | None = None
                  ) -> Callable[[Tensor, int], Tensor]:
    """The seed of channel ``channels[k]``: its activations at ``layer``'s output, every other
    channel zero. ``layout`` (as ``vxnb.features`` names it): ``("first", 0)`` (default) --
    channels in dim 1, (B, C, ...) maps and (B, N) units; ``("last", p)`` -- channels in the
    last dim, (B, H, W, C) maps or (B, T, D) tokens whose first ``p`` (class and register)
    tokens are left out of the seed, as they are left out of the feature."""
    kind, prefix = layout if layout is not None else ("first", 0)
    if kind not in ("first", "last") or not isinstance(prefix, int) or prefix < 0:
        raise ValueError(f"layout: expected ('first', 0) or ('last', p) with p >= 0, got {layout!r}")

    def seed(a: Tensor, k: int) -> Tensor:
        if a.dim() < 2:
            raise ValueError(f"layer: expected the output of {layer!r} to be (B, C, ...), got shape {tuple(a.shape)}")
        last = kind == "last" and a.dim() > 2
        n = a.shape[-1 if last else 1]
        q = channels[k]
        if not 0 <= q < n:
            raise IndexError(f"channels: channel {q} is out of range for layer {layer!r}, which has "
                             f"{n} channels (valid: 0..{n - 1})")
        g = torch.zeros_like(a)
        if not last:
            g[:, q] = a[:, q]
        elif a.dim() == 3:
            g[:, prefix:, q] = a[:, prefix:, q]
        else:
            g[..., q] = a[..., q]
        return g
    return seed



def visualize(model: nn.Module, x: Tensor, layer: str, channels: int | Sequence[int], *,
              resample: bool = True, composite: Composite | Mapping | None = None,
              layout: tuple[str, int] | None = None) -> Tensor:
    """DeconvNet + guided-backprop visualisation of filters ``channels`` at ``layer``.

    For each channel q the activation map ``a[:, q]`` of ``layer``'s output (every other
    channel zero) is carried back to the input space with the rules of ``composite`` (see
    the module docstring): the gradient of ``0.5 * ||a_q||^2`` under the DeconvNet/GB
    rules. With ``resample=False`` this is guided backpropagation (equal to Captum's
    ``NeuronGuidedBackprop`` with that seed on ReLU CNNs); with ``resample=True`` (the
    paper's Sec. 3.3) every strided convolution / max- / average-pooling runs its backward at
    stride 1 on the nearest-neighbour-resized signal, which removes the grid artifacts.

    Args:
        model: an ``nn.Module`` (every torchvision classifier works: ReLU CNNs, MobileNets,
            EfficientNets, RegNets, ConvNeXts, Swin, ViT, MaxViT, ...). It is left as it
            was (mode, parameters, hooks), also when an error is raised.
        x: float images (B, C, H, W); C must match the first Conv2d's ``in_channels``.
        layer: a name from ``model.named_modules()``; its output (B, C', ...) is the seed
            (an FC layer: ``channels`` are unit indices; see ``layout`` for tokens and
            channels-last maps). For a module called several
            times the first call counts. The forward stops there.
        channels: an int or a sequence of K channel indices in [0, C').
        resample: use the paper's resampled (stride-1) backward for strided operations.
        composite: the rules (:class:`Composite`; a dict is merged onto
            :data:`DEFAULT_COMPOSITE`; None: the default).
        layout: where ``layer``'s output holds its channels: None or ``("first", 0)``,
            dim 1; ``("last", p)``, the last dim -- a token tensor (B, T, D) of a vision
            transformer, seeded at its patch tokens (the first ``p``, class and register
            tokens, left out), or a channels-last map (B, H, W, C) (Swin).

    Returns:
        (B, K, C, H, W) tensor on the model's device: the input-space visualisation of
        each of the K channels for each image. All K travel back through a single forward:
        on the CPU one after the other (``retain_graph``), elsewhere in one vmapped
        backward (``is_grads_batched``; if it cannot be vmapped, one after the other).

    Raises:
        TypeError: ``x`` is not a float tensor; ``channels`` are not ints; a bad ``composite``.
        ValueError: ``x`` is not (B, C, H, W) with the model's C; unknown ``layer`` (the
            message lists the names); ``layer`` is not reached by the forward.
        IndexError: a channel is out of range (naming it and the number of channels).
        UnsupportedModuleError (a TypeError): a module or an operation on the path from
            the input to ``layer`` has no rule in the composite, named with its module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(resample, bool):
        raise TypeError(f"resample: expected a bool, got {type(resample).__name__}")
    composite = as_composite(composite)
    get_module(model, layer)  # unknown layer -> ValueError listing the names
    chans = _check_channels(channels)
    seed = _channel_seed(chans, layer, layout)
    x = check_image_batch(x, "x", channels=first_conv_in_channels(model))
    device, dtype = model_device_dtype(model, x)
    x = x.to(device=device, dtype=dtype)
    out = run_backward(model, x, layer, resample, seed, len(chans), composite)
    return _check_finite(out, chans, layer)


def _check_finite(out: Tensor, chans: list[int], layer: str) -> Tensor:
    if all_finite(out):
        return out
    bad = ~torch.isfinite(out).flatten(2).all(2)  # (B, K)
    if bool(bad.any()):
        b, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"layer {layer!r}, channel {chans[k]}: the visualisation of image {b} contains NaN or "
                         "inf (non-finite activations or weights); no heatmap is made from it")
    return out




def run_backward(model: nn.Module | RecordedForward, x: Tensor | str | None, layer: Any = None,
                 resample: Any = True, seed: Any = None, K: int = 1,
                 composite: Composite | Mapping | None = None) -> Tensor:
    """The K signals ``seed(a, k)`` at ``layer``'s output carried back to ``x``:
    ``run_backward(model, x, layer, resample, seed, K, composite)`` (one recorded forward),
    or ``run_backward(rec, layer, seed, K)`` through a :class:`RecordedForward` ``rec``. If the
    vmapped backward cannot batch an operation, the K signals go back one by one (a warning)."""
    if isinstance(model, RecordedForward):
        rec, lay, sd, k = model, x, layer, resample
        try:
            return rec.backward(lay, sd, k)  # type: ignore[arg-type]
        except _VmapFailed as err:
            _warn_vmap(err)
            return rec.backward(lay, sd, k, batched=False)  # type: ignore[arg-type]
    try:
        return _backward(model, x, layer, resample, seed, K, composite)  # type: ignore[arg-type]
    except _VmapFailed as err:  # an op in the backward that the vmapped backward cannot batch
        _warn_vmap(err)
        return _backward(model, x, layer, resample, seed, K, composite, batched=False)  # type: ignore[arg-type]


def _warn_vmap(err: Exception) -> None:
    warnings.warn(f"vxnb.deconv: batched backward failed ({str(err).splitlines()[0][:200]}); carrying the "
                  "signals back one by one instead", RuntimeWarning, stacklevel=3)


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
    if not all_finite(v):
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
