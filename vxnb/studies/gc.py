"""Garbage collection of the run folders: remove what no current key reaches.

The studies declare the artifact kinds they write, with their format versions, through
:func:`vxnb.studies.runs.register_artifact` when they are imported; this module imports every
study (it sits above them), so :func:`gc` sees all their kinds, and no study imports another
to learn its version.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import _store
from . import benchmark, modern, sanity_study  # noqa: F401  (importing a study registers its artifact kinds)
from .runs import RunConfig, artifact_versions, data_ok

__all__ = ["gc", "current_versions", "main"]

#: Files older versions wrote without a content key; gc removes them when no index entry has them.
_LEGACY = ("model.pt", "meta.json", "features-*.npz", "lasso-*.npz", "benchmark-*.json", "top_patches-*.csv")


def current_versions() -> dict[str, int]:
    """The current format version of every artifact kind the studies write."""
    return artifact_versions()


def gc(runs_root: str | Path | None = None, *, dry_run: bool = False,
       tmp_age: float = _store.TMP_MIN_AGE) -> dict[str, Any]:
    """Remove (``dry_run``: only list) the artifacts under ``runs_root`` that no current key
    reaches: made by an older format, from data (or a weights file) that has changed since
    (e.g. a new an8Flower render version) or from an upstream artifact that is itself gone;
    temporary files of killed writers older than ``tmp_age`` seconds (default an hour); unkeyed
    files of older vxnb versions. Each artifact is removed under its lock; one being written is
    left alone. Returns :func:`vxnb._store.gc`'s summary (with the reason for each path)."""
    root = Path(runs_root) if runs_root is not None else RunConfig().runs_dir
    if not root.is_dir():
        raise ValueError(f"runs_root: no folder at {root}")
    if isinstance(tmp_age, bool) or not isinstance(tmp_age, (int, float)) or tmp_age < 0:
        raise ValueError(f"tmp_age: expected a number of seconds >= 0, got {tmp_age!r}")
    return _store.gc(root, versions=current_versions(), data_ok=data_ok, legacy=_LEGACY, dry_run=dry_run,
                     tmp_age=tmp_age)


def main(argv: list[str] | None = None) -> int:
    """``python -m vxnb.studies.gc [--runs-root DIR] [--dry-run]`` (also ``vxnb gc``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="vxnb gc", description="List and remove the artifacts that no current key "
                                     "reaches.")
    parser.add_argument("--runs-root", default=None, help="the runs folder (default: the repository's runs/)")
    parser.add_argument("--dry-run", action="store_true", help="only list what would be removed, and why")
    parser.add_argument("--tmp-age", type=float, default=_store.TMP_MIN_AGE / 3600, metavar="HOURS",
                        help="remove temporary files of interrupted writers older than this (default 1 hour)")
    args = parser.parse_args(argv)
    try:
        res = gc(args.runs_root, dry_run=args.dry_run, tmp_age=args.tmp_age * 3600)
    except ValueError as err:
        parser.error(str(err))
    for path, size in res["removed"]:
        print(f"{'would remove' if args.dry_run else 'removed'} {path} ({_human(size)}): {res['reasons'][path]}")
    for path in res["busy"]:
        print(f"left {path}: its artifact is being written now (locked)")
    verb = "would free" if args.dry_run else "freed"
    print(f"{len(res['removed'])} path(s), {verb} {_human(res['freed'])}; {res['kept']} artifact(s) kept")
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


if __name__ == "__main__":
    import sys

    sys.exit(main())
