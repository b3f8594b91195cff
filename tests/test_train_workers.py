"""Fold models trained in worker processes (issue 26): the same weights for any number of workers
and any caller's thread count, a failure named by fold with nothing half-written, bad input."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import TensorDataset

from vxnb import models
from vxnb.studies import benchmark as B
from vxnb.studies import runs


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("workers_data"))


def _configs(data_root, runs_root, folds=(0, 1)) -> list[runs.RunConfig]:
    return [runs.RunConfig(size=32, epochs=1, train_limit=48, test_fold=f, data_root=data_root,
                           runs_root=str(runs_root)) for f in folds]


def _weights(cfg) -> dict[str, torch.Tensor]:
    model, _ = models.load_checkpoint(runs.checkpoint_dir(cfg))
    return model.state_dict()


def _checkpoints(root) -> list:
    return sorted(p for p in root.rglob("model.pt"))


@pytest.mark.slow  # renders a tiny an8Flower and trains six small models
def test_the_same_weights_in_process_and_in_two_workers(data_root, tmp_path):
    one = _configs(data_root, tmp_path / "one")
    two = _configs(data_root, tmp_path / "two")
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's thread count does not reach the weights
    try:
        done1 = runs.train_models(one, workers=1, progress=False)
    finally:
        torch.set_num_threads(before)
    done2 = runs.train_models(two, workers=2, progress=False)
    assert (done1["workers"], done2["workers"]) == (1, 2)
    assert done1["trained"] == done2["trained"] == [c.run_name for c in one]
    for a, b in zip(one, two):
        assert runs.checkpoint_key(a) == runs.checkpoint_key(b)   # workers are in no key
        wa, wb = _weights(a), _weights(b)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), a.run_name
    assert not all(torch.equal(x, y) for x, y in zip(_weights(one[0]).values(), _weights(one[1]).values()))
    # done already: nothing is trained again
    assert runs.train_models(two, workers=2, progress=False)["trained"] == []


@pytest.mark.slow  # renders a tiny an8Flower and trains six small models
def test_a_killed_worker_is_named_by_fold_and_nothing_is_written(data_root, tmp_path, monkeypatch):
    cfgs = _configs(data_root, tmp_path / "runs")
    monkeypatch.setenv("VXNB_FAULT", "train")    # each worker kills itself at its first step
    with pytest.raises(RuntimeError, match="training failed for 2 of 2 models") as err:
        runs.train_models(cfgs, workers=2, progress=False)
    for cfg in cfgs:
        assert cfg.run_name in str(err.value)
        assert not runs.checkpoint_dir(cfg).exists()
    assert _checkpoints(tmp_path / "runs") == []


@pytest.mark.slow  # renders a tiny an8Flower and trains six small models
def test_an_error_in_process_is_named_and_the_other_folds_are_kept(data_root, tmp_path, monkeypatch):
    cfgs = _configs(data_root, tmp_path / "runs")
    real = models.train_model

    def fail_on_fold_1(model, train, test, **kw):
        if runs.checkpoint_dir(cfgs[0]).exists():   # the first model is saved: this is the second
            raise RuntimeError("boom")
        return real(model, train, test, **kw)

    monkeypatch.setattr(models, "train_model", fail_on_fold_1)
    with pytest.raises(RuntimeError, match=f"1 of 2 models: {cfgs[1].run_name} \\(RuntimeError: boom\\)"):
        runs.train_models(cfgs, workers=1, progress=False)
    assert runs.checkpoint_dir(cfgs[0]).is_dir() and not runs.checkpoint_dir(cfgs[1]).exists()
    assert len(_checkpoints(tmp_path / "runs")) == 1


def test_training_threads_are_restored_and_do_not_reach_the_weights():
    x = torch.rand(40, 3, 32, 32)
    y = torch.arange(40) % 2
    before = torch.get_num_threads()
    states = []
    try:
        for caller in (1, 2):
            torch.set_num_threads(caller)
            torch.manual_seed(0)
            model = models.FlowerNet(num_classes=2, size=32)
            hist = models.train_model(model, TensorDataset(x, y), epochs=2, batch_size=8, seed=0, progress=False,
                                      threads=1)
            assert torch.get_num_threads() == caller and hist["threads"] == 1
            states.append(model.state_dict())
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_bad_input():
    cfg = runs.RunConfig(size=32)
    ds = TensorDataset(torch.rand(4, 3, 32, 32), torch.arange(4) % 2)
    with pytest.raises(ValueError, match="threads: expected an int ≥ 1"):
        models.train_model(models.FlowerNet(num_classes=2, size=32), ds, epochs=1, threads=0, progress=False)
    with pytest.raises(TypeError, match="threads: expected an int"):
        models.train_model(models.FlowerNet(num_classes=2, size=32), ds, epochs=1, threads=1.5, progress=False)
    with pytest.raises(ValueError, match="workers: expected"):
        runs.train_models([cfg], workers=0)
    with pytest.raises(TypeError, match="workers: expected"):
        runs.train_models([cfg], workers="2")
    with pytest.raises(TypeError, match=r"configs\[1\]: expected a RunConfig"):
        runs.train_models([cfg, {"size": 32}])
    with pytest.raises(TypeError, match="configs: expected a sequence of RunConfig"):
        runs.train_models(cfg)
    with pytest.raises(ValueError, match="train_workers: expected an int ≥ 1"):
        B.run_benchmark(cfg, train_workers=0, save=False)


def test_default_workers():
    cfgs = [runs.RunConfig(size=32, test_fold=f) for f in range(5)]
    assert runs.default_train_workers(cfgs[:1]) == 1
    assert runs.default_train_workers([dataclasses.replace(c, quick=True) for c in cfgs]) == 1
    n = runs.default_train_workers(cfgs)
    assert 1 <= n <= min(5, runs.MAX_TRAIN_WORKERS)


def test_channels_last_training_is_deterministic_and_hands_back_the_default_layout():
    x = torch.rand(24, 3, 32, 32)
    y = torch.arange(24) % 2
    states = {}
    for run, cl in (("a", True), ("b", True), ("plain", False)):
        torch.manual_seed(0)
        model = models.FlowerNet(num_classes=2, size=32)
        hist = models.train_model(model, TensorDataset(x, y), epochs=1, batch_size=8, seed=0, progress=False,
                                  threads=1, channels_last=cl)
        assert hist["channels_last"] is cl
        assert all(p.is_contiguous() for p in model.parameters())   # checkpoints and deconv see the usual layout
        states[run] = model.state_dict()
    assert all(torch.equal(states["a"][k], states["b"][k]) for k in states["a"])
    # the same training up to rounding: three steps of Adam from the same start
    assert all(torch.allclose(states["a"][k], states["plain"][k], atol=1e-4) for k in states["a"])
    with pytest.raises(TypeError, match="channels_last: expected a bool"):
        models.train_model(models.FlowerNet(num_classes=2, size=32), TensorDataset(x, y), epochs=1,
                           channels_last="yes", progress=False)
