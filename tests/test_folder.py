"""vxnb.data.folder.ImageFolderDataset on a tiny folder of PNGs built in tmp_path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vxnb.data.folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset


def _square_image(h: int, w: int, box: tuple[int, int, int, int], color=(255, 255, 255)) -> tuple[Image.Image, np.ndarray]:
    """A black RGB image with a coloured rectangle (y0, y1, x0, x1); returns it and its bool mask."""
    arr = np.zeros((h, w, 3), np.uint8)
    y0, y1, x0, x1 = box
    arr[y0:y1, x0:x1] = color
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return Image.fromarray(arr), mask


@pytest.fixture
def tree(tmp_path):
    """root/{cat,dog}/*.png (+ a nested sub-folder and a non-image file), masks/ as .png/.bmp."""
    root, masks = tmp_path / "images", tmp_path / "masks"
    specs = {
        "dog": [("a.png", 32, 32, (4, 20, 8, 30)), ("sub/b.png", 40, 32, (0, 10, 0, 10))],
        "cat": [("c.png", 32, 48, (10, 22, 20, 40)), ("d.jpg", 32, 32, (8, 24, 8, 24))],
    }
    truth = {}
    for cls, items in specs.items():
        for rel, h, w, box in items:
            img, mask = _square_image(h, w, box)
            p = root / cls / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            img.save(p)
            mp = (masks / cls / rel).with_suffix(".bmp" if rel.endswith("jpg") else ".png")
            mp.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 7).save(mp)  # any nonzero value is "on"
            truth[p] = mask
    (root / "dog" / "notes.txt").write_text("not an image")
    return root, masks, truth


def test_classes_and_order_match_torchvision(tree):
    from torchvision.datasets import ImageFolder  # independent reference for the layout rules
    root, _, _ = tree
    ds = ImageFolderDataset(root, size=32)
    ref = ImageFolder(str(root))
    assert ds.classes == ref.classes == ["cat", "dog"]
    assert ds.class_to_idx == ref.class_to_idx
    assert sorted((str(p), y) for p, y in ds.samples) == sorted(ref.samples)
    assert len(ds) == 4 and ds.targets.count(0) == 2


def test_items_shapes_ranges_and_masks(tree):
    root, masks, truth = tree
    ds = ImageFolderDataset(root, size=32, masks_root=masks)
    for i in range(len(ds)):
        x, y, m = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert 0 <= float(x.min()) and float(x.max()) <= 1
        assert m.shape == (32, 32) and m.dtype == torch.bool
        assert y == ds.targets[i]
        path = ds.samples[i][0]
        if truth[path].shape == (32, 32):  # no resize, no crop: mask must be the exact box
            np.testing.assert_array_equal(m.numpy(), truth[path])
            if path.suffix == ".png":      # lossless: image is white exactly on the mask
                np.testing.assert_array_equal((x.mean(0) > 0.5).numpy(), truth[path])
        else:                               # resized/cropped: mask and image still agree
            agree = ((x.mean(0) > 0.5) == m).float().mean()
            assert agree > 0.95


def test_resize_and_centre_crop_geometry(tree):
    root, masks, truth = tree
    ds = ImageFolderDataset(root, size=16, masks_root=masks)
    i = [str(p).endswith("c.png") for p, _ in ds.samples].index(True)
    x, _, m = ds[i]
    # 32×48 image -> shorter side 16 -> 16×24 -> centre crop columns 4..20; the box (10:22, 20:40)
    # becomes rows 5..11, columns 10..20 -> 6..16 after the crop.
    expected = np.zeros((16, 16), bool)
    expected[5:11, 6:16] = True
    np.testing.assert_array_equal(m.numpy(), expected)


def test_normalize(tree):
    root, _, _ = tree
    plain = ImageFolderDataset(root, size=32)
    norm = ImageFolderDataset(root, size=32, normalize=True)
    x0, x1 = plain[0][0], norm[0][0]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x1, (x0 - mean) / std)
    custom = ImageFolderDataset(root, size=32, normalize=([0.5] * 3, [0.25] * 3))
    torch.testing.assert_close(custom[0][0], (x0 - 0.5) / 0.25)


def test_errors(tree, tmp_path):
    root, masks, _ = tree
    with pytest.raises(FileNotFoundError, match="root"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "empty" / "bird").mkdir()
    with pytest.raises(ValueError, match="bird"):
        ImageFolderDataset(tmp_path / "empty")
    (masks / "cat" / "c.png").unlink()
    with pytest.raises(FileNotFoundError, match="c.png"):
        ImageFolderDataset(root, size=32, masks_root=masks)
    with pytest.raises(FileNotFoundError, match="masks_root"):
        ImageFolderDataset(root, masks_root=tmp_path / "no-masks")
    with pytest.raises(ValueError, match="size"):
        ImageFolderDataset(root, size=0)
    with pytest.raises(ValueError, match="resize"):
        ImageFolderDataset(root, size=32, resize=16)
    with pytest.raises(ValueError, match="normalize"):
        ImageFolderDataset(root, normalize=([0.5], [0.5]))
    with pytest.raises(ValueError, match="extensions"):
        ImageFolderDataset(root, extensions=[])


def test_mask_size_mismatch(tree):
    root, masks, _ = tree
    Image.fromarray(np.ones((10, 10), np.uint8)).save(masks / "dog" / "a.png")
    with pytest.raises(ValueError, match=r"masks_root: 1 mask\(s\) do not fit .*a.png is 10×10 but a.png is 32×32"):
        ImageFolderDataset(root, size=32, masks_root=masks)  # refused up front, before any item is read


# ----------------------------------------------------------------------------- pixel formats (issue 24)
def _one_class(tmp_path, name: str, img: Image.Image):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    img.save(root / "a" / name)
    return root


def test_16_bit_images_are_rescaled_not_clipped(tmp_path):
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    root = _one_class(tmp_path, "g16.png", Image.fromarray(ramp))
    with Image.open(root / "a" / "g16.png") as im:
        assert im.mode.startswith("I")                    # a 16-bit PNG, as PIL opens it
    x, _ = ImageFolderDataset(root, size=16)[0]
    expect = torch.from_numpy(ramp.astype(np.float64) / 65535).float()
    for c in range(3):                                    # grey repeated; 0..1 over the ramp, not all 1
        torch.testing.assert_close(x[c], expect, atol=1e-6, rtol=0)


def test_float_images_are_taken_as_they_are_and_refused_outside_0_1(tmp_path):
    a = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    root = _one_class(tmp_path, "f.tif", Image.fromarray(a, mode="F"))
    x, _ = ImageFolderDataset(root, size=16)[0]
    torch.testing.assert_close(x[1], torch.from_numpy(a), atol=1e-6, rtol=0)
    root2 = _one_class(tmp_path / "2", "f.tif", Image.fromarray(a * 7, mode="F"))
    with pytest.raises(ValueError, match=r"f.tif: a float image must hold values in \[0, 1\], got \[0, 7\]"):
        ImageFolderDataset(root2, size=16)[0]


def test_alpha_channel_is_dropped_with_a_warning(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0                   # red under a fully transparent alpha
    root = _one_class(tmp_path, "t.png", Image.fromarray(rgba, mode="RGBA"))
    with pytest.warns(UserWarning, match=r"1 image\(s\) have an alpha channel .*t.png.*dropped"):
        ds = ImageFolderDataset(root, size=16)
    x, _ = ds[0]
    torch.testing.assert_close(x[0], torch.full((16, 16), 200 / 255))


def test_truncated_image_is_found_when_the_folder_is_opened(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            ext = ".png" if cls == "a" else ".jpg"
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / cls / f"{i}{ext}")
    bad = [root / "a" / "1.png", root / "b" / "1.jpg"]
    for b in bad:
        b.write_bytes(b.read_bytes()[: len(b.read_bytes()) // 2])   # the header is intact
    with pytest.raises(ValueError, match=r"2 file\(s\) are not readable images: .*1.png, .*1.jpg"):
        ImageFolderDataset(root, size=16)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image"):
        ds = ImageFolderDataset(root, size=16, on_error="skip")
    assert len(ds) == 2 and not set(bad) & {p for p, _ in ds.samples}
    for i in range(len(ds)):                               # every kept image decodes
        assert ds[i][0].shape == (3, 16, 16)
