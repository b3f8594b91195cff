"""Bad input across the public API: one row per bad input, each must raise a ValueError or
TypeError whose message names the argument (and says what was expected).

The table is the count reported for issue 12: ``len(ROWS)`` inputs tried."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from vxnb import _store
from vxnb.studies import gc as studies_gc
from vxnb.studies import runs
from vxnb.deconv import grid_score, heatmap, visualize
from vxnb.evaluate.iou import iou_auc, iou_curve, normalize_heatmaps
from vxnb.evaluate.sanity import spearman, ssim
from vxnb.features import extract_features
from vxnb.lasso import lasso_path, mu_lasso
from vxnb.models import build_model, load_checkpoint, save_checkpoint, train_model
from vxnb.params import parse_value
from vxnb.relevance import relevant_features, top_features
from vxnb.utils import check_image_batch, get_device, get_module, seed_everything


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


X = np.abs(np.random.default_rng(0).normal(size=(10, 4)))
L = np.eye(2)[np.arange(10) % 2]
IMG = torch.rand(2, 3, 8, 8)
MASKS = np.ones((2, 8, 8), dtype=bool)
COLUMNS = pd.DataFrame({"feature": range(4), "layer": ["0"] * 4, "channel": range(4), "kind": ["conv"] * 4,
                        "number": [1] * 4})

ROWS = [
    # RunConfig: every field
    ("runconfig-dataset", lambda: runs.RunConfig(dataset="cifar"), ValueError, "dataset"),
    ("runconfig-variant", lambda: runs.RunConfig(variant="triple-3c"), ValueError, "variant"),
    ("runconfig-variant-type", lambda: runs.RunConfig(variant=6), ValueError, "variant"),
    ("runconfig-size-small", lambda: runs.RunConfig(size=16), ValueError, "size"),
    ("runconfig-size-float", lambda: runs.RunConfig(size=64.0), ValueError, "size"),
    ("runconfig-test-fold-range", lambda: runs.RunConfig(test_fold=5), ValueError, "test_fold"),
    ("runconfig-test-fold-float", lambda: runs.RunConfig(test_fold=1.0), TypeError, "test_fold"),
    ("runconfig-test-fold-str", lambda: runs.RunConfig(test_fold="1"), TypeError, "test_fold"),
    ("runconfig-seed-str", lambda: runs.RunConfig(seed="0"), TypeError, "seed"),
    ("runconfig-seed-bool", lambda: runs.RunConfig(seed=True), TypeError, "seed"),
    ("runconfig-seed-negative", lambda: runs.RunConfig(seed=-1), ValueError, "seed"),
    ("runconfig-train-limit-zero", lambda: runs.RunConfig(train_limit=0), ValueError, "train_limit"),
    ("runconfig-train-limit-float", lambda: runs.RunConfig(train_limit=10.5), TypeError, "train_limit"),
    ("runconfig-epochs", lambda: runs.RunConfig(epochs=0), ValueError, "epochs"),
    ("runconfig-quick", lambda: runs.RunConfig(quick="yes"), TypeError, "quick"),
    ("runconfig-runs-root", lambda: runs.RunConfig(runs_root=3), TypeError, "runs_root"),
    ("runconfig-data-root", lambda: runs.RunConfig(data_root=["data"]), TypeError, "data_root"),
    ("runconfig-name", lambda: runs.RunConfig(name="../elsewhere"), ValueError, "name"),
    # runs
    ("get-features-split", lambda: runs.get_features(runs.RunConfig(), _net(), "val"), ValueError, "split"),
    ("save-table-frame", lambda: runs.save_table(runs.RunConfig(), "t", [1, 2]), TypeError, "frame"),
    ("save-table-name", lambda: runs.save_table(runs.RunConfig(), "a/b", pd.DataFrame()), ValueError, "name"),
    ("gc-runs-root", lambda: studies_gc.gc("/nonexistent/runs"), ValueError, "runs_root"),
    # the artifact store
    ("store-key-kind", lambda: _store.key("", {}), ValueError, "kind"),
    ("store-key-settings", lambda: _store.key("k", [1, 2]), TypeError, "settings"),
    ("store-key-inputs", lambda: _store.key("k", {}, "abc"), TypeError, "inputs"),
    ("store-key-version", lambda: _store.key("k", {}, None, "1"), TypeError, "version"),
    ("store-key-value", lambda: _store.key("k", {"f": object()}), TypeError, "settings"),
    # utils
    ("device", lambda: get_device("tpu:x"), ValueError, "device"),
    ("seed-everything", lambda: seed_everything(1.5), TypeError, "seed"),
    ("get-module-name", lambda: get_module(_net(), "conv9"), ValueError, "layer"),
    ("get-module-type", lambda: get_module(_net(), 0), TypeError, "layer"),
    ("image-batch-type", lambda: check_image_batch(np.zeros((1, 3, 8, 8))), TypeError, "x"),
    ("image-batch-dtype", lambda: check_image_batch(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)), TypeError, "x"),
    ("image-batch-ndim", lambda: check_image_batch(torch.zeros(3, 8, 8)), ValueError, "x"),
    ("image-batch-nan", lambda: check_image_batch(torch.full((1, 3, 8, 8), float("nan"))), ValueError, "x"),
    # models
    ("build-model-arch", lambda: build_model("resnet9000"), ValueError, "arch"),
    ("save-checkpoint-model", lambda: save_checkpoint("/tmp/x", "model"), TypeError, "model"),
    ("save-checkpoint-meta", lambda: save_checkpoint("/tmp/x", _net(), meta=[1]), TypeError, "meta"),
    ("load-checkpoint-type", lambda: load_checkpoint(3), TypeError, "run_dir"),
    ("train-model-epochs", lambda: train_model(_net(), torch.utils.data.TensorDataset(IMG, torch.tensor([0, 1])),
                                               epochs=0, progress=False), ValueError, "epochs"),
    # features
    ("extract-model", lambda: extract_features("net", IMG), TypeError, "model"),
    ("extract-layers", lambda: extract_features(_net(), IMG, layers=["nope"]), ValueError, "layers"),
    ("extract-keep-x", lambda: extract_features(_net(), IMG, layers=["1"], keep_X="yes"), ValueError, "keep_X"),
    ("extract-n-classes", lambda: extract_features(_net(), IMG, layers=["1"], n_classes=0), ValueError,
     "n_classes"),
    ("extract-gram-dtype", lambda: extract_features(_net(), IMG, layers=["1"], gram_dtype="float16"), ValueError,
     "gram_dtype"),
    ("extract-data-key", lambda: extract_features(_net(), IMG, layers=["1"], data_key=3), TypeError, "data_key"),
    # lasso
    ("mu-lasso-mu", lambda: mu_lasso(X, L, -1.0), ValueError, "mu"),
    ("mu-lasso-shape", lambda: mu_lasso(X, L[:5], 1.0), ValueError, "L"),
    ("mu-lasso-x-nan", lambda: mu_lasso(np.full((10, 4), np.nan), L, 1.0), ValueError, "X"),
    ("mu-lasso-gram", lambda: mu_lasso(X, L, 1.0, gram="partial"), ValueError, "gram"),
    ("lasso-path-mu-max", lambda: lasso_path(X.T @ X, X.T @ L, mu_max=0.0), ValueError, "mu_max"),
    # relevance
    ("relevant-features-columns", lambda: relevant_features(np.zeros((4, 2)), COLUMNS.iloc[:3]), ValueError,
     "columns"),
    ("top-features-k", lambda: top_features(np.ones((4, 2)), np.ones(4), 0, COLUMNS, k=0), ValueError, "k"),
    # deconv
    ("visualize-layer", lambda: visualize(_net(), IMG, "conv9", [0]), ValueError, "layer"),
    # out of range: IndexError, as vxnb.deconv documents (the one row that is not ValueError/TypeError)
    ("visualize-channel", lambda: visualize(_net(), IMG, "1", [7]), IndexError, "channels"),
    ("visualize-x", lambda: visualize(_net(), IMG[0], "1", [0]), ValueError, "x"),
    ("heatmap-ndim", lambda: heatmap(torch.zeros(4, 4)), ValueError, "v"),
    ("grid-score-strides", lambda: grid_score(torch.rand(1, 1, 8, 8), 0), ValueError, "strides"),
    # evaluation
    ("iou-shapes", lambda: iou_curve(np.random.rand(2, 8, 8), np.ones((2, 4, 4), bool)), ValueError, "masks"),
    ("iou-thresholds", lambda: iou_auc(np.random.rand(2, 8, 8), MASKS, thresholds=[0.5]), ValueError,
     "thresholds"),
    ("normalize-nan", lambda: normalize_heatmaps(np.full((1, 4, 4), np.nan)), ValueError, "heatmaps"),
    ("spearman-shapes", lambda: spearman(np.ones((4, 4)), np.ones((5, 5))), ValueError, "b"),
    ("ssim-win-size", lambda: ssim(np.random.rand(8, 8), np.random.rand(8, 8), win_size=4), ValueError, "win_size"),
    # parameters
    ("parse-value", lambda: parse_value(3), TypeError, "text"),
]


@pytest.mark.parametrize("call, exc, arg", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_gets_a_clear_error(call, exc, arg):
    with pytest.raises(exc) as info:
        call()
    assert arg in str(info.value), f"the message does not name {arg!r}: {info.value}"


def test_the_table_is_large_and_its_ids_unique():
    ids = [r[0] for r in ROWS]
    assert len(ids) == len(set(ids)) >= 40
