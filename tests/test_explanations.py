"""vxnb.explanations: top-k by response, heatmaps, the combined map, batches, bad input."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vxnb import explanations as E
from vxnb.deconv import grid_score, heatmap, signed_rgb, visualize
from vxnb.features import default_layers, feature_columns
from vxnb.lasso import lasso_path
from vxnb.relevance import relevant_features

from deconv_reference import reference_visualize
from nets import tiny_strided_net

torch.set_num_threads(1)
N_CLASSES = 3
IMAGES = dict(n=5, channels=3, size=16)  # the shared images fixture (conftest.py)


@pytest.fixture(scope="module")
def model():
    return tiny_strided_net(N_CLASSES)


@pytest.fixture(scope="module")
def columns(model):
    return feature_columns(model, default_layers(model), [6, 8, 10])


@pytest.fixture(scope="module")
def rel(columns):
    """Class 0: features in all three layers; class 1: two conv features; class 2: none."""
    W = np.zeros((len(columns), N_CLASSES))
    W[[0, 2, 4, 7, 9, 12, 15, 16, 20, 23], 0] = [0.3, 0.9, 0.2, 0.5, 1.1, 0.4, 0.7, 0.6, 0.8, 0.25]
    W[[1, 10], 1] = [1.0, 2.0]
    W[3, 1] = -0.5  # a negative weight never gives a positive response (x >= 0)
    return E.Relevance(W, columns, ["a", "b", "c"], mu=3.0)


def _x_by_hand(model, image, layers):
    """Independent descriptor: L2 norm per channel (|a| for FC), L1-normalised per layer."""
    outs = {}
    hooks = [dict(model.named_modules())[n].register_forward_hook(
        lambda mod, i, o, n=n: outs.__setitem__(n, o.detach())) for n in layers]
    with torch.no_grad():
        model(image[None])
    for h in hooks:
        h.remove()
    parts = []
    for n in layers:
        a = outs[n][0].double()
        v = a.flatten(1).norm(dim=1) if a.dim() == 3 else a.abs()
        parts.append(v / v.sum() if v.sum() > 0 else v)
    return torch.cat(parts).numpy()


def test_top_k_is_argmax_of_response_by_hand(model, images, rel, columns):
    for b in range(len(images)):
        e = E.explain(model, rel, images[b], k=4, target=0)
        x = _x_by_hand(model, images[b], ["relu1", "relu2", "relu3"])
        r = rel.W[:, 0] * x
        order = [i for i in np.argsort(-r, kind="stable") if r[i] > 0][:4]
        assert e.features["feature"].tolist() == order
        np.testing.assert_allclose(e.features["response"], r[order], rtol=1e-5)
        np.testing.assert_allclose(e.features["x"], x[order], rtol=1e-5)
        assert e.features["layer"].tolist() == columns["layer"].iloc[order].tolist()
        assert (np.diff(e.features["response"]) <= 0).all()
        assert e.features["rank"].tolist() == list(range(len(order)))


def test_combined_is_the_documented_weighted_sum(model, images, rel):
    e = E.explain(model, rel, images[0], k=5, target=0, combine="weighted")
    assert e.k >= 3 and e.heatmaps.shape == (e.k, 16, 16) and e.rgb.shape == (e.k, 3, 16, 16)
    c = torch.zeros(16, 16, dtype=torch.float64)
    for i, f in e.features.iterrows():
        h = heatmap(visualize(model, images[:1], f["layer"], [int(f["channel"])]))[0, 0]
        torch.testing.assert_close(e.heatmaps[i], h, atol=1e-5, rtol=1e-5)
        c += f["response"] * h.double()
    c = (c - c.min()) / (c.max() - c.min())
    torch.testing.assert_close(e.combined.double(), c, atol=1e-5, rtol=1e-5)
    assert float(e.combined.min()) == 0.0 and float(e.combined.max()) == pytest.approx(1.0)
    # the default is the pixel-wise maximum (what Table 1's numbers support)
    m = E.explain(model, rel, images[0], k=5, target=0).combined
    mx = e.heatmaps.amax(0)
    torch.testing.assert_close(m, (mx - mx.min()) / (mx.max() - mx.min()), atol=1e-6, rtol=1e-6)
    # resample=False gives the plain DeconvNet maps
    ep = E.explain(model, rel, images[0], k=5, target=0, resample=False)
    f = e.features.iloc[0]
    h = heatmap(visualize(model, images[:1], f["layer"], [int(f["channel"])], resample=False))[0, 0]
    torch.testing.assert_close(ep.heatmaps[0], h, atol=1e-5, rtol=1e-5)


def test_predicted_and_target_override(model, images, rel):
    with torch.no_grad():
        logits = model(images[:1])
    e = E.explain(model, rel, images[0], k=3)
    assert e.predicted == int(logits.argmax()) and e.target == e.predicted
    np.testing.assert_allclose(e.probabilities, torch.softmax(logits[0].double(), 0).numpy(), rtol=1e-6)
    e1 = E.explain(model, rel, images[0], k=3, target=1)
    assert e1.predicted == e.predicted and e1.target == 1 and e1.target_name == "b"
    assert set(e1.features["feature"]) <= {1, 10}  # class 1's positive-weight features only
    e0 = E.explain(model, rel, images[0], k=3, target=0)
    assert e0.features["feature"].tolist() != e1.features["feature"].tolist()
    # (1, C, H, W) works the same as (C, H, W)
    e1b = E.explain(model, rel, images[:1], k=3, target=torch.tensor(1))
    torch.testing.assert_close(e1b.combined, e1.combined)


def test_class_without_features(model, images, rel):
    e = E.explain(model, rel, images[0], k=5, target=2)
    assert e.k == 0 and e.heatmaps.shape == (0, 16, 16) and e.rgb.shape == (0, 3, 16, 16)
    assert torch.count_nonzero(e.combined) == 0 and e.combined.shape == (16, 16)
    assert "no relevant feature" in e.message and "'c'" in e.message
    # explain_batch gives an all-zero map for it too
    H = E.explain_batch(model, rel, images[:2], k=5, targets=2)
    assert torch.count_nonzero(H) == 0
    # a relevance with no feature at all
    empty = E.Relevance(np.zeros_like(rel.W), rel.columns)
    assert E.explain(model, empty, images[0]).k == 0


def test_explain_batch_matches_explain(model, images, rel):
    targets = [0, 1, 0, 2, 0]
    H = E.explain_batch(model, rel, images, k=4, targets=targets, batch_size=3)
    assert H.shape == (5, 16, 16)
    for b, t in enumerate(targets):
        e = E.explain(model, rel, images[b], k=4, target=t)
        torch.testing.assert_close(H[b], e.combined, atol=1e-5, rtol=1e-5)
    # predicted classes by default; an explain function for vxnb.evaluate
    Hp = E.explain_batch(model, rel, images, k=2)
    pred = model(images).argmax(1)
    fn = E.make_explain_fn(rel, k=2)
    torch.testing.assert_close(fn(model, images, pred), Hp)


def test_relevance_builders(model, images, rel, columns):
    # from the DataFrame of relevant_features: the same explanation
    frame = relevant_features(rel.W, columns, rel.classes)
    e1 = E.explain(model, frame, images[1], k=4, target=0)
    e2 = E.explain(model, rel, images[1], k=4, target=0)
    assert e1.features["feature"].tolist() == e2.features["feature"].tolist()
    torch.testing.assert_close(e1.combined, e2.combined)
    rf = E.Relevance.from_frame(frame, classes=rel.classes)
    assert rf.n_classes == 3 and rf.m == int((rel.W != 0).any(1).sum())
    assert rf.layers == rel.layers == ["relu1", "relu2", "relu3"]
    # from a lasso path and the Features it was fitted on
    rng = np.random.default_rng(0)
    X = rng.random((40, len(columns)))
    y = rng.integers(0, 3, 40)
    L = np.eye(3)[y]
    path = lasso_path(X.T @ X, X.T @ L, mu_max=2.0)
    feats = SimpleNamespace(columns=columns, class_names=["a", "b", "c"])
    rp = E.Relevance.from_path(path, feats, 1.0)
    np.testing.assert_array_equal(rp.W, path.coef(1.0))
    assert rp.mu == 1.0 and rp.classes == ["a", "b", "c"]
    assert E.Relevance.from_path(path, feats, 1.0, classes=["x", "y", "z"]).classes == ["x", "y", "z"]
    with pytest.raises(ValueError, match="features"):
        E.Relevance.from_path(path, SimpleNamespace(columns=columns.iloc[:-1]), 1.0)
    assert rp.counts()["n"].sum() == int((rp.W != 0).sum())


def test_bad_inputs(model, images, rel, columns):
    with pytest.raises(ValueError, match="target"):
        E.explain(model, rel, images[0], target=3)
    with pytest.raises(ValueError, match="target"):
        E.explain(model, rel, images[0], target=-1)
    with pytest.raises(TypeError, match="target"):
        E.explain(model, rel, images[0], target=1.0)
    with pytest.raises(ValueError, match="image"):
        E.explain(model, rel, images[:2])
    with pytest.raises(ValueError, match="image"):
        E.explain(model, rel, images[0, 0])
    with pytest.raises(ValueError, match="channel"):
        E.explain(model, rel, torch.rand(1, 16, 16))
    with pytest.raises(TypeError, match="floating"):
        E.explain(model, rel, (images[0] * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="image"):
        E.explain(model, rel, images[0].numpy())
    with pytest.raises(ValueError, match="k"):
        E.explain(model, rel, images[0], k=0)
    with pytest.raises(TypeError, match="relevant"):
        E.explain(model, rel.W, images[0])
    with pytest.raises(ValueError, match="classes"):
        E.explain(model, E.Relevance(np.ones((len(columns), 4)), columns), images[0])
    bad_cols = columns.assign(channel=columns["channel"] + 20)
    with pytest.raises(ValueError, match="channels in this model"):
        E.explain(model, E.Relevance(rel.W, bad_cols), images[0], target=0)
    with pytest.raises(ValueError, match="targets"):
        E.explain_batch(model, rel, images, targets=[0, 1])
    with pytest.raises(ValueError, match="targets"):
        E.explain_batch(model, rel, images, targets=5)
    with pytest.raises(TypeError, match="images"):
        E.explain_batch(model, rel, images.double().numpy())
    with pytest.raises(ValueError, match="columns"):
        E.Relevance(rel.W[:-1], columns)
    with pytest.raises(ValueError, match="classes"):
        E.Relevance(rel.W, columns, ["a"])


def test_total_stride_and_comparison(model, images, rel):
    assert E.total_stride(model, images, "relu1") == 2
    assert E.total_stride(model, images, "conv2") == 4
    assert E.total_stride(model, images, "relu3") == 4
    feats = E.comparison_features(model, rel, images[0], target=0)
    assert feats["column"].tolist() == ["low", "high", "FC"]
    assert feats["layer"].tolist() == ["relu1", "relu2", "relu3"]
    assert feats["kind"].tolist() == ["conv", "conv", "fc"]
    # class 0 has relevant features in every layer: the one with the largest response is picked
    e = E.explain(model, rel, images[0], k=100, target=0)
    for _, f in feats.iterrows():
        rows = e.features[e.features["layer"] == f["layer"]]
        assert len(rows), f["layer"]
        assert f["source"] == "relevant" and f["channel"] == rows["channel"].iloc[0]
    cmp = E.compare_methods(model, images[0], feats)
    assert cmp.methods == E.COMPARISON_METHODS
    assert cmp.maps["upsampled activation"][2] is None  # FC: not applicable
    assert np.isnan(cmp.scores.query("method == 'upsampled activation' and column == 'FC'")["grid_score"]).all()
    f = feats.iloc[0]
    h = heatmap(visualize(model, images[:1], f["layer"], [int(f["channel"])], resample=False))[0, 0]
    torch.testing.assert_close(cmp.maps["Deconv+GB"][0], h)
    s = cmp.scores.query("method == 'Deconv+GB' and column == 'low'")["grid_score"].item()
    assert s == pytest.approx(float(grid_score(h, 2)), rel=1e-6)
    for m in E.COMPARISON_METHODS:
        for h in cmp.maps[m]:
            assert h is None or (h.shape == (16, 16) and 0 <= float(h.min()) and float(h.max()) <= 1)


# ----------------------------------------------------------------------------- Table 1's rows, combine
def _minmax_np(a: np.ndarray) -> np.ndarray:
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def _combine_by_hand(maps: list, responses: list, combine: str, shape) -> np.ndarray:
    """Explicit loops over the pixels: Σ r_i h_i, or the max over the maps with r_i > 0."""
    out = np.zeros(shape)
    for y in range(shape[0]):
        for x in range(shape[1]):
            vals = [float(h[y, x]) for h, r in zip(maps, responses) if r > 0]
            if combine == "weighted":
                out[y, x] = sum(float(h[y, x]) * r for h, r in zip(maps, responses))
            else:
                out[y, x] = max(vals) if vals else 0.0
    return _minmax_np(out)


def test_combine_max_and_weighted_by_hand():
    h = torch.tensor([[[0.0, 1.0], [0.5, 0.2]],
                      [[1.0, 0.0], [0.0, 0.0]],     # response 0: left out of both
                      [[0.3, 0.4], [1.0, 0.0]]])
    r = torch.tensor([0.5, 0.0, 2.0])
    # max: [[0.3, 1.0], [1.0, 0.2]] -> min 0.2, span 0.8
    want_max = torch.tensor([[0.125, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(E.combine_heatmaps(h, r, "max"), want_max)
    # weighted: 0.5 h0 + 2 h2 = [[0.6, 1.3], [2.25, 0.1]] -> min 0.1, span 2.15
    want_w = (torch.tensor([[0.6, 1.3], [2.25, 0.1]]) - 0.1) / 2.15
    torch.testing.assert_close(E.combine_heatmaps(h, r, "weighted"), want_w)
    torch.testing.assert_close(E.combine_heatmaps(h, r), want_max)  # the default
    assert (E.combine_heatmaps(h, torch.zeros(3), "max") == 0).all()  # nothing responds: zeros
    with pytest.raises(ValueError, match="combine: expected one of 'weighted', 'max', got str 'mean'"):
        E.combine_heatmaps(h, r, "mean")


def test_bad_draw_and_combine_name_the_choices(model, images, rel):
    with pytest.raises(ValueError, match="draw: expected one of 'resampled', 'deconv', 'upsampled'"):
        E.feature_heatmaps(model, rel, images, draw="bilinear")
    with pytest.raises(ValueError, match="combine: expected one of 'weighted', 'max'"):
        E.explain_batch(model, rel, images, combine="sum")
    with pytest.raises(ValueError, match="combine: expected one of 'weighted', 'max'"):
        E.explain(model, rel, images[0], combine=None)


@pytest.mark.parametrize("combine", ["weighted", "max"])
def test_ours_deconv_and_ours_are_the_same_top_k_drawn_by_visualize(model, images, rel, combine):
    from vxnb.studies import benchmark as B

    targets = torch.tensor([0, 0, 1, 0, 1])
    for method, resample in (("ours_deconv", False), ("ours", True)):
        got = B.method_heatmaps(method, model, images, targets, relevant=rel, k=4, combine=combine)
        batch = E.explain_batch(model, rel, images, k=4, targets=targets, resample=resample, combine=combine)
        torch.testing.assert_close(got, batch.float())
        for b in range(len(images)):
            e = E.explain(model, rel, images[b], k=4, target=int(targets[b]), resample=resample)
            maps = [heatmap(visualize(model, images[b:b + 1], l, [int(c)], resample=resample))[0, 0].numpy()
                    for l, c in zip(e.features["layer"], e.features["channel"])]
            want = _combine_by_hand(maps, e.features["response"].tolist(), combine, (16, 16))
            np.testing.assert_allclose(got[b].numpy(), want, atol=1e-5)


def test_ours_upsampled_is_bilinear_upsampling_of_the_same_channels(model, images, rel):
    from vxnb.studies import benchmark as B

    acts = {}
    hooks = [dict(model.named_modules())[n].register_forward_hook(
        lambda mod, i, o, n=n: acts.__setitem__(n, o.detach())) for n in ("relu1", "relu2", "relu3")]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    got = B.method_heatmaps("ours_upsampled", model, images, 0, relevant=rel, k=4)
    hk, r, feats = E.feature_heatmaps(model, rel, images, k=4, targets=0, draw="upsampled")
    assert (feats["drawn"] == (feats["kind"] != "fc")).all()  # FC features: left out, counted
    n_fc = int((feats["kind"] == "fc").sum())
    assert n_fc > 0 and int((~feats["drawn"]).sum()) == n_fc
    for b in range(len(images)):
        e = E.explain(model, rel, images[b], k=4, target=0)
        fb = feats[feats["image"] == b]
        assert fb["channel"].tolist() == e.features["channel"].tolist()  # the same top-k as ours
        maps, resp = [], []
        for l, c, rr in zip(e.features["layer"], e.features["channel"], e.features["response"]):
            a = acts[l][b]
            if a.dim() != 3:  # an FC feature has no activation map
                maps.append(np.zeros((16, 16)))
                resp.append(0.0)
                continue
            up = torch.nn.functional.interpolate(a[int(c)].clamp_min(0)[None, None], size=(16, 16),
                                                 mode="bilinear", align_corners=False)[0, 0].numpy()
            maps.append(_minmax_np(up))
            resp.append(float(rr))
        want = _combine_by_hand(maps, resp, E.DEFAULT_COMBINE, (16, 16))  # method_heatmaps' default
        np.testing.assert_allclose(got[b].numpy(), want, atol=1e-5)


def _token_models():
    """A tiny ViT (tokens (B, T, D), one class token) and a tiny Swin (channels-last (B, H, W, C)),
    each with the layers a run describes by default and a hand-written grid of each layer's output."""
    import torchvision
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=3).eval()
    torch.manual_seed(0)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
                           num_classes=3).eval()
    on_grid = {"vit": lambda a: a[:, 1:].reshape(a.shape[0], 4, 4, a.shape[2]).permute(0, 3, 1, 2),
               "swin": lambda a: a.permute(0, 3, 1, 2)}
    return {"vit": (vit, ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"], on_grid["vit"]),
            "swin": (swin, ["features.1.0", "features.3.0"], on_grid["swin"])}


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_upsampled_activation_of_a_token_layer_is_drawn_on_its_grid(arch):
    """Table 1's Upsam. Act. on a transformer: each feature's map is its channel of the layer's
    patch tokens put on their grid by hand (ViT: class token dropped, 4 x 4 patches; Swin:
    (B, H, W, C) permuted), ReLU'd, upsampled bilinearly and min-max normalised. (They were
    left undrawn, all-zero maps, before.)"""
    model, layers, on_grid = _token_models()[arch]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    acts = {}
    hooks = [dict(model.named_modules())[n].register_forward_hook(
        lambda mod, i, o, n=n: acts.__setitem__(n, o.detach())) for n in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    widths = [int(on_grid(acts[n]).shape[1]) for n in layers]
    columns = feature_columns(model, layers, widths)
    W = np.zeros((len(columns), 3))
    W[[1, 5, widths[0] + 2, widths[0] + 7], :] = [[0.4, 0.3, 0.2], [1.0, 0.5, 0.1], [0.7, 0.9, 0.3], [0.2, 0.6, 0.8]]
    rel = E.Relevance(W, columns, ["a", "b", "c"], mu=3.0)
    hk, r, feats = E.feature_heatmaps(model, rel, x, k=3, targets=0, draw="upsampled")
    assert feats["drawn"].all() and len(feats) == 6
    n_maps = 0
    for i, f in feats.iterrows():
        a = on_grid(acts[f["layer"]])[int(f["image"]), int(f["channel"])].clamp_min(0)
        up = torch.nn.functional.interpolate(a[None, None], size=(32, 32), mode="bilinear",
                                             align_corners=False)[0, 0].numpy()
        want = _minmax_np(np.maximum(up, 0))
        n_maps += int(want.max() == 1)  # a channel negative everywhere (signed tokens) has a zero map
        np.testing.assert_allclose(hk[int(f["image"]), int(f["rank"])].numpy(), want, atol=1e-5)
        assert float(r[int(f["image"]), int(f["rank"])]) == pytest.approx(float(f["response"]))
    assert n_maps >= 3


# ============================================================================ issue 16's fast path
def _reference_maps(model, image, features, resample):
    """The visualisations of ``features`` (layer, channel) of one image by the test oracle
    (tests/deconv_reference.py: plain autograd, one forward and backward per channel)."""
    v = [reference_visualize(model, image[None], layer, [int(c)], resample=resample)[0, 0]
         for layer, c in zip(features["layer"], features["channel"])]
    return torch.stack(v) if v else torch.zeros((0,) + tuple(image.shape))


def _explain_both(model, rel, image, combine="max", **kw):
    """explain() and the same explanation assembled from the oracle's maps: the prediction of
    a plain forward, the maps of the explained features, their combination."""
    fast = E.explain(model, rel, image, combine=combine, **kw)
    with torch.no_grad():
        logits = model.eval()(image[None])[0]
    v = _reference_maps(model, image, fast.features, kw.get("resample", True))
    h = heatmap(v) if len(v) else torch.zeros((0,) + tuple(image.shape[-2:]))
    r = torch.tensor(fast.features["response"].to_numpy(), dtype=h.dtype)
    ref = SimpleNamespace(predicted=int(logits.argmax()), target=fast.target,
                          probabilities=torch.softmax(logits.double(), 0).numpy(), heatmaps=h,
                          rgb=signed_rgb(v) if len(v) else torch.zeros((0, 3) + tuple(image.shape[-2:])),
                          combined=E.combine_heatmaps(h, r, combine) if len(v) else torch.zeros(image.shape[-2:]))
    return fast, ref


def _assert_same_explanation(fast, ref):
    assert fast.predicted == ref.predicted and fast.target == ref.target
    np.testing.assert_allclose(fast.probabilities, ref.probabilities, rtol=1e-6, atol=1e-9)
    for a, b in [(fast.heatmaps, ref.heatmaps), (fast.rgb, ref.rgb), (fast.combined, ref.combined)]:
        assert a.shape == b.shape
        assert a.numel() == 0 or (a - b).abs().max() <= 1e-6


@pytest.mark.parametrize("resample", [True, False])
def test_explain_fast_path_equals_reference(model, images, rel, resample):
    """explain() carries the signals back through its own prediction forward: the same
    explanation as before (one forward for the prediction, one per layer for the maps)."""
    drawn = 0
    for b in range(len(images)):
        for target in (None, 0, 1):
            fast, ref = _explain_both(model, rel, images[b], k=4, target=target, resample=resample)
            _assert_same_explanation(fast, ref)
            drawn += fast.k
    assert drawn >= 20


def test_explain_runs_the_network_once(model, images, rel):
    calls = []
    h = model.conv1.register_forward_hook(lambda *a: calls.append(1))
    try:
        e = E.explain(model, rel, images[0], k=4, target=0)
        assert len(set(e.features["layer"])) == 3 and len(calls) == 1
    finally:
        h.remove()
    assert not any(m._forward_hooks or "forward" in m.__dict__ for m in model.modules())


def test_explain_vgg16_seed_at_a_conv_equals_reference():
    """VGG-16 as in benchmarks/bench_deconv.py's latency (features at a conv layer: the first
    transpose uses the seed's channel only), on a small image."""
    import pandas as pd
    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(num_classes=10).eval()
    frame = pd.DataFrame([{"class": j, "layer": layer, "layer_number": 1, "kind": "conv", "channel": q,
                           "weight": 1.0 + 0.1 * q}
                          for j in range(10) for layer, chans in [("features.17", [3, 40, 77]), ("features.12", [5])]
                          for q in chans])
    relv = E.Relevance.from_frame(frame, n_classes=10)
    image = torch.rand(3, 48, 52, generator=torch.Generator().manual_seed(2))
    fast, ref = _explain_both(vgg, relv, image, k=4)
    assert fast.k == 4
    _assert_same_explanation(fast, ref)


def test_explain_batch_fast_path_equals_reference(model, images, rel):
    """Several images per layer: one forward and the per-image seeds one by one."""
    targets = [0, 1, 0, 2, 0]
    for resample in (True, False):
        fast = E.explain_batch(model, rel, images, k=4, targets=targets, resample=resample)
        _, _, feats = E.feature_heatmaps(model, rel, images, k=4, targets=targets,
                                         draw="resampled" if resample else "deconv")
        ref = torch.zeros_like(fast)
        for b in range(len(images)):
            f = feats[feats["image"] == b].sort_values("rank")
            if len(f):
                h = heatmap(_reference_maps(model, images[b], f, resample))
                ref[b] = E.combine_heatmaps(h, torch.tensor(f["response"].to_numpy(), dtype=h.dtype), "max")
        assert fast.abs().max() > 0
        assert (fast - ref).abs().max() <= 1e-6
