import json

import pytest

from vxnb.params import collect_params, parse_value, read_params


@pytest.mark.parametrize("text, value", [("3", 3), ("-2", -2), ("0.5", 0.5), ("True", True), ("false", False),
                                         ("None", None), ("resnet50", "resnet50"), ('["a", "b"]', ["a", "b"]),
                                         ("layer4.*", "layer4.*")])
def test_parse_value(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_file_then_pairs(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("dataset: folder\nimage_size: 224\nlayers: [layer3, layer4]\n")
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"dataset": "mnist", "epochs": 2}))
    assert read_params(yml) == {"dataset": "folder", "image_size": 224, "layers": ["layer3", "layer4"]}
    assert read_params(js) == {"dataset": "mnist", "epochs": 2}
    got = collect_params(yml, [("image_size", "112"), ("quick", "true")])
    assert got == {"dataset": "folder", "image_size": 112, "layers": ["layer3", "layer4"], "quick": True}


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="params: no such file"):
        read_params(tmp_path / "missing.yaml")
    bad = tmp_path / "x.txt"
    bad.write_text("a: 1")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
        read_params(bad)
    lst = tmp_path / "l.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        read_params(lst)
    broken = tmp_path / "b.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_params(broken)
    with pytest.raises(ValueError, match="-p: expected a name and a value"):
        collect_params(None, [("only",)])


# ---------------------------------------------------------------- the notebooks' parameters
from pathlib import Path  # noqa: E402

from vxnb import report  # noqa: E402
from vxnb.studies import parameters as P  # noqa: E402
from vxnb.studies.runs import RunConfig  # noqa: E402

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("0*.ipynb"))


def test_every_shipped_notebook_is_declared():
    assert [p.stem for p in NOTEBOOKS] == list(P.NOTEBOOK_PARAMETERS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_holds_exactly_the_declared_parameters(path):
    """The cell holds the notebook's own parameters, in the declared order, with the declared
    defaults; the run's settings (RunConfig's fields, quick) are not repeated there."""
    cell = P.parameters_cell(path)
    declared = P.NOTEBOOK_PARAMETERS[path.stem]
    assert list(cell) == list(declared)
    assert cell == {name: p.default for name, p in declared.items()}
    assert not set(cell) & (set(RunConfig.__dataclass_fields__) | {"quick"})
    for name, p in declared.items():  # every default passes its own check
        assert p.check(p.default), name


def test_declared_parameters_never_reuse_a_run_setting():
    run = set(RunConfig.__dataclass_fields__) | {"quick"}
    assert all(not set(d) & run for d in P.NOTEBOOK_PARAMETERS.values())
    assert "folds" in run and "single_folds" in P.NOTEBOOK_PARAMETERS["05_an8flower_benchmark"]


def test_good_parameters_give_the_run_config():
    cfg = P.check_parameters({"variant": "part-2c", "mu": 5, "single_folds": [0, 1], "splits": "blocks",
                              "diagnose": ["part-2c", 3], "quick": True})
    assert cfg.variant == "part-2c" and cfg.quick and cfg.size == 64


@pytest.mark.parametrize("params, exc, pattern", [
    ({"mask_dir": "x"}, ValueError, r"mask_dir: not a parameter .* did you mean 'mask_root'\?"),
    ({"n_test_image": 3}, ValueError, r"did you mean 'n_test_images'\?"),
    ({"mu": -1}, ValueError, r"mu: expected a positive number .* got -1"),
    ({"k": "five"}, ValueError, r"k: expected a positive int .* got 'five'"),
    ({"single_folds": [0, 7]}, ValueError, r"single_folds: expected None or a list of folds in 0\.\.4"),
    ({"combine": "mean"}, ValueError, r"combine: expected None, 'weighted', 'max'"),
    ({"variant": "single-7c"}, ValueError, r"variant: expected one of"),
    ({"folds": [0, 1]}, ValueError, r"folds: expected one of 'views', 'blocks'.*called 'single_folds'"),
    ({"quick": "yes"}, ValueError, r"quick: expected True or False"),
    ({"shortcut_rate": 0}, ValueError, r"shortcut_rate: expected a distractor rate in \(0, 1\]"),
    ({"distractor_rate": 2.0}, ValueError, r"distractor_rate: expected a number in \[0, 1\]"),
    ({"dataset": "mnist", "clutter": 3}, ValueError, r"clutter: a renderer knob of an8Flower"),
])
def test_bad_parameters_are_refused_naming_them(params, exc, pattern):
    with pytest.raises(exc, match=pattern):
        P.check_parameters(params)


def test_a_collision_between_a_notebook_and_the_run_is_refused(monkeypatch):
    monkeypatch.setitem(P.NOTEBOOK_PARAMETERS, "07_extra", {"size": P.NotebookParameter(1, "an int", bool)})
    with pytest.raises(ValueError, match=r"size: is both a run setting \(RunConfig\.size\) and a parameter of "
                                         r"notebook 07_extra"):
        P.check_parameters({})


def test_a_notebook_of_your_own_brings_its_parameters(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("threshold = 0.5\nquick = False", metadata={"tags": ["parameters"]})]
    nbformat.write(nb, str(tmp_path / "01_mine.ipynb"))
    assert P.check_parameters({"threshold": 0.9}, [tmp_path / "01_mine.ipynb"]).dataset == "an8flower"
    with pytest.raises(ValueError, match="mu: not a parameter"):  # notebook 02's, not this one's
        P.check_parameters({"mu": 3}, [tmp_path / "01_mine.ipynb"])


def test_report_refuses_a_misspelt_parameter_before_any_work(tmp_path, monkeypatch, capsys):
    """``-p mask_dir x``: refused naming mask_root, nothing prepared, no notebook started."""
    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(report, "run_notebook", no_work)
    monkeypatch.setattr(report, "prepare_static", no_work)
    out = tmp_path / "rep"
    assert report.main(["--quick", "-p", "mask_dir", "x", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mask_dir" in err and "'mask_root'" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="mask_dir"):  # the Python entry point refuses it too
        report.build_report(quick=True, out_dir=out, parameters={"mask_dir": "x"})
    assert not out.exists()


def test_papermill_is_quiet_about_run_settings_only(caplog):
    import logging

    report._quiet_run_settings()
    log = logging.getLogger("papermill")
    with caplog.at_level(logging.WARNING, logger="papermill"):
        log.warning("Passed unknown parameter: dataset")
        log.warning("Passed unknown parameter: zzz")
    assert [r.getMessage() for r in caplog.records] == ["Passed unknown parameter: zzz"]


def test_each_notebook_is_given_the_run_settings_and_its_own_parameters_only(tmp_path, monkeypatch):
    """``-p extended_studies True -p n_images 5``: notebook 05 gets extended_studies, notebook 06
    n_images, neither gets the other's, both get the run's settings and ``quick`` (papermill
    warns about every injected name a notebook does not declare)."""
    from vxnb.studies.parameters import NOTEBOOK_PARAMETERS, parameters_for

    params = {"quick": True, "seed": 3, "extended_studies": True, "n_images": 5, "mu": 4.0}
    nb = report.find_notebooks(None)
    by_stem = {p.stem: p for p in nb}
    assert parameters_for(by_stem["05_an8flower_benchmark"], params) == {
        "quick": True, "seed": 3, "extended_studies": True, "mu": 4.0}
    assert parameters_for(by_stem["06_sanity_check"], params) == {"quick": True, "seed": 3, "n_images": 5, "mu": 4.0}
    user = tmp_path / "mine.ipynb"  # a user's notebook: its parameters cell's names are its own
    user.write_text(json.dumps({"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]},
                                           "source": ["n_images = 2\n"], "outputs": [], "execution_count": None}],
                                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert parameters_for(user, params) == {"quick": True, "seed": 3, "n_images": 5}

    given = {}

    def fake_run(path, out_dir, parameters, **kwargs):
        given[path.stem] = dict(parameters)
        raise RuntimeError("stop here")
    monkeypatch.setattr(report, "run_notebook", fake_run)
    monkeypatch.setattr(report, "prepare_static", lambda out: "static")
    report.build_report(quick=True, out_dir=tmp_path / "rep", parameters={"extended_studies": True, "n_images": 5},
                        stop_on_error=False, raise_on_error=False)
    assert set(given) == set(NOTEBOOK_PARAMETERS)
    for stem, p in given.items():
        assert ("extended_studies" in p) == (stem == "05_an8flower_benchmark")
        assert ("n_images" in p) == (stem == "06_sanity_check")
        assert p["quick"] is True
