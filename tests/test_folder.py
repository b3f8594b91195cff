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
