"""Tests of the an8Flower renderer, augmentation protocol, masks, folds and on-disk cache.

Every variant is rendered in memory once per module at size 32 (pixel tests); part-2c, the
smallest variant, is also generated on disk (dataset API, cache and file tests); the on-disk
generation code is the same for every variant. Generated folders are deleted after use: they
hold thousands of small files.
"""
from __future__ import annotations

import io
import itertools
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vxnb.data import an8flower as A
from vxnb.data.an8flower import ANGLES, CROPS, N_VIEWS, VARIANTS, An8Flower, cache_dir, gallery
from vxnb.data.an8flower import dataset as D
from vxnb.data.an8flower import png as PNG
from vxnb.data.an8flower import render as R
from vxnb.utils import atomic_write_json, read_json

# one xdist worker runs this module, so the module-scoped datasets are rendered once
pytestmark = pytest.mark.xdist_group("an8flower")

SIZE = 32
N_CLASSES = {"single-6c": 6, "double-12c": 12, "part-2c": 2}


ON_DISK = ("part-2c",)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("an8root")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fresh_root(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def datasets(root):
    return {v: An8Flower(root, v, size=SIZE, progress=False) for v in ON_DISK}


@pytest.fixture(scope="module")
def arrays():
    """Every item of every variant, rendered in memory: uint8 images (C, 1000, 3, S, S) and bool
    masks (C, 1000, S, S), items in the dataset's order (view, crop, angle)."""
    out = {}
    for v in VARIANTS:
        specs = R.class_specs(v)
        imgs = np.empty((len(specs), N_VIEWS, 25, 3, SIZE, SIZE), np.uint8)
        masks = np.empty((len(specs), N_VIEWS, 25, SIZE, SIZE), bool)
        for view, images, regions in R.iter_views(v, SIZE, 0):
            for label, arr in images.items():
                imgs[label, view] = arr.transpose(0, 3, 1, 2)
                masks[label, view] = regions[specs[label].region]
        out[v] = (imgs.reshape(len(specs), 1000, 3, SIZE, SIZE), masks.reshape(len(specs), 1000, SIZE, SIZE))
    return out


def _copy_cache(ds, dst_root, rows=()):
    """A copy of ``ds``'s cache with only its manifest, index and the files of ``rows``."""
    dst = cache_dir(dst_root, ds.variant, ds.size, ds.seed)
    dst.mkdir(parents=True)
    files = {"manifest.json", "index.csv"}
    for i in rows:
        files |= {ds.index["path"].iloc[i], ds.index["mask_path"].iloc[i]}
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ds.folder / rel, dst / rel)
    return dst


# ---------------------------------------------------------------------------------------------
# protocol, index, folds
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ON_DISK)
def test_classes_index_and_protocol(datasets, variant):
    ds = datasets[variant]
    c = N_CLASSES[variant]
    assert len(ds.classes) == c == len(set(ds.classes))
    assert len(ds) == c * N_VIEWS * len(CROPS) * len(ANGLES) == c * 1000
    idx = ds.index
    assert {"label", "view", "crop", "angle", "fold", "path", "mask_path"} <= set(idx.columns)
    np.testing.assert_array_equal(ds.targets, idx["label"].to_numpy())
    np.testing.assert_array_equal(ds.labels, ds.targets)
    assert ds.class_to_idx == {name: i for i, name in enumerate(ds.classes)}
    assert (idx["class"] == [ds.classes[k] for k in idx["label"]]).all()
    # every class holds each (view, crop, angle) exactly once, in the same row order
    keys = idx[["view", "crop", "angle"]].to_numpy().reshape(c, 1000, 3)
    assert (keys == keys[0]).all()
    assert len({tuple(k) for k in keys[0]}) == 1000
    assert set(idx["crop"]) == set(CROPS) and set(idx["angle"]) == set(ANGLES) == {5, 10, 15, 20, 25}
    assert set(idx["view"]) == set(range(40))
    assert (idx.groupby("label").size() == 1000).all()


def test_class_names():
    assert A.variant_classes("single-6c") == ["red-head", "orange-head", "yellow-head", "pink-head",
                                             "purple-head", "blue-head"]
    assert A.variant_classes("double-12c")[6:] == [n.replace("head", "stem") for n in A.variant_classes("single-6c")]
    assert A.variant_classes("part-2c") == ["balls", "thorns"]


@pytest.mark.parametrize("variant", ON_DISK)
def test_folds_grouped_by_viewpoint(datasets, variant):
    ds = datasets[variant]
    idx = ds.index
    assert (idx["fold"] == idx["view"] % 5).all()
    # each view in exactly one fold; 8 views per fold
    assert (idx.groupby("view")["fold"].nunique() == 1).all()
    assert (idx.groupby("fold")["view"].nunique() == 8).all()
    # 5 folds of 200 items per class
    assert (idx.groupby(["label", "fold"]).size() == 200).all()
    seen = np.zeros(len(ds), int)
    for f in range(5):
        train, test = ds.fold_indices(f)
        assert len(train) + len(test) == len(ds) and len(test) == 200 * len(ds.classes)
        assert not set(train) & set(test)
        # augmented copies of a render never straddle train and test
        assert not set(idx["view"].iloc[train]) & set(idx["view"].iloc[test])
        seen[test] += 1
    assert (seen == 1).all()


@pytest.mark.parametrize("variant", ON_DISK)
def test_block_folds_share_no_viewpoint(datasets, variant):
    ds = datasets[variant]
    idx = ds.index
    seen = np.zeros(len(ds), int)
    for f in range(5):
        train, test = ds.fold_indices(f, folds="blocks")
        views_test, views_train = set(idx["view"].iloc[test]), set(idx["view"].iloc[train])
        assert views_test == set(range(8 * f, 8 * f + 8))  # eight neighbouring views
        assert not views_test & views_train and views_test | views_train == set(range(N_VIEWS))
        assert len(test) == 200 * len(ds.classes) and not set(train) & set(test)
        # only the two views at the block's ends touch the training views (9° away); the
        # interleaved split puts a training view 9° from every test view
        gaps = [min(min(abs(v - w), N_VIEWS - abs(v - w)) for w in views_train) for v in views_test]
        assert sorted(gaps) == [1, 1, 2, 2, 3, 3, 4, 4]
        seen[test] += 1
    assert (seen == 1).all()
    assert np.array_equal(A.fold_of_view(np.arange(N_VIEWS), "blocks"), np.repeat(np.arange(5), 8))
    with pytest.raises(ValueError, match="folds: expected one of 'views', 'blocks', got str 'random'"):
        ds.fold_indices(0, folds="random")


# ---------------------------------------------------------------------------------------------
# items
# ---------------------------------------------------------------------------------------------
def test_item_shapes_dtypes_ranges(datasets):
    ds = datasets["part-2c"]
    for i in (0, 537, 1234, len(ds) - 1, -1):
        x, y, m = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, SIZE, SIZE)
        assert 0 <= float(x.min()) and float(x.max()) <= 1
        assert isinstance(y, int) and y == ds.targets[i]
        assert m.dtype == torch.bool and m.shape == (SIZE, SIZE) and m.any()
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(TypeError):
        ds["3"]


def test_transform_applies_to_the_image(root, datasets):
    ds = An8Flower(root, "part-2c", size=SIZE, transform=lambda x: 1 - x, progress=False)
    x, y, m = ds[5]
    x0, y0, m0 = datasets["part-2c"][5]
    torch.testing.assert_close(x, 1 - x0)
    assert y == y0 and torch.equal(m, m0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_masks_non_empty_and_partial(arrays, variant):
    _, masks = arrays[variant]
    area = masks.sum((2, 3))
    assert (area > 0).all()
    assert (area < SIZE * SIZE / 2).all()  # a part of the picture, never all of it


@pytest.mark.parametrize("variant", VARIANTS)
def test_classes_differ_only_inside_their_masks(arrays, variant):
    imgs, masks = arrays[variant]
    c = imgs.shape[0]
    for a, b in itertools.combinations(range(c), 2):
        diff = (imgs[a] != imgs[b]).any(1)  # (1000, S, S)
        outside = diff & ~(masks[a] | masks[b])
        assert not outside.any(), f"classes {a} and {b} differ outside their masks in {outside.any((1, 2)).sum()} items"
        # ... and they do differ, in every item
        assert diff.any((1, 2)).all(), f"classes {a} and {b} are identical in some items"


def test_masks_are_tight_and_on_the_right_part(arrays):
    imgs, masks = arrays["double-12c"]
    # head classes share the head mask, stem classes the stem mask (same geometry)
    assert (masks[:6] == masks[0]).all() and (masks[6:] == masks[6]).all()
    head, stem = masks[0], masks[6]
    # a mask is (almost) exactly where the colour changes: red vs blue head
    diff = (imgs[0] != imgs[5]).any(1)
    assert diff.sum() / head.sum() > 0.85
    diff = (imgs[6] != imgs[11]).any(1)
    assert diff.sum() / stem.sum() > 0.85
    # the head sits above the stem in every item (rotations are at most 25 degrees)
    rows = np.arange(SIZE)[None, :, None]
    head_row = (head * rows).sum((1, 2)) / head.sum((1, 2))
    stem_row = (stem * rows).sum((1, 2)) / stem.sum((1, 2))
    assert (head_row < stem_row).all()
    # the head / stem pixels carry the class colour: against the class with the same part in its
    # neutral colour, the change of every pixel points from the neutral colour to the class colour
    # (shading and border mixing scale that change, but do not turn it)
    names = list(A.COLOURS)
    palette = np.array([A.COLOURS[n] for n in names])
    for k in range(12):
        other = (k + 6) % 12  # same colour on the other part: this part is neutral there
        neutral = np.array(R._DEFAULT_ALBEDO["petal" if k < 6 else "stem"])
        ref = palette - neutral
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        region = masks[k] & (imgs[k] != imgs[other]).any(1)
        d = (imgs[k].astype(float) - imgs[other].astype(float)).transpose(1, 0, 2, 3)[:, region].T
        d = d[np.linalg.norm(d, axis=1) > 30]  # clear changes only (not 1-2 levels of rounding)
        assert len(d) > 1000
        votes = np.argmax(d @ ref.T / np.linalg.norm(d, axis=1, keepdims=True), axis=1)
        assert np.mean(votes == k % 6) > 0.75, (k, np.bincount(votes, minlength=6))  # disc: other neutral


def test_part_masks(arrays, datasets):
    imgs, masks = arrays["part-2c"]
    assert datasets["part-2c"].regions == ["balls", "thorns"]
    balls, thorns = masks
    rows = np.arange(SIZE)[None, :, None]
    # balls on the head (upper part of the picture), thorns on the stem (lower): centroids
    assert ((balls * rows).sum((1, 2)) / balls.sum((1, 2))).mean() < ((thorns * rows).sum((1, 2)) / thorns.sum((1, 2))).mean()
    # the balls are red: where they are, the ball class is much redder than the thorn class
    d = imgs[0].astype(float) - imgs[1].astype(float)  # (1000, 3, S, S)
    on = balls & ~thorns
    assert (d[:, 0][on] - d[:, 1][on]).mean() > 15
    # the thorns are brown (darker than what they hide, the green stem or the pale background)
    on = thorns & ~balls
    assert (-d.sum(1)[on]).mean() < 0


def test_gallery(datasets):
    ds = datasets["part-2c"]
    images, masks, labels = gallery(ds, per_class=2)
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert masks.shape == (4, SIZE, SIZE) and masks.dtype == torch.bool
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])
    # views 30 and 10, centre crop, 5 degrees
    i = int(np.flatnonzero((ds.index["label"] == 1) & (ds.index["view"] == 10) & (ds.index["crop"] == "center")
                           & (ds.index["angle"] == 5))[0])
    assert torch.equal(images[3], ds[i][0]) and torch.equal(masks[3], ds[i][2])
    with pytest.raises(ValueError, match="per_class"):
        gallery(ds, per_class=0)
    with pytest.raises(TypeError, match="dataset"):
        gallery([1, 2], per_class=1)


# ---------------------------------------------------------------------------------------------
# renderer pieces against independent references
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("angle", [5, 25])
@pytest.mark.parametrize("crop", ["top-left", "bottom-right", "center"])
def test_crop_rotation_matches_pil(crop, angle):
    """Our bilinear gather equals PIL's crop + rotate(angle, BILINEAR) away from the corners."""
    size = 48
    rsize = A.render_size(size)
    yy, xx = np.mgrid[0:rsize, 0:rsize]
    img = (np.sin(xx / 5.0) + np.cos(yy / 7.0) + 0.3 * xx / rsize).astype(np.float32)
    off = R._crop_offsets(size)[crop]
    idx, w = R._rotation_gather(size, rsize, off, angle)
    ours = (w * np.append(img.ravel(), 0)[idx]).sum(0).reshape(size, size)
    cropped = img[off[0]:off[0] + size, off[1]:off[1] + size]
    pil = np.asarray(Image.fromarray(cropped, mode="F").rotate(angle, resample=Image.BILINEAR))
    inner = slice(10, -10)
    np.testing.assert_allclose(ours[inner, inner], pil[inner, inner], atol=1e-5)
    assert np.abs(ours - cropped)[inner, inner].max() > 0.05  # it did rotate
    # the generator applies all 25 items as one sparse matrix: the same numbers
    k = CROPS.index(crop) * len(ANGLES) + ANGLES.index(angle)
    rows = R._transform_matrix(size)[k * size * size:(k + 1) * size * size]
    np.testing.assert_allclose(rows @ np.append(img.ravel(), 0), ours.ravel(), atol=1e-5)


def test_crop_offsets():
    offs = R._crop_offsets(128)
    assert A.render_size(128) == 154
    assert offs == {"top-left": (0, 0), "top-right": (0, 26), "bottom-left": (26, 0),
                    "bottom-right": (26, 26), "center": (13, 13)}


def test_package_reexports_its_modules_and_imports_point_down():
    """``vxnb.data.an8flower`` is render -> png -> dataset; the package re-exports the owners' objects."""
    import ast
    import inspect

    for name in A.__all__:
        owner = R if name in R.__all__ else D
        assert name in owner.__all__ and getattr(A, name) is getattr(owner, name), name
    assert {"An8Flower", "generate", "render_view", "fold_of_view", "RENDER_VERSION"} <= set(A.__all__)
    for module, below in ((R, set()), (PNG, set()), (D, {"render", "png"})):
        tree = ast.parse(inspect.getsource(module))
        siblings = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        assert siblings <= below, (module.__name__, siblings)
    assert D.decode_png is PNG.decode_png and D.iter_views is R.iter_views


def test_png_codec_round_trips_through_pil():
    """Our small PNG encoder is read correctly by PIL; our fast decoder agrees with PIL."""
    rng = np.random.default_rng(0)
    for shape in [(32, 32, 3), (17, 45, 3)]:
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        data = PNG.encode_png(a)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), a)
        np.testing.assert_array_equal(PNG.decode_png(data), a)
    for shape in [(32, 32), (13, 37)]:
        m = rng.random(shape) > 0.5
        data = PNG.encode_png(m)
        back = np.asarray(Image.open(io.BytesIO(data)))
        assert back.dtype == bool
        np.testing.assert_array_equal(back, m)
        np.testing.assert_array_equal(PNG.decode_png(data), m)
    # a PNG laid out otherwise (PIL's own filters) is left to PIL
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
    assert PNG.decode_png(buf.getvalue()) is None
    with pytest.raises(ValueError, match="array"):
        PNG.encode_png(np.zeros((4, 4), np.float32))


def test_renderer_deterministic_and_seeded():
    n = 3 * A.render_size(32)
    a = R._render_view(R._flower(0, "base"), 7, n)
    b = R._render_view(R._flower(0, "base"), 7, n)
    for x, y in zip(a, b):
        assert x.tobytes() == y.tobytes()
    c = R._render_view(R._flower(1, "base"), 7, n)
    assert a[1].tobytes() != c[1].tobytes()  # another seed: another light / petals
    part = a[0]
    assert set(np.unique(part)) == {0, 1, 2, 3, 4}  # background, stem, leaf, petal, disc
    # the flower is not rotationally symmetric: the views differ from each other
    parts = [R._render_view(R._flower(0, "base"), v, n)[0] for v in (0, 10, 20, 30)]
    for p, q in itertools.combinations(parts, 2):
        assert (p != q).mean() > 0.01


@pytest.mark.parametrize("variant", ON_DISK)
def test_disk_items_equal_rendered_items(datasets, arrays, variant):
    """What the dataset serves is exactly what the renderer drew (lossless files, right order)."""
    ds = datasets[variant]
    imgs, masks = arrays[variant]
    c = len(ds.classes)
    for i in range(len(ds)):
        x, y, m = ds[i]
        k, j = divmod(i, 1000)
        assert y == k
        assert torch.equal(x, torch.from_numpy(imgs[k, j]).float() / 255)
        assert np.array_equal(m.numpy(), masks[k, j])
    assert c * 1000 == len(ds)


def test_render_view_matches_dataset(datasets):
    ds = datasets["part-2c"]
    images, masks = A.render_view("part-2c", view=13, size=SIZE)
    assert images.shape == (2, 25, SIZE, SIZE, 3) and masks.shape == (2, 25, SIZE, SIZE)
    i = 1000 + 13 * 25 + 7  # thorns, view 13, item 7 = crop 1 (top-right), angle 15
    row = ds.index.iloc[i]
    assert (row["label"], row["view"], row["crop"], row["angle"]) == (1, 13, "top-right", 15)
    x, _, m = ds[i]
    assert torch.equal(x, torch.from_numpy(images[1, 7]).permute(2, 0, 1).float() / 255)
    assert torch.equal(m, torch.from_numpy(masks[1, 7]))
    with pytest.raises(ValueError, match="view"):
        A.render_view("part-2c", view=40, size=SIZE)


def test_same_seed_same_bytes(fresh_root, datasets):
    """A second generation with the same arguments writes the same bytes (and replaces a stale
    folder left by an earlier crash)."""
    ref = datasets["part-2c"].folder
    stale = cache_dir(fresh_root, "part-2c", SIZE, 0)
    (stale / "images").mkdir(parents=True)
    (stale / "index.csv").write_text("label\n0\n")  # no manifest: an unfinished folder
    (stale / "images" / "junk.png").write_bytes(b"junk")
    other = A.generate(fresh_root, "part-2c", SIZE, seed=0, progress=False)
    assert other == stale != ref
    assert sorted(p.name for p in other.parent.iterdir()) == [other.name]  # no temp or stale left
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    assert len(files) == 2 + 2000 + 2000
    for rel in files:
        assert (ref / rel).read_bytes() == (other / rel).read_bytes(), rel


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------
def test_cache_layout_and_reuse(root, datasets, monkeypatch):
    ds = datasets["part-2c"]
    assert ds.folder == cache_dir(root, "part-2c", SIZE, 0) == root / "an8flower" / "part-2c-32-seed0"
    manifest = read_json(ds.folder / "manifest.json")
    assert manifest["version"] == A.RENDER_VERSION and manifest["variant"] == "part-2c"
    assert manifest["size"] == SIZE and manifest["seed"] == 0 and manifest["n_items"] == 2000
    stamp = (ds.folder / "index.csv").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("the renderer ran although the cache is complete")

    monkeypatch.setattr(R, "_render_view", boom)
    again = An8Flower(root, "part-2c", size=SIZE, progress=False)
    assert (ds.folder / "index.csv").stat().st_mtime_ns == stamp
    assert torch.equal(again[3][0], ds[3][0])
    An8Flower(root, "part-2c", size=SIZE, generate=False)  # complete: no error


def test_rendered_folder_is_flushed_before_its_rename(fresh_root, monkeypatch):
    """Issue 24: the render folder's files reach the disk before the rename publishes it."""
    import os

    from vxnb import utils

    events = []

    def fake_render(tmp, *args, **kwargs):
        (tmp / "index.csv").write_text("label\n0\n")

    real_fsync, real_rename = utils.fsync_tree, os.rename

    def fsync(path):
        events.append(("fsync", (Path(path) / "index.csv").read_text()))
        real_fsync(path)

    def rename(src, dst):
        events.append(("rename", Path(dst).name))
        real_rename(src, dst)

    monkeypatch.setattr(D, "_generate_into", fake_render)
    monkeypatch.setattr(utils, "fsync_tree", fsync)
    monkeypatch.setattr(D.os, "rename", rename)
    monkeypatch.setattr(D.os, "replace", rename)
    target = A.generate(fresh_root, "part-2c", size=SIZE, progress=False)
    assert events == [("fsync", "label\n0\n"), ("rename", target.name)]
    assert (target / "index.csv").read_text() == "label\n0\n"


def test_interrupted_generation_leaves_no_trusted_cache(fresh_root, monkeypatch):
    real = R._render_view
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 30:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "_render_view", flaky)
    with pytest.raises(KeyboardInterrupt):
        An8Flower(fresh_root, "part-2c", size=SIZE, progress=False)
    assert len(calls) == 30
    target = cache_dir(fresh_root, "part-2c", SIZE, 0)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the temporary folder is gone too
    with pytest.raises(FileNotFoundError, match="generate=True"):
        An8Flower(fresh_root, "part-2c", size=SIZE, generate=False)
    # a folder without manifest (e.g. a copy interrupted by a crash) is not trusted either
    (target / "images").mkdir(parents=True)
    (target / "index.csv").write_text("label\n0\n")
    assert "manifest" in D._trusted(target, "part-2c", SIZE, 0)
    with pytest.raises(FileNotFoundError, match="generate=True"):
        An8Flower(fresh_root, "part-2c", size=SIZE, generate=False)


def test_manifest_mismatch_is_not_trusted(tmp_path, datasets):
    dst = _copy_cache(datasets["part-2c"], tmp_path)
    assert D._trusted(dst, "part-2c", SIZE, 0) is None
    man = read_json(dst / "manifest.json")
    atomic_write_json({**man, "version": A.RENDER_VERSION - 1}, dst / "manifest.json")
    assert "version" in D._trusted(dst, "part-2c", SIZE, 0)
    with pytest.raises(FileNotFoundError, match="generate=True"):
        An8Flower(tmp_path, "part-2c", size=SIZE, generate=False)
    atomic_write_json(man, dst / "manifest.json")
    (dst / "index.csv").write_text((dst / "index.csv").read_text()[:-200])  # damaged index
    assert "index.csv" in D._trusted(dst, "part-2c", SIZE, 0)


def test_corrupt_png_raises_naming_the_file(tmp_path, datasets):
    dst = _copy_cache(datasets["part-2c"], tmp_path, rows=(17, 18, 20, 1500))
    ds = An8Flower(tmp_path, "part-2c", size=SIZE, generate=False)
    row = ds.index.iloc[17]
    img = dst / row["path"]
    img.write_bytes(img.read_bytes()[:-40])  # truncated
    with pytest.raises(RuntimeError, match=row["path"].split("/")[-1]) as err:
        ds[17]
    assert str(img) in str(err.value)
    ds[18]  # the other items still load
    mask = dst / ds.index.iloc[1500]["mask_path"]
    data = bytearray(mask.read_bytes())
    data[60] ^= 0xFF  # a flipped byte, same length
    mask.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=str(mask)):
        ds[1500]
    (dst / ds.index.iloc[20]["path"]).unlink()
    with pytest.raises(RuntimeError, match="cannot read"):
        ds[20]


def test_crc_column_matches_files(datasets):
    ds = datasets["part-2c"]
    for i in (0, 999, 1432):
        row = ds.index.iloc[i]
        assert zlib.crc32((ds.folder / row["path"]).read_bytes()) == row["crc32"]
        assert zlib.crc32((ds.folder / row["mask_path"]).read_bytes()) == row["mask_crc32"]


# ---------------------------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------------------------
def test_bad_arguments(tmp_path, datasets):
    with pytest.raises(ValueError, match="single-6c.*double-12c.*part-2c"):
        An8Flower(tmp_path, "single-7c")
    with pytest.raises(ValueError, match="variant"):
        An8Flower(tmp_path, None)
    for size in (31, 0, -5, 32.0, "64", True, None, 4096):
        with pytest.raises(ValueError, match="size"):
            An8Flower(tmp_path, "single-6c", size=size)
    for seed in (-1, 1.5, "0", None):
        with pytest.raises(ValueError, match="seed"):
            An8Flower(tmp_path, "single-6c", size=SIZE, seed=seed)
    with pytest.raises(TypeError, match="root"):
        An8Flower(None)
    with pytest.raises(TypeError, match="generate"):
        An8Flower(tmp_path, "single-6c", size=SIZE, generate="yes")
    with pytest.raises(TypeError, match="transform"):
        An8Flower(tmp_path, "single-6c", size=SIZE, transform=3)
    with pytest.raises(FileNotFoundError, match="generate=True"):
        An8Flower(tmp_path, "single-6c", size=SIZE, generate=False)
    assert not (tmp_path / "an8flower" / "single-6c-32-seed0").exists()
    ds = datasets["part-2c"]
    for fold in (-1, 5, 1.0, "0"):
        with pytest.raises(ValueError, match="fold"):
            ds.fold_indices(fold)


@pytest.mark.slow
def test_full_size_single_6c(fresh_root):
    """One full-size class set: 6000 images of 128 x 128 and their masks."""
    ds = An8Flower(fresh_root, "single-6c", size=128, progress=False)
    assert len(ds) == 6000
    x, y, m = ds[4999]
    assert x.shape == (3, 128, 128) and m.shape == (128, 128) and m.any() and y == 4
    assert len(list((ds.folder / "images").rglob("*.png"))) == 6000
    assert len(list((ds.folder / "masks").rglob("*.png"))) == 1000  # one head mask per item, shared
