"""vxnb.deconv: plain mode = Captum guided backprop; resampled rules = the rule by hand;
shapes on torchvision nets; the model is left unchanged; errors; grid score."""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from vxnb.deconv import (UnsupportedModuleError, _backward, _channel_seed, grid_score, heatmap,
                         signed_rgb, visualize)

from deconv_reference import reference_visualize  # tests/ is on sys.path (rootdir-less test modules)

from captum import attr as captum_attr  # a required dependency: an ImportError fails the tests


def seq(*named: tuple[str, nn.Module]) -> nn.Sequential:
    s = nn.Sequential()
    for name, m in named:
        s.add_module(name, m)
    return s


def strided_net() -> nn.Sequential:
    """Strided conv, overlapping max-pool, avg-pool, grouped/dilated conv, BN, FC layers;
    on a 45x53 input several of them round (A + 2O - M not divisible by S)."""
    return seq(("conv1", nn.Conv2d(3, 8, 5, stride=2, padding=2)), ("relu1", nn.ReLU()),
               ("pool1", nn.MaxPool2d(3, 2)),
               ("conv2", nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=4)), ("relu2", nn.ReLU(inplace=True)),
               ("pool2", nn.AvgPool2d(2)),
               ("conv3", nn.Conv2d(12, 16, 3, stride=2, padding=1)), ("bn3", nn.BatchNorm2d(16)),
               ("relu3", nn.ReLU()), ("gap", nn.AdaptiveAvgPool2d(2)), ("flatten", nn.Flatten()),
               ("fc6", nn.Linear(64, 20)), ("relu6", nn.ReLU()), ("drop6", nn.Dropout(0.5)),
               ("fc7", nn.Linear(20, 5)))


def randomise_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model


def captum_reference(model: nn.Module, x: torch.Tensor, layer: str, channels: list[int]) -> torch.Tensor:
    module = dict(model.named_modules())[layer]
    ngb = captum_attr.NeuronGuidedBackprop(model, module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = [ngb.attribute(x, lambda a, q=q: 0.5 * (a[:, q] ** 2).reshape(a.shape[0], -1).sum(1))
                for q in channels]
    return torch.stack(outs, dim=1)


def hooks_left(model: nn.Module) -> dict[str, int]:
    return {n: len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
            + len(getattr(m, "_forward_hooks_always_called", {}))
            for n, m in model.named_modules()
            if m._forward_hooks or m._backward_hooks or m._forward_pre_hooks or "forward" in m.__dict__}


# --------------------------------------------------------------------------------------
# plain mode = Captum NeuronGuidedBackprop seeded by 0.5 ||a_q||^2
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer,channels", [("conv1", [0, 5]), ("pool1", [3]), ("relu2", [1, 7, 11]),
                                            ("pool2", [2, 4]), ("conv3", [0, 15]), ("bn3", [3]),
                                            ("fc6", [0, 9, 19]), ("fc7", [1, 4])])
def test_plain_equals_captum_strided_net(layer, channels):
    model = randomise_bn(strided_net()).eval()
    x = torch.rand(2, 3, 45, 53)
    ours = visualize(model, x, layer, channels, resample=False)
    ref = captum_reference(model, x, layer, channels)
    assert ours.shape == (2, len(channels), 3, 45, 53)
    assert ref.abs().max() > 0
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", ["maxpool", "layer1.0", "layer2.0.conv1", "layer3.1.bn2", "layer4", "fc"])
def test_plain_equals_captum_resnet18(layer):
    model = randomise_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.rand(2, 3, 64, 64)
    ours = visualize(model, x, layer, [0, 3], resample=False)
    ref = captum_reference(model, x, layer, [0, 3])
    assert ref.abs().max() > 0
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_modes_agree_without_strides():
    model = seq(("conv1", nn.Conv2d(3, 6, 3, padding=1)), ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(3, stride=1, padding=1)), ("conv2", nn.Conv2d(6, 8, 5, padding=2)),
                ("relu2", nn.ReLU()), ("pool2", nn.AvgPool2d(3, stride=1)), ("conv3", nn.Conv2d(8, 4, 1)))
    x = torch.rand(2, 3, 20, 17)
    for layer in ["relu1", "pool1", "relu2", "conv3"]:
        plain = visualize(model, x, layer, [0, 2], resample=False)
        resampled = visualize(model, x, layer, [0, 2], resample=True)
        assert plain.abs().max() > 0
        torch.testing.assert_close(plain, resampled, atol=0, rtol=0)


def test_batched_backward_equals_one_by_one():
    model = randomise_bn(strided_net()).eval()
    x = torch.rand(2, 3, 45, 53)
    for resample in (False, True):
        a = _backward(model, x, "relu3", resample, _channel_seed([1, 4, 9], "relu3"), 3, batched=True)
        b = _backward(model, x, "relu3", resample, _channel_seed([1, 4, 9], "relu3"), 3, batched=False)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        single = visualize(model, x, "relu3", 4, resample=resample)
        torch.testing.assert_close(a[:, 1:2], single, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------
# resampled mode = the rule written out by hand
# --------------------------------------------------------------------------------------

def _nearest_source(n_out: int, n_in: int) -> list[int]:
    """Nearest-neighbour source index of each output index, as torch computes it (float32 scale
    in/out, floor, clamped), written out by hand."""
    scale = np.float32(n_in) / np.float32(n_out)
    return [min(int(np.floor(np.float32(i) * scale)), n_in - 1) for i in range(n_out)]


def hand_resampled_conv_backward(g, weight, target, in_size, p, d, groups):
    """The resampled conv backward by explicit loops: the signal g (B, Cout, b, b') resized by
    nearest neighbour to ``target``, then every output position (i, j) and kernel tap (ky, kx)
    adds g[:, co, i, j] · w[co, ci, ky, kx] to input position (i + d·ky − p, j + d·kx − p)."""
    B, c_out, _, _ = g.shape
    _, c_in_g, k, _ = weight.shape
    rows, cols = _nearest_source(target[0], g.shape[2]), _nearest_source(target[1], g.shape[3])
    sig = g.double()[:, :, rows][:, :, :, cols]  # (B, Cout, T, T')
    out = torch.zeros(B, c_in_g * groups, *in_size, dtype=torch.float64)
    per_out = c_out // groups
    w = weight.double()
    for grp in range(groups):
        co = slice(grp * per_out, (grp + 1) * per_out)
        ci = slice(grp * c_in_g, (grp + 1) * c_in_g)
        for i in range(target[0]):
            for j in range(target[1]):
                for ky in range(k):
                    for kx in range(k):
                        y, xx = i + d * ky - p, j + d * kx - p
                        if 0 <= y < in_size[0] and 0 <= xx < in_size[1]:
                            out[:, ci, y, xx] += sig[:, co, i, j] @ w[co, :, ky, kx]
    return out.float()


@pytest.mark.parametrize("k,s,p,d,groups,size", [(5, 3, 1, 1, 1, (23, 20)), (3, 2, 1, 1, 1, (16, 16)),
                                                 (4, 2, 0, 1, 1, (15, 18)), (3, 2, 2, 2, 2, (17, 13)),
                                                 (1, 2, 0, 1, 1, (9, 10))])
def test_resampled_conv_by_hand(k, s, p, d, groups, size):
    conv = nn.Conv2d(4, 6, k, stride=s, padding=p, dilation=d, groups=groups)
    model = seq(("conv1", conv))
    x = torch.rand(2, 4, *size)
    q = 3
    out = visualize(model, x, "conv1", [q])[:, 0]
    a = conv(x).detach()
    g = torch.zeros_like(a)
    g[:, q] = a[:, q]
    keff = d * (k - 1) + 1
    target = (size[0] + 2 * p - keff + 1, size[1] + 2 * p - keff + 1)
    expected = hand_resampled_conv_backward(g, conv.weight.detach(), target, x.shape[-2:], p, d, groups)
    assert expected.shape == x.shape
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    # and it is not the plain transpose (the strided one)
    assert not torch.allclose(out, visualize(model, x, "conv1", [q], resample=False)[:, 0])


def hand_switches(x: torch.Tensor, k: int, p: int, signal: torch.Tensor) -> torch.Tensor:
    """Stride-1 max-pool switches by loops: each window's (first) maximum gets the signal."""
    B, C, H, W = x.shape
    xp = F.pad(x, (p, p, p, p), value=-float("inf"))
    out = torch.zeros_like(x)
    for b, c in itertools.product(range(B), range(C)):
        for i in range(H + 2 * p - k + 1):
            for j in range(W + 2 * p - k + 1):
                win = xp[b, c, i:i + k, j:j + k]
                r, cc = divmod(int(torch.argmax(win)), k)
                out[b, c, i + r - p, j + cc - p] += signal[b, c, i, j]
    return out


@pytest.mark.parametrize("k,s,p,size", [(3, 2, 1, (16, 13)), (2, 2, 0, (12, 9)), (3, 3, 0, (14, 11))])
def test_resampled_maxpool_by_hand(k, s, p, size):
    model = seq(("pool1", nn.MaxPool2d(k, stride=s, padding=p)))
    x = torch.rand(1, 2, *size)
    out = visualize(model, x, "pool1", [1])[:, 0]
    a = F.max_pool2d(x, k, s, p)
    g = torch.zeros_like(a)
    g[:, 1] = a[:, 1]
    target = (size[0] + 2 * p - k + 1, size[1] + 2 * p - k + 1)
    expected = hand_switches(x, k, p, F.interpolate(g, size=target, mode="nearest"))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert out[:, 0].abs().max() == 0  # the other channel is untouched


def test_resampled_avgpool_by_hand():
    model = seq(("pool1", nn.AvgPool2d(3, stride=2, padding=1)))
    x = torch.rand(1, 2, 15, 12)
    out = visualize(model, x, "pool1", [0])[:, 0]
    a = F.avg_pool2d(x, 3, 2, 1)
    g = torch.zeros_like(a)
    g[:, 0] = a[:, 0]
    g1 = F.interpolate(g, size=(15, 12), mode="nearest")  # A + 2O - M + 1 = A
    expected = F.conv_transpose2d(g1, torch.full((2, 1, 3, 3), 1 / 9), padding=1, groups=2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_guided_relu_rule_by_hand():
    """conv -> ReLU -> conv: the ReLU passes where its input > 0 and the signal > 0."""
    c1, c2 = nn.Conv2d(2, 3, 3), nn.Conv2d(3, 2, 3)
    model = seq(("conv1", c1), ("relu1", nn.ReLU(inplace=True)), ("conv2", c2))
    x = torch.rand(1, 2, 9, 9)
    z = c1(x).detach()
    a = c2(z.clamp_min(0)).detach()
    g = torch.zeros_like(a)
    g[:, 1] = a[:, 1]
    s = F.conv_transpose2d(g, c2.weight.detach())
    s = s * (z > 0) * (s > 0)
    expected = F.conv_transpose2d(s, c1.weight.detach())
    torch.testing.assert_close(visualize(model, x, "conv2", [1])[:, 0], expected, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------
# shapes on torchvision networks and the reference models
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,layer,size", [("alexnet", "features.3", 96), ("alexnet", "classifier.1", 96),
                                             ("vgg11", "features.8", 64), ("resnet18", "layer2.1", 64)])
def test_shapes_torchvision(arch, layer, size):
    model = getattr(torchvision.models, arch)(num_classes=10)
    x = torch.rand(2, 3, size, size + 8)
    v = visualize(model, x, layer, [0, 1, 2])
    assert v.shape == (2, 3, 3, size, size + 8)
    assert torch.isfinite(v).all() and v.abs().sum() > 0
    h = heatmap(v)
    assert h.shape == (2, 3, size, size + 8)


def test_reference_flowernet():
    from vxnb import models
    model = models.FlowerNet(num_classes=6, size=64)
    x = torch.rand(1, 3, 64, 64)
    names = dict(model.named_modules())
    for layer in [n for n in ("conv1", "pool2", "relu5", "fc6") if n in names]:
        v = visualize(model, x, layer, [0, 1])
        assert v.shape == (1, 2, 3, 64, 64) and torch.isfinite(v).all()


# --------------------------------------------------------------------------------------
# the model is left as it was
# --------------------------------------------------------------------------------------

def test_model_unchanged_after_calls_and_errors():
    model = randomise_bn(torchvision.models.resnet18(num_classes=10))
    model.train()
    model.layer1[0].conv1.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    x = torch.rand(2, 3, 64, 64)

    def unchanged():
        sd = model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in state.items())
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert hooks_left(model) == {}
        assert all(p.grad is None for p in model.parameters())

    v = visualize(model, x, "layer2.0", [0, 5])
    unchanged()
    visualize(model, x, "fc", [1], resample=False)
    unchanged()
    with pytest.raises(IndexError):
        visualize(model, x, "layer2.0", [0, 500])
    unchanged()
    with pytest.raises(ValueError):
        visualize(model, x, "nope", [0])
    unchanged()
    # the call ran in eval mode: BN used its running statistics, not the batch's
    model.eval()
    torch.testing.assert_close(visualize(model, x, "layer2.0", [0, 5]), v)


def test_model_unchanged_after_unsupported_error():
    model = seq(("conv1", nn.Conv2d(3, 4, 3)), ("act", nn.Softmax(dim=1)), ("conv2", nn.Conv2d(4, 4, 3, stride=2)),
                ("relu2", nn.ReLU(inplace=True)))
    model.train()
    with pytest.raises(UnsupportedModuleError):
        visualize(model, torch.rand(1, 3, 16, 16), "relu2", [0])
    assert hooks_left(model) == {}
    assert all(m.training for m in model.modules())
    assert model.relu2.inplace and "forward" not in model.relu2.__dict__


# --------------------------------------------------------------------------------------
# unsupported modules and operations
# --------------------------------------------------------------------------------------

class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.relu(self.conv(x))


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.sigmoid(y)


class FunctionalStridedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.conv2d(x, self.conv.weight, stride=2)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.w


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.conv(x))
        return torch.cat([x + y, y.reshape(y.shape).mul(0.5)], dim=1)


class Squared(nn.Module):
    def forward(self, x):
        return x * x  # a product of two signals, neither a gate


class SoftmaxActivation(nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=1) + x  # a softmax that is no gate of a product


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        return g


class CustomFunction(nn.Module):
    def forward(self, x):
        return Cube.apply(x)


@pytest.mark.parametrize("block,match", [
    (nn.Upsample(scale_factor=2, mode="bilinear"), r"'block' \(Upsample\).*UpsampleBilinear2D"),
    (Scale(), r"'block' \(Scale\) has parameters but no DeconvNet rule.*Scale: TransposeRule"),
    (Squared(), r"'block' \(Squared\).*multiplies two signals.*neither is a gate"),
    (SoftmaxActivation(), r"'block' \(SoftmaxActivation\).*softmax \(SoftmaxBackward"),
    (CustomFunction(), r"CubeBackward.*unknown origin"),
    (nn.Softsign(), r"'block' \(Softsign\)"),
])
def test_unsupported_module_is_an_error(block, match):
    model = seq(("block", block), ("conv2", nn.Conv2d(3, 4, 3)))
    for resample in (True, False):
        with pytest.raises(UnsupportedModuleError, match=match):
            visualize(model, torch.rand(1, 3, 16, 16), "conv2", [0], resample=resample)


@pytest.mark.parametrize("block,rule", [(nn.GELU(), "gelu"), (FunctionalReLU(), "relu"), (Gate(), "mul"),
                                        (nn.LayerNorm([3, 16, 16]), "layer_norm"), (nn.Sigmoid(), "sigmoid")])
def test_an_operation_whose_rule_is_removed_for_the_call_is_refused_by_name(block, rule):
    """Each of these has a rule by default; without it (for one call) it is refused, naming the
    module and the operation; the next call has the rule again."""
    cin = 4 if isinstance(block, (FunctionalReLU, Gate)) else 3
    model = seq(("block", block), ("conv2", nn.Conv2d(cin, 4, 3)))
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(UnsupportedModuleError, match=rf"'block' \({type(block).__name__}\)"):
        visualize(model, x, "conv2", [0], composite={rule: None})
    assert visualize(model, x, "conv2", [0]).abs().sum() > 0


def test_functional_strided_conv_is_resampled_as_the_module():
    """The conv rule attaches to ``F.conv2d`` wherever it is called: the same maps as the module."""
    torch.manual_seed(0)
    block = FunctionalStridedConv()
    model = seq(("block", block), ("conv2", nn.Conv2d(4, 4, 3)))
    module = seq(("block", nn.Conv2d(3, 4, 3, stride=2, bias=False)), ("conv2", model.conv2))
    module.block.weight.data.copy_(block.conv.weight.data)
    x = torch.rand(1, 3, 17, 17)
    for resample in (True, False):
        got = visualize(model, x, "conv2", [0, 2], resample=resample)
        torch.testing.assert_close(got, visualize(module, x, "conv2", [0, 2], resample=resample), atol=0, rtol=0)
    assert (visualize(model, x, "conv2", [0]) - visualize(model, x, "conv2", [0], resample=False)).abs().max() > 0


def test_unsupported_module_after_the_layer_is_fine():
    model = seq(("conv1", nn.Conv2d(3, 4, 3)), ("relu1", nn.ReLU()), ("act", nn.Sigmoid()),
                ("bn", nn.BatchNorm2d(4, track_running_stats=False)))
    assert visualize(model, torch.rand(1, 3, 10, 10), "relu1", [0]).shape == (1, 1, 3, 10, 10)


def test_structural_ops_pass():
    model = seq(("conv1", nn.Conv2d(3, 4, 3, padding=1)), ("block", Residual()), ("conv2", nn.Conv2d(8, 2, 3)))
    v = visualize(model, torch.rand(1, 3, 12, 12), "conv2", [0, 1])
    assert v.shape == (1, 2, 3, 12, 12) and v.abs().sum() > 0


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------

def test_bad_input():
    model = strided_net()
    x = torch.rand(1, 3, 45, 53)
    with pytest.raises(ValueError, match="conv1.*relu1"):  # lists the names
        visualize(model, x, "conv9", [0])
    with pytest.raises(IndexError, match=r"channel 8 .*8 channels"):
        visualize(model, x, "conv1", [0, 8])
    with pytest.raises(IndexError, match=r"channel 20 .*20 channels"):
        visualize(model, x, "fc6", [20])
    with pytest.raises(IndexError):
        visualize(model, x, "conv1", [-1])
    with pytest.raises(ValueError, match="batch"):
        visualize(model, x[0], "conv1", [0])
    with pytest.raises(ValueError, match="3 input channel"):
        visualize(model, torch.rand(1, 1, 45, 53), "conv1", [0])
    with pytest.raises(TypeError, match="floating"):
        visualize(model, (x * 255).to(torch.uint8), "conv1", [0])
    with pytest.raises(TypeError):
        visualize(model, x, "conv1", [0.5])
    with pytest.raises(TypeError):
        visualize(model, x, "conv1", "0")
    with pytest.raises(ValueError):
        visualize(model, x, "conv1", [])
    # ints, numpy and tensors of channel indices are accepted
    v = visualize(model, x, "conv1", 2)
    torch.testing.assert_close(v, visualize(model, x, "conv1", np.array([2])))
    torch.testing.assert_close(v, visualize(model, x, "conv1", torch.tensor([2])))


# --------------------------------------------------------------------------------------
# heatmap, signed_rgb, grid_score
# --------------------------------------------------------------------------------------

def test_heatmap_and_signed_rgb():
    v = torch.randn(2, 3, 3, 8, 9)
    h = heatmap(v)
    assert h.shape == (2, 3, 8, 9)
    assert torch.allclose(h.amin(dim=(-2, -1)), torch.zeros(2, 3))
    assert torch.allclose(h.amax(dim=(-2, -1)), torch.ones(2, 3))
    s = v[0, 0].abs().sum(0)
    torch.testing.assert_close(h[0, 0], (s - s.min()) / (s.max() - s.min()))
    assert heatmap(torch.zeros(1, 3, 4, 4)).abs().max() == 0
    rgb = signed_rgb(v)
    assert rgb.shape == v.shape and rgb.min() >= 0 and rgb.max() <= 1
    assert torch.allclose(signed_rgb(torch.zeros(3, 4, 4)), torch.full((3, 4, 4), 0.5))
    m = v[1, 2].abs().max()
    torch.testing.assert_close(rgb[1, 2], 0.5 + v[1, 2] / (2 * m))
    assert signed_rgb(torch.randn(1, 5, 5)).shape == (3, 5, 5)
    with pytest.raises(ValueError):
        signed_rgb(torch.randn(4, 5, 5))


def test_grid_score_definition():
    H, W = 48, 40
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    grid = ((yy % 4 == 0) | (xx % 4 == 0)).float()  # period 4
    assert grid_score(grid, 4).item() == pytest.approx(1.0, abs=1e-6)
    assert grid_score(grid, 8).item() == pytest.approx(1.0, abs=1e-6)  # lattice of 8 contains that of 4
    assert grid_score(grid, 3).item() < 0.2
    blob = torch.exp(-((yy - 20.0) ** 2 + (xx - 17.0) ** 2) / 60)
    assert grid_score(blob, 4).item() < 0.01
    noise = torch.rand(64, H, W)
    expected = (16 - 1) / (H * W - 1)
    assert grid_score(noise, 4).mean().item() == pytest.approx(expected, rel=0.3)
    assert grid_score(torch.ones(H, W), 4).item() == 0.0
    assert grid_score(torch.rand(2, 3, H, W), [2, 4]).shape == (2, 3)
    with pytest.raises(ValueError):
        grid_score(grid, 0)


def test_grid_score_lower_when_resampled():
    torch.manual_seed(0)
    model = seq(("conv1", nn.Conv2d(3, 16, 7, stride=4, padding=3)), ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(3, 2, padding=1)), ("conv2", nn.Conv2d(16, 16, 3, padding=1)),
                ("relu2", nn.ReLU()))
    t = torch.linspace(-1, 1, 96)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    r, th = (xx ** 2 + yy ** 2).sqrt(), torch.atan2(yy, xx)
    petals = (r < 0.5 + 0.3 * torch.cos(6 * th)).float()
    x = torch.stack([petals, 0.5 * petals + 0.3 * torch.sin(20 * r), 1 - petals])[None].clamp(0, 1)
    channels = list(range(8))
    plain = grid_score(heatmap(visualize(model, x, "relu2", channels, resample=False)), 8)[0]
    resampled = grid_score(heatmap(visualize(model, x, "relu2", channels)), 8)[0]
    assert resampled.mean() < 0.5 * plain.mean()
    assert (resampled < plain).float().mean() >= 0.75


class FunctionalPool(nn.Module):
    def forward(self, x):
        return F.max_pool2d(x, 2)  # stride defaults to the kernel size


def test_functional_pool_with_default_stride_is_resampled_as_the_module():
    torch.manual_seed(0)
    model = seq(("conv1", nn.Conv2d(3, 4, 3)), ("block", FunctionalPool()), ("conv2", nn.Conv2d(4, 4, 3)))
    module = seq(("conv1", model.conv1), ("block", nn.MaxPool2d(2)), ("conv2", model.conv2))
    x = torch.rand(1, 3, 18, 18)
    for resample in (True, False):
        torch.testing.assert_close(visualize(model, x, "conv2", [0, 3], resample=resample),
                                   visualize(module, x, "conv2", [0, 3], resample=resample), atol=0, rtol=0)
    ref = reference_visualize(module, x, "conv2", [0, 3])
    _assert_same_maps(visualize(model, x, "conv2", [0, 3]), ref)


def test_falls_back_to_one_by_one_when_vmap_fails(monkeypatch):
    """The vmapped backward (the default off the CPU; forced here)."""
    import vxnb.deconv as deconv

    monkeypatch.setattr(deconv, "_BATCHED", True)
    model = randomise_bn(strided_net()).eval()
    x = torch.rand(2, 3, 45, 53)
    expected = visualize(model, x, "relu3", [1, 4])
    real_grad = torch.autograd.grad

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented for aten::something")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    with pytest.warns(RuntimeWarning, match="one by one"):
        got = visualize(model, x, "relu3", [1, 4])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert hooks_left(model) == {}


# --------------------------------------------------------------------------------------
# the strided fast path of the resampled conv backward = today's resize + stride-1 path
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,layer,size,n_fast", [("alexnet", "features.10", 112, 1), ("alexnet", "features.3", 99, 1),
                                                    ("vgg16", "features.17", 64, 0), ("resnet50", "layer2.0", 64, 3),
                                                    ("resnet50", "layer3.1", 69, 3)])
def test_strided_fast_path_equals_resize_path(arch, layer, size, n_fast, monkeypatch):
    """AlexNet's conv1 at 112 and 99 px copies rows 4 or 3 times (4 and 6 runs: 16 and 36
    pieces), ResNet-50's strided 7x7 and 3x3 convs copy every row twice at 64 px (one piece;
    its small strided 1x1 conv too: ``_MAX_1X1_BOX_PIXELS``) and not at 69 px (its strided 1x1
    convs go back as the resized channel transpose, not boxed); VGG-16 has no strided conv (its resampling is all in the pooling: unchanged)."""
    import vxnb.deconv as deconv

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).double()
    x = torch.rand(2, 3, size, size + 5, dtype=torch.float64)
    chans = [0, 3, 7]
    calls = []
    box = deconv._box_transpose
    monkeypatch.setattr(deconv, "_box_transpose", lambda *a, **k: calls.append(1) or box(*a, **k))
    fast = visualize(model, x, layer, chans)
    monkeypatch.setattr(deconv, "_MAX_BOX_PIECES", 0)  # every conv back on the resize + stride-1 path
    slow = visualize(model, x, layer, chans)
    assert len(calls) == n_fast * len(chans)  # the K signals go back one by one on the CPU
    scale = slow.abs().max()
    assert scale > 0
    assert (fast - slow).abs().max() <= 1e-6 * scale
    # the same in float32, to float32 rounding
    model32, x32 = model.float(), x.float()
    monkeypatch.undo()
    fast32 = visualize(model32, x32, layer, chans)
    assert (fast32.double() - slow).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("stride,padding,groups,size", [(2, 0, 1, (14, 15)), (2, 1, 2, (13, 16)), (3, 0, 1, (17, 11)),
                                                       (4, 2, 4, (21, 18)), (2, 0, 1, (14, 16)), (2, 0, 2, (12, 8))])
@pytest.mark.parametrize("box_pixels", [0, 10 ** 6])
def test_strided_1x1_conv_equals_the_oracle(stride, padding, groups, size, box_pixels, monkeypatch):
    """A strided 1x1 conv (ResNet's downsampling) goes back as the resized channel transpose, or
    (a small signal whose rows are all copied S times) as the box-summed strided transpose: the
    oracle's resize + stride-1 conv_transpose2d either way, also where the rows are not copied
    evenly."""
    import vxnb.deconv as deconv

    monkeypatch.setattr(deconv, "_MAX_1X1_BOX_PIXELS", box_pixels)
    torch.manual_seed(0)
    model = seq(("conv1", nn.Conv2d(4, 8, 3, padding=1)), ("relu1", nn.ReLU()),
                ("down", nn.Conv2d(8, 12, 1, stride=stride, padding=padding, groups=groups)), ("relu2", nn.ReLU()),
                ("conv3", nn.Conv2d(12, 6, 3, padding=1))).double()
    x = torch.rand(2, 4, *size, dtype=torch.float64)
    for layer in ("down", "conv3"):
        _assert_same_maps(visualize(model, x, layer, [0, 5]), reference_visualize(model, x, layer, [0, 5]))


@pytest.mark.parametrize("n_in,n_out", [(55, 218), (28, 56), (27, 53), (7, 21), (5, 5), (9, 40)])
def test_replication_runs_match_interpolate(n_in, n_out):
    from vxnb.deconv import _replication_runs

    src = F.interpolate(torch.arange(n_in, dtype=torch.float32).view(1, 1, 1, n_in), size=(1, n_out),
                        mode="nearest").view(-1).tolist()
    rebuilt = [None] * n_out
    for b0, nb, r, o in _replication_runs(n_in, n_out):
        for i in range(nb):
            for c in range(r):
                rebuilt[o + i * r + c] = b0 + i
    assert rebuilt == src


# --------------------------------------------------------------------------------------
# issue 16's fast path (stride-1 transposes as conv2d with flipped weights, max-pool switches
# once per forward, the K signals one by one through one recorded forward, the seed's zero
# channels left out) = the plain implementation of the test oracle (tests/deconv_reference.py)
# --------------------------------------------------------------------------------------

def _both_paths(model, x, layer, chans, resample):
    fast = visualize(model, x, layer, chans, resample=resample)
    return fast, reference_visualize(model, x, layer, chans, resample=resample)


def _assert_same_maps(fast, ref):
    scale = ref.abs().max()
    assert scale > 0
    assert (fast - ref).abs().max() <= 1e-6 * scale
    assert (heatmap(fast) - heatmap(ref)).abs().max() <= 1e-6


@pytest.fixture(scope="module")
def tv_models():
    torch.manual_seed(0)
    return {arch: randomise_bn(getattr(torchvision.models, arch)(num_classes=10)).eval()
            for arch in ("alexnet", "vgg16", "resnet50")}


@pytest.mark.parametrize("resample", [True, False])
@pytest.mark.parametrize("arch,layer,size", [
    ("alexnet", "features.10", 99),   # strided conv (stride 4) and overlapping pools on the way; seed at a conv
    ("alexnet", "features.2", 83),    # seed at a max-pool layer
    ("vgg16", "features.17", 48),     # three max-pools, stride-1 convs; seed at a conv
    ("vgg16", "features.23", 40),     # seed at a max-pool
    ("resnet50", "layer2.0", 48),     # strided 1x1 / 3x3 convs, BN, additions
    ("resnet50", "layer1.2.conv3", 45),
])
def test_fast_path_equals_reference(tv_models, arch, layer, size, resample):
    model = tv_models[arch]
    x = torch.rand(2, 3, size, size + 3, generator=torch.Generator().manual_seed(size))
    fast, ref = _both_paths(model, x, layer, [0, 5, 7], resample)
    _assert_same_maps(fast, ref)
    assert hooks_left(model) == {}


def test_fast_path_equals_captum_in_plain_mode(tv_models):
    model = tv_models["vgg16"]
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    ours = visualize(model, x, "features.17", [2, 9], resample=False)
    torch.testing.assert_close(ours, captum_reference(model, x, "features.17", [2, 9]), atol=1e-5, rtol=1e-5)


def test_one_by_one_batched_and_single_calls_agree(monkeypatch):
    """The K signals one by one (CPU default), vmapped in one batch of K, and K calls of one."""
    import vxnb.deconv as deconv

    model = randomise_bn(strided_net()).eval()
    x = torch.rand(2, 3, 45, 53, generator=torch.Generator().manual_seed(0))
    for layer, chans in [("relu3", [1, 4, 9]), ("conv3", [0, 15, 2]), ("pool1", [3, 1])]:
        for resample in (True, False):
            one_by_one = visualize(model, x, layer, chans, resample=resample)
            monkeypatch.setattr(deconv, "_BATCHED", True)
            batched = visualize(model, x, layer, chans, resample=resample)
            monkeypatch.setattr(deconv, "_BATCHED", None)
            singles = torch.cat([visualize(model, x, layer, q, resample=resample) for q in chans], dim=1)
            _assert_same_maps(one_by_one, batched)
            _assert_same_maps(one_by_one, singles)


@pytest.mark.parametrize("padding,dilation,groups,kernel", [(1, 1, 1, 3), (0, 1, 1, 3), (2, 2, 1, 3), (1, 1, 4, 3),
                                                            (3, 1, 1, 3), (2, 1, 2, 5), (0, 1, 1, 1)])
def test_flipped_conv2d_is_the_transpose(padding, dilation, groups, kernel):
    """``_conv_transpose`` at stride 1 (conv2d with the flipped, channel-swapped weight; the
    transpose itself where the padding is wider than the kernel) = autograd's input gradient."""
    from vxnb.deconv import _conv_transpose

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, kernel, padding=padding, dilation=dilation, groups=groups).double()
    x = torch.rand(2, 8, 13, 11, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    g = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, g, retain_graph=True)
    got = _conv_transpose(conv, g, tuple(x.shape[-2:]), False, {})
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    # a seed with one non-zero channel: the weight's slice
    seed = torch.zeros_like(g)
    seed[:, 5] = g[:, 5]
    (expected,) = torch.autograd.grad(y, x, seed)
    torch.testing.assert_close(_conv_transpose(conv, seed, tuple(x.shape[-2:]), False, {}, seed=True), expected,
                               atol=1e-12, rtol=1e-10)


def test_weights_changed_in_place_are_not_served_stale():
    """The flipped weights live with one forward: a model changed in place gives the new maps."""
    torch.manual_seed(0)
    model = seq(("conv1", nn.Conv2d(3, 8, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(8, 8, 3, padding=1)), ("relu2", nn.ReLU()), ("conv3", nn.Conv2d(8, 6, 3)))
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    before = visualize(model, x, "conv3", [0, 4])
    with torch.no_grad():
        model.conv2.weight.mul_(-1.0).add_(0.05)
        model.conv1.weight[:2].mul_(2.0)
    after = visualize(model, x, "conv3", [0, 4])
    assert (after - before).abs().max() > 1e-3 * before.abs().max()
    fast, ref = _both_paths(model, x, "conv3", [0, 4], True)
    _assert_same_maps(after, ref)
    _assert_same_maps(fast, ref)


class InPlaceAfter(nn.Module):
    """conv1's output is changed in place after conv2 used it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a = self.conv1(x)
        b = self.conv2(self.relu(a))
        a += 1.0
        return b + a


def test_recorded_forward_refuses_an_output_changed_in_place():
    from vxnb.deconv import record_forward

    torch.manual_seed(0)
    model = InPlaceAfter().eval()
    x = torch.rand(1, 3, 12, 12)
    rec = record_forward(model, x, True, ["conv1", "conv2"])
    with rec.forward() as x_leaf:
        model(x_leaf)
    assert rec.visualize("conv1", [0, 2]) is None  # its seed would not be its output any more
    torch.testing.assert_close(rec.visualize("conv2", [1]), visualize(model, x, "conv2", [1]), atol=1e-6, rtol=1e-5)
    assert hooks_left(model) == {}


@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil", [(2, 2, 0, 1, False), (2, 1, 0, 1, False),
                                                                 (3, 2, 1, 1, True), (3, 1, 1, 2, False),
                                                                 (3, 2, 0, 1, True)])
def test_channels_last_max_pool_has_the_same_maxima_and_switches(kernel, stride, padding, dilation, ceil):
    """Ties everywhere (a ReLU output, quantised): the first maximum of each window either way."""
    from vxnb.deconv import _max_pool2d

    x = (torch.randn(2, 16, 23, 20, generator=torch.Generator().manual_seed(0)) * 2).round().clamp_min(0)
    out, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil, return_indices=True)
    got, got_idx = _max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil, return_indices=True)
    assert torch.equal(got, out) and torch.equal(got_idx, idx)
    assert got.is_contiguous() and got_idx.is_contiguous()
    assert torch.equal(_max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil),
                       F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil))


@pytest.mark.parametrize("where", ["seed_relu", "other_filter_weight"])
def test_non_finite_values_show_on_the_fast_path_as_before(where):
    """The fast path drops nothing non-finite: a NaN activation under a closed ReLU and a NaN
    weight of another filter of the seed conv (0 x NaN in the full transpose) still raise,
    where the reference has a NaN."""

    torch.manual_seed(0)
    model = seq(("conv1", nn.Conv2d(3, 4, 3, padding=1)), ("relu1", nn.ReLU()), ("conv2", nn.Conv2d(4, 6, 3)))
    x = torch.rand(1, 3, 10, 10)
    layer = "relu1" if where == "seed_relu" else "conv2"
    with torch.no_grad():
        if where == "seed_relu":
            model.conv1.bias[2] = float("nan")
        else:
            model.conv2.weight[4, 1, 0, 0] = float("nan")
    chans = [2 if where == "seed_relu" else 0]
    assert not torch.isfinite(reference_visualize(model, x, layer, chans)).all()
    with pytest.raises(ValueError, match="NaN"):
        visualize(model, x, layer, chans)


# --------------------------------------------------------------------------------------
# issue 25 item 6 (speed): every conv transpose is aten's own input gradient; a resampled
# strided conv is the strided transpose with its output box-summed (dense), with the boxed
# kernel (thin / depthwise), or, where the resize splits into pieces, one W^T g folded per
# piece -- each equal to the definition, conv_transpose2d(interpolate(g, nearest), stride 1)
# --------------------------------------------------------------------------------------

def _definition(g, conv, in_size):
    """The paper's resampled transpose as written: resize, then the stride-1 transpose."""
    k = conv.weight.shape[-2:]
    p, d = conv.padding, conv.dilation
    size = tuple(a + 2 * pp - (dd * (kk - 1) + 1) + 1 for a, kk, pp, dd in zip(in_size, k, p, d))
    return F.conv_transpose2d(F.interpolate(g, size=size, mode="nearest"), conv.weight, None, stride=1,
                              padding=p, dilation=d, groups=conv.groups)


@pytest.mark.parametrize("cin,cout,kernel,stride,padding,dilation,groups,size", [
    (8, 12, 3, 2, 1, 1, 1, (16, 14)),     # ResNet's 3x3 stride 2: one piece, output box-summed
    (8, 12, 3, 2, 1, 1, 1, (17, 13)),     # uneven rows: pieces, one W^T g folded per piece
    (3, 16, 4, 4, 0, 1, 1, (32, 30)),     # ConvNeXt's / Swin's patchify stem: pieces
    (16, 32, 2, 2, 0, 1, 1, (14, 14)),    # ConvNeXt's 2x2 downsampling, 14 -> 7 (7 -> 13: pieces)
    (3, 8, 7, 2, 3, 1, 1, (20, 22)),      # ResNet's stem
    (3, 8, 16, 16, 0, 1, 1, (48, 48)),    # ViT's patch embedding (48 -> 3 -> 33: pieces)
    (8, 8, 5, 2, 2, 1, 8, (28, 28)),      # EfficientNet's strided depthwise 5x5: boxed kernel
    (8, 8, 3, 2, 1, 1, 8, (27, 29)),      # depthwise, uneven: boxed kernels per piece
    (8, 12, 3, 2, 2, 2, 2, (19, 18)),     # dilated, grouped
    (8, 12, 3, 3, 1, 1, 4, (20, 25)),
])
def test_resampled_conv_transpose_equals_its_definition(cin, cout, kernel, stride, padding, dilation, groups, size):
    from vxnb.deconv import _conv_transpose

    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups).double()
    x = torch.rand(2, cin, *size, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    want = _definition(g, conv, size)
    got = _conv_transpose(conv, g, size, True, {})
    assert got.shape == want.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    # float32: to float32 rounding of the same sums
    got32 = _conv_transpose(conv.float(), g.float(), size, True, {})
    assert (got32.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("n_in,n_out", [(7, 14), (28, 56), (5, 15), (7, 13), (56, 221), (4, 4)])
def test_resize_equals_interpolate(n_in, n_out):
    """The broadcast copy of a resize by a whole factor = F.interpolate's nearest neighbour."""
    from vxnb.deconv import _resize

    g = torch.randn(2, 3, n_in, n_in + 1)
    size = (n_out, (n_in + 1) * max(1, n_out // n_in))
    torch.testing.assert_close(_resize(g, size), F.interpolate(g, size=size, mode="nearest"), atol=0, rtol=0)


def test_guided_relu_backward_is_max_of_the_signal_where_the_input_is_positive():
    """The rule's backward (autograd's threshold_backward on the kept output, then max(., 0)),
    written out: max(g, 0) * 1[x > 0], in place or not."""
    from vxnb.deconv import _GuidedReLU

    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    g = torch.randn_like(x)
    want = g.clamp_min(0) * (x > 0).double()
    for inplace in (False, True):
        xl = x.clone().requires_grad_(True)
        y = _GuidedReLU.apply(xl * 1.0, inplace)
        torch.testing.assert_close(y, x.clamp_min(0), atol=0, rtol=0)
        (got,) = torch.autograd.grad(y, xl, g)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("arch,layer", [("convnext_tiny", "features.3"), ("efficientnet_b0", "features.4"),
                                        ("vit_b_16", "encoder.layers.encoder_layer_0")])
def test_fast_resampled_paths_equal_the_resize_path_on_modern_models(arch, layer, monkeypatch):
    """ConvNeXt's patchify stem and downsampling (uneven pieces: folded), EfficientNet's strided
    depthwise convs (boxed kernels), ViT's patch embedding: the maps equal those of the plain
    resize + stride-1 transpose (``_MAX_BOX_PIECES = 0``), to 1e-6 of their scale."""
    import vxnb.deconv as deconv
    from vxnb.features.hooks import layout

    torch.manual_seed(0)
    kw = {"image_size": 48} if arch == "vit_b_16" else {}
    model = getattr(torchvision.models, arch)(num_classes=10, **kw).double().eval()
    x = torch.rand(1, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kind, prefix = layout(model, layer)
    lay = ("last", prefix) if kind in ("last", "tokens?") else None
    fast = visualize(model, x, layer, [0, 5], layout=lay)
    monkeypatch.setattr(deconv, "_MAX_BOX_PIECES", 0)
    slow = visualize(model, x, layer, [0, 5], layout=lay)
    scale = slow.abs().max()
    assert scale > 0
    assert (fast - slow).abs().max() <= 1e-6 * scale


@pytest.mark.parametrize("arch,layer", [("efficientnet_b0", "features.4"), ("mobilenet_v3_small", "features.6"),
                                        ("resnet18", "layer2")])
def test_batchnorm_activation_fusion_equals_the_rules_apart_on_torchvision_models(arch, layer, monkeypatch):
    """Issue 25 item 6: the activations after eval BatchNorms (SiLU, Hardswish, ReLU; ResNet's
    ``out += identity`` before its last ReLU keeps them apart) carried back in one node give the
    maps of the BatchNorm's transpose and the activation's rule one after the other, to 1e-10
    (float64)."""
    import vxnb.deconv as deconv

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).double().eval()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(1, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fused = visualize(model, x, layer, [0, 5])
    monkeypatch.setattr(deconv._Tracer, "batch_norm_input", lambda self, t: None)
    apart = visualize(model, x, layer, [0, 5])
    scale = apart.abs().max()
    assert scale > 0
    assert (fused - apart).abs().max() <= 1e-10 * scale
