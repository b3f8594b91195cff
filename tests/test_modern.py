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

from vxnb.features import extract_features
from vxnb.lasso import lasso_path
from vxnb.studies import benchmark, modern, runs


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


@pytest.mark.parametrize("arch", modern.MODERN_ARCHS)
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
    with pytest.raises(ValueError, match="arch: expected one of mobilenet_v3_small, convnext, vit, got 'vgg'"):
        modern.modern_model("vgg", 6, 64)
    with pytest.raises(ValueError, match=r"size: expected an int >= 32 \(a multiple of 8 for the ViT\), got 60"):
        modern.modern_model("vit", 6, 60)
    with pytest.raises(ValueError, match="archs: expected a non-empty list"):
        modern.modern_benchmark(archs=["resnet"])
    with pytest.raises(ValueError, match="layers: expected keys among"):
        modern.modern_benchmark(layers={"swin": "features.*"})
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
