"""vxnb.interpret and vxnb.averages: receptive fields vs gradient support, top-k vs brute force, crops, averages."""
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vxnb.averages import average_images, crop_patch
from vxnb.interpret import ReceptiveField, TopPatches, collect_top_patches, receptive_field, receptive_fields
from nets import rgb_net


# ----------------------------------------------------------------------------- helpers
def _positive(model: nn.Module) -> nn.Module:
    """|weights|, zero biases, float64, eval: every path from an input pixel adds, nothing cancels."""
    model = model.double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.abs_().add_(1e-3)
                if m.bias is not None:
                    m.bias.zero_()
    return model


def _max_to_avg(model: nn.Module) -> nn.Module:
    """MaxPool2d → AvgPool2d of the same geometry (the gradient of a max reaches one pixel only)."""
    for name, child in model.named_children():
        if isinstance(child, nn.MaxPool2d):
            assert child.dilation in (1, (1, 1))
            setattr(model, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                              ceil_mode=child.ceil_mode))
        else:
            _max_to_avg(child)
    return model


def _layer_output(model, x, layer):
    store = {}
    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: store.__setitem__("o", o))
    try:
        model(x)
    finally:
        h.remove()
    return store["o"]


def _bbox(mask: torch.Tensor):
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def _grad_bbox(model, x, layer, row, col, channel=0):
    """Bounding box of the input pixels with nonzero gradient of one output unit."""
    x = x.clone().requires_grad_(True)
    out = _layer_output(model, x, layer)
    unit = out[0, channel, row, col] if out.dim() == 4 else out[0, channel]
    (g,) = torch.autograd.grad(unit, x)
    return _bbox(g[0].abs().sum(0) > 0)


def _perturb_bbox(model, x, layer, row, col, channel=0):
    """Bounding box of the input pixels whose increase changes one output unit (exact for max-pooling)."""
    _, c, h, w = x.shape
    with torch.no_grad():
        base = _layer_output(model, x, layer)[0, channel, row, col]
        xs = x.repeat(h * w, 1, 1, 1)
        idx = torch.arange(h * w)
        xs[idx, :, idx // w, idx % w] += 100.0
        outs = torch.cat([_layer_output(model, xs[i:i + 256], layer)[:, channel, row, col]
                          for i in range(0, h * w, 256)])
    return _bbox((outs != base).reshape(h, w))


def _check_layers(model, x, layers, support=_grad_bbox):
    h, w = x.shape[-2:]
    for layer in layers:
        rf = receptive_field(model, layer)
        out = _layer_output(model, x, layer)
        oh, ow = out.shape[-2:]
        for (r, c) in {(0, 0), (oh - 1, ow - 1), (oh // 2, ow // 3), (0, ow - 1)}:
            expected = rf.clipped_box(r, c, h, w)
            assert support(model, x, layer, r, c) == expected, (layer, (r, c), rf)


# ----------------------------------------------------------------------------- receptive fields
def test_rf_hand_computed_conv_chain():
    model = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 2, 5, stride=2, padding=2)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(2, 2, 3)), ("pool2", nn.MaxPool2d(2, 2)),
    ]))
    assert receptive_field(model, "conv1") == ReceptiveField((5, 5), (2, 2), (0.0, 0.0))
    assert receptive_field(model, "relu1") == receptive_field(model, "conv1")
    # conv2: 3 taps at jump 2 → 5 + 2·2 = 9, first unit centred on conv1 unit 1 → pixel 2
    assert receptive_field(model, "conv2") == ReceptiveField((9, 9), (2, 2), (2.0, 2.0))
    # pool2: 2 taps at jump 2 → 11, stride 4, centre between conv2 units 0 and 1 → 3
    rf = receptive_field(model, "pool2")
    assert rf == ReceptiveField((11, 11), (4, 4), (3.0, 3.0))
    assert rf.box(1, 0) == (2, -2, 13, 9)


@pytest.mark.filterwarnings("ignore:Using padding=.same.")
def test_rf_conv_matches_gradient_support():
    model = _positive(nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(2, 3, 5, stride=2, padding=2)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(3, 3, 3)), ("relu2", nn.ReLU()),
        ("conv3", nn.Conv2d(3, 2, (3, 5), stride=(2, 1), padding=(1, 0))),
        ("conv4", nn.Conv2d(2, 2, 4, padding="same")),
    ])))
    x = torch.rand(1, 2, 41, 37, dtype=torch.float64) + 0.1
    _check_layers(model, x, ["conv1", "relu1", "conv2", "conv3", "conv4"])


def test_rf_avg_pooling_matches_gradient_support():
    model = _positive(nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 2, 3, padding=1)),
        ("pool1", nn.AvgPool2d(3, stride=2, padding=1)),
        ("conv2", nn.Conv2d(2, 2, 3, padding=1)),
        ("pool2", nn.AvgPool2d(2)),
        ("conv3", nn.Conv2d(2, 2, 3, stride=2)),
    ])))
    x = torch.rand(1, 1, 40, 40, dtype=torch.float64) + 0.1
    _check_layers(model, x, ["pool1", "conv2", "pool2", "conv3"])


def test_rf_max_pooling_matches_perturbation_support():
    model = _positive(nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 2, 3, padding=1)), ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
        ("conv2", nn.Conv2d(2, 2, 3)),
        ("pool2", nn.MaxPool2d(2, 2, dilation=2)),
    ])))
    x = torch.rand(1, 1, 26, 26, dtype=torch.float64) + 0.1
    _check_layers(model, x, ["pool1", "conv2", "pool2"], support=_perturb_bbox)


def test_rf_dilation_matches_gradient_support():
    model = _positive(nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 2, 3, dilation=2, padding=2)),
        ("conv2", nn.Conv2d(2, 2, 3, dilation=3, stride=2, padding=1)),
        ("conv3", nn.Conv2d(2, 2, (2, 3), dilation=(2, 1))),
    ])))
    assert receptive_field(model, "conv1").size == (5, 5)
    assert receptive_field(model, "conv2").size == (11, 11)  # 5 + 3·2
    x = torch.rand(1, 1, 45, 45, dtype=torch.float64) + 0.1
    _check_layers(model, x, ["conv1", "conv2", "conv3"])


class _TwoBranch(nn.Module):
    """A residual-style sum whose branches reach out on different sides (union, not either one)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)            # [-1, 1]
        self.b = nn.Conv2d(2, 2, 4, padding="same")       # [-1, 2] (torch pads 1 left, 2 right)
        self.c = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        return torch.relu(y) + self.c(x)


@pytest.mark.filterwarnings("ignore:Using padding=.same.")
def test_rf_residual_blocks_match_gradient_support():
    from torchvision.models.resnet import BasicBlock, Bottleneck

    down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2), nn.BatchNorm2d(8))
    down2 = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16))
    model = _positive(nn.Sequential(OrderedDict([
        ("stem", nn.Conv2d(2, 4, 3, padding=1)),
        ("block1", BasicBlock(4, 8, stride=2, downsample=down)),
        ("block2", Bottleneck(8, 4, stride=2, downsample=down2)),
    ])))
    x = torch.rand(1, 2, 48, 48, dtype=torch.float64) + 0.1
    assert receptive_field(model, "block1").size == (3 + 2 + 4, 3 + 2 + 4)
    assert receptive_field(model, "block1.downsample").size == (3, 3)   # the branch alone
    _check_layers(model, x, ["block1.conv1", "block1", "block1.downsample", "block2.conv2", "block2"])

    two = _positive(nn.Sequential(OrderedDict([("two", _TwoBranch())])))
    rf = receptive_field(two, "two")
    assert rf.size == (4, 4) and rf.offset == (0.5, 0.5)  # union [-1, 2]
    _check_layers(two, torch.rand(1, 2, 20, 20, dtype=torch.float64) + 0.1, ["two", "two.b"])


def test_rf_torchvision_resnet18_layer1():
    import torchvision

    model = _positive(_max_to_avg(torchvision.models.resnet18()))
    x = torch.rand(1, 3, 96, 96, dtype=torch.float64) + 0.1
    assert receptive_field(model, "layer1").size == (43, 43)
    assert receptive_field(model, "layer2").size == (99, 99)
    assert receptive_field(model, "layer4").size == (435, 435)
    assert receptive_field(model, "fc").whole_image
    _check_layers(model, x, ["maxpool", "layer1.0", "layer1"])


def test_rf_reference_models_match_support():
    from vxnb import models
    spatial = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    mnist = _positive(_max_to_avg(models.MnistNet()))
    x = torch.rand(1, 1, 28, 28, dtype=torch.float64) + 0.1
    _check_layers(mnist, x, [n for n, m in mnist.named_children() if isinstance(m, spatial)])
    flower = _positive(_max_to_avg(models.FlowerNet(6, size=64)))
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64) + 0.1
    names = [n for n, m in flower.named_children() if isinstance(m, spatial)]
    _check_layers(flower, x, names[:4])
    fcs = [n for n, m in flower.named_children() if isinstance(m, (nn.Flatten, nn.Linear))]
    assert len(fcs) >= 3
    for layer in fcs:
        assert receptive_field(flower, layer).whole_image
    # an FC unit depends on every pixel
    assert _grad_bbox(flower, x, fcs[1], 0, 0) == (0, 0, 64, 64)
    table = receptive_fields(flower, input_size=64).set_index("layer")
    assert list(table.index[:2]) == ["conv1", "relu1"]
    for layer in names:  # the reported map sizes are the real ones
        assert tuple(table.loc[layer, ["out_h", "out_w"]]) == tuple(_layer_output(flower, x, layer).shape[-2:])


def test_rf_adaptive_pool_identity_with_input_size():
    model = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 1, 3, stride=2)), ("ap", nn.AdaptiveAvgPool2d(7))]))
    assert receptive_field(model, "ap").whole_image                    # unknown input size: global
    assert receptive_field(model, "ap", input_size=15).size == (3, 3)  # 15 → 7: identity
    assert receptive_field(model, "ap", input_size=(1, 31, 31)).whole_image


def test_rf_bad_inputs():
    model = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 1, 3)), ("up", nn.Upsample(scale_factor=2))]))
    with pytest.raises(ValueError, match="no module 'nope'.*conv"):
        receptive_field(model, "nope")
    with pytest.raises(ValueError, match="'up'.*Upsample.*not supported"):
        receptive_field(model, "conv")
    with pytest.raises(TypeError, match="model"):
        receptive_fields("resnet")
    with pytest.raises(ValueError, match="input_size"):
        receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3)), "0", input_size=(0, 5))

    class Odd(nn.Module):
        def forward(self, x):
            return torch.fft.fft2(x).real

    with pytest.raises(ValueError, match="unsupported operation 'fft"):
        receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3), Odd()), "0")


# ----------------------------------------------------------------------------- top-k patches


def _brute_force(model, x, layer, score, k):
    with torch.no_grad():
        out = _layer_output(model, x, layer).double()
    rows = []
    for ch in range(out.shape[1]):
        if out.dim() == 4:
            maps = out[:, ch].flatten(1)
            norms_all = out.flatten(2).norm(dim=2)
            peak, arg = maps.max(1)
            s = {"max": peak, "norm": norms_all[:, ch], "descriptor": norms_all[:, ch] / norms_all.sum(1)}[score]
            r, c = (arg // out.shape[3]).numpy(), (arg % out.shape[3]).numpy()
        else:
            absn = out.abs()
            peak = out[:, ch]
            s = {"max": peak, "norm": absn[:, ch], "descriptor": absn[:, ch] / absn.sum(1).clamp_min(1e-300)}[score]
            r = c = np.full(len(x), -1)
        s = s.numpy()
        order = np.lexsort((np.arange(len(x)), -s))[:k]
        for rank, i in enumerate(order):
            rows.append((layer, ch, rank, i, r[i], c[i], s[i]))
    return pd.DataFrame(rows, columns=["layer", "channel", "rank", "index", "row", "col", "score"])


@pytest.mark.parametrize("score", ["descriptor", "norm", "max"])
def test_top_patches_equal_brute_force(score):
    model = rgb_net().double()
    with torch.no_grad():  # a dead channel (all zero responses): ties go to the image seen first
        model.conv2.weight[2].zero_()
        model.conv2.bias[2] = -1.0
    x = torch.rand(37, 3, 16, 16, dtype=torch.float64)
    layers = ["relu1", "relu2", "fc3"]
    for k in (5, 50):
        tp = TopPatches(model, layers=layers, k=k, score=score)
        with torch.no_grad():
            for start in range(0, len(x), 8):  # uneven batches
                xb = x[start:start + 8]
                outs = {}
                hs = [dict(model.named_modules())[l].register_forward_hook(
                    lambda m, i, o, l=l: outs.__setitem__(l, o)) for l in layers]
                model(xb)
                for h in hs:
                    h.remove()
                tp(outs, torch.arange(start, start + len(xb)))
        got = tp.to_frame()
        want = pd.concat([_brute_force(model, x, l, score, k) for l in layers], ignore_index=True)
        assert len(got) == len(want) == sum(min(k, 37) * n for n in (4, 5, 6))
        for col in ["layer", "channel", "rank", "index", "row", "col"]:
            np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)
        np.testing.assert_allclose(got["score"], want["score"], rtol=1e-10)
        dead = got[(got.layer == "relu2") & (got.channel == 2)]
        assert (dead["score"] == 0).all() and list(dead["index"]) == list(range(min(k, 37)))
    assert tp.n_seen_ == 37


def test_collect_top_patches_subset_and_lookup():
    model = rgb_net()
    x = torch.rand(21, 3, 16, 16)
    labels = torch.randint(0, 3, (21,))
    data = torch.utils.data.TensorDataset(x, labels)
    feats = pd.DataFrame({"feature": [7, 9, 12], "layer": ["relu2", "relu2", "fc3"], "channel": [0, 3, 5]})
    tp = collect_top_patches(model, data, feats, k=4, batch_size=5, progress=False)
    want = pd.concat([_brute_force(model, x, "relu2", "descriptor", 4),
                      _brute_force(model, x, "fc3", "descriptor", 4)])
    top = tp.top("relu2", 3)
    ref = want[(want.layer == "relu2") & (want.channel == 3)]
    np.testing.assert_array_equal(top["index"], ref["index"])
    np.testing.assert_array_equal(top[["row", "col"]].to_numpy(), ref[["row", "col"]].to_numpy())
    assert len(tp.to_frame()) == 12
    # a tensor of images works the same
    tp2 = collect_top_patches(model, x, {"relu2": [0, 3], "fc3": 5}, k=4, progress=False)
    pd.testing.assert_frame_equal(tp.to_frame(), tp2.to_frame())
    with pytest.raises(ValueError, match="channel: 1 of layer 'relu2' is not tracked"):
        tp.top("relu2", 1)


def test_top_patches_scores_match_feature_descriptors():
    from vxnb import features
    model = rgb_net()
    x = torch.rand(9, 3, 16, 16)
    layers = ["relu1", "relu2", "fc3"]
    desc = features.descriptors(model, x, layers)
    desc = desc.detach().double().numpy() if isinstance(desc, torch.Tensor) else np.asarray(desc, float)
    tp = collect_top_patches(model, x, layers=layers, k=9, progress=False)
    frame = tp.to_frame()
    col = 0
    for layer, n_ch in zip(layers, (4, 5, 6)):
        for ch in range(n_ch):
            rows = frame[(frame.layer == layer) & (frame.channel == ch)].sort_values("index")
            np.testing.assert_allclose(rows["score"], desc[:, col], rtol=1e-5, atol=1e-7)
            col += 1


def test_top_patches_bad_inputs():
    model = rgb_net()
    with pytest.raises(ValueError, match="layers: the model has no module"):
        TopPatches(model, layers=["conv9"])
    with pytest.raises(ValueError, match="k: expected a positive int"):
        TopPatches(model, layers=["relu1"], k=0)
    with pytest.raises(ValueError, match="score"):
        TopPatches(model, layers=["relu1"], score="mean")
    with pytest.raises(ValueError, match="give the layers"):
        TopPatches(model)
    tp = TopPatches(model, features=[("relu1", 9)], k=2)
    with pytest.raises(ValueError, match=r"relu1' has 4 channels.*\[9\] do not exist"):
        tp({"relu1": torch.rand(2, 4, 5, 5)}, torch.arange(2))
    tp = TopPatches(model, layers=["relu1"], k=2)
    with pytest.raises(ValueError, match="missing from the batch"):
        tp({"relu2": torch.rand(2, 4, 5, 5)}, torch.arange(2))
    with pytest.raises(ValueError, match="3 indices for a batch of 2"):
        tp({"relu1": torch.rand(2, 4, 5, 5)}, torch.arange(3))
    with pytest.raises(RuntimeError, match="no batch seen"):
        tp.to_frame()


# ----------------------------------------------------------------------------- crops
def test_crop_patch_corner_and_oversize():
    img = torch.arange(3 * 10 * 12, dtype=torch.float32).reshape(3, 10, 12) + 1
    crop = crop_patch(img, (-3, -2, 5, 6))
    assert crop.shape == (3, 8, 8)
    assert torch.equal(crop[:, 3:, 2:], img[:, :5, :6])
    assert (crop[:, :3] == 0).all() and (crop[:, :, :2] == 0).all()
    mean = crop_patch(img, (-3, -2, 5, 6), pad="mean")
    assert torch.allclose(mean[:, 0, 0], img.mean(dim=(1, 2)))
    assert torch.equal(mean[:, 3:, 2:], img[:, :5, :6])
    # bottom-right corner, and a box larger than the image on every side
    br = crop_patch(img, (7, 9, 14, 16))
    assert br.shape == (3, 7, 7) and torch.equal(br[:, :3, :3], img[:, 7:, 9:]) and br[:, 3:].abs().sum() == 0
    big = crop_patch(img[0], (-4, -5, 16, 19))
    assert big.shape == (20, 24) and torch.equal(big[4:14, 5:17], img[0]) and big.sum() == img[0].sum()
    # crop geometry from a receptive field: unit (0, 0) of a padded conv sticks out of the image
    rf = receptive_field(nn.Sequential(nn.Conv2d(1, 1, 5, padding=2)), "0")
    assert rf.box(0, 0) == (-2, -2, 3, 3) and rf.clipped_box(0, 0, 10, 12) == (0, 0, 3, 3)
    with pytest.raises(ValueError, match="box: expected bottom > top"):
        crop_patch(img, (5, 5, 5, 8))
    with pytest.raises(ValueError, match="pad"):
        crop_patch(img, (0, 0, 2, 2), pad="edge")


# ----------------------------------------------------------------------------- average images
def _setup_average(n_images=12):
    torch.manual_seed(1)
    model = rgb_net()
    x = torch.rand(n_images, 3, 16, 16)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 3, (n_images,)))
    relevant = pd.DataFrame({
        "class": [0, 0, 2], "feature": [3, 20, 3], "layer": ["relu2", "fc3", "relu2"], "layer_number": [2, 3, 2],
        "kind": ["conv", "fc", "conv"], "channel": [1, 4, 1], "weight": [0.5, 0.2, -0.1],
    })
    tp = collect_top_patches(model, data, relevant, k=6, progress=False)
    return model, x, data, relevant, tp


def test_average_images_match_manual_crops():
    model, x, data, relevant, tp = _setup_average()
    rf = receptive_field(model, "relu2")   # conv1 [-1, 1], pool1 [-1, 2] jump 2, conv2 [-3, 4]
    assert rf == ReceptiveField((8, 8), (2, 2), (0.5, 0.5))
    with pytest.warns(UserWarning, match="class 1 has no relevant feature"):
        res = average_images(model, data, tp, relevant, classes=[0, 1, 2], n=5, size=8,
                             methods=("activation",), progress=False)
    assert len(res) == 3 and any("class 1" in m for m in res.messages)
    item = res[(0, 3)]
    top = tp.top("relu2", 1).head(5)
    # independent reference: numpy pad by the field size, slice, average (size = field: no resize)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (10, 10), (10, 10)))
    crops = []
    for _, r in top.iterrows():
        t = int(r["row"]) * 2 - 3 + 10
        l = int(r["col"]) * 2 - 3 + 10
        crops.append(padded[int(r["index"]), :, t:t + 8, l:l + 8])
    np.testing.assert_allclose(item.image, np.mean(crops, 0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(item.indices, top["index"])
    assert item.image.shape == (3, 8, 8) and item.activation.shape == (8, 8)
    assert item.ours is None and item.deconv is None
    assert 0 <= item.activation.min() and item.activation.max() <= 1
    # the FC feature: whole images, no activation map
    fc = res[(0, 20)]
    assert fc.rf.whole_image and fc.activation is None
    idx = torch.tensor(tp.top("fc3", 4).head(5)["index"].tolist())
    want = F.interpolate(x[idx], size=(8, 8), mode="bilinear", align_corners=False, antialias=True).mean(0)
    np.testing.assert_allclose(fc.image, want.numpy(), rtol=1e-5, atol=1e-6)
    assert (fc.boxes == [0, 0, 16, 16]).all()
    # shared features are computed once and reused for the other class
    np.testing.assert_array_equal(res[(2, 3)].image, item.image)
    summary = res.summary
    assert list(summary["class"]) == [0, 0, 2] and (summary["n"] == 5).all()
    assert summary.loc[summary.feature == 20, "whole_image"].item()


def test_average_images_resize_and_padding_fraction():
    model, x, data, relevant, tp = _setup_average()
    res = average_images(model, data, tp, relevant.iloc[:1], n=6, size=24, methods=(), pad="mean",
                         progress=False)
    item = res[(0, 3)]
    assert item.image.shape == (3, 24, 24) and item.boxes.shape == (6, 4)
    assert ((item.boxes[:, 2] - item.boxes[:, 0]) == 8).all() and ((item.boxes[:, 3] - item.boxes[:, 1]) == 8).all()
    # fraction of padded pixels: recompute from the boxes
    inside = [(min(b, 16) - max(t, 0)) * (min(r, 16) - max(l, 0)) for t, l, b, r in item.boxes]
    assert res.summary["crop_padded"].item() == pytest.approx(1 - sum(inside) / (6 * 64))
    # a class given by name
    named = relevant.assign(class_name=["zero", "zero", "two"])
    res = average_images(model, data, tp, named, classes=["two"], n=6, size=24, methods=(), pad="mean",
                         progress=False)
    assert list(res.items) == [("two", 3)]
    np.testing.assert_array_equal(res[("two", 3)].image, item.image)


def test_average_images_bad_inputs():
    model, x, data, relevant, tp = _setup_average()
    bad = relevant.copy()
    bad.loc[0, "channel"] = 3
    with pytest.raises(ValueError, match=r"feature 3 \(layer 'relu2', channel 3\) of class 0 is not tracked"):
        average_images(model, data, tp, bad, methods=(), progress=False)
    bad = relevant.copy()
    bad.loc[0, "layer"] = "conv7"
    with pytest.raises(ValueError, match="names layer 'conv7'"):
        average_images(model, data, tp, bad, methods=(), progress=False)
    with pytest.raises(ValueError, match="relevant: missing columns"):
        average_images(model, data, tp, relevant.drop(columns="channel"), methods=(), progress=False)
    with pytest.raises(ValueError, match="methods"):
        average_images(model, data, tp, relevant, methods=("gradcam",), progress=False)
    with pytest.raises(ValueError, match="dataset has 3 items"):
        average_images(model, torch.utils.data.TensorDataset(x[:3]), tp, relevant, methods=(), progress=False)
    with pytest.raises(TypeError, match="top_patches"):
        average_images(model, data, {"a": 1}, relevant, progress=False)
    with pytest.warns(UserWarning, match="no relevant feature"):
        empty = average_images(model, data, tp, relevant.iloc[:0], classes=[5], methods=(), progress=False)
    assert len(empty) == 0 and empty.summary.empty and empty.messages


def test_average_images_with_deconv_heatmaps():
    from vxnb import deconv
    model, x, data, relevant, tp = _setup_average()
    res = average_images(model, data, tp, relevant, n=4, size=12, progress=False)
    for key in [(0, 3), (0, 20)]:
        item = res[key]
        for m in (item.ours, item.deconv):
            assert m.shape == (12, 12) and np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 + 1e-6
    # independent check of the heatmap crop average for one feature
    item = res[(0, 3)]
    idx = item.indices
    hm = deconv.heatmap(deconv.visualize(model, x[idx], "relu2", [1], resample=True))[:, 0]
    crops = torch.stack([crop_patch(hm[i].float(), tuple(item.boxes[i])) for i in range(len(idx))])
    want = F.interpolate(crops[:, None], size=(12, 12), mode="bilinear", align_corners=False).mean(0)[0]
    np.testing.assert_allclose(item.ours, want.numpy(), rtol=1e-4, atol=1e-5)


def test_top_patches_as_extract_features_callback():
    from vxnb import features
    model = rgb_net()
    x = torch.rand(19, 3, 16, 16)
    data = torch.utils.data.TensorDataset(x, torch.arange(19) % 3)
    layers = ["relu1", "relu2", "relu3"]
    tp = TopPatches(model, layers=layers, k=7)
    feats = features.extract_features(model, data, layers=layers, n_classes=3, batch_size=6, callbacks=[tp],
                                      progress=False)
    ref = collect_top_patches(model, data, layers=layers, k=7, batch_size=4, progress=False)
    got, want = tp.to_frame(), ref.to_frame()
    for col in ["layer", "channel", "rank", "index", "row", "col"]:
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)
    # the ranking score is the entry of x the lasso sees
    X = feats.X if feats.X is not None else features.descriptors(model, x, layers).numpy()
    cols = feats.columns.reset_index(drop=True)
    for j in (0, 5, len(cols) - 1):
        top = tp.top(cols.loc[j, "layer"], int(cols.loc[j, "channel"]))
        np.testing.assert_allclose(top["score"], np.asarray(X)[top["index"].to_numpy(), j], rtol=1e-5, atol=1e-7)


def test_average_images_without_deconv_is_a_clear_error(monkeypatch):
    import sys

    model, x, data, relevant, tp = _setup_average()
    monkeypatch.setitem(sys.modules, "vxnb.deconv", None)  # import fails
    with pytest.raises(NotImplementedError, match="vxnb.deconv.*methods=\\('activation',\\)"):
        average_images(model, data, tp, relevant, progress=False)
    res = average_images(model, data, tp, relevant, methods=("activation",), progress=False)
    assert len(res) == 3


# ----------------------------------------------------------------------------- cached top-patch tables
def test_top_patch_table_caches_and_collects_only_missing(tmp_path, monkeypatch):
    import vxnb.interpret as interp

    torch.manual_seed(3)
    model = rgb_net()
    x = torch.rand(15, 3, 16, 16)
    data = torch.utils.data.TensorDataset(x, torch.arange(15) % 3)
    calls = []
    original = interp.collect_top_patches

    def spy(model_, data_, features, *args, **kwargs):
        calls.append(sorted(features))
        return original(model_, data_, features, *args, **kwargs)

    monkeypatch.setattr(interp, "collect_top_patches", spy)
    got = interp.top_patch_table(model, data, [("relu2", 1)], k=5, cache_dir=tmp_path, data_key="d", progress=False)
    want = original(model, data, [("relu2", 1)], k=5, progress=False).to_frame()
    for col in ["layer", "channel", "rank", "index", "row", "col"]:
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-12)
    files = list(tmp_path.glob("top_patches-*.csv"))
    assert len(files) == 1 and calls == [[("relu2", 1)]]
    # a relevant-features frame: only the feature not in the file is collected, rows of the others read back
    rel = pd.DataFrame({"class": [0, 1, 1], "layer": ["relu2", "fc3", "relu2"], "channel": [1, 4, 1]})
    both = interp.top_patch_table(model, data, rel, k=5, cache_dir=tmp_path, data_key="d", progress=False)
    assert calls[-1] == [("fc3", 4)] and len(both) == 10
    assert set(zip(both["layer"], both["channel"])) == {("relu2", 1), ("fc3", 4)}
    np.testing.assert_array_equal(both[both.layer == "relu2"]["index"].to_numpy(), want["index"].to_numpy())
    n_calls = len(calls)
    again = interp.top_patch_table(model, data, rel, k=5, cache_dir=tmp_path, data_key="d", progress=False)
    assert len(calls) == n_calls
    pd.testing.assert_frame_equal(again, both)
    # other weights, k or data: another key, collected afresh
    other = rgb_net()
    interp.top_patch_table(other, data, rel, k=5, cache_dir=tmp_path, data_key="d", progress=False)
    interp.top_patch_table(model, data, rel, k=4, cache_dir=tmp_path, data_key="d", progress=False)
    assert len(calls) == n_calls + 2 and len(list(tmp_path.glob("top_patches-*.csv"))) == 3
    # a damaged file is ignored with a warning and rewritten
    files[0].write_text("garbage\n1,2\n")
    with pytest.warns(UserWarning, match="ignoring"):
        fixed = interp.top_patch_table(model, data, rel, k=5, cache_dir=tmp_path, data_key="d", progress=False)
    pd.testing.assert_frame_equal(fixed, both)
    # nothing requested: an empty table, no pass
    empty = interp.top_patch_table(model, data, rel.iloc[:0], k=5, progress=False)
    assert empty.empty and list(empty.columns) == list(want.columns)


def test_top_patch_table_from_extraction_tracker(tmp_path, monkeypatch):
    import vxnb.interpret as interp

    model = rgb_net()
    x = torch.rand(11, 3, 16, 16)
    data = torch.utils.data.TensorDataset(x, torch.arange(11) % 3)
    tracker = collect_top_patches(model, data, layers=["relu1", "fc3"], k=7, progress=False)

    def forbidden(*a, **k):
        raise AssertionError("no extra pass expected")

    monkeypatch.setattr(interp, "collect_top_patches", forbidden)
    got = interp.top_patch_table(model, data, [("relu1", 2), ("fc3", 0)], k=5, tracker=tracker, cache_dir=tmp_path,
                                 progress=False)
    want = pd.concat([tracker.top("fc3", 0).head(5), tracker.top("relu1", 2).head(5)], ignore_index=True)
    for col in ["layer", "channel", "rank", "index", "row", "col"]:
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)
    # every tracked feature went into the cache: another feature of those layers needs no pass
    more = interp.top_patch_table(model, data, {"relu1": [0, 3]}, k=5, cache_dir=tmp_path, progress=False)
    assert len(more) == 10
    with pytest.raises(ValueError, match="score"):
        interp.top_patch_table(model, data, [("relu1", 2)], k=5, tracker=tracker, score="max")
    with pytest.raises(ValueError, match="k >= 9"):
        interp.top_patch_table(model, data, [("relu1", 2)], k=9, tracker=tracker)
    with pytest.raises(ValueError, match="saw 11 images"):
        interp.top_patch_table(model, torch.utils.data.TensorDataset(x[:5]), [("relu1", 2)], k=5, tracker=tracker)
    with pytest.raises(ValueError, match="another model"):
        interp.top_patch_table(rgb_net(), data, [("relu1", 2)], k=5, tracker=tracker)
    with pytest.raises(TypeError, match="tracker"):
        interp.top_patch_table(model, data, [("relu1", 2)], k=5, tracker=tracker.to_frame())
    with pytest.raises(ValueError, match="conv9"):
        interp.top_patch_table(model, data, [("conv9", 2)], k=5)
    with pytest.raises(ValueError, match="k: expected"):
        interp.top_patch_table(model, data, [("relu1", 2)], k=0)


# ----------------------------------------------------------------------------- mask overlap
def _masked_data():
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[0, :5, :5] = True        # a quarter of image 0
    masks[2] = True                # all of image 2; image 1 has none
    return torch.utils.data.TensorDataset(torch.rand(3, 3, 10, 10), torch.tensor([0, 1, 0]), masks)


def _hand_averages():
    from vxnb.averages import AverageImage, AverageImages

    conv_rf = ReceptiveField((4, 4), (2, 2), (0.0, 0.0))
    res = AverageImages()
    res.items[(0, 5)] = AverageImage(klass=0, feature=5, layer="relu2", channel=1, kind="conv", weight=0.5, rf=conv_rf,
                                     indices=np.array([0, 0, 1, 0]),
                                     boxes=np.array([[0, 0, 4, 4], [3, 3, 7, 7], [-2, -2, 2, 2], [8, 8, 12, 12]]),
                                     image=np.zeros((3, 4, 4), np.float32))
    res.items[(0, 9)] = AverageImage(klass=0, feature=9, layer="fc3", channel=0, kind="fc", weight=0.2,
                                     rf=ReceptiveField(None, None, None), indices=np.array([2, 0]),
                                     boxes=np.array([[0, 0, 10, 10]] * 2), image=np.zeros((3, 4, 4), np.float32))
    res.items[(1, 9)] = res.items[(0, 9)]
    res.summary = pd.DataFrame({"class": [0, 0, 1], "class_name": ["a", "a", "b"], "feature": [5, 9, 9],
                                "layer_number": [2, 3, 3]})
    return res


def test_mask_overlap_hand_computed():
    from vxnb.averages import mask_overlap

    data, res = _masked_data(), _hand_averages()
    per = mask_overlap(res, data)
    conv = per.iloc[0]
    # boxes: inside the mask; 4 of 16 pixels on it, centre (5, 5) off; clipped to 2x2 on image 1 (no mask);
    # clipped to 2x2 at the far corner: overlap 1,1,0,0; box fraction 1, .25, 0, 0; centre 1, 0, 0, 0
    assert conv["overlap"] == pytest.approx(0.5) and conv["box_on_mask"] == pytest.approx(1.25 / 4)
    assert conv["center_on_mask"] == pytest.approx(0.25) and conv["chance"] == pytest.approx(0.75 / 4)
    assert conv["class_name"] == "a" and conv["layer_number"] == 2 and conv["n"] == 4 and not conv["whole_image"]
    fc = per.iloc[1]
    assert fc["whole_image"] and np.isnan(fc[["overlap", "box_on_mask", "center_on_mask"]].astype(float)).all()
    assert fc["chance"] == pytest.approx((1 + 0.25) / 2)
    by_class = mask_overlap(res, data, per="class")
    a = by_class.iloc[0]
    assert (a["n_features"], a["n_located"], a["n_crops"]) == (2, 1, 4)
    assert a["center_on_mask"] == pytest.approx(0.25) and a["chance"] == pytest.approx(0.75 / 4)
    b = by_class.iloc[1]
    assert b["n_located"] == 0 and np.isnan(b["overlap"]) and b["class_name"] == "b"


def test_mask_overlap_matches_painted_boxes_after_average_images():
    from vxnb.averages import mask_overlap

    model, x, _, relevant, tp = _setup_average()
    masks = torch.rand(len(x), 16, 16) > 0.7
    data = torch.utils.data.TensorDataset(x, torch.zeros(len(x), dtype=torch.long), masks)
    res = average_images(model, data, tp, relevant.iloc[[0]], n=6, size=8, methods=(), progress=False)
    got = mask_overlap(res, data).iloc[0]
    item = res[(0, 3)]
    touch, frac, centre = [], [], []
    for i, (t, l, b, r) in zip(item.indices, item.boxes):   # paint the box on a canvas padded by the field size
        canvas = np.zeros((16 + 2 * 8, 16 + 2 * 8), bool)
        canvas[t + 8:b + 8, l + 8:r + 8] = True
        box = canvas[8:-8, 8:-8]
        m = masks[i].numpy()
        touch.append((box & m).any())
        frac.append((box & m).sum() / box.sum())
        centre.append(m[(t + b) // 2, (l + r) // 2])        # even field (8 px): centre pixel (t + b) / 2
    assert got["overlap"] == pytest.approx(np.mean(touch))
    assert got["box_on_mask"] == pytest.approx(np.mean(frac))
    assert got["center_on_mask"] == pytest.approx(np.mean(centre))


def test_mask_overlap_bad_inputs():
    from vxnb.averages import mask_overlap

    res = _hand_averages()
    with pytest.raises(ValueError, match="mask"):
        mask_overlap(res, torch.utils.data.TensorDataset(torch.rand(3, 3, 10, 10), torch.zeros(3)))
    with pytest.raises(ValueError, match="per"):
        mask_overlap(res, _masked_data(), per="layer")
    with pytest.raises(TypeError, match="average_images"):
        mask_overlap(res.summary, _masked_data())
    short = torch.utils.data.TensorDataset(torch.rand(1, 3, 10, 10), torch.zeros(1), torch.ones(1, 10, 10) > 0)
    with pytest.raises(ValueError, match="uses image 1"):
        mask_overlap(res, short)
