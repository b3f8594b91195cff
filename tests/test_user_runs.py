"""Your model, your images (issue 14): folder runs, user models, block-output layers, bad input."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from vxnb import features, models
from vxnb.studies import runs
from vxnb.data.folder import load_image_folder, read_class_names

sys.path.insert(0, str(Path(__file__).parent))
from folder_fixture import SHAPES, make_folder, save_weights  # noqa: E402


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Both layouts of the drawn-shapes folder and resnet18/vgg11 weights saved here."""
    root = tmp_path_factory.mktemp("shapes")
    one = make_folder(root / "one", per_class=10, size=48)
    split = make_folder(root / "split", per_class=8, size=48, split=True)
    weights = {a: save_weights(a, root / f"{a}.pt") for a in ("resnet18", "vgg11")}
    return {"one": one, "split": split, "weights": weights, "root": root}


def _cfg(shapes, tmp_path, layout="one", masks=True, **kw):
    images, mask_dir = shapes[layout]
    params = dict(dataset="folder", data_root=str(images), mask_root=str(mask_dir) if masks else None,
                  model="resnet18", weights=str(shapes["weights"]["resnet18"]), image_size=32,
                  runs_root=str(tmp_path / "runs"), batch_size=8)
    params.update(kw)
    return runs.RunConfig.from_params(**params)


# ---------------------------------------------------------------------------- data
def test_one_folder_is_split_by_seed_stratified(shapes, tmp_path):
    train, val, classes = runs.load_data(_cfg(shapes, tmp_path, val_fraction=0.2))
    assert classes == sorted(SHAPES)
    labels = lambda ds: np.array([int(ds[i][1]) for i in range(len(ds))])
    assert np.bincount(labels(val)).tolist() == [2, 2, 2] and np.bincount(labels(train)).tolist() == [8, 8, 8]
    assert not set(train.indices) & set(val.indices)
    other = runs.load_data(_cfg(shapes, tmp_path, seed=1))[1]
    assert sorted(other.indices) != sorted(val.indices)       # another seed, another split
    again = runs.load_data(_cfg(shapes, tmp_path))[1]
    assert again.indices == val.indices                       # the same seed, the same split


def test_train_val_layout_and_masks_follow_the_images(shapes, tmp_path):
    train, val, classes = runs.load_data(_cfg(shapes, tmp_path, layout="split"))
    assert (len(train), len(val)) == (18, 6)
    x, y, m = val[0]
    assert x.shape == (3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1   # un-normalised
    assert m.shape == (32, 32) and m.dtype == torch.bool
    # the mask marks the drawn shape: brighter inside than outside (the background is dark noise)
    assert x.mean(0)[m].mean() > x.mean(0)[~m].mean() + 0.2


def test_class_names_file_as_list_mapping_and_imagenet_index(tmp_path):
    classes = ["disc", "n01440764", "square"]
    f = tmp_path / "names.json"
    f.write_text(json.dumps(["Disc", "Tench", "Square"]))
    assert read_class_names(f, classes) == ["Disc", "Tench", "Square"]
    f.write_text(json.dumps({"disc": "round thing"}))
    assert read_class_names(f, classes) == ["round thing", "n01440764", "square"]
    f.write_text(json.dumps({"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}))
    assert read_class_names(f, classes) == ["disc", "tench", "square"]
    f.write_text(json.dumps(["only one"]))
    with pytest.raises(ValueError, match="class_names: .* lists 1 names; the data has 3 classes"):
        read_class_names(f, classes)


# ---------------------------------------------------------------------------- models
@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
def test_user_model_is_loaded_fingerprinted_and_never_modified(shapes, tmp_path, arch):
    cfg = _cfg(shapes, tmp_path, model=arch, weights=str(shapes["weights"][arch]), train_limit=12)
    saved = torch.load(shapes["weights"][arch])
    model, meta = runs.get_model(cfg)
    assert meta["trained_here"] is False and meta["fingerprint"] == models.model_fingerprint(model, arch)
    assert cfg.model_fingerprint[:10] in cfg.run_name
    feats = runs.get_features(cfg, model, "train")
    runs.get_lasso_path(cfg, feats)
    after = model.state_dict()
    assert set(after) == set(saved)
    assert all(torch.equal(after[k].cpu(), saved[k]) for k in saved)      # weights unchanged, every tensor
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_fingerprint_follows_the_weights_not_the_object(shapes):
    a = models.load_user_model("resnet18", shapes["weights"]["resnet18"], num_classes=3, input_shape=(3, 32, 32))
    b = models.load_user_model("resnet18", shapes["weights"]["resnet18"], num_classes=3, input_shape=(3, 32, 32))
    assert models.model_fingerprint(a) == models.model_fingerprint(b)
    with torch.no_grad():
        b.fc.weight[0, 0] += 1e-3
    assert models.model_fingerprint(a) != models.model_fingerprint(b)


def test_imagenet_normalisation_is_applied_inside_the_model(shapes):
    raw = models.load_user_model("resnet18", shapes["weights"]["resnet18"], num_classes=3,
                                 input_shape=(3, 32, 32), normalize="none")
    norm = models.load_user_model("resnet18", shapes["weights"]["resnet18"], num_classes=3,
                                  input_shape=(3, 32, 32), normalize="imagenet")
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), raw((x - mean) / std))


def test_factory_and_whole_model_files(shapes, tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("import torchvision\n\ndef small():\n    return torchvision.models.resnet18(num_classes=3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = models.load_user_model("mypkg.nets:small", shapes["weights"]["resnet18"], num_classes=3, input_shape=(3, 32, 32))
    ref = torch.load(shapes["weights"]["resnet18"])
    assert torch.equal(m.state_dict()["fc.weight"], ref["fc.weight"])
    whole = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(num_classes=3), whole)
    with pytest.raises(ValueError, match="weights: .*needs full unpickling.*trust_weights: true"):
        models.load_user_model("resnet18", whole, num_classes=3, input_shape=(3, 32, 32))
    with pytest.warns(UserWarning, match="trust_weights=True"):
        m2 = models.load_user_model("resnet18", whole, num_classes=3, input_shape=(3, 32, 32), trust_weights=True)
    assert m2.fc.out_features == 3


class _RunsCode:
    """A pickle that runs code when loaded: writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path(self.marker).write_text, ("ran",))


def test_weights_that_would_run_code_are_refused_unless_trusted(shapes, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    torch.save({"fc.weight": _RunsCode(marker)}, bad)
    with pytest.raises(ValueError, match="trust_weights: true"):
        models.load_user_model("resnet18", bad, num_classes=3, input_shape=(3, 32, 32))
    assert not marker.exists()                       # nothing in the file ran
    with pytest.raises(TypeError, match="trust_weights: expected a bool"):
        models.load_user_model("resnet18", shapes["weights"]["resnet18"], num_classes=3, trust_weights="yes")
    # the opt-in is a run parameter: a folder run with a whole pickled model needs it
    whole = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(num_classes=3), whole)
    with pytest.raises(ValueError, match="trust_weights: true"):
        runs.user_model(_cfg(shapes, tmp_path, weights=str(whole)))
    with pytest.warns(UserWarning, match="trust_weights=True"):
        assert runs.user_model(_cfg(shapes, tmp_path, weights=str(whole), trust_weights=True)).fc.out_features == 3
    with pytest.raises(TypeError, match="trust_weights: expected a bool"):
        _cfg(shapes, tmp_path, trust_weights="yes")


# ---------------------------------------------------------------------------- layers
def test_block_output_layers_of_resnet18_and_resnet50():
    r18 = torchvision.models.resnet18(num_classes=3)
    assert features.default_layers(r18) == ["relu"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    r50 = torchvision.models.resnet50(num_classes=3)
    blocks = features.default_layers(r50)
    assert blocks == ["relu"] + [f"layer{i}.{j}" for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)]
    assert "layer3.4" in blocks and features.residual_blocks(r50) == blocks[1:]
    fine = features.default_layers(r50, mode="all")
    assert "layer3.4.bn2" in fine and "layer3.4" not in fine     # today's finer choice, inside the blocks
    assert features.select_layers(r50, "layer4.*") == ["layer4.0", "layer4.1", "layer4.2"]
    assert features.select_layers(r50, ["relu", "layer3.?"])[:3] == ["relu", "layer3.0", "layer3.1"]
    cols = features.feature_columns(r50, blocks, [1] * len(blocks)).set_index("layer")
    assert (cols["kind"] == "conv").all()
    assert cols["layer_number"].is_monotonic_increasing


def test_block_output_is_after_the_addition_and_relu():
    r18 = torchvision.models.resnet18(num_classes=3).eval()
    block = r18.layer2[1]
    seen = {}
    block.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    with torch.no_grad():
        r18(torch.rand(1, 3, 64, 64))
    x = seen["inp"]
    with torch.no_grad():   # the block by hand: relu(bn2(conv2(relu(bn1(conv1(x))))) + x)
        ref = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))) + x)
    torch.testing.assert_close(seen["out"], ref)
    d = features.descriptors(r18, torch.rand(2, 3, 64, 64), ["layer2.1"])
    assert d.shape == (2, 128)


def test_vgg_defaults_are_unchanged_by_the_block_rule():
    vgg = torchvision.models.vgg11(num_classes=3)
    assert features.default_layers(vgg) == features.default_layers(vgg, mode="all")
    assert features.residual_blocks(vgg) == []


def test_memory_check_prints_m_and_refuses_naming_layers(capsys):
    assert runs.gram_memory_check(1000, available=10 ** 9) == 8 * 10 ** 6
    assert "m = 1000" in capsys.readouterr().out
    with pytest.raises(ValueError, match="layers: m = 20000 features need 3.0 GiB"):
        runs.gram_memory_check(20000, available=2 ** 30)



@pytest.mark.parametrize("arch, side, expected", [("vit_b_16", 224, 768 + 12 * 768)])
def test_memory_check_names_m_for_vit_b16_default_layers(arch, side, expected, capsys):
    """m of ViT-B/16's default layers (the patch embedding and the 12 block outputs) at 224 px is
    D per token layer (the norm is over the patch tokens), not the token count: the meta-device
    count equals the widths of a real extraction."""
    model = getattr(torchvision.models, arch)(num_classes=4)
    layers = features.default_layers(model)
    m = runs.feature_count(model, layers, (3, side, side))
    real = features.descriptors(model, torch.zeros(1, 3, side, side), layers).shape[1]
    assert m == real == expected
    runs.gram_memory_check(m, available=2 ** 40)
    assert f"m = {expected};" in capsys.readouterr().out


# ---------------------------------------------------------------------------- bad input
def test_missing_or_empty_folder(shapes, tmp_path):
    with pytest.raises(FileNotFoundError, match="data_root: no folder"):
        _cfg(shapes, tmp_path, data_root=str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="data_root: .* has no class sub-folders"):
        load_image_folder(empty)
    (empty / "cats").mkdir()
    (empty / "dogs").mkdir()
    Image.new("RGB", (8, 8)).save(empty / "dogs" / "a.png")
    with pytest.raises(ValueError, match=r"data_root: class folder\(s\) \['cats'\] .* hold no images"):
        load_image_folder(empty)


def test_unreadable_image_is_refused_or_skipped_with_a_count(tmp_path):
    make_folder(tmp_path, per_class=4, size=24)
    bad = tmp_path / "images" / "disc" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="data_root: 1 file\\(s\\) are not readable images: .*broken.png"):
        load_image_folder(tmp_path / "images", image_size=16, val_fraction=0.25)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image\\(s\\): .*broken.png"):
        train, val, _ = load_image_folder(tmp_path / "images", image_size=16, val_fraction=0.25, on_error="skip")
    assert len(train) + len(val) == 12


def test_mask_of_another_size_is_refused(tmp_path):
    images, masks = make_folder(tmp_path, per_class=3, size=24)
    Image.new("L", (10, 12)).save(masks / "square" / "square_001.png")
    with pytest.raises(ValueError, match="mask_root: 1 mask\\(s\\) do not fit .*square_001.png is 10×12"):
        load_image_folder(images, mask_root=masks, image_size=16, val_fraction=0.34)


def test_weights_that_do_not_fit_list_missing_and_unexpected_keys(shapes):
    with pytest.raises(ValueError, match="weights: .*missing keys: .*layer1.0.conv1.weight.*unexpected keys: .*features.0.weight"):
        models.load_user_model("resnet18", shapes["weights"]["vgg11"], num_classes=3)


def test_output_size_must_match_the_classes(shapes):
    with pytest.raises(ValueError, match="model: 'resnet18' outputs 3 scores per image, but the data has num_classes=5 classes"):
        models.load_user_model("resnet18", shapes["weights"]["resnet18"], num_classes=5, input_shape=(3, 32, 32))


def test_unknown_architecture_and_factory_that_does_not_import(shapes, tmp_path):
    with pytest.raises(ValueError, match="model: unknown architecture 'resnet17'"):
        _cfg(shapes, tmp_path, model="resnet17").run_name
    with pytest.raises(ValueError, match="model: cannot import 'no_such_pkg.nets'"):
        models.load_user_model("no_such_pkg.nets:build", None, num_classes=3)
    with pytest.raises(ValueError, match="model: a folder run needs your model"):
        _cfg(shapes, tmp_path, model=None)


def test_bad_input_leaves_nothing_in_runs(shapes, tmp_path):
    cfg = _cfg(shapes, tmp_path, model="vgg11")   # resnet18's weights for a VGG
    with pytest.raises(ValueError, match="weights: "):
        runs.get_model(cfg)
    images, masks = make_folder(tmp_path / "bad", per_class=4, size=24)
    Image.new("L", (5, 5)).save(masks / "disc" / "disc_002.png")
    cfg = _cfg(shapes, tmp_path, data_root=str(images), mask_root=str(masks))
    with pytest.raises(ValueError, match="mask_root: 1 mask"):
        runs.get_model(cfg)
    assert not (tmp_path / "runs").exists()


def test_normalised_model_explains_an_expanded_batch():
    """One image repeated for two classes (as the sanity checks do) through the normalising hook."""
    from vxnb.baselines import attribution

    m = models.normalize_input(torchvision.models.resnet18(num_classes=3).eval(), "imagenet")
    x = torch.rand(1, 3, 32, 32)
    h = attribution("deconv_gb", m, x.expand(2, 3, 32, 32), torch.tensor([0, 1]))
    ref = torch.cat([attribution("deconv_gb", m, x, torch.tensor([c])) for c in (0, 1)])
    torch.testing.assert_close(h, ref)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["efficientnet_b0", "convnext_tiny", "swin_t"])
def test_a_users_modern_model_goes_through_the_whole_pipeline(shapes, tmp_path, arch):
    """A user's EfficientNet, ConvNeXt or Swin (weights the test saves) on the user's folder:
    default layers, features of the training split, the μ-lasso path, and each validation image
    explained by its top features (issue 25). The explanation is the class's relevant features
    drawn by DeconvNet + guided backprop: its features are the class's, its map non-constant,
    and its responses are w·x of the run's own features."""
    from vxnb.explanations import Relevance, explain

    weights = save_weights(arch, tmp_path / f"{arch}.pt")
    cfg = _cfg(shapes, tmp_path, model=arch, weights=str(weights), train_limit=12)
    model, meta = runs.get_model(cfg)
    assert meta["trained_here"] is False
    feats = runs.get_features(cfg, model, "train")
    assert feats.columns["layer"].unique().tolist() == features.default_layers(model)
    path = runs.get_lasso_path(cfg, feats)
    rel = Relevance.from_path(path, feats, mu=10.0)
    _, val, _ = runs.load_data(cfg)
    x = val[0][0]
    e = explain(model, rel, x, k=3)
    f = e.features
    assert 1 <= len(f) <= 3
    assert (f["weight"] > 0).all() and (f["response"] > 0).all()       # the explained class's relevant features
    desc = features.descriptors(model, x[None], columns=feats.columns)[0].double().numpy()
    np.testing.assert_allclose(f["x"].to_numpy(), desc[f["feature"].to_numpy()], rtol=1e-5)
    np.testing.assert_allclose(f["response"].to_numpy(), (f["weight"] * f["x"]).to_numpy(), rtol=1e-6)
    assert e.heatmaps.shape == (len(f), 32, 32) and float(e.combined.max() - e.combined.min()) > 0.1
