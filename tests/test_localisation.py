"""vxnb.evaluate.localisation: the batched localisation metrics equal Quantus's, image by image."""
import warnings

import numpy as np
import pytest
import quantus
import torch

from vxnb.evaluate import localisation
from vxnb.evaluate.localisation import LOCALISATION_METRICS, localisation_scores
from vxnb.evaluate.quantus_metrics import QUANTUS_METRICS, localisation_metrics


def _quantus_per_image(h, m, k):
    """Quantus 0.6 itself, called as vxnb.evaluate.quantus_metrics calls it."""
    a = np.clip(h.astype(np.float32), 0, None)[:, None]
    s = m[:, None].astype(np.float32)
    out = {}
    for name, cls in QUANTUS_METRICS.items():
        kwargs = {"k": k} if name == "top_k" else {}
        metric = getattr(quantus, cls)(disable_warnings=True, display_progressbar=False, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[name] = np.asarray(metric(model=None, x_batch=np.repeat(a, 3, axis=1), y_batch=np.zeros(len(a), int),
                                          a_batch=a, s_batch=s, channel_first=True), dtype=np.float64)
    return out


def _cases(seed, n=24, size=20):
    rng = np.random.default_rng(seed)
    h = rng.random((n, size, size)).astype(np.float32) * rng.uniform(0.1, 50)
    h[::3] = np.round(h[::3] * 3) / 3          # many ties, at the maximum and at every cut-off
    h[1::4] = np.round(h[1::4])                # ties of two or three values
    h[2] = 0.5                                 # a constant map
    h[4] -= 0.4 * h[4].max()                   # negative values (clipped to 0: a tied floor)
    m = rng.random((n, size, size)) < rng.uniform(0.05, 0.6, (n, 1, 1))
    m[5] = False
    m[5, 2:9, 3:15] = True                     # a block mask
    m[6] = True                                # a mask covering the image (AUC undefined)
    m[7] = False
    m[7, 0, 0] = True                          # one pixel
    return h, m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_quantus_image_by_image(seed):
    h, m = _cases(seed)
    k = 9
    fast = localisation_scores(h, m, top_k=k)
    ref = _quantus_per_image(h, m, k)
    assert set(fast) == set(LOCALISATION_METRICS) == set(QUANTUS_METRICS)
    for name in LOCALISATION_METRICS:
        assert fast[name].shape == (len(h),)
        np.testing.assert_array_equal(np.isnan(fast[name]), np.isnan(ref[name]), err_msg=name)
        np.testing.assert_allclose(fast[name], ref[name], atol=1e-6, rtol=0, equal_nan=True, err_msg=name)
    assert np.isnan(fast["auc"][6]) and not np.isnan(fast["top_k"][6])  # no negative pixel: AUC undefined
    assert not np.isnan(fast["auc"]).all()


def test_empty_masks_are_nan_on_every_metric():
    h, m = _cases(3)
    m[3] = False
    fast = localisation_scores(h, m, top_k=5)
    ref = _quantus_per_image(np.delete(h, 3, 0), np.delete(m, 3, 0), 5)
    for name in LOCALISATION_METRICS:
        assert np.isnan(fast[name][3]), name  # Quantus's Pointing Game says True here; we say undefined
        # the other images are unaffected by the empty one
        np.testing.assert_allclose(np.delete(fast[name], 3), ref[name], atol=1e-6, equal_nan=True, err_msg=name)


def test_hand_computed_auc_with_ties():
    # scores 3 (in), 2 (out), 2 (in), 1 (out): pairs (in > out) = 1·2 + 0.5 (tie 2/2) + 1 = 3.5 of 4
    h = np.array([[[3.0, 2.0, 2.0, 1.0]]], np.float32)
    m = np.array([[[True, False, True, False]]])
    res = localisation_scores(h, m, top_k=1)
    assert res["auc"][0] == pytest.approx(3.5 / 4)
    assert res["pointing_game"][0] == 1.0 and res["top_k"][0] == 1.0
    assert res["relevance_mass"][0] == pytest.approx(5 / 8)


def test_chunks_give_the_same_values(monkeypatch):
    h, m = _cases(4)
    whole = localisation_scores(torch.from_numpy(h), torch.from_numpy(m))
    monkeypatch.setattr(localisation, "_CHUNK_PIXELS", 3 * 400)  # 3 images per chunk
    chunked = localisation_scores(h, m)
    for name in LOCALISATION_METRICS:
        np.testing.assert_array_equal(whole[name], chunked[name], err_msg=name)


@pytest.mark.parametrize("seed", [5, 6])
def test_both_judges_agree(seed):
    h, m = _cases(seed, n=30)
    m[9] = False                               # left out (empty mask), as a constant map is
    fast = localisation_metrics(h, m)
    slow = localisation_metrics(h, m, judge="quantus")
    assert fast["judge"] == "fast" and slow["judge"] == "quantus"
    assert fast["n_scored"] == slow["n_scored"] == 28 and fast["n_refused"] == 2
    assert fast["refused_by_quantus"] == slow["refused_by_quantus"] == {"auc": 1}
    for name in QUANTUS_METRICS:
        assert fast[name] == pytest.approx(slow[name], abs=1e-6), name


def test_bad_input():
    h, m = _cases(0)
    h, m = h[:2], m[:2]
    with pytest.raises(ValueError, match="judge: expected one of fast, quantus"):
        localisation_metrics(h, m, judge="captum")
    with pytest.raises(TypeError, match="metrics: expected a sequence of metric names"):
        localisation_scores(h, m, metrics="auc")
    with pytest.raises(ValueError, match="metrics: expected some of pointing_game"):
        localisation_scores(h, m, metrics=("iou",))
    with pytest.raises(ValueError, match="top_k: expected an int in 1..399"):
        localisation_scores(h, m, top_k=400)
    with pytest.raises(TypeError, match="heatmaps: expected real numbers"):
        localisation_scores(h.astype(complex), m)
    with pytest.raises(ValueError, match="masks: expected the shape of heatmaps"):
        localisation_scores(h, m[:, :5])
