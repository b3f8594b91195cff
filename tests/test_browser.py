"""The widgets in a real browser: JupyterLab driven by Debian's Chromium through Playwright, and
a report page opened offline (file://, no network), with JavaScript and without.

Nothing is downloaded: Playwright launches ``/usr/bin/chromium`` (``vxnb.report.find_chromium``).
The only skip is a missing Chromium, and it is printed loudly. One quick run (notebook 02
through papermill, as the report runs it) prepares the run folder and the report page; the live
notebooks then read that run folder.
"""
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from vxnb import report, widgets
from vxnb.paths import work_dir
from vxnb.relevance import relevant_features
from vxnb.studies import runs
from vxnb.studies.parameters import RUN_PARAMETERS, notebook_parameters

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.xdist_group("browser")]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {p.name: p for p in report.find_notebooks()}
MU = 10.0
QUICK = dict(quick=True, also_mnist=False, n_random=1)


@pytest.fixture(scope="module")
def chromium():
    path = report.find_chromium()
    if path is None:
        msg = ("\n" + "!" * 78 + "\n!! BROWSER TESTS SKIPPED: no Chromium at /usr/bin/chromium or on the PATH.\n"
               "!! Install it (Debian: apt-get install -y chromium; .ci/run does) or set VXNB_CHROMIUM.\n" + "!" * 78)
        print(msg, file=sys.stderr, flush=True)
        pytest.skip("Chromium is missing (see the message above)")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, chromium):
    """A quick run: notebook 02 through the report (model, features, lasso path, the report page
    with its offline panel and static figures) and the parameterised notebooks for JupyterLab."""
    import nbformat

    os.environ["OMP_NUM_THREADS"] = "1"  # the other pytest-xdist worker uses the second core
    root = tmp_path_factory.mktemp("browser")
    params = {**QUICK, "runs_root": str(root / "runs"), "mu": MU}
    only02 = root / "only02"
    only02.mkdir()
    shutil.copy(NOTEBOOKS["02_relevant_features.ipynb"], only02)
    t0 = time.perf_counter()
    result = report.build_report(quick=True, out_dir=root / "reports", notebooks=only02, parameters=params,
                                 progress=False, no_input=True)
    print(f"quick run of notebook 02 (report page): {time.perf_counter() - t0:.0f} s")
    nbs = root / "nbs"
    nbs.mkdir()
    for name in ("02_relevant_features.ipynb", "04_explanation.ipynb"):  # the parameters, as papermill injects them
        nb = nbformat.read(str(NOTEBOOKS[name]), as_version=4)
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        # papermill injects the run's settings too: the cell holds only the notebook's own parameters
        names = set(notebook_parameters(NOTEBOOKS[name])) | set(RUN_PARAMETERS) | {"quick"}
        source = "\n".join(f"{k} = {v!r}" for k, v in params.items() if k in names)
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
        nbformat.write(nb, str(nbs / name))
    cfg = runs.RunConfig.from_params(quick=True, runs_root=params["runs_root"])
    data = runs.load_data(cfg, progress=False)
    model, _ = runs.get_model(cfg, data=data, progress=False)
    feats = runs.get_features(cfg, model, "train", data=data, progress=False)
    path = runs.get_lasso_path(cfg, feats, mu_max=50.0, tag="all")  # the notebook's paths["All"]
    return dict(root=root, reports=root / "reports", nbs=nbs, result=result, classes=data[2], feats=feats,
                path=path)


def _count(run, cls, mu, layers=None):
    """Selected features of class ``cls`` at ``mu``: non-zero weights of W(μ) (and, as the
    notebook counts them, relevant_features' rows, which must agree)."""
    W = run["path"].coef(mu)
    cols = run["feats"].columns
    keep = np.ones(len(cols), bool) if layers is None else cols["layer"].isin(layers).to_numpy()
    n = int(np.count_nonzero(W[keep, cls]))
    rel = relevant_features(W, cols, run["classes"])
    rel = rel[(rel["class"] == cls) & (rel["layer"].isin(layers) if layers is not None else True)]
    assert len(rel) == n
    return n


def _save_shot(run, png: bytes, name: str):
    """A screenshot for the reader: in the test's report folder and where `make report` writes."""
    for folder in (run["reports"] / report.SCREENSHOTS_DIRNAME, work_dir("reports") / report.SCREENSHOTS_DIRNAME):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png)


# --- JupyterLab ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(run):
    """JupyterLab, headless, on a free localhost port with a token; kernels see this checkout."""
    port, token = _free_port(), secrets.token_hex(16)
    home = run["root"] / "jupyter"
    settings = home / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    news = home / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True, exist_ok=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "OMP_NUM_THREADS": "1"}
    env.pop(widgets.OFFLINE_ENV, None)  # live notebooks: ipywidgets only
    log = open(run["root"] / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={run['nbs']}",
                             "--LabApp.expose_app_in_browser=True", "--ServerApp.port_retries=0", "--allow-root"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"JupyterLab exited: {(run['root'] / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            raise RuntimeError("JupyterLab did not answer within 2 minutes")
        yield dict(url=url, token=token)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


_RUN_ALL_DONE = """() => {
  const nb = window.jupyterapp.shell.currentWidget;
  if (!nb || !nb.content || !nb.sessionContext.session || !nb.sessionContext.session.kernel) return null;
  const cells = nb.content.widgets.filter(c => c.model.type === 'code');
  const errors = cells.flatMap(c => c.model.outputs.toJSON()).filter(o => o.output_type === 'error');
  if (errors.length) return 'error: ' + errors[0].ename + ': ' + errors[0].evalue;
  const pending = cells.filter(c => c.model.executionCount === null || c.promptNode.textContent.includes('*'));
  return pending.length === 0 && nb.sessionContext.session.kernel.status === 'idle' ? 'done' : null;
}"""


def _open_and_run(browser, lab, name, timeout_s=420):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.on("console", lambda m: m.type == "error" and print("browser console:", m.text))
    # a workspace of its own, reset: only this notebook opens (not the ones a former page left)
    page.goto(f"{lab['url']}/lab/workspaces/{Path(name).stem}/tree/{name}?reset&token={lab['token']}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                           "window.jupyterapp.shell.currentWidget.sessionContext.session && "
                           "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel && "
                           "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                           timeout=120_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_timeout(1000)
    try:
        state = page.wait_for_function(_RUN_ALL_DONE, timeout=timeout_s * 1000, polling=500).json_value()
    except Exception:
        page.screenshot(path=os.environ.get("PYTEST_BROWSER_FAILURE_PNG", "/tmp/vxnb-browser-failure.png"))
        raise
    assert state == "done", state
    assert page.evaluate("() => window.jupyterapp.shell.currentWidget.context.path") == name
    return page


def _cell(page, needle):
    """The notebook cell whose source contains ``needle``."""
    cell = page.locator(".jp-CodeCell").filter(has=page.locator(".jp-InputArea", has_text=needle)).first
    cell.scroll_into_view_if_needed()
    return cell


def _titles(cell):
    return cell.locator(".js-plotly-plot").first.evaluate(
        "gd => [gd.layout.title && (gd.layout.title.text || gd.layout.title)]"
        ".concat((gd.layout.annotations || []).map(a => a.text))")


#: The total height of a figure's bars (plotly may hold y as a typed array, so read the full data).
_SUM_Y = "gd => gd._fullData.reduce((s, t) => s + Array.from(t.y || []).reduce((a, b) => a + b, 0), 0)"


def _drag(page, slider, frac):
    """Drag a slider's handle with the mouse to ``frac`` of its track (beyond 1: the right end)."""
    handle = slider.locator(".noUi-handle").first
    handle.scroll_into_view_if_needed()
    track, box = slider.locator(".noUi-base").first.bounding_box(), handle.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + frac * track["width"], box["y"] + box["height"] / 2, steps=12)
    page.mouse.up()


def _wait_title(page, cell, pattern, timeout_s=60):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        texts = " | ".join(str(t) for t in _titles(cell)) if cell.locator(".js-plotly-plot").count() else ""
        if re.search(pattern, texts):
            return texts
        page.wait_for_timeout(250)
    shot = Path(os.environ.get("PYTEST_BROWSER_FAILURE_PNG", "/tmp/vxnb-browser-failure.png"))
    page.screenshot(path=str(shot), full_page=False)
    outputs = page.evaluate("""() => window.jupyterapp.shell.currentWidget.content.widgets
        .filter(c => c.model.type === 'code').map(c => c.model.outputs.toJSON()
        .map(o => o.output_type + ':' + Object.keys(o.data || {}).join('+') + ':' + (o.text || '').slice(0, 300)))""")
    raise AssertionError(f"no figure title matching {pattern!r}; last: {texts!r} (screenshot: {shot}); "
                         f"outputs: {outputs}")


def test_notebook_02_mu_slider_and_class_change_the_figure(run, lab, browser):
    t0 = time.perf_counter()
    page = _open_and_run(browser, lab, "02_relevant_features.ipynb")
    cell = _cell(page, "widgets.panel(selected")
    classes = run["classes"]
    n0 = _count(run, 0, MU)
    _wait_title(page, cell, rf"class {re.escape(classes[0])}: {n0} features at μ = 10\b")
    bars = cell.locator(".js-plotly-plot").first.evaluate(_SUM_Y)
    assert bars == n0  # the bars count the same features per layer
    _save_shot(run, cell.screenshot(), "02_live_before_moving_mu.png")

    mu_slider = cell.locator(".widget-slider").first
    ends = {1.2: run["path"].mu_max, -0.2: 0.1}  # the slider's two ends: μ_max and 0.1
    frac, mu1 = next(((f, m) for f, m in ends.items() if _count(run, 0, m) != n0), (None, None))
    assert mu1 is not None, "class 0 has as many features at both ends of the μ slider as at μ = 10"
    n1 = _count(run, 0, mu1)
    _drag(page, mu_slider, frac)
    _wait_title(page, cell, rf"class {re.escape(classes[0])}: {n1} features at μ = {mu1:g}\b")
    assert cell.locator(".js-plotly-plot").first.evaluate(_SUM_Y) == n1
    _save_shot(run, cell.screenshot(), "02_live_after_moving_mu.png")

    cell.locator(".widget-dropdown select").first.select_option(index=2)
    n2 = _count(run, 2, mu1)
    _wait_title(page, cell, rf"class {re.escape(classes[2])}: {n2} features at μ = {mu1:g}\b")

    # nothing to show: one layer with no selected feature for this class at this μ gives a sentence
    if mu1 != 0.1:
        _drag(page, mu_slider, -0.2)  # the smallest μ: few features, so some layer has none
    _wait_title(page, cell, rf"class {re.escape(classes[2])}: {_count(run, 2, 0.1)} features at μ = 0\.1\b")
    W = run["path"].coef(0.1)[:, 2]
    cols = run["feats"].columns
    empty = [l for l in cols["layer"].unique() if not np.any(W[(cols["layer"] == l).to_numpy()])]
    assert empty, "every layer has a feature of class 2 at μ = 0.1"
    cell.locator(".widget-select-multiple select").first.select_option([empty[0]])
    sentence = cell.locator(".jp-OutputArea-output", has_text="no feature of the chosen layers is selected")
    sentence.first.wait_for(timeout=60_000)
    assert sentence.first.inner_text().strip().startswith("no feature")  # a sentence, not a quoted repr
    assert cell.locator(".js-plotly-plot").count() == 0  # no empty plot left behind
    assert cell.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
    _save_shot(run, cell.screenshot(), "02_live_nothing_to_show.png")
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")  # free the core
    page.close()
    print(f"notebook 02 in JupyterLab: {time.perf_counter() - t0:.0f} s")
    # in this test, not a later one: pytest-xdist may run other modules between this module's
    # tests, which rebuilds the module's fixtures, so no test may rely on another's files
    _index_shows_the_screenshots(run)


def test_notebook_04_layer_and_channel_explorer(run, lab, browser):
    t0 = time.perf_counter()
    page = _open_and_run(browser, lab, "04_explanation.ipynb")
    cell = _cell(page, "widgets.panel(explore")
    layers = list(run["feats"].layers)
    first = _wait_title(page, cell, r"layer \d+ · ch 0\b")
    _save_shot(run, cell.screenshot(), "04_live_before_layer_channel.png")
    selects = cell.locator(".widget-dropdown select")
    target = len(layers) - 2  # a deeper layer than the first
    selects.first.select_option(index=target)
    number = int(run["feats"].columns.drop_duplicates("layer").set_index("layer").loc[layers[target], "layer_number"])
    _wait_title(page, cell, rf"layer {number} · ch 0\b")
    sliders = cell.locator(".widget-slider")
    assert sliders.count() == 2  # image and channel
    _drag(page, sliders.nth(1), 0.5)
    page.wait_for_timeout(500)
    channel = int(sliders.nth(1).locator(".widget-readout").inner_text())
    width = int((run["feats"].columns["layer"] == layers[target]).sum())
    assert channel > 0
    after = _wait_title(page, cell, rf"layer {number} · ch {channel % width}\b")
    assert after != first
    _save_shot(run, cell.screenshot(), "04_live_after_layer_channel.png")
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
    page.close()
    print(f"notebook 04 in JupyterLab: {time.perf_counter() - t0:.0f} s")


# --- the report page, offline ---------------------------------------------------------------------
def _offline_context(browser, **kw):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, **kw)
    context.set_offline(True)
    requested = []

    def route(r):
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            requested.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    return context, requested


def test_report_page_answers_offline(run, browser):
    page_path = run["reports"] / "02_relevant_features.html"
    assert run["result"]["entries"][0]["ok"], run["result"]["entries"][0]["error"]
    context, requested = _offline_context(browser)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_path.as_uri())
    panel = page.locator(".vxnb-offline-panel .plotly-graph-div").first
    panel.locator(".slider-rail-rect").first.wait_for(timeout=60_000)
    panel.scroll_into_view_if_needed()
    classes = run["classes"]
    grid = [v for _, v in widgets.offline_choices(widgets.mu_slider(run["path"].mu_max, value=MU))]
    title = lambda: panel.evaluate("gd => gd.layout.title.text")  # noqa: E731
    assert title().startswith(f"class {classes[0]}: {_count(run, 0, MU)} features")
    assert panel.get_attribute("data-vxnb-state") == f"0,{grid.index(MU)}"
    # move plotly's μ slider to its left end: the frame of the smallest μ
    rail = panel.locator(".slider-rail-rect").first.bounding_box()
    page.mouse.click(rail["x"] + 2, rail["y"] + rail["height"] / 2)
    page.wait_for_function("gd => gd.getAttribute('data-vxnb-state') === '0,0'", arg=panel.element_handle(),
                           timeout=10_000)
    page.wait_for_timeout(300)
    assert title().startswith(f"class {classes[0]}: {_count(run, 0, grid[0])} features at μ = {grid[0]:.3g}")
    # and the class drop-down
    panel.locator(".updatemenu-header").first.click()
    panel.locator(".updatemenu-dropdown-button").nth(3).click()
    page.wait_for_function("gd => gd.getAttribute('data-vxnb-state') === '3,0'", arg=panel.element_handle(),
                           timeout=10_000)
    page.wait_for_timeout(300)
    assert title().startswith(f"class {classes[3]}: {_count(run, 3, grid[0])} features")
    n_bars = panel.evaluate(_SUM_Y)
    assert n_bars == _count(run, 3, grid[0])
    _save_shot(run, panel.screenshot(), "02_report_offline_panel.png")
    assert requested == [] and errors == []
    # the frozen ipywidgets controls of the live panel are not in the page; the page without code has the panel
    text = lambda p: re.sub(r"<[^>]+>", "", p.read_text())  # noqa: E731  (the code is highlighted in spans)
    assert "widgets.panel(selected" in text(page_path)  # the code is shown ...
    bare = run["reports"] / "02_relevant_features.no-input.html"
    assert "widgets.panel(selected" not in text(bare) and "vxnb-offline-panel" in bare.read_text()  # ... here not
    context.close()


def test_report_page_without_javascript_shows_static_figures_and_a_note(run, browser):
    context, requested = _offline_context(browser, java_script_enabled=False)
    page = context.new_page()
    page.goto((run["reports"] / "02_relevant_features.html").as_uri())
    note = page.locator("p.vxnb-noscript")
    assert note.count() == 1 and "JavaScript is off" in note.inner_text() and note.bounding_box()["height"] > 10
    n_figures = len(re.findall(r'class="plotly-graph-div"', (run["reports"] / "02_relevant_features.html").read_text()))
    static = page.locator("img.vxnb-static")
    assert n_figures >= 4 and static.count() == n_figures
    for i in range(static.count()):
        box = static.nth(i).bounding_box()
        assert box and box["width"] > 100 and box["height"] > 50, i  # drawn, not a broken image
        assert static.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
    assert requested == []
    context.close()


def _index_shows_the_screenshots(run):
    """The index shows the screenshots the live test saved (written again here, as `make report`
    does on its next run)."""
    shots = sorted(p.name for p in (run["reports"] / report.SCREENSHOTS_DIRNAME).glob("*.png"))
    assert {"02_live_before_moving_mu.png", "02_live_after_moving_mu.png"} <= set(shots), shots
    index = report.write_index(run["reports"], run["result"]["entries"], quick=True).read_text()
    assert [f"screenshots/{s}" for s in shots] == re.findall(r'<img src="([^"]+)"', index)
    for s in shots:
        assert (run["reports"] / report.SCREENSHOTS_DIRNAME / s).read_bytes()[:4] == b"\x89PNG"
