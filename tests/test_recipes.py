"""The recipes of docs/ARCHITECTURE.md ("Where to add …"), each followed with a toy one."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from vxnb import deconv, models, report
from vxnb.studies import benchmark as B
from vxnb.studies import runs
from vxnb.studies import table1 as T
from vxnb.studies.datasets import DATASET_SPECS, DatasetSpec, register_dataset


# ---------------------------------------------------------------- a dataset
class ToyDigits(torch.utils.data.Dataset):
    """Two classes of 28×28 grey images: a bright top half, a bright bottom half."""

    classes = ["top", "bottom"]

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.targets = [i % 2 for i in range(n)]
        self.images = 0.1 * torch.rand(n, 1, 28, 28, generator=g)
        for i, y in enumerate(self.targets):
            self.images[i, :, :14] += 0.9 if y == 0 else 0.0
            self.images[i, :, 14:] += 0.9 if y == 1 else 0.0

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


class ToySpec(DatasetSpec):
    name = "toy-digits"
    label = "toy digits"
    reference_model = "mnistnet"

    def check(self, cfg):
        cfg.size = 28

    def fingerprint(self, spec):
        return "toy-digits-v1"  # made in memory: the same for every run

    def epochs(self, cfg):
        return cfg.epochs or 1

    def load(self, cfg):
        from vxnb.studies.datasets import limit_split

        full = ToyDigits(48, seed=cfg.seed)
        idx = np.arange(len(full))
        return limit_split(full, idx[idx % 4 != 0], idx[idx % 4 == 0], np.asarray(full.targets),
                           list(full.classes), cfg)


@pytest.fixture
def toy_dataset():
    spec = register_dataset(ToySpec())
    yield spec
    del DATASET_SPECS[spec.name]


def test_add_a_dataset_one_spec_and_one_registry_line(toy_dataset, tmp_path):
    cfg = runs.RunConfig(dataset="toy-digits", runs_root=str(tmp_path))
    assert cfg.spec is toy_dataset and cfg.size == 28 and cfg.run_name == "toy-digits-seed0"
    assert not cfg.has_masks
    train, test, classes = runs.load_data(cfg, progress=False)
    assert (len(train), len(test), classes) == (36, 12, ["top", "bottom"])
    model, meta = runs.get_model(cfg, progress=False)   # the spec's reference model, trained here
    assert model.vxnb_arch == "mnistnet" and meta["epochs"] == 1 and meta["n_train"] == 36
    again, _ = runs.get_model(cfg, progress=False)      # read back under the same key
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert runs.data_ok(runs.data_record(cfg))
    # the report and the benchmark read what the spec says
    assert report.skipped_tags({"dataset": "toy-digits"}) == {report.NEEDS_MASKS, report.AN8FLOWER_ONLY,
                                                             report.FULL_SETTING_ONLY, report.EXTENDED_STUDIES}
    with pytest.raises(ValueError, match="the benchmark needs ground-truth masks: dataset='an8flower'"):
        B.run_benchmark(cfg, save=False)
    with pytest.raises(ValueError, match="dataset: expected one of .*'toy-digits'"):
        runs.RunConfig(dataset="toy-digit")


def test_a_dataset_name_is_registered_once():
    with pytest.raises(ValueError, match="spec: its name must be a new"):
        register_dataset(type("Again", (DatasetSpec,), {"name": "mnist"})())
    with pytest.raises(TypeError, match="spec: expected a DatasetSpec"):
        register_dataset("mnist")


# ---------------------------------------------------------------- a method
def centre_prior(model, images, targets, layer=None):
    """A class-independent baseline: a Gaussian bump at the image centre."""
    n, _, h, w = images.shape
    yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    return torch.exp(-(yy ** 2 + xx ** 2) / (2 * (h / 4) ** 2)).expand(n, h, w).clone()


@pytest.fixture
def toy_method():
    method = T.register_method("centre", "Centre prior", heatmaps=centre_prior)
    yield method
    T.unregister_method("centre")


def test_add_a_method_it_joins_the_benchmark_and_table1(toy_method):
    assert B.METHODS[-1] == "centre" and "centre" in B.BASELINE_METHODS and T.METHOD_LABELS["centre"] == "Centre prior"
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 2))
    images = torch.rand(3, 3, 8, 8)
    h = B.method_heatmaps("centre", model, images, [0, 1, 0])
    torch.testing.assert_close(h, centre_prior(model, images, None))
    summary = pd.DataFrame({"variant": "single-6c", "method": ["ours", "centre", "gradcam"],
                            "combine": ["weighted", "", ""], "mean": [20.0, 11.0, 17.0], "std": [1.0, 0.5, 0.2]})
    table = T.format_table(summary)
    assert list(table.index) == ["Grad-CAM", "Ours (weighted)", "Centre prior"]   # registry order
    assert table.loc["Centre prior", "single-6c"] == "11.0 ± 0.50"
    comp = T.compare_with_paper(summary)
    assert np.isnan(comp.loc[comp["method"] == "centre", "paper_mean"]).all()


def test_a_method_registration_is_checked():
    with pytest.raises(ValueError, match="name: expected a new method name"):
        T.register_method("ours", "again", draw="resampled")
    with pytest.raises(ValueError, match="heatmaps: method 'lime' is not one of vxnb.baselines.attribution's"):
        T.register_method("lime", "LIME")
    with pytest.raises(ValueError, match="draw: expected one of"):
        T.register_method("ours_sparkly", "Sparkly", draw="sparkly")


# ---------------------------------------------------------------- a rule
class Double(nn.Module):
    """A learnt scale (2 here): a module with parameters has no rule until one is registered."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.scale * x


def test_add_a_rule_for_a_module_type():
    torch.manual_seed(0)
    conv, fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 2)
    doubled = nn.Sequential(conv, Double(), nn.ReLU(), nn.Flatten(), fc).eval()
    plain = nn.Sequential(conv, nn.Identity(), nn.ReLU(), nn.Flatten(), fc).eval()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(Exception, match=r"\(Double\) has parameters but no DeconvNet rule"):
        deconv.visualize(doubled, x, "2", [0, 1])
    # the rule is passed for this call only: the default composite is left as it was
    composite = deconv.DEFAULT_COMPOSITE.with_rules({Double: deconv.TransposeRule()})
    got = deconv.visualize(doubled, x, "2", [0, 1], resample=False, composite=composite)
    with pytest.raises(Exception, match=r"\(Double\) has parameters but no DeconvNet rule"):
        deconv.visualize(doubled, x, "2", [0, 1])
    ref = deconv.visualize(plain, x, "2", [0, 1], resample=False)
    # the seed a = ReLU(2·conv) is twice plain's and the backward passes ×2 once more
    torch.testing.assert_close(got, 4 * ref)


# ---------------------------------------------------------------- a model family
def test_add_a_model_family_as_a_factory(tmp_path, monkeypatch):
    pkg = tmp_path / "toyfamily"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from torch import nn\n\n"
        "def build(num_classes=3):\n"
        "    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(5, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = tmp_path / "w.pt"
    import importlib

    torch.save(importlib.import_module("toyfamily").build().state_dict(), weights)
    model = models.load_user_model("toyfamily:build", str(weights), num_classes=3, input_shape=(3, 16, 16))
    assert model.vxnb_arch == "toyfamily:build" and len(model.vxnb_fingerprint) > 8
    from vxnb.features import select_layers

    assert select_layers(model, "all") != []
    maps = deconv.visualize(model, torch.rand(1, 3, 16, 16), select_layers(model, "all")[0], 0)
    assert maps.shape == (1, 1, 3, 16, 16) and torch.isfinite(maps).all()
