"""Box-occlusion study on a toy model whose decision depends on one image region."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from vxnb.evaluate.occlusion import (
    DEFAULT_COVERAGE,
    box_occlusion_curve,
    mean_confidence_difference,
    occlusion_masks,
    occlusion_order,
    occlusion_study,
)

S = 32
IMAGES = dict(n=6, channels=1, size=S, seed=0, low=0.6)  # the shared images fixture (conftest.py)


class RegionModel(nn.Module):
    """Logit of class 0 grows with the brightness of the top-left 10x10 block; class 1 is 0."""

    def __init__(self, gain: float = 12.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(gain))

    def forward(self, x):
        if x.shape[1] != 1:
            raise RuntimeError(f"expected 1 channel, got {x.shape[1]}")
        s = self.scale * (x[:, :, :10, :10].mean(dim=(1, 2, 3)) - 0.2)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def _blob(cy, cx, n=6):
    yy, xx = np.mgrid[:S, :S]
    h = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 20.0)
    return np.repeat(h[None], n, axis=0)


def test_heatmap_on_the_relevant_region_drops_confidence_faster(images):
    model = RegionModel()
    good = box_occlusion_curve(model, images, _blob(4, 4), patch=4, fill="zero")
    bad = box_occlusion_curve(model, images, _blob(27, 27), patch=4, fill="zero")
    cg = good.groupby("level")["confidence"].mean()
    cb = bad.groupby("level")["confidence"].mean()
    assert cg[0.0] == pytest.approx(cb[0.0])
    assert cg[0.30] < cb[0.30] - 0.3
    assert (cg.loc[0.05:] < cb.loc[0.05:]).all()
    # The good curve decreases with coverage (the block only gets darker).
    assert (np.diff(cg.to_numpy()) <= 1e-12).all()


def test_level_zero_is_the_unoccluded_confidence_of_the_predicted_class(images):
    model = RegionModel()
    df = box_occlusion_curve(model, images, _blob(4, 4), patch=4)
    with torch.no_grad():
        p = torch.softmax(model(images), 1)
    zero = df[df.level == 0].sort_values("image")
    np.testing.assert_array_equal(zero.target, p.argmax(1).numpy())
    np.testing.assert_allclose(zero.confidence, p.max(1).values.numpy(), rtol=1e-6)
    assert (zero.n_patches == 0).all() and (zero.coverage == 0).all()
    # An explicit target follows that class.
    df1 = box_occlusion_curve(model, images, _blob(4, 4), patch=4, target=1)
    np.testing.assert_allclose(df1[df1.level == 0].confidence, p[:, 1].numpy(), rtol=1e-6)


def test_coverage_reaches_each_level(images):
    df = box_occlusion_curve(RegionModel(), images, _blob(16, 16), patch=5)
    assert list(df.columns) == ["image", "level", "coverage", "n_patches", "target", "confidence"]
    assert len(df) == len(images) * len(DEFAULT_COVERAGE)
    assert (df.coverage >= df.level - 1e-12).all()
    assert (df[df.level == 0.30].coverage >= 0.30).all()
    # Overshoot is at most one patch.
    assert (df.coverage - df.level <= 25 / S**2 + 1e-12).all()
    for _, g in df.groupby("image"):
        assert np.all(np.diff(g.n_patches) >= 0) and np.all(np.diff(g.coverage) > 0)


def test_occlusion_masks_are_nested_and_match_reported_coverage():
    h = _blob(10, 20, n=1)[0]
    masks, covered, n_patches = occlusion_masks(h, [0.0, 0.1, 0.5, 1.0], 3, np.random.default_rng(0))
    np.testing.assert_allclose(masks.mean(axis=(1, 2)), covered)
    assert not masks[0].any() and masks[-1].all()
    for a, b in zip(masks[:-1], masks[1:]):
        assert not (a & ~b).any()
    assert n_patches[0] == 0 and np.all(np.diff(n_patches) > 0)
    # The first patches sit where the heatmap is high.
    first, _, _ = occlusion_masks(h, [0.02], 3, np.random.default_rng(1))
    assert h[first[0]].mean() > 3 * h.mean()


def test_centres_are_sampled_proportionally_to_the_heatmap_without_replacement():
    w = np.array([[1.0, 2.0], [3.0, 0.0]])
    rng = np.random.default_rng(0)
    firsts = np.zeros(4)
    for _ in range(6000):
        order = occlusion_order(w, rng)
        assert sorted(order) == [0, 1, 2, 3]
        assert order[-1] == 3  # zero weight comes last
        firsts[order[0]] += 1
    np.testing.assert_allclose(firsts / firsts.sum(), [1 / 6, 2 / 6, 3 / 6, 0], atol=0.02)


def test_fill_mean_leaves_a_constant_image_unchanged():
    x = torch.full((2, 1, S, S), 0.7)
    df = box_occlusion_curve(RegionModel(), x, _blob(4, 4, n=2), patch=4, fill="mean")
    np.testing.assert_allclose(df.confidence, df.confidence.iloc[0], rtol=1e-6)
    df0 = box_occlusion_curve(RegionModel(), x, _blob(4, 4, n=2), patch=4, fill=0.7)
    np.testing.assert_allclose(df0.confidence, df.confidence, rtol=1e-6)


def test_deterministic_from_the_seed_and_batch_size(images):
    model = RegionModel()
    a = box_occlusion_curve(model, images, _blob(8, 8), patch=4, seed=3, fill="zero")
    b = box_occlusion_curve(model, images, torch.from_numpy(_blob(8, 8)), patch=4, seed=3, fill="zero",
                            batch_size=5)
    pd.testing.assert_frame_equal(a, b, rtol=1e-6)
    c = box_occlusion_curve(model, images, _blob(8, 8), patch=4, seed=4, fill="zero")
    assert not np.allclose(a.confidence, c.confidence)


def test_study_and_mean_difference(images):
    model = RegionModel()
    maps = {"good": _blob(4, 4), "bad": _blob(27, 27)}
    study = occlusion_study(model, images, maps, patch=4, fill="zero")
    assert list(study.columns) == ["method", "level", "coverage", "confidence", "confidence_std", "n_images"]
    assert set(study.method) == {"good", "bad"} and (study.n_images == len(images)).all()
    per = occlusion_study(model, images, maps, patch=4, fill="zero", reduce="none")
    ref = box_occlusion_curve(model, images, maps["good"], patch=4, fill="zero")
    np.testing.assert_allclose(per[per.method == "good"].confidence, ref.confidence)
    cg = ref.groupby("level").confidence.mean()
    cb = per[per.method == "bad"].groupby("level").confidence.mean()
    by_hand = float((cg - cb)[cg.index > 0].mean())
    d = mean_confidence_difference(study, "good", "bad")
    assert d == pytest.approx(by_hand) and d < 0
    assert mean_confidence_difference(per, "good", "bad") == pytest.approx(by_hand)
    assert mean_confidence_difference(study, "good", "bad", include_zero=True) == pytest.approx(by_hand * 6 / 7)
    with pytest.raises(ValueError, match=r"reference: 'gb' is not in the study; it has \['good', 'bad'\]"):
        mean_confidence_difference(study, "good", "gb")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(heatmaps=np.zeros((6, S, S - 1))), r"heatmaps: expected one \(H, W\) map per image"),
        (dict(heatmaps=np.full((6, S, S), np.nan)), "heatmaps: contains NaN"),
        (dict(coverage=(0.0, 0.4, 1.2)), "coverage: expected a non-empty sequence of fractions"),
        (dict(coverage=(0.0, 0.3, 0.2)), "coverage: expected strictly increasing"),
        (dict(patch=S + 1), "patch: expected an int"),
        (dict(target=2), r"target: class indices must be in \[0, 2\)"),
        (dict(target=[0, 1]), r"target: expected one class per image"),
        (dict(fill="gray"), "fill: expected"),
        (dict(images=torch.rand(6, 3, S, S)), "images: the model could not run"),
        (dict(images=torch.rand(S, S)), r"images: expected a batched image tensor"),
    ],
)
def test_bad_input(images, kwargs, match):
    args = dict(images=images, heatmaps=_blob(4, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        box_occlusion_curve(RegionModel(), args.pop("images"), args.pop("heatmaps"), **args)


def test_bad_study_input(images):
    with pytest.raises(ValueError, match="heatmaps_by_method: expected a non-empty dict"):
        occlusion_study(RegionModel(), images, {})
    with pytest.raises(ValueError, match=r"heatmaps_by_method\['x'\]: contains NaN"):
        occlusion_study(RegionModel(), images, {"x": np.full((6, S, S), np.nan)})
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        box_occlusion_curve(lambda x: x, images, _blob(4, 4))
