"""Forward hooks and the per-layer descriptors (Sec. 3.1 of the paper).

For each selected layer the output of every channel is reduced to one number — its L2 norm
over the spatial positions (conv maps (B, C, H, W); FC outputs (B, C) give ``|a|`` per unit) —
the layer's descriptor is L1-normalised per image (a layer whose descriptor is all zero stays
zero) and the layer descriptors are concatenated into ``x`` (m entries).

Transformers (:func:`layout`): a token tensor (B, T, D) gives D features, each the L2 norm over
the *patch* tokens — the class token and register tokens, which come first (torchvision's
``VisionTransformer``: token 0 is the class token; timm-style models say how many in
``num_prefix_tokens``), are excluded. A channels-last map (B, H, W, C) — Swin's blocks and patch
merging, ``nn.LayerNorm``/``nn.Linear`` over the last axis, ConvNeXt's permuted MLP — gives C
features, the L2 norm over H and W. Every other output is channels-first, as before.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..utils import ForwardHooks, check_layer_names, describe, eval_mode, get_module, model_device
from .layers import check_columns, layers_of_columns, resolve_layers

__all__ = ["descriptors", "layout", "partitioned", "prefix_tokens", "Recorder", "l1_normalise", "column_layers", "check_nonfinite"]


#: modules whose output is channels-first whatever their rank (conv, normalisation, pooling)
_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
          nn.GroupNorm, nn.LocalResponseNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
          nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
#: the modules that neither move nor mix the channel axis: their layout is their input's
_POINTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
              nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Dropout, nn.Identity)


def _token_modules() -> tuple[type, ...]:
    """Transformer blocks whose output is tokens / channels-last (torchvision's ViT and Swin)."""
    from torchvision.models import swin_transformer as sw, vision_transformer as vt

    return (vt.Encoder, vt.EncoderBlock, vt.MLPBlock, sw.SwinTransformerBlock, sw.SwinTransformerBlockV2,
            sw.PatchMerging, sw.PatchMergingV2)


def _module_layout(model: nn.Module, name: str) -> str | None:
    """``"last"`` (channels-last: tokens (B, T, D), maps (B, H, W, C)), ``"first"`` or None (unknown)."""
    m = get_module(model, name)
    if isinstance(m, _FIRST) or type(m).__name__ == "LayerNorm2d":  # ConvNeXt's LayerNorm2d permutes back
        return "first"
    if type(m) in (nn.LayerNorm, nn.Linear) or isinstance(m, _token_modules()):
        return "last"
    if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
        layer = m if isinstance(m, nn.TransformerEncoderLayer) else m.layers[0]
        return "last" if layer.self_attn.batch_first else None
    dims = getattr(m, "dims", None)
    if type(m).__name__ == "Permute" and isinstance(dims, (list, tuple)) and len(dims) >= 3:
        return "last" if list(dims[-1:]) == [1] else "first" if dims[1] == len(dims) - 1 else None
    if isinstance(m, nn.Sequential) and len(m):  # a stage: its last module's layout
        last = list(m._modules)[-1]
        return _module_layout(model, f"{name}.{last}" if name else last)
    if isinstance(m, _POINTWISE) and name:  # a pointwise module in a Sequential: its predecessor's layout
        parent_name, _, own = name.rpartition(".")
        parent = get_module(model, parent_name) if parent_name else model
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            i = names.index(own)
            if i > 0:
                return _module_layout(model, f"{parent_name}.{names[i - 1]}" if parent_name else names[i - 1])
    return None


def _partition_modules() -> tuple[type, ...]:
    """Modules whose children hold the positions in windows (torchvision's MaxViT attention)."""
    from torchvision.models import maxvit

    return (maxvit.PartitionAttentionLayer,)


def partitioned(model: nn.Module, name: str) -> bool:
    """Whether module ``name``'s output holds its positions in windows rather than on the image
    grid: inside torchvision MaxViT's ``PartitionAttentionLayer``, everything between the window
    partition and ``departition_op`` is (B, windows, positions per window, C). Its descriptor is
    still each channel's L2 norm over all positions, but it has no map to draw as it is."""
    parts = name.split(".") if name else []
    for i in range(len(parts) - 1, 0, -1):
        if isinstance(get_module(model, ".".join(parts[:i])), _partition_modules()):
            return parts[i] != "departition_op"
    return False


def prefix_tokens(model: nn.Module) -> int:
    """How many tokens precede the patch tokens (class and register tokens): ``num_prefix_tokens``
    where the model says (timm), else the width of ``class_token``/``cls_token`` and of
    ``register_tokens``/``reg_token`` (torchvision's ViT: 1), else 0."""
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool):
        return int(n)
    total = 0
    for attr in ("class_token", "cls_token", "register_tokens", "reg_token"):
        tok = getattr(model, attr, None)
        if isinstance(tok, torch.Tensor) and tok.dim() == 3:
            total += int(tok.shape[1])
    return total


def layout(model: nn.Module, name: str) -> tuple[str, int]:
    """How the output of module ``name`` holds its channels: ``("first", 0)`` — (B, C, ...), the
    norm over every axis after C; ``("last", p)`` — (B, T, D) tokens, the norm over the tokens after
    the first ``p`` (class and register tokens), or (B, H, W, C), the norm over H and W. A 3-D
    output of a module of unknown layout is tokens in a model with prefix tokens, else (B, C, L)."""
    kind = _module_layout(model, name)
    p = prefix_tokens(model)
    if kind is None:
        kind = "tokens?" if p else "first"
    return kind, p


def _channel_norms(out: Any, name: str, kind: str = "first", prefix: int = 0) -> torch.Tensor:
    """(B, C) float32: L2 norm of every channel over all positions; |a| for (B, C) outputs; see
    :func:`layout` for tokens and channels-last maps."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"layers: module {name!r} returns {describe(out)}, not a tensor; "
                        "choose a module whose output is a single (B, C, ...) tensor")
    if out.dim() < 2:
        raise ValueError(f"layers: module {name!r} has an output of shape {tuple(out.shape)}; "
                         "expected (B, C) or (B, C, H, W)")
    out = out.detach()
    if out.dim() == 2:
        return out.abs().float()
    if out.dim() == 3 and kind in ("last", "tokens?"):  # (B, T, D): the patch tokens only
        if out.shape[1] <= prefix:
            raise ValueError(f"layers: module {name!r} has {out.shape[1]} tokens, no patch token after the "
                             f"{prefix} class/register token(s)")
        return torch.linalg.vector_norm(out[:, prefix:], ord=2, dim=1, dtype=torch.float32)
    if out.dim() == 4 and kind == "last":  # (B, H, W, C)
        return torch.linalg.vector_norm(out, ord=2, dim=(1, 2), dtype=torch.float32)
    return torch.linalg.vector_norm(out, ord=2, dim=tuple(range(2, out.dim())), dtype=torch.float32)


def column_layers(widths: Sequence[int], device: torch.device) -> torch.Tensor:
    """(m,) LongTensor: the index of the layer of every entry of x."""
    return torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(list(widths))).to(device)


def l1_normalise(raws: Sequence[torch.Tensor], col_layer: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw concatenated (B, m), per-layer L1-normalised (B, m), per-layer sums (B, layers)).
    Entries are ≥ 0, so the L1 norm is the sum, and a NaN or inf anywhere in a layer shows in
    its sum; a layer whose descriptor sums to 0 stays 0. A fixed number of kernels whatever
    the number of layers (``col_layer`` from :func:`column_layers`), two of them on (B, m)."""
    raw = torch.cat(list(raws), dim=1)
    if col_layer is None:
        col_layer = column_layers([r.shape[1] for r in raws], raw.device)
    sums = raw.new_zeros((raw.shape[0], len(raws))).index_add_(1, col_layer, raw)   # (B, layers)
    inv = torch.where(sums > 0, sums.reciprocal(), sums.new_zeros(()))
    return raw, raw * inv.index_select(1, col_layer), sums


class Recorder(ForwardHooks):
    """Forward hooks computing each selected layer's channel norms inside the hook (so that a
    later in-place op — torchvision's ``ReLU(inplace=True)``, ResNet's ``+=`` — cannot alter
    them), optionally keeping a clone of the raw output for callbacks."""

    def __init__(self, model: nn.Module, layers: Sequence[str], keep_outputs: bool = False):
        self.layers = list(layers)
        self.hooked = {n: get_module(model, n) for n in self.layers}
        self.layouts = {n: layout(model, n) for n in self.layers}
        self.keep_outputs = keep_outputs
        self.raw: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: Counter = Counter()

    def _hook(self, name: str) -> Callable:
        def fn(module: nn.Module, inputs: Any, output: Any) -> None:
            self.calls[name] += 1
            self.raw[name] = _channel_norms(output, name, *self.layouts[name])
            if self.keep_outputs:
                self.outputs[name] = output.detach().clone()
        return fn


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


def check_nonfinite(raw: torch.Tensor, columns: pd.DataFrame | None, layers: Sequence[str],
                     widths: Sequence[int]) -> None:
    if not bool(torch.isfinite(raw).all()):
        raise ValueError(f"descriptor: NaN or inf in the response of {_locate_bad(raw, columns, layers, widths)}; "
                         "check the input images and the model weights")


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
        columns = check_columns(columns)
        col_layers, widths = layers_of_columns(columns)
        if layers is None and not only_conv:
            layers = check_layer_names(model, col_layers, "columns")
        else:
            layers = resolve_layers(model, layers, only_conv)
            if layers != col_layers:
                raise ValueError(f"layers: {layers} differ from the layers of columns {col_layers}")
    else:
        layers = resolve_layers(model, layers, only_conv)
    device = model_device(model)
    with eval_mode(model), contextlib.nullcontext() if keep_graph else torch.no_grad(), Recorder(model, layers) as rec:
        out = model(x.to(device))
        raws = rec.collect(x.shape[0], widths)
    raw, desc, _ = l1_normalise(raws)
    check_nonfinite(raw, columns, layers, [r.shape[1] for r in raws])
    return (desc, out) if return_output else desc
