"""Report pages for an audience: offline panels replace frozen controls, pages without code,
a note (and static figures, see test_browser.py) for readers without JavaScript, and the index."""
import json
import re

import pytest

from vxnb import report, widgets

_CONTROLS = "a" * 32


def _nb_with_panel(path):
    """An 'executed' notebook: a live panel (saved controls + first figure), then its offline panel."""
    frames = widgets.offline_frames(lambda cls: f"class {cls}", cls=[0, 1], progress=False)
    offline = widgets.offline_html(frames)
    nb = {"cells": [
        {"cell_type": "markdown", "id": "m0", "metadata": {}, "source": "# 02 · T\n\nline"},
        {"cell_type": "code", "id": "c1", "execution_count": 1, "metadata": {}, "source": "widgets.panel(fn, cls=picker)",
         "outputs": [
             {"output_type": "display_data", "metadata": {}, "data": {
                 "application/vnd.jupyter.widget-view+json": {"model_id": _CONTROLS, "version_major": 2,
                                                               "version_minor": 0},
                 "text/plain": "HBox(children=(Dropdown(),))"}},
             {"output_type": "display_data", "metadata": {}, "data": {"text/plain": "class 0 (first figure)"}}]},
        {"cell_type": "code", "id": "c2", "execution_count": 2, "metadata": {},
         "source": "widgets.offline_panel(fn, cls=[0, 1])  # SOURCE-MARK",
         "outputs": [{"output_type": "display_data", "metadata": {widgets.OFFLINE_MARK: True},
                      "data": {"text/html": offline, "text/plain": "<HTML>"}}]}],
        "metadata": {"widgets": {"application/vnd.jupyter.widget-state+json": {
            "version_major": 2, "version_minor": 0, "state": {_CONTROLS: {
                "model_name": "HBoxModel", "model_module": "@jupyter-widgets/controls",
                "model_module_version": "2.0.0", "state": {"children": []}}}}}},
        "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


def test_offline_panel_replaces_the_frozen_controls_and_pages_say_what_needs_javascript(tmp_path):
    executed = _nb_with_panel(tmp_path / "02_t.ipynb")
    page = report.export_html(executed, tmp_path / "02_t.html").read_text()
    assert "SOURCE-MARK" in page  # the code is shown
    assert f'"model_id": "{_CONTROLS}"' not in page  # the frozen controls are gone ...
    assert "class 0 (first figure)" in page and "vxnb-offline-panel" in page  # ... the rest stays
    note = re.search(r"<body[^>]*>\s*<noscript>(.*?)</noscript>", page, re.S)
    assert note and "JavaScript is off" in note.group(1)
    bare = report.export_html(executed, tmp_path / "02_t.no-input.html", no_input=True).read_text()
    assert "SOURCE-MARK" not in bare and "vxnb-offline-panel" in bare and "JavaScript is off" in bare


def test_index_links_pages_without_code_and_shows_screenshots(tmp_path):
    entries = [{"notebook": "02_t.ipynb", "html": "02_t.html", "title": "02 · T", "description": "d",
                "seconds": 1.0, "ok": True, "error": None, "html_no_input": "02_t.no-input.html"}]
    (tmp_path / "02_t.html").write_text("x")
    index = report.write_index(tmp_path, entries, quick=True).read_text()
    assert "no-input" not in index and "screenshots/" not in index  # neither exists yet
    (tmp_path / "02_t.no-input.html").write_text("x")
    (tmp_path / "screenshots").mkdir()
    (tmp_path / "screenshots" / "02_before_slider.png").write_bytes(b"\x89PNG")
    index = report.write_index(tmp_path, entries, quick=True).read_text()
    assert set(re.findall(r'href="([^"]+)"', index)) == {"02_t.html", "02_t.no-input.html"}
    assert re.findall(r'<img src="([^"]+)"', index) == ["screenshots/02_before_slider.png"]


def test_no_input_flag_reaches_the_report(monkeypatch):
    seen = {}
    monkeypatch.setattr(report, "build_report", lambda **kw: seen.update(kw) or {"index": "i", "entries": []})
    assert report.main(["--quick", "--no-input"]) == 0
    assert seen["no_input"] is True and seen["quick"] is True
    report.main([])
    assert seen["no_input"] is False


def test_report_kernels_see_the_offline_switch(tmp_path, monkeypatch):
    """build_report runs every notebook with VXNB_OFFLINE_FRAMES=1 and restores the environment."""
    import os

    monkeypatch.delenv(widgets.OFFLINE_ENV, raising=False)
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _nb_with_panel(nbs / "02_t.ipynb")
    seen = []

    def fake_run(path, out_dir, parameters, **kw):
        seen.append(os.environ.get(widgets.OFFLINE_ENV))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / path.name).write_text(path.read_text())
        return out_dir / path.name

    monkeypatch.setattr(report, "run_notebook", fake_run)
    monkeypatch.setattr(report, "prepare_static", lambda out: None)
    with pytest.warns(RuntimeWarning, match="static figures"):
        monkeypatch.setattr(report, "find_chromium", lambda: None)
        result = report.build_report(quick=True, out_dir=tmp_path / "rep", notebooks=nbs, progress=False,
                                     no_input=True)
    assert seen == ["1"] and widgets.OFFLINE_ENV not in os.environ
    assert (tmp_path / "rep" / "02_t.no-input.html").is_file() and result["entries"][0]["ok"]
    assert 'href="02_t.no-input.html"' in (tmp_path / "rep" / "index.html").read_text()
