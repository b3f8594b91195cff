import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vxnb.evaluate import ablation as ab
from vxnb.evaluate.ablation import ablation_curve, class_reconstruction
from vxnb.features import extract_features
from vxnb.lasso import mu_lasso_gram
from vxnb.relevance import relevant_features
from nets import gray_net

C = 4


def quadrant_data(n: int, seed: int) -> TensorDataset:
    """8x8 images, class = the bright quadrant, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = 0.3 * torch.rand(n, 1, 8, 8, generator=g)
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 0.6
    return TensorDataset(x.clamp(0, 1), y)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    net = gray_net(C)
    train = quadrant_data(160, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    x, y = train.tensors
    for _ in range(80):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval(), train, quadrant_data(80, 2)


def l1_ball(v: np.ndarray, mu: float) -> np.ndarray:
    """Euclidean projection of v onto {‖w‖₁ ≤ mu} (Duchi et al. 2008)."""
    if np.abs(v).sum() <= mu:
        return v
    u = np.sort(np.abs(v))[::-1]
    css = np.cumsum(u)
    k = np.nonzero(u * np.arange(1, len(u) + 1) > css - mu)[0][-1]
    theta = (css[k] - mu) / (k + 1)
    return np.sign(v) * np.maximum(np.abs(v) - theta, 0)


def pg_mu_lasso(G: np.ndarray, XtL: np.ndarray, mu: float, iters: int = 1000) -> np.ndarray:
    """Stand-in μ-lasso: FISTA with projection onto the L1 ball, from G and XtL."""
    step = 1.0 / max(np.linalg.eigvalsh(G).max(), 1e-12)
    W = np.zeros_like(XtL)
    Z, t = W.copy(), 1.0
    for _ in range(iters):
        grad = G @ Z - XtL
        W_new = np.stack([l1_ball(col, mu) for col in (Z - step * grad).T], axis=1)
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        Z = W_new + (t - 1) / t_new * (W_new - W)
        W, t = W_new, t_new
    return W


def plain_mca(net, data) -> float:
    x, y = data.tensors
    with torch.no_grad():
        pred = net(x).argmax(1)
    return float(np.mean([(pred[y == j] == j).float().mean().item() for j in range(C)]))


def test_ablation_curve_intact_at_zero_and_random_control(trained):
    net, train, test = trained
    intact = plain_mca(net, test)
    assert intact > 0.8  # the tiny model did learn
    f = extract_features(net, train, progress=False)
    rel_all = relevant_features(mu_lasso_gram(f.G, f.XtL, 1.0, progress=False), f.columns)
    fc = f.select(kind="conv")
    rel_conv = relevant_features(mu_lasso_gram(fc.G, fc.XtL, 1.0, progress=False), fc.columns)
    assert len(rel_all) > 0 and len(rel_conv) > 0
    net.train()
    curve = ablation_curve(net, test, rel_all, rel_conv, counts=[0, 1, 2, 3, 100], n_random=5, batch_size=32,
                           progress=False)
    assert net.training  # mode restored
    assert all(not m._forward_hooks for m in net.modules())
    assert list(curve.columns) == ["method", "n_ablated", "mca", "mca_std", "n_draws"]
    assert curve["method"].unique().tolist() == ["intact", "All", "OnlyConv", "Random"]
    at0 = curve[curve["n_ablated"] == 0].set_index("method")["mca"]
    for method in ("intact", "All", "OnlyConv", "Random"):
        assert at0[method] == pytest.approx(intact, abs=1e-12)
    assert (curve.loc[curve["method"] == "intact", "mca"] == intact).all()
    rnd = curve[curve["method"] == "Random"]
    assert (rnd["n_draws"] == 5).all() and (rnd["mca_std"].dropna() >= 0).all()
    assert rnd.loc[rnd["n_ablated"] == 0, "mca_std"].item() == 0
    n_all = rel_all[["layer", "channel"]].drop_duplicates().shape[0]
    assert curve.loc[curve["method"] == "All", "n_ablated"].max() <= n_all  # a curve stops at its set's size
    assert 100 not in curve.loc[curve["method"] == "All", "n_ablated"].tolist() or n_all >= 100


def test_ablating_every_channel_of_a_layer_gives_chance(trained):
    net, _, test = trained
    everything = [("relu1", c) for c in range(4)]
    curve = ablation_curve(net, DataLoader(test, batch_size=16, shuffle=True), everything, counts=[0, 4],
                           n_random=2, progress=False)
    full = curve[curve["n_ablated"] == 4].set_index("method")
    # relu1 all zero: a constant input downstream, one predicted class: mCA = 1/C exactly
    assert full.loc["All", "mca"] == pytest.approx(1 / C)
    assert full.loc["Random", "mca"] == pytest.approx(1 / C) and full.loc["Random", "mca_std"] == 0
    assert "OnlyConv" not in curve["method"].tolist()


def test_random_draws_match_layers_of_all_and_are_nested():
    ranked = [("a", 3), ("b", 0), ("a", 1), ("c", 2), ("a", 0)]
    widths = {"a": 10, "b": 5, "c": 7}
    seen = []

    def config(pairs):
        seen.append(pairs)
        return len(seen) - 1

    plan = ab._random_plan(ranked, [0, 1, 3, 5, 9], widths, n_random=3, seed=7, config=config)
    assert [(m, n) for m, n, _ in plan] == [("Random", n) for _ in range(3) for n in (0, 1, 3, 5)]
    for d in range(3):
        sets = [seen[plan[d * 4 + i][2]] for i in range(4)]
        for n, pairs in zip((0, 1, 3, 5), sets):
            want = {}
            for l, _ in ranked[:n]:
                want[l] = want.get(l, 0) + 1
            got = {}
            for l, c in pairs:
                got[l] = got.get(l, 0) + 1
                assert 0 <= c < widths[l]
            assert got == want and len(set(pairs)) == len(pairs)
        for small, big in zip(sets, sets[1:]):
            assert set(small) <= set(big)
    draws = [tuple(seen[plan[d * 4 + 3][2]]) for d in range(3)]
    assert len(set(draws)) > 1  # the draws differ


def brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y], s[~y]
    wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_class_reconstruction_with_stand_in_solver(trained):
    net, train, test = trained
    ftr = extract_features(net, train, progress=False)
    fte = extract_features(net, test, keep_X=True, progress=False)
    mus = (0.05, 0.5, 5.0)
    res = class_reconstruction(ftr, fte, mus, solver=pg_mu_lasso, progress=False)
    assert list(res.columns) == ["mu", "mean_auc", "std_auc", "n_classes", "n_features", "n_weights"]
    assert res["mu"].tolist() == list(mus) and (res["n_classes"] == C).all()
    assert res["mean_auc"].iloc[-1] > 0.9
    assert res["n_features"].iloc[0] <= res["n_features"].iloc[-1]
    W = pg_mu_lasso(ftr.G, ftr.XtL, 0.5)
    S = fte.X.astype(np.float64) @ W
    ref = np.mean([brute_auc(fte.labels == j, S[:, j]) for j in range(C)])
    assert res["mean_auc"].iloc[1] == pytest.approx(ref, abs=1e-9)
    long = class_reconstruction(ftr, fte, mus, solver=pg_mu_lasso, per_class=True, progress=False)
    assert len(long) == len(mus) * C
    assert long.groupby("mu")["auc"].mean().to_numpy() == pytest.approx(res["mean_auc"].to_numpy())


def test_class_reconstruction_checks(trained):
    net, train, test = trained
    ftr = extract_features(net, train, progress=False)
    fte = extract_features(net, test, keep_X=False, progress=False)
    with pytest.raises(ValueError, match="keep_X=True"):
        class_reconstruction(ftr, fte, solver=pg_mu_lasso)
    fte = extract_features(net, test, layers=["relu1"], keep_X=True, progress=False)
    with pytest.raises(ValueError, match="columns"):
        class_reconstruction(ftr, fte, solver=pg_mu_lasso)
    with pytest.raises(TypeError, match="train_features"):
        class_reconstruction(ftr.G, fte)


def test_class_reconstruction_default_solver_matches_stand_in(trained):
    net, train, test = trained
    ftr = extract_features(net, train, progress=False)
    fte = extract_features(net, test, keep_X=True, progress=False)
    mus = (0.1, 1.0)
    ours = class_reconstruction(ftr, fte, mus, progress=False)
    ref = class_reconstruction(ftr, fte, mus, solver=pg_mu_lasso, progress=False)
    np.testing.assert_allclose(ours["mean_auc"], ref["mean_auc"], atol=2e-3)


def test_random_union_draws_from_all_channels_of_the_sets_layers():
    widths = {"a": 4, "b": 3, "c": 5}
    seen = []

    def config(pairs):
        seen.append(pairs)
        return len(seen) - 1

    plan = ab._random_union_plan(["a", "c"], [0, 2, 5, 9], widths, n_random=400, seed=3, config=config)
    assert [(m, n) for m, n, _ in plan[:4]] == [("Random (union)", n) for n in (0, 2, 5, 9)]
    pool = {(l, c) for l in ("a", "c") for c in range(widths[l])}
    firsts = {}
    for d in range(400):
        sets = [seen[plan[d * 4 + i][2]] for i in range(4)]
        assert [len(s) for s in sets] == [0, 2, 5, 9]
        for small, big in zip(sets, sets[1:]):
            assert set(small) <= set(big) and set(big) <= pool  # nested, only the sets' layers
        firsts[sets[1][0]] = firsts.get(sets[1][0], 0) + 1
    # uniform over the 9 channels of the pool (not per layer): each first pick ~ 400/9 = 44
    assert set(firsts) == pool and max(firsts.values()) < 80


def test_ablation_curve_both_random_controls(trained):
    net, train, test = trained
    f = extract_features(net, train, progress=False)
    rel_all = relevant_features(mu_lasso_gram(f.G, f.XtL, 1.0, progress=False), f.columns)
    curve = ablation_curve(net, test, rel_all, counts=[0, 1, 2], n_random=3, random=("matched", "union"),
                           progress=False)
    assert curve["method"].unique().tolist() == ["intact", "All", "Random", "Random (union)"]
    union = curve[curve["method"] == "Random (union)"]
    assert (union["n_draws"] == 3).all() and union["n_ablated"].tolist() == [0, 1, 2]
    assert union.loc[union["n_ablated"] == 0, "mca"].item() == curve.loc[curve["method"] == "intact", "mca"].iloc[0]
    with pytest.raises(ValueError, match="random: expected one or both of 'matched', 'union', got str 'all'"):
        ablation_curve(net, test, rel_all, random="all", progress=False)


def _counting(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prefix_gives_the_same_curves_with_fewer_early_passes(trained, seed):
    net, _, test = trained
    widths = {"conv1": 4, "conv2": 6, "fc3": 8}
    ranked = [(l, c) for l in widths for c in range(widths[l])]
    ranked = [ranked[i] for i in np.random.default_rng(seed).permutation(len(ranked))]
    conv = [p for p in ranked if p[0] != "fc3"]
    curves = {}
    for shared in (False, True):
        calls = _counting(net.conv1), _counting(net.fc4)
        curves[shared] = ablation_curve(net, test, ranked, conv, counts=list(range(0, 19, 2)), n_random=4, seed=seed,
                                        random=("matched", "union"), batch_size=64, shared_prefix=shared,
                                        progress=False)
        net._forward_hooks.clear()
        if shared:  # every configuration reaches the classifier once, conv1 runs once per distinct ablation of it
            assert calls[1][0] == plain_calls[1] and calls[0][0] < plain_calls[0] / 2
        else:
            plain_calls = calls[0][0], calls[1][0]
    pd.testing.assert_frame_equal(curves[True], curves[False], check_exact=True)
    assert curves[True]["mca"].nunique() > 5  # the curves move: the comparison is not between constants


def test_shared_prefix_logits_equal_one_pass_per_configuration():
    # the logits of every configuration, recorded by the classifier's hook, to the bit
    torch.manual_seed(3)
    net = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()), nn.MaxPool2d(2),
                        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()), nn.Flatten(),
                        nn.Linear(6 * 16, 5)).eval()
    x = torch.rand(20, 1, 8, 8)
    data = TensorDataset(x, torch.arange(20) % 5)
    pairs = [("0.0", 1), ("2.0", 3), ("0.0", 2), ("4", 0), ("2.0", 0), ("0.0", 3)]
    logits = {}
    for shared in (False, True):
        seen = []
        handle = net[4].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        ablation_curve(net, data, pairs, counts=[0, 1, 2, 3, 4, 5, 6], n_random=2, random="union", shared_prefix=shared,
                       progress=False)
        handle.remove()
        logits[shared] = sorted(seen, key=lambda t: t.numpy().tobytes())  # the same multiset of tensors
    assert len(logits[True]) == len(logits[False]) > 10
    for a, b in zip(logits[True], logits[False]):
        assert torch.equal(a, b)
    with torch.no_grad():  # the intact configuration is among them
        ref = net(x)
    assert any(torch.equal(ref, t) for t in logits[True])


def test_shared_prefix_needs_a_plain_sequential(trained):
    net, _, test = trained

    class Scaled(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    odd = Scaled(*net.children()).eval()
    pairs = [("0", 1), ("3", 2)]
    auto = ablation_curve(odd, test, pairs, counts=[0, 1, 2], n_random=2, progress=False)
    plain = ablation_curve(odd, test, pairs, counts=[0, 1, 2], n_random=2, shared_prefix=False, progress=False)
    pd.testing.assert_frame_equal(auto, plain, check_exact=True)
    with pytest.raises(ValueError, match=r"shared_prefix: True needs a plain nn.Sequential \(its own forward\)"):
        ablation_curve(odd, test, pairs, shared_prefix=True, progress=False)
    conv = nn.Conv2d(4, 4, 1)
    twice = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), conv, nn.ReLU(), conv, nn.Flatten(), nn.Linear(256, C)).eval()
    with pytest.raises(ValueError, match=r"each ablated module inside one child of the model; \['1'\]"):
        ablation_curve(twice, test, [("1", 0)], shared_prefix=True, progress=False)
    with pytest.raises(ValueError, match="shared_prefix: expected True, False or 'auto', got int 1"):
        ablation_curve(net, test, pairs, shared_prefix=1, progress=False)
