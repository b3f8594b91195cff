"""Tests of the five-fold an8Flower benchmark (``vxnb.studies.benchmark``).

The fold loop runs on a tiny configuration (an8Flower at 32 px, 48 training images, one epoch,
two folds, six test images): it must produce Table 1 with every method and finite numbers,
write its CSV files, and resume after an interruption — finished folds read back, not
recomputed, the interrupted fold recomputed.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from vxnb.data import an8flower as A
from vxnb.studies import runs
from vxnb.studies import benchmark as B
from vxnb.studies import table1 as T
from vxnb.evaluate.iou import iou_auc


# ----------------------------------------------------------------------------- fast checks
def test_unknown_method_lists_methods():
    with pytest.raises(ValueError, match="method: expected one of 'ours_upsampled', 'ours_deconv'.*'deconv_gb', got str 'lime'"):
        B.method_heatmaps("lime", torch.nn.Identity(), torch.rand(1, 3, 32, 32), [0])
    with pytest.raises(ValueError, match="methods: expected one of"):
        B.run_benchmark(runs.RunConfig(size=32), methods=("ours", "lime"), save=False)


def test_unknown_variant_and_fold_out_of_range():
    cfg = runs.RunConfig(size=32)
    with pytest.raises(ValueError, match="variants: expected one of 'single-6c', 'double-12c', 'part-2c'"):
        B.run_benchmark(cfg, variants="single-7c", save=False)
    with pytest.raises(ValueError, match=r"folds: expected an int in 0\.\.4 .* got int 5"):
        B.run_benchmark(cfg, folds=(0, 5), save=False)
    with pytest.raises(ValueError, match=r"folds\['single-6c'\]: expected an int in 0\.\.4"):
        B.run_benchmark(cfg, folds={"single-6c": (-1,)}, save=False)
    with pytest.raises(ValueError, match="folds: has entries for variants not run"):
        B.run_benchmark(cfg, variants="single-6c", folds={"part-2c": (0,)}, save=False)
    with pytest.raises(ValueError, match="folds: folds must be unique"):
        B.run_benchmark(cfg, folds=(1, 1), save=False)
    with pytest.raises(ValueError, match=r"fold: expected an int in 0\.\.4"):
        B.fold_config(cfg, "single-6c", 7)
    with pytest.raises(ValueError, match="variant: expected one of"):
        B.fold_config(cfg, "double", 0)
    with pytest.raises(ValueError, match="dataset='an8flower'"):
        B.run_benchmark(runs.RunConfig(dataset="mnist"), save=False)
    with pytest.raises(TypeError, match="config: expected a vxnb.studies.runs.RunConfig"):
        B.run_benchmark({"size": 32}, save=False)


def test_other_bad_options():
    cfg = runs.RunConfig(size=32)
    with pytest.raises(ValueError, match="mu: expected a positive number"):
        B.run_benchmark(cfg, mu=0, save=False)
    with pytest.raises(ValueError, match="k: expected a positive int"):
        B.run_benchmark(cfg, k=0, save=False)
    with pytest.raises(ValueError, match="n_test_images: expected a positive int or None"):
        B.run_benchmark(cfg, n_test_images=-3, save=False)
    with pytest.raises(ValueError, match="relevant: method 'ours' needs the relevant features"):
        B.method_heatmaps("ours", torch.nn.Identity(), torch.rand(2, 3, 32, 32), [0, 1])
    with pytest.raises(ValueError, match="relevant: method 'ours_upsampled' needs the relevant features"):
        B.method_heatmaps("ours_upsampled", torch.nn.Identity(), torch.rand(2, 3, 32, 32), [0, 1])
    with pytest.raises(ValueError, match="combine: expected one of 'weighted', 'max', got str 'mean'"):
        B.run_benchmark(cfg, combine="mean", save=False)
    with pytest.raises(ValueError, match="judge: expected one of fast, quantus, got 'sklearn'"):
        B.run_benchmark(cfg, judge="sklearn", save=False)
    with pytest.raises(ValueError, match="combine: expected one of 'weighted', 'max'"):
        B.method_heatmaps("ours", torch.nn.Identity(), torch.rand(2, 3, 32, 32), [0, 1], combine="sum")
    with pytest.raises(ValueError, match=r"targets: expected \(2,\) integer classes"):
        B.method_heatmaps("deconv_gb", torch.nn.Identity(), torch.rand(2, 3, 32, 32), [0.5, 1.0])


def test_block_folds_config():
    cfg = runs.RunConfig(size=32, folds="blocks")
    assert B.fold_config(cfg, "part-2c", 3).run_name.startswith("an8flower-part-2c-s32-f3-blocks-")
    assert "blocks" not in B.fold_config(runs.RunConfig(size=32), "part-2c", 3).run_name
    assert B.benchmark_config(cfg).name == "benchmark-an8flower-s32-seed0-blocks"
    with pytest.raises(ValueError, match="folds: expected one of 'views', 'blocks', got 'view'"):
        runs.RunConfig(folds="view")


def test_stratified_indices():
    labels = np.repeat(np.arange(4), [10, 10, 10, 3])
    idx = B.stratified_indices(labels, 10, seed=1)
    counts = np.bincount(labels[idx], minlength=4)
    assert len(idx) == len(set(idx.tolist())) and np.all(np.diff(idx) > 0)
    assert sorted(counts.tolist()) == [2, 2, 3, 3]  # 10 over 4 classes: 3, 3, 2, 2 (class 3 has 3)
    assert np.array_equal(idx, B.stratified_indices(labels, 10, seed=1))  # seeded
    assert np.array_equal(B.stratified_indices(labels, None), np.arange(33))
    assert np.array_equal(B.stratified_indices(labels, 100), np.arange(33))
    small = B.stratified_indices(labels, 20, seed=0)  # class 3 gives all it has (3 of its 5)
    assert np.bincount(labels[small], minlength=4)[3] == 3


def test_paper_table_and_comparison():
    paper = T.paper_table()
    # the paper's numbers stand beside the methods that compute its rows: our top-k features
    # drawn three ways, and the Grad-CAM family; the class-level extras get none
    assert set(paper["method"]) == set(T.METHODS) - {"activation", "deconv_gb"}
    assert set(paper["variant"]) == {"single-6c", "double-12c"}
    assert T.PAPER_TABLE1["single-6c"]["ours_upsampled"][0] == 16.8 and T.PAPER_TABLE1["double-12c"]["ours_deconv"][0] == 21.9
    # comparing the paper with itself: its own ranks and gaps (ours 22.5 - Deconv+GB 21.3 = 1.2)
    comp = T.compare_with_paper(paper)
    assert np.array_equal(comp["rank"].to_numpy(), comp["paper_rank"].to_numpy())
    row = comp[(comp["variant"] == "single-6c") & (comp["method"] == "ours")].iloc[0]
    assert row["rank"] == 1 and row["gap_to_deconv_gb"] == pytest.approx(1.2)
    dbl = comp[comp["variant"] == "double-12c"].sort_values("rank")
    assert list(dbl["method"][:3]) == ["ours", "ours_deconv", "guided_gradcampp"]
    table = T.format_table(paper)
    assert list(table.index) == [T.METHOD_LABELS[m] for m in T.METHODS if m not in ("activation", "deconv_gb")]
    assert list(table.index[:2]) == ["Upsam. Act.", "Deconv+GB"]
    assert list(table.columns) == ["single-6c", "double-12c"]
    assert table.loc["Ours", "single-6c"] == "22.5 ± 0.82"
    with pytest.raises(ValueError, match="summary: expected a DataFrame"):
        T.compare_with_paper(pd.DataFrame({"a": [1]}))


# ----------------------------------------------------------------------------- the fold loop
TINY = dict(n_test_images=6, occlusion_images=4, k=2, progress=False)
N_ROWS = len(T.METHODS) + len(T.OURS_METHODS)  # our three methods once per combination (weighted, max)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench_data"))


def _tiny(data_root, runs_root) -> runs.RunConfig:
    return runs.RunConfig(size=32, epochs=1, train_limit=48, data_root=data_root, runs_root=str(runs_root))


@pytest.fixture(scope="module")
def tiny_config(data_root, tmp_path_factory):
    return _tiny(data_root, tmp_path_factory.mktemp("bench_runs"))


@pytest.mark.slow
def test_fold_loop_table_csv_and_auc(tiny_config):
    res = B.run_benchmark(tiny_config, variants="single-6c", folds=(0, 1), quantus_images=4, **TINY)
    pf = res.per_fold
    assert len(pf) == 2 * N_ROWS and set(pf["method"]) == set(T.METHODS)
    assert set(pf.loc[pf["method"].isin(T.OURS_METHODS), "combine"]) == {"weighted", "max"}
    assert np.isfinite(pf["auc"]).all() and ((pf["auc"] >= 0) & (pf["auc"] <= 100)).all()
    assert (pf["n_images"] == 6).all() and not pf["cached"].any()
    table = res.table()
    assert len(table) == N_ROWS and list(table.columns) == ["single-6c"]
    assert list(table.index[:3]) == ["Upsam. Act. (weighted)", "Upsam. Act. (max)", "Deconv+GB (weighted)"]
    summ = res.summary()
    assert (summ["n_folds"] == 2).all() and np.isfinite(summ[["mean", "std"]].to_numpy()).all()
    curves = res.mean_curves()
    assert len(curves) == N_ROWS * 101 and np.isfinite(curves["iou"]).all()
    # the area of the mean curve is the mean of the folds' areas (trapezoid is linear)
    for (m, cb), c in curves.groupby(["method", "combine"]):
        area = 100 * np.trapezoid(c["iou"].to_numpy(), c["threshold"].to_numpy())
        assert area == pytest.approx(summ.set_index(["method", "combine"]).loc[(m, cb), "mean"], abs=1e-9)
    # the per-image areas average to the fold's area
    per = res.per_image.groupby(["fold", "method", "combine"])["auc"].mean()
    for _, r in pf.iterrows():
        assert per.loc[(r["fold"], r["method"], r["combine"])] == pytest.approx(r["auc"], abs=1e-9)
    # the resampling effect: ours - ours_deconv per fold, mean over folds
    eff = res.resampling_effect().set_index("combine")
    w = pf[pf["combine"] == "max"].pivot(index="fold", columns="method", values="auc")
    assert eff.loc["max", "mean_diff"] == pytest.approx((w["ours"] - w["ours_deconv"]).mean())
    assert eff.loc["max", "n_images"] == 12 and 0 <= eff.loc["max", "p_area"] <= 1
    assert 0 <= eff.loc["weighted", "grid_ours"] <= 1 and 0 <= eff.loc["weighted", "grid_deconv"] <= 1
    # Quantus: one row per fold and result row on 4 of the 6 images, scores in [0, 1], refusals counted
    q = res.quantus_summary()
    assert len(q) == N_ROWS and (q["n_scored"] + q["n_refused"] == 8).all()
    assert ((q["pointing_game"].dropna() >= 0) & (q["pointing_game"].dropna() <= 1)).all()
    # FC features cannot be drawn as upsampled activation maps: counted per fold
    up = pf[pf["method"] == "ours_upsampled"]
    assert (up["n_left_out"] <= up["n_top"]).all() and (up["n_top"] <= 6 * 2).all()
    occ = res.occlusion_curves()
    assert set(occ["method"]) == set(T.METHODS) and np.isfinite(occ["confidence"]).all()
    assert len(res.occlusion_differences()) == len(T.METHODS) - 1
    # CSV files in the benchmark's run folder, readable and equal to the frames
    assert {"per_fold", "table1", "curves", "timings", "occlusion", "quantus", "resampling"} <= set(res.files)
    back = pd.read_csv(res.files["table1"])
    np.testing.assert_allclose(back["mean"], summ["mean"])
    assert res.files["table1"].parent.name == "benchmark-an8flower-s32-seed0"
    # each fold's result sits in its own run folder
    for fold in (0, 1):
        folder = runs.run_dir(B.fold_config(tiny_config, "single-6c", fold))
        assert (runs.checkpoint_dir(B.fold_config(tiny_config, "single-6c", fold)) / "model.pt").exists()
        assert len(list(folder.glob("benchmark-*.json"))) == 1
    # independent check of one number: Deconv+GB of fold 0 recomputed by hand with iou_auc
    cfg0 = B.fold_config(tiny_config, "single-6c", 0)
    images, labels, masks, _ = B.fold_data(cfg0, 6, progress=False)
    model, _ = runs.get_model(cfg0, progress=False)
    preds = model.eval()(images).argmax(1)
    from vxnb.baselines import attribution
    h = attribution("deconv_gb", model, images, preds)
    want = iou_auc(h, masks)
    got = pf[(pf["fold"] == 0) & (pf["method"] == "deconv_gb")]["auc"].item()
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.slow
def test_resume_after_interruption(data_root, tmp_path, monkeypatch):
    tiny_config = _tiny(data_root, tmp_path)  # fresh run folders: only this test's results in them
    methods = ("deconv_gb", "gradcam", "ours")
    opts = dict(TINY, methods=methods, occlusion=False)
    calls = {"heat": 0}
    real_heatmaps = B.method_heatmaps

    def failing(method, *a, **kw):  # the 4th call = the 2nd method of fold 1 (ours is drawn separately)
        calls["heat"] += 1
        if calls["heat"] == 4:
            raise RuntimeError("simulated interruption")
        return real_heatmaps(method, *a, **kw)

    monkeypatch.setattr(B, "method_heatmaps", failing)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        B.run_benchmark(tiny_config, folds=(0, 1, 2), **opts)
    folders = [runs.run_dir(B.fold_config(tiny_config, "single-6c", f)) for f in (0, 1, 2)]
    files = [list(f.glob("benchmark-*.json")) for f in folders]
    assert [len(f) for f in files] == [1, 0, 0]  # fold 0 finished; fold 1 interrupted; fold 2 not started
    # fold 1 got as far as its checkpoint
    assert (runs.checkpoint_dir(B.fold_config(tiny_config, "single-6c", 1)) / "model.pt").exists()
    first = json.loads(files[0][0].read_text())
    assert first["settings"]["methods"] == list(methods)
    done0 = files[0][0].read_bytes()

    # resume: fold 0 is read back, folds 1 (interrupted) and 2 (never started) are computed
    monkeypatch.setattr(B, "method_heatmaps", real_heatmaps)
    evaluated = []
    real_evaluate = B.evaluate_fold

    def counting(cfg, **kw):
        evaluated.append(cfg.test_fold)
        return real_evaluate(cfg, **kw)

    monkeypatch.setattr(B, "evaluate_fold", counting)
    res = B.run_benchmark(tiny_config, folds=(0, 1, 2), **opts)
    assert evaluated == [1, 2]
    cached = res.per_fold.groupby("fold")["cached"].first()
    assert cached.to_dict() == {0: True, 1: False, 2: False}
    f0 = res.per_fold[res.per_fold["fold"] == 0]
    got0 = {T.row_name(m, c): a for m, c, a in zip(f0["method"], f0["combine"], f0["auc"])}
    assert got0 == pytest.approx(first["auc"])
    assert files[0][0].read_bytes() == done0  # not rewritten

    # a third run computes nothing; recompute=True recomputes all
    evaluated.clear()
    again = B.run_benchmark(tiny_config, folds=(0, 1, 2), save=False, **opts)
    assert evaluated == [] and again.per_fold["cached"].all()
    pd.testing.assert_frame_equal(again.summary(), res.summary())
    # a damaged result file is recomputed, never trusted
    (damaged,) = folders[2].glob("benchmark-*.json")
    damaged.write_text("{ not json")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        B.run_benchmark(tiny_config, folds=(0, 1, 2), save=False, **opts)
    assert evaluated == [2]


@pytest.mark.slow
def test_explain_examples(tiny_config):
    ex = B.explain_examples(tiny_config, "single-6c", 0, n=3, methods=("deconv_gb", "ours"), k=2)
    assert ex["images"].shape == (3, 3, 32, 32) and ex["masks"].shape == (3, 32, 32)
    assert set(ex["heatmaps"]) == {"deconv_gb", "ours"}
    assert all(h.shape == (3, 32, 32) and torch.isfinite(h).all() for h in ex["heatmaps"].values())
    with pytest.raises(ValueError, match="positions: expected indices in"):
        B.explain_examples(tiny_config, "single-6c", 0, positions=[10_000], methods=("deconv_gb",))
    from vxnb import plots
    fig = plots.benchmark_examples(ex, T.METHOD_LABELS)
    assert len(fig.data) == 3 * 4


def test_part_reliance_by_hand():
    # a "model" that reads the mean red of the top-left quarter: class 1 when it is bright
    class Quarter(torch.nn.Module):
        def forward(self, x):
            v = x[:, 0, :4, :4].mean(dim=(1, 2))
            return torch.stack([0.5 - v, v - 0.5], 1)

    images = torch.zeros(4, 3, 8, 8)
    images[:2, 0, :4, :4] = 1.0                       # class 1: a red top-left quarter
    labels = torch.tensor([1, 1, 0, 0])
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[:, :4, :4] = True                           # the part is that quarter: right reason
    frame = B.part_reliance(Quarter(), images, labels, masks).set_index("condition")
    rel = frame["accuracy"]
    # removed: the quarter takes the image's mean red (1/4): class 0 everywhere -> 2 of 4 right
    assert rel.to_dict() == {"as is": 1.0, "part removed": 0.5, "only the part": 1.0}
    # per class: class 0 (no red quarter) is recognised by the absence of class 1's part
    assert frame["accuracy[1]"].to_dict() == {"as is": 1.0, "part removed": 0.0, "only the part": 1.0}
    assert frame["accuracy[0]"].to_dict() == {"as is": 1.0, "part removed": 1.0, "only the part": 1.0}
    masks[:] = False
    masks[:, 4:, 4:] = True                           # a mask elsewhere: removing it changes nothing
    rel = B.part_reliance(Quarter(), images, labels, masks).set_index("condition")["accuracy"]
    assert rel["part removed"] == 1.0 and rel["only the part"] == 0.5
    with pytest.raises(ValueError, match="masks: expected shape"):
        B.part_reliance(Quarter(), images, labels, masks[:2])


@pytest.mark.slow
def test_fold_diagnosis(tiny_config):
    d = B.fold_diagnosis(tiny_config, "single-6c", 0, k=2, n_test_images=6)
    top = d["top"]
    assert set(top.columns) >= {"class", "class_name", "layer", "channel", "n", "in_mask", "mask_share"}
    assert set(top["class_name"]) <= set(A.variant_classes("single-6c"))
    assert top["n"].sum() <= 6 * 2 and ((top["in_mask"] >= 0) & (top["in_mask"] <= 1)).all()
    assert list(d["reliance"]["condition"]) == ["as is", "part removed", "only the part"]
    assert d["reliance"]["accuracy"].iloc[0] == pytest.approx(d["accuracy"])
    assert 0 <= d["auc"]["ours"] <= 100 and d["n_relevant"] == int((d["relevant"]["weight"] != 0).sum())


def test_tables_with_paper_puts_paper_numbers_beside_their_methods():
    def result(offset):
        rows = [{"variant": "single-6c", "fold": f, "method": m, "combine": c, "auc": 10.0 + offset + f}
                for f in (0, 1) for m in T.METHODS for c in (("weighted", "max") if m in T.OURS_METHODS else ("",))]
        empty = pd.DataFrame()
        return T.BenchmarkResult(per_fold=pd.DataFrame(rows), curves=empty, occlusion=empty, timings=empty)

    t = T.tables_with_paper({"views": result(0), "blocks": result(5)})
    assert list(t.columns) == [("single-6c", "views"), ("single-6c", "blocks"), ("single-6c", "paper")]
    assert t.loc["Ours (max)", ("single-6c", "paper")] == "22.5 ± 0.82"
    assert t.loc["Upsam. Act. (weighted)", ("single-6c", "paper")] == "16.8 ± 2.63"
    assert t.loc["Deconv+GB (max)", ("single-6c", "paper")] == "21.3 ± 0.77"
    assert t.loc["GB from logit (class)", ("single-6c", "paper")] == "—"  # class-level: no paper number
    assert t.loc["Ours (weighted)", ("single-6c", "views")] == "10.5 ± 0.71"
    assert t.loc["Ours (weighted)", ("single-6c", "blocks")] == "15.5 ± 0.71"
    with pytest.raises(TypeError, match="results: expected a non-empty"):
        T.tables_with_paper({})


# ---------------------------------------------------------------------------- refusals and NaN folds (issue 24)
def _result_with_a_nan_fold():
    per_fold = pd.DataFrame({"variant": "single-6c", "fold": [0, 1, 2], "method": "gradcam", "combine": "",
                             "label": "Grad-CAM", "auc": [40.0, np.nan, 50.0]})
    q = {"pointing_game": float("nan"), "relevance_mass": 0.4, "n_images": 4, "n_scored": 4,
         "n_refused": 0, "refused_by_quantus": {"pointing_game": 4},
         "errors": {"pointing_game": "The s_batch must have the same shape"}}
    q_ok = {"pointing_game": 0.5, "relevance_mass": 0.2, "n_images": 4, "n_scored": 4, "n_refused": 0,
            "refused_by_quantus": {}}
    base = {"variant": "single-6c", "method": "gradcam", "combine": "", "label": "Grad-CAM"}
    quantus = pd.DataFrame([{**base, "fold": 0, **B.quantus_row(q)}, {**base, "fold": 1, **B.quantus_row(q_ok)}])
    return T.BenchmarkResult(per_fold=per_fold, curves=pd.DataFrame(), occlusion=pd.DataFrame(),
                             timings=pd.DataFrame(), quantus=quantus)


def test_a_nan_fold_is_not_left_out_of_the_mean():
    summ = _result_with_a_nan_fold().summary().iloc[0]
    assert np.isnan(summ["mean"]) and summ["n_folds"] == 3 and summ["n_nan"] == 1


def test_quantus_refusals_and_errors_reach_the_summary():
    row = B.quantus_row({"pointing_game": float("nan"), "n_scored": 4, "refused_by_quantus": {"pointing_game": 4},
                         "errors": {"pointing_game": "bad shape"}})
    assert row["refused_pointing_game"] == 4 and row["errors"] == "pointing_game: bad shape"
    q = _result_with_a_nan_fold().quantus_summary().iloc[0]
    assert np.isnan(q["pointing_game"])                       # fold 0's refusal is not averaged away
    assert q["relevance_mass"] == pytest.approx(0.3)
    assert q["refused_pointing_game"] == 4 and "The s_batch must have the same shape" in q["errors"]
