"""Sanity checks: similarity measures, class sensitivity and cascading randomisation."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from torch import nn

from vxnb.evaluate.sanity import (
    abs_spearman,
    class_sensitivity,
    default_random_layers,
    randomization_curve,
    randomize_cascade,
    spearman,
    ssim,
)
from nets import dense_net

S = 12
IMAGES = dict(n=6, channels=1, size=S)  # the shared images fixture (conftest.py)


class Shuffled(nn.Module):
    """Registers the classifier before the convolution: registration order != forward order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2 * S * S, 3)
        self.body = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def saliency(model, x, target):
    """|d logit_target / d x|: depends on the class and on the weights."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.gather(1, target[:, None]).sum().backward()
    return x.grad.abs().sum(1)


def edges(model, x, target):
    """Ignores model and class (Adebayo et al.'s edge-detector failure case)."""
    return (x[:, 0, 1:, 1:] - x[:, 0, :-1, :-1]).abs()


# ----------------------------------------------------------------------------- similarities
def test_spearman_on_constructed_pairs_and_against_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 9, 9))
    np.testing.assert_allclose(spearman(a, a), 1.0)
    np.testing.assert_allclose(spearman(a, -a), -1.0)
    np.testing.assert_allclose(spearman(a, np.exp(a)), 1.0)  # monotone transform keeps ranks
    np.testing.assert_allclose(abs_spearman(a, -a), 1.0)
    b = rng.normal(size=(5, 9, 9))
    b[0] = np.round(b[0])  # ties
    ref = [spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(spearman(a, b), ref, atol=1e-12)
    ref_abs = [spearmanr(np.abs(x).ravel(), np.abs(y).ravel()).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(abs_spearman(torch.from_numpy(a), torch.from_numpy(b)), ref_abs, atol=1e-12)
    single = spearman(a[0], b[0])
    assert isinstance(single, float) and single == pytest.approx(ref[0])
    assert np.isnan(spearman(np.ones((4, 4)), a[0, :4, :4]))


def test_ssim_against_skimage():
    rng = np.random.default_rng(1)
    a = rng.random((4, 16, 20)) * 5 - 1
    b = a + rng.normal(scale=0.5, size=a.shape)
    b[3] = 2.0  # constant map -> zeros after normalisation
    got = ssim(a, b)
    def norm(x):
        return (x - x.min()) / (x.max() - x.min()) if x.max() > x.min() else np.zeros_like(x)
    ref = [structural_similarity(norm(x), norm(y), data_range=1) for x, y in zip(a, b)]
    np.testing.assert_allclose(got, ref, atol=1e-12)
    ref5 = structural_similarity(norm(a[0]), norm(b[0]), data_range=1, win_size=5)
    assert ssim(a[0], b[0], win_size=5) == pytest.approx(ref5, abs=1e-12)


def test_ssim_identical_is_one_and_shifted_is_lower():
    yy, xx = np.mgrid[:32, :32]
    blob = np.exp(-((yy - 12) ** 2 + (xx - 12) ** 2) / 18.0)
    shifted = np.roll(blob, (6, 6), axis=(0, 1))
    assert ssim(blob, blob) == pytest.approx(1.0)
    assert ssim(blob, 3 * blob + 1) == pytest.approx(1.0)  # min-max normalisation
    assert ssim(blob, shifted) < 0.8


def test_similarity_bad_input():
    with pytest.raises(ValueError, match="b: expected the shape of a"):
        spearman(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="a: contains NaN"):
        ssim(np.full((8, 8), np.nan), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ssim(np.zeros((5, 5)), np.zeros((5, 5)))
    with pytest.raises(ValueError, match=r"a: expected a heatmap \(H, W\)"):
        spearman(np.zeros(5), np.zeros(5))


# ----------------------------------------------------------------------------- class sensitivity
def test_class_sensitivity_of_class_blind_and_class_dependent_explanations(images):
    model = dense_net(S)
    df = class_sensitivity({"edges": edges, "saliency": saliency}, model, images)
    assert list(df.columns[:2]) == ["method", "comparison"]
    e = df[df.method == "edges"].set_index("comparison")
    np.testing.assert_allclose(e.loc[["runner-up", "random"], ["spearman", "abs_spearman", "ssim"]], 1.0)
    s = df[df.method == "saliency"].set_index("comparison")
    assert (s.loc[["runner-up", "random"], ["spearman", "ssim"]] < 0.95).all().all()
    assert (df.n_images == len(images)).all()


def test_class_sensitivity_classes_and_per_image_rows(images):
    model = dense_net(S)
    with torch.no_grad():
        logits = model(images)
    per = class_sensitivity(saliency, model, images, classes=[0, 1, 2], reduce="none", seed=3)
    assert set(per.comparison) == {"runner-up", "random"}
    ru = per[per.comparison == "runner-up"]
    np.testing.assert_array_equal(ru.predicted, logits.argmax(1).numpy())
    np.testing.assert_array_equal(ru.other, logits.topk(2).indices[:, 1].numpy())
    rnd = per[per.comparison == "random"]
    assert set(rnd.other) <= {0, 1, 2} and (rnd.other.to_numpy() != rnd.predicted.to_numpy()).all()
    again = class_sensitivity(saliency, model, images, classes=[0, 1, 2], reduce="none", seed=3)
    pd.testing.assert_frame_equal(per, again)
    # Similarities are those of the explanations themselves.
    t = torch.tensor(ru.predicted.tolist())
    o = torch.tensor(ru.other.tolist())
    ref = spearman(saliency(model, images, t).numpy(), saliency(model, images, o).numpy())
    np.testing.assert_allclose(ru.spearman, ref, atol=1e-6)


def test_class_sensitivity_bad_input(images):
    model = dense_net(S)
    with pytest.raises(ValueError, match="images: the model could not run"):
        class_sensitivity(saliency, model, torch.rand(2, 3, S, S))
    with pytest.raises(ValueError, match=r"images: expected a batched image tensor"):
        class_sensitivity(saliency, model, torch.rand(1, S, S))
    with pytest.raises(ValueError, match=r"classes: class indices must be in \[0, 5\)"):
        class_sensitivity(saliency, model, images, classes=[0, 7])
    with pytest.raises(ValueError, match=r"explain_fn 'bad': expected heatmaps of shape \(6, H, W\)"):
        class_sensitivity({"bad": lambda m, x, t: x}, model, images)
    with pytest.raises(TypeError, match="explain_fn: expected a callable"):
        class_sensitivity("saliency", model, images)


# ----------------------------------------------------------------------------- randomisation
def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_default_layers_top_down():
    assert default_random_layers(dense_net(S)) == ["fc2", "fc1", "conv2", "conv1"]
    m = Shuffled()
    assert default_random_layers(m) == ["body", "head"]  # registration order, reversed
    assert default_random_layers(m, example=torch.rand(1, 1, S, S)) == ["head", "body"]  # forward order


@pytest.mark.parametrize("init", ["reset", "normal"])
def test_cascade_randomises_exactly_the_cascaded_layers(init):
    model = dense_net(S)
    before = _snapshot(model)
    layers = default_random_layers(model)
    steps = list(randomize_cascade(model, init=init, seed=0))
    assert [n for n, _ in steps] == layers
    for j, (name, rmodel) in enumerate(steps):
        assert rmodel is not model
        done = set(layers[: j + 1])
        for key, value in rmodel.state_dict().items():
            layer = key.rsplit(".", 1)[0]
            if layer in done:
                assert not torch.equal(value, before[key]), (name, key)
            else:
                assert torch.equal(value, before[key]), (name, key)
    for key, value in model.state_dict().items():  # the original is untouched
        assert torch.equal(value, before[key])
    if init == "normal":
        w = steps[-1][1].fc1.weight
        assert 0.005 < w.std().item() < 0.02


def test_independent_mode_and_determinism():
    model = dense_net(S)
    before = _snapshot(model)
    steps = list(randomize_cascade(model, ["fc1", "conv1"], mode="independent", seed=5))
    for name, rmodel in steps:
        for key, value in rmodel.state_dict().items():
            assert torch.equal(value, before[key]) == (key.rsplit(".", 1)[0] != name)
    again = list(randomize_cascade(model, ["fc1", "conv1"], mode="independent", seed=5))
    for (_, a), (_, b) in zip(steps, again):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(va, vb)
    other = dict(randomize_cascade(model, ["fc1"], seed=6))["fc1"]
    assert not torch.equal(other.fc1.weight, steps[0][1].fc1.weight)


def test_cascade_bad_input():
    model = dense_net(S)
    with pytest.raises(ValueError, match=r"layers: the model has no module\(s\) \['fc9'\]; it has: conv1, relu1"):
        randomize_cascade(model, ["fc1", "fc9"])
    with pytest.raises(ValueError, match="have no parameters"):
        randomize_cascade(model, ["relu1"])
    with pytest.raises(ValueError, match="init: expected"):
        randomize_cascade(model, init="xavier")


def test_randomization_curve(images):
    model = dense_net(S)
    before = _snapshot(model)
    df = randomization_curve({"saliency": saliency, "edges": edges}, model, images)
    assert list(df.columns[:3]) == ["method", "step", "layer"]
    sal = df[df.method == "saliency"]
    assert list(sal.layer) == ["fc2", "fc1", "conv2", "conv1"] and list(sal.step) == [1, 2, 3, 4]
    np.testing.assert_allclose(df[df.method == "edges"][["spearman", "ssim"]], 1.0)
    assert sal.spearman.iloc[-1] < 0.9 and sal.ssim.iloc[-1] < 0.9
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    # Per-image rows agree with the similarity of explanations from the randomised models.
    per = randomization_curve(saliency, model, images, targets=2, layers=["fc2"], reduce="none")
    _, rmodel = next(iter(randomize_cascade(model, ["fc2"])))
    t = torch.full((len(images),), 2)
    ref = ssim(saliency(model, images, t).numpy(), saliency(rmodel, images, t).numpy())
    np.testing.assert_allclose(per.ssim, ref, atol=1e-6)


def test_randomization_curve_bad_input(images):
    model = dense_net(S)
    with pytest.raises(ValueError, match=r"targets: class indices must be in \[0, 5\)"):
        randomization_curve(saliency, model, images, targets=5)
    with pytest.raises(ValueError, match=r"targets: expected one class per image"):
        randomization_curve(saliency, model, images, targets=[0, 1])
    with pytest.raises(ValueError, match="images: the model could not run"):
        randomization_curve(saliency, model, torch.rand(2, 1, S + 1, S))
    with pytest.raises(ValueError, match=r"layers: the model has no module\(s\) \['fc9'\]"):
        randomization_curve(saliency, model, images, layers=["fc9"])
