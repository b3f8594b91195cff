"""Test oracle: DeconvNet + guided backprop written the plain way (issue 25 moved it here from
``vxnb.deconv``, where it was ``_reference_mode``).

Every ``nn.ReLU`` gets the guided-backprop backward (the signal passes where the forward
input > 0 and the signal > 0); with ``resample`` every strided ``nn.Conv2d`` /
``nn.MaxPool2d`` / ``nn.AvgPool2d`` runs its backward at stride 1 on the nearest-neighbour
resized signal (Sec. 3.3 of the paper) -- the resize done with ``F.interpolate`` and the
stride-1 transpose with ``conv_transpose2d`` / the stride-1 switches, no shortcut. Every
other module keeps autograd's own backward (its transpose). One forward and one plain
autograd backward per channel. Only for ReLU CNNs built from those modules.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))
    return int(v), int(v)


def _stride1_size(in_size, kernel, padding, dilation) -> tuple[int, int]:
    return tuple(int(a) + 2 * o - (d * (m - 1) + 1) + 1 for a, m, o, d in zip(in_size, kernel, padding, dilation))


def _resize(g: Tensor, size) -> Tensor:
    return g if tuple(g.shape[-2:]) == tuple(size) else F.interpolate(g, size=size, mode="nearest")


class GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp_min(0) * (x > 0).to(g.dtype)


class ResampledConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, m):
        ctx.m, ctx.in_size = m, tuple(x.shape[-2:])
        return m._conv_forward(x, m.weight, m.bias)

    @staticmethod
    def backward(ctx, g):
        m = ctx.m
        p, d = _pair(m.padding), _pair(m.dilation)
        size = _stride1_size(ctx.in_size, _pair(m.kernel_size), p, d)
        return F.conv_transpose2d(_resize(g, size), m.weight, None, stride=1, padding=p, groups=m.groups,
                                  dilation=d), None


class ResampledMaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, m):
        ctx.m = m
        ctx.save_for_backward(x)
        return F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        m = ctx.m
        k, p, d = _pair(m.kernel_size), _pair(m.padding), _pair(m.dilation)
        idx = F.max_pool2d(x, k, 1, p, d, return_indices=True)[1]
        size = _stride1_size(x.shape[-2:], k, p, d)
        return torch.ops.aten.max_pool2d_with_indices_backward(_resize(g, size), x, list(k), [1, 1], list(p),
                                                               list(d), False, idx), None


class ResampledAvgPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, m):
        ctx.m = m
        ctx.save_for_backward(x)
        return F.avg_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                            m.divisor_override)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        m = ctx.m
        k, p = _pair(m.kernel_size), _pair(m.padding)
        size = _stride1_size(x.shape[-2:], k, p, (1, 1))
        return torch.ops.aten.avg_pool2d_backward(_resize(g, size), x, list(k), [1, 1], list(p), False,
                                                  m.count_include_pad, m.divisor_override), None


def _strided(s) -> bool:
    return any(v > 1 for v in _pair(s))


@contextlib.contextmanager
def _patched(model: nn.Module, resample: bool) -> Iterator[None]:
    done = []
    try:
        for m in model.modules():
            f = None
            if isinstance(m, nn.ReLU):
                f = GuidedReLU.apply
            elif resample and isinstance(m, nn.Conv2d) and _strided(m.stride):
                f = (lambda mm: lambda x: ResampledConv2d.apply(x, mm))(m)
            elif resample and isinstance(m, nn.MaxPool2d) and _strided(m.stride):
                f = (lambda mm: lambda x: ResampledMaxPool2d.apply(x, mm))(m)
            elif resample and isinstance(m, nn.AvgPool2d) and _strided(m.stride):
                f = (lambda mm: lambda x: ResampledAvgPool2d.apply(x, mm))(m)
            if f is not None:
                m.forward = f
                done.append(m)
        yield
    finally:
        for m in done:
            del m.forward


def reference_visualize(model: nn.Module, x: Tensor, layer: str, channels: Sequence[int], *,
                        resample: bool = True) -> Tensor:
    """(B, K, C, H, W): channel q of ``layer``'s output (others zero) carried back, one
    forward and one autograd backward per channel, the model in eval mode."""
    mod = dict(model.named_modules())[layer]
    was = model.training
    model.eval()
    out = []
    try:
        with _patched(model, resample), torch.enable_grad():
            for q in channels:
                xl = x.detach().clone().requires_grad_(True)
                got = {}
                h = mod.register_forward_hook(lambda m, i, o: got.setdefault("a", o))
                try:
                    model(xl)
                finally:
                    h.remove()
                a = got["a"]
                g = torch.zeros_like(a)
                g[:, q] = a[:, q].detach()
                (gx,) = torch.autograd.grad(a, xl, g)
                out.append(gx)
    finally:
        model.train(was)
    return torch.stack(out, 1)
