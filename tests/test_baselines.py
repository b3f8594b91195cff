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

from vxnb.baselines import METHODS, attribution, default_target_layer
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
