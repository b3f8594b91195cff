"""Baseline heatmaps the paper compares against (Sec. 4.3), one call each.

``attribution(method, model, x, target, layer=None) -> (B, H, W)``, Captum style: the
same signature for every method, batch-first tensors, maps at input resolution.

Every map is non-negative and **raw** (not min-max normalised: normalise downstream, e.g.
``vxnb.evaluate.iou_curve`` does it per map); low-resolution maps are upsampled to
(H, W) bilinearly (``align_corners=False``).

========================  ==========================================================  =====================
method                    map                                                         computed by
========================  ==========================================================  =====================
``"activation"``          ReLU'd activation of ``layer`` (mean over channels, or       forward hook
                          ``channel``), upsampled; class-independent (``target``
                          unused); conv layers only
``"deconv_gb"``           sum over colour channels of ``|GB|``: guided backprop from   our DeconvNet rules
                          the ``target`` logit (unit seed) through the whole           (``vxnb.deconv``,
                          network (DeconvNet+GB, ``resample=False``)                   checked = Captum GB)
``"gradcam"``             ReLU(sum_k alpha_k A_k), alpha_k = mean gradient             Captum ``LayerGradCam``
``"guided_gradcam"``      sum over colour of ``|GB * upsampled Grad-CAM|``             Captum ``GuidedGradCam``
``"gradcampp"``           Grad-CAM++ (alpha from Eq. 19 of Chattopadhay et al.)        pytorch-grad-cam
                                                                                       ``GradCAMPlusPlus``
``"guided_gradcampp"``    sum over colour of ``|GB * upsampled Grad-CAM++|``           Captum ``GuidedBackprop``
                                                                                       x pytorch-grad-cam
========================  ==========================================================  =====================

pytorch-grad-cam's ``__call__`` min-max normalises and resizes with OpenCV; we take its
raw CAM from ``get_cam_image`` (its own weights and weighting) instead. Its
``GuidedBackpropReLUModel`` is not used: it swaps the model's ReLU modules and puts back
*new* ``nn.ReLU()`` objects (losing ``inplace=True``), i.e. it modifies the model.
The default ``layer`` is the output of the last convolutional layer's ReLU, or in a
transformer the first norm of the last block (:func:`default_target_layer`).

Token layers (ViT, Swin): a layer whose output is tokens (B, T, D) or channels-last (B, H, W, C)
(``vxnb.features.hooks.layout``) is put on its grid here — the class/register tokens dropped, the
patch tokens reshaped to (B, D, h, w) in the input's aspect, channels-last permuted — what
pytorch-grad-cam needs a hand-written ``reshape_transform`` for. Grad-CAM on such a layer is
computed by autograd on the reshaped output (Captum's layer methods cannot reshape); Grad-CAM++
passes the reshape to pytorch-grad-cam; both equal pytorch-grad-cam with its documented
``reshape_transform`` (tests/test_baselines.py).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vxnb._graph import first_conv_in_channels, forward_to, model_device_dtype
from vxnb.deconv import run_backward
from vxnb.features.hooks import layout as feature_layout, partitioned
from vxnb.utils import check_image_batch, eval_mode, get_module

__all__ = ["METHODS", "METHOD_LABELS", "attribution", "attnlrp", "default_target_layer", "layer_maps"]

METHODS: tuple[str, ...] = ("activation", "deconv_gb", "gradcam", "guided_gradcam", "gradcampp",
                            "guided_gradcampp")
#: Display names of the methods (the paper's), "ours" included.
METHOD_LABELS: dict[str, str] = {
    "activation": "Upsampled Act.",
    "deconv_gb": "Deconv+GB",
    "gradcam": "Grad-CAM",
    "guided_gradcam": "Guided Grad-CAM",
    "gradcampp": "Grad-CAM++",
    "guided_gradcampp": "Guided Grad-CAM++",
    "ours": "Ours",
}

_CAPTUM_NOISE = ("Setting backward hooks on ReLU", "Input Tensor 0 did not already require gradients")


def default_target_layer(model: nn.Module, x: Tensor) -> str:
    """Name of the module whose output is the last convolutional layer's ReLU.

    Traced on a forward of ``x[:1]``: the last ``nn.Conv2d`` call, then the first
    ``nn.ReLU`` call after it. A ReLU module that is called several times (torchvision
    ResNet blocks share one) is replaced by the innermost module called once whose output
    is that same tensor (e.g. ``"layer4.1"`` for ResNet-18). Without a ReLU after it, the
    conv itself. Gives ``"features.29"`` for VGG-16, ``"features.11"`` for AlexNet. In a
    transformer, the last block's first LayerNorm (pytorch-grad-cam's choice: ViT, Swin); where
    that norm sees windows rather than the grid (MaxViT), the last module output on the grid
    (``"blocks.3"`` for ``maxvit_t``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    x = check_image_batch(x, "x", channels=first_conv_in_channels(model))
    device, dtype = model_device_dtype(model, x)
    calls: list[tuple[str, nn.Module, Any]] = []
    handles = [m.register_forward_hook(lambda mod, inp, out, _n=n: calls.append((_n, mod, out)))
               for n, m in model.named_modules() if n]
    try:
        with torch.no_grad(), eval_mode(model):
            model(x[:1].to(device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    convs = [i for i, (_, m, _) in enumerate(calls) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"model: {type(model).__name__} has no nn.Conv2d layer; pass layer= explicitly")
    i = convs[-1]
    norms = [j for j in range(i + 1, len(calls)) if _attention_norm(model, calls[j][0], calls[j][1])]
    if norms and partitioned(model, calls[norms[-1]][0]):
        # windowed attention (MaxViT): its norms see windows, not the grid; the last map on the
        # grid instead (the last block's output, before the head's pooling)
        grid = [n for n, _, o in calls[i + 1:] if isinstance(o, Tensor) and o.dim() == 4 and min(o.shape[-2:]) > 1
                and not partitioned(model, n) and feature_layout(model, n)[0] != "last"]
        if grid:
            return grid[-1]
    elif norms:  # a transformer: the last block's first norm (pytorch-grad-cam's choice for ViT and Swin)
        return calls[norms[-1]][0]
    relus = [j for j in range(i + 1, len(calls)) if isinstance(calls[j][1], nn.ReLU)]
    if not relus:
        return calls[i][0]
    j = relus[0]
    name, _, out = calls[j]
    counts: dict[str, int] = {}
    for n, _, _ in calls:
        counts[n] = counts.get(n, 0) + 1
    if counts[name] == 1:
        return name
    for n, _, o in calls[j + 1:]:
        if o is out and counts[n] == 1:
            return n
    return calls[i][0]


def _attention_norm(model: nn.Module, name: str, module: nn.Module) -> bool:
    """Is ``module`` the first ``nn.LayerNorm`` of a block that holds an attention module?"""
    if type(module) is not nn.LayerNorm or "." not in name:
        return False
    parent = get_module(model, name.rpartition(".")[0])
    children = list(parent.children())
    has_attention = any(isinstance(c, nn.MultiheadAttention) or "Attention" in type(c).__name__ for c in children)
    first_norm = next((c for c in children if type(c) is nn.LayerNorm), None)
    return has_attention and first_norm is module


def _to_maps(a: Tensor, kind: str, prefix: int, layer: str, size: tuple[int, int]) -> Tensor:
    """A layer output as (B, C, h, w) maps: channels-first as it is; tokens (B, T, D) — the
    patch tokens after the ``prefix`` class/register tokens — on their grid (the aspect of the
    input), what pytorch-grad-cam's ``reshape_transform`` does for a ViT; (B, H, W, C) permuted (Swin)."""
    if a.dim() == 3 and kind in ("last", "tokens?"):
        n = a.shape[1] - prefix
        h = max(1, round((n * size[0] / size[1]) ** 0.5))
        if n <= 0 or n % h:
            raise ValueError(f"layer: {layer!r} outputs {a.shape[1]} tokens; {prefix} class/register token(s) "
                             f"leave {n}, which do not fill a grid of the input's aspect {size[0]}x{size[1]}")
        return a[:, prefix:].reshape(a.shape[0], h, n // h, a.shape[2]).permute(0, 3, 1, 2)
    if a.dim() == 4 and kind == "last":
        return a.permute(0, 3, 1, 2)
    return a


def layer_maps(model: nn.Module, layer: str, a: Tensor, size: tuple[int, int]) -> Tensor | None:
    """``layer``'s output ``a`` as (B, C, h, w) maps: a convolutional map as it is, a token layer's
    patch tokens (B, T, D) on their grid and a channels-last map (B, H, W, C) permuted
    (:func:`vxnb.features.hooks.layout` says which), or None for an output without a spatial grid
    (a fully connected layer's (B, D)) or with its positions in windows (MaxViT's attention,
    :func:`vxnb.features.hooks.partitioned`). ``size``: the input's (H, W), whose aspect the token
    grid takes."""
    if partitioned(model, layer):
        return None
    kind, prefix = feature_layout(model, layer)
    if (a.dim() == 3 and kind in ("last", "tokens?")) or (a.dim() == 4 and kind == "last"):
        return _to_maps(a, kind, prefix, layer, size)
    return a if a.dim() == 4 else None


def _token_gradcam(model: nn.Module, x: Tensor, module: nn.Module, t: Tensor,
                   reshape: Any) -> Tensor:
    """Grad-CAM (Selvaraju et al., Eq. 1-2) on a token / channels-last layer: ReLU(sum_k alpha_k A_k),
    alpha_k the mean over the grid of d logit_t / d A_k, A the layer output on its grid."""
    store: dict[str, Tensor] = {}
    handle = module.register_forward_hook(lambda mod, inp, out: store.__setitem__("a", out))
    try:
        x_req = x.detach().requires_grad_(True)  # gradients w.r.t. the layer only: no .grad on parameters
        with torch.enable_grad():
            logits = model(x_req)
            a = store["a"]
            (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), a)
    finally:
        handle.remove()
    A, G = reshape(a.detach()), reshape(g)
    cam = (G.mean(dim=(2, 3), keepdim=True) * A).sum(dim=1)
    return _upsample(cam.clamp_min(0), tuple(x.shape[-2:]))


def _check_target(target: Any, B: int, logits: Tensor) -> Tensor:
    n = logits.shape[1]
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, (bool, np.bool_)):
        raise TypeError(f"target: expected an int, a sequence of {B} ints or None, got {target!r}")
    if isinstance(target, (int, np.integer)):
        t = torch.full((B,), int(target), dtype=torch.long)
    else:
        if isinstance(target, Tensor):
            if target.is_floating_point() or target.dtype == torch.bool or target.dim() > 1:
                raise TypeError(f"target: expected integer class indices, got a tensor of dtype {target.dtype} "
                                f"and shape {tuple(target.shape)}")
            t = target.reshape(-1).long().cpu()
        elif isinstance(target, (Sequence, np.ndarray)):
            vals = list(np.asarray(target).reshape(-1))
            if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in vals):
                raise TypeError(f"target: expected integer class indices, got {target!r}")
            t = torch.tensor([int(v) for v in vals], dtype=torch.long)
        else:
            raise TypeError(f"target: expected an int, a sequence of {B} ints or None, got {type(target).__name__}")
        if t.numel() != B:
            raise ValueError(f"target: expected one class per image ({B}), got {t.numel()}")
    bad = [int(v) for v in t if not 0 <= int(v) < n]
    if bad:
        raise IndexError(f"target: class {bad[0]} is out of range for a model with {n} outputs (valid: 0..{n - 1})")
    return t.to(logits.device)


def _upsample(m: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h, w) -> (B, H, W), bilinear, clamped at 0 (bilinear keeps non-negative maps so)."""
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return m.clamp_min(0)


def _activation(a: Tensor, size: tuple[int, int], layer: str, channel: int | None) -> Tensor:
    if channel is not None:
        if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)):
            raise TypeError(f"channel: expected an int, got {channel!r}")
        if not 0 <= channel < a.shape[1]:
            raise IndexError(f"channel: channel {channel} is out of range for layer {layer!r}, which has "
                             f"{a.shape[1]} channels")
        m = a[:, int(channel)].clamp_min(0)
    else:
        m = a.clamp_min(0).mean(dim=1)
    return _upsample(m, size)


def _deconv_gb(model: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    def seed(out: Tensor, k: int) -> Tensor:
        g = torch.zeros_like(out)
        g[torch.arange(out.shape[0], device=out.device), t] = 1.0
        return g
    v = run_backward(model, x, None, False, seed, 1)[:, 0]  # (B, C, H, W)
    return v.abs().sum(dim=1)


def _gradcampp_raw(model: nn.Module, x: Tensor, layer_module: nn.Module, t: Tensor, reshape: Any = None) -> Tensor:
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = GradCAMPlusPlus(model=model, target_layers=[layer_module], reshape_transform=reshape)
    try:
        x_req = x.detach().requires_grad_(True)  # gradients w.r.t. x only: no .grad on parameters
        with torch.enable_grad():
            outputs = cam.activations_and_grads(x_req)
            targets = [ClassifierOutputTarget(int(c)) for c in t]
            loss = sum(tg(o) for tg, o in zip(targets, outputs))
            torch.autograd.grad(loss, x_req)  # the layer's tensor hooks record the gradients
        acts, grads = cam.activations_and_grads.activations, cam.activations_and_grads.gradients
        if len(acts) != 1 or len(grads) != 1:
            raise ValueError(f"layer: Grad-CAM++ needs a layer called once per forward; it was called {len(acts)} "
                             "times (a shared module?)")
        raw = cam.get_cam_image(x_req, layer_module, targets, acts[0].numpy(), grads[0].numpy(), False)
    finally:
        cam.activations_and_grads.release()
    m = torch.from_numpy(np.maximum(raw, 0)).to(device=x.device, dtype=x.dtype)
    return _upsample(m, tuple(x.shape[-2:]))


def attribution(method: str, model: nn.Module, x: Tensor, target: int | Sequence[int] | Tensor | None, *,
                layer: str | None = None, channel: int | None = None) -> Tensor:
    """A baseline heatmap per image: (B, H, W), non-negative, raw (see the module docstring).

    Args:
        method: one of :data:`METHODS`.
        model: a classifier returning logits (B, num_classes); it is left as it was (mode,
            parameters, hooks, ``.grad``).
        x: float images (B, C, H, W).
        target: the class per image (an int for all, a sequence / 1-D tensor of B ints),
            or None for the predicted class. Unused by ``"activation"``.
        layer: name in ``model.named_modules()`` for the layer-based methods
            (activation, Grad-CAM family); default :func:`default_target_layer`.
        channel: ``"activation"`` only: one channel instead of the channel mean.

    Returns:
        (B, H, W) float tensor on the model's device.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}; got {method!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    x = check_image_batch(x, "x", channels=first_conv_in_channels(model))
    if channel is not None and method != "activation":
        raise ValueError(f"channel: only used by method 'activation', got channel={channel!r} with {method!r}")
    if layer is not None:
        get_module(model, layer)
    device, dtype = model_device_dtype(model, x)
    x = x.to(device=device, dtype=dtype)
    B, size = x.shape[0], tuple(x.shape[-2:])
    with eval_mode(model):
        with torch.no_grad():
            logits = model(x)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != B:
            raise ValueError(f"model: expected logits of shape (B, num_classes), got "
                             f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
        t = _check_target(target, B, logits)
        if method == "deconv_gb":
            out = _deconv_gb(model, x, t)
        else:
            if layer is None:
                layer = default_target_layer(model, x)
            module = get_module(model, layer)
            with torch.no_grad():
                a = forward_to(model, x, layer)
            maps = layer_maps(model, layer, a, size)
            if maps is None and partitioned(model, layer):
                raise ValueError(f"layer: {layer!r} holds its positions in windows (inside MaxViT's partitioned "
                                 f"attention), not on the image grid; pick a block's output (e.g. the "
                                 f"PartitionAttentionLayer itself, whose departition puts them back)")
            if maps is None:
                raise ValueError(f"layer: method {method!r} needs a convolutional layer (output (B, C, h, w)) or "
                                 f"a token layer ((B, T, D) / (B, H, W, C)); {layer!r} outputs shape "
                                 f"{tuple(a.shape)} (a fully connected layer?)")
            tokens = maps is not a  # put on the grid by layer_maps: a token or channels-last layer
            kind, prefix = feature_layout(model, layer)

            def reshape(v: Tensor) -> Tensor:
                return _to_maps(v, kind, prefix, layer, size)
            if method == "activation":
                out = _activation(maps, size, layer, channel)
            elif method in ("gradcampp", "guided_gradcampp"):
                out = _gradcampp_raw(model, x, module, t, reshape if tokens else None)
                if method == "guided_gradcampp":
                    out = (_captum_gb(model, x, t) * out.unsqueeze(1)).abs().sum(dim=1)
            elif tokens:  # Captum's layer methods take the output as it is: reshape here
                out = _token_gradcam(model, x, module, t, reshape)
                if method == "guided_gradcam":
                    out = (_captum_gb(model, x, t) * out.unsqueeze(1)).abs().sum(dim=1)
            else:
                from captum.attr import GuidedGradCam, LayerAttribution, LayerGradCam
                with warnings.catch_warnings():
                    for msg in _CAPTUM_NOISE:
                        warnings.filterwarnings("ignore", message=msg)
                    if method == "gradcam":
                        cam = LayerGradCam(model, module).attribute(x, target=t, relu_attributions=True)
                        out = _upsample(LayerAttribution.interpolate(cam, size, "bilinear")[:, 0], size)
                    else:  # guided_gradcam
                        g = GuidedGradCam(model, module).attribute(x, target=t, interpolate_mode="bilinear")
                        if g.shape != x.shape:
                            raise ValueError(f"layer: Grad-CAM at {layer!r} could not be upsampled to the input")
                        out = g.abs().sum(dim=1)
    return out.detach()


def _captum_gb(model: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    from captum.attr import GuidedBackprop
    with warnings.catch_warnings():
        for msg in _CAPTUM_NOISE:
            warnings.filterwarnings("ignore", message=msg)
        return GuidedBackprop(model).attribute(x, target=t)


#: the classes lxt's torchvision-ViT patch map replaces the forward of (``lxt.efficient.models.vit_torch``)
_LXT_PATCHED = (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)


@contextmanager
def _lxt_patches() -> Iterator[None]:
    """lxt's ViT patches (identity rule on GELU and LayerNorm, CP-LRP in attention) for the
    duration only: lxt patches the *classes* ``torch.nn.GELU/LayerNorm/MultiheadAttention``
    process-wide, which would change every other backward (our DeconvNet rules included)."""
    from torchvision.models import vision_transformer

    saved = {c: {a: vars(c)[a] for a in ("forward", "original_forward") if a in vars(c)} for c in _LXT_PATCHED}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*zennit.*")  # its Gamma patch, unused here (see attnlrp)
        try:
            from lxt.efficient import monkey_patch
        except ImportError as err:
            raise ImportError("attnlrp needs lxt 2.1 and transformers<5 (vxnb's dev extras: "
                              "pip install 'vxnb[dev]' or pip install 'lxt==2.1' 'transformers<5')") from err
        monkey_patch(vision_transformer)
    try:
        yield
    finally:
        for c, attrs in saved.items():
            for a in ("forward", "original_forward"):
                if a in attrs:
                    setattr(c, a, attrs[a])
                elif a in vars(c):
                    delattr(c, a)


def attnlrp(model: nn.Module, x: Tensor, target: int | Sequence[int] | Tensor | None, *,
            layer: str | None = None, positive: bool = True) -> Tensor:
    """AttnLRP (Achtibat et al., ICML 2024) by ``lxt`` for a transformer with
    ``torch.nn.MultiheadAttention`` (torchvision's ``VisionTransformer``): (B, H, W), the positive
    part of the relevance Σ_c x ⊙ ∂y_t/∂x with lxt's rules, i.e. lxt's torchvision-ViT map — the
    identity rule on GELU and LayerNorm (σ held constant), CP-LRP in attention (no gradient
    through query and key) — and LRP-0 (gradient × input) on the linear and conv layers. lxt's
    example puts zennit's Gamma rule on those; its zennit patch needs zennit ≥ 0.5 (``ParamMod``),
    while zennit-crp pins zennit ≤ 0.4.6. ``layer`` is unused (the benchmark's signature);
    ``positive=False`` gives the signed relevance (its sum is the logit when the model has no
    biases: LRP's conservation).
    Refuses a model without ``nn.MultiheadAttention`` (a CNN, Swin, MaxViT) with a ValueError."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        raise ValueError(f"model: AttnLRP (lxt) explains transformers built on torch.nn.MultiheadAttention "
                         f"(torchvision's VisionTransformer); {type(model).__name__} has none (a CNN, Swin or "
                         "MaxViT?)")
    x = check_image_batch(x, "x", channels=first_conv_in_channels(model))
    device, dtype = model_device_dtype(model, x)
    x_req = x.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
    with eval_mode(model), _lxt_patches(), torch.enable_grad():
        logits = model(x_req)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"model: expected logits of shape (B, num_classes), got "
                             f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
        t = _check_target(target, x.shape[0], logits)
        (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), x_req)
    r = (x_req.detach() * g).sum(dim=1)
    return r.clamp_min(0) if positive else r
