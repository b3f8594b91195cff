import io
import json
import os
import re
import tarfile

import pytest

from vxnb import report
from vxnb.studies.runs import RunConfig


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
               {"html": "02_b.html", "title": "B", "description": "second", "seconds": 1, "ok": False,
                "error": "PapermillExecutionError: \nTraceback …\nValueError: mask_root: no folder at x"}]
    for name in ("01_a.html", "02_b.html"):
        (tmp_path / name).write_text("x")
    page = report.write_index(tmp_path, entries, quick=True).read_text()
    assert re.findall(r'href="([^"]+)"', page) == ["01_a.html"]     # a failed notebook's page is never linked
    assert "A &amp; co" in page and "first &lt;thing&gt;" in page
    assert "failed</b>: <code class=\"err\">ValueError: mask_root: no folder at x</code>" in page


def test_failed_notebook_is_named_with_its_error_and_no_stale_page_is_linked(tmp_path, monkeypatch):
    """A notebook that fails leaves an index that says so, with the error's last line, and links
    neither its page from an earlier run nor the pages of the notebooks not run after it."""
    import papermill

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    for i, name in enumerate(("01_a", "02_b", "03_c"), 1):
        _nb(nbs / f"{name}.ipynb", f"T{i}", f"line {i}")
    out = tmp_path / "rep"
    out.mkdir()
    for name in ("01_a", "02_b", "03_c"):          # pages of an earlier, successful run
        (out / f"{name}.html").write_text("old")

    def fake_run(path, out_dir, parameters, **kw):
        if path.name.startswith("02"):
            raise papermill.PapermillExecutionError(
                cell_index=3, exec_count=3, source="x", ename="ValueError",
                evalue="layers: the model has no module(s) ['layer9']", traceback=["\x1b[0;31mValueError\x1b[0m"])
        (out_dir / path.name).write_text(path.read_text())
        return out_dir / path.name

    monkeypatch.setattr(report, "run_notebook", fake_run)
    monkeypatch.setattr(report, "export_html", lambda executed, page, **kw: page.write_text("new") or page)
    monkeypatch.setattr(report, "prepare_static", lambda out: None)
    res = report.build_report(quick=True, out_dir=out, notebooks=nbs, progress=False, raise_on_error=False,
                              static_figures=False)
    page = res["index"].read_text()
    assert re.findall(r'href="([^"]+)"', page) == ["01_a.html"]
    assert "T2 <b style=\"color:#b00\">failed</b>: <code class=\"err\">ValueError: layers: the model has no " \
           "module(s) [&#x27;layer9&#x27;]</code>" in page
    assert "T3 <b style=\"color:#777\">not run</b>" in page
    assert not (out / "02_b.html").exists()          # the earlier run's page of the failed notebook is gone
    assert [(e["ok"], e["ran"]) for e in res["entries"]] == [(True, True), (False, True), (False, False)]
    with pytest.raises(RuntimeError, match="notebook 02_b.ipynb failed"):
        report.build_report(quick=True, out_dir=out, notebooks=nbs, progress=False, static_figures=False)


def test_leaderboard_is_linked_only_when_this_run_wrote_it(tmp_path, monkeypatch):
    from vxnb import paths

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _nb(nbs / "01_a.ipynb", "T1", "line 1")
    out = tmp_path / "rep"
    write = []

    def fake_run(path, out_dir, parameters, **kw):
        if write:  # what notebook 05's leaderboard cell does: the page into the report's folder
            (paths.report_dir() / paths.LEADERBOARD_PAGE).write_text("board")
        (out_dir / path.name).write_text(path.read_text())
        return out_dir / path.name

    monkeypatch.setattr(report, "run_notebook", fake_run)
    monkeypatch.setattr(report, "export_html", lambda executed, page, **kw: page.write_text("new") or page)
    monkeypatch.setattr(report, "prepare_static", lambda out: None)
    write.append(1)
    page = report.build_report(quick=True, out_dir=out, notebooks=nbs, progress=False,
                               static_figures=False)["index"].read_text()
    assert re.findall(r'href="([^"]+)"', page) == ["01_a.html", "benchmark.html"]
    assert (out / "benchmark.html").read_text() == "board" and paths.REPORT_DIR_ENV not in os.environ
    write.clear()
    page = report.build_report(quick=True, out_dir=out, notebooks=nbs, progress=False,
                               static_figures=False)["index"].read_text()
    assert re.findall(r'href="([^"]+)"', page) == ["01_a.html"] and not (out / "benchmark.html").exists()


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


# --- offline pages ----------------------------------------------------------------------------
_WIDGET_ID = "0123456789abcdef0123456789abcdef"
_PLOTLY_HTML = ('<div> <script src="https://cdnjs.cloudflare.com/ajax/libs/mathjax/3.2.2/es5/tex-svg.min.js">'
                '</script><script>Plotly.newPlot("x", [])</script></div>')


def _executed_nb(path):
    """A tiny 'executed' notebook: a saved slider widget and a plotly-like HTML output."""
    state = {"_model_module": "@jupyter-widgets/controls", "_model_module_version": "2.0.0",
             "_model_name": "IntSliderModel", "value": 3}
    nb = {"cells": [
        {"cell_type": "markdown", "id": "c0", "metadata": {}, "source": "# 01 · T\n\nline"},
        {"cell_type": "code", "id": "c1", "execution_count": 1, "metadata": {}, "source": "slider",
         "outputs": [{"output_type": "display_data", "metadata": {}, "data": {
             "application/vnd.jupyter.widget-view+json": {"model_id": _WIDGET_ID, "version_major": 2,
                                                           "version_minor": 0},
             "text/plain": "IntSlider(value=3)"}}]},
        {"cell_type": "code", "id": "c2", "execution_count": 2, "metadata": {}, "source": "fig",
         "outputs": [{"output_type": "display_data", "metadata": {}, "data": {"text/html": _PLOTLY_HTML}}]}],
        "metadata": {"widgets": {"application/vnd.jupyter.widget-state+json": {
            "version_major": 2, "version_minor": 0, "state": {_WIDGET_ID: {
                "model_name": "IntSliderModel", "model_module": "@jupyter-widgets/controls",
                "model_module_version": "2.0.0", "state": state}}}}},
        "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


def _script_srcs(page):
    """Every URL the page loads a script from: <script src> and the widget renderer's."""
    return (re.findall(r'<script[^>]*\ssrc="([^"]*)"', page)
            + re.findall(r"widgetRendererSrc = '([^']*)'", page))


def _fake_npm_pack(spec, dest, npm):
    """Stand-in for ``npm pack``: a tarball laid out like the real package's."""
    name, version = spec.rsplit("@", 1)
    if name == "@jupyter-widgets/html-manager":
        members = {"package/dist/embed-amd.js": b"define('embed', [], 1);",
                   "package/dist/embed.js": b"not needed", "package/dist/abc123.woff2": b"font",
                   "package/dist/abc123.eot": b"old font", "package/package.json": b"{}"}
    else:
        members = {"package/require.js": b"var requirejs, require, define;", "package/bin/r.js": b"x"}
    tarball = dest / (name.strip("@").replace("/", "-") + f"-{version}.tgz")
    with tarfile.open(tarball, "w:gz") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tarball


def test_exported_page_loads_nothing_from_a_cdn(tmp_path):
    executed = _executed_nb(tmp_path / "01_t.ipynb")
    page = report.export_html(executed, tmp_path / "01_t.html").read_text()
    srcs = _script_srcs(page)
    assert "_static/require.js" in srcs and "_static/embed-amd.js" in srcs, srcs
    assert not [s for s in srcs if s.startswith(("http:", "https:", "//"))], srcs
    assert "https://cdnjs" not in page and "https://unpkg" not in page  # no MathJax, mermaid, CDN widgets
    assert 'Plotly.newPlot("x", [])' in page  # the figure itself is kept, only its MathJax tag dropped
    assert _WIDGET_ID in page and "application/vnd.jupyter.widget-state+json" in page
    # without the vendored scripts: the CDN URLs, so the controls still render online
    page = report.export_html(executed, tmp_path / "cdn.html", static_url=None).read_text()
    assert "https://cdnjs.cloudflare.com/ajax/libs/require.js" in page and "https://unpkg.com/" in page
    assert "mathjax" not in " ".join(_script_srcs(page)).lower()
    with pytest.raises(ValueError, match="static_url"):
        report.export_html(executed, tmp_path / "x.html", static_url="")


def test_static_scripts_are_fetched_once_and_copied_next_to_the_pages(tmp_path, monkeypatch):
    calls = []

    def fake(spec, dest, npm):
        calls.append(spec)
        return _fake_npm_pack(spec, dest, npm)

    monkeypatch.setattr(report, "_npm_pack", fake)
    monkeypatch.setattr(report.shutil, "which", lambda name: "/usr/bin/" + name)
    cache = report.fetch_static(tmp_path / "cache")
    assert sorted(p.name for p in cache.iterdir()) == ["VERSIONS.json", "abc123.woff2", "embed-amd.js", "require.js"]
    assert calls == [f"@jupyter-widgets/html-manager@{report.HTML_MANAGER_VERSION}",
                     f"requirejs@{report.REQUIREJS_VERSION}"]
    assert report.fetch_static(tmp_path / "cache") == cache and len(calls) == 2  # cached: no second npm call
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    out = tmp_path / "reports"
    assert report.prepare_static(out, cache_dir=cache) == report.STATIC_DIRNAME
    for name in ("require.js", "embed-amd.js", "abc123.woff2"):
        assert (out / "_static" / name).read_bytes() == (cache / name).read_bytes()
    # the pages' relative URLs resolve to those files
    page = report.export_html(_executed_nb(tmp_path / "01_t.ipynb"), out / "01_t.html").read_text()
    for src in _script_srcs(page):
        assert (out / src).is_file(), src
    # a stale cache (other versions) is replaced
    marker = json.loads((cache / "VERSIONS.json").read_text())
    marker["versions"]["requirejs"] = "0.0.1"
    (cache / "VERSIONS.json").write_text(json.dumps(marker))
    report.fetch_static(cache)
    assert len(calls) == 4 and json.loads((cache / "VERSIONS.json").read_text())["versions"]["requirejs"] \
        == report.REQUIREJS_VERSION
    with pytest.raises(ValueError, match="static"):
        report.copy_static(tmp_path / "reports", tmp_path / "elsewhere")


def test_without_npm_the_report_is_written_with_a_warning(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="npm"):
        report.fetch_static(tmp_path / "cache", npm="no-such-npm-here")
    assert not (tmp_path / "cache").exists()

    def failing_pack(spec, dest, npm):
        raise RuntimeError("npm pack failed (1): E404")

    monkeypatch.setattr(report, "_npm_pack", failing_pack)
    with pytest.warns(RuntimeWarning, match="need network"):
        assert report.prepare_static(tmp_path / "out", cache_dir=tmp_path / "cache") is None
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out" / "_static").exists()

    # the whole report, with the notebook run faked (no execution) and npm unavailable
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _executed_nb(nbs / "01_t.ipynb")

    def fake_run(path, out_dir, parameters, **kw):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / path.name).write_text(path.read_text())
        return out_dir / path.name

    def no_npm(cache_dir=None, *, npm="npm"):
        raise RuntimeError("npm: 'npm' is not on the PATH")

    monkeypatch.setattr(report, "run_notebook", fake_run)
    monkeypatch.setattr(report, "fetch_static", no_npm)
    with pytest.warns(RuntimeWarning, match="widget controls .* need network"):
        result = report.build_report(quick=True, out_dir=tmp_path / "rep", notebooks=nbs, progress=False)
    page = (tmp_path / "rep" / "01_t.html").read_text()
    assert result["entries"][0]["ok"] and 'Plotly.newPlot("x", [])' in page
    assert "https://unpkg.com/" in page and not (tmp_path / "rep" / "_static").exists()


def test_run_names_separate_training_settings():
    names = {RunConfig().run_name, RunConfig(epochs=2).run_name, RunConfig(train_limit=100).run_name,
             RunConfig.from_params(quick=True).run_name, RunConfig.from_params(quick=True, train_limit=50).run_name}
    assert len(names) == 5


def test_lasso_path_cache_follows_the_statistics(tmp_path):
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from vxnb.studies import runs

    rng = np.random.default_rng(0)
    cols = pd.DataFrame({"kind": ["conv"] * 6})

    def feats():
        X = rng.random((20, 6))
        L = np.eye(2)[rng.integers(0, 2, 20)]
        return SimpleNamespace(G=X.T @ X, XtL=X.T @ L, columns=cols)

    cfg = RunConfig(runs_root=str(tmp_path))
    a, b = feats(), feats()
    pa = runs.get_lasso_path(cfg, a, mu_max=1.0)
    assert np.allclose(runs.get_lasso_path(cfg, a, mu_max=1.0).coef(0.5), pa.coef(0.5))  # read back
    pb = runs.get_lasso_path(cfg, b, mu_max=1.0)  # other statistics (a retrained model): solved anew
    assert not np.allclose(pa.coef(0.5), pb.coef(0.5))
    assert len(list(runs.run_dir(cfg).glob("lasso-conv-mu1-*.npz"))) == 2


def _fake_training(accuracies):
    """A stand-in for models.train_model returning the given final train accuracies in turn,
    recording the seeds and the initial weights it was called with."""
    calls = []

    def train(model, train, test, *, epochs, seed, progress, **options):  # options: the fold recipe
        calls.append((seed, [p.detach().clone() for p in model.parameters()]))
        acc = accuracies[len(calls) - 1]
        return {"loss": [1.0] * epochs, "train_accuracy": [acc] * epochs, "test_accuracy": [acc] * epochs,
                "final_test_accuracy": acc}
    return train, calls


def _tiny_data():
    import torch
    from torch.utils.data import TensorDataset

    x, y = torch.rand(12, 3, 32, 32), torch.arange(12) % 6
    return TensorDataset(x, y), TensorDataset(x, y), [f"c{i}" for i in range(6)]


def test_stalled_training_is_repeated_from_another_seed_and_init_is_seeded(tmp_path, monkeypatch):
    import torch

    from vxnb import models
    from vxnb.studies import runs

    train, calls = _fake_training([0.33, 0.99, 0.5])
    monkeypatch.setattr(models, "train_model", train)
    cfg = RunConfig(size=32, epochs=5, runs_root=str(tmp_path))
    with pytest.warns(UserWarning, match="stalled at train accuracy 0.330"):
        _, meta = runs.get_model(cfg, data=_tiny_data(), progress=False)
    assert [c[0] for c in calls] == [0, 1000]  # stopped after the first attempt that trained
    assert [a["seed"] for a in meta["train_attempts"]] == [0, 1000]
    assert meta["test_accuracy"] == 0.99
    # the initial weights follow the seed: attempt 1 differs from attempt 0, and a retrain
    # of the same config starts from exactly the same weights as before
    assert not torch.equal(calls[0][1][0], calls[1][1][0])
    train2, calls2 = _fake_training([0.9])
    monkeypatch.setattr(models, "train_model", train2)
    runs.get_model(cfg, data=_tiny_data(), progress=False, retrain=True)
    assert all(torch.equal(a, b) for a, b in zip(calls[0][1], calls2[0][1]))


def test_training_keeps_the_best_attempt_and_short_runs_are_not_retried(tmp_path, monkeypatch):
    import warnings

    from vxnb import models
    from vxnb.studies import runs

    train, calls = _fake_training([0.2, 0.4, 0.3])
    monkeypatch.setattr(models, "train_model", train)
    with pytest.warns(UserWarning) as record:
        _, meta = runs.get_model(RunConfig(size=32, epochs=4, runs_root=str(tmp_path / "a")),
                                 data=_tiny_data(), progress=False)
    messages = [str(w.message) for w in record]
    assert len(messages) == 3 and "starting again" in messages[0] and "keeping the best of 3 attempts" in messages[2]
    assert len(calls) == 3 and meta["test_accuracy"] == 0.4
    train, calls = _fake_training([0.2])
    monkeypatch.setattr(models, "train_model", train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one epoch: under-trained, not stalled, so no retry and no warning
        runs.get_model(RunConfig(size=32, epochs=1, runs_root=str(tmp_path / "b")), data=_tiny_data(), progress=False)
    assert len(calls) == 1


def test_finished_progress_bars_are_left_out_of_the_page(tmp_path):
    """tqdm's leave=False bars end as HBoxes whose layout is hidden: the page drops them (no
    blank gap) and keeps every visible widget."""
    import nbformat

    path = _executed_nb(tmp_path / "01_t.ipynb")
    nb = json.loads(path.read_text())
    state = nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    hidden_bar, layout = "f" * 32, "e" * 32
    state[layout] = {"model_name": "LayoutModel", "model_module": "@jupyter-widgets/base",
                     "model_module_version": "2.0.0", "state": {"visibility": "hidden"}}
    state[hidden_bar] = {"model_name": "HBoxModel", "model_module": "@jupyter-widgets/controls",
                         "model_module_version": "2.0.0", "state": {"layout": f"IPY_MODEL_{layout}", "children": []}}
    nb["cells"][1]["outputs"].append({"output_type": "display_data", "metadata": {}, "data": {
        "application/vnd.jupyter.widget-view+json": {"model_id": hidden_bar, "version_major": 2, "version_minor": 0},
        "text/plain": "features: 100%"}})
    path.write_text(json.dumps(nb))
    node = nbformat.read(str(path), as_version=4)
    assert report._drop_hidden_widgets(node) == 1
    assert [o["data"]["text/plain"] for o in node.cells[1].outputs] == ["IntSlider(value=3)"]
    page = report.export_html(path, tmp_path / "01_t.html").read_text()
    views = re.findall(r'"model_id": "([0-9a-f]{32})"', page)
    assert _WIDGET_ID in views and hidden_bar not in views


def test_timing_summary_per_notebook_and_phase(tmp_path):
    import os
    import time

    import pandas as pd

    from vxnb.report import timing_summary

    entries = [{"notebook": "01_a.ipynb", "seconds": 12.4, "ok": True},
               {"notebook": "05_bench.ipynb", "seconds": 100.0, "ok": False}]
    bench = tmp_path / "benchmark-x"
    bench.mkdir()
    pd.DataFrame({"variant": ["a", "a", "b", "b"], "fold": [0, 0, 1, 1],
                  "phase": ["model", "scores", "model", "scores"], "seconds": [30.0, 5.0, 20.0, 7.0],
                  "cached": [False, False, True, False]}).to_csv(bench / "timings-views.csv", index=False)
    old = bench / "timings-blocks.csv"
    pd.DataFrame({"phase": ["model"], "seconds": [999.0], "cached": [False]}).to_csv(old, index=False)
    since = time.time() - 60
    os.utime(old, (since - 3600, since - 3600))  # written by an earlier run: left out
    text = timing_summary(entries, tmp_path, since=since)
    lines = text.splitlines()
    assert lines[0] == "time per notebook:"
    assert lines[1].split() == ["01_a.ipynb", "12", "s"] and lines[2].split()[-1] == "(failed)"
    assert lines[3].split() == ["total", "112", "s"]
    # the cached fold's 20 s and the old file's 999 s are not this run's work
    assert lines[5].split() == ["model", "30", "s", "(1", "folds)"]
    assert lines[6].split() == ["scores", "12", "s", "(2", "folds)"]
    assert "phase" not in timing_summary(entries, tmp_path / "missing")


def test_timing_summary_of_a_second_run_whose_folds_were_all_read_back(tmp_path):
    # every fold of the timings tables was cached: a second `make report` crashed here (max() of
    # an empty sequence) after writing every page
    import pandas as pd

    from vxnb.report import timing_summary

    bench = tmp_path / "benchmark-x"
    bench.mkdir()
    pd.DataFrame({"phase": ["model", "scores"], "seconds": [30.0, 5.0],
                  "cached": [True, True]}).to_csv(bench / "timings-views.csv", index=False)
    text = timing_summary([{"notebook": "05_bench.ipynb", "seconds": 9.0, "ok": True}], tmp_path)
    assert text.splitlines()[-1] == "time per phase: no benchmark fold computed in this run (all read back from the store)"
    assert "model" not in text


def test_plotly_bundle_is_shared_beside_the_pages_unless_self_contained(tmp_path):
    # plotly's notebook renderer writes the whole plotly.js into the page (4.8 MB per page)
    bundle = "/**\n* plotly.js v9.8.7\n* MIT\n*/\n(function(){window.Plotly = {newPlot: function(){}};})();"
    init = f"<script>window.PlotlyConfig = {{}};</script>\n<script>{bundle}</script>"
    executed = _executed_nb(tmp_path / "01_t.ipynb")
    nb = json.loads(executed.read_text())
    nb["cells"][2]["outputs"].insert(0, {"output_type": "display_data", "metadata": {}, "data": {"text/html": init}})
    nb["cells"][2]["outputs"].append({"output_type": "display_data", "metadata": {}, "data": {"text/html": init}})
    executed.write_text(json.dumps(nb))
    out = tmp_path / "out"
    out.mkdir()
    page = report.export_html(executed, out / "01_t.html").read_text()
    assert "plotly.js v9.8.7" not in page and page.count('<script src="_static/plotly-9.8.7.js"></script>') == 1
    assert (out / "_static" / "plotly-9.8.7.js").read_text() == bundle
    assert page.index("_static/plotly-9.8.7.js") < page.index('Plotly.newPlot("x", [])')  # loaded before the figure
    assert "window.PlotlyConfig" in page  # the renderer's own config script is kept
    whole = report.export_html(executed, out / "02_t.html", self_contained=True).read_text()
    assert whole.count(bundle) == 2 and "_static/plotly-" not in whole
    # a page without the bundle is left as it is
    assert report.share_plotly_bundle("<p>x</p>", out) == "<p>x</p>"
    assert report.parse_args(["--self-contained"]).self_contained is True
    assert report.parse_args([]).self_contained is False


def test_prose_measured_in_the_full_setting_shows_only_there(tmp_path):
    """Notebook 05's typed-in findings (Ours 3.6, Deconv+GB 2.3, …) were measured in the full
    an8Flower setting: the cell is tagged, and the report leaves it out of quick and other runs."""
    import nbformat

    from vxnb.paths import notebooks_dir

    nb = nbformat.read(str(notebooks_dir() / "05_an8flower_benchmark.ipynb"), as_version=4)
    (found,) = [c for c in nb.cells if c.cell_type == "markdown" and "Ours scored 3.6" in c.source]
    assert report.FULL_SETTING_ONLY in found.metadata.get("tags", [])
    assert report.FULL_SETTING_ONLY in report.skipped_tags({"quick": True})
    assert report.FULL_SETTING_ONLY not in report.skipped_tags({"quick": False})
    marked = report._mark_skipped(notebooks_dir() / "05_an8flower_benchmark.ipynb", {report.FULL_SETTING_ONLY},
                                  tmp_path)
    copy = nbformat.read(str(marked), as_version=4)
    tagged_prose = [c for c in nb.cells if c.cell_type == "markdown"
                    and report.FULL_SETTING_ONLY in c.metadata.get("tags", [])]  # e.g. the modern models' heading
    assert len(copy.cells) == len(nb.cells) - len(tagged_prose) and not any("Ours scored 3.6" in c.source
                                                                           for c in copy.cells)


def test_one_combine_default_for_explain_and_the_benchmark():
    import inspect

    from vxnb import explanations
    from vxnb.studies import benchmark

    funcs = [explanations.explain, explanations.explain_batch, explanations.make_explain_fn,
             explanations.combine_heatmaps, benchmark.method_heatmaps, benchmark.explain_examples]
    defaults = {f.__name__: inspect.signature(f).parameters["combine"].default for f in funcs}
    assert set(defaults.values()) == {explanations.DEFAULT_COMBINE}, defaults


def test_notebook_05_extended_studies_run_only_when_asked():
    """The modern-model section trains three more models per fold: skipped unless
    ``extended_studies`` is True, in full runs too. The counterfactual, shortcut and leaderboard
    sections run in every full an8Flower report (on Table 1's fold models)."""
    import nbformat

    from vxnb.paths import notebooks_dir

    assert report.EXTENDED_STUDIES in report.skipped_tags({})
    assert report.EXTENDED_STUDIES in report.skipped_tags({"extended_studies": False})
    assert report.EXTENDED_STUDIES not in report.skipped_tags({"extended_studies": True})
    nb = nbformat.read(str(notebooks_dir() / "05_an8flower_benchmark.ipynb"), as_version=4)
    tagged = ["".join(c.source) for c in nb.cells if report.EXTENDED_STUDIES in c.metadata.get("tags", [])]
    assert any("modern.modern_benchmark" in s for s in tagged)
    untagged = ["".join(c.source) for c in nb.cells if report.EXTENDED_STUDIES not in c.metadata.get("tags", [])]
    full_only = ["".join(c.source) for c in nb.cells if report.FULL_SETTING_ONLY in c.metadata.get("tags", [])]
    for study in ("counterfactual.counterfactual_study", "counterfactual.shortcut_study",
                  "leaderboard.leaderboard_page"):
        assert any(study in s for s in untagged) and any(study in s for s in full_only), study
    assert any("benchmark.run_benchmark" in s for s in untagged)  # Table 1 itself always runs
