"""Extraction under torch.distributed (vxnb.distributed): N gloo processes on the CPU give what one
process gives; a rank killed mid-run fails the others cleanly and a restart resumes; ranks that
disagree are refused. The processes are started as plain processes with the
environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), on 127.0.0.1."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dist_worker import BATCH, N_CLASSES, TOP_K, TinyImages
from nets import tiny_strided_net
from vxnb import distributed
from vxnb.distributed import merge_topk, shard_positions
from vxnb.features import extract_features
from vxnb.interpret import TopPatches

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(Path(__file__).resolve().parent / "dist_worker.py")
LAYERS = ["relu1", "relu2", "relu3"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(n: int, *args: str) -> list[tuple[int, str]]:
    """n ranks as plain processes (so that one can die without torchrun stopping the others)."""
    port = str(_free_port())
    procs = []
    for r in range(n):
        env = dict(_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=150)[0] for p in procs]
    return [(p.returncode, log) for p, log in zip(procs, logs)]


@pytest.fixture(scope="module")
def reference():
    """One process, no process group: the plain extract_features pass."""
    model = tiny_strided_net(N_CLASSES)
    tracker = TopPatches(model, layers=LAYERS, k=TOP_K)
    feats = extract_features(model, TinyImages(), LAYERS, batch_size=BATCH, n_classes=N_CLASSES, callbacks=[tracker],
                             progress=False, gram_dtype=torch.float64)
    return feats, tracker.to_frame()


def _assert_same(out: Path, reference) -> None:
    feats, top = reference
    z = np.load(out)
    rel = np.abs(z["G"] - feats.G).max() / np.abs(feats.G).max()
    assert rel <= 1e-10, rel
    np.testing.assert_array_equal(z["XtL"], feats.XtL)
    np.testing.assert_array_equal(z["labels"], feats.labels)
    np.testing.assert_array_equal(z["index"], feats.index)
    np.testing.assert_array_equal(np.bincount(z["labels"], minlength=N_CLASSES), feats.class_counts)
    for c in ("index", "score", "row", "col", "channel"):
        np.testing.assert_array_equal(z[f"top_{c}"], top[c].to_numpy(), err_msg=c)
    assert int(z["n_seen"]) == len(TinyImages())


# ---------------------------------------------------------------------------- no processes needed
@pytest.mark.parametrize("n,bs,world", [(50, 4, 1), (50, 4, 2), (50, 4, 3), (50, 4, 13), (7, 1, 7), (10, 3, 4)])
def test_shards_count_every_image_once_in_whole_batches(n, bs, world):
    shards = [shard_positions(n, r, world, bs) for r in range(world)]
    allpos = np.concatenate(shards)
    np.testing.assert_array_equal(np.sort(allpos), np.arange(n))  # every image exactly once
    one = [list(range(i, min(n, i + bs))) for i in range(0, n, bs)]  # the batches of one process
    for s in shards:
        assert all(list(s[i:i + bs]) in one for i in range(0, len(s), bs))


def test_shards_refuse_a_world_larger_than_the_data():
    with pytest.raises(ValueError, match=r"world size: 6 processes for a dataset of 5 images"):
        shard_positions(5, 0, 6, 1)
    with pytest.raises(ValueError, match=r"only 3 batches of batch_size=4.*batch_size ≤ 2"):
        shard_positions(10, 0, 5, 4)
    with pytest.raises(ValueError, match="rank"):
        shard_positions(10, 3, 3, 1)


def test_merge_topk_breaks_ties_by_index_against_a_full_sort():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(5, 40)).astype(np.float64)  # many ties
    index = np.arange(40)
    parts = []
    for lo, hi in ((0, 13), (13, 27), (27, 40)):  # each part keeps its own top 6 by (score desc, index asc)
        order = np.lexsort((index[lo:hi][None].repeat(5, 0), -scores[:, lo:hi]), axis=-1)[:, :6]
        s = np.take_along_axis(scores[:, lo:hi], order, 1)
        i = np.take_along_axis(np.broadcast_to(index[lo:hi], (5, hi - lo)), order, 1)
        parts.append({"score": torch.tensor(s), "index": torch.tensor(i), "pos": torch.tensor(np.stack([i, -i], -1)),
                      "channels": torch.arange(5)})
    merged = merge_topk(parts, 6)
    for f in range(5):  # explicit loop: sort all 40 by (−score, index)
        best = sorted(range(40), key=lambda j: (-scores[f, j], j))[:6]
        assert merged["index"][f].tolist() == best
        assert merged["score"][f].tolist() == [scores[f, j] for j in best]
        assert merged["pos"][f, :, 1].tolist() == [-j for j in best]
    parts[1]["channels"] = torch.arange(1, 6)
    with pytest.raises(ValueError, match="'channels' differs between table 0"):
        merge_topk(parts, 6)


def test_single_process_checkpoint_resume_matches(tmp_path, reference, capsys):
    """world 1 with checkpoint_dir: a pass stopped by an exception resumes and gives the same result."""
    model = tiny_strided_net(N_CLASSES)

    class Stop(Exception):
        pass

    def stop_after_5(outputs, index, seen=[0]):
        seen[0] += 1
        if seen[0] == 6:
            raise Stop

    stop_after_5.state_dict = lambda: {}
    stop_after_5.load_state_dict = lambda state: None
    tracker = TopPatches(model, layers=LAYERS, k=TOP_K)
    with pytest.raises(Stop):
        extract_features(model, TinyImages(), LAYERS, batch_size=BATCH, n_classes=N_CLASSES, progress=False,
                         callbacks=[tracker, stop_after_5], checkpoint_dir=tmp_path, checkpoint_every=2,
                         gram_dtype=torch.float64)
    (ckpt,) = tmp_path.glob("extract-*-rank0of1.pt")
    assert torch.load(ckpt, weights_only=True)["batches"] == 4
    # other images of the same number: the checkpoint's content key differs, so no resume
    other = TinyImages()
    other.images = other.images.flip(0).contiguous()
    plain = extract_features(model, other, LAYERS, batch_size=BATCH, n_classes=N_CLASSES, progress=False,
                             gram_dtype=torch.float64)
    fresh = extract_features(model, other, LAYERS, batch_size=BATCH, n_classes=N_CLASSES, progress=False,
                             checkpoint_dir=tmp_path, checkpoint_every=2, gram_dtype=torch.float64)
    assert "resuming" not in capsys.readouterr().out
    np.testing.assert_array_equal(fresh.XtL, plain.XtL)
    assert ckpt.exists()  # the first data's checkpoint is still there for its own resume
    tracker = TopPatches(model, layers=LAYERS, k=TOP_K)
    feats = extract_features(model, TinyImages(), LAYERS, batch_size=BATCH, n_classes=N_CLASSES, progress=False,
                             callbacks=[tracker], checkpoint_dir=tmp_path, checkpoint_every=2, gram_dtype=torch.float64)
    ref, top = reference
    assert np.abs(feats.G - ref.G).max() <= 1e-10 * np.abs(ref.G).max()
    np.testing.assert_array_equal(feats.XtL, ref.XtL)
    np.testing.assert_array_equal(feats.labels, ref.labels)
    pd.testing.assert_frame_equal(tracker.to_frame(), top)
    assert tracker.n_seen_ == len(TinyImages())
    assert "rank 0: resuming from" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.pt"))  # complete: the checkpoint is gone


def test_checkpoints_need_a_dataset_and_a_positive_interval(tmp_path):
    model = tiny_strided_net(N_CLASSES)
    loader = torch.utils.data.DataLoader(TinyImages(), batch_size=BATCH)
    with pytest.raises(TypeError, match="pass a map-style Dataset .* got DataLoader"):
        extract_features(model, loader, LAYERS, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every: expected a positive int .*got 0"):
        extract_features(model, TinyImages(), LAYERS, checkpoint_dir=tmp_path, checkpoint_every=0, progress=False)
    with pytest.raises(TypeError, match="callbacks: with checkpoint_dir every callback needs state_dict"):
        extract_features(model, TinyImages(), LAYERS, checkpoint_dir=tmp_path, callbacks=[lambda o, i: None],
                         progress=False)


# ---------------------------------------------------------------------------- processes
def test_reference_has_ties(reference):
    """The data repeats batch 0, so equal scores occur in the top-k lists the tests compare."""
    top = reference[1]
    dup = top.duplicated(["layer", "channel", "score"], keep=False)
    assert dup.sum() >= 10


def test_two_ranks_give_what_one_process_gives(tmp_path, reference):
    """(Three ranks under torchrun, through the command: tests/test_extract.py.)"""
    out = tmp_path / "out.npz"
    logs = _spawn(2, str(out), "--cache", str(tmp_path / "cache"), "--every-rank")
    assert [rc for rc, _ in logs] == [0, 0], logs
    _assert_same(out, reference)
    (cache,) = (tmp_path / "cache").glob("features-*.npz")  # rank 0 wrote one cache
    from vxnb.features import Features

    cached = Features.load(cache)
    np.testing.assert_array_equal(cached.G, np.load(out)["G"])
    # rank 1 returned what rank 0 wrote, bit for bit (the all-reduce leaves the same sums on every rank)
    mine, other = np.load(out), np.load(tmp_path / "out.rank1.npz")
    for name in mine.files:
        np.testing.assert_array_equal(other[name], mine[name], err_msg=name)


def test_killed_rank_fails_the_others_and_a_restart_resumes(tmp_path, reference):
    ck, cache, out = tmp_path / "ck", tmp_path / "cache", tmp_path / "out.npz"
    common = ["--checkpoint", str(ck), "--every", "2", "--cache", str(cache), "--timeout", "60"]
    # rank 1 SIGKILLs itself in its 4th batch (after its checkpoint at batch 2)
    (rc0, log0), (rc1, _) = _spawn(2, str(out), *common, "--kill-rank", "1", "--kill-after", "3")
    assert rc1 == -9
    assert rc0 == 3 and "another rank died" in log0, log0
    assert not list(cache.glob("features-*.npz")) and not out.exists()  # nothing marked complete
    names = sorted(p.name.rsplit("-", 1)[1] for p in ck.glob("extract-*.pt"))
    assert names == ["rank0of2.pt", "rank1of2.pt"]
    assert torch.load(next(ck.glob("*rank1of2.pt")), weights_only=True)["batches"] == 2
    # another world size (one process): starts afresh and says why, same result
    model = tiny_strided_net(N_CLASSES)
    tracker = TopPatches(model, layers=LAYERS, k=TOP_K)
    with pytest.warns(UserWarning, match=r"another number of processes .*rank1of2.pt.*this run has 1.*afresh"):
        feats = extract_features(model, TinyImages(), LAYERS, batch_size=BATCH, n_classes=N_CLASSES, progress=False,
                                 callbacks=[tracker], checkpoint_dir=ck, checkpoint_every=2, gram_dtype=torch.float64)
    np.testing.assert_array_equal(feats.XtL, reference[0].XtL)
    # the same world size resumes from the checkpoints
    logs = _spawn(2, str(out), *common)
    assert [rc for rc, _ in logs] == [0, 0], logs
    assert "rank 1: resuming from" in logs[1][1] and "after 2 batches" in logs[1][1]
    assert "rank 0: resuming from" in logs[0][1]
    _assert_same(out, reference)
    assert len(list(cache.glob("features-*.npz"))) == 1
    assert not list(ck.glob("*of2.pt"))  # complete: removed


def test_ranks_that_disagree_are_refused_and_a_hung_rank_times_out(tmp_path):
    """Rank 1 differs in its model, then its layers, then its data length: both ranks refuse each
    before any work, naming both values. Then rank 1 hangs in its 3rd batch: rank 0 fails at the
    process group's timeout (5 s) with a clear message, and no cache is written."""
    logs = _spawn(2, str(tmp_path / "out.npz"), "--refusals", "1", "--checkpoint", str(tmp_path / "ck"), "--hang",
                  "--kill-after", "2", "--timeout", "5", "--cache", str(tmp_path / "cache"))
    patterns = {
        "perturb": r"ValueError: model: rank 1 has '([0-9a-f]{24})', rank 0 has '([0-9a-f]{24})'",
        "fewer_layers": r"ValueError: layers: rank 1 has (\['relu1', 'relu2'\]), rank 0 has "
                        r"(\['relu1', 'relu2', 'relu3'\])",
        "fewer_images": r"ValueError: dataset length: rank 1 has (49), rank 0 has (50)",
    }
    for r, (rc, log) in enumerate(logs):
        for case, pattern in patterns.items():
            found = re.search(f"RANK{r} {case} ERROR " + pattern, log)
            assert found, (case, log)
            assert found.group(1) != found.group(2)  # both values named
        assert "ACCEPTED" not in log
    (rc0, log0), (rc1, _) = logs
    assert re.search(r"RANK0 kill ERROR RuntimeError: torch.distributed: .* failed on rank 0 of 2 .*Timed out .*"
                     r"another rank died or did not answer within the process group's timeout", log0), log0
    assert rc0 == 0 and rc1 == -9, (rc0, rc1, log0)  # rank 1 slept past the timeout, then died
    assert not list((tmp_path / "cache").glob("features-*.npz"))


def test_outside_torchrun_init_does_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init(timeout=5) is False
    assert not distributed.is_initialized()
    assert distributed.rank_and_world() == (0, 1)
    with pytest.raises(ValueError, match="timeout: expected a positive number of seconds, got 0"):
        distributed.init(timeout=0)
