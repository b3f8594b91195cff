"""tests/compare_tables.py: the check that a refactoring leaves the report's tables unchanged."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

_spec = importlib.util.spec_from_file_location("compare_tables", Path(__file__).with_name("compare_tables.py"))
CT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(CT)


def _write(root: Path, name: str, frame: pd.DataFrame) -> None:
    path = root / "runs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


@pytest.fixture
def pair(tmp_path):
    table = pd.DataFrame({"method": ["ours", "gradcam"], "auc": [41.25, np.nan], "seconds": [1.0, 2.0]})
    for side in ("before", "after"):
        _write(tmp_path / side, "run-a/table1.csv", table)
        _write(tmp_path / side, "run-b/curve.csv", pd.DataFrame({"t": [0.0, 0.5], "iou": [0.1, 0.2]}))
    return tmp_path / "before", tmp_path / "after", table


def test_identical_runs_have_no_differences_and_exit_zero(pair, capsys):
    before, after, _ = pair
    assert CT.compare(before, after) == []
    assert CT.main([str(before), str(after / "runs")]) == 0     # a runs folder works too
    assert "2 tables" in capsys.readouterr().out


def test_a_changed_number_a_missing_table_and_an_extra_column_are_reported(pair):
    before, after, table = pair
    _write(after, "run-a/table1.csv", table.assign(auc=[41.250001, np.nan]))
    (after / "runs" / "run-b" / "curve.csv").unlink()
    _write(after, "run-c/new.csv", pd.DataFrame({"x": [1]}))
    diffs = CT.compare(before, after)
    assert diffs == ["run-b/curve.csv: only in " + str(before), "run-c/new.csv: only in " + str(after),
                     "run-a/table1.csv: column 'auc': 1 of 2 rows differ (first: row 0, 41.25 vs 41.250001)"]
    assert CT.compare(before, after, rtol=1e-6)[2:] == []          # within the tolerance
    assert CT.main([str(before), str(after)]) == 1


def test_wall_time_columns_and_text_are_handled(pair):
    before, after, table = pair
    _write(after, "run-a/table1.csv", table.assign(seconds=[9.0, 9.0]))
    assert CT.compare(before, after) == []                          # seconds are ignored by default
    assert CT.compare(before, after, ignore=()) == ["run-a/table1.csv: column 'seconds': 2 of 2 rows differ "
                                                    "(first: row 0, 1.0 vs 9.0)"]
    blank = table.assign(combine=["weighted", np.nan])                # a text column with empty cells
    _write(before, "run-a/table1.csv", blank)
    _write(after, "run-a/table1.csv", blank)
    assert CT.compare(before, after) == []
    _write(after, "run-a/table1.csv", blank.assign(combine=["max", np.nan]))
    assert CT.compare(before, after) == ["run-a/table1.csv: column 'combine': 1 of 2 rows differ "
                                         "(first: row 0, weighted vs max)"]
    _write(before, "run-a/table1.csv", table)
    _write(after, "run-a/table1.csv", table.assign(method=["ours", "gradcam++"]))
    assert CT.compare(before, after) == ["run-a/table1.csv: column 'method': 1 of 2 rows differ "
                                         "(first: row 1, gradcam vs gradcam++)"]


def test_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="folder: expected a report run folder"):
        CT.compare(tmp_path / "nope", tmp_path)
