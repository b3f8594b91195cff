"""Transformer features: a token tensor (B, T, D) gives D features, each the L2 norm over the patch
tokens (class and register tokens excluded); a channels-last map (B, H, W, C) gives C features.
Every expected value is an explicit loop over the hooked outputs."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import SwinTransformer, VisionTransformer
from torchvision.ops import Permute

from vxnb.features import descriptors, extract_features
from vxnb.features.hooks import layout, prefix_tokens
from vxnb.utils import get_module


def _outputs(model, x, layers):
    got = {}
    hooks = [get_module(model, n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.detach().clone()))
             for n in layers]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return got


def _loop_norms(out, axes_of, skip=0):
    """(B, C) float64 by explicit loops: for each image b and channel c, √Σ of the squares of
    out at the positions ``axes_of(b, c)`` yields, the first ``skip`` of them left out."""
    B = out.shape[0]
    C = out.shape[-1] if axes_of.__name__ == "last" else out.shape[1]
    res = np.zeros((B, C))
    for b in range(B):
        for c in range(C):
            vals = list(axes_of(out, b, c))[skip:]
            res[b, c] = math.sqrt(sum(float(v) ** 2 for v in vals))
    return res


def last(out, b, c):  # channels-last: tokens (T) or (H, W) positions, in order
    for pos in np.ndindex(*out.shape[1:-1]):
        yield out[(b, *pos, c)]


def first(out, b, c):
    for pos in np.ndindex(*out.shape[2:]):
        yield out[(b, c, *pos)]


def _expected(parts):
    """L1-normalised per layer, concatenated."""
    return np.concatenate([p / np.where(p.sum(1, keepdims=True) > 0, p.sum(1, keepdims=True), 1) for p in parts], 1)


def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=24,
                             num_classes=3).eval()


def test_vit_tokens_are_normed_over_the_patch_tokens_without_the_class_token():
    model, x = vit(), torch.rand(3, 3, 32, 32)
    layers = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1.mlp.1", "encoder.ln"]
    assert prefix_tokens(model) == 1 and all(layout(model, n) == ("last", 1) for n in layers)
    outs = _outputs(model, x, layers)
    assert outs["encoder.ln"].shape == (3, 17, 16)  # 16 patches + the class token
    got = descriptors(model, x, layers).double().numpy()
    assert got.shape == (3, 16 + 24 + 16)
    want = _expected([_loop_norms(outs[n], last, skip=1) for n in layers])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    with_cls = _expected([_loop_norms(outs[n], last, skip=0) for n in layers])
    assert np.abs(with_cls - want).max() > 1e-3  # the class token would have changed them


def test_swin_channels_last_maps_are_normed_over_height_and_width():
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2],
                            num_classes=3).eval()
    x = torch.rand(2, 3, 32, 32)
    layers = ["features.1", "features.2", "norm", "permute"]
    assert [layout(model, n)[0] for n in layers] == ["last", "last", "last", "first"]
    outs = _outputs(model, x, layers)
    assert outs["features.1"].shape == (2, 8, 8, 8) and outs["permute"].shape == (2, 16, 4, 4)
    got = descriptors(model, x, layers).double().numpy()
    want = _expected([_loop_norms(outs[n], last) for n in layers[:3]] + [_loop_norms(outs["permute"], first)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_pointwise_module_takes_its_predecessors_layout_convnext_style():
    """Conv → Permute to channels-last → LayerNorm → Linear → GELU → Linear → Permute back: the GELU's
    output (B, H, W, 8) gives 8 features; after the permute back, 4 channels-first ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Permute([0, 2, 3, 1]), nn.LayerNorm(4), nn.Linear(4, 8), nn.GELU(),
                          nn.Linear(8, 4), Permute([0, 3, 1, 2]), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    x = torch.rand(2, 3, 7, 7)
    layers = ["0", "4", "6"]
    assert [layout(model, n)[0] for n in layers] == ["first", "last", "first"]
    outs = _outputs(model, x, layers)
    got = descriptors(model, x, layers).double().numpy()
    want = _expected([_loop_norms(outs["0"], first), _loop_norms(outs["4"], last), _loop_norms(outs["6"], first)])
    assert got.shape == (2, 4 + 8 + 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


class Registers(nn.Module):
    """A timm-style encoder: a class token and two register tokens before the patch tokens
    (``num_prefix_tokens = 3``), PyTorch's batch-first TransformerEncoderLayer."""

    num_prefix_tokens = 3

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.prefix = nn.Parameter(torch.randn(1, 3, 8))
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.act = nn.Identity()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = self.act(self.block(torch.cat([self.prefix.expand(x.shape[0], -1, -1), t], 1)))
        return self.head(t[:, 0])


def test_register_tokens_are_excluded_too():
    torch.manual_seed(0)
    model, x = Registers().eval(), torch.rand(2, 3, 16, 16)
    assert layout(model, "block") == ("last", 3)
    assert layout(model, "act") == ("tokens?", 3)  # unknown layout, 3-D, in a model with prefix tokens: tokens
    outs = _outputs(model, x, ["block", "act"])
    assert outs["block"].shape == (2, 3 + 16, 8)
    got = descriptors(model, x, ["block", "act"]).double().numpy()
    part = _loop_norms(outs["block"], last, skip=3)
    np.testing.assert_allclose(got, _expected([part, part]), rtol=1e-5, atol=1e-7)


def test_a_three_dimensional_cnn_output_stays_channels_first():
    """Without prefix tokens and with a known channels-first module, (B, C, L) is C channels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6, 3)).eval()
    x = torch.rand(4, 2, 8)
    assert layout(model, "1") == ("first", 0)
    outs = _outputs(model, x, ["1"])
    np.testing.assert_allclose(descriptors(model, x, ["1"]).double().numpy(),
                               _expected([_loop_norms(outs["1"], first)]), rtol=1e-5, atol=1e-7)


def test_only_prefix_tokens_is_an_error_naming_the_module():
    class OnlyClass(nn.Module):
        def __init__(self):
            super().__init__()
            self.class_token = nn.Parameter(torch.ones(1, 1, 4))
            self.act = nn.Identity()

        def forward(self, x):
            return self.act(self.class_token.expand(x.shape[0], -1, -1)).sum(1)

    with pytest.raises(ValueError, match="module 'act' has 1 tokens, no patch token after the 1 class/register"):
        descriptors(OnlyClass(), torch.rand(2, 3, 4, 4), ["act"])


def test_extract_features_on_a_vit_streams_the_token_features():
    model = vit()
    data = torch.utils.data.TensorDataset(torch.rand(10, 3, 32, 32), torch.arange(10) % 3)
    layers = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    feats = extract_features(model, data, layers, batch_size=4, keep_X=True, progress=False)
    assert feats.m == 32 and feats.columns.groupby("layer").size().to_dict() == {n: 16 for n in layers}
    X = feats.X.astype(np.float64)
    np.testing.assert_allclose(X, descriptors(model, data.tensors[0], layers).double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(feats.G, X.T @ X, rtol=1e-10, atol=1e-12)


def test_vit_default_layers_are_the_patch_embedding_and_the_block_outputs():
    """The encoder's position-embedding addition is no skip connection: the default layers of a
    ViT are its encoder blocks (each adds its own skip), as a ResNet's are its residual blocks."""
    from vxnb._graph import residual_blocks
    from vxnb.features import default_layers

    model = vit()
    blocks = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    assert residual_blocks(model) == blocks
    assert default_layers(model) == ["conv_proj", *blocks]
    x = torch.rand(2, 3, 32, 32)
    assert descriptors(model, x, default_layers(model)).shape == (2, 16 + 16 + 16)
