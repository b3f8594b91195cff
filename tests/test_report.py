import json

import pytest

from vxnb import report
from vxnb.runs import RunConfig


def _nb(path, title, line):
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": [f"# {title}\n", "\n", line]}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


def test_find_notebooks_orders_numbered_ones(tmp_path):
    _nb(tmp_path / "02_b.ipynb", "B", "second")
    _nb(tmp_path / "01_a.ipynb", "A", "first")
    _nb(tmp_path / "scratch.ipynb", "S", "ignored")
    assert [p.name for p in report.find_notebooks(tmp_path)] == ["01_a.ipynb", "02_b.ipynb"]
    assert report.notebook_summary(tmp_path / "01_a.ipynb") == ("A", "first")
    with pytest.raises(ValueError, match="no such folder"):
        report.find_notebooks(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no numbered notebooks"):
        report.find_notebooks(tmp_path / "empty")


def test_index_lists_every_entry(tmp_path):
    entries = [{"html": "01_a.html", "title": "A & co", "description": "first <thing>", "seconds": 3, "ok": True},
               {"html": "02_b.html", "title": "B", "description": "second", "seconds": 1, "ok": False}]
    page = report.write_index(tmp_path, entries, quick=True).read_text()
    assert 'href="01_a.html"' in page and 'href="02_b.html"' in page
    assert "A &amp; co" in page and "first &lt;thing&gt;" in page and "failed" in page


def test_run_config_validation_and_names():
    cfg = RunConfig.from_params(quick=True)
    assert cfg.size == 64 and cfg.train_limit and cfg.run_name.endswith("-quick")
    assert RunConfig(dataset="mnist").size == 28
    with pytest.raises(ValueError, match="dataset"):
        RunConfig(dataset="cifar")
    with pytest.raises(ValueError, match="size"):
        RunConfig(size=16)
    with pytest.raises(ValueError, match="test_fold"):
        RunConfig(test_fold=5)


def test_quick_overrides_the_full_size():
    cfg = RunConfig.from_params(quick=True, size=128, train_limit=None)
    assert cfg.size == 64 and cfg.train_limit == 1200
    assert RunConfig.from_params(quick=False, size=128).size == 128
