"""Issue 25: every torchvision classification architecture through the public steps
(``extract_features`` -> ``lasso_path`` -> ``Relevance`` -> ``explain``), random weights, small
inputs, reduced widths and depths where the constructor allows; and bad input."""
from __future__ import annotations

import time

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

from vxnb.deconv import UnsupportedModuleError, visualize
from vxnb.explanations import explain
from vxnb.features import extract_features
from vxnb.lasso import lasso_path
from vxnb.relevance import Relevance

torch.set_num_threads(1)
M = torchvision.models


def _vit():
    return M.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                               num_classes=2)


def _swin(v2: bool = False):
    from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlockV2, PatchMergingV2
    kw = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
                           num_classes=2, **kw)


def _maxvit():
    from torchvision.models.maxvit import MaxVit
    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16], block_layers=[1, 1],
                  head_dim=4, stochastic_depth_prob=0.2, num_classes=2)


def _convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=2)


#: one architecture of each torchvision family (name -> (builder, input size))
ARCHS = {
    "alexnet": (lambda: M.alexnet(num_classes=2), 64),
    "convnext": (_convnext, 32),
    "densenet121": (lambda: M.densenet121(num_classes=2), 32),
    "efficientnet_b0": (lambda: M.efficientnet_b0(num_classes=2), 32),
    "efficientnet_v2_s": (lambda: M.efficientnet_v2_s(num_classes=2), 32),
    "googlenet": (lambda: M.googlenet(num_classes=2, aux_logits=False, init_weights=False), 32),
    "inception_v3": (lambda: M.inception_v3(num_classes=2, aux_logits=False, init_weights=False), 75),
    "maxvit": (_maxvit, 32),
    "mnasnet0_5": (lambda: M.mnasnet0_5(num_classes=2), 32),
    "mobilenet_v2": (lambda: M.mobilenet_v2(num_classes=2), 32),
    "mobilenet_v3_small": (lambda: M.mobilenet_v3_small(num_classes=2), 32),
    "regnet_x_400mf": (lambda: M.regnet_x_400mf(num_classes=2), 32),
    "regnet_y_400mf": (lambda: M.regnet_y_400mf(num_classes=2), 32),
    "resnet18": (lambda: M.resnet18(num_classes=2), 32),
    "resnext50_32x4d": (lambda: M.resnext50_32x4d(num_classes=2), 32),
    "shufflenet_v2_x0_5": (lambda: M.shufflenet_v2_x0_5(num_classes=2), 32),
    "squeezenet1_1": (lambda: M.squeezenet1_1(num_classes=2), 32),
    "swin": (_swin, 32),
    "swin_v2": (lambda: _swin(v2=True), 32),
    "vgg11": (lambda: M.vgg11(num_classes=2), 32),
    "vit": (_vit, 32),
}


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_torchvision_classifier_is_explained(arch):
    t0 = time.process_time()
    torch.manual_seed(0)
    build, size = ARCHS[arch]
    model = _randomise_bn(build()).eval()
    x = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(2))
    y = torch.arange(8) % 2
    feats = extract_features(model, TensorDataset(x, y), n_classes=2, progress=False)
    path = lasso_path(feats.G, feats.XtL, mu_max=1.0, progress=False)
    rel = Relevance.from_path(path, feats, 1.0, classes=["a", "b"])
    drawn = 0
    for target in (0, 1):
        for resample in (True, False):
            e = explain(model, rel, x[0], k=3, target=target, resample=resample)
            assert e.heatmaps.shape == (e.k, size, size)
            assert torch.isfinite(e.heatmaps).all() and torch.isfinite(e.combined).all()
            if e.k:
                assert e.heatmaps.flatten(1).amax(1).eq(1).all()  # each map reaches 1: not all zero
                drawn += e.k
    assert drawn > 0, f"{arch}: no relevant feature responded; nothing was drawn"
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in model.modules())
    print(f"{arch}: {time.process_time() - t0:.1f} s CPU")


def test_an_operation_without_a_rule_is_refused_naming_it():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.up = nn.Upsample(scale_factor=2, mode="bicubic")

        def forward(self, x):
            return self.conv(self.up(x))

    with pytest.raises(UnsupportedModuleError, match=r"module 'up' \(Upsample\): operation interpolate "
                                                     r"\(UpsampleBicubic2DBackward\d*\) has no DeconvNet rule"):
        visualize(Up(), torch.rand(1, 3, 8, 8), "conv", [0])


class NotLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)  # (N, 4, H, W), not (N, C) logits


def test_a_model_whose_output_is_not_logits_is_refused_naming_the_shape():
    import pandas as pd

    model = NotLogits()
    frame = pd.DataFrame([{"class": 0, "layer": "conv", "layer_number": 1, "kind": "conv", "channel": 1,
                           "weight": 1.0}])
    rel = Relevance.from_frame(frame, n_classes=2)
    with pytest.raises(ValueError, match=r"model: expected logits of shape \(B, num_classes\), got \(1, 4, 6, 6\)"):
        explain(model, rel, torch.rand(3, 8, 8))


def test_total_strides_of_patch_embeddings():
    """The grid period (``vxnb._graph.stride_at``) of a patch embedding and after it: ViT's
    patch size (also behind its attention, a whole-image operation) and ConvNeXt's stem x
    downsampling."""
    from vxnb._graph import stride_at

    vit = _vit()
    assert stride_at(vit, "conv_proj", (3, 32, 32)) == (8, True)
    assert stride_at(vit, "encoder.layers.encoder_layer_1", (3, 32, 32)) == (8, False)
    cnx = M.convnext_tiny()
    assert stride_at(cnx, "features.0", (3, 64, 64)) == (4, True)
    assert stride_at(cnx, "features.3", (3, 64, 64)) == (8, True)


def test_explain_draws_a_token_feature_from_its_patch_tokens():
    """A ViT block's feature q is the L2 norm of dim q of its patch tokens (vxnb.features):
    explain() seeds exactly that (layout ("last", 1)), the same map as visualize() with it."""
    import pandas as pd

    from vxnb.deconv import heatmap

    torch.manual_seed(0)
    vit = _vit().eval()
    layer = "encoder.layers.encoder_layer_1"
    frame = pd.DataFrame([{"class": j, "layer": layer, "layer_number": 1, "kind": "other", "channel": q,
                           "weight": 1.0} for j in range(2) for q in (5, 20, 31)])
    rel = Relevance.from_frame(frame, n_classes=2)
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3))
    e = explain(vit, rel, x, k=3, target=0)
    assert sorted(e.features["channel"]) == [5, 20, 31]  # D = 32 features, not T = 17 tokens
    for i, q in enumerate(e.features["channel"]):
        want = heatmap(visualize(vit, x[None], layer, [int(q)], layout=("last", 1)))[0, 0]
        torch.testing.assert_close(e.heatmaps[i], want, atol=1e-6, rtol=1e-5)
    with pytest.raises(IndexError, match="out of range"):
        visualize(vit, x[None], layer, [32], layout=("last", 1))
