"""The notebooks' parameters: one source, checked before any work.

Every notebook takes the run's settings — the fields of :class:`vxnb.studies.runs.RunConfig`
and ``quick`` — through one helper, ``cfg = runs.RunConfig.from_namespace(globals())``; its
``parameters`` cell holds only its own parameters, declared here in
:data:`NOTEBOOK_PARAMETERS` with their defaults and checks (``tests/test_params.py`` checks
each cell against this). :func:`check_parameters` refuses, before any notebook starts, an
unknown name (naming the nearest valid one: ``mask_dir`` → ``mask_root``), a bad value, and a
name that is both a run setting and a notebook's parameter.
"""
from __future__ import annotations

import ast
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .runs import RunConfig

__all__ = ["NotebookParameter", "NOTEBOOK_PARAMETERS", "RUN_PARAMETERS", "notebook_parameters", "parameters_for",
           "parameters_cell", "check_parameters"]


@dataclass(frozen=True)
class NotebookParameter:
    """A notebook's own parameter: its default (as the ``parameters`` cell writes it), what a
    valid value is (``expected``, for messages; a callable is asked only then) and the check
    (True: valid)."""

    default: Any
    expected: str | Callable[[], str]
    check: Callable[[Any], bool]

    def describe(self) -> str:
        return self.expected() if callable(self.expected) else self.expected


# The names below come from modules that take a while to import (the an8Flower renderer, the
# explanations): they are imported when a value is checked, not when the names are, so an
# unknown name is refused in about the time ``import vxnb.report`` takes.
def _variants() -> tuple[str, ...]:
    from vxnb.data.an8flower import VARIANTS

    return VARIANTS


def _fold_splits() -> tuple[str, ...]:
    from vxnb.data.an8flower import FOLD_SPLITS

    return FOLD_SPLITS


def _n_folds() -> int:
    from vxnb.data.an8flower import N_FOLDS

    return N_FOLDS


def _combines() -> tuple[str, ...]:
    from vxnb.explanations import COMBINES

    return COMBINES


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(v: Any) -> bool:
    return _int(v) and v >= 1


def _or_none(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _names(known: Callable[[], Iterable[str]]) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        names = tuple(known())
        return (isinstance(v, str) and v in names) or (
            isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, str) and x in names for x in v))
    return check


def _folds(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_int(f) and 0 <= f < _n_folds() for f in v)


def _diagnose(v: Any) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 2 and v[0] in _variants() and _int(v[1])
            and 0 <= v[1] < _n_folds())


def _mus(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_number(m) and m > 0 for m in v)


_MU = NotebookParameter(10.0, "a positive number (the paper: 10)", lambda v: _number(v) and v > 0)
_K = NotebookParameter(5, "a positive int", _positive_int)
_ALSO_MNIST = NotebookParameter(True, "True or False", lambda v: isinstance(v, bool))
_POSITIVE_OR_NONE = "a positive int or None"

#: Each notebook's own parameters (by the notebook's file stem), in the order of its cell.
NOTEBOOK_PARAMETERS: dict[str, dict[str, NotebookParameter]] = {
    "01_features": {},
    "02_relevant_features": {
        "mu": _MU,
        "n_random": NotebookParameter(5, "a positive int", _positive_int),
        "also_mnist": _ALSO_MNIST,
    },
    "03_interpretation": {
        "mu": _MU,
        "top_n": NotebookParameter(100, "a positive int", _positive_int),
        "crop_size": NotebookParameter(64, "a positive int", _positive_int),
    },
    "04_explanation": {
        "mu": _MU,
        "k": _K,
        "n_per_class": NotebookParameter(None, _POSITIVE_OR_NONE, _or_none(_positive_int)),
    },
    "05_an8flower_benchmark": {
        "variants": NotebookParameter(None, lambda: f"None or a list of {', '.join(_variants())}",
                                      _or_none(_names(_variants))),
        "single_folds": NotebookParameter(None, lambda: f"None or a list of folds in 0..{_n_folds() - 1}",
                                          _or_none(_folds)),
        "other_folds": NotebookParameter(None, lambda: f"None or a list of folds in 0..{_n_folds() - 1}",
                                         _or_none(_folds)),
        "mu": _MU,
        "k": _K,
        "n_test_images": NotebookParameter(None, _POSITIVE_OR_NONE, _or_none(_positive_int)),
        "occlusion_images": NotebookParameter(None, _POSITIVE_OR_NONE, _or_none(_positive_int)),
        "splits": NotebookParameter(None, lambda: f"None, {', '.join(map(repr, _fold_splits()))} or a list of them",
                                    _or_none(_names(_fold_splits))),
        "combine": NotebookParameter(None, lambda: f"None, {', '.join(map(repr, _combines()))} or a list of them",
                                     _or_none(_names(_combines))),
        "diagnose": NotebookParameter(None, "None or [variant, fold]", _or_none(_diagnose)),
        "diagnose_mus": NotebookParameter(None, "None or a list of positive numbers", _or_none(_mus)),
        "counterfactual_folds": NotebookParameter(None, lambda: f"None or a list of folds in 0..{_n_folds() - 1}",
                                                  _or_none(_folds)),
        "shortcut_rate": NotebookParameter(1.0, "a distractor rate in (0, 1]",
                                           lambda v: _number(v) and 0 < v <= 1),
        "leaderboard_images": NotebookParameter(None, _POSITIVE_OR_NONE, _or_none(_positive_int)),
        "modern_epochs": NotebookParameter(None, _POSITIVE_OR_NONE, _or_none(_positive_int)),
        "extended_studies": NotebookParameter(False, "True or False", lambda v: isinstance(v, bool)),
    },
    "06_sanity_check": {
        "mu": _MU,
        "k": _K,
        "n_images": NotebookParameter(None, _POSITIVE_OR_NONE, _or_none(_positive_int)),
        "also_mnist": _ALSO_MNIST,
    },
}

#: The run's settings every notebook takes (through ``RunConfig.from_namespace``).
RUN_PARAMETERS: tuple[str, ...] = tuple(RunConfig.__dataclass_fields__)

#: Names notebooks used to take, and what they are called now.
_RENAMED = {"folds": ("single_folds", "notebook 05's list of single-6c folds")}


def parameters_cell(path: str | Path) -> dict[str, Any]:
    """The names and literal values assigned in a notebook's ``parameters`` cell."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    cells = [c for c in nb.get("cells", []) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"path: {path} has {len(cells)} cells tagged 'parameters', expected 1")
    tree = ast.parse("".join(cells[0]["source"]))
    out: dict[str, Any] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"path: the parameters cell of {path} holds more than 'name = literal' lines")
        out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def notebook_parameters(path: str | Path) -> dict[str, NotebookParameter | None]:
    """A notebook's own parameters: the declared ones for a shipped notebook, else the names
    assigned in its ``parameters`` cell, if any (None: no check of their values; a run setting
    assigned there is the run's)."""
    stem = Path(path).stem
    if stem in NOTEBOOK_PARAMETERS:
        return dict(NOTEBOOK_PARAMETERS[stem])
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    names: list[str] = []
    for cell in nb.get("cells", []):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            try:
                tree = ast.parse("".join(cell["source"]))
            except SyntaxError:
                continue
            names += [t.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
                      for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                      if isinstance(t, ast.Name)]
    return {name: None for name in names if name not in RUN_PARAMETERS and name != "quick"}


def parameters_for(path: str | Path, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The report's ``parameters`` a notebook is given: the run's settings (and ``quick``), which
    every notebook reads, and the notebook's own (:func:`notebook_parameters`); another notebook's
    parameter is left out, so papermill does not inject (and warn about) a name the notebook does
    not declare."""
    own = notebook_parameters(path)
    return {k: v for k, v in parameters.items() if k in RUN_PARAMETERS or k == "quick" or k in own}


def check_parameters(parameters: Mapping[str, Any], notebooks: Iterable[str | Path] | None = None, *,
                     quick: bool = False) -> RunConfig:
    """Refuse bad parameters before any work; returns the run's :class:`RunConfig`.

    ``notebooks``: the notebooks that will run (default: the shipped ones). Raises a ValueError
    naming the parameter for an unknown name (with the nearest valid name), a bad value (what
    is expected), and a name that is both a run setting and a notebook's own parameter.
    """
    if not isinstance(parameters, Mapping) or not all(isinstance(k, str) for k in parameters):
        raise TypeError(f"parameters: expected a mapping of parameter names to values, got {type(parameters).__name__}")
    own: dict[str, list[tuple[str, NotebookParameter | None]]] = {}
    for nb in (NOTEBOOK_PARAMETERS if notebooks is None else notebooks):
        for name, p in notebook_parameters(nb).items():
            own.setdefault(name, []).append((Path(nb).stem, p))
    run = set(RUN_PARAMETERS) | {"quick"}
    clash = sorted(run & set(own))
    if clash:
        raise ValueError(f"{clash[0]}: is both a run setting (RunConfig.{clash[0]}) and a parameter of notebook "
                         f"{own[clash[0]][0][0]}; rename the notebook's parameter")
    known = sorted(run | set(own))
    for name, value in parameters.items():
        if name not in run and name not in own:
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"{name}: not a parameter of the run or of any notebook{hint} "
                             f"(known: {', '.join(known)})")
        for stem, p in own.get(name, ()):
            if p is not None and not p.check(value):
                raise ValueError(f"{name}: expected {p.describe()} (notebook {stem}), got {value!r}")
    if "quick" in parameters and not isinstance(parameters["quick"], bool):
        raise ValueError(f"quick: expected True or False, got {parameters['quick']!r}")
    settings = {k: v for k, v in parameters.items() if k in RUN_PARAMETERS and k != "quick"}
    try:
        return RunConfig.from_params(quick=bool(parameters.get("quick", quick)), **settings)
    except (ValueError, TypeError, FileNotFoundError) as err:
        name = str(err).split(":", 1)[0]
        if name in _RENAMED and name in settings:
            new, what = _RENAMED[name]
            raise type(err)(f"{err} ({what} is called {new!r})") from None
        raise
