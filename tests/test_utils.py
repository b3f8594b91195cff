import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from vxnb import utils
from vxnb.data import class_examples, dataset_labels


def test_atomic_path_leaves_target_untouched_on_error(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with utils.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left


def test_atomic_json_round_trip(tmp_path):
    utils.atomic_write_json({"a": np.int64(3), "b": np.float32(0.5), "c": np.arange(2)}, tmp_path / "x.json")
    assert utils.read_json(tmp_path / "x.json") == {"a": 3, "b": 0.5, "c": [0, 1]}
    (tmp_path / "bad.json").write_text("{trunc")
    with pytest.raises(ValueError, match="bad.json"):
        utils.read_json(tmp_path / "bad.json")


def test_layer_name_errors_list_the_names():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(ValueError, match="it has: 0, 1"):
        utils.get_module(model, "conv9")
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        utils.check_layer_names(model, ["0", "nope"])
    assert utils.check_layer_names(model, "1") == ["1"]


def test_check_image_batch():
    utils.check_image_batch(torch.zeros(2, 3, 8, 8), channels=3)
    with pytest.raises(ValueError, match="batch dimension"):
        utils.check_image_batch(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="floating"):
        utils.check_image_batch(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expects 1 input channel"):
        utils.check_image_batch(torch.zeros(1, 3, 8, 8), channels=1)
    with pytest.raises(ValueError, match="NaN"):
        utils.check_image_batch(torch.full((1, 1, 2, 2), float("nan")))


def test_eval_mode_restores_each_module():
    model = nn.Sequential(nn.Dropout(), nn.Dropout())
    model.train()
    model[1].eval()
    with utils.eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training


def test_get_device():
    assert utils.get_device("cpu").type == "cpu"
    assert utils.get_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        utils.get_device("gpu-please")


def test_dataset_labels_through_subsets():
    ds = TensorDataset(torch.zeros(6, 1), torch.tensor([0, 1, 2, 0, 1, 2]))
    sub = Subset(ds, [5, 0, 4])
    assert dataset_labels(sub).tolist() == [2, 0, 1]
    items = class_examples(ds, per_class=2)
    assert [int(i[1]) for i in items] == [0, 0, 1, 1, 2, 2]


def test_read_npz_reads_every_array_and_names_what_is_wrong(tmp_path):
    """The one npz reader of Features.load and LassoPath.load: no pickles, clear errors."""
    from vxnb.utils import atomic_savez, read_npz

    good = tmp_path / "a.npz"
    atomic_savez(good, x=np.arange(3), y=np.array("s"))
    data = read_npz(good, "path", "thing file", need=("x",))
    assert sorted(data) == ["x", "y"] and data["x"].tolist() == [0, 1, 2] and str(data["y"]) == "s"
    with pytest.raises(FileNotFoundError, match=r"^path: no thing file at .*missing\.npz$"):
        read_npz(tmp_path / "missing.npz", "path", "thing file")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"^path: .*junk\.npz is not a readable thing file \(.*\); delete it"):
        read_npz(tmp_path / "junk.npz", "path", "thing file")
    with pytest.raises(ValueError, match=r"^file: .*a\.npz lacks \['z'\]; not a thing file$"):
        read_npz(good, "file", "thing file", need=("x", "z"))
    pickled = tmp_path / "p.npz"
    np.savez(pickled, o=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a readable thing file"):  # allow_pickle=False: never unpickled
        read_npz(pickled, "path", "thing file")


def test_forward_hooks_register_on_entry_and_leave_nothing_behind():
    """utils.ForwardHooks, the base of features' Recorder and relevance's Ablator."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))

    class Seen(utils.ForwardHooks):
        def __init__(self, names):
            self.hooked = {n: net[int(n)] for n in names}
            self.seen = []

        def _hook(self, name):
            if name == "bad":
                raise RuntimeError("cannot hook")
            return lambda module, inputs, output: self.seen.append(name)

    with Seen(["0", "2"]) as s:
        net(torch.zeros(1, 2))
    assert s.seen == ["0", "2"]
    net(torch.zeros(1, 2))
    assert s.seen == ["0", "2"] and all(not m._forward_hooks for m in net)

    failing = Seen(["0"])
    failing.hooked["bad"] = net[2]
    with pytest.raises(RuntimeError, match="cannot hook"):
        failing.__enter__()
    assert all(not m._forward_hooks for m in net)  # the hook already placed on net[0] is gone
    Seen(["0"]).remove()  # nothing registered: a no-op


def test_get_module_follows_child_names():
    """The fast path (along the child names) finds what named_modules() names; anything else
    is still the ValueError listing the names."""
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU()), nn.Linear(2, 2))
    for name, module in model.named_modules():
        if name:
            assert utils.get_module(model, name) is module
    for bad in ("", "0.5", "0.0.weight", "2", "0..1", ".0", "0."):
        with pytest.raises(ValueError, match="has no module"):
            utils.get_module(model, bad)


def test_eval_mode_leaves_an_eval_model_and_restores_changes():
    model = nn.Sequential(nn.Dropout(), nn.Dropout()).eval()
    with utils.eval_mode(model):
        assert not any(m.training for m in model.modules())
        model[0].train()  # changed inside the block: restored on exit
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_matches_isfinite(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, dtype=dtype)
    assert utils.all_finite(x) is True
    for bad in (float("nan"), float("inf"), -float("inf")):
        for idx in [(0, 0, 0), (1, 2, 3), (2, 3, 4)]:
            y = x.clone()
            y[idx] = bad
            assert utils.all_finite(y) is False
            assert not bool(torch.isfinite(y).all())
    assert utils.all_finite(torch.zeros(0)) is True
    assert utils.all_finite(torch.arange(4)) is True
    with pytest.raises(ValueError, match="NaN or inf"):
        utils.check_image_batch(torch.full((1, 3, 2, 2), float("nan")))
