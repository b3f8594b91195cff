"""vxnb.evaluate.quantus_metrics: Quantus's localisation metrics on hand-made heatmaps and masks."""
import numpy as np
import pytest
import torch

from vxnb.evaluate.quantus_metrics import QUANTUS_METRICS, localisation_metrics, metrics_table


def _masks(n=3, size=16):
    m = np.zeros((n, size, size), bool)
    m[:, 4:10, 5:11] = True  # 36 pixels
    return m


def test_a_perfect_map_scores_one_everywhere():
    m = _masks()
    res = localisation_metrics(m.astype(np.float32), m, top_k=20)
    for name in QUANTUS_METRICS:
        assert res[name] == pytest.approx(1.0), name
    assert res["n_scored"] == 3 and res["n_refused"] == 0


def test_hand_computed_partial_case():
    m = _masks(1)
    h = np.zeros((1, 16, 16), np.float32)
    h[0, 0, 0] = 3.0          # the maximum, outside the mask: pointing game 0
    h[0, 5, 6] = 1.0          # a quarter of the mass inside the mask
    res = localisation_metrics(torch.from_numpy(h), torch.from_numpy(m), top_k=2,
                               metrics=("pointing_game", "relevance_mass", "top_k"))
    assert res["pointing_game"] == 0.0
    assert res["relevance_mass"] == pytest.approx(0.25)
    assert res["top_k"] == pytest.approx(0.5)  # of the 2 highest pixels, one is in the mask


def test_constant_maps_are_counted_not_passed_on():
    m = _masks(4)
    h = m.astype(np.float32).copy()
    h[1] = 0.0          # constant: Quantus would refuse the batch (all zero) or divide by zero
    h[2] = 0.7
    res = localisation_metrics(h, m)
    assert res["n_refused"] == 2 and res["n_scored"] == 2 and res["pointing_game"] == 1.0
    allzero = localisation_metrics(np.zeros((2, 16, 16)), m[:2])
    assert allzero["n_refused"] == 2 and np.isnan(allzero["auc"])
    table = metrics_table({"perfect": res, "blank": allzero})
    assert table["n_refused"].tolist() == [2, 2] and list(table.columns[1:6]) == list(QUANTUS_METRICS)


def test_bad_input():
    m = _masks(2)
    with pytest.raises(ValueError, match="masks: expected the shape of heatmaps"):
        localisation_metrics(np.ones((2, 8, 8)), m)
    with pytest.raises(ValueError, match="heatmaps: expected a non-empty \\(N, H, W\\)"):
        localisation_metrics(np.ones((16, 16)), m[0])
    with pytest.raises(TypeError, match="heatmaps: expected a numpy array"):
        localisation_metrics([[1]], m)
    with pytest.raises(ValueError, match="metrics: expected some of pointing_game"):
        localisation_metrics(m.astype(float), m, metrics=("iou",))
    with pytest.raises(ValueError, match="masks: expected binary"):
        localisation_metrics(m.astype(float), m * 2.0)
