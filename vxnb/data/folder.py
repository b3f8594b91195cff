"""User image folders (ILSVRC or Fashion144k subsets), one sub-folder per class, optional masks.

Layout, as torchvision's ``ImageFolder``::

    root/<class>/<...>/<image>.<ext>          masks_root/<class>/<...>/<image>.<any image ext>

Classes are the sorted sub-folder names. A mask has the same relative path as its image (any
image extension); a nonzero pixel is "on". Images are resized (shorter side to ``resize``,
bilinear with antialiasing), centre-cropped to ``size`` × ``size`` and optionally normalised;
masks go through the same geometry with nearest-neighbour interpolation.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from .._checks import check_fraction, check_path

__all__ = ["IMG_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataset", "load_image_folder",
           "read_class_names", "folder_layout", "image_to_tensor"]

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
        on_error: what to do with a file that is not a readable image (its header is read when
            the dataset is made): ``"raise"`` (default) refuses the folder with a ValueError listing
            the paths; ``"skip"`` leaves them out with a warning giving their count and paths.
            A mask whose size differs from its image is always refused.
        arg_names: the names of ``root`` and ``masks_root`` in error messages (e.g. ``data_root``
            and ``mask_root`` when a run configuration passes them).

    Attributes: ``classes``, ``class_to_idx``, ``samples`` (list of (path, label)), ``targets``,
    ``masks`` (list of mask paths or None).
    """

    def __init__(self, root: str | os.PathLike, size: int = 224, normalize: bool | tuple[Sequence[float], Sequence[float]] = False,
                 masks_root: str | os.PathLike | None = None, extensions: Sequence[str] = IMG_EXTENSIONS,
                 resize: int | None = None, on_error: str = "raise",
                 arg_names: tuple[str, str] = ("root", "masks_root")):
        a_root, a_masks = arg_names
        self.root = check_path(root, a_root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{a_root}: no folder at {self.root}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
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
            raise ValueError(f"{a_root}: {self.root} has no class sub-folders (expected {a_root}/<class>/<image>)")
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
            raise ValueError(f"{a_root}: class folder(s) {empty} under {self.root} hold no images with extensions "
                             f"{self.extensions}")
        self.samples, self.skipped, alpha = _readable(self.samples, on_error, a_root)
        if alpha:
            warnings.warn(f"{a_root}: {len(alpha)} image(s) have an alpha channel ({_show(alpha, 3)}); it is dropped: "
                          "the colour stored under transparent pixels is used as it is", stacklevel=2)
        self.targets = [label for _, label in self.samples]

        self.masks_root = None
        self.masks: list[Path] | None = None
        if masks_root is not None:
            self.masks_root = check_path(masks_root, a_masks)
            if not self.masks_root.is_dir():
                raise FileNotFoundError(f"{a_masks}: no folder at {self.masks_root}")
            self.masks, missing = [], []
            for path, _ in self.samples:
                mask = self._find_mask(path)
                if mask is None:
                    missing.append(path.relative_to(self.root))
                self.masks.append(mask)
            if missing:
                shown = ", ".join(str(m) for m in missing[:5]) + (f", … ({len(missing)} in all)" if len(missing) > 5 else "")
                raise FileNotFoundError(f"{a_masks}: no mask under {self.masks_root} for {shown} "
                                        f"(expected the same relative path with an image extension)")
            _check_mask_sizes(self.samples, self.masks, a_masks)

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
                x = image_to_tensor(im, path)
        except OSError as err:
            raise ValueError(f"{path}: not a readable image ({err})") from err
        height, width = x.shape[1:]
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
        if m.shape != (height, width):
            raise ValueError(f"{mpath}: the mask is {m.shape[1]}×{m.shape[0]} but its image {path} is "
                             f"{width}×{height}; masks must have their image's size")
        mask = torch.from_numpy((m > 0).astype(np.uint8))[None]
        mask = self._geometry(mask, TF.InterpolationMode.NEAREST)[0].bool()
        return x, label, mask

    def __repr__(self) -> str:
        extra = f", masks_root={str(self.masks_root)!r}" if self.masks_root else ""
        return (f"ImageFolderDataset(root={str(self.root)!r}, n={len(self)}, classes={len(self.classes)}, "
                f"size={self.size}{extra})")


def _show(paths: Sequence[Any], n: int = 5) -> str:
    return ", ".join(str(p) for p in paths[:n]) + (f", … ({len(paths)} in all)" if len(paths) > n else "")


#: PIL modes of 16-bit integer images (rescaled by 1/65535, not clipped to 8 bits).
_MODES_16 = ("I;16", "I;16B", "I;16L", "I;16N")
#: PIL modes that carry an alpha channel.
_MODES_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _MODES_ALPHA or (im.mode == "P" and "transparency" in im.info)


def image_to_tensor(im: Image.Image, path: Any = "image") -> torch.Tensor:
    """A PIL image as float32 (3, H, W) in [0, 1], at the precision it was stored in: 8-bit
    images / 255; 16-bit ones ("I;16", and "I", as 16-bit PNGs open) / 65535; float ("F")
    images as they are, which must lie in [0, 1]; grey levels repeated over three channels; an
    alpha channel dropped. (``Image.convert("RGB")`` would clip 16-bit and float images to 8 bits.)"""
    mode = im.mode
    if mode in _MODES_16 or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode == "F":
            if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise ValueError(f"{path}: a float image must hold values in [0, 1], got "
                                 f"[{np.nanmin(a):g}, {np.nanmax(a):g}]")
        else:
            if a.min() < 0 or a.max() > 65535:
                raise ValueError(f"{path}: a 32-bit integer image must hold 16-bit values (0..65535), got "
                                 f"[{a.min():g}, {a.max():g}]")
            a = a / 65535.0
        x = torch.from_numpy(a.astype(np.float32))[None].expand(3, -1, -1).contiguous()
        return x
    return TF.pil_to_tensor(im.convert("RGB")).float().div_(255)


#: The last bytes of a complete file: JPEG's end-of-image marker, PNG's IEND chunk.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def _ends_whole(path: Path, fmt: str | None) -> bool:
    """Whether a JPEG or PNG file ends with its end marker (a cheap check that it is not
    truncated; other formats, and files that lack it, are decoded whole instead)."""
    marker = _END_MARKERS.get(fmt or "")
    if marker is None:
        return False
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - len(marker)))
        return f.read() == marker


def _readable(samples: list[tuple[Path, int]], on_error: str,
              arg: str) -> tuple[list[tuple[Path, int]], list[Path], list[Path]]:
    """Keep the samples PIL can read whole, so that a truncated file fails here and not
    mid-extraction (a JPEG or PNG that ends with its end marker is taken as whole; any other file
    is decoded); refuse or skip (with a warning) the others. Also returns those with an alpha
    channel."""
    from tqdm.auto import tqdm

    keep, bad, alpha = [], [], []
    for path, label in tqdm(samples, desc="checking images", unit="img", leave=False,
                            disable=len(samples) < 500):
        try:
            with Image.open(path) as im:
                if not _ends_whole(path, im.format):
                    im.load()  # decodes every pixel: PIL raises OSError on a truncated file
                if _has_alpha(im):
                    alpha.append(path)
            keep.append((path, label))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            bad.append(path)
    if bad and on_error == "raise":
        raise ValueError(f"{arg}: {len(bad)} file(s) are not readable images: {_show(bad)} "
                         "(remove them, or pass on_error='skip' to leave them out with a warning)")
    if bad:
        warnings.warn(f"{arg}: skipped {len(bad)} unreadable image(s): {_show(bad)}", stacklevel=3)
    if not keep:
        raise ValueError(f"{arg}: no readable images")
    return keep, bad, alpha


def _check_mask_sizes(samples: list[tuple[Path, int]], masks: list[Path], arg: str) -> None:
    """Every mask has its image's size (read from the headers, no decoding)."""
    wrong = []
    for (path, _), mpath in zip(samples, masks):
        try:
            with Image.open(path) as im, Image.open(mpath) as mim:
                if im.size != mim.size:
                    wrong.append(f"{mpath} is {mim.size[0]}×{mim.size[1]} but {path.name} is {im.size[0]}×{im.size[1]}")
        except (OSError, ValueError) as err:
            wrong.append(f"{mpath}: not a readable mask image ({err})")
    if wrong:
        raise ValueError(f"{arg}: {len(wrong)} mask(s) do not fit their images: {_show(wrong, 3)}; "
                         "a mask must have its image's size")


#: Sub-folder names of a split layout: training images, and the held-out ones (first found).
TRAIN_DIR = "train"
VAL_DIRS = ("val", "test")


def folder_layout(root: str | os.PathLike) -> tuple[Path, Path] | None:
    """``(train folder, validation folder)`` when ``root`` holds ``train/`` and ``val/`` (or
    ``test/``), else ``None`` (one class-per-folder tree, to be split)."""
    root = Path(root)
    if (root / TRAIN_DIR).is_dir():
        for name in VAL_DIRS:
            if (root / name).is_dir():
                return root / TRAIN_DIR, root / name
    return None


def load_image_folder(data_root: str | os.PathLike, *, mask_root: str | os.PathLike | None = None,
                      image_size: int = 224, val_fraction: float = 0.2, seed: int = 0,
                      on_error: str = "raise") -> tuple[Dataset, Dataset, list[str]]:
    """``(train, val, class folder names)`` of a user's image folder; images in [0, 1].

    ``data_root`` either holds ``train/`` and ``val/`` (or ``test/``) sub-folders, each with one
    folder per class (the same classes), or is itself one class-per-folder tree that is split by
    ``seed``, stratified, with ``val_fraction`` of each class held out. ``mask_root`` mirrors
    ``data_root`` (same relative paths). Images are resized (short side) to ``image_size`` and
    centre-cropped; normalisation belongs to the model (:func:`vxnb.models.normalize_input`).
    """
    from torch.utils.data import Subset

    from .mnist import stratified_split

    if not check_path(data_root, "data_root").is_dir():
        raise FileNotFoundError(f"data_root: no folder at {data_root}")
    names = ("data_root", "mask_root")
    split = folder_layout(data_root)

    def open_(root: Path, masks: Path | None) -> ImageFolderDataset:
        return ImageFolderDataset(root, size=image_size, masks_root=masks, on_error=on_error, arg_names=names)

    if split is not None:
        masks = [None, None] if mask_root is None else [Path(mask_root) / p.name for p in split]
        train, val = open_(split[0], masks[0]), open_(split[1], masks[1])
        if train.classes != val.classes:
            raise ValueError(f"data_root: {split[0]} and {split[1]} must hold the same class folders, got "
                             f"{train.classes} and {val.classes}")
        return train, val, list(train.classes)
    check_fraction(val_fraction, "val_fraction")
    full = open_(Path(data_root), None if mask_root is None else Path(mask_root))
    train_idx, val_idx = stratified_split(np.asarray(full.targets, dtype=np.int64), test_fraction=val_fraction,
                                          seed=seed)
    return Subset(full, train_idx.tolist()), Subset(full, val_idx.tolist()), list(full.classes)


def read_class_names(path: str | os.PathLike, classes: Sequence[str]) -> list[str]:
    """Display names for the class folders ``classes`` from a JSON file: a list (one name per
    class, in sorted folder order), a mapping ``{folder: name}``, or ImageNet's class index
    ``{"0": ["n01440764", "tench"], …}``. A folder missing from a mapping keeps its own name."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"class_names: no file at {p}")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"class_names: {p} is not a JSON file ({err})") from err
    if isinstance(data, list):
        if len(data) != len(classes) or not all(isinstance(n, str) for n in data):
            raise ValueError(f"class_names: {p} lists {len(data)} names; the data has {len(classes)} classes")
        return list(data)
    if not isinstance(data, dict):
        raise ValueError(f"class_names: expected a JSON list or mapping in {p}, got {type(data).__name__}")
    mapping = {}
    for key, value in data.items():
        if isinstance(value, str):
            mapping[str(key)] = value
        elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            mapping[value[0]] = value[1]  # ImageNet's index: id -> [folder (wnid), name]
        else:
            raise ValueError(f"class_names: {p}: expected names or [folder, name] pairs, got {key!r}: {value!r}")
    return [mapping.get(c, c) for c in classes]
