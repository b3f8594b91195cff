"""vxnb.baselines: every method's shape / finiteness / sign, Grad-CAM and Grad-CAM++ by
hand on a tiny net, deconv_gb = Captum GuidedBackprop, errors, the model left unchanged."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import captum.attr  # noqa: F401 - required dependencies: an ImportError fails, never skips
import pytorch_grad_cam  # noqa: F401
import torchvision
from torch import nn

from vxnb.baselines import METHODS, attnlrp, attribution, default_target_layer
from nets import pooled_net


def layer_grads(model: nn.Module, x: torch.Tensor, layer: nn.Module, target: list[int]):
    """Activations A of ``layer`` and dy_target/dA by plain autograd."""
    store = {}
    h = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        y = model(x)
    finally:
        h.remove()
    a = store["a"]
    (g,) = torch.autograd.grad(y[torch.arange(len(target)), target].sum(), a)
    return a.detach(), g.detach()


def test_methods_tuple():
    assert METHODS == ("activation", "deconv_gb", "gradcam", "guided_gradcam", "gradcampp", "guided_gradcampp")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_shape_finite_nonnegative(method):
    model = pooled_net()
    x = torch.rand(3, 3, 32, 32)
    m = attribution(method, model, x, [0, 1, 3])
    assert m.shape == (3, 32, 32)
    assert torch.isfinite(m).all() and (m >= 0).all() and m.sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_resnet18(method):
    model = torchvision.models.resnet18(num_classes=5)
    model.train()
    x = torch.rand(2, 3, 64, 64)
    m = attribution(method, model, x, 2)
    assert m.shape == (2, 64, 64) and torch.isfinite(m).all() and (m >= 0).all()
    assert all(mod.training for mod in model.modules())
    assert all(not (mod._forward_hooks or mod._backward_hooks or mod._forward_pre_hooks) for mod in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_gradcam_by_hand():
    model = pooled_net()
    x = torch.rand(2, 3, 32, 32)
    target = [1, 2]
    a, g = layer_grads(model, x, model.relu2, target)
    alpha = g.mean(dim=(2, 3), keepdim=True)
    cam = (alpha * a).sum(1, keepdim=True).clamp_min(0)
    expected = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    got = attribution("gradcam", model, x, target)  # default layer: relu2
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    got_conv = attribution("gradcam", model, x, target, layer="relu2")
    torch.testing.assert_close(got_conv, got)


def test_gradcampp_by_hand():
    model = pooled_net()
    x = torch.rand(2, 3, 32, 32)
    target = [3, 0]
    a, g = layer_grads(model, x, model.relu2, target)
    # Chattopadhay et al. Eq. 19 (exp(score) dropped, as pytorch-grad-cam does)
    denom = 2 * g ** 2 + a.sum(dim=(2, 3), keepdim=True) * g ** 3
    alpha = torch.where(g != 0, g ** 2 / (denom + 1e-6), torch.zeros_like(g))
    w = (alpha * g.clamp_min(0)).sum(dim=(2, 3), keepdim=True)
    cam = (w * a).sum(1, keepdim=True).clamp_min(0)
    expected = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    got = attribution("gradcampp", model, x, target)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_deconv_gb_equals_captum_guided_backprop():
    from captum.attr import GuidedBackprop
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.rand(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = GuidedBackprop(model).attribute(x, target=torch.tensor([1, 4])).abs().sum(1)
    torch.testing.assert_close(attribution("deconv_gb", model, x, [1, 4]), ref, atol=1e-6, rtol=1e-5)


def test_guided_gradcam_is_gb_times_gradcam():
    from captum.attr import GuidedBackprop
    model = pooled_net()
    x = torch.rand(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gb = GuidedBackprop(model).attribute(x, target=torch.tensor([0, 2]))
    cam = attribution("gradcam", model, x, [0, 2])
    torch.testing.assert_close(attribution("guided_gradcam", model, x, [0, 2]), (gb * cam[:, None]).abs().sum(1),
                               atol=1e-6, rtol=1e-5)
    campp = attribution("gradcampp", model, x, [0, 2])
    torch.testing.assert_close(attribution("guided_gradcampp", model, x, [0, 2]),
                               (gb * campp[:, None]).abs().sum(1), atol=1e-6, rtol=1e-5)


def test_activation_by_hand_and_fc_error():
    model = pooled_net()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a = model[:4](x)  # conv2 output (pre-ReLU)
    expected = F.interpolate(a.clamp_min(0).mean(1, keepdim=True), size=(32, 32), mode="bilinear")[:, 0]
    torch.testing.assert_close(attribution("activation", model, x, None, layer="conv2"), expected)
    one = F.interpolate(a[:, 5:6].clamp_min(0), size=(32, 32), mode="bilinear")[:, 0]
    torch.testing.assert_close(attribution("activation", model, x, None, layer="conv2", channel=5), one)
    with pytest.raises(ValueError, match="convolutional layer"):
        attribution("activation", model, x, None, layer="fc6")
    with pytest.raises(ValueError, match="convolutional layer"):
        attribution("gradcam", model, x, 0, layer="fc6")


def test_default_target_layer():
    x = torch.rand(1, 3, 64, 64)
    assert default_target_layer(pooled_net(), torch.rand(1, 3, 32, 32)) == "relu2"
    assert default_target_layer(torchvision.models.vgg11(), x) == "features.19"
    assert default_target_layer(torchvision.models.alexnet(), torch.rand(1, 3, 96, 96)) == "features.11"
    assert default_target_layer(torchvision.models.resnet18(), x) == "layer4.1"


def test_bad_input():
    model = pooled_net()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="gradcam.*guided_gradcampp"):
        attribution("lime", model, x, 0)
    with pytest.raises(IndexError, match="class 4 .*4 outputs"):
        attribution("gradcam", model, x, 4)
    with pytest.raises(IndexError):
        attribution("deconv_gb", model, x, [0, -1])
    with pytest.raises(ValueError, match="one class per image"):
        attribution("gradcam", model, x, [0, 1, 2])
    with pytest.raises(TypeError):
        attribution("gradcam", model, x, 1.5)
    with pytest.raises(ValueError, match="no module"):
        attribution("gradcam", model, x, 0, layer="conv9")
    with pytest.raises(TypeError):
        attribution("gradcam", model, x.to(torch.uint8), 0)
    with pytest.raises(ValueError):
        attribution("gradcam", model, x[0], 0)
    with pytest.raises(ValueError, match="channel"):
        attribution("gradcam", model, x, 0, channel=1)
    # None = the predicted class
    pred = model(x).argmax(1)
    torch.testing.assert_close(attribution("gradcam", model, x, None), attribution("gradcam", model, x, pred))


# ---------------------------------------------------------------- token layers (ViT, Swin)
def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=3).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head: no gradient at all
    return model


def _tiny_swin() -> nn.Module:
    torch.manual_seed(0)
    from torchvision.models.swin_transformer import SwinTransformer
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
                           num_classes=3).eval()


def _vit_reshape(a: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's documented ViT reshape_transform: drop the class token, (B, 4, 4, D) -> (B, D, 4, 4)."""
    return a[:, 1:, :].reshape(a.size(0), 4, 4, a.size(2)).transpose(2, 3).transpose(1, 2)


def _swin_reshape(a: torch.Tensor) -> torch.Tensor:
    return a.transpose(2, 3).transpose(1, 2)  # (B, H, W, C) -> (B, C, H, W)


def test_default_target_layer_of_transformers_is_the_last_blocks_first_norm():
    x = torch.rand(1, 3, 32, 32)
    assert default_target_layer(_tiny_vit(), x) == "encoder.layers.encoder_layer_1.ln_1"
    assert default_target_layer(_tiny_swin(), x) == "features.3.0.norm1"


@pytest.mark.parametrize("make, layer, reshape", [
    (_tiny_vit, "encoder.layers.encoder_layer_1.ln_1", _vit_reshape),
    (_tiny_swin, "features.3.0.norm1", _swin_reshape),
])
@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_token_gradcam_equals_pytorch_grad_cam_with_reshape_transform(make, layer, reshape, method):
    """The reshape is done by vxnb itself: the maps equal pytorch-grad-cam's raw CAM with the
    hand-written reshape_transform its docs give for ViT / Swin, upsampled bilinearly."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = make()
    x = torch.rand(2, 3, 32, 32)
    target = [0, 2]
    ours = attribution(method, model, x, target, layer=layer)
    module = dict(model.named_modules())[layer]
    cam = (GradCAM if method == "gradcam" else GradCAMPlusPlus)(model=model, target_layers=[module],
                                                                reshape_transform=reshape)
    try:
        xr = x.clone().requires_grad_(True)
        outs = cam.activations_and_grads(xr)
        targets = [ClassifierOutputTarget(c) for c in target]
        torch.autograd.grad(sum(tg(o) for tg, o in zip(targets, outs)), xr)
        acts, grads = cam.activations_and_grads.activations, cam.activations_and_grads.gradients
        raw = cam.get_cam_image(xr, module, targets, acts[0].numpy(), grads[0].numpy(), False)
    finally:
        cam.activations_and_grads.release()
    ref = F.interpolate(torch.from_numpy(raw).float().clamp_min(0)[:, None], size=(32, 32), mode="bilinear",
                        align_corners=False)[:, 0].clamp_min(0)
    assert ref.amax() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_token_activation_and_guided_gradcam_on_a_vit():
    model = _tiny_vit()
    x = torch.rand(2, 3, 32, 32)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    acts, _ = layer_grads(model, x, dict(model.named_modules())[layer], [0, 1])
    hand = F.interpolate(_vit_reshape(acts).clamp_min(0).mean(1, keepdim=True), size=(32, 32), mode="bilinear",
                         align_corners=False)[:, 0].clamp_min(0)
    torch.testing.assert_close(attribution("activation", model, x, None, layer=layer), hand)
    g = attribution("guided_gradcam", model, x, [0, 1], layer=layer)
    assert g.shape == (2, 32, 32) and torch.isfinite(g).all() and g.amax() > 0


def test_token_layer_that_does_not_fill_a_grid_is_refused():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=3).eval()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="layer: 'm.encoder.layers.encoder_layer_0.mlp' outputs 17 tokens; 0 class/register"):
        # 17 tokens and no class token known (the wrapper hides it): 17 tokens fill no 4x4 grid
        class NoCls(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m(x)
        attribution("gradcam", NoCls(model), x, 0, layer="m.encoder.layers.encoder_layer_0.mlp")


# ---------------------------------------------------------------- AttnLRP (lxt) for ViTs
def test_attnlrp_conserves_the_logit_where_plain_gradient_times_input_does_not():
    """Bias-free ViT (biases, position embedding and class token zero): lxt's rules (identity on
    GELU/LayerNorm, CP-LRP in attention, LRP-0 on linear maps) make sum(x * grad) the logit."""
    model = _tiny_vit()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or n in ("class_token", "encoder.pos_embedding"):
                p.zero_()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)[torch.arange(2), torch.tensor([0, 2])]
    r = attnlrp(model, x, [0, 2], positive=False)
    torch.testing.assert_close(r.sum(dim=(1, 2)), logits, rtol=1e-4, atol=1e-5)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xr)[torch.arange(2), torch.tensor([0, 2])].sum(), xr)
    assert not torch.allclose((x * g).sum(dim=(1, 2, 3)), logits, rtol=1e-2, atol=1e-3)
    pos = attnlrp(model, x, [0, 2])
    torch.testing.assert_close(pos, r.clamp_min(0))


def test_attnlrp_leaves_torch_unpatched_and_refuses_cnns():
    forwards = {c: c.forward for c in (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)}
    attnlrp(_tiny_vit(), torch.rand(1, 3, 32, 32), None)
    assert {c: c.forward for c in forwards} == forwards
    assert not any(hasattr(c, "original_forward") for c in forwards)
    with pytest.raises(ValueError, match="model: AttnLRP .* PooledNet has none|model: AttnLRP .* has none"):
        attnlrp(pooled_net(), torch.rand(1, 3, 32, 32), 0)


# ---------------------------------------------------------------- windowed attention (MaxViT)
def _tiny_maxvit() -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32], block_layers=[1, 1],
                  head_dim=8, stochastic_depth_prob=0.0, num_classes=3).eval()


def test_maxvit_windowed_layers_are_known_and_never_drawn_as_a_grid():
    """Inside MaxViT's PartitionAttentionLayer the positions are in windows, (B, windows,
    positions, C): a "grid" made of that tensor is scrambled. Grad-CAM's default layer is the last
    block's output instead of the grid attention's first norm, Grad-CAM at a windowed layer is
    refused naming it, and Upsam. Act. leaves such a feature undrawn."""
    from vxnb.baselines import layer_maps
    from vxnb.features.hooks import partitioned

    model = _tiny_maxvit()
    att = "blocks.1.layers.0.layers.grid_attention"
    for child in ("partition_op", "partition_swap", "attn_layer", "attn_layer.0", "mlp_layer.2", "departition_swap"):
        assert partitioned(model, f"{att}.{child}"), child
    for name in (att, f"{att}.departition_op", "blocks.1", "blocks.1.layers.0.layers.MBconv", "stem.0", ""):
        assert not partitioned(model, name), name
    x = torch.rand(2, 3, 32, 32)
    assert default_target_layer(model, x) == "blocks.1"
    acts, _ = layer_grads(model, x, dict(model.named_modules())["blocks.1"], [0, 1])
    assert acts.shape[-2:] == (4, 4)  # the last block's map on the image grid (32 px / 8)
    with pytest.raises(ValueError, match=rf"layer: '{att}.attn_layer.0' holds its positions in windows"):
        attribution("gradcam", model, x, [0, 1], layer=f"{att}.attn_layer.0")
    windowed = torch.rand(2, 4, 4, 32)  # what attn_layer.0 outputs here: (B, windows, positions, C)
    assert layer_maps(model, f"{att}.attn_layer.0", windowed, (32, 32)) is None
    assert layer_maps(model, "blocks.1", acts, (32, 32)) is acts
    # Grad-CAM at the default layer is Captum's LayerGradCam there, upsampled
    from captum.attr import LayerGradCam
    cam = LayerGradCam(model, dict(model.named_modules())["blocks.1"]).attribute(x, target=[0, 1], relu_attributions=True)
    ref = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0].clamp_min(0)
    torch.testing.assert_close(attribution("gradcam", model, x, [0, 1]), ref, rtol=1e-4, atol=1e-6)
