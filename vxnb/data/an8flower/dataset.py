"""The an8Flower dataset: the on-disk cache of the renders (:mod:`.render`), its manifest and
index, the folds, and the torch Dataset.

Files: ``root/an8flower/<variant>-<size>-seed<seed>[<knobs>][-cf<k>]/`` (non-default
:class:`~.render.Knobs`, e.g. ``-ps0.8-dr0.5-cl3``; counterfactual renders ``-cf<k>``) holds ``images/<class>/*.png`` (RGB),
``masks/<region>/*.png`` (1-bit; one file shared by the classes with the same part, e.g. the
six head colours), ``index.csv`` and ``manifest.json`` (format version and parameters). A
generation writes into a hidden temporary folder beside it and renames it into place when
everything is written, so an interrupted generation never leaves a folder that a later run
trusts. ``index.csv`` stores a CRC-32 of every file, checked on every read: a damaged file
raises an error naming it.

Entry points: :class:`An8Flower` (the dataset), :func:`generate` (write a cache),
:func:`gallery` (a few items per class for a figure), :func:`fold_of_view` (the folds).
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..._store import fault_point
from ... import utils
from ..._checks import check_bool, check_path
from ...utils import atomic_write_json, describe, read_json
from .png import decode_png, encode_png
from .render import (ANGLES, CROPS, N_VIEWS, RENDER_VERSION, SUPERSAMPLE, Knobs, check_counterfactual, check_knobs,
                     check_seed, check_size, check_variant, class_specs, counterfactual_label, geometries, iter_views,
                     render_size, variant_classes)

__all__ = [
    "N_FOLDS",
    "FOLD_SPLITS",
    "check_fold",
    "fold_of_view",
    "GALLERY_VIEW",
    "cache_dir",
    "generate",
    "An8Flower",
    "gallery",
]

#: Folds, grouped by viewpoint (``fold = view % N_FOLDS``).
N_FOLDS = 5
#: How viewpoints are split into folds (:func:`fold_of_view`): ``"views"`` interleaved
#: (``view % 5``; every test view has training views 9° away on both sides), ``"blocks"``
#: contiguous (eight neighbouring views per fold, ``view // 8``).
FOLD_SPLITS: tuple[str, ...] = ("views", "blocks")
#: The viewpoint where the flower head faces the camera (the first one :func:`gallery` shows).
GALLERY_VIEW = 30
_MANIFEST = "manifest.json"
_INDEX = "index.csv"


def cache_dir(root: str | os.PathLike, variant: str = "single-6c", size: int = 128, seed: int = 0, *,
              knobs: Knobs | dict | None = None, counterfactual: int = 0) -> Path:
    """The folder holding the files of one dataset: ``root/an8flower/<variant>-<size>-seed<seed>``,
    followed by the non-default knobs (:meth:`Knobs.tag`) and ``-cf<shift>`` for counterfactual
    renders."""
    root = check_path(root, "root")
    tag = check_knobs(knobs).tag()
    shift = check_counterfactual(check_variant(variant), counterfactual)
    cf = f"-cf{shift}" if shift else ""
    return root / "an8flower" / f"{variant}-{check_size(size)}-seed{check_seed(seed)}{tag}{cf}"



def _write_many(folder: Path, rels: list[str], arrays: np.ndarray) -> list[int]:
    """Write ``arrays[k]`` as PNG to ``folder / rels[k]``; return the CRC-32 of every file's bytes."""
    crcs = []
    for rel, array in zip(rels, arrays):
        data = encode_png(array)
        with open(folder / rel, "wb") as f:
            f.write(data)
        crcs.append(zlib.crc32(data))
    return crcs


def _generate_into(folder: Path, variant: str, size: int, seed: int, progress: bool,
                   knobs: Knobs | None = None, shift: int = 0) -> None:
    """Render every item of ``variant`` into ``folder`` (images, masks, index.csv, manifest.json).

    Masks are shared: all classes drawn on the same geometry with the same class part (e.g.
    the six head colours) point to one mask file ``masks/<region>/<item>.png``. With a
    distractor rate > 0 the index gains ``distractor`` (bool), ``distractor_path`` and
    ``distractor_crc32`` (the ball's mask, ``masks/distractor/<class>/<item>.png``, where there
    is one); counterfactual renders (``shift`` > 0) gain ``cf_label`` and ``cf_class``.
    """
    knobs = check_knobs(knobs)
    specs = class_specs(variant)
    rows: list[dict] = []
    with_distractors = knobs.distractor_rate > 0
    if with_distractors:
        for spec in specs:
            (folder / "masks" / "distractor" / spec.name).mkdir(parents=True)
    for spec in specs:
        (folder / "images" / spec.name).mkdir(parents=True)
        (folder / "masks" / spec.region).mkdir(parents=True, exist_ok=True)
    items = [(c, a) for c in CROPS for a in ANGLES]
    crcs: dict[str, int] = {}
    pending: list = []

    def submit(rels: list[str], arrays: np.ndarray) -> None:  # one task per 25 files
        pending.append((rels, pool.submit(_write_many, folder, rels, arrays)))

    pool = ThreadPoolExecutor(max_workers=2)
    try:
        with tqdm(total=len(geometries(specs)) * N_VIEWS, desc=f"an8Flower {variant} {size}px", unit="view",
                  disable=None if progress else True) as bar:
            for view, images, masks, dmasks in iter_views(variant, size, seed, knobs=knobs, counterfactual=shift,
                                                          distractors=True):
                for region, mask in masks.items():
                    for k, (crop, angle) in enumerate(items):
                        if not mask[k].any():
                            raise RuntimeError(f"an8Flower: empty {region} mask at view {view}, crop {crop}, "
                                               f"angle {angle} (a bug of the flower's geometry)")
                    submit([f"masks/{region}/{_item_name(view, c, a)}" for c, a in items], mask)
                for label, imgs in images.items():
                    spec = specs[label]
                    submit([f"images/{spec.name}/{_item_name(view, c, a)}" for c, a in items], imgs)
                    has = dmasks[label].any(axis=(1, 2))
                    if has.any():
                        submit([f"masks/distractor/{spec.name}/{_item_name(view, c, a)}"
                                for (c, a), h in zip(items, has) if h], dmasks[label][has])
                    for k, (crop, angle) in enumerate(items):
                        name = _item_name(view, crop, angle)
                        row = {"label": label, "class": spec.name, "view": view, "crop": crop,
                               "angle": angle, "fold": view % N_FOLDS, "path": f"images/{spec.name}/{name}",
                               "mask_path": f"masks/{spec.region}/{name}"}
                        if with_distractors:
                            row["distractor"] = bool(has[k])
                            row["distractor_path"] = f"masks/distractor/{spec.name}/{name}" if has[k] else ""
                        if shift:
                            row["cf_label"] = counterfactual_label(variant, label, shift)
                            row["cf_class"] = specs[row["cf_label"]].name
                        rows.append(row)
                if len(pending) > 64:  # collect finished writes: errors surface early, memory stays flat
                    _collect(pending, crcs)
                bar.update(1)
                fault_point("render")
            _collect(pending, crcs)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    index = pd.DataFrame(rows)
    index["crc32"] = index["path"].map(crcs).astype(np.int64)
    index["mask_crc32"] = index["mask_path"].map(crcs).astype(np.int64)
    if with_distractors:
        index["distractor_crc32"] = index["distractor_path"].map(crcs).fillna(0).astype(np.int64)
    index = index.sort_values(["label", "view", "crop", "angle"], key=_sort_key).reset_index(drop=True)
    index.to_csv(folder / _INDEX, index=False)
    manifest = _manifest(variant, size, seed, knobs, shift)
    manifest["n_items"] = len(index)
    manifest["index_crc32"] = zlib.crc32((folder / _INDEX).read_bytes())
    atomic_write_json(manifest, folder / _MANIFEST)


def _item_name(view: int, crop: str, angle: int) -> str:
    return f"v{view:02d}-{crop}-a{angle:02d}.png"


def _sort_key(col: pd.Series) -> pd.Series:
    if col.name == "crop":
        return col.map({c: i for i, c in enumerate(CROPS)})
    return col


def _collect(pending: list, crcs: dict) -> None:
    for rels, fut in pending:
        crcs.update(zip(rels, fut.result()))
    pending.clear()


def _manifest(variant: str, size: int, seed: int, knobs: Knobs | None = None, shift: int = 0) -> dict:
    """What a cache's manifest must say (the dataset's content key reads it). Default knobs and
    factual renders add no entry, so the paper's renders keep their manifest and key."""
    out = {"dataset": "an8flower", "version": RENDER_VERSION, "variant": variant, "size": size, "seed": seed,
           "render_size": render_size(size), "supersample": SUPERSAMPLE, "n_views": N_VIEWS,
           "crops": list(CROPS), "angles": list(ANGLES), "classes": variant_classes(variant)}
    out.update(check_knobs(knobs).manifest())
    if shift:
        out["counterfactual"] = shift
    return out


def _trusted(folder: Path, variant: str, size: int, seed: int, knobs: Knobs | None = None,
             shift: int = 0) -> str | None:
    """None when ``folder`` holds a complete cache for these arguments, else why not."""
    man = folder / _MANIFEST
    if not man.is_file():
        return "it has no manifest.json (an unfinished or foreign folder)"
    try:
        manifest = read_json(man)
    except ValueError as err:
        return str(err)
    expected = _manifest(variant, size, seed, knobs, shift)
    for key in ("knobs", "counterfactual"):
        if key in manifest and key not in expected:
            return f"its manifest says {key}={manifest[key]!r}, expected none"
    for key, value in expected.items():
        if manifest.get(key) != value:
            return f"its manifest says {key}={manifest.get(key)!r}, expected {value!r}"
    index = folder / _INDEX
    if not index.is_file() or zlib.crc32(index.read_bytes()) != manifest.get("index_crc32"):
        return f"{index} is missing or damaged"
    return None


def generate(root: str | os.PathLike, variant: str = "single-6c", size: int = 128, seed: int = 0, *,
             progress: bool = True, overwrite: bool = False, knobs: Knobs | dict | None = None,
             counterfactual: int = 0) -> Path:
    """Render one variant into ``cache_dir(root, variant, size, seed, knobs=..., counterfactual=...)``
    and return that folder (``knobs``: :class:`Knobs`; ``counterfactual``: the shift of
    :func:`counterfactual_label`, 0 for the factual renders).

    Does nothing when a complete cache for these arguments is there already (unless
    ``overwrite``). The files are written into a temporary folder beside the target and renamed
    into place at the end; on an error the temporary folder is removed.
    """
    variant, size, seed = check_variant(variant), check_size(size), check_seed(seed)
    knobs, shift = check_knobs(knobs), check_counterfactual(variant, counterfactual)
    check_bool(overwrite, "overwrite")
    return _generate_cache(root, variant, size, seed, progress, overwrite, knobs, shift)


def _generate_cache(root, variant: str, size: int, seed: int, progress: bool, overwrite: bool,
                    knobs: Knobs | None = None, shift: int = 0) -> Path:
    from filelock import FileLock

    target = cache_dir(root, variant, size, seed, knobs=knobs, counterfactual=shift)
    if not overwrite and _trusted(target, variant, size, seed, knobs, shift) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    locks = target.parent.parent / ".vxnb-store" / "locks"  # beside the data, not in its folder
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"an8flower-{target.name}.lock")):  # a concurrent process waits, then reads
        if not overwrite and _trusted(target, variant, size, seed, knobs, shift) is None:
            return target
        return _render_cache(target, variant, size, seed, progress, knobs, shift)


def _render_cache(target: Path, variant: str, size: int, seed: int, progress: bool,
                  knobs: Knobs | None = None, shift: int = 0) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _generate_into(tmp, variant, size, seed, progress, knobs, shift)
        utils.fsync_tree(tmp)  # every file on disk before the rename publishes the folder (as _store does)
        if target.exists():  # stale or unfinished: move it aside, then replace it
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".stale", dir=target.parent))
            try:
                os.replace(target, stale / "old")
            except FileNotFoundError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
            utils.fsync_dir(target.parent)  # and the rename itself
        except OSError:
            # another process finished the same cache first: keep theirs if it is complete
            if _trusted(target, variant, size, seed, knobs, shift) is not None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
def check_fold(fold: Any, arg: str = "fold") -> int:
    """``fold`` must be a fold number in 0..N_FOLDS-1 (an int, not a bool); ``arg`` names it."""
    if isinstance(fold, (bool, np.bool_)) or not isinstance(fold, (int, np.integer)) or not 0 <= int(fold) < N_FOLDS:
        raise ValueError(f"{arg}: expected an int in 0..{N_FOLDS - 1} (an8Flower has {N_FOLDS} folds), "
                         f"got {describe(fold)}")
    return int(fold)


def fold_of_view(view: Any, folds: str = "views") -> np.ndarray:
    """The fold (0..4) of each viewpoint (0..39) under the split ``folds`` (:data:`FOLD_SPLITS`):
    ``"views"``: ``view % 5``; ``"blocks"``: ``view // 8`` (views 0-7, 8-15, ... 32-39)."""
    if not isinstance(folds, str) or folds not in FOLD_SPLITS:
        raise ValueError(f"folds: expected one of {', '.join(map(repr, FOLD_SPLITS))}, got {describe(folds)}")
    v = np.asarray(view)
    if not np.issubdtype(v.dtype, np.integer) or ((v < 0) | (v >= N_VIEWS)).any():
        raise ValueError(f"view: expected viewpoints (ints) in 0..{N_VIEWS - 1}, got {describe(view)}")
    return v % N_FOLDS if folds == "views" else v // (N_VIEWS // N_FOLDS)


class An8Flower(Dataset):
    """The an8Flower dataset (rendered here on first use and cached on disk).

    Args:
        root: folder holding ``an8flower/`` (e.g. the repository's ``data/``).
        variant: one of :data:`VARIANTS`.
        size: side of the square images (int, 32 to 1024).
        generate: render the dataset when no complete cache is there; with ``False`` a missing
            cache is an error.
        seed: the renderer's seed (jitters petal lengths, leaf angles and the light slightly).
        transform: applied to the image tensor only (photometric transforms / normalisation;
            a geometric transform would no longer match the mask).
        progress: show a progress bar while rendering.
        knobs: difficulty knobs (:class:`Knobs` or a dict of its fields; part size, distractor
            rate, clutter); ``None`` draws the paper's images.
        counterfactual: 0 for the factual renders; a shift k > 0 gives the counterfactual
            renders -- every item exactly the factual item of the same index (pose, crop,
            rotation, clutter, distractor) with only its class attribute (the colour of its
            class part) replaced by class ``index["cf_label"]``'s. Labels and masks stay the
            factual ones.

    Items are ``(image, label, mask)``: image float32 (3, size, size) in [0, 1], label int,
    mask bool (size, size), True on the part that defines the item's class.

    Attributes: ``classes`` (names in label order), ``class_to_idx``, ``regions`` (the part each
    class's mask covers), ``index`` (DataFrame, one row per item: label, class, view, crop,
    angle, fold, path, mask_path, crc32, mask_crc32; with distractors also distractor,
    distractor_path, distractor_crc32; counterfactuals also cf_label, cf_class), ``targets``
    (int64 array), ``folder``, ``knobs``, ``counterfactual``.
    """

    def __init__(self, root: str | os.PathLike, variant: str = "single-6c", size: int = 128,
                 generate: bool = True, seed: int = 0, transform: Callable | None = None, *,
                 progress: bool = True, knobs: Knobs | dict | None = None, counterfactual: int = 0):
        root = check_path(root, "root")
        self.variant, self.size, self.seed = check_variant(variant), check_size(size), check_seed(seed)
        self.knobs, self.counterfactual = check_knobs(knobs), check_counterfactual(self.variant, counterfactual)
        kw = {"knobs": self.knobs, "counterfactual": self.counterfactual}
        check_bool(generate, "generate")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform: expected a callable or None, got {describe(transform)}")
        self.root, self.transform = root, transform
        folder = cache_dir(root, variant, size, seed, **kw)
        why = _trusted(folder, self.variant, self.size, self.seed, self.knobs, self.counterfactual)
        if why is not None:
            if not generate:
                raise FileNotFoundError(
                    f"an8Flower {variant} (size {size}, seed {seed}) is not in {folder}: {why}. "
                    "Pass generate=True to render it (seconds at size 128).")
            _generate_cache(root, self.variant, self.size, self.seed, bool(progress), False, self.knobs,
                            self.counterfactual)
        self.folder = folder
        specs = class_specs(self.variant)
        self.classes: list[str] = [s.name for s in specs]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.regions: list[str] = [s.region for s in specs]
        index = pd.read_csv(folder / _INDEX)
        expected_cols = {"label", "class", "view", "crop", "angle", "fold", "path", "mask_path", "crc32", "mask_crc32"}
        if not expected_cols <= set(index.columns) or len(index) != N_VIEWS * len(CROPS) * len(ANGLES) * len(specs):
            raise RuntimeError(f"{folder / _INDEX}: unexpected content; delete {folder} and construct again")
        self.index: pd.DataFrame = index
        self.targets: np.ndarray = index["label"].to_numpy(dtype=np.int64)
        # plain lists for fast item access (DataFrame row access costs ~0.1 ms)
        self._files = list(zip(index["path"], index["crc32"].astype(np.int64).tolist(),
                               index["mask_path"], index["mask_crc32"].astype(np.int64).tolist()))

    @property
    def labels(self) -> np.ndarray:
        """Alias of ``targets``."""
        return self.targets

    def __len__(self) -> int:
        return len(self.index)

    def _read(self, rel: str, crc: int) -> np.ndarray:
        path = self.folder / rel
        try:
            data = path.read_bytes()
        except OSError as err:
            raise RuntimeError(f"an8Flower: cannot read {path} ({err}); delete {self.folder} to regenerate") from err
        if zlib.crc32(data) != int(crc):
            raise RuntimeError(f"an8Flower: corrupt file {path} (checksum mismatch); "
                               f"delete {self.folder} and construct the dataset again to regenerate it")
        try:
            fast = decode_png(data)
            if fast is not None:
                return fast
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im)
        except (OSError, SyntaxError, ValueError, zlib.error, struct.error) as err:
            raise RuntimeError(f"an8Flower: cannot decode {path} ({err}); "
                               f"delete {self.folder} and construct the dataset again to regenerate it") from err

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        if not isinstance(i, (int, np.integer)) or isinstance(i, (bool, np.bool_)):
            raise TypeError(f"index: expected an int, got {describe(i)}")
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"index: {i} out of range for {n} items")
        i = int(i) % n
        path, crc, mask_path, mask_crc = self._files[i]
        img = self._read(path, crc)
        mask = self._read(mask_path, mask_crc)
        if img.shape != (self.size, self.size, 3) or img.dtype != np.uint8:
            raise RuntimeError(f"an8Flower: {self.folder / path} holds {describe(img)}, "
                               f"expected ({self.size}, {self.size}, 3) uint8")
        if mask.shape != (self.size, self.size):
            raise RuntimeError(f"an8Flower: {self.folder / mask_path} holds {describe(mask)}, "
                               f"expected ({self.size}, {self.size})")
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[i]), torch.from_numpy(mask.astype(bool))

    def distractor_mask(self, i: int) -> torch.Tensor:
        """bool (size, size): the distractor ball of item ``i`` (all False where it has none)."""
        if "distractor" not in self.index.columns:
            raise ValueError(f"distractor_mask: this dataset has no distractors (knobs={self.knobs})")
        if not isinstance(i, (int, np.integer)) or isinstance(i, (bool, np.bool_)) or not -len(self) <= i < len(self):
            raise IndexError(f"index: expected an int in range for {len(self)} items, got {describe(i)}")
        row = self.index.iloc[int(i)]
        if not row["distractor"]:
            return torch.zeros(self.size, self.size, dtype=torch.bool)
        return torch.from_numpy(self._read(row["distractor_path"], int(row["distractor_crc32"])).astype(bool))

    def fold_indices(self, fold: int, folds: str = "views") -> tuple[np.ndarray, np.ndarray]:
        """``(train_idx, test_idx)`` of fold ``fold`` in 0..4: test = the items of the views of that
        fold under the split ``folds`` (:func:`fold_of_view`: ``"views"`` ``v % 5 == fold``,
        ``"blocks"`` ``v // 8 == fold``)."""
        test = fold_of_view(self.index["view"].to_numpy(), folds) == check_fold(fold)
        return np.flatnonzero(~test), np.flatnonzero(test)

    def __repr__(self) -> str:
        extra = "" if self.knobs.is_default else f", knobs={self.knobs}"
        extra += f", counterfactual={self.counterfactual}" if self.counterfactual else ""
        return (f"An8Flower(variant={self.variant!r}, size={self.size}, seed={self.seed}{extra}, "
                f"items={len(self)}, classes={len(self.classes)}, folder='{self.folder}')")


def gallery(dataset: An8Flower, per_class: int = 1, *, crop: str = "center", angle: int = 5
            ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A few items of every class for a figure: ``(images (K,3,S,S), masks (K,S,S), labels (K,))``.

    Takes ``per_class`` viewpoints spread evenly over the circle from :data:`GALLERY_VIEW` (the
    flower head facing the camera), at the given crop and angle, the same viewpoints for every
    class (K = per_class * number of classes, ordered by class, then viewpoint).
    """
    if not isinstance(dataset, An8Flower):
        raise TypeError(f"dataset: expected an An8Flower, got {describe(dataset)}")
    if not isinstance(per_class, (int, np.integer)) or isinstance(per_class, bool) or not 1 <= per_class <= N_VIEWS:
        raise ValueError(f"per_class: expected an int in 1..{N_VIEWS}, got {describe(per_class)}")
    if crop not in CROPS:
        raise ValueError(f"crop: expected one of {CROPS}, got {describe(crop)}")
    if angle not in ANGLES:
        raise ValueError(f"angle: expected one of {ANGLES}, got {describe(angle)}")
    views = [(GALLERY_VIEW + k * N_VIEWS // per_class) % N_VIEWS for k in range(per_class)]
    idx = dataset.index
    picks = []
    for label in range(len(dataset.classes)):
        for view in views:
            sel = idx.index[(idx["label"] == label) & (idx["view"] == view) & (idx["crop"] == crop) & (idx["angle"] == angle)]
            picks.append(int(sel[0]))
    items = [dataset[i] for i in picks]
    return (torch.stack([it[0] for it in items]), torch.stack([it[2] for it in items]),
            np.array([it[1] for it in items], dtype=np.int64))
