"""Every numbered notebook runs headlessly through papermill with its quick parameters.

The notebooks chain through a run folder (01 trains and extracts, later ones read), so one
report is built per test session in a temporary folder and each notebook is checked in it.
"""
import json
import os
import re
from pathlib import Path

import pytest

from vxnb import report

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("notebooks")]
NOTEBOOKS = report.find_notebooks()


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    # the other pytest-xdist worker uses the second core: one thread for the notebook kernels
    os.environ["OMP_NUM_THREADS"] = "1"
    root = tmp_path_factory.mktemp("report")
    params = {"runs_root": str(root / "runs"), "data_root": str(root / "data")}
    result = report.build_report(quick=True, out_dir=root / "reports", parameters=params, progress=False,
                                 stop_on_error=False, raise_on_error=False)
    return root / "reports", result


def test_notebooks_are_committed_clean():
    for nb in NOTEBOOKS:
        cells = json.loads(nb.read_text())["cells"]
        assert not any(c.get("outputs") for c in cells if c["cell_type"] == "code"), nb.name
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb.name}: expected one cell tagged 'parameters'"
        assert "quick" in "".join(tagged[0]["source"]), f"{nb.name}: no 'quick' parameter"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_quick(quick_report, nb):
    out, result = quick_report
    entry = next(e for e in result["entries"] if e["notebook"] == nb.name)
    print(f"{nb.name}: {entry['seconds']:.0f} s")
    assert entry["ok"], entry["error"]
    executed = json.loads((out / nb.name).read_text())
    errors = [o for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    # the page opens offline: no script or stylesheet is fetched from the network, and
    # plotly's JavaScript is embedded in the page
    page = (out / f"{nb.stem}.html").read_text()
    remote = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?:[^"]+)"', page)
    assert remote == [], f"{nb.name}: the page loads {remote[:3]}"
    if "application/vnd.plotly" in (out / nb.name).read_text():
        assert "Plotly.newPlot" in page


def test_index_links_every_page(quick_report):
    out, result = quick_report
    index = (out / "index.html").read_text()
    links = set(re.findall(r'href="([^"]+)"', index))
    assert links == {f"{nb.stem}.html" for nb in NOTEBOOKS}
    for link in links:
        assert (out / link).is_file()
