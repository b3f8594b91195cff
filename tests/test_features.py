
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import vxnb._gram
import vxnb.features as vf
from vxnb.features import Features, default_layers, descriptors, extract_features, feature_columns, layer_numbers
from nets import random_data, small_net


# ---------------------------------------------------------------------------- tiny networks
def hand_net() -> nn.Sequential:
    """1 conv (2 channels, 1x1) + 1 hidden linear (3 units) + classifier, weights set by hand."""
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(1, 2, 1))
    net.add_module("relu1", nn.ReLU())
    net.add_module("flat", nn.Flatten())
    net.add_module("fc2", nn.Linear(8, 3))
    net.add_module("relu2", nn.ReLU())
    net.add_module("fc3", nn.Linear(3, 2))
    with torch.no_grad():
        net.conv1.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        net.conv1.bias.copy_(torch.tensor([0.0, -3.0]))
        w = torch.zeros(3, 8)
        w[0] = 1.0
        w[1] = -1.0
        w[2, 0] = 1.0
        net.fc2.weight.copy_(w)
        net.fc2.bias.copy_(torch.tensor([-5.0, 0.0, 0.0]))
    return net


# images A, Z, B and their descriptors worked out by hand:
# A = [[1,-5],[2,-7]]: relu1 ch0 = [1,0,2,0] (L2 √5), ch1 = relu(-x-3) = [0,2,0,4] (L2 √20)
#   -> [√5, √20] / (3√5) = [1/3, 2/3]; fc2 on [1,0,2,0,0,2,0,4] = [9-5, -9, 1] -> relu [4,0,1] -> [.8,0,.2]
# Z = 0: relu1 all zero (a zero layer stays zero); fc2 = [-5, 0, 0] -> relu 0 -> zero layer
# B = 3: ch0 = 3 (L2 6), ch1 = 0 -> [1, 0]; fc2 = [12-5, -12, 3] -> [7, 0, 3] -> [.7, 0, .3]
IMAGES = torch.tensor([[[1.0, -5.0], [2.0, -7.0]], [[0.0, 0.0], [0.0, 0.0]], [[3.0, 3.0], [3.0, 3.0]]]).unsqueeze(1)
LABELS = torch.tensor([0, 1, 0])
EXPECTED = np.array([[1 / 3, 2 / 3, 0.8, 0.0, 0.2], [0, 0, 0, 0, 0], [1, 0, 0.7, 0, 0.3]])


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------- descriptor values
def test_descriptor_values_by_hand():
    net = hand_net()
    assert default_layers(net) == ["relu1", "relu2"]
    feats = extract_features(net, TensorDataset(IMAGES, LABELS), batch_size=2, progress=False)
    np.testing.assert_allclose(feats.X, EXPECTED, atol=1e-6)
    np.testing.assert_allclose(descriptors(net, IMAGES).numpy(), EXPECTED, atol=1e-6)
    assert list(feats.columns.columns) == list(vf.COLUMN_NAMES)
    assert feats.columns["layer"].tolist() == ["relu1"] * 2 + ["relu2"] * 3
    assert feats.columns["layer_number"].tolist() == [1, 1, 2, 2, 2]
    assert feats.columns["kind"].tolist() == ["conv"] * 2 + ["fc"] * 3
    assert feats.columns["channel"].tolist() == [0, 1, 0, 1, 2]
    assert feats.labels.tolist() == [0, 1, 0] and feats.index.tolist() == [0, 1, 2]
    np.testing.assert_allclose(feats.XtL[:, 0], EXPECTED[0] + EXPECTED[2], atol=1e-6)
    np.testing.assert_allclose(feats.XtL[:, 1], EXPECTED[1], atol=1e-6)


def test_fc_descriptor_is_abs_of_pre_activation():
    # fc2 itself (before the ReLU) on A: [4, -9, 1] -> |.| / 14
    d = descriptors(hand_net(), IMAGES[:1], layers=["fc2"])
    np.testing.assert_allclose(d.numpy()[0], np.array([4, 9, 1]) / 14, atol=1e-6)


def test_conv_descriptor_is_l2_over_space():
    net = small_net()
    x = torch.rand(4, 1, 8, 8)
    d = descriptors(net, x, layers=["conv1", "pool1"])
    with torch.no_grad():
        net.eval()
        a = net.conv1(x)
        p = net.pool1(net.relu1(net.bn1(a)))
    ref = []
    for t in (a, p):
        n = t.pow(2).sum(dim=(2, 3)).sqrt()
        ref.append(n / n.sum(1, keepdim=True))
    np.testing.assert_allclose(d.numpy(), torch.cat(ref, 1).numpy(), rtol=1e-5)


# ---------------------------------------------------------------------------- streamed statistics
@pytest.mark.parametrize("gram_dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("syrk,min_split", [(True, 4), (False, 4), (False, 10_000)])
def test_streamed_gram_equals_dense(monkeypatch, gram_dtype, rtol, syrk, min_split):
    monkeypatch.setattr(vxnb._gram, "_GRAM_BLOCK_ROWS", 5)  # several partial row blocks
    monkeypatch.setattr(vxnb._gram, "_CPU_SYRK", syrk)  # BLAS syrk (the CPU path) or torch GEMM blocks (the CUDA path)
    monkeypatch.setattr(vxnb._gram, "TILE", 4)  # syrk: upper triangle added and mirrored in 4 column blocks
    monkeypatch.setattr(vxnb._gram, "FOLD_ROWS", 7)  # float32 syrk: folded into float64 every 2 blocks
    monkeypatch.setattr(vxnb._gram, "_GRAM_MIN_SPLIT", min_split)  # GEMM: 3 column blocks (upper ones mirrored) or 1
    monkeypatch.setattr(vxnb._gram, "_GRAM_MIN_ROWS_SPLIT", 10)
    net = small_net()
    feats = extract_features(net, random_data(23), batch_size=3, keep_X=True, gram_dtype=gram_dtype, progress=False)
    X = feats.X.astype(np.float64)
    assert X.shape == (23, 4 + 6 + 5) and feats.X.dtype == np.float32
    assert feats.G.dtype == np.float64 and feats.XtL.dtype == np.float64
    np.testing.assert_allclose(feats.G, X.T @ X, rtol=rtol, atol=1e-12)
    assert np.array_equal(feats.G, feats.G.T)  # exactly symmetric: the mirrored triangle is a copy
    np.testing.assert_allclose(feats.XtL, X.T @ feats.L, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(feats.class_sums, feats.XtL.T)
    assert feats.class_counts.sum() == 23 and feats.n == 23 and feats.m == 15
    # per layer the descriptor sums to 1 (or is all zero)
    for layer, g in feats.columns.groupby("layer"):
        s = X[:, g["feature"].to_numpy()].sum(1)
        assert np.all(np.isclose(s, 1) | np.isclose(s, 0))


@pytest.mark.parametrize("threshold,expected", [(1e18, torch.float64), (10.0, torch.float32)])
def test_auto_gram_dtype_follows_the_size_rule_and_sets_the_lasso_tolerance(monkeypatch, threshold, expected):
    # "auto" on the CPU: float32 products when N·m² exceeds the threshold (here 23·15² = 5175)
    monkeypatch.setattr(vxnb._gram, "_AUTO_SINGLE_FLOPS", threshold)
    from vxnb.lasso import lasso_path

    feats = extract_features(small_net(), random_data(23), batch_size=4, keep_X=True, progress=False)
    assert feats.meta["gram_dtype"] == str(expected)
    assert feats.lasso_tol == (1e-5 if expected == torch.float32 else None)
    X = feats.X.astype(np.float64)
    np.testing.assert_allclose(feats.G, X.T @ X, rtol=1e-5 if expected == torch.float32 else 1e-12, atol=1e-12)
    # the path from either G reaches the same objective as the path from the exact XᵀX
    exact = lasso_path(X.T @ X, feats.XtL, mu_max=2.0, progress=False).coef(2.0)
    approx = lasso_path(feats.G, feats.XtL, mu_max=2.0, progress=False, tol=feats.lasso_tol).coef(2.0)
    obj = lambda W: float(np.sum((X @ W - feats.L) ** 2))  # noqa: E731
    assert abs(obj(approx) - obj(exact)) <= 1e-6 * obj(exact)
    assert np.all(np.abs(approx).sum(0) <= 2.0 + 1e-12)


def test_unknown_length_counts_as_large_for_auto():
    assert vxnb._gram.auto_gram_dtype(torch.device("cpu"), None, 10) == torch.float32
    assert vxnb._gram.auto_gram_dtype(torch.device("cpu"), 100, 10) == torch.float64


def test_keep_X_options_do_not_change_statistics():
    net, data = small_net(), random_data(11)
    full = extract_features(net, data, batch_size=4, keep_X=True, progress=False)
    none = extract_features(net, data, batch_size=4, keep_X=False, progress=False)
    auto_small = extract_features(net, data, batch_size=4, max_bytes=100, progress=False)
    assert none.X is None and auto_small.X is None and full.X is not None
    np.testing.assert_array_equal(none.G, full.G)
    np.testing.assert_array_equal(auto_small.XtL, full.XtL)


def test_n_classes_and_class_names():
    data = random_data(9, classes=2)
    data.classes = ["cat", "dog"]
    f = extract_features(small_net(), data, progress=False)
    assert f.classes == ["cat", "dog"] and f.n_classes == 2 and f.XtL.shape == (15, 2)
    f = extract_features(small_net(), random_data(9, classes=2), n_classes=5, progress=False)
    assert f.n_classes == 5 and f.XtL.shape == (15, 5) and np.all(f.XtL[:, 2:] == 0)
    with pytest.raises(ValueError, match="n_classes"):
        extract_features(small_net(), random_data(9, classes=3), n_classes=2, progress=False)


def test_dataloader_shuffled_keeps_dataset_indices_and_callbacks():
    net, data = small_net(), random_data(17)
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
    seen = []

    def cb(outputs, index):
        assert set(outputs) == {"relu1", "conv2", "relu3"}
        assert outputs["relu1"].shape == (len(index), 4, 8, 8) and outputs["relu3"].shape == (len(index), 5)
        seen.append(index.clone())

    f = extract_features(net, loader, callbacks=[cb], progress=False)
    idx = torch.cat(seen).numpy()
    assert sorted(idx.tolist()) == list(range(17)) and idx.tolist() != list(range(17))
    np.testing.assert_array_equal(f.index, idx)
    np.testing.assert_array_equal(f.labels, data.tensors[1][idx].numpy())
    ref = descriptors(net, data.tensors[0][idx]).numpy()
    np.testing.assert_allclose(f.X, ref, rtol=1e-5, atol=1e-7)


def test_select_kind_conv_equals_only_conv_pass():
    net, data = small_net(), random_data(10)
    all_ = extract_features(net, data, progress=False)
    conv = extract_features(net, data, only_conv=True, progress=False)
    sub = all_.select(kind="conv")
    assert sub.layers == conv.layers == ["relu1", "conv2"]
    np.testing.assert_allclose(sub.G, conv.G, rtol=1e-12)
    np.testing.assert_allclose(sub.XtL, conv.XtL, rtol=1e-12)
    assert sub.columns["feature"].tolist() == list(range(10))


# ---------------------------------------------------------------------------- layer selection
def test_default_layers_tiny_sequential():
    net = small_net()
    assert default_layers(net) == ["relu1", "conv2", "relu3"]  # conv2 has no nonlinearity; fc4 is the classifier
    assert default_layers(net, only_conv=True) == ["relu1", "conv2"]
    table = layer_numbers(net)
    assert table["name"].tolist() == ["conv1", "conv2", "fc3", "fc4"]
    assert table["layer_number"].tolist() == [1, 2, 3, 4]
    assert table["classifier"].tolist() == [False, False, False, True]
    cols = feature_columns(net, ["bn1", "pool1", "pool2", "drop3", "fc4"], [4, 4, 6, 5, 3])
    meta = cols.drop_duplicates("layer").set_index("layer")
    assert meta.loc["bn1", "kind"] == "conv" and meta.loc["bn1", "layer_number"] == 1
    assert meta.loc["pool1", "kind"] == "other" and meta.loc["pool1", "layer_number"] == 1
    assert meta.loc["pool2", "kind"] == "other" and meta.loc["pool2", "layer_number"] == 2
    assert meta.loc["drop3", "kind"] == "fc" and meta.loc["drop3", "layer_number"] == 3
    assert meta.loc["fc4", "kind"] == "fc" and meta.loc["fc4", "layer_number"] == 4


def test_default_layers_vgg11():
    with torch.device("meta"):  # structure only: no weights needed
        vgg = torchvision.models.vgg11()
    convs = ["features.1", "features.4", "features.7", "features.9", "features.12", "features.14",
             "features.17", "features.19"]
    assert default_layers(vgg) == convs + ["classifier.1", "classifier.4"]
    assert default_layers(vgg, only_conv=True) == convs
    assert layer_numbers(vgg)["layer_number"].tolist() == list(range(1, 12))


def test_default_layers_resnet18():
    net = torchvision.models.resnet18()
    layers = default_layers(net, mode="all")
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    expected = ["relu"]
    for b in blocks:
        expected += [f"{b}.bn1", f"{b}.bn2"]
        if b in ("layer2.0", "layer3.0", "layer4.0"):
            expected.append(f"{b}.downsample.1")
    assert layers == expected  # the shared block ReLU is never picked; fc (classifier) excluded
    assert default_layers(net, only_conv=True, mode="all") == expected
    assert default_layers(net) == ["relu"] + blocks  # by default: the residual blocks' outputs
    cols = feature_columns(net, ["layer1.0", "layer2.0.downsample.1", "avgpool"], [64, 128, 512])
    meta = cols.drop_duplicates("layer").set_index("layer")
    assert meta.loc["layer1.0", "kind"] == "conv" and meta.loc["layer1.0", "layer_number"] == 3
    assert meta.loc["avgpool", "kind"] == "other"
    assert meta.loc["layer2.0.downsample.1", "kind"] == "conv"
    assert meta.loc["layer2.0.downsample.1", "layer_number"] == 8  # conv1, 2 blocks x 2, l2.0 conv1, conv2, downsample
    assert meta.loc["avgpool", "layer_number"] == 20


def test_resnet18_extraction_residual_blocks_and_shared_relu_error():
    net = torchvision.models.resnet18(num_classes=4)
    data = TensorDataset(torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    f = extract_features(net, data, layers=["layer1.0", "layer4.1"], progress=False)
    assert f.X.shape == (3, 64 + 512)
    f = extract_features(net, data, batch_size=2, progress=False)
    assert f.m == 64 + 2 * (64 + 128 + 256 + 512) and np.isfinite(f.G).all()  # stem + block outputs
    f = extract_features(net, data, layers=default_layers(net, mode="all"), batch_size=2, progress=False)
    assert f.m == 4800 and np.isfinite(f.G).all()
    with pytest.raises(ValueError, match="layer1.0.relu.*more than once"):
        extract_features(net, data, layers=["layer1.0.relu"], progress=False)
    assert no_hooks(net)


def test_inplace_relu_does_not_alter_hooked_outputs():
    with torch.device("meta"):  # skip the slow init of the big FC layers
        vgg = torchvision.models.vgg11(num_classes=3)
    vgg.to_empty(device="cpu")
    for mod in vgg.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.normal_(mod.weight, std=0.1)
            nn.init.normal_(mod.bias, std=0.1)
        elif isinstance(mod, nn.Linear):
            mod.weight.data.zero_()
            mod.bias.data.zero_()
    x = torch.rand(2, 3, 32, 32)
    outs = {}

    def cb(outputs, index):
        outs.update(outputs)

    f = extract_features(vgg, TensorDataset(x, torch.tensor([0, 1])), layers=["features.0", "features.1"],
                         callbacks=[cb], progress=False)
    with torch.no_grad():
        conv = vgg.features[0](x)
    assert (conv < 0).any()
    torch.testing.assert_close(outs["features.0"], conv)  # not rectified by the in-place ReLU after it
    n = conv.pow(2).sum((2, 3)).sqrt()
    np.testing.assert_allclose(f.X[:, :64], (n / n.sum(1, keepdim=True)).numpy(), rtol=1e-5)
    r = conv.clamp_min(0).pow(2).sum((2, 3)).sqrt()
    np.testing.assert_allclose(f.X[:, 64:], (r / r.sum(1, keepdim=True)).numpy(), rtol=1e-5)


# ---------------------------------------------------------------------------- hooks, modes, errors
class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls >= 2:
            raise RuntimeError("boom")
        return x


def test_hooks_removed_and_mode_restored_after_success_and_failure():
    net = small_net()
    net.train()
    extract_features(net, random_data(5), progress=False)
    assert no_hooks(net) and all(m.training for m in net.modules())
    bad = nn.Sequential(small_net())
    bad.add_module("boom", Boom())
    bad.train()
    with pytest.raises(RuntimeError, match="boom"):
        extract_features(bad, random_data(9), layers=["0.relu1"], batch_size=4, progress=False)
    assert no_hooks(bad) and all(m.training for m in bad.modules())
    with pytest.raises(RuntimeError, match="boom"):
        descriptors(bad, torch.rand(2, 1, 8, 8), layers=["0.relu1"])
    assert no_hooks(bad) and all(m.training for m in bad.modules())


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = small_net()
        self.unused = nn.ReLU()

    def forward(self, x):
        return self.body(x)


def test_errors_name_the_problem():
    net = small_net()
    with pytest.raises(ValueError, match=r"no module.*'nope'.*it has: conv1, bn1"):
        extract_features(net, random_data(4), layers=["nope"], progress=False)
    with pytest.raises(ValueError, match="unused.*did not run"):
        extract_features(WithUnused(), random_data(4), layers=["body.relu1", "unused"], progress=False)
    nan_net = small_net()
    with torch.no_grad():
        nan_net.conv1.weight[2] = float("nan")
    with pytest.raises(ValueError, match="'relu1', channel 2"):
        extract_features(nan_net, random_data(4), progress=False)
    with pytest.raises(ValueError, match="'relu1', channel 2"):
        descriptors(nan_net, torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="only_conv"):
        extract_features(net, random_data(4), layers=["relu1"], only_conv=True, progress=False)
    with pytest.raises(ValueError, match="keep_X"):
        extract_features(net, random_data(4), keep_X="yes", progress=False)
    with pytest.raises(TypeError, match="data"):
        extract_features(net, [1, 2, 3][0], progress=False)
    float_labels = TensorDataset(torch.rand(4, 1, 8, 8), torch.rand(4))
    with pytest.raises(ValueError, match="labels"):
        extract_features(net, float_labels, progress=False)
    assert no_hooks(net) and no_hooks(nan_net)


def test_descriptors_checks_columns():
    net, data = small_net(), random_data(6)
    f = extract_features(net, data, progress=False)
    np.testing.assert_allclose(descriptors(net, data.tensors[0], columns=f.columns).numpy(), f.X, rtol=1e-6)
    d, out = descriptors(net, data.tensors[0][:2], columns=f.columns, return_output=True)
    assert d.shape == (2, 15) and out.shape == (2, 3)
    with pytest.raises(ValueError, match="differ"):
        descriptors(net, data.tensors[0], layers=["relu1"], columns=f.columns)
    wider = small_net()
    wider.conv2 = nn.Conv2d(4, 7, 3, padding=1)
    wider.fc3 = nn.Linear(7 * 4, 5)
    with pytest.raises(ValueError, match="'conv2' has 7 channels"):
        descriptors(wider, data.tensors[0], columns=f.columns)


# ---------------------------------------------------------------------------- persistence
def test_save_load_round_trip(tmp_path):
    data = random_data(7)
    data.classes = ["a", "b", "c"]
    f = extract_features(small_net(), data, progress=False)
    path = f.save(tmp_path / "f.npz")
    g = Features.load(path)
    for name in ("G", "XtL", "labels", "index", "X"):
        np.testing.assert_array_equal(getattr(g, name), getattr(f, name))
    pd.testing.assert_frame_equal(g.columns, f.columns)
    assert g.layers == f.layers and g.classes == f.classes and g.n_classes == 3
    assert [p.name for p in tmp_path.iterdir()] == ["f.npz"]  # no temporary file left
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="bad.npz"):
        Features.load(tmp_path / "bad.npz")


def test_cache_reused_when_key_matches(tmp_path):
    net, data = small_net(), random_data(8)
    a = extract_features(net, data, cache_dir=tmp_path, progress=False)
    assert not a.meta["cache_hit"] and len(list(tmp_path.glob("features-*.npz"))) == 1
    b = extract_features(net, data, cache_dir=tmp_path, progress=False)
    assert b.meta["cache_hit"]
    np.testing.assert_array_equal(a.G, b.G)
    np.testing.assert_array_equal(a.X, b.X)
    with torch.no_grad():
        net.conv1.weight.add_(1.0)  # new weights: new key
    c = extract_features(net, data, cache_dir=tmp_path, progress=False)
    assert not c.meta["cache_hit"] and len(list(tmp_path.glob("features-*.npz"))) == 2
    d = extract_features(net, data, layers=["relu1"], cache_dir=tmp_path, progress=False)
    assert not d.meta["cache_hit"] and d.m == 4
    seen = []
    e = extract_features(net, data, cache_dir=tmp_path, callbacks=[lambda o, i: seen.append(i)], progress=False)
    assert not e.meta["cache_hit"] and seen  # callbacks need the pass


def test_cache_options_and_the_old_keywords_name_the_same_file(tmp_path):
    """CacheOptions, a bare folder and the keywords of earlier versions give one key and one file;
    the cached pass runs the forward pass once (no second extract_features inside)."""
    from vxnb.features import CacheOptions

    net, data = small_net(), random_data(8)
    passes = []
    net.conv1.register_forward_hook(lambda m, i, o: passes.append(o.shape[0]))
    a = extract_features(net, data, cache=CacheOptions(cache_dir=tmp_path, data_key="d8"), batch_size=8, progress=False)
    assert passes == [8] and not a.meta["cache_hit"]
    b = extract_features(net, data, cache_dir=tmp_path, data_key="d8", progress=False)
    c = extract_features(net, data, cache=str(tmp_path), progress=False)  # a folder: the data fingerprinted
    assert b.meta["cache_hit"] and b.meta["store_key"] == a.meta["store_key"] and passes == [8, 8]
    assert not c.meta["cache_hit"] and c.meta["store_key"] != a.meta["store_key"]
    assert len(list(tmp_path.glob("features-*.npz"))) == 2
    np.testing.assert_array_equal(a.G, b.G)
    np.testing.assert_array_equal(a.G, c.G)


def test_option_objects_are_validated_at_the_boundary(tmp_path):
    from vxnb.features import CacheOptions, DistOptions

    with pytest.raises(TypeError, match="data_key: expected a str"):
        CacheOptions(cache_dir=tmp_path, data_key=3)
    with pytest.raises(TypeError, match=r"cache_dir: expected a folder path or None \(str or os.PathLike\), got int"):
        CacheOptions(cache_dir=5)
    with pytest.raises(ValueError, match="checkpoint_every: expected a positive int .*got 0"):
        DistOptions(checkpoint_dir=tmp_path, checkpoint_every=0)
    with pytest.raises(TypeError, match="checkpoint_dir: expected a folder path or None"):
        DistOptions(checkpoint_dir=1.5)
    opts = CacheOptions(cache_dir=tmp_path)
    with pytest.raises(AttributeError):
        opts.data_key = "x"  # frozen
    net, data = small_net(), random_data(4)
    with pytest.raises(ValueError, match=r"cache: give either cache=CacheOptions\(...\) or \['cache_dir'\]"):
        extract_features(net, data, cache=opts, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"dist: give either dist=DistOptions\(...\) or \['checkpoint_every'\]"):
        extract_features(net, data, dist=DistOptions(), checkpoint_every=3, progress=False)
    with pytest.raises(TypeError, match="cache: expected a CacheOptions or None, got DistOptions"):
        extract_features(net, data, cache=DistOptions(), progress=False)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['cache_folder'\]"):
        extract_features(net, data, cache_folder=tmp_path, progress=False)


def test_default_layers_reference_models():
    from vxnb import models
    mnist = models.MnistNet()
    assert default_layers(mnist) == [f"relu{i}" for i in range(1, 7)]
    assert default_layers(mnist, only_conv=True) == [f"relu{i}" for i in range(1, 6)]
    flower = models.FlowerNet(num_classes=6, size=64)
    assert default_layers(flower) == [f"relu{i}" for i in range(1, 8)]
    table = layer_numbers(flower)
    assert table["name"].tolist() == [f"conv{i}" for i in range(1, 6)] + ["fc6", "fc7", "fc8"]
    assert table["layer_number"].tolist() == list(range(1, 9))
    f = extract_features(flower, TensorDataset(torch.rand(3, 3, 64, 64), torch.tensor([0, 1, 5])), progress=False)
    meta = f.columns.drop_duplicates("layer").set_index("layer")
    assert meta["layer_number"].tolist() == list(range(1, 8))
    assert meta["kind"].tolist() == ["conv"] * 5 + ["fc"] * 2
    assert f.n_classes == 6
