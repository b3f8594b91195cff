"""The model graph: what several modules need to know about a network's structure.

Here: the input channels a model expects, the device and dtype it runs in, and running it up to
one layer. The receptive-field analysis (:mod:`vxnb.interpret`) and the layer numbering
(:mod:`vxnb.features`) are the other analyses of the graph.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .utils import get_module

__all__ = ["first_conv_in_channels", "model_device_dtype", "forward_to"]


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
