"""``vxnb.extract``: the command writes the run folder's feature cache and top-patch table, the
files the notebooks look up (runs.get_features, interpret.top_patch_table), on 1 and 3 processes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import extract_worker
from dist_worker import BATCH, TinyImages
from test_distributed import _env
from vxnb import extract, features, interpret
from vxnb.studies import runs

WORKER = str(Path(__file__).resolve().parent / "extract_worker.py")
TOP_N = 5


def _reference(model):
    tracker = interpret.TopPatches(model, layers=features.default_layers(model), k=TOP_N)
    feats = features.extract_features(model, TinyImages(), n_classes=3, batch_size=BATCH, callbacks=[tracker],
                                      progress=False)
    return feats, tracker.to_frame()


def _check_run_folder(params: dict, model, reference) -> None:
    """The cache files are there, hold what one plain pass gives, and are found without a pass."""
    cfg = runs.RunConfig.from_params(**{k: v for k, v in params.items() if k != "top_n"})
    folder = runs.run_dir(cfg)
    ref, top = reference
    (file,) = (folder / "features").glob("features-*.npz")
    got = features.Features.load(file)
    assert np.abs(got.G - ref.G).max() <= 1e-10 * np.abs(ref.G).max()
    np.testing.assert_array_equal(got.XtL, ref.XtL)
    np.testing.assert_array_equal(got.labels, ref.labels)
    assert not list((folder / "checkpoints").glob("*.pt"))  # complete: no checkpoint left
    # the notebooks' look-ups find them: no forward pass (the pass raises here)
    data = extract_worker.tiny_data(cfg)
    cached = runs.get_features(cfg, model, "train", data=data, progress=False, batch_size=BATCH)
    assert cached.meta["cache_hit"]
    wanted = top[["layer", "channel"]].drop_duplicates()
    table = interpret.top_patch_table(model, data[0], wanted, k=TOP_N, cache_dir=folder,
                                      data_key=runs.split_key(cfg, "train", data[0]))
    expect = top.sort_values(["layer", "channel", "rank"], kind="mergesort").reset_index(drop=True)
    for c in ("channel", "rank", "index", "row", "col"):
        np.testing.assert_array_equal(table[c].to_numpy(), expect[c].to_numpy(), err_msg=c)
    np.testing.assert_array_equal(table["score"].to_numpy(), expect["score"].to_numpy())


def test_extract_main_one_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runs, "load_data", extract_worker.tiny_data)
    monkeypatch.setattr(runs, "get_model", extract_worker.tiny_model)
    (tmp_path / "run.yaml").write_text(f"runs_root: {tmp_path}\ntop_n: 50\nmu: 3.0\n")
    assert extract.main(["--params", str(tmp_path / "run.yaml"), "-p", "top_n", str(TOP_N), "--batch-size",
                         str(BATCH), "--checkpoint-every", "3"]) == 0
    out = capsys.readouterr().out
    assert "ignoring parameters mu" in out and "50 images" in out and "on 1 process(es)" in out

    def no_pass(*args, **kwargs):
        raise AssertionError("a forward pass ran; the run folder's files were not found")

    model = extract_worker.tiny_model(None)[0]
    reference = _reference(model)
    monkeypatch.setattr(interpret, "collect_top_patches", no_pass)
    monkeypatch.setattr(features.stream, "Recorder", no_pass)
    _check_run_folder({"runs_root": str(tmp_path), "top_n": TOP_N}, model, reference)


def test_extract_takes_the_runs_batch_size_unless_the_flag_is_given(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "load_data", extract_worker.tiny_data)
    monkeypatch.setattr(runs, "get_model", extract_worker.tiny_model)
    seen = []
    real = runs.get_features
    monkeypatch.setattr(runs, "get_features", lambda *a, **kw: seen.append(kw["batch_size"]) or real(*a, **kw))
    (tmp_path / "run.yaml").write_text(f"runs_root: {tmp_path}\ntop_n: {TOP_N}\nbatch_size: 7\n")
    assert extract.main(["--params", str(tmp_path / "run.yaml")]) == 0
    assert extract.main(["--params", str(tmp_path / "run.yaml"), "--batch-size", "5"]) == 0
    assert seen == [7, 5]          # the params file's batch_size; the explicit flag wins over it


def test_extract_main_refuses_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="top_n: expected a positive int, got 0"):
        extract.main(["-p", "runs_root", str(tmp_path), "-p", "top_n", "0"])
    with pytest.raises(ValueError, match="dataset: expected one of"):
        extract.main(["-p", "dataset", "imagenet"])


def test_torchrun_extract_three_processes(tmp_path, monkeypatch):
    """torchrun with 3 gloo ranks: the same files as one plain pass (G ≤ 1e-10 relative; XᵀL,
    labels and the top-k rows, ties included, exact)."""
    (tmp_path / "run.json").write_text(json.dumps({"runs_root": str(tmp_path), "top_n": TOP_N}))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", WORKER,
                          "--params", str(tmp_path / "run.json"), "--batch-size", str(BATCH), "--timeout", "120"],
                         env=_env(), capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "50 images" in res.stdout and "on 3 process(es)" in res.stdout
    monkeypatch.setattr(runs, "load_data", extract_worker.tiny_data)
    model = extract_worker.tiny_model(None)[0]
    _check_run_folder({"runs_root": str(tmp_path), "top_n": TOP_N}, model, _reference(model))


def test_torchrun_extract_refuses_ranks_that_do_not_share_the_runs_folder(tmp_path):
    """Nodes with their own disks (here: each rank its own runs_root) are refused before any rank
    reads what rank 0 made, naming the ranks and the folder; no rank computes features."""
    env = dict(_env(), VXNB_TEST_NODE_LOCAL_RUNS=str(tmp_path / "local"))
    (tmp_path / "run.json").write_text(json.dumps({"top_n": TOP_N}))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
                          "--params", str(tmp_path / "run.json"), "--batch-size", str(BATCH), "--timeout", "60"],
                         env=env, capture_output=True, text=True, timeout=150)
    assert res.returncode != 0
    assert "the ranks do not share their folders (rank 1 on " in res.stderr
    assert f"does not see runs_root {tmp_path / 'local' / 'rank1'}" in res.stderr
    assert not list((tmp_path / "local").rglob("features-*.npz"))           # nothing was extracted
    assert not list((tmp_path / "local").rglob(".vxnb-shared-*"))           # the check's file is gone
