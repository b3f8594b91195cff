"""The main job: run the numbered notebooks through papermill and write an offline report.

``python -m vxnb.report [--quick]`` (what ``make report`` calls) executes every
``notebooks/NN_*.ipynb`` in order with its full parameters (``--quick``: the quick ones CI
uses), writes the executed notebooks and one self-contained HTML page each (plotly's
JavaScript embedded, widget state saved) under ``reports/``, and an ``index.html`` that
links them with one line each on what they show.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from .runs import repo_root
from .utils import atomic_path

__all__ = ["find_notebooks", "notebook_summary", "run_notebook", "build_report", "write_index", "main"]

NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[\w-]+\.ipynb$")


def find_notebooks(folder: str | Path | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) of ``folder``, in order."""
    folder = Path(folder) if folder else repo_root() / "notebooks"
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


def run_notebook(path: Path, out_dir: Path, parameters: dict[str, Any], *, progress: bool = True,
                 kernel_name: str = "python3", cwd: Path | None = None) -> Path:
    """Execute one notebook with papermill into ``out_dir``; return the executed copy's path.

    The executed notebook is written atomically; on failure papermill's partial copy is kept
    beside it as ``NAME.failed.ipynb`` for inspection and the error is re-raised.
    """
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / path.name
    failed = out_dir / (path.stem + ".failed.ipynb")
    with atomic_path(target) as tmp:
        tmp_nb = tmp.with_suffix(".ipynb")
        try:
            pm.execute_notebook(str(path), str(tmp_nb), parameters=parameters, progress_bar=progress,
                                kernel_name=kernel_name, cwd=str(cwd or path.parent))
        except BaseException:
            if tmp_nb.exists():
                tmp_nb.replace(failed)
            raise
        tmp_nb.replace(tmp)
    if failed.exists():
        failed.unlink()
    return target


def export_html(executed: Path, html_path: Path) -> Path:
    """A self-contained HTML page of an executed notebook (widget state as saved by nbclient)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(executed), as_version=4)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    with atomic_path(html_path) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return html_path


def write_index(out_dir: Path, entries: list[dict[str, Any]], *, quick: bool) -> Path:
    """``index.html`` linking every page, one line each on what it shows."""
    rows = []
    for e in entries:
        status = "" if e["ok"] else ' <b style="color:#b00">failed</b>'
        rows.append(
            f'<li><a href="{html.escape(e["html"])}">{html.escape(e["title"])}</a>{status}'
            f' <span class="t">({e["seconds"]:.0f} s)</span><br>{html.escape(e["description"])}</li>')
    mode = "quick parameters (CI setting)" if quick else "full parameters"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vxnb report</title>
<style>body{{font-family:sans-serif;max-width:52em;margin:2em auto;line-height:1.5}}
li{{margin-bottom:1em}} .t{{color:#777;font-size:90%}}</style></head>
<body><h1>vxnb report: Visual Explanation by Interpretation</h1>
<p>Notebooks executed with {mode} on {time.strftime('%Y-%m-%d %H:%M')}. Each page opens offline.</p>
<ol>
{chr(10).join(rows)}
</ol></body></html>
"""
    index = out_dir / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return index


def build_report(*, quick: bool = False, out_dir: str | Path | None = None,
                 notebooks: str | Path | None = None, parameters: dict[str, Any] | None = None,
                 progress: bool = True, stop_on_error: bool = True) -> dict[str, Any]:
    """Run every numbered notebook and write the report; returns {index, entries}."""
    out = Path(out_dir) if out_dir else repo_root() / "reports"
    out.mkdir(parents=True, exist_ok=True)
    params = {"quick": bool(quick)}
    params.update(parameters or {})
    entries = []
    paths = find_notebooks(notebooks)
    for i, nb in enumerate(paths, 1):
        title, desc = notebook_summary(nb)
        print(f"[{i}/{len(paths)}] {nb.name}: {title}", flush=True)
        t0 = time.perf_counter()
        ok, error = True, None
        try:
            executed = run_notebook(nb, out, params, progress=progress)
            export_html(executed, out / (nb.stem + ".html"))
        except Exception as err:  # record, write the index, then re-raise
            ok, error = False, f"{type(err).__name__}: {err}"
        entries.append({"notebook": nb.name, "html": nb.stem + ".html", "title": title, "description": desc,
                        "seconds": time.perf_counter() - t0, "ok": ok, "error": error})
        if not ok and stop_on_error:
            break
    index = write_index(out, entries, quick=quick)
    failed = [e for e in entries if not e["ok"]]
    if failed:
        raise RuntimeError(f"notebook {failed[0]['notebook']} failed: {failed[0]['error']} "
                           f"(the partial run is in {out / (Path(failed[0]['notebook']).stem + '.failed.ipynb')})")
    return {"index": index, "entries": entries}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vxnb.report", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the notebooks' quick parameters (CI setting)")
    parser.add_argument("--out", default=None, help="output folder (default: reports/)")
    parser.add_argument("--notebooks", default=None, help="notebook folder (default: notebooks/)")
    parser.add_argument("--prepare-data", action="store_true", help="only render/fetch the datasets")
    args = parser.parse_args(argv)
    if args.prepare_data:
        from .runs import RunConfig, load_data

        for cfg in (RunConfig.from_params(quick=args.quick), RunConfig.from_params(quick=args.quick, dataset="mnist")):
            train, test, classes = load_data(cfg)
            print(f"{cfg.dataset}: {len(train)} train / {len(test)} test images, {len(classes)} classes")
        return 0
    t0 = time.perf_counter()
    result = build_report(quick=args.quick, out_dir=args.out, notebooks=args.notebooks)
    print(f"report written in {time.perf_counter() - t0:.0f} s: {result['index']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
