"""Page weight of a written report (issue 26: every page ≤ 8 MB): each page's size as written,
and as ``vxnb.report.share_plotly_bundle`` leaves it (plotly.js moved beside the pages, which
``python -m vxnb.report`` now does unless ``--self-contained``), without running anything.

    python benchmarks/bench_page_weight.py reports/          # a report written by an older vxnb
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from vxnb.report import share_plotly_bundle

GOAL_MB = 8.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", help="a report folder (its *.html pages are read, never changed)")
    args = parser.parse_args()
    pages = sorted(p for p in Path(args.reports).glob("*.html") if p.name != "index.html")
    if not pages:
        raise SystemExit(f"no pages in {args.reports}")
    print(f"{'page':<40} {'as written MB':>13} {'shared bundle MB':>16}   goal <= {GOAL_MB} MB")
    with tempfile.TemporaryDirectory() as tmp:
        for page in pages:
            body = page.read_text(encoding="utf-8")
            after = share_plotly_bundle(body, tmp)
            a, b = len(body.encode()) / 1e6, len(after.encode()) / 1e6
            print(f"{page.name:<40} {a:13.2f} {b:16.2f}   {'ok' if b <= GOAL_MB else 'OVER'}")
        bundles = list(Path(tmp, "_static").glob("plotly-*.js"))
        if bundles:
            print(f"shared once: {bundles[0].name}, {bundles[0].stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
