"""vxnb.studies.sanity_study: the tables of notebook 06 (class sensitivity, randomisation)."""

import numpy as np
import pandas as pd
import pytest
import torch

from vxnb import explanations as E
from vxnb.studies import sanity_study as S
from vxnb.studies.runs import RunConfig
from vxnb.evaluate.sanity import spearman, ssim
from vxnb.features import default_layers, feature_columns

from nets import tiny_strided_net

torch.set_num_threads(1)
N_CLASSES = 4
SIZE = 16
IMAGES = dict(n=5, channels=3, size=SIZE)  # the shared images fixture (conftest.py)


@pytest.fixture(scope="module")
def model():
    return tiny_strided_net(N_CLASSES)


@pytest.fixture(scope="module")
def rel(model):
    """Every class has its own conv and FC features."""
    columns = feature_columns(model, default_layers(model), [6, 8, 10])
    rng = np.random.default_rng(0)
    W = np.zeros((len(columns), N_CLASSES))
    for j in range(N_CLASSES):
        W[rng.choice(len(columns), 6, replace=False), j] = rng.uniform(0.2, 1.0, 6)
    return E.Relevance(W, columns, mu=3.0)


def class_blind(model, x, target):
    """Ignores the class and the weights: an edge map of the image."""
    return (x[:, 0, 1:, 1:] - x[:, 0, :-1, :-1]).abs()


def saliency(model, x, target):
    x = x.clone().requires_grad_(True)
    model(x).gather(1, target[:, None]).sum().backward()
    return x.grad.abs().sum(1)


def constant(model, x, target):
    return torch.zeros(x.shape[0], x.shape[2], x.shape[3])


# ----------------------------------------------------------------------------- explain functions
def test_sanity_methods_names_and_maps(model, images, rel):
    fns = S.sanity_methods(rel, k=3)
    assert list(fns) == ["Ours", "Deconv+GB", "Grad-CAM"]
    assert list(S.sanity_methods(rel, methods=("gradcam", "ours"), labels=False)) == ["gradcam", "ours"]
    t = torch.tensor([0, 1, 2, 3, 0])
    for name, fn in fns.items():
        h = fn(model, images, t)
        assert tuple(h.shape) == (5, SIZE, SIZE), name
        assert torch.isfinite(h).all() and (h >= 0).all()
    # ours is explain_batch with those targets
    ref = E.explain_batch(model, rel, images, k=3, targets=t)
    torch.testing.assert_close(fns["Ours"](model, images, t), ref)
    # the Deconv+GB and Grad-CAM functions are vxnb.baselines.attribution
    from vxnb.baselines import attribution
    torch.testing.assert_close(fns["Grad-CAM"](model, images, t), attribution("gradcam", model, images, t))


def test_sanity_methods_bad_input(rel):
    with pytest.raises(ValueError, match="relevant: method 'ours' needs"):
        S.sanity_methods(None)
    assert list(S.sanity_methods(None, methods=["deconv_gb"])) == ["Deconv+GB"]
    with pytest.raises(ValueError, match=r"methods: unknown method\(s\) \['gradcamm'\]"):
        S.sanity_methods(rel, methods=["gradcamm"])
    with pytest.raises(TypeError, match="methods: expected a non-empty sequence"):
        S.sanity_methods(rel, methods="ours")
    with pytest.raises(ValueError, match="duplicated"):
        S.sanity_methods(rel, methods=["ours", "ours"])
    with pytest.raises(ValueError, match="k: expected a positive int"):
        S.sanity_methods(rel, k=0)


# ----------------------------------------------------------------------------- the study
@pytest.fixture(scope="module")
def study(model, images, rel):
    fns = {**S.sanity_methods(rel, k=3), "class-blind": class_blind, "saliency": saliency}
    return fns, S.sanity_study(fns, model, images, progress=False)


def test_sensitivity_table_has_every_method_and_comparison(study, images):
    fns, res = study
    summ = res.sensitivity_summary()
    assert set(zip(summ.method, summ.comparison)) == {(m, c) for m in fns for c in ("runner-up", "random")}
    assert (summ.n_images == len(images)).all()
    for c in ("spearman", "abs_spearman", "ssim"):
        v = summ[c].dropna()
        assert ((v >= -1 - 1e-9) & (v <= 1 + 1e-9)).all(), c
    per = res.sensitivity
    assert len(per) == len(fns) * 2 * len(images)
    assert (per.predicted != per.other).all()
    # a method that ignores the class has similarity 1, one that uses it does not
    blind = summ[summ.method == "class-blind"]
    np.testing.assert_allclose(blind[["spearman", "abs_spearman", "ssim"]], 1.0)
    assert (blind.n_constant == 0).all()
    assert (summ.loc[summ.method == "saliency", "spearman"] < 0.99).all()


def test_sensitivity_values_match_an_independent_computation(study, model, images):
    fns, res = study
    per = res.sensitivity
    row = per[(per.method == "Ours") & (per.comparison == "random")].iloc[2]
    x = images[2:3]
    a = fns["Ours"](model, x, torch.tensor([int(row.predicted)]))[0]
    b = fns["Ours"](model, x, torch.tensor([int(row.other)]))[0]
    with torch.no_grad():
        assert int(model(x).argmax()) == int(row.predicted)
    assert float(a.max() - a.min()) > 0 and float(b.max() - b.min()) > 0  # Spearman is defined
    assert row.spearman == pytest.approx(spearman(a, b), abs=1e-5)  # float32 batch vs single
    assert row.ssim == pytest.approx(ssim(a, b), abs=1e-5)


def test_randomization_table(study, model, images):
    fns, res = study
    summ = res.randomization_summary()
    layers = ["fc4", "fc3", "conv2", "conv1"]  # every Conv/Linear, top first
    for m in fns:
        s = summ[summ.method == m]
        assert s.step.tolist() == [1, 2, 3, 4] and s.layer.tolist() == layers
    assert (summ.n_images == len(images)).all()
    for c in ("spearman", "abs_spearman", "ssim"):
        v = summ[c].dropna()
        assert ((v >= -1 - 1e-9) & (v <= 1 + 1e-9)).all(), c
    # a method blind to the weights keeps similarity 1; a weight-dependent one drifts away
    np.testing.assert_allclose(summ.loc[summ.method == "class-blind", ["spearman", "ssim"]], 1.0)
    sal = summ[summ.method == "saliency"]
    assert sal.spearman.iloc[-1] < 0.9
    # the model itself was not modified
    torch.testing.assert_close(model.state_dict()["fc4.weight"], tiny_strided_net(N_CLASSES).state_dict()["fc4.weight"])


def test_constant_maps_are_counted_not_averaged(model, images):
    res = S.sanity_study({"zero": constant, "class-blind": class_blind}, model, images, randomize=False)
    assert res.randomization.empty and list(res.randomization.columns[:4]) == ["method", "step", "layer", "image"]
    summ = res.sensitivity_summary().set_index(["method", "comparison"])
    assert (summ.loc["zero", "n_constant"] == len(images)).all()
    assert summ.loc["zero", "spearman"].isna().all()
    assert (summ.loc["class-blind", "n_constant"] == 0).all()
    np.testing.assert_allclose(summ.loc["zero", "ssim"], 1.0)  # two all-zero maps are identical


def test_summarize_by_hand():
    per = pd.DataFrame({"method": ["a", "a", "a", "b"], "image": [0, 1, 2, 0],
                        "spearman": [0.2, np.nan, 0.4, 1.0], "abs_spearman": [0.1, 0.3, 0.5, 1.0],
                        "ssim": [0.5, 0.7, 0.9, 1.0]})
    s = S.summarize(per, ["method"]).set_index("method")
    assert s.loc["a", "spearman"] == pytest.approx(0.3)
    assert s.loc["a", "abs_spearman"] == pytest.approx(0.3)
    assert s.loc["a", "ssim_std"] == pytest.approx(0.2)
    assert s.loc["a", "n_constant"] == 1 and s.loc["b", "n_constant"] == 0
    assert s.loc["a", "n_images"] == 3
    with pytest.raises(ValueError, match=r"per_image: missing column\(s\) \['ssim'\]"):
        S.summarize(per.drop(columns="ssim"), ["method"])


def test_study_bad_input(model, images):
    with pytest.raises(TypeError, match="explain_fns: expected a non-empty dict"):
        S.sanity_study(class_blind, model, images)
    with pytest.raises(TypeError, match="explain_fns"):
        S.sanity_study({}, model, images)
    with pytest.raises(ValueError, match="layers"):
        S.sanity_study({"b": class_blind}, model, images, layers=["nope"])
    with pytest.raises(TypeError, match="cfg: expected a vxnb.studies.runs.RunConfig"):
        S.run_study({"dataset": "mnist"})
    cfg = RunConfig(dataset="mnist")  # the arguments are checked before anything is loaded
    for kw, msg in (({"k": 0}, "k: expected a positive int, got 0"),
                    ({"n_images": True}, r"n_images: expected a positive int or None, got True"),
                    ({"seed": -1}, "seed: expected a non-negative int, got -1")):
        with pytest.raises(ValueError, match=msg):
            S.run_study(cfg, data=object(), **kw)


# ----------------------------------------------------------------------------- widget helper
def test_explain_classes(model, images, rel):
    fns = S.sanity_methods(rel, k=3)
    maps = S.explain_classes(fns, model, images[1], [2, 0, 3])
    assert list(maps) == list(fns)
    for name, h in maps.items():
        assert tuple(h.shape) == (3, SIZE, SIZE)
        assert float(h.min()) >= 0 and float(h.max()) <= 1
    # the same maps as one call per class (up to min-max normalisation)
    ref = fns["Ours"](model, images[1:2], torch.tensor([0]))[0]
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    torch.testing.assert_close(maps["Ours"][1], ref.float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"classes: class 4 is out of range .* \(valid: 0..3\)"):
        S.explain_classes(fns, model, images[0], [4])
    with pytest.raises(ValueError, match="image: expected one image"):
        S.explain_classes(fns, model, images[:2], [0])
    with pytest.raises(ValueError, match="classes: expected a non-empty"):
        S.explain_classes(fns, model, images[0], [])


def test_row_similarities(model, images, rel):
    maps = S.explain_classes({"blind": class_blind, "saliency": saliency}, model, images[0], [0, 1, 2])
    tab = S.row_similarities(maps)
    assert tab.method.tolist() == ["blind", "blind", "saliency", "saliency"] and tab.row.tolist() == [1, 2, 1, 2]
    np.testing.assert_allclose(tab.loc[tab.method == "blind", ["spearman", "ssim"]], 1.0)
    s = tab.loc[(tab.method == "saliency") & (tab.row == 2)].iloc[0]
    assert s.spearman == pytest.approx(spearman(maps["saliency"][0], maps["saliency"][2]))
    assert s.ssim == pytest.approx(ssim(maps["saliency"][0], maps["saliency"][2]))
    with pytest.raises(ValueError, match="R >= 2"):
        S.row_similarities({"a": maps["blind"][:1]})


# ----------------------------------------------------------------------------- figures (vxnb.plots)
def test_sanity_figures(study, model, images):
    from vxnb import plots

    fns, res = study
    sens = res.sensitivity_summary().assign(dataset="A")
    rnd = res.randomization_summary().assign(dataset="A")
    bars = plots.sanity_sensitivity_bars(pd.concat([sens, sens.assign(dataset="B")]))
    assert {t.name for t in bars.data} == {"runner-up", "random"}
    # curves: one trace per method, dataset and metric, starting at 1 ("trained"), ticks named per dataset
    curves = plots.randomization_curves(pd.concat([rnd, rnd.assign(dataset="B", layer=rnd.layer + "'")]))
    assert len(curves.data) == len(fns) * 2 * 2
    first = curves.data[0]
    assert first.name == next(iter(fns)) and list(first.x) == [0, 1, 2, 3, 4] and first.y[0] == 1.0
    ours = rnd[rnd.method == first.name]
    np.testing.assert_allclose(first.y[1:], ours.spearman, equal_nan=True)
    assert curves.layout.xaxis.ticktext == ("trained", "→ fc4", "→ fc3", "→ conv2", "→ conv1")
    assert curves.layout.xaxis2.ticktext[1] == "→ fc4'"
    assert len(plots.randomization_curves(rnd.drop(columns="dataset")).data) == len(fns) * 2
    maps = S.explain_classes({"blind": class_blind, "saliency": saliency}, model, images[0], [0, 1])
    panel = plots.sanity_class_panel(images[0], maps, ["pred", "other"], subtitles={"blind": "ρ = 1"})
    assert len(panel.data) == 2 * 3
    assert [a.text for a in panel.layout.annotations][:3] == ["image", "blind<br><sub>ρ = 1</sub>", "saliency"]
    with pytest.raises(ValueError, match="maps\\['blind'\\]: expected 3 maps"):
        plots.sanity_class_panel(images[0], maps, ["a", "b", "c"])
