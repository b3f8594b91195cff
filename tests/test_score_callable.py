"""score_callable: any attribution method scored on an8Flower's folds (issue 27, item 1)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from vxnb.studies import benchmark as B
from vxnb.studies import runs

N = 6


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return runs.RunConfig(size=32, epochs=1, train_limit=48, data_root=str(tmp_path_factory.mktemp("sc_data")),
                          runs_root=str(tmp_path_factory.mktemp("sc_runs")))


def brightness(model, inputs, targets, **kw):
    """Ignores the model and the class: the image's channel mean."""
    return np.asarray(inputs).mean(axis=1)


def _score(fn, cfg, **kw):
    kw = {"name": "m", "folds": (0,), "n_images": N, "config": cfg, "sanity_images": 3, "progress": False, **kw}
    return B.score_callable(fn, **kw)


def test_scores_equal_an_independent_computation(cfg):
    table = _score(brightness, cfg, name="brightness")
    assert list(table.columns) == list(B.SCORE_COLUMNS) and len(table) == 1
    row = table.iloc[0]
    assert (row["method"], row["variant"], row["fold"]) == ("brightness", "single-6c", 0)
    assert row["n_images"] == N and row["n_failed"] == 0
    # the same images by hand: IoU over thresholds of min-max normalised maps; pointing game by a loop
    images, _, masks, _ = B.fold_data(B.fold_config(runs.RunConfig(**{**cfg.to_dict(), "folds": "blocks"}),
                                                    "single-6c", 0), N, progress=False)
    maps = images.mean(1).numpy().astype(np.float64)
    masks = masks.numpy()
    t = np.linspace(0, 1, 101)
    ious = []
    for thr in t:
        per = []
        for h, m in zip(maps, masks):
            h = (h - h.min()) / (h.max() - h.min())
            on = h >= thr
            per.append((on & m).sum() / max((on | m).sum(), 1))
        ious.append(np.mean(per))
    area = 100 * np.trapezoid(ious, t)
    assert row["iou_area"] == pytest.approx(area, abs=0.5)
    pointing = np.mean([m.flat[np.argmax(h)] for h, m in zip(maps, masks)])
    assert row["pointing_game"] == pytest.approx(pointing)
    # a map that ignores the model and the class fails both sanity checks completely
    assert row["randomisation_spearman"] == pytest.approx(1.0)
    assert row["random_logit_ssim"] == pytest.approx(1.0)
    # the table is written (CSV, keyed) and the fold's scores are cached
    assert pd.read_csv(table.attrs["file"])["iou_area"].iloc[0] == pytest.approx(row["iou_area"])
    calls = []

    def counted(model, inputs, targets):
        calls.append(1)
        return brightness(model, inputs, targets)

    _score(counted, cfg, name="counted")
    n = len(calls)
    _score(counted, cfg, name="counted")
    assert n > 0 and len(calls) == n
    _score(counted, cfg, name="counted", n_images=N - 1, sanity_images=1)  # another setting: another key
    assert len(calls) > n


def test_a_failing_image_is_counted_never_dropped(cfg):
    def flaky(model, inputs, targets):
        if np.any(np.abs(inputs.reshape(len(inputs), -1).sum(1) - first) < 1e-3):
            raise RuntimeError("cannot explain this one")
        return brightness(model, inputs, targets)

    images, *_ = B.fold_data(B.fold_config(runs.RunConfig(**{**cfg.to_dict(), "folds": "blocks"}), "single-6c", 0),
                             N, progress=False)
    first = float(images[0].double().sum())
    row = _score(flaky, cfg, name="flaky", sanity_images=2).iloc[0]
    assert row["n_failed"] == 1 and row["n_images"] == N
    assert row["n_scored"] + row["n_refused"] == N - row["n_failed"]
    assert "cannot explain this one" in row["errors"] and "image 0" in row["errors"]
    assert np.isfinite(row["iou_area"])

    def always(model, inputs, targets):
        raise RuntimeError("broken")

    row = _score(always, cfg, name="always").iloc[0]
    assert row["n_failed"] == N and np.isnan(row["iou_area"]) and row["n_scored"] == 0


def test_bad_methods_are_refused_naming_them(cfg):
    with pytest.raises(TypeError, match=r"explain_func of method 'two'.*signature"):
        _score(lambda model, inputs: inputs, cfg, name="two")
    with pytest.raises(TypeError, match="explain_func of method 'x': expected a callable"):
        _score("not callable", cfg, name="x")
    with pytest.raises(ValueError, match=r"method 'flat': expected heatmaps of shape \(B, H, W\)"):
        _score(lambda model, inputs, targets: np.zeros((len(inputs), 7, 7)), cfg, name="flat")
    with pytest.raises(ValueError, match="method 'nan': returned .* NaN"):
        _score(lambda model, inputs, targets: np.full(np.asarray(inputs).mean(1).shape, np.nan), cfg, name="nan")
    with pytest.raises(ValueError, match="name: expected a non-empty method name"):
        _score(brightness, cfg, name="")
    with pytest.raises(ValueError, match="split: expected one of"):
        _score(brightness, cfg, split="rows")
    # (B, 1, H, W) maps and tensors are accepted
    ok = _score(lambda model, inputs, targets: torch.as_tensor(inputs).mean(1, keepdim=True), cfg, name="b1hw")
    assert ok["n_failed"].iloc[0] == 0
