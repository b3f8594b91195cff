"""an8Flower's difficulty knobs (part size, distractor, clutter) and counterfactual renders (issue 27)."""
from __future__ import annotations

import shutil
import zlib

import numpy as np
import pytest
import torch
from scipy import ndimage

from vxnb.data import an8flower as A
from vxnb.data.an8flower import An8Flower, Knobs, cache_dir, counterfactual_label, render_view
from vxnb.data.an8flower import dataset as D
from vxnb.data.an8flower import render as R

pytestmark = pytest.mark.xdist_group("an8flower")

SIZE = 32
KNOBS = Knobs(part_scale=0.8, distractor_rate=0.5, clutter=2)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("an8knobs")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def knobbed(root):
    return (An8Flower(root, "single-6c", SIZE, knobs=KNOBS, progress=False),
            An8Flower(root, "single-6c", SIZE, knobs=KNOBS, counterfactual=2, progress=False))


# CRC-32 of render_view(variant, view, 32) (images, masks) as drawn before the knobs existed
# (commit 7e9b49a): the default knobs must keep every byte.
BEFORE_KNOBS = {("single-6c", 30): (2971058281, 3909423274), ("double-12c", 7): (4160841964, 1053241924),
                ("part-2c", 13): (4244291986, 1347040271)}


@pytest.mark.parametrize("variant,view", sorted(BEFORE_KNOBS))
def test_default_knobs_draw_the_same_bytes_as_before(variant, view):
    for knobs in (None, Knobs(), {"part_scale": 1.0, "distractor_rate": 0.0, "clutter": 0}):
        images, masks = render_view(variant, view, SIZE, knobs=knobs)
        assert (zlib.crc32(images.tobytes()), zlib.crc32(masks.tobytes())) == BEFORE_KNOBS[variant, view]


def test_default_knobs_keep_the_folder_and_manifest(tmp_path):
    assert cache_dir(tmp_path, "single-6c", 64, 1, knobs=Knobs()) == tmp_path / "an8flower" / "single-6c-64-seed1"
    assert D._manifest("single-6c", 64, 1, Knobs(), 0) == D._manifest("single-6c", 64, 1)
    assert "knobs" not in D._manifest("single-6c", 64, 1) and "counterfactual" not in D._manifest("single-6c", 64, 1)
    assert Knobs().tag() == "" and Knobs().manifest() == {}


def test_knobs_are_in_the_folder_name_and_manifest(knobbed, root):
    ds, cf = knobbed
    assert ds.folder == root / "an8flower" / "single-6c-32-seed0-ps0.8-dr0.5-cl2"
    assert cf.folder == root / "an8flower" / "single-6c-32-seed0-ps0.8-dr0.5-cl2-cf2"
    man = A.dataset.read_json(ds.folder / "manifest.json")
    assert man["knobs"] == {"part_scale": 0.8, "distractor_rate": 0.5, "clutter": 2}
    assert "counterfactual" not in man
    assert A.dataset.read_json(cf.folder / "manifest.json")["counterfactual"] == 2
    # a cache is trusted only for its own knobs
    assert D._trusted(ds.folder, "single-6c", SIZE, 0, KNOBS) is None
    assert "knobs" in D._trusted(ds.folder, "single-6c", SIZE, 0)
    assert "knobs" in D._trusted(ds.folder, "single-6c", SIZE, 0, Knobs(0.8, 0.5, 3))
    assert "counterfactual" in D._trusted(cf.folder, "single-6c", SIZE, 0, KNOBS)


@pytest.mark.parametrize("variant,region", [("single-6c", "head"), ("double-12c", "stem"), ("part-2c", "balls"),
                                            ("part-2c", "thorns")])
def test_part_scale_grows_the_class_part(variant, region):
    specs = R.class_specs(variant)
    label = next(k for k, s in enumerate(specs) if s.region == region)
    areas = [render_view(variant, 10, SIZE, knobs={"part_scale": s})[1][label].sum() for s in (0.6, 1.0, 1.4)]
    assert areas[0] < areas[1] < areas[2], areas
    if region != "stem":  # a 1-2 pixel stem's mask (any ray, dilated by the rotation) grows less
        assert areas[0] < 0.75 * areas[1] and areas[2] > 1.25 * areas[1], areas


def test_part_scale_leaves_the_other_parts():
    """single-6c scales the head only: the stem and leaves below it are drawn as before (the
    bottom half of a centre crop at angle 5 shows no head)."""
    a, _ = render_view("single-6c", 30, SIZE)
    b, mb = render_view("single-6c", 30, SIZE, knobs={"part_scale": 0.6})
    k = R.CROPS.index("center") * len(R.ANGLES)
    assert not mb[0, k, SIZE * 3 // 4:].any()
    assert np.array_equal(a[0, k, SIZE * 3 // 4:], b[0, k, SIZE * 3 // 4:])
    assert not np.array_equal(a[0, k], b[0, k])


def test_distractor_rate_and_colour():
    colours, hues = list(R.COLOURS.values()), []
    for rate, lo, hi in ((0.0, 0, 0), (1.0, 1, 1), (0.4, 0.25, 0.55)):
        knobs = Knobs(distractor_rate=rate)
        has = []
        for view, images, masks, dmasks in R.iter_views("single-6c", SIZE, 0, views=range(0, 40, 8), knobs=knobs,
                                                        distractors=True):
            plain, _ = render_view("single-6c", view, SIZE)
            for label in range(6):
                d = dmasks[label]
                has.extend(d.any(axis=(1, 2)))
                changed = (images[label] != plain[label]).any(-1)
                assert not (changed & ~d).any()  # nothing but the distractor changes ...
                assert not (d & masks["head"]).any()  # ... and it never touches the class part
                for k in np.flatnonzero(d.any(axis=(1, 2))):
                    # the ball's inner pixels have the chromaticity of the class colour, no other
                    inner = ndimage.binary_erosion(d[k])
                    px = images[label][k][inner].astype(float).mean(0)
                    nearest = np.argmin([np.abs(px / px.sum() - np.array(c) / sum(c)).sum() for c in colours])
                    hues.append(nearest == label)
        assert lo <= np.mean(has) <= hi, (rate, np.mean(has))
    assert len(hues) > 50 and all(hues), (len(hues), np.mean(hues))


def test_clutter_is_shared_by_the_classes_and_keeps_the_invariant():
    images, masks = render_view("double-12c", 22, SIZE, knobs={"clutter": 5})
    plain, _ = render_view("double-12c", 22, SIZE)
    assert (images != plain).any(-1).mean() > 0.02  # the background changed
    union = masks[0] | masks[6]  # red-head vs red-stem: they differ only inside their parts
    assert not ((images[0] != images[6]).any(-1) & ~union).any()
    assert np.array_equal(masks, render_view("double-12c", 22, SIZE)[1])  # masks unchanged
    bg = np.array([int(v * 255 + 0.5) for v in R._BACKGROUND])
    over_bg = (images[0] != plain[0]).any(-1) & (plain[0] == bg).all(-1)  # clutter over plain background
    assert over_bg.sum() > 100
    neutral = images[0][over_bg].astype(float)
    assert (neutral.max(1) - neutral.min(1)).max() < 0.35 * 255  # clutter is low-saturation


@pytest.mark.parametrize("variant", ["single-6c", "double-12c"])
def test_counterfactual_equals_the_other_class_item(variant):
    """Without distractors the counterfactual of item (c, view, crop, angle) is exactly the factual
    item of class cf(c) at the same (view, crop, angle): only the part's colour differs."""
    plain, masks = render_view(variant, 11, SIZE, knobs={"clutter": 2})
    for shift in (1, 5):
        cf, cmasks = render_view(variant, 11, SIZE, knobs={"clutter": 2}, counterfactual=shift)
        assert np.array_equal(cmasks, masks)
        for c in range(len(plain)):
            t = counterfactual_label(variant, c, shift)
            assert t != c and R.class_specs(variant)[t].region == R.class_specs(variant)[c].region
            assert np.array_equal(cf[c], plain[t])


def test_counterfactual_labels_by_hand():
    names = R.variant_classes("double-12c")
    assert names[counterfactual_label("double-12c", 0, 1)] == "orange-head"
    assert names[counterfactual_label("double-12c", 5, 1)] == "red-head"  # blue-head wraps to red
    assert names[counterfactual_label("double-12c", 11, 2)] == "orange-stem"
    with pytest.raises(ValueError, match="part-2c"):
        counterfactual_label("part-2c", 0, 1)
    with pytest.raises(ValueError, match="counterfactual"):
        counterfactual_label("single-6c", 0, 6)


def test_counterfactual_dataset_keeps_everything_but_the_part(knobbed):
    ds, cf = knobbed
    assert len(ds) == len(cf) and ds.index[["label", "view", "crop", "angle"]].equals(
        cf.index[["label", "view", "crop", "angle"]])
    assert (cf.index["cf_label"] == (cf.index["label"] + 2) % 6).all()
    assert ds.index["distractor"].equals(cf.index["distractor"])
    rng = np.random.default_rng(0)
    for i in rng.choice(len(ds), 40, replace=False):
        x, y, m = ds[int(i)]
        xc, yc, mc = cf[int(i)]
        assert y == yc and torch.equal(m, mc)
        diff = (x != xc).any(0)
        assert diff.any() and not (diff & ~m).any()  # the class part changed, nothing else


def test_dataset_items_and_distractor_masks(knobbed):
    ds, _ = knobbed
    assert 0.4 < ds.index["distractor"].mean() < 0.6
    images, masks = render_view("single-6c", 17, SIZE, knobs=KNOBS)
    _, _, _, dmasks = next(R.iter_views("single-6c", SIZE, 0, views=[17], knobs=KNOBS, distractors=True))
    for label in (0, 4):
        for k in (0, 13, 24):
            i = label * 1000 + 17 * 25 + k
            x, y, m = ds[i]
            assert torch.equal(x, torch.from_numpy(images[label, k]).permute(2, 0, 1).float() / 255)
            assert torch.equal(ds.distractor_mask(i), torch.from_numpy(dmasks[label][k]))
            assert bool(ds.index["distractor"].iloc[i]) == bool(dmasks[label][k].any())


def test_bad_knobs(tmp_path):
    with pytest.raises(ValueError, match="knobs.part_scale"):
        render_view("single-6c", 0, SIZE, knobs={"part_scale": 2.0})
    with pytest.raises(ValueError, match="knobs.distractor_rate"):
        R.check_knobs(Knobs(distractor_rate=-0.1))
    with pytest.raises(ValueError, match="knobs.clutter"):
        cache_dir(tmp_path, knobs={"clutter": 1.5})
    with pytest.raises(ValueError, match="unknown keys"):
        R.check_knobs({"colour": 1})
    with pytest.raises(TypeError, match="knobs"):
        An8Flower(tmp_path, "single-6c", SIZE, knobs=(1.0, 0.0, 0))
    with pytest.raises(TypeError, match="counterfactual"):
        A.generate(tmp_path, "single-6c", SIZE, counterfactual=1.0)
    plain = An8Flower(tmp_path, "part-2c", SIZE, progress=False)
    with pytest.raises(ValueError, match="no distractors"):
        plain.distractor_mask(0)
