"""Run parameters from the command line and from files, shared by every entry point.

The report (``python -m vxnb.report``), extraction (``torchrun -m vxnb.extract``) and the
``vxnb`` command take the same parameters as the notebooks' ``parameters`` cells:
``-p name value`` pairs (values parsed as papermill does: int, float, bool, None, else text)
and ``--params FILE`` with a whole set as YAML or JSON. Pairs given with ``-p`` win over the
file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

__all__ = ["parse_value", "read_params", "collect_params"]

_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_value(text: str) -> Any:
    """``"3"`` → 3, ``"0.5"`` → 0.5, ``"True"``/``"false"`` → bool, ``"None"`` → None,
    a JSON list or mapping → that object, anything else → the text itself."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    word = text.strip().lower()
    if word in _WORDS:
        return _WORDS[word]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.strip()[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def read_params(path: str | Path) -> dict[str, Any]:
    """A parameter file (``.yaml``, ``.yml`` or ``.json``) → a dict of name → value."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"params: no such file {str(p)!r}")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"params: {str(p)!r} is not valid YAML ({err})") from None
    elif p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"params: {str(p)!r} is not valid JSON ({err})") from None
    else:
        raise ValueError(f"params: expected a .yaml, .yml or .json file, got {str(p)!r}")
    if data is None:
        data = {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"params: {str(p)!r} must hold a mapping of parameter names to values, "
                         f"got {type(data).__name__}")
    return data


def collect_params(params_file: str | Path | None = None,
                   pairs: Iterable[Iterable[str]] | None = None) -> dict[str, Any]:
    """The parameters of one invocation: the file's, then the ``-p name value`` pairs on top."""
    out = read_params(params_file) if params_file else {}
    for pair in pairs or ():
        pair = list(pair)
        if len(pair) != 2 or not pair[0]:
            raise ValueError(f"-p: expected a name and a value, got {pair!r}")
        out[pair[0]] = parse_value(pair[1])
    return out
