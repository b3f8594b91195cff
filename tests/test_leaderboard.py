"""The an8Flower leaderboard (issue 27, item 2): built-in peers, the table, the offline page."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from vxnb.studies import benchmark as B
from vxnb.studies import leaderboard as L
from vxnb.studies import runs


def _linear():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 5, 3)), torch.rand(2, 3, 4, 5)


def test_peers_equal_hand_computed_maps():
    model, x = _linear()
    t = torch.tensor([0, 2])
    w = model[1].weight.detach().view(3, 3, 4, 5)[t]
    # saliency: |d logit / d x| summed over channels; for a linear model |w|
    assert torch.allclose(L.saliency(model, x, t), w.abs().sum(1))
    # integrated gradients from 0 of a linear model: x * w exactly
    assert torch.allclose(L.integrated_gradients(model, x, t), (x * w).abs().sum(1), atol=1e-6)
    # guided backprop without ReLUs is the gradient
    assert torch.allclose(L.guided_backprop(model, x, t), w.abs().sum(1))
    # LRP EpsilonPlusFlat: the first (here only) layer takes the flat rule, so the unit relevance of
    # the target spreads evenly over the 3·4·5 inputs: 3 channels · 1/60 per pixel
    assert torch.allclose(L.lrp(model, x, t), torch.full((2, 4, 5), 1 / 20))
    with pytest.raises(ValueError, match="relevant: crp_ours draws our selected features"):
        L.crp_ours(model, x, t)
    with pytest.raises(ValueError, match="method: expected one of"):
        L.registry_method("lime")


def test_table_sorts_by_iou_area_with_the_t_interval():
    scores = pd.DataFrame({
        "method": ["a"] * 3 + ["b"] * 3 + ["c"],
        "fold": [0, 1, 2] * 2 + [0],
        "iou_area": [10.0, 12.0, 14.0, 20.0, 21.0, 25.0, 30.0],
        "pointing_game": [0.5] * 7, "n_images": [4] * 7, "n_failed": [0, 1, 0, 0, 0, 0, 2]})
    table = L.leaderboard_table(scores)
    assert list(table["method"]) == ["c", "b", "a"]
    a = table.set_index("method").loc["a"]
    half = stats.t.ppf(0.975, 2) * np.std([10, 12, 14], ddof=1) / np.sqrt(3)
    assert a["iou_area"] == pytest.approx(12.0) and a["ci_low"] == pytest.approx(12 - half)
    assert a["ci_high"] == pytest.approx(12 + half) and a["n_folds"] == 3 and a["n_failed"] == 1
    assert np.isnan(table.set_index("method").loc["c", "ci_low"])  # one fold: no interval
    with pytest.raises(ValueError, match="scores: expected score_callable's table"):
        L.leaderboard_table(pd.DataFrame({"x": [1]}))


def test_page_is_offline_and_in_table_order(tmp_path):
    scores = pd.DataFrame({"method": ["low", "low", "high", "high"], "fold": [0, 1, 0, 1],
                           "iou_area": [5.0, 6.0, 30.0, 31.0], "n_images": 4, "n_failed": [0, 3, 0, 0]})
    page = L.write_leaderboard(L.leaderboard_table(scores), tmp_path / "r" / "benchmark.html").read_text()
    assert "<script" not in page and "http" not in page and "<svg" in page
    assert page.index(">high<") < page.index(">low<") and "3 failed" in page
    assert not list((tmp_path / "r").glob("*.tmp*"))
    with pytest.raises(ValueError, match="table: expected leaderboard_table's frame"):
        L.write_leaderboard(scores, tmp_path / "x.html")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return runs.RunConfig(size=32, epochs=1, train_limit=48, data_root=str(tmp_path_factory.mktemp("lb_data")),
                          runs_root=str(tmp_path_factory.mktemp("lb_runs")))


@pytest.mark.slow
def test_leaderboard_scores_registry_peers_and_callables(cfg):
    def mine(model, inputs, targets):
        return np.asarray(inputs).mean(1)

    scores = L.run_leaderboard(cfg, folds=(0,), n_images=4, sanity_images=2, progress=False,
                               methods=["gradcam", "ours", "crp_ours"], extra={"mine": mine})
    assert list(scores["method"]) == ["gradcam", "ours", "crp_ours", "mine"]
    assert (scores["n_failed"] == 0).all() and np.isfinite(scores["iou_area"]).all()
    assert list(scores["label"][:3]) == ["Grad-CAM", "Ours", L.EXTRA_METHODS["crp_ours"][0]]
    # "ours" through score_callable equals the benchmark's own fold (the same images, model and features)
    fold = B.run_fold(B.fold_config(B.dataclasses.replace(cfg, folds="blocks"), "single-6c", 0),
                      methods=("ours",), n_test_images=4, occlusion=False, k=5, progress=False)
    assert scores.set_index("method").loc["ours", "iou_area"] == pytest.approx(fold["auc"]["ours[weighted]"])
    # the callables' tables are collected from the benchmark's run folder
    found = L.collect_scores(cfg)
    assert set(found["method"]) == {"gradcam", "ours", "crp_ours", "mine"}
    # the page: the built-in rows scored now and every other scored method, best first
    board = L.leaderboard_page(cfg, folds=(0,), n_images=4, methods=["gradcam"], progress=False,
                               path=cfg.runs_dir / "page" / "benchmark.html")
    assert set(board["method"]) == {"gradcam", "ours", "crp_ours", "mine"}
    assert list(board["iou_area"]) == sorted(board["iou_area"], reverse=True)
    assert "Grad-CAM" in board.attrs["file"].read_text()
    with pytest.raises(ValueError, match="methods: expected names among"):
        L.run_leaderboard(cfg, methods=["lime"])


def test_crp_ours_draws_features_of_several_layers_one_condition_each():
    """Our top-k features of one image from two layers: each drawn as its own zennit-crp
    conditional heatmap (one call per feature here, the reference), normalised to max 1 and
    combined by the response-weighted sum; zennit-crp crosses conditions naming different
    layers in one call, which used to fail every such image."""
    from crp.attribution import CondAttribution
    from torch.utils.data import TensorDataset
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    from vxnb.explanations import feature_heatmaps
    from vxnb.features import extract_features
    from vxnb.relevance import Relevance

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    for n, m in [("conv1", torch.nn.Conv2d(3, 4, 3, padding=1)), ("relu1", torch.nn.ReLU()),
                 ("conv2", torch.nn.Conv2d(4, 4, 3, padding=1)), ("relu2", torch.nn.ReLU()),
                 ("flat", torch.nn.Flatten()), ("fc", torch.nn.Linear(4 * 6 * 6, 3))]:
        model.add_module(n, m)
    model.eval()
    x = torch.rand(2, 3, 6, 6)
    feats = extract_features(model, TensorDataset(torch.rand(6, 3, 6, 6), torch.tensor([0, 1, 2] * 2)),
                             layers=["relu1", "relu2"], n_classes=3, progress=False)
    W = np.zeros((len(feats.columns), 3))
    cols = feats.columns.reset_index(drop=True)
    for layer, ch in (("relu1", 0), ("relu1", 1), ("relu2", 2), ("relu2", 3)):
        W[int(np.flatnonzero((cols["layer"] == layer) & (cols["channel"] == ch))[0]), 0] = 1.0
    rel = Relevance(W=W, columns=feats.columns)
    t = torch.tensor([0, 0])
    got = L.crp_ours(model, x, t, relevant=rel, k=4)

    _, _, chosen = feature_heatmaps(model, rel, x, 4, t, draw="upsampled")
    assert chosen.groupby("image")["layer"].nunique().min() == 2  # the case that failed
    attribution = CondAttribution(model, no_param_grad=True)
    composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
    want = torch.zeros(2, 6, 6)
    for b, group in chosen.groupby("image"):
        acc, wsum = torch.zeros(6, 6), 0.0
        for row in group.itertuples():
            res = attribution(x[b:b + 1].clone().requires_grad_(True),
                              [{row.layer: [int(row.channel)], "y": [0]}], composite)
            m = res.heatmap[0].detach().clamp_min(0)
            acc += max(row.response, 0) * m / m.max().clamp_min(1e-12)
            wsum += max(row.response, 0)
        want[int(b)] = acc / max(wsum, 1e-12)
    assert torch.allclose(got, want, atol=1e-5)
    assert (got > 0).any()
