"""Compare the result tables (``runs/*/*.csv``) of two report runs: are the numbers unchanged?

    python tests/compare_tables.py BEFORE AFTER [--rtol 0] [--ignore-columns seconds]

BEFORE and AFTER are folders that hold ``runs/`` (the ``runs_root`` of a report run) or are
the ``runs`` folders themselves. Every CSV present in either is compared: the same files, the
same columns, the same rows; numbers equal (``--rtol 0``, the default: bit for bit, NaN equal
to NaN) or within the relative tolerance; text equal. Columns that measure wall time
(``--ignore-columns``, default ``seconds``) are left out. Prints one line per difference and
exits 1 if there is any, 0 if every table is identical.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def _runs_dir(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder: expected a report run folder (holding runs/) or a runs folder, got {str(folder)!r}")
    return folder / "runs" if (folder / "runs").is_dir() else folder


def tables(folder: Path) -> dict[str, Path]:
    """``{'<run>/<table>.csv': path}`` for every ``runs/*/*.csv`` below ``folder``."""
    runs = _runs_dir(folder)
    return {p.relative_to(runs).as_posix(): p for p in sorted(runs.glob("*/*.csv"))}


def compare_frames(a: pd.DataFrame, b: pd.DataFrame, rtol: float = 0.0,
                   ignore: tuple[str, ...] = ("seconds",)) -> list[str]:
    """The differences between two tables, as sentences (empty: equal)."""
    if list(a.columns) != list(b.columns):
        return [f"columns differ: {list(a.columns)} vs {list(b.columns)}"]
    if a.shape != b.shape:
        return [f"shape differs: {a.shape} vs {b.shape}"]
    out = []
    for col in a.columns:
        if col in ignore:
            continue
        x, y = a[col], b[col]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            xv, yv = x.to_numpy(np.float64), y.to_numpy(np.float64)
            same = (np.isclose(xv, yv, rtol=rtol, atol=0.0, equal_nan=True) if rtol > 0
                    else (xv == yv) | (np.isnan(xv) & np.isnan(yv)))
        else:
            # an empty cell is NaN on both sides (pandas 3 keeps it missing through astype(str))
            same = ((x.astype(str) == y.astype(str)).fillna(False) | (x.isna() & y.isna())).to_numpy(bool)
        if not same.all():
            i = int(np.flatnonzero(~same)[0])
            out.append(f"column {col!r}: {int((~same).sum())} of {len(same)} rows differ "
                       f"(first: row {i}, {x.iloc[i]} vs {y.iloc[i]})")
    return out


def compare(before: Path, after: Path, rtol: float = 0.0, ignore: tuple[str, ...] = ("seconds",)) -> list[str]:
    """Every difference between the tables of two report runs (empty: all identical)."""
    ta, tb = tables(before), tables(after)
    diffs = [f"{name}: only in {before}" for name in sorted(set(ta) - set(tb))]
    diffs += [f"{name}: only in {after}" for name in sorted(set(tb) - set(ta))]
    for name in sorted(set(ta) & set(tb)):
        diffs += [f"{name}: {d}" for d in compare_frames(pd.read_csv(ta[name]), pd.read_csv(tb[name]), rtol, ignore)]
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance for numbers (default 0: equal)")
    parser.add_argument("--ignore-columns", nargs="*", default=["seconds"], help="columns not compared")
    args = parser.parse_args(argv)
    diffs = compare(args.before, args.after, args.rtol, tuple(args.ignore_columns))
    n = len(tables(args.before))
    for d in diffs:
        print(d)
    print(f"{n} tables in {args.before}, {len(tables(args.after))} in {args.after}: "
          + ("identical" if not diffs else f"{len(diffs)} difference(s)"))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
