"""extract_features(overlap=...): the accumulating thread gives the synchronous numbers, raises
its errors in the caller and never outlives the call (no timed assertions)."""
import threading

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import vxnb._gram
import vxnb.features.stream as vfs
from vxnb.features import extract_features

from nets import random_data, small_net
from test_features import no_hooks


@pytest.fixture
def small_blocks(monkeypatch):
    """Several partial row blocks, folds and tiles per pass, so the order of the updates matters."""
    monkeypatch.setattr(vxnb._gram, "_GRAM_BLOCK_ROWS", 5)
    monkeypatch.setattr(vxnb._gram, "TILE", 4)
    monkeypatch.setattr(vxnb._gram, "FOLD_ROWS", 7)


@pytest.mark.parametrize("gram_dtype", [torch.float64, torch.float32])
def test_overlap_on_and_off_give_the_same_numbers(small_blocks, gram_dtype):
    net = small_net()
    on = extract_features(net, random_data(23), batch_size=3, keep_X=True, gram_dtype=gram_dtype, progress=False,
                          overlap=True)
    off = extract_features(net, random_data(23), batch_size=3, keep_X=True, gram_dtype=gram_dtype, progress=False,
                           overlap=False)
    # descriptors, XᵀL, X: the same operations in the same order, bit-identical
    for name in ("XtL", "X", "labels", "index"):
        assert np.array_equal(getattr(on, name), getattr(off, name)), name
    # G: one syrk per batch with the thread (3 rows here) instead of 5-row blocks, so the float32
    # (or float64) partial sums round differently — within the accuracy contract of each mode
    assert on.G.shape == (15, 15) and on.n == 23 and np.array_equal(on.G, on.G.T)
    X = off.X.astype(np.float64)
    exact = X.T @ X
    f32 = gram_dtype == torch.float32
    assert vxnb._gram.gram_error(on.G, exact) < (1e-6 if f32 else 1e-14)
    assert vxnb._gram.gram_error(on.G, off.G) < (1e-6 if f32 else 1e-14)
    assert no_hooks(net)


def test_overlap_with_checkpoints_gives_the_same_numbers(small_blocks, tmp_path):
    # checkpoints drain the thread before reading G: every checkpoint and the result agree
    net, data = small_net(), random_data(23)
    out = {}
    for overlap in (True, False):
        out[overlap] = extract_features(net, data, batch_size=3, keep_X=True, gram_dtype=torch.float32,
                                        progress=False, overlap=overlap, checkpoint_dir=tmp_path / str(overlap),
                                        checkpoint_every=2)
    for name in ("XtL", "X", "labels", "index"):
        assert np.array_equal(getattr(out[True], name), getattr(out[False], name)), name
    assert vxnb._gram.gram_error(out[True].G, out[False].G) < 1e-6


def vxnb_threads():
    # the accumulating thread must be joined; other libraries' threads (tqdm's monitor, started by the
    # first bar any earlier test opened) are not ours to count
    return [t.name for t in threading.enumerate() if t.name == vxnb.features.WORKER_NAME]


class Boom(RuntimeError):
    pass


def test_an_error_in_the_thread_is_raised_by_extract_features_and_no_thread_is_left(small_blocks, monkeypatch,
                                                                                     tmp_path):
    where = []
    real_add = vxnb._gram.SyrkGram.add

    def add(self, block):
        where.append(threading.current_thread() is threading.main_thread())
        if len(where) == 2:
            raise Boom("syrk failed on the second block")
        real_add(self, block)

    monkeypatch.setattr(vxnb._gram.SyrkGram, "add", add)
    net = small_net()
    with pytest.raises(Boom, match="^syrk failed on the second block$"):
        extract_features(net, random_data(40), batch_size=3, progress=False, overlap=True, cache_dir=tmp_path)
    assert where == [False, False]  # on the accumulating thread (one block per batch); nothing after the error
    assert vxnb_threads() == []
    assert no_hooks(net)
    assert not list(tmp_path.glob("features-*.npz"))  # no artifact written


def test_non_finite_descriptors_found_on_the_thread_raise_the_usual_error():
    net = small_net()
    with torch.no_grad():
        net.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf in the response of layer 'conv2', channel 0"):
        extract_features(net, random_data(12), batch_size=3, progress=False, overlap=True)
    assert vxnb_threads() == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, Boom])
def test_an_interrupted_forward_stops_the_thread(exc):
    net = small_net()
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        if len(calls) == 4:
            raise exc("stop")

    handle = net.conv2.register_forward_hook(hook)
    with pytest.raises(exc, match="stop"):
        extract_features(net, DataLoader(random_data(30), batch_size=3), progress=False, overlap=True)
    handle.remove()
    assert vxnb_threads() == []
    assert no_hooks(net)


def test_overlap_argument_and_auto_rule(monkeypatch):
    with pytest.raises(ValueError, match="overlap: expected True, False or 'auto', got 'yes'"):
        extract_features(small_net(), random_data(6), overlap="yes", progress=False)
    cpu = torch.device("cpu")
    assert vfs._resolve_overlap(True, cpu) is True and vfs._resolve_overlap(False, cpu) is False
    monkeypatch.setattr(vfs, "_cpu_cores", lambda: 1)
    assert vfs._resolve_overlap("auto", cpu) is False  # one core: the threads would take turns
    monkeypatch.setattr(vfs, "_cpu_cores", lambda: 2)
    assert vfs._resolve_overlap("auto", cpu) is True
    assert vfs._resolve_overlap("auto", torch.device("cuda")) is False


def test_worker_discards_items_after_an_error_and_closes():
    done = []

    def fn(i):
        if i == 1:
            raise Boom(f"item {i}")
        done.append(i)

    w = vfs._Worker(fn, depth=1)
    try:
        w.submit(0)
        w.submit(1)
        with pytest.raises(Boom, match="item 1"):
            w.drain()
        w.submit(2)  # after the error: not applied
        w.drain()
    finally:
        w.close()
    assert done == [0] and not w.thread.is_alive()


def test_worker_whose_context_fails_raises_instead_of_hanging():
    def broken():
        raise Boom("no context")

    w = vfs._Worker(lambda i: None, depth=1, context=broken)
    try:
        with pytest.raises(Boom, match="no context"):
            for i in range(5):  # the queue keeps being consumed: submit never blocks for good
                w.submit(i)
            w.drain()
    finally:
        w.close()
    assert not w.thread.is_alive()
