"""A test-made image folder: drawn shapes of a few classes, with masks, in both layouts, and
torchvision models whose weights the tests save themselves (nothing is downloaded)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle")


def draw(shape: str, size: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """A coloured shape at a random place and scale on a noisy background, and its mask."""
    bg = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    mask = Image.new("L", (size, size), 0)
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    color = tuple(int(c) for c in rng.integers(150, 256, 3))
    box = [cx - r, cy - r, cx + r, cy + r]
    for canvas, fill in ((ImageDraw.Draw(img), color), (ImageDraw.Draw(mask), 255)):
        if shape == "disc":
            canvas.ellipse(box, fill=fill)
        elif shape == "square":
            canvas.rectangle(box, fill=fill)
        else:
            canvas.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img, mask


def make_folder(root: Path, *, per_class: int = 12, size: int = 72, split: bool = False, seed: int = 0,
                classes: tuple[str, ...] = SHAPES) -> tuple[Path, Path]:
    """``root/images`` and ``root/masks`` (the same relative paths; masks as .png, images as .jpg
    and .png). ``split``: ``train/`` and ``val/`` sub-folders (a quarter of each class in val)."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    for cls in classes:
        for i in range(per_class):
            part = ("val" if i < per_class // 4 else "train") if split else ""
            rel = Path(part) / cls / f"{cls}_{i:03d}"
            img, mask = draw(cls, size, rng)
            ext = ".jpg" if i % 2 else ".png"
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            (masks / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save((images / rel).with_suffix(ext), quality=95)
            mask.save((masks / rel).with_suffix(".png"))
    return images, masks


def save_weights(arch: str, path: Path, num_classes: int = len(SHAPES), seed: int = 0) -> Path:
    """A torchvision model with seeded random weights, saved as a state_dict."""
    from vxnb.models import build_model

    torch.manual_seed(seed)
    model = build_model(arch, num_classes=num_classes)
    torch.save(model.state_dict(), path)
    return path
