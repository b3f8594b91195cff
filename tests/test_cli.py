"""The ``vxnb`` command: dispatch, help, unknown commands and clear errors."""
import subprocess
import sys
import types

import pytest

from vxnb import cli, paths, report


def test_no_command_or_help_prints_the_commands(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert all(f"  {name} " in err for name in ("report", "extract", "data", "gc")) and "VXNB_HOME" in err
    assert cli.main(["--help"]) == 0
    assert "usage: vxnb COMMAND" in capsys.readouterr().out


def test_unknown_command_lists_the_commands(capsys):
    assert cli.main(["reprot", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'reprot'; the commands are: report, extract, data, bench, gc" in err


def test_report_forwards_its_arguments(monkeypatch):
    seen = []
    monkeypatch.setattr(report, "main", lambda argv, prog: seen.append((argv, prog)) or 0)
    assert cli.main(["report", "--quick", "--out", "x", "-p", "size", "96"]) == 0
    assert seen == [(["--quick", "--out", "x", "-p", "size", "96"], "vxnb report")]


def test_report_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vxnb report") and "--quick" in out and "--out" in out and "VXNB_HOME" in out


def test_data_prepares_through_the_report(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(report, "main", lambda argv, prog: seen.append((argv, prog)) or 0)
    assert cli.main(["data", "--quick"]) == 0
    assert cli.main(["data", "-p", "variant", "part-2c"]) == 0
    assert seen == [(["--prepare-data", "--quick"], "vxnb data"),
                    (["--prepare-data", "-p", "variant", "part-2c"], "vxnb data")]
    with pytest.raises(SystemExit):
        cli.main(["data", "--help"])
    assert "usage: vxnb data" in capsys.readouterr().out


def test_extract_and_gc_forward_when_present_and_say_so_when_not(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("vxnb.extract")
    fake.main = lambda argv: calls.append(("extract", argv)) or 0
    monkeypatch.setitem(sys.modules, "vxnb.extract", fake)
    store = types.ModuleType("vxnb.studies.gc")
    store.main = lambda argv: calls.append(("gc", argv)) or 0
    monkeypatch.setitem(sys.modules, "vxnb.studies.gc", store)
    assert cli.main(["extract", "--dataset", "mnist"]) == 0
    assert cli.main(["gc", "--dry-run"]) == 0
    assert calls == [("extract", ["--dataset", "mnist"]), ("gc", ["--dry-run"])]

    # a version without them: a clear message, nothing run
    for name in ("vxnb.extract", "vxnb.studies.gc"):
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(["extract"]) == 2
    assert "no vxnb.extract yet" in capsys.readouterr().err
    assert cli.main(["gc"]) == 2
    assert "no artifact store clean-up" in capsys.readouterr().err


def test_bad_working_folder_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    f = tmp_path / "a-file"
    f.write_text("x")
    monkeypatch.setenv(paths.HOME_ENV, str(f))
    assert cli.main(["report", "--quick"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vxnb report: error: VXNB_HOME: expected a folder") and str(f) in err
    assert f.read_text() == "x"


def test_python_dash_m_vxnb_is_the_command():
    done = subprocess.run([sys.executable, "-m", "vxnb", "nope"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "the commands are: report, extract, data, bench, gc" in done.stderr


def test_a_broken_dependency_is_not_taken_for_a_missing_command(monkeypatch):
    def broken(name):
        raise ModuleNotFoundError("No module named 'torch_dist_x'", name="torch_dist_x")

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="torch_dist_x"):
        cli.main(["extract"])


def explain_for_bench(model, inputs, targets):
    return inputs.mean(axis=1)


def test_bench_scores_the_named_method(monkeypatch, capsys):
    import pandas as pd

    from vxnb.studies import benchmark

    seen = {}

    def fake(func, **kw):
        seen.update(kw, func=func)
        t = pd.DataFrame([{c: 0 for c in benchmark.SCORE_COLUMNS}]).assign(method=kw["name"], n_failed=1,
                                                                            errors="image 3: boom")
        t.attrs["file"] = "scores.csv"
        return t

    monkeypatch.setattr(benchmark, "score_callable", fake)
    assert cli.main(["bench", "--method", "tests.test_cli:explain_for_bench", "--quick"]) == 0
    assert seen["func"].__name__ == "explain_for_bench" and seen["name"] == "explain_for_bench"
    assert seen["folds"] == (0,) and seen["n_images"] == 100 and seen["config"].quick and seen["split"] == "blocks"
    out = capsys.readouterr()
    assert "explain_for_bench" in out.out and "table: scores.csv" in out.out and "image 3: boom" in out.err
    assert cli.main(["bench", "--method", "tests.test_cli:explain_for_bench", "--folds", "1,3", "--name", "b"]) == 0
    assert seen["folds"] == (1, 3) and seen["n_images"] is None and not seen["config"].quick and seen["name"] == "b"


def test_bench_refuses_a_bad_method_spec(capsys):
    assert cli.main(["bench", "--method", "no_colon"]) == 1
    assert "--method: expected 'package.module:name', got str 'no_colon'" in capsys.readouterr().err
    assert cli.main(["bench", "--method", "tests.test_cli:nothing_here"]) == 1
    assert "has no attribute 'nothing_here'" in capsys.readouterr().err
    assert cli.main(["bench", "--method", "tests.test_cli:pytest"]) == 1  # a module, not a method
    assert "explain_func of method 'pytest'" in capsys.readouterr().err
