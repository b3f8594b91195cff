"""Kill-safety: the pipeline is SIGKILLed at ten points spread over its phases, rerun, and must
end with the same outputs as an uninterrupted run, no damaged file trusted, and nothing that had
finished computed again (counted from the artifact store's events log).

The whole quick report would take ~10 minutes per run here, so the same phases are driven
through the Python API (``tests/_fault_driver.py``: rendering, training, extraction, the lasso
save, a benchmark fold, a table, an HTML export) in a subprocess. ~2-3 minutes on 2 cores."""
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from vxnb import _store

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("faults")]

DRIVER = Path(__file__).with_name("_fault_driver.py")
#: In pipeline order, so that every run reaches its kill point (what an earlier run finished is
#: read back, not redone, so the point of each run lies ahead of what is done).
POINTS = ["render", "train", "save:checkpoint", "extract", "save:features", "save:lasso-path",
          "benchmark-fold", "save:benchmark-fold", "save:table", "html"]


def _run(root: Path, fault: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    env.pop("VXNB_FAULT", None)
    if fault:
        env["VXNB_FAULT"] = fault
    return subprocess.run([sys.executable, str(DRIVER), str(root)], env=env, capture_output=True, text=True,
                          timeout=600)


def _outputs(root: Path) -> dict:
    (run,) = [p for p in (root / "runs").iterdir() if p.name.startswith("an8flower")]
    (fold,) = run.glob("benchmark-*.json")
    res = json.loads(fold.read_text())
    return {"table": (run / "fault-table.csv").read_text(), "auc": res["auc"], "curve": res["curve"],
            "fold_key": res["key"], "checkpoints": sorted(p.name for p in run.glob("checkpoint-*")),
            "lasso": sorted(p.name for p in run.glob("lasso-*.npz")),
            "html": "fault test" in (root / "pages" / "page.html").read_text()}


def _manifest(root: Path):
    found = list((root / "data").rglob("manifest.json"))
    return [(p, p.stat().st_mtime_ns) for p in found]


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    ref = _run(tmp_path / "ref", None)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = _outputs(tmp_path / "ref")

    root = tmp_path / "killed"
    rows = []
    rendered = None
    n_events = 0
    for point in POINTS:
        proc = _run(root, point)
        assert proc.returncode == -signal.SIGKILL, f"{point}: not killed (rc {proc.returncode}) {proc.stderr[-2000:]}"
        assert "unreadable" not in proc.stderr, f"{point}: a damaged file was found: {proc.stderr[-2000:]}"
        events = _store.read_events(root / "runs") if (root / "runs").exists() else []
        new = events[n_events:]
        n_events = len(events)
        rows.append((point, sorted({e["kind"] for e in new if e["event"] == "miss"})))
        if rendered is None and _manifest(root):
            rendered = _manifest(root)  # the render that finished: never redone below
            rows[-1][1].insert(0, "render")
        elif rendered is not None:
            assert _manifest(root) == rendered, f"{point}: the finished render was redone"
    assert rendered is not None  # the render finished in one of the killed runs
    final = _run(root, None)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "unreadable" not in final.stderr
    events = _store.read_events(root / "runs")
    rows.append(("(none: final run)", sorted({e["kind"] for e in events[n_events:] if e["event"] == "miss"})))
    print("\nkill point            | recomputed in that run (store misses)")
    for point, kinds in rows:
        print(f"{point:21s} | {', '.join(kinds) or '-'}")

    # equal to the uninterrupted run
    got = _outputs(root)
    assert got == want
    # nothing that finished was computed again: each artifact saved once over all eleven runs
    saves = Counter((e["kind"], e["key"]) for e in events if e["event"] == "save")
    assert saves and max(saves.values()) == 1, saves
    # the final run found everything but the last phase's artifacts done: only hits for the rest
    final_misses = {e["kind"] for e in events[n_events:] if e["event"] == "miss"}
    assert final_misses <= {"table"}, final_misses
    assert _manifest(root) == rendered
    # no file is trusted that was half-written: every indexed artifact loads; the killed writers'
    # temporary files are not artifacts, and gc removes them
    index = _store.read_index(root / "runs")
    assert {e["kind"] for e in index.values()} >= {"checkpoint", "features", "lasso-path", "benchmark-fold", "table"}
    for e in index.values():
        assert (root / "runs" / e["path"]).exists(), e
    from vxnb.studies import gc as studies_gc
    leftovers = list((root / "runs").rglob(".*.tmp"))
    res = studies_gc.gc(root / "runs", tmp_age=0)  # the killed writers' files are fresh: no age threshold here
    assert {Path(p) for p, _ in res["removed"]} >= set(leftovers)
    assert not list((root / "runs").rglob(".*.tmp"))
    assert _outputs(root) == want  # gc kept every live artifact


def test_two_concurrent_runs_compute_each_artifact_once(tmp_path):
    """Two runs of the same pipeline at once (two notebooks, two `make report`s): every artifact is
    computed by one of them, the other waits on its lock and reads it; both end with the same
    outputs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("VXNB_FAULT", None)
    procs = [subprocess.Popen([sys.executable, str(DRIVER), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    events = _store.read_events(tmp_path / "runs")
    saves = Counter((e["kind"], e["key"]) for e in events if e["event"] == "save")
    assert set(k for k, _ in saves) >= {"checkpoint", "features", "lasso-path", "benchmark-fold", "table"}
    assert max(saves.values()) == 1, saves
    pids = {e["pid"] for e in events}
    assert len(pids) == 2  # both took part
    hits = Counter(e["kind"] for e in events if e["event"] == "hit")
    assert hits["checkpoint"] >= 1 and hits["benchmark-fold"] >= 1  # the second one read what the first made
    assert len(list((tmp_path / "data").rglob("manifest.json"))) == 1
