"""User image folders (ILSVRC or Fashion144k subsets), one sub-folder per class, optional masks.

Layout, as torchvision's ``ImageFolder``::

    root/<class>/<...>/<image>.<ext>          masks_root/<class>/<...>/<image>.<any image ext>

Classes are the sorted sub-folder names. A mask has the same relative path as its image (any
image extension); a nonzero pixel is "on". Images are resized (shorter side to ``resize``,
bilinear with antialiasing), centre-cropped to ``size`` × ``size`` and optionally normalised;
masks go through the same geometry with nearest-neighbour interpolation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from ..utils import describe

__all__ = ["IMG_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataset"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderDataset(Dataset):
    """Images of a class-per-folder tree as ``(image, label)`` or ``(image, label, mask)``.

    Args:
        root: folder with one sub-folder per class.
        size: output side S; images come out as float32 (3, S, S).
        normalize: ``False`` (values in [0, 1], the package's convention), ``True`` (ImageNet
            mean/std) or a pair ``(mean, std)`` of 3-sequences.
        masks_root: optional folder mirroring ``root`` with one mask per image (same relative
            path, any image extension). Items then carry a bool mask (S, S).
        extensions: file name endings counted as images (case-insensitive).
        resize: the shorter side before the centre crop; default ``size`` (the crop keeps the whole
            short side). ``round(size / 0.875)`` gives the usual ImageNet evaluation crop.

    Attributes: ``classes``, ``class_to_idx``, ``samples`` (list of (path, label)), ``targets``,
    ``masks`` (list of mask paths or None).
    """

    def __init__(self, root: str | os.PathLike, size: int = 224, normalize: bool | tuple[Sequence[float], Sequence[float]] = False,
                 masks_root: str | os.PathLike | None = None, extensions: Sequence[str] = IMG_EXTENSIONS,
                 resize: int | None = None):
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root: expected a folder path, got {describe(root)}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root: no folder at {self.root}")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size: expected a positive int, got {size!r}")
        self.size = int(size)
        if resize is None:
            resize = self.size
        if isinstance(resize, bool) or not isinstance(resize, (int, np.integer)) or resize < self.size:
            raise ValueError(f"resize: expected an int ≥ size={self.size} (or None), got {resize!r}")
        self.resize = int(resize)
        self.mean, self.std = self._check_normalize(normalize)
        if isinstance(extensions, str):
            extensions = (extensions,)
        if not extensions or not all(isinstance(e, str) and e for e in extensions):
            raise ValueError(f"extensions: expected a non-empty sequence of file endings like '.png', got {extensions!r}")
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)

        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise ValueError(f"root: {self.root} has no class sub-folders (expected root/<class>/<image>)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for c in self.classes:
            files = sorted(p for p in (self.root / c).rglob("*")
                           if p.is_file() and p.suffix.lower() in self.extensions and not p.name.startswith("."))
            if not files:
                empty.append(c)
            self.samples.extend((p, self.class_to_idx[c]) for p in files)
        if empty:
            raise ValueError(f"root: class folder(s) {empty} under {self.root} hold no images with extensions "
                             f"{self.extensions}")
        self.targets = [label for _, label in self.samples]

        self.masks_root = None
        self.masks: list[Path] | None = None
        if masks_root is not None:
            if not isinstance(masks_root, (str, os.PathLike)):
                raise TypeError(f"masks_root: expected a folder path, got {describe(masks_root)}")
            self.masks_root = Path(masks_root)
            if not self.masks_root.is_dir():
                raise FileNotFoundError(f"masks_root: no folder at {self.masks_root}")
            self.masks, missing = [], []
            for path, _ in self.samples:
                mask = self._find_mask(path)
                if mask is None:
                    missing.append(path.relative_to(self.root))
                self.masks.append(mask)
            if missing:
                shown = ", ".join(str(m) for m in missing[:5]) + (f", … ({len(missing)} in all)" if len(missing) > 5 else "")
                raise FileNotFoundError(f"masks_root: no mask under {self.masks_root} for {shown} "
                                        f"(expected the same relative path with an image extension)")

    @staticmethod
    def _check_normalize(normalize: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if normalize is False or normalize is None:
            return None, None
        if normalize is True:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            try:
                mean, std = normalize
                mean, std = [float(v) for v in mean], [float(v) for v in std]
            except (TypeError, ValueError) as err:
                raise ValueError(f"normalize: expected False, True or (mean, std) with three values each, "
                                 f"got {normalize!r}") from err
            if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
                raise ValueError(f"normalize: expected (mean, std) with three values each and std > 0, got {normalize!r}")
        return torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def _find_mask(self, image_path: Path) -> Path | None:
        rel = image_path.relative_to(self.root)
        base = self.masks_root / rel
        if base.is_file():
            return base
        for ext in IMG_EXTENSIONS + tuple(e.upper() for e in IMG_EXTENSIONS):
            candidate = base.with_suffix(ext)
            if candidate.is_file():
                return candidate
        return None

    def __len__(self) -> int:
        return len(self.samples)

    def _geometry(self, img: torch.Tensor, interpolation: TF.InterpolationMode) -> torch.Tensor:
        img = TF.resize(img, [self.resize], interpolation=interpolation,
                        antialias=interpolation != TF.InterpolationMode.NEAREST)
        return TF.center_crop(img, [self.size, self.size])

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                pil = im.convert("RGB")
        except OSError as err:
            raise ValueError(f"{path}: not a readable image ({err})") from err
        x = TF.pil_to_tensor(pil).float().div_(255)
        x = self._geometry(x, TF.InterpolationMode.BILINEAR).clamp_(0, 1)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        if self.masks is None:
            return x, label
        mpath = self.masks[i]
        try:
            with Image.open(mpath) as mim:
                m = np.array(mim.convert("L"))
        except OSError as err:
            raise ValueError(f"{mpath}: not a readable mask image ({err})") from err
        if m.shape != (pil.height, pil.width):
            raise ValueError(f"{mpath}: the mask is {m.shape[1]}×{m.shape[0]} but its image {path} is "
                             f"{pil.width}×{pil.height}; masks must have their image's size")
        mask = torch.from_numpy((m > 0).astype(np.uint8))[None]
        mask = self._geometry(mask, TF.InterpolationMode.NEAREST)[0].bool()
        return x, label, mask

    def __repr__(self) -> str:
        extra = f", masks_root={str(self.masks_root)!r}" if self.masks_root else ""
        return (f"ImageFolderDataset(root={str(self.root)!r}, n={len(self)}, classes={len(self.classes)}, "
                f"size={self.size}{extra})")
