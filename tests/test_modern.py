"""vxnb.studies.modern: the modern models (issue 25 item 5), the lasso fit against explicit X,
bad input, and (slow) one tiny end-to-end run of the ViT with its layer choices."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from vxnb.features import extract_features
from vxnb.lasso import lasso_path
from vxnb.studies import modern


@pytest.mark.parametrize("arch", modern.MODERN_ARCHS)
def test_models_give_six_logits_and_rows_fit_the_arch(arch):
    model = modern.modern_model(arch, 6, 32).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 6)
    assert ("attnlrp" in modern.modern_rows(arch)) == (arch == "vit")
    assert modern.modern_rows(arch)[:4] == ("ours", "ours_deconv", "ours_upsampled", "gradcam")


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
    with pytest.raises(ValueError, match="df: expected the DataFrame of modern_benchmark"):
        modern.modern_table(pd.DataFrame({"arch": ["vit"]}))


@pytest.mark.slow
def test_tiny_vit_run_scores_every_row_and_each_layer_choice(tmp_path):
    df = modern.modern_benchmark(archs=["vit"], folds=[0], size=32, epochs=1, train_limit=60, n_test_images=12,
                                 data_root=str(tmp_path / "data"), runs_root=str(tmp_path / "runs"), progress=False,
                                 layers={"vit:blocks": "encoder.layers.*", "vit:mlp": "encoder.layers.*.mlp.1"})
    assert list(df["arch"] + "/" + df["method"]) == [f"vit/{r}" for r in modern.modern_rows("vit")] + [
        "vit:blocks/ours", "vit:mlp/ours"]
    # m: conv_proj + encoder (64 + 64), four blocks of width 64, four MLPs of 128 hidden units
    assert df.groupby("arch", sort=False)["m"].first().to_dict() == {"vit": 128, "vit:blocks": 256, "vit:mlp": 512}
    assert df["iou_auc"].between(0, 100).all() and df["iou_auc"].gt(0).all()
    assert df["pointing_game"].between(0, 1).all() and (df["errors"] == "").all()
    table = modern.modern_table(df)
    assert table.loc[("vit", "AttnLRP (lxt)"), "iou_auc"] == pytest.approx(
        df.loc[df["method"] == "attnlrp", "iou_auc"].item())
