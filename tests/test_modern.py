"""vxnb.studies.modern: the modern models (issue 25 item 5), their recipes and the store that
keeps them by content key, the lasso fit against explicit X, bad input, and (slow) one tiny
end-to-end run of the ViT with its layer choices, run twice (the second loads the model)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from vxnb.explanations import explain
from vxnb.features import default_layers, extract_features, select_layers
from vxnb.lasso import lasso_path
from vxnb.relevance import Relevance
from vxnb.studies import benchmark, modern, runs
from vxnb.utils import get_module


def _fake_fold(tmp_path, n=12, size=32):
    """A fold config whose data record reads a written manifest, and tiny tensor data for it."""
    from vxnb.data.an8flower import Knobs, cache_dir

    man = cache_dir(tmp_path / "data", "single-6c", size, 0) / "manifest.json"
    man.parent.mkdir(parents=True)
    man.write_text(json.dumps({"dataset": "an8flower", "variant": "single-6c", "size": size, "seed": 0,
                               **Knobs().manifest()}))
    base = runs.RunConfig(size=size, folds="blocks", data_root=str(tmp_path / "data"),
                          runs_root=str(tmp_path / "runs"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, size, size, generator=g), torch.arange(n) % 6
    return benchmark.fold_config(base, "single-6c", 0), (TensorDataset(x, y), TensorDataset(x[:6], y[:6]), list("abcdef"))


def test_models_are_stored_by_their_recipe_and_loaded_back(tmp_path):
    cfg, data = _fake_fold(tmp_path)
    quick = {"epochs": 1, "batch_size": 6}
    model, meta = modern.get_modern_model(cfg, "convnext", quick, data=data, progress=False)
    recipe = modern.modern_recipe("convnext", overrides=quick)
    key = modern.modern_model_key(cfg, "convnext", recipe, 6)
    assert meta["loaded"] is False and meta["key"] == key and meta["recipe"] == recipe
    assert (runs.run_dir(cfg) / "modern" / f"convnext-{key}.pt").is_file()
    again, meta2 = modern.get_modern_model(cfg, "convnext", quick, data=data, progress=False)
    assert meta2["loaded"] is True and meta2["test_accuracy"] == meta["test_accuracy"]
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(model(data[0].tensors[0]), again(data[0].tensors[0]))
    # another recipe is another model; gc keeps both (their kind is registered, their data unchanged)
    _, meta3 = modern.get_modern_model(cfg, "convnext", {**quick, "lr": 1e-3}, data=data, progress=False)
    assert meta3["loaded"] is False and meta3["key"] != key
    assert len(list((runs.run_dir(cfg) / "modern").glob("convnext-*.pt"))) == 2
    from vxnb.studies.gc import gc

    assert "modern-model" in runs.artifact_versions()
    assert gc(cfg.runs_dir, dry_run=True)["removed"] == []


def test_recipes_reach_the_model_and_the_key(tmp_path):
    assert modern.modern_recipe("vit", 3)["epochs"] == 3
    assert modern.modern_recipe("vit", overrides={"lr": 5e-4})["lr"] == 5e-4
    assert modern.modern_recipe("vit") == modern.MODERN_RECIPES["vit"]
    bn = [m.momentum for m in modern.modern_model("mobilenet_v3_small", 6, 32, bn_momentum=0.1).modules()
          if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and set(bn) == {0.1}
    assert {m.momentum for m in modern.modern_model("mobilenet_v3_small", 6, 32).modules()
            if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}  # torchvision's, which the recipe replaces
    scales = [p for n, p in modern.modern_model("convnext", 6, 32, layer_scale=0.1).named_parameters()
              if n.endswith("layer_scale")]
    assert len(scales) == 2 and all(torch.all(p == 0.1) for p in scales)
    cfg, _ = _fake_fold(tmp_path)
    keys = {modern.modern_model_key(cfg, "vit", modern.modern_recipe("vit", overrides={k: v}), 6)
            for k, v in [("lr", 1e-3), ("lr", 2e-3), ("epochs", 2), ("augment", True), ("weight_decay", 0.1)]}
    assert len(keys) == 5
    assert modern.modern_model_key(cfg, "vit", modern.modern_recipe("vit"), 6) != modern.modern_model_key(
        cfg, "convnext", modern.modern_recipe("vit"), 6)


@pytest.mark.parametrize("arch", modern.ALL_MODERN_ARCHS)
def test_models_give_six_logits_and_rows_fit_the_arch(arch):
    model = modern.modern_model(arch, 6, 32).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 6)
    assert ("attnlrp" in modern.modern_rows(arch)) == (arch == "vit")
    assert "ours_upsampled" in modern.modern_rows(arch)  # token maps: drawn on their grid
    assert [r for r in modern.modern_rows(arch) if r != "ours_upsampled"][:3] == ["ours", "ours_deconv", "gradcam"]


def test_lasso_r2_equals_the_fit_computed_from_x():
    torch.manual_seed(0)
    model = modern.modern_model("vit", 3, 32).eval()
    torch.nn.init.normal_(model.heads.head.weight)
    x, y = torch.rand(18, 3, 32, 32), torch.arange(18) % 3
    feats = extract_features(model, TensorDataset(x, y), n_classes=3, keep_X=True, progress=False)
    W = lasso_path(feats.G, feats.XtL, mu_max=5.0).coef(2.0)
    L = np.eye(3)[feats.labels]
    want = 1 - ((feats.X.astype(np.float64) @ W - L) ** 2).sum() / ((L - L.mean(0)) ** 2).sum()
    assert np.count_nonzero(W) > 0
    assert modern.lasso_r2(feats, W) == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_bad_input():
    with pytest.raises(ValueError, match="arch: expected one of mobilenet_v3_small, convnext, vit, swin, maxvit, "
                                         "got 'vgg'"):
        modern.modern_model("vgg", 6, 64)
    for f in (modern.modern_recipe, modern.modern_rows):
        with pytest.raises(ValueError, match="arch: expected one of .*swin, maxvit, got 'swin_t'"):
            f("swin_t")
    with pytest.raises(ValueError, match=r"size: expected an int >= 32 \(a multiple of 8 for 'vit'\), got 60"):
        modern.modern_model("vit", 6, 60)
    with pytest.raises(ValueError, match=r"size: expected an int >= 32 \(a multiple of 32 for 'maxvit'\), got 48"):
        modern.modern_model("maxvit", 6, 48)
    with pytest.raises(ValueError, match="archs: expected a non-empty list of mobilenet_v3_small, convnext, vit, "
                                         "swin, maxvit, got"):
        modern.modern_benchmark(archs=["swin_t"])
    with pytest.raises(ValueError, match="archs: expected a non-empty list"):
        modern.modern_benchmark(archs=["resnet"])
    with pytest.raises(ValueError, match="layers: expected keys among"):
        modern.modern_benchmark(layers={"swin_t": "features.*"})
    with pytest.raises(ValueError, match="folds: expected a non-empty list of folds in 0..4"):
        modern.modern_benchmark(folds=[5])
    with pytest.raises(ValueError, match="epochs: expected a positive int"):
        modern.modern_benchmark(epochs=0)
    with pytest.raises(ValueError, match="recipes: expected keys among mobilenet_v3_small"):
        modern.modern_benchmark(recipes={"resnet": {}})
    with pytest.raises(ValueError, match=r"recipes: expected keys among epochs, .*got \['momentum'\] for 'vit'"):
        modern.modern_recipe("vit", overrides={"momentum": 0.9})
    with pytest.raises(ValueError, match=r"bn_momentum: expected a number in \(0, 1\] or None, got 0"):
        modern.modern_model("mobilenet_v3_small", 6, 32, bn_momentum=0)
    with pytest.raises(ValueError, match="layer_scale: expected a positive number for the convnext"):
        modern.modern_model("vit", 6, 32, layer_scale=0.1)
    with pytest.raises(TypeError, match="cfg: expected a vxnb.studies.runs.RunConfig"):
        modern.get_modern_model({}, "vit")
    with pytest.raises(ValueError, match="df: expected the DataFrame of modern_benchmark"):
        modern.modern_times(pd.DataFrame({"arch": ["vit"]}))
    with pytest.raises(ValueError, match="df: expected the DataFrame of modern_benchmark"):
        modern.modern_table(pd.DataFrame({"arch": ["vit"]}))
    with pytest.raises(ValueError, match="df: expected the DataFrame of modern_benchmark"):
        modern.layer_choice_table(pd.DataFrame({"arch": ["vit"]}))


@pytest.mark.slow
def test_tiny_vit_run_scores_every_row_and_each_layer_choice(tmp_path):
    opts = dict(archs=["vit"], folds=[0], size=32, epochs=1, train_limit=60, n_test_images=12,
                data_root=str(tmp_path / "data"), runs_root=str(tmp_path / "runs"), progress=False,
                layers={"vit:blocks": "encoder.layers.*", "vit:mlp": "encoder.layers.*.mlp.1"},
                # one epoch on 60 images: train_model's defaults leave Grad-CAM's maps non-constant
                recipes={"vit": {"batch_size": 64, "weight_decay": 1e-4}})
    df = modern.modern_benchmark(**opts)
    assert list(df["arch"] + "/" + df["method"]) == [f"vit/{r}" for r in modern.modern_rows("vit")] + [
        "vit:blocks/ours", "vit:mlp/ours"]
    # m: conv_proj + four blocks (64 + 4 × 64; the default), four blocks of width 64, four MLPs of 128 hidden units
    assert df.groupby("arch", sort=False)["m"].first().to_dict() == {"vit": 320, "vit:blocks": 256, "vit:mlp": 512}
    assert df["iou_auc"].between(0, 100).all() and df["iou_auc"].gt(0).all()
    assert df["pointing_game"].between(0, 1).all() and (df["errors"] == "").all()
    table = modern.modern_table(df)
    assert table.loc[("vit", "AttnLRP (lxt)"), "iou_auc"] == pytest.approx(
        df.loc[df["method"] == "attnlrp", "iou_auc"].item())
    assert df["trained"].all()
    again = modern.modern_benchmark(**opts)  # the model, features and paths come from the store
    assert not again["trained"].any()
    cols = ["test_accuracy", "train_seconds", "m", "n_relevant", "iou_auc", "relevance_mass"]
    pd.testing.assert_frame_equal(again[cols], df[cols])
    times = modern.modern_times(df)
    assert list(times.index) == [("vit", 0), ("vit:blocks", 0), ("vit:mlp", 0)]
    assert times["total_seconds"].to_numpy() == pytest.approx(
        (times["train_seconds"] + times["features_seconds"] + times["score_seconds"]).to_numpy())


def test_models_train_at_the_reference_thread_count_whatever_the_caller_uses(tmp_path, monkeypatch):
    # on the CPU the weights depend on torch's thread count: the modern models train with
    # runs.TRAIN_THREADS like every reference model (the same weights at 1 or 2 caller threads),
    # and that count is in their key
    cfg, data = _fake_fold(tmp_path)
    quick = {"epochs": 1, "batch_size": 6}
    before = torch.get_num_threads()
    states = []
    try:
        for threads, root in ((1, "a"), (2, "b")):
            torch.set_num_threads(threads)
            c = runs.RunConfig(**{**cfg.__dict__, "runs_root": str(tmp_path / root)})
            model, meta = modern.get_modern_model(c, "convnext", quick, data=data, progress=False)
            assert meta["loaded"] is False and torch.get_num_threads() == threads  # the caller's count restored
            states.append(model.state_dict())
    finally:
        torch.set_num_threads(before)
    for (name, a), b in zip(states[0].items(), states[1].values()):
        assert torch.equal(a, b), name
    recipe = modern.modern_recipe("convnext", overrides=quick)
    key = modern.modern_model_key(cfg, "convnext", recipe, 6)
    monkeypatch.setattr(runs, "TRAIN_THREADS", 2)
    assert modern.modern_model_key(cfg, "convnext", recipe, 6) != key


def _layer_types(model, layers):
    return [type(get_module(model, n)).__name__ for n in layers]


def test_swin_and_maxvit_layer_choices_resolve_to_the_modules_they_claim():
    swin, maxvit = modern.modern_model("swin", 6, 64), modern.modern_model("maxvit", 6, 64)
    # the defaults: Swin's patch embedding conv, its four blocks and the patch merging's reduction;
    # MaxViT's stem, its MBConv / window / grid attention outputs and the head's pre-logits (Tanh)
    assert default_layers(swin) == ["features.0.0", "features.1.0", "features.1.1", "features.2.reduction",
                                    "features.3.0", "features.3.1"]
    blocks = [f"blocks.{b}.layers.0.layers.{p}" for b in (0, 1) for p in ("MBconv", "window_attention", "grid_attention")]
    assert default_layers(maxvit) == ["stem.0.2", "stem.1.0", *blocks, "classifier.4"]
    ch = modern.LAYER_CHOICES
    got = select_layers(swin, ch["swin"]["swin:blocks"])
    assert got == ["features.1.0", "features.1.1", "features.3.0", "features.3.1"]
    assert set(_layer_types(swin, got)) == {"SwinTransformerBlock"}
    got = select_layers(swin, ch["swin"]["swin:mlp_hidden"])
    assert got == [f"features.{s}.{b}.mlp.1" for s in (1, 3) for b in (0, 1)]
    assert set(_layer_types(swin, got)) == {"GELU"}
    sb = ["features.1.0", "features.1.1", "features.3.0", "features.3.1"]
    assert select_layers(swin, ch["swin"]["swin:embed_blocks"]) == ["features.0.0", *sb]
    assert select_layers(swin, ch["swin"]["swin:blocks_merging"]) == [*sb[:2], "features.2.reduction", *sb[2:]]
    assert _layer_types(swin, ["features.0.0", "features.2.reduction"]) == ["Conv2d", "Linear"]
    assert select_layers(maxvit, ch["maxvit"]["maxvit:blocks"]) == blocks
    assert _layer_types(maxvit, blocks) == ["MBConv", "PartitionAttentionLayer", "PartitionAttentionLayer"] * 2
    got = select_layers(maxvit, ch["maxvit"]["maxvit:mlp_hidden"])
    assert got == [f"blocks.{b}.layers.0.layers.{p}_attention.mlp_layer.2" for b in (0, 1) for p in ("window", "grid")]
    assert set(_layer_types(maxvit, got)) == {"GELU"}
    assert select_layers(maxvit, ch["maxvit"]["maxvit:stem_blocks"]) == ["stem.0.2", "stem.1.0", *blocks]
    assert select_layers(maxvit, ch["maxvit"]["maxvit:blocks_head"]) == [*blocks, "classifier.4"]
    assert _layer_types(maxvit, ["stem.0.2", "stem.1.0", "classifier.4"]) == ["GELU", "Conv2d", "Tanh"]
    vit = modern.modern_model("vit", 6, 64)
    assert select_layers(vit, ch["vit"]["vit:mlp_hidden"]) == [f"encoder.layers.encoder_layer_{i}.mlp.1" for i in range(4)]
    assert set(ch) == {"vit", "swin", "maxvit"} and all(k.startswith(a + ":") for a in ch for k in ch[a])


@pytest.mark.parametrize("arch,choice,widths", [
    ("swin", None, [32, 32, 32, 64, 64, 64]),
    ("swin", "swin:blocks", [32, 32, 64, 64]),
    ("swin", "swin:mlp_hidden", [128, 128, 256, 256]),
    ("maxvit", None, [16, 16, 32, 32, 32, 64, 64, 64, 64]),
    ("maxvit", "maxvit:blocks", [32, 32, 32, 64, 64, 64]),
    ("maxvit", "maxvit:mlp_hidden", [128, 128, 256, 256]),
])
def test_swin_and_maxvit_are_described_and_explained_with_each_layer_choice(arch, choice, widths):
    """extract_features -> lasso -> explain on random weights at 32 px; each layer's columns are the
    L2 norms of its channels over every position (Swin's (B, H, W, C) maps, MaxViT's windowed
    (B, windows, tokens, C) MLP units), L1-normalised per image, against the hooked outputs."""
    torch.manual_seed(0)
    model = modern.modern_model(arch, 2, 32).eval()
    x, y = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.arange(8) % 2
    layers = select_layers(model, None if choice is None else modern.LAYER_CHOICES[arch][choice])
    feats = extract_features(model, TensorDataset(x, y), n_classes=2, layers=layers, keep_X=True, progress=False)
    assert feats.columns.groupby("layer", sort=False).size().tolist() == widths and feats.X.shape == (8, sum(widths))
    outs = {}
    hooks = [get_module(model, n).register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    start = 0
    for n, w in zip(layers, widths):
        o = outs[n]
        chan_last = (n.startswith("features.") and n != "features.0.0") or "mlp_layer" in n  # by module, not by vxnb
        v = (o.flatten(1, -2).norm(dim=1) if chan_last else o.flatten(2).norm(dim=2)) if o.dim() > 2 else o.abs()
        want = v / v.sum(1, keepdim=True)
        np.testing.assert_allclose(feats.X[:, start:start + w], want.numpy(), rtol=1e-4, atol=1e-6, err_msg=n)
        start += w
    path = lasso_path(feats.G, feats.XtL, mu_max=1.0, progress=False)
    rel = Relevance.from_path(path, feats, 1.0, classes=["a", "b"])
    drawn = 0
    for target in (0, 1):
        e = explain(model, rel, x[0], k=3, target=target)
        assert e.heatmaps.shape == (e.k, 32, 32) and torch.isfinite(e.heatmaps).all()
        assert all(layer in layers for layer in e.features["layer"])
        if e.k:
            assert e.heatmaps.flatten(1).amax(1).eq(1).all()
        drawn += e.k
    assert drawn > 0


def test_swin_and_maxvit_train_with_their_recipes_and_are_stored(tmp_path):
    cfg, data = _fake_fold(tmp_path, size=32)
    for arch in modern.LAYER_STUDY_ARCHS:
        quick = {"epochs": 1, "batch_size": 6}
        model, meta = modern.get_modern_model(cfg, arch, quick, data=data, progress=False)
        key = modern.modern_model_key(cfg, arch, modern.modern_recipe(arch, overrides=quick), 6)
        assert meta["loaded"] is False and (runs.run_dir(cfg) / "modern" / f"{arch}-{key}.pt").is_file()
        _, again = modern.get_modern_model(cfg, arch, quick, data=data, progress=False)
        assert again["loaded"] is True
    bn = {m.momentum for m in modern.get_modern_model(cfg, "maxvit", {"epochs": 1, "batch_size": 6}, data=data,
                                                      progress=False)[0].modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bn == {0.1}  # the recipe's, not torchvision's 0.99
    assert set(modern.MODERN_ARCHS).isdisjoint(modern.LAYER_STUDY_ARCHS)


def test_layer_choice_table_against_hand_computed_means():
    rows = []
    for fold, iou in ((0, (10.0, 20.0)), (1, (30.0, 50.0))):
        for arch, v, m in (("swin", iou[0], 288), ("swin:mlp", iou[1], 768)):
            rows.append({"arch": arch, "fold": fold, "method": "ours", "m": m, "lasso_r2": 0.1 * (fold + 1),
                         "iou_auc": v, "pointing_game": 0.5 + fold * 0.25, "n_relevant": 10 + fold})
        rows.append({"arch": "swin", "fold": fold, "method": "gradcam", "m": 288, "lasso_r2": 0.1, "iou_auc": 99.0,
                     "pointing_game": 0.0, "n_relevant": 1})
    t = modern.layer_choice_table(pd.DataFrame(rows))
    assert list(t.index) == ["swin", "swin:mlp"]
    assert t.loc["swin", "iou_fold0"] == 10.0 and t.loc["swin:mlp", "iou_fold1"] == 50.0
    assert t.loc["swin", "iou_mean"] == 20.0 and t.loc["swin:mlp", "iou_mean"] == 35.0  # Grad-CAM's 99 left out
    assert t.loc["swin:mlp", "m"] == 768 and t.loc["swin", "lasso_r2"] == pytest.approx(0.15)
    assert t.loc["swin", "pointing_game"] == 0.625 and t.loc["swin", "n_relevant"] == 10.5
    with pytest.raises(ValueError, match="df: has no 'ours' rows"):
        modern.layer_choice_table(pd.DataFrame(rows[2:3]))


def test_m_of_swin_t_and_maxvit_t_at_224_px_under_the_default_layers():
    """The m docs/ARCHITECTURE.md names, counted on the meta device (no data, no weights used):
    swin_t: patch embedding 96, blocks 2 × 96, 2 × 192, 6 × 384, 2 × 768, patch merging 192, 384, 768;
    maxvit_t: stem 64 + 64, MBConv / window / grid outputs 3 × (2 × 64 + 2 × 128 + 5 × 256 + 2 × 512),
    the head's pre-logits 512."""
    import torchvision

    from vxnb.studies.runs import feature_count

    want = {"swin_t": 96 + 2 * 96 + 2 * 192 + 6 * 384 + 2 * 768 + 192 + 384 + 768,
            "maxvit_t": 128 + 3 * (2 * 64 + 2 * 128 + 5 * 256 + 2 * 512) + 512}
    assert want == {"swin_t": 5856, "maxvit_t": 8704}
    for name, m in want.items():
        model = getattr(torchvision.models, name)().eval()
        assert feature_count(model, default_layers(model), (3, 224, 224)) == m, name
