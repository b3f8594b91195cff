"""The counterfactual interpretation measures and selectors (issue 27 item 3), on hand-checkable cases."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from vxnb._graph import ReceptiveField
from vxnb.evaluate import counterfactual as CF


def test_causal_specificity_by_hand():
    # 4 images: classes 0, 0, 1, 1; 3 features
    X = np.array([[2.0, 1.0, 0.0],
                  [4.0, 3.0, 0.0],
                  [1.0, 5.0, 2.0],
                  [1.0, 7.0, 4.0]])
    X_cf = np.array([[1.0, 1.0, 0.0],
                     [0.0, 3.0, 0.0],
                     [1.0, 6.0, 0.0],
                     [1.0, 8.0, 1.0]])
    out = CF.causal_specificity(X, X_cf, [0, 0, 1, 1], [np.array([0, 1]), np.array([2, 1])])
    assert out[["class", "rank", "feature"]].values.tolist() == [[0, 0, 0], [0, 1, 1], [1, 0, 2], [1, 1, 1]]
    # class 0, feature 0: mean 3 -> mean 0.5: drop 2.5/3; feature 1: 2 -> 2: 0
    # class 1, feature 2: mean 3 -> 0.5: 2.5/3; feature 1: 6 -> 7: -1/7 (scaled by the larger)
    np.testing.assert_allclose(out["response"], [3, 2, 3, 6])
    np.testing.assert_allclose(out["response_cf"], [0.5, 2, 0.5, 7])
    np.testing.assert_allclose(out["drop"], [2.5 / 3, 0.0, 2.5 / 3, -1 / 7])
    zero = CF.causal_specificity(X, X_cf, [0, 0, 1, 1], [np.array([2]), np.array([], int)])
    assert np.isnan(zero["drop"].iloc[0]) and len(zero) == 1  # feature 2 fires on neither version of class 0


def test_selectors_by_hand():
    W = np.array([[0.0, 0.3],
                  [0.5, 0.0],
                  [0.2, -0.4],
                  [-0.1, 0.1]])
    assert [s.tolist() for s in CF.select_features("mu-lasso", W=W, k=2)] == [[1, 2], [0, 3]]
    assert [s.tolist() for s in CF.select_features("mu-lasso", W=W, k=np.array([3, 1]))] == [[1, 2, 3], [0]]
    with pytest.raises(ValueError, match="class 0 has 3 non-zero"):
        CF.select_features("mu-lasso", W=W, k=4)
    X = np.array([[1.0, 0.0, 3.0, 0.0],
                  [3.0, 0.0, 1.0, 0.0],
                  [0.0, 5.0, 0.0, 1.0],
                  [0.0, 3.0, 4.0, 0.0]])
    y = np.array([0, 0, 1, 1])
    # mean activation of class 0: [2, 0, 2, 0] (tie 0/2: lower index first); class 1: [0, 4, 2, 0.5]
    assert [s.tolist() for s in CF.select_features("activation", X, y, 2)] == [[0, 2], [1, 2]]
    rel = -X  # CRP ranks by its own matrix: the lowest activations first
    assert [s.tolist() for s in CF.select_features("crp", X, y, 1, relevance=rel)] == [[1], [0]]
    r1 = CF.select_features("random", X, y, 3, seed=4)
    assert [s.tolist() for s in r1] == [s.tolist() for s in CF.select_features("random", X, y, 3, seed=4)]
    assert all(len(set(s.tolist())) == 3 and s.max() < 4 for s in r1)
    draws = {tuple(CF.select_features("random", X, y, 1, seed=s)[0]) for s in range(40)}
    assert draws == {(0,), (1,), (2,), (3,)}


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_selector_finds_the_informative_column(n_classes):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(n_classes), 60)
    X = rng.normal(size=(len(y), 6))
    X[:, 4] += 3.0 * y  # column 4 tells the classes apart; the others are noise
    sel = CF.select_features("logistic", X, y, 1)
    # the outer classes lean on column 4 (the middle one of three sits at its mean: |w| ~ 0 there)
    assert sel[0].tolist() == [4] and sel[-1].tolist() == [4]
    # the same as scikit-learn's own coefficients on standardised X
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    coef = LogisticRegression(max_iter=2000).fit(StandardScaler().fit_transform(X), y).coef_
    if n_classes == 3:
        assert [s.tolist() for s in CF.select_features("logistic", X, y, 3)] == \
            [np.argsort(-np.abs(c), kind="stable")[:3].tolist() for c in coef]


def test_part_precision_by_hand():
    mask = np.zeros((8, 8), bool)
    mask[0:4, 0:4] = True  # the part: the top-left quarter
    masks = np.stack([mask, ~mask])
    rf = ReceptiveField(size=(4, 4), stride=(2, 2), offset=(1.5, 1.5))  # unit (r, c): rows 2r..2r+3
    top = pd.DataFrame({"layer": ["a", "a", "a", "b"], "channel": [0, 0, 1, 5], "index": [0, 0, 1, 1],
                        "row": [0, 1, 0, -1], "col": [0, 1, 3, -1]})
    fc = ReceptiveField(size=None, stride=None, offset=None)
    out = CF.part_precision(top, {"a": rf, "b": fc}, masks, 8)
    # a/0: unit (0,0) box rows 0-3, cols 0-3: 16/16 in the mask; unit (1,1) rows 2-5, cols 2-5: 4/16
    # a/1: image 1 (mask = not top-left), unit (0,3) rows 0-3, cols 6-9 clipped to 6-7: 8/8
    # b/5: the whole image of image 1: 48/64
    assert out[["layer", "channel", "n_patches"]].values.tolist() == [["a", 0, 2], ["a", 1, 1], ["b", 5, 1]]
    np.testing.assert_allclose(out["precision"], [(1 + 0.25) / 2, 1.0, 0.75])
    same = CF.part_precision(top, {"a": rf, "b": fc}, lambda i: torch.from_numpy(masks[i]), (8, 8))
    pd.testing.assert_frame_equal(out, same)
    with pytest.raises(ValueError, match="no receptive field"):
        CF.part_precision(top, {"a": rf}, masks, 8)


def test_compare_selectors_by_hand():
    # two folds x three seeds; mu-lasso better than random on all six units
    units = [(f, s) for f in range(2) for s in range(3)]
    lasso = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    rnd = [0.1, 0.3, 0.2, 0.1, 0.0, 0.2]
    rows = [("mu-lasso", f, s, v) for (f, s), v in zip(units, lasso)]
    rows += [("random", f, s, v + d) for (f, s), v in zip(units, rnd) for d in (-0.05, 0.05)]  # 2 features each
    table = pd.DataFrame(rows, columns=["selector", "fold", "seed", "drop"])
    out = CF.compare_selectors(table, "drop").set_index("selector")
    assert out.loc["mu-lasso", "mean"] == pytest.approx(0.65)
    half = 2.5705818366147395 * np.std(lasso, ddof=1) / np.sqrt(6)  # t(0.975, 5)
    assert (out.loc["mu-lasso", "ci_low"], out.loc["mu-lasso", "ci_high"]) == pytest.approx((0.65 - half, 0.65 + half))
    assert out.loc["random", "mean"] == pytest.approx(np.mean(rnd))
    # exact two-sided signed-rank p with all six differences positive: 2 / 2**6
    assert out.loc["random", "wilcoxon_p"] == pytest.approx(2 / 64)
    assert out.loc["random", "reference_better"] == 6 and np.isnan(out.loc["mu-lasso", "wilcoxon_p"])
    with pytest.raises(ValueError, match="reference"):
        CF.compare_selectors(table, "drop", reference="logistic")


def test_mean_ci_edges():
    assert CF.mean_ci([2.0])[0] == 2.0 and np.isnan(CF.mean_ci([2.0])[1])
    m, lo, hi = CF.mean_ci([1.0, 2.0, 3.0, np.nan])
    assert (m, hi - m) == pytest.approx((2.0, 4.302652729911275 / np.sqrt(3)))


def test_crp_channel_relevance_matches_the_epsilon_rule_by_hand():
    """conv -> ReLU -> Flatten -> Linear (no bias): EpsilonPlusFlat's epsilon rule on the Linear
    layer gives channel ch of the conv output R_ch = sum_p a_{ch,p} w_{c,(ch,p)} * z_c / (z_c + eps),
    then normalised by the sum of |R| over the channels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3, bias=False))
    x = torch.rand(6, 3, 5, 5)
    y = np.array([0, 1, 2, 0, 1, 2])
    rel = CF.crp_channel_relevance(model, x, y, ["0"], batch_size=4)
    with torch.no_grad():
        a = model[1](model[0](x)).reshape(6, 4, 25)
        z = model(x)
        w = model[3].weight.reshape(3, 4, 25)
    ref = np.zeros((6, 4))
    for i in range(6):
        c = y[i]
        zc = float(z[i, c])
        scale = zc / (zc + 1e-6 * (1 if zc >= 0 else -1))
        for ch in range(4):
            ref[i, ch] = float((a[i, ch] * w[c, ch]).sum()) * scale
    ref /= np.abs(ref).sum(1, keepdims=True)
    np.testing.assert_allclose(rel, ref, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was


def test_bad_inputs():
    X = np.ones((4, 3))
    with pytest.raises(ValueError, match="method"):
        CF.select_features("lasso", X, [0, 0, 1, 1], 1)
    with pytest.raises(ValueError, match="W"):
        CF.select_features("mu-lasso", X, [0, 0, 1, 1], 1)
    with pytest.raises(ValueError, match="relevance"):
        CF.select_features("crp", X, [0, 0, 1, 1], 1)
    with pytest.raises(ValueError, match="X_cf"):
        CF.causal_specificity(X, np.ones((3, 3)), [0, 0, 1, 1], [np.array([0])])
    with pytest.raises(ValueError, match="NaN"):
        CF.causal_specificity(X, np.full((4, 3), np.nan), [0, 0, 1, 1], [np.array([0])])
    with pytest.raises(ValueError, match=r"selected\[0\]"):
        CF.causal_specificity(X, X, [0, 0, 1, 1], [np.array([3])])
    with pytest.raises(ValueError, match="labels"):
        CF.select_features("activation", X, [0, 0, 1], 1)
    with pytest.raises(ValueError, match="k"):
        CF.select_features("activation", X, [0, 0, 1, 1], 4)
    with pytest.raises(TypeError, match="top"):
        CF.part_precision(pd.DataFrame({"layer": []}), {}, np.zeros((1, 2, 2)), 2)


@pytest.mark.slow
def test_counterfactual_study_end_to_end(tmp_path):
    """One fold of a tiny run: every selector takes the same number of features per class, the
    measures are in range, and the summary's means are the means of the per-unit means."""
    from vxnb.studies.counterfactual import counterfactual_study
    from vxnb.studies.runs import RunConfig

    cfg = RunConfig(size=32, quick=True, train_limit=240, epochs=1, data_root=str(tmp_path / "data"),
                    runs_root=str(tmp_path / "runs"))
    table, summary = counterfactual_study(cfg, folds=(0, 1), k=3, top_n=4, crp_per_class=4, n_random=2,
                                          progress=False)
    assert set(table["selector"]) == set(CF.SELECTORS)
    counts = table[table["draw"] == 0].groupby(["fold", "selector", "class"]).size().unstack("selector")
    assert (counts.nunique(axis=1) == 1).all() and (counts.max(axis=1) <= 3).all()
    assert table["drop"].dropna().between(-1, 1).all() and table["drop"].notna().mean() > 0.5
    assert table["precision"].between(0, 1).all()
    assert (table["drop"].abs() > 0).any()  # the counterfactual twins differ from the test images
    for measure, frame in summary.items():
        frame = frame.set_index("selector")
        assert (frame["n"] == 2).all()
        for sel in CF.SELECTORS:
            per_fold = [table[(table["selector"] == sel) & (table["fold"] == f)][measure].mean() for f in (0, 1)]
            assert frame.loc[sel, "mean"] == pytest.approx(np.mean(per_fold))
    # the table was saved in each run folder
    assert len(list((tmp_path / "runs").rglob("counterfactual-cf1-k3-mu10.csv"))) == 2


def test_shortcut_detection_by_hand():
    selected = pd.DataFrame({"class": [0, 0, 1, 1, 2], "layer": ["a", "b", "a", "a", "b"],
                             "channel": [0, 3, 1, 2, 3]})
    precision = pd.DataFrame({"layer": ["a", "a", "a", "b"], "channel": [0, 1, 2, 3],
                              "precision": [0.1, 0.6, 0.5, 0.2]})
    out = CF.shortcut_detection(selected, precision, threshold=0.5)
    assert out["class"].tolist() == [0, 1, 2] and out["n_features"].tolist() == [2, 2, 1]
    np.testing.assert_allclose(out["best"], [0.2, 0.6, 0.2])
    assert out["detected"].tolist() == [False, True, False]
    assert CF.shortcut_detection(selected, precision, threshold=0.15)["detected"].tolist() == [True, True, True]
    with pytest.raises(ValueError, match="no row"):
        CF.shortcut_detection(selected.assign(channel=9), precision)
    with pytest.raises(ValueError, match="threshold"):
        CF.shortcut_detection(selected, precision, threshold=0)


def test_shortcut_detection_on_rendered_distractors():
    """The distractor masks of the renderer as ground truth: a feature whose top patch sits on the
    ball scores its overlap, one on the flower head scores 0."""
    from vxnb.data.an8flower import render as R

    _, _, masks, dmasks = next(R.iter_views("single-6c", 32, 0, views=[30], knobs={"distractor_rate": 1.0},
                                            distractors=True))
    d = dmasks[0]  # class 0, 25 items, every one with a ball
    rows, cols = np.nonzero(d[0])
    cy, cx = int(round(rows.mean())), int(round(cols.mean()))
    hy, hx = [int(round(v.mean())) for v in np.nonzero(masks["head"][0])]
    rf = ReceptiveField(size=(3, 3), stride=(1, 1), offset=(0.0, 0.0))  # unit (r, c) sees rows r-1..r+1
    top = pd.DataFrame({"layer": ["x", "x"], "channel": [0, 1], "index": [0, 0], "row": [cy, hy], "col": [cx, hx]})
    prec = CF.part_precision(top, {"x": rf}, d, 32)
    assert prec["precision"].iloc[0] == pytest.approx(d[0, cy - 1:cy + 2, cx - 1:cx + 2].mean())
    assert prec["precision"].iloc[0] > 0.5 and prec["precision"].iloc[1] == 0.0
    sel = pd.DataFrame({"class": [0, 1], "layer": ["x", "x"], "channel": [0, 1]})
    assert CF.shortcut_detection(sel, prec)["detected"].tolist() == [True, False]


def test_distractor_precision_finds_a_colour_detector_on_the_planted_ball(tmp_path):
    """part-2c with a distractor in every image: the balls class's ball is red, large next to
    the little red balls on the head. A hand-set 5 x 5 'red' channel peaks on it; a 'green'
    channel (stem and leaves) never does. Only the red channel is detected as the shortcut."""
    from torch.utils.data import Subset
    from vxnb.data.an8flower import An8Flower

    ds = An8Flower(tmp_path, "part-2c", 64, knobs={"distractor_rate": 1.0}, progress=False)
    probe = Subset(ds, list(range(0, 2000, 40)))  # 25 items of each class
    conv = nn.Conv2d(3, 2, 5, padding=2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0], conv.weight[0, 1], conv.weight[0, 2] = 1 / 25, -1 / 25, -1 / 25  # R - G - B
        conv.weight[1, 0], conv.weight[1, 1], conv.weight[1, 2] = -1 / 25, 1 / 25, -1 / 25  # G - R - B
        conv.bias.copy_(torch.tensor([-0.2, -0.05]))
    model = nn.Sequential(conv, nn.ReLU())
    prec = CF.distractor_precision(model, probe, [("1", 0), ("1", 1)], k=10, progress=False)
    red, green = prec.set_index("channel")["precision"].loc[[0, 1]]
    assert red > 0.8 and green < 0.1, (red, green)
    sel = pd.DataFrame({"class": [0, 1], "layer": ["1", "1"], "channel": [0, 1]})
    assert CF.shortcut_detection(sel, prec)["detected"].tolist() == [True, False]
    with pytest.raises(ValueError, match="distractors"):
        CF.distractor_precision(model, An8Flower(tmp_path, "part-2c", 32, progress=False), [("1", 0)])


def _colour_model():
    """Two hand-set 5 x 5 channels: 'red' (R - G - B) and 'green' (G - R - B)."""
    conv = nn.Conv2d(3, 2, 5, padding=2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0], conv.weight[0, 1], conv.weight[0, 2] = 1 / 25, -1 / 25, -1 / 25
        conv.weight[1, 0], conv.weight[1, 1], conv.weight[1, 2] = -1 / 25, 1 / 25, -1 / 25
        conv.bias.copy_(torch.tensor([-0.2, -0.05]))
    return nn.Sequential(conv, nn.ReLU())


def test_find_shortcut_on_the_runs_probe(tmp_path):
    """part-2c, the probe of a run's test split with a distractor in every image (the balls
    class's ball is red). A hand-planted red detector selected for class 0 finds the shortcut;
    the green channel (stem and leaves), which cannot see a red ball, raises no false alarm --
    neither beside it nor as every class's only feature (a model blind to the distractor)."""
    from vxnb.studies.counterfactual import find_shortcut, shortcut_probe
    from vxnb.studies.runs import RunConfig

    cfg = RunConfig(variant="part-2c", size=64, train_limit=200, data_root=str(tmp_path))
    probe = shortcut_probe(cfg, progress=False)
    base = probe.dataset
    assert base.knobs.distractor_rate == 1.0 and base.index["distractor"].all()
    _, test_idx = base.fold_indices(cfg.test_fold, cfg.folds)
    assert set(probe.indices) <= set(test_idx.tolist()) and len(probe) == 50  # the run's test subset
    model = _colour_model()
    sel = pd.DataFrame({"class": [0, 1], "layer": ["1", "1"], "channel": [0, 1]})
    found = find_shortcut(model, sel, probe, top_n=10, progress=False)
    assert found["detected"].tolist() == [True, False] and found["best"].iloc[0] > 0.8
    blind = pd.DataFrame({"class": [0, 1], "layer": ["1", "1"], "channel": [1, 1]})
    alarms = find_shortcut(model, blind, probe, top_n=10, progress=False)
    assert not alarms["detected"].any() and (alarms["best"] < 0.1).all()
    with pytest.raises(ValueError, match="rate"):
        shortcut_probe(cfg, rate=0.0)
    with pytest.raises(ValueError, match="an8flower"):
        shortcut_probe(RunConfig(dataset="mnist", data_root=str(tmp_path)))
    with pytest.raises(TypeError, match="selected"):
        find_shortcut(model, sel.drop(columns="class"), probe)


@pytest.mark.slow
def test_shortcut_study_end_to_end(tmp_path, monkeypatch):
    """Tiny runs at rate 0 and 1: one row per class and rate, the summary's rates are the
    shares of classes detected, and the rate-1 model was trained on its own renders. The models
    of the runs without a stored table go to ``runs.train_models`` first (all of them, the first
    time; none once the tables are stored), with the study's ``train_workers``."""
    from vxnb.studies import runs
    from vxnb.studies.counterfactual import shortcut_study
    from vxnb.studies.runs import RunConfig

    calls = []
    real = runs.train_models

    def spy(configs, *, workers=None, progress=True):
        calls.append(([runs.run_dir(c).name for c in configs], workers))
        return real(configs, workers=workers, progress=progress)
    monkeypatch.setattr(runs, "train_models", spy)
    cfg = RunConfig(size=32, quick=True, train_limit=240, epochs=1, data_root=str(tmp_path / "data"),
                    runs_root=str(tmp_path / "runs"))
    table, summary = shortcut_study(cfg, rate=1.0, k=3, top_n=4, progress=False, train_workers=1)
    assert calls == [(["an8flower-single-6c-s32-f0-seed0-quick-e1-n240",
                       "an8flower-single-6c-s32-f0-dr1-seed0-quick-e1-n240"], 1)]
    assert all(runs.checkpoint_dir(dataclasses.replace(cfg, distractor_rate=r)).exists() for r in (0.0, 1.0))
    assert sorted(set(table["distractor_rate"])) == [0.0, 1.0]
    assert (table.groupby("distractor_rate").size() == 6).all()
    assert table["best"].between(0, 1).all() and table["probe_accuracy"].between(0, 1).all()
    summary = summary.set_index("role")
    for role, r in (("false alarm", 0.0), ("detection", 1.0)):
        assert summary.loc[role, "rate_found"] == pytest.approx(table[table["distractor_rate"] == r]["detected"].mean())
    names = sorted(p.parent.name for p in (tmp_path / "runs").rglob("shortcut-k3-mu10-p1.csv"))
    assert names == ["an8flower-single-6c-s32-f0-dr1-seed0-quick-e1-n240",
                     "an8flower-single-6c-s32-f0-seed0-quick-e1-n240"]
    again, _ = shortcut_study(cfg, rate=1.0, k=3, top_n=4, progress=False)
    assert calls[1] == ([], None)
    pd.testing.assert_frame_equal(again, table)
    with pytest.raises(ValueError, match="rate"):
        shortcut_study(cfg, rate=1.5)
    with pytest.raises(ValueError, match="train_workers"):
        shortcut_study(cfg, rate=1.0, train_workers=0)
    with pytest.raises(TypeError, match="top_k"):
        shortcut_study(cfg, rate=1.0, top_k=3)


def _misses(root, since: float) -> dict[str, set[str]]:
    """The store's misses (computed artifacts) of this process since ``since``: {kind: keys}."""
    import os

    from vxnb._store import read_events

    out: dict[str, set[str]] = {}
    for e in read_events(root):
        if e["pid"] == os.getpid() and e["t"] >= since and e["event"] == "miss":
            out.setdefault(e["kind"], set()).add(e["key"])
    return out


@pytest.mark.slow
def test_studies_reuse_table1s_fold_and_read_their_tables_back(tmp_path):
    """After Table 1's fold (``run_fold``), the counterfactual run, the shortcut run at rate 0
    and the leaderboard's rows on that fold train no model and extract no training features and
    solve no lasso path again (the same keys); a second call of each study computes nothing
    (its table is read back from the store, equal to the first), and ``recompute`` computes it."""
    import time

    from vxnb.studies import benchmark, leaderboard, runs
    from vxnb.studies.counterfactual import counterfactual_run, shortcut_run

    cfg = runs.RunConfig(size=32, quick=True, train_limit=240, epochs=1, folds="blocks",
                         data_root=str(tmp_path / "data"), runs_root=str(tmp_path / "runs"))
    fold = benchmark.fold_config(cfg, "single-6c", 0)
    benchmark.run_fold(fold, methods=("ours",), n_test_images=4, occlusion=False, progress=False)
    model, _ = runs.get_model(fold, progress=False)
    train_key = runs.get_features(fold, model, "train", progress=False).meta["store_key"]

    t0 = time.time()
    kw = dict(k=3, top_n=4, crp_per_class=4, n_random=1, progress=False)
    cf = counterfactual_run(fold, **kw)
    sc = shortcut_run(fold, k=3, top_n=4, progress=False)
    leaderboard.run_leaderboard(cfg, folds=(0,), n_images=4, sanity_images=2, methods=["ours"], progress=False)
    misses = _misses(cfg.runs_dir, t0)
    assert "checkpoint" not in misses and "lasso-path" not in misses, misses
    assert train_key not in misses.get("features", set())
    assert len(misses.get("features", ())) == 2  # the test split and its counterfactual twins only
    assert {"counterfactual-table", "shortcut-table", "benchmark-score"} <= set(misses)

    t1 = time.time()
    cf2 = counterfactual_run(fold, **kw)
    sc2 = shortcut_run(fold, k=3, top_n=4, progress=False)
    leaderboard.run_leaderboard(cfg, folds=(0,), n_images=4, sanity_images=2, methods=["ours"], progress=False)
    assert _misses(cfg.runs_dir, t1) == {}
    pd.testing.assert_frame_equal(cf2, cf, check_dtype=False)
    pd.testing.assert_frame_equal(sc2, sc, check_dtype=False)
    # another setting is another key; recompute computes the same table again
    t2 = time.time()
    assert len(counterfactual_run(fold, **{**kw, "k": 2})) < len(cf)
    pd.testing.assert_frame_equal(counterfactual_run(fold, recompute=True, **kw), cf, check_dtype=False)
    assert len(_misses(cfg.runs_dir, t2)["counterfactual-table"]) == 2
    with pytest.raises(ValueError, match="threshold"):
        shortcut_run(fold, threshold=0)
    with pytest.raises(ValueError, match="probe_rate"):
        shortcut_run(fold, probe_rate=2.0)
