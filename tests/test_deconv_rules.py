"""Issue 25: each DeconvNet rule against a hand-written autograd reference.

The references are independent of ``vxnb.deconv``: a custom ``autograd.Function`` with the
derivative written out by hand for the activation rule, a detached sigma for the norms, a
detached gate for squeeze-excitation, detached softmax weights for attention; the rest of each
little model is plain autograd (stride-1 convolutions and linear maps: their transpose).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from vxnb.deconv import (DEFAULT_COMPOSITE, Composite, GuidedActivationRule, OpRule, TransposeRule,
                         UnsupportedModuleError, visualize)

torch.set_num_threads(1)


def _phi(x):
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


#: f'(x) written out by hand (torch's definitions of each activation)
DERIVATIVES = {
    "relu": lambda x: (x > 0).double(),
    "relu6": lambda x: ((x > 0) & (x < 6)).double(),
    "leaky_relu": lambda x: torch.where(x > 0, 1.0, 0.01).double(),
    "elu": lambda x: torch.where(x > 0, torch.ones_like(x), torch.exp(x)),
    "silu": lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))),
    "gelu": lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * _phi(x),
    "hardswish": lambda x: torch.where(x < -3, 0.0, torch.where(x > 3, 1.0, (2 * x + 3) / 6)).double(),
    "softplus": lambda x: torch.sigmoid(x),
    "tanh": lambda x: 1 - torch.tanh(x) ** 2,
    "mish": lambda x: (torch.tanh(F.softplus(x)) + x * torch.sigmoid(x) * (1 - torch.tanh(F.softplus(x)) ** 2)),
}
MODULES = {"relu": nn.ReLU(), "relu6": nn.ReLU6(inplace=True), "leaky_relu": nn.LeakyReLU(), "elu": nn.ELU(),
           "silu": nn.SiLU(inplace=True), "gelu": nn.GELU(), "hardswish": nn.Hardswish(), "softplus": nn.Softplus(),
           "tanh": nn.Tanh(), "mish": nn.Mish()}


class HandGuided(torch.autograd.Function):
    """f(x) forward; backward max(g, 0) * max(f'(x), 0) with f' from DERIVATIVES."""

    @staticmethod
    def forward(ctx, x, f, name):
        ctx.save_for_backward(x)
        ctx.act = name
        return f(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp_min(0) * DERIVATIVES[ctx.act](x).clamp_min(0).to(g.dtype), None, None


class Net(nn.Module):
    """conv -> block -> conv, stride 1 (so the rest of the backward is plain autograd)."""

    def __init__(self, block: nn.Module, c: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.block = block
        self.conv2 = nn.Conv2d(c, 5, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.block(self.conv1(x)))


def _autograd(model: nn.Module, x: torch.Tensor, channels: list[int], replace=None) -> torch.Tensor:
    """Plain autograd of channel q's activation map at ``conv2``, ``model.block`` replaced by
    ``replace(h)`` (the hand-written rule)."""
    out = []
    for q in channels:
        xl = x.detach().clone().requires_grad_(True)
        h = model.conv1(xl)
        h = replace(h) if replace is not None else model.block(h)
        a = model.conv2(h)
        g = torch.zeros_like(a)
        g[:, q] = a[:, q].detach()
        out.append(torch.autograd.grad(a, xl, g)[0])
    return torch.stack(out, 1)


def _close(got, want):
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-7)


@pytest.fixture
def x():
    return torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(DERIVATIVES))
def test_activation_rule_equals_the_hand_written_function(name, x):
    torch.manual_seed(0)
    model = Net(MODULES[name]).double().eval()
    f = {"relu6": lambda t: F.relu6(t), "silu": F.silu}.get(name, MODULES[name])
    want = _autograd(model, x, [0, 3], lambda h: HandGuided.apply(h, f, name))
    _close(visualize(model, x, "conv2", [0, 3]), want)
    # the plain gradient differs: the rule is not autograd's own backward
    plain = _autograd(model, x, [0, 3])
    assert (plain - want).abs().max() > 1e-3 * want.abs().max()


class FunctionalForms(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, h):
        if self.form == "F.relu":
            return F.relu(h)
        if self.form == "torch.relu":
            return torch.relu(h)
        if self.form == "method":
            return h.relu()
        if self.form == "F.relu inplace":
            y = h * 1.0
            F.relu(y, inplace=True)  # the result is not used: only the in-place change counts
            return y
        y = h * 1.0
        y.relu_()
        return y


@pytest.mark.parametrize("form", ["F.relu", "torch.relu", "method", "F.relu inplace", "relu_"])
def test_relu_in_any_form_is_guided(form, x):
    """The rule attaches where autograd records the ReLU, not only to nn.ReLU modules; an
    in-place ReLU whose result the forward ignores still acts in place."""
    torch.manual_seed(0)
    model = Net(FunctionalForms(form)).double().eval()
    want = _autograd(model, x, [1, 4], lambda h: HandGuided.apply(h, torch.relu, "relu"))
    _close(visualize(model, x, "conv2", [1, 4]), want)
    with torch.no_grad():
        forward = model(x)
    ref = Net(nn.ReLU()).double().eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(forward, ref(x))


class SE(nn.Module):
    """Squeeze-excitation as in EfficientNet: y * sigmoid(fc2(relu(fc1(mean(y)))))."""

    def __init__(self, c: int = 6, gate=torch.sigmoid):
        super().__init__()
        self.fc1, self.fc2, self.gate = nn.Conv2d(c, 3, 1), nn.Conv2d(3, c, 1), gate

    def scale(self, h):
        return self.gate(self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True)))))

    def forward(self, h):
        return h * self.scale(h)


@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_gate_is_held_constant(gate, x):
    torch.manual_seed(0)
    se = SE(gate=torch.sigmoid if gate == "sigmoid" else F.hardsigmoid)
    model = Net(se).double().eval()
    want = _autograd(model, x, [0, 2], lambda h: h * se.scale(h).detach())
    _close(visualize(model, x, "conv2", [0, 2]), want)


def test_torchvision_squeeze_excitation_gate_is_held_constant(x):
    torch.manual_seed(0)
    se = torchvision.ops.SqueezeExcitation(6, 3)
    model = Net(se).double().eval()

    def held(h):
        s = se.scale_activation(se.fc2(se.activation(se.fc1(se.avgpool(h)))))
        return h * s.detach()

    _close(visualize(model, x, "conv2", [0, 2]), _autograd(model, x, [0, 2], held))


class Tokens(nn.Module):
    """(B, C, H, W) -> tokens (B, HW, C) -> norm -> back: LayerNorm over the channels."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, h):
        t = self.norm(h.flatten(2).transpose(1, 2))
        return t.transpose(1, 2).reshape(h.shape)


def _held_norm(h, dims, w, b, eps, groups=None):
    if groups is not None:
        hg = h.reshape(h.shape[0], groups, -1)
        c = hg - hg.mean(-1, keepdim=True)
        y = (c / torch.sqrt(c.detach().pow(2).mean(-1, keepdim=True) + eps)).reshape(h.shape)
        return y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    c = h - h.mean(dims, keepdim=True)
    return c / torch.sqrt(c.detach().var(dims, unbiased=False, keepdim=True) + eps) * w + b


def _randomise_affine(m):
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.3, 0.3)
    return m


@pytest.mark.parametrize("kind", ["LayerNorm", "LayerNorm2d", "GroupNorm"])
def test_norm_rule_holds_sigma(kind, x):
    torch.manual_seed(0)
    if kind == "LayerNorm":
        norm = _randomise_affine(nn.LayerNorm(6))
        block = Tokens(norm)

        def held(h):
            t = h.flatten(2).transpose(1, 2)
            return _held_norm(t, (-1,), norm.weight, norm.bias, norm.eps).transpose(1, 2).reshape(h.shape)
    elif kind == "LayerNorm2d":
        from torchvision.models.convnext import LayerNorm2d
        block = norm = _randomise_affine(LayerNorm2d(6, eps=1e-6))

        def held(h):
            t = h.permute(0, 2, 3, 1)
            return _held_norm(t, (-1,), norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
    else:
        block = norm = _randomise_affine(nn.GroupNorm(3, 6))

        def held(h):
            return _held_norm(h, None, norm.weight, norm.bias, norm.eps, groups=3)
    model = Net(block).double().eval()
    want = _autograd(model, x, [0, 4], held)
    _close(visualize(model, x, "conv2", [0, 4]), want)
    assert (_autograd(model, x, [0, 4]) - want).abs().max() > 1e-3 * want.abs().max()  # not the plain gradient


class Attention(nn.Module):
    """Tokens through nn.MultiheadAttention (batch_first) or F.scaled_dot_product_attention."""

    def __init__(self, how: str, c: int = 6, heads: int = 2):
        super().__init__()
        self.how, self.heads = how, heads
        self.mha = nn.MultiheadAttention(c, heads, batch_first=True)
        self.qkv = nn.Linear(c, 3 * c)

    def forward(self, h):
        t = h.flatten(2).transpose(1, 2)  # (B, T, C)
        if self.how == "mha":
            o = self.mha(t, t, t, need_weights=False)[0]
        else:
            B, T, C = t.shape
            q, k, v = self.qkv(t).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        return o.transpose(1, 2).reshape(h.shape)

    def held(self, h):
        """The same with the softmax weights detached, written out."""
        t = h.flatten(2).transpose(1, 2)
        B, T, C = t.shape
        d = C // self.heads
        if self.how == "mha":
            w, b = self.mha.in_proj_weight, self.mha.in_proj_bias
            q, k, v = (F.linear(t, w[i * C:(i + 1) * C], b[i * C:(i + 1) * C]) for i in range(3))
            q, k, v = (z.reshape(B, T, self.heads, d).transpose(1, 2) for z in (q, k, v))
        else:
            q, k, v = self.qkv(t).reshape(B, T, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), -1).detach()
        o = (a @ v).transpose(1, 2).reshape(B, T, C)
        if self.how == "mha":
            o = self.mha.out_proj(o)
        return o.transpose(1, 2).reshape(h.shape)


@pytest.mark.parametrize("how", ["mha", "sdpa"])
def test_attention_rule_holds_the_softmax_weights(how, x):
    torch.manual_seed(0)
    block = Attention(how)
    model = Net(block).double().eval()
    want = _autograd(model, x, [1, 3], block.held)
    _close(visualize(model, x, "conv2", [1, 3]), want)
    with torch.no_grad():  # the rule's forward is the module's own
        torch.testing.assert_close(block.held(model.conv1(x)), block(model.conv1(x)))


def test_a_rule_can_be_replaced_for_one_call(x):
    """A composite per call: GELU carried back as ReLU for one call; the default is untouched."""
    torch.manual_seed(0)
    model = Net(nn.GELU()).double().eval()
    default = visualize(model, x, "conv2", [0])

    class GeluAsRelu(OpRule):
        def __call__(self, func, args, kwargs, ctx):
            return HandGuided.apply(args[0], func, "relu")

    replaced = visualize(model, x, "conv2", [0], composite=DEFAULT_COMPOSITE.with_rules({"gelu": GeluAsRelu()}))
    _close(replaced, _autograd(model, x, [0], lambda h: HandGuided.apply(h, F.gelu, "relu")))
    assert (replaced - default).abs().max() > 1e-6
    torch.testing.assert_close(visualize(model, x, "conv2", [0]), default, atol=0, rtol=0)
    assert isinstance(DEFAULT_COMPOSITE["gelu"], GuidedActivationRule)


class Doubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, h):
        return h * self.w


def test_a_module_rule_can_be_added_for_one_call(x):
    model = Net(Doubler()).double().eval()
    with pytest.raises(UnsupportedModuleError, match=r"'block' \(Doubler\) has parameters"):
        visualize(model, x, "conv2", [0])
    got = visualize(model, x, "conv2", [0], composite={Doubler: TransposeRule()})
    _close(got, _autograd(model, x, [0]))


def test_bad_composite():
    model = Net(nn.ReLU())
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(TypeError, match="composite: expected a vxnb.deconv.Composite"):
        visualize(model, x, "conv2", [0], composite=["relu"])
    with pytest.raises(TypeError, match=r"rules\['relu'\]: expected a vxnb.deconv.OpRule"):
        visualize(model, x, "conv2", [0], composite={"relu": TransposeRule()})
    with pytest.raises(TypeError, match=r"rules\[ReLU\]: expected a vxnb.deconv.Rule"):
        Composite({nn.ReLU: GuidedActivationRule()})
    with pytest.raises(TypeError, match="keys must be nn.Module subclasses or operation names"):
        Composite({3: TransposeRule()})


def test_token_layout_seeds_the_feature_at_the_patch_tokens():
    """layout=("last", p): channel q is feature q of a (B, T, D) token tensor, seeded at the
    patch tokens only (the first p tokens, class/register, left out): the hand-built seed."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8,
                                               mlp_dim=16, num_classes=2).double().eval()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    layer = "encoder.layers.encoder_layer_0"
    got = visualize(vit, x, layer, [3, 5], layout=("last", 1))
    assert got.shape == (2, 2, 3, 16, 16)
    for i, q in enumerate([3, 5]):
        # the same through the generic path: a seed written by hand for the token output
        from vxnb.deconv import _backward

        def seed(a, k, q=q):
            g = torch.zeros_like(a)
            g[:, 1:, q] = a[:, 1:, q]
            return g

        torch.testing.assert_close(got[:, i], _backward(vit, x, layer, True, seed, 1)[:, 0], atol=0, rtol=0)
    with pytest.raises(IndexError, match="channel 8 is out of range.*8 channels"):
        visualize(vit, x, layer, [8], layout=("last", 1))
    with pytest.raises(ValueError, match="layout: expected"):
        visualize(vit, x, layer, [0], layout=("middle", 0))


@pytest.mark.parametrize("block", ["gelu", "se", "layer_norm", "mha", "sdpa"])
def test_vmapped_backward_equals_one_by_one(block, x):
    """The rules' Functions also go back vmapped (``is_grads_batched``, the default off the CPU)."""
    from vxnb.deconv import _backward, _channel_seed

    torch.manual_seed(0)
    b = {"gelu": nn.GELU(), "se": SE(), "layer_norm": Tokens(_randomise_affine(nn.LayerNorm(6))),
         "mha": Attention("mha"), "sdpa": Attention("sdpa")}[block]
    model = Net(b).double().eval()
    seed = _channel_seed([0, 2, 4], "conv2")
    one = _backward(model, x, "conv2", True, seed, 3, batched=False)
    assert one.abs().max() > 0
    torch.testing.assert_close(_backward(model, x, "conv2", True, seed, 3, batched=True), one, atol=1e-12, rtol=1e-9)


def test_swin_patch_merging_is_resampled_as_a_2x2_stride_2_convolution():
    """Patch merging's space-to-depth is the 2x2 stride-2 conv with one-hot weights: its
    resampled backward is the oracle's resampled conv backward (tests/deconv_reference.py)."""
    from deconv_reference import ResampledConv2d
    from torchvision.models.swin_transformer import PatchMerging

    from vxnb.deconv import _SpaceToDepth

    C, H, W = 3, 10, 8
    conv = nn.Conv2d(C, 4 * C, 2, stride=2, bias=False).double()
    with torch.no_grad():
        conv.weight.zero_()
        for k, (dy, dx) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
            for c in range(C):
                conv.weight[k * C + c, c, dy, dx] = 1.0
    x = torch.randn(2, H, W, C, dtype=torch.float64, requires_grad=True)
    y = _SpaceToDepth.apply(x)
    xc = x.detach().permute(0, 3, 1, 2).requires_grad_(True)
    yc = ResampledConv2d.apply(xc, conv)
    torch.testing.assert_close(y, yc.permute(0, 2, 3, 1))  # the same forward
    g = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, x, g)
    (want,) = torch.autograd.grad(yc, xc, g.permute(0, 3, 1, 2))
    torch.testing.assert_close(got, want.permute(0, 2, 3, 1), atol=1e-12, rtol=1e-10)
    # in a model: resampled differs from plain, and equals plain where nothing is strided
    torch.manual_seed(0)

    class Merge(nn.Module):
        def __init__(self):
            super().__init__()
            self.merge = PatchMerging(6)

        def forward(self, h):
            return self.merge(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 6, 3, padding=1))
    model.add_module("merge", Merge())
    model.add_module("conv2", nn.Conv2d(12, 5, 3, padding=1))
    model = model.double().eval()
    xi = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    res, plain = visualize(model, xi, "conv2", [0, 2]), visualize(model, xi, "conv2", [0, 2], resample=False)
    assert (res - plain).abs().max() > 1e-3 * plain.abs().max()


@pytest.mark.parametrize("name,f", [("silu", F.silu), ("sigmoid", torch.sigmoid), ("tanh", torch.tanh),
                                    ("hardswish", F.hardswish), ("hardsigmoid", F.hardsigmoid), ("mish", F.mish),
                                    ("gelu", F.gelu), ("gelu tanh", lambda t: F.gelu(t, approximate="tanh"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_activation_derivative_kernels_equal_autograd(name, f, dtype):
    """The activation rule's f'(x) is read from the kernel autograd's own backward calls (no
    engine run per activation): bit for bit what autograd gives with a seed of ones."""
    from vxnb.deconv import _DERIVATIVES

    x = torch.randn(2, 3, 7, 5, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 4
    xl = x.clone().requires_grad_(True)
    y = f(xl)
    (want,) = torch.autograd.grad(y, xl, torch.ones_like(y))
    kw = {"approximate": "tanh"} if name == "gelu tanh" else {}
    got = _DERIVATIVES[name.split()[0]](x, y.detach(), [], kw)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ---------------------------------------------------------------- BatchNorm then activation (issue 25 item 6)
# An activation right after an eval-mode BatchNorm carries the signal back through both in one
# autograd node (the BatchNorm's per-channel scale folded into the saved derivative). The
# reference keeps them apart: plain autograd through F.batch_norm, then the hand-written rule.

def _random_bn(c: int, seed: int = 1, affine: bool = True) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, affine=affine)
    with torch.no_grad():
        if affine:
            bn.weight.copy_(torch.randn(c, generator=g))  # negative scales too
            bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.1)
    return bn


class BNThen(nn.Module):
    """bn -> activation, optionally with the BatchNorm's output also used elsewhere (``"twice"``)
    or changed in place before the activation (``"inplace add"``, as ResNet's ``out += identity``);
    ``"no affine"``: a BatchNorm without weight and bias."""

    def __init__(self, act: nn.Module, c: int = 6, form: str = "plain"):
        super().__init__()
        self.bn, self.act, self.form = _random_bn(c, affine=form != "no affine"), act, form

    def forward(self, h):
        t = self.bn(h)
        if self.form == "twice":
            return self.act(t) + 0.5 * t
        if self.form == "inplace add":
            t += h
        return self.act(t)


def _bn_then_reference(model: nn.Module, f, name: str, form: str):
    bn = model.block.bn

    def replace(h):
        t = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        if form == "twice":
            return HandGuided.apply(t, f, name) + 0.5 * t
        if form == "inplace add":
            t = t + h
        return HandGuided.apply(t, f, name)
    return replace


@pytest.mark.parametrize("form", ["plain", "twice", "inplace add", "no affine"])
@pytest.mark.parametrize("name", sorted(DERIVATIVES))
def test_batchnorm_then_activation_equals_the_two_rules(name, form, x):
    torch.manual_seed(0)
    f = {"relu6": lambda t: F.relu6(t), "silu": F.silu}.get(name, MODULES[name])
    model = Net(BNThen(MODULES[name], form=form)).double().eval()
    want = _autograd(model, x, [0, 3], _bn_then_reference(model, f, name, form))
    _close(visualize(model, x, "conv2", [0, 3]), want)
    _close(visualize(model, x, "conv2", [0, 3], resample=False), want)


def test_batchnorm_then_activation_is_one_node():
    """The fused path is taken: no BatchNorm backward between the activation and conv1."""
    from vxnb.deconv import RecordedForward
    torch.manual_seed(0)
    model = Net(BNThen(nn.SiLU())).double().eval()
    rec = RecordedForward(model, torch.randn(1, 3, 5, 5, dtype=torch.float64), True, ["block"])
    with rec.forward() as xl:
        model(xl)
    a = rec.output("block")
    assert type(a.grad_fn).__name__ == "_GuidedActivationBackward"
    assert type(a.grad_fn.next_functions[0][0]).__name__ == "ConvolutionBackward0"


def test_batchnorm_without_rule_still_refused_before_an_activation(x):
    torch.manual_seed(0)
    model = Net(BNThen(nn.SiLU())).double().eval()
    with pytest.raises(UnsupportedModuleError, match="block.bn"):
        visualize(model, x, "conv2", [0], composite=DEFAULT_COMPOSITE.with_rules({nn.BatchNorm2d: None}))
    model.block.bn = nn.BatchNorm2d(6, track_running_stats=False).double()
    with pytest.raises(UnsupportedModuleError, match="track_running_stats"):
        visualize(model, x, "conv2", [0])
