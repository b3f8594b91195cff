"""IoU curve and its area against hand-computed cases and a brute-force loop."""
import warnings

import numpy as np
import pytest
import torch

from vxnb.evaluate.iou import DEFAULT_THRESHOLDS, iou_auc, iou_curve, iou_per_image, normalize_heatmaps


def _brute_force(heatmaps, masks, thresholds):
    """One image and one threshold at a time, straight from the definition."""
    out = np.full((len(heatmaps), len(thresholds)), np.nan)
    for i, (h, m) in enumerate(zip(heatmaps, masks)):
        h = np.asarray(h, dtype=np.float64)
        span = h.max() - h.min()
        n = (h - h.min()) / span if span > 0 else np.zeros_like(h)
        if not m.any():
            continue
        for k, t in enumerate(thresholds):
            on = n >= t
            out[i, k] = (on & m).sum() / (on | m).sum()
    return out


def _square_mask(h=8, w=8, r0=2, r1=5, c0=1, c1=4):
    m = np.zeros((h, w), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def test_constant_heatmap_turns_every_pixel_on_at_zero_and_none_above():
    m = _square_mask()  # 9 of 64 pixels
    t, ious = iou_curve(np.full((1, 8, 8), 3.7), m[None])
    np.testing.assert_array_equal(t, DEFAULT_THRESHOLDS)
    assert ious[0] == pytest.approx(9 / 64)
    np.testing.assert_array_equal(ious[1:], 0.0)


def test_heatmap_equal_to_mask_is_perfect_above_zero():
    m = _square_mask()
    t, ious = iou_curve(m[None].astype(np.float32) * 5 + 1, m[None])
    assert ious[0] == pytest.approx(9 / 64)
    np.testing.assert_allclose(ious[1:], 1.0)


def test_no_overlap_gives_zero_and_partial_overlap_by_hand():
    m = np.zeros((1, 4, 4), dtype=bool)
    m[0, 0, :2] = True  # 2 pixels
    h = np.zeros((1, 4, 4))
    h[0, 3, 3] = 1.0
    _, ious = iou_curve(h, m, thresholds=[0.5, 1.0])
    np.testing.assert_array_equal(ious, [0.0, 0.0])
    # Graded heatmap: values 0, 0.5, 1 on known pixels.
    h = np.zeros((1, 4, 4))
    h[0, 0, 0] = 1.0   # in mask
    h[0, 0, 1] = 0.5   # in mask
    h[0, 1, 0] = 0.5   # outside
    _, ious = iou_curve(h, m, thresholds=[0.0, 0.25, 0.5, 0.75, 1.0])
    # t=0: all 16 on -> 2/16; t in (0, .5]: 3 on, 2 inside -> 2/3; t in (.5, 1]: 1 on -> 1/2
    np.testing.assert_allclose(ious, [2 / 16, 2 / 3, 2 / 3, 1 / 2, 1 / 2])


def test_matches_brute_force_on_random_data_with_ties():
    rng = np.random.default_rng(1)
    n, hh, ww = 12, 9, 11
    heat = rng.normal(size=(n, hh, ww))
    heat[3] = np.round(heat[3])          # many ties
    heat[4] = 2.0                         # constant
    heat[5] = np.linspace(0, 1, hh * ww).reshape(hh, ww)  # values exactly on the thresholds
    masks = rng.random((n, hh, ww)) < 0.3
    masks[6] = True                       # full mask
    for thresholds in (DEFAULT_THRESHOLDS, np.array([0.0, 0.013, 0.5, 0.9999, 1.0]), np.array([0.3])):
        got = iou_per_image(heat, masks, thresholds)
        np.testing.assert_allclose(got, _brute_force(heat, masks, thresholds), rtol=0, atol=1e-15)
        t, curve = iou_curve(heat, masks, thresholds)
        np.testing.assert_allclose(curve, _brute_force(heat, masks, thresholds).mean(0), atol=1e-12)


def test_torch_float32_input_matches_numpy():
    rng = np.random.default_rng(2)
    heat = rng.random((5, 16, 16)).astype(np.float32)
    masks = rng.random((5, 16, 16)) < 0.5
    _, a = iou_curve(torch.from_numpy(heat), torch.from_numpy(masks))
    _, b = iou_curve(heat, masks)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(b, _brute_force(heat, masks, DEFAULT_THRESHOLDS).mean(0), atol=1e-12)


def test_auc_is_the_trapezoid_by_hand():
    m = np.zeros((1, 4, 4), dtype=bool)
    m[0, 0, :2] = True
    h = np.zeros((1, 4, 4))
    h[0, 0, 0] = 1.0
    h[0, 0, 1] = 0.5
    h[0, 1, 0] = 0.5
    t = [0.0, 0.5, 1.0]
    # curve: t=0 -> 2/16, t=.5 -> 2/3, t=1 -> 1/2; trapezoid over [0, 1], range 1
    area = 0.5 * (2 / 16 + 2 / 3) * 0.5 + 0.5 * (2 / 3 + 1 / 2) * 0.5
    assert iou_auc(h, m, t) == pytest.approx(100 * area)
    # divided by the range of the thresholds: a constant curve of 1 has area 100
    perfect = m.astype(float)
    assert iou_auc(perfect, m, [0.2, 0.6, 1.0]) == pytest.approx(100.0)


def test_empty_masks_are_skipped_with_a_warning():
    rng = np.random.default_rng(3)
    heat = rng.random((4, 6, 6))
    masks = rng.random((4, 6, 6)) < 0.4
    masks[1] = False
    masks[2] = False
    with pytest.warns(UserWarning, match="2 of 4 masks are empty"):
        per = iou_per_image(heat, masks)
    assert np.isnan(per[1]).all() and np.isnan(per[2]).all()
    with pytest.warns(UserWarning, match="2 of 4"):
        _, curve = iou_curve(heat, masks)
    np.testing.assert_allclose(curve, _brute_force(heat[[0, 3]], masks[[0, 3]], DEFAULT_THRESHOLDS).mean(0))
    with pytest.raises(ValueError, match="masks: all 1 masks are empty"):
        iou_curve(heat[:1], np.zeros((1, 6, 6), bool))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iou_curve(heat[[0]], masks[[0]])  # no warning without empty masks


def test_normalize_heatmaps():
    h = np.array([[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]])
    np.testing.assert_allclose(normalize_heatmaps(h), [[[0, 0.5], [0.25, 1]], [[0, 0], [0, 0]]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(heatmaps=np.zeros((2, 4, 4)), masks=np.ones((2, 4, 5), bool)), "masks: expected the shape"),
        (dict(heatmaps=np.zeros((4, 4)), masks=np.ones((4, 4), bool)), r"heatmaps: expected shape \(N, H, W\)"),
        (dict(heatmaps=np.array([[[np.nan, 1.0]]]), masks=np.ones((1, 1, 2), bool)), "heatmaps: contains NaN"),
        (dict(heatmaps=np.zeros((1, 2, 2)), masks=np.ones((1, 2, 2), bool), thresholds=[0.0, 1.5]),
         r"thresholds: expected values in \[0, 1\]"),
        (dict(heatmaps=np.zeros((1, 2, 2)), masks=np.ones((1, 2, 2), bool), thresholds=[-0.1, 0.5]),
         r"thresholds: expected values in \[0, 1\]"),
        (dict(heatmaps=np.zeros((1, 2, 2)), masks=np.ones((1, 2, 2), bool), thresholds=[0.5, 0.5, 0.7]),
         "thresholds: expected strictly increasing"),
        (dict(heatmaps=np.zeros((1, 2, 2)), masks=np.ones((1, 2, 2), bool), thresholds=[0.5, np.nan]),
         "thresholds: contains NaN"),
        (dict(heatmaps=np.zeros((1, 2, 2)), masks=np.full((1, 2, 2), 2)), "masks: expected a bool"),
        (dict(heatmaps=np.zeros((0, 2, 2)), masks=np.ones((0, 2, 2), bool)), "heatmaps: expected a non-empty"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        iou_curve(**kwargs)


def test_bad_types_and_auc_needs_two_thresholds():
    with pytest.raises(TypeError, match="heatmaps"):
        iou_curve("not an array", np.ones((1, 2, 2), bool))
    with pytest.raises(ValueError, match="at least 2 thresholds"):
        iou_auc(np.zeros((1, 2, 2)), np.ones((1, 2, 2), bool), thresholds=[0.5])


def test_package_level_contract():
    import vxnb.evaluate as ev

    assert ev.iou_curve is iou_curve and ev.iou_auc is iou_auc
