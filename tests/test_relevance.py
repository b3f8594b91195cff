import numpy as np
import pandas as pd
import pytest
import torch

from vxnb.relevance import (Ablator, ablate, feature_counts, feature_pairs, rank_features, relevant_features,
                            responses, top_features)
from nets import flat_net


def columns() -> pd.DataFrame:
    # 6 features: relu1 (conv, 3 channels), relu2 (conv, 1), relu3 (fc, 2)
    return pd.DataFrame({
        "feature": np.arange(6),
        "layer": ["relu1", "relu1", "relu1", "relu2", "relu3", "relu3"],
        "layer_number": [1, 1, 1, 2, 3, 3],
        "kind": ["conv", "conv", "conv", "conv", "fc", "fc"],
        "channel": [0, 1, 2, 0, 0, 1],
    })


# W (m=6, C=3): class 0 uses f1 (.5), f4 (.2), f0 (-.1); class 1 uses f1 (.3), f5 (.9);
# class 2 uses nothing above tol except f3 (1e-9, dropped with tol=1e-6)
W = np.array([
    [-0.1, 0.0, 0.0],
    [0.5, 0.3, 0.0],
    [0.0, 0.0, 0.0],
    [0.0, 0.0, 1e-9],
    [0.2, 0.0, 0.0],
    [0.0, 0.9, 0.0],
])


def test_relevant_features_sorting_and_metadata():
    rel = relevant_features(W, columns(), classes=["a", "b", "c"], tol=1e-6)
    assert list(rel.columns) == ["class", "class_name", "feature", "layer", "layer_number", "kind", "channel", "weight"]
    assert rel["class"].tolist() == [0, 0, 0, 1, 1]
    assert rel["feature"].tolist() == [1, 4, 0, 5, 1]  # by weight, descending, within class
    assert rel["weight"].tolist() == [0.5, 0.2, -0.1, 0.9, 0.3]
    assert rel["class_name"].tolist() == ["a", "a", "a", "b", "b"]
    assert rel.loc[1, "layer"] == "relu3" and rel.loc[1, "channel"] == 0 and rel.loc[1, "kind"] == "fc"
    with_tiny = relevant_features(torch.tensor(W), columns())  # tol = 0 keeps 1e-9; torch accepted
    assert len(with_tiny) == 6 and with_tiny["class_name"].iloc[-1] == "2"


def test_feature_counts_union_over_classes():
    counts = feature_counts(relevant_features(W, columns(), tol=1e-6))
    assert counts.distinct == 4  # f0, f1, f4, f5 (f1 shared by two classes)
    assert counts.total == 5
    assert counts.by_class["n"].tolist() == [3, 2]
    assert counts.by_class["n_conv"].tolist() == [2, 1] and counts.by_class["n_fc"].tolist() == [1, 1]
    bl = counts.by_layer.set_index("layer")
    assert bl.loc["relu1", "distinct"] == 2 and bl.loc["relu1", "total"] == 3
    assert bl.loc["relu3", "distinct"] == 2 and bl.loc["relu3", "total"] == 2
    assert counts.by_layer["layer"].tolist() == ["relu1", "relu3"]
    bk = counts.by_kind.set_index("kind")
    assert bk.loc["conv", "distinct"] == 2 and bk.loc["fc", "distinct"] == 2 and bk.loc["other", "distinct"] == 0


def test_rank_features():
    rel = relevant_features(W, columns(), tol=1e-6)
    by_max = rank_features(rel, "max")
    assert list(zip(by_max["layer"], by_max["channel"])) == [("relu3", 1), ("relu1", 1), ("relu3", 0), ("relu1", 0)]
    by_sum = rank_features(rel, "sum")
    assert by_sum.loc[0, "layer"] == "relu3" and by_sum.loc[1, "score"] == pytest.approx(0.8)
    assert by_max["n_classes"].tolist() == [1, 2, 1, 1]


def test_responses_and_top_features():
    x = np.array([0.2, 0.4, 0.9, 0.5, 0.5, 0.1])
    r = responses(W, x, 0)
    np.testing.assert_allclose(r, W[:, 0] * x)
    xb = torch.tensor(np.stack([x, x[::-1].copy()]), dtype=torch.float32)
    rb = responses(W, xb, torch.tensor([0, 1]))
    assert isinstance(rb, torch.Tensor) and rb.dtype == torch.float32
    np.testing.assert_allclose(rb.numpy(), np.stack([W[:, 0] * x, W[:, 1] * x[::-1]]), rtol=1e-6)
    top = top_features(W, x, 0, columns(), k=5)
    # class 0: f1 .5*.4 = .2, f4 .2*.5 = .1, f0 -.02 (negative: left out)
    assert top["feature"].tolist() == [1, 4] and top["rank"].tolist() == [0, 1]
    np.testing.assert_allclose(top["response"], [0.2, 0.1])
    assert top.loc[0, "layer"] == "relu1" and top.loc[0, "x"] == 0.4
    topb = top_features(W, xb, [0, 1], columns(), k=1)
    # image 1, class 1, x reversed: f1 .3*.5 = .15 < f5 .9*.2 = .18
    assert topb["image"].tolist() == [0, 1] and topb["feature"].tolist() == [1, 5]
    np.testing.assert_allclose(topb["response"], [0.2, 0.18], rtol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="6 rows"):
        relevant_features(W, columns().iloc[:5])
    with pytest.raises(ValueError, match="shape"):
        relevant_features(W[:, 0], columns())
    with pytest.raises(ValueError, match="NaN"):
        relevant_features(np.full((6, 2), np.nan), columns())
    with pytest.raises(ValueError, match="classes"):
        relevant_features(W, columns(), classes=["a"])
    with pytest.raises(ValueError, match="x: expected shape"):
        responses(W, np.zeros(5), 0)
    with pytest.raises(ValueError, match="out of range"):
        responses(W, np.zeros(6), 3)
    with pytest.raises(ValueError, match="channel"):
        feature_pairs([("relu1", -1)])


# ---------------------------------------------------------------------------- ablation hooks


def capture(model, x, names):
    got = {}
    hs = [dict(model.named_modules())[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.clone()))
          for n in names]
    try:
        out = model(x)
    finally:
        for h in hs:
            h.remove()
    return out, got


def test_ablate_zeroes_exactly_the_chosen_channels_and_restores():
    model, x = flat_net(), torch.rand(5, 1, 5, 5) + 0.1
    with torch.no_grad():
        before, acts = capture(model, x, ["relu1", "relu2"])
        with ablate(model, [("relu1", 2), ("relu2", 0), ("relu2", 4)]):
            during, acts_ab = capture(model, x, ["conv1", "relu1"])
            # the hook on relu1 feeds fc2 the ablated map: recompute fc2 input by hand
            ref_relu1 = acts["relu1"].clone()
            ref_relu1[:, 2] = 0
            h = torch.relu(model.fc2(ref_relu1.flatten(1)))
            h[:, [0, 4]] = 0
            torch.testing.assert_close(during, model.fc3(h))
        after = model(x)
    assert (acts["relu1"][:, 2] != 0).any()
    assert (acts_ab["relu1"][:, 2] == 0).all()
    keep = [0, 1, 3]
    torch.testing.assert_close(acts_ab["relu1"][:, keep], acts["relu1"][:, keep])
    assert not torch.equal(during, before)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all(not m._forward_hooks for m in model.modules())


def test_ablate_removes_hooks_on_error_and_checks_inputs():
    model = flat_net()
    with pytest.raises(RuntimeError, match="inside"):
        with ablate(model, {"relu1": [0, 1]}):
            raise RuntimeError("inside")
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="no module"):
        with ablate(model, [("nope", 0)]):
            pass
    with pytest.raises(ValueError, match="4 channels"):
        with ablate(model, [("relu1", 4)]), torch.no_grad():
            model(torch.rand(1, 1, 5, 5))
    assert all(not m._forward_hooks for m in model.modules())
    df = pd.DataFrame({"layer": ["relu2"], "channel": [1]})
    with torch.no_grad(), Ablator(model, layers=["relu1", "relu2"]) as ab:
        ab.set(df)
        _, got = capture(model, torch.rand(2, 1, 5, 5), ["relu2"])
        assert (got["relu2"][:, 1] == 0).all()
        ab.set([])
        out1 = model(torch.ones(1, 1, 5, 5))
    torch.testing.assert_close(out1, model(torch.ones(1, 1, 5, 5)).detach())
