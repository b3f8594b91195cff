"""Shared argument checks: one home for the checks that several modules make at their boundary.

Each raises a ``TypeError``/``ValueError`` naming the argument, what was expected and what came,
and returns the checked value in a normal form.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .utils import describe

__all__ = ["check_model", "check_positive_int", "check_nonnegative_int", "check_int", "check_class", "check_choice",
           "check_bool", "check_flag_or_auto", "check_path", "check_positive_number", "check_fraction",
           "check_unique_items"]


def check_model(model: Any, arg: str = "model") -> nn.Module:
    """``model`` must be a ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{arg}: expected a torch.nn.Module, got {describe(model)}")
    return model


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_positive_int(value: Any, arg: str, what: str = "", *, allow_none: bool = False) -> int | None:
    """``value`` must be an int ≥ 1 (not a bool), or None with ``allow_none``; ``what`` says what
    it counts, for the message."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(f"{arg}: expected a positive int{' or None' if allow_none else ''}"
                         f"{f' ({what})' if what else ''}, got {value!r}")
    return int(value)


def check_nonnegative_int(value: Any, arg: str, what: str = "") -> int:
    """``value`` must be an int ≥ 0 (not a bool), e.g. a seed; ``what`` as in :func:`check_positive_int`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{arg}: expected a non-negative int{f' ({what})' if what else ''}, got {value!r}")
    return int(value)


def check_int(value: Any, arg: str, low: int | None = None, high: int | None = None, what: str = "") -> int:
    """``value`` must be an int (not a bool or a float: TypeError) within [low, high] (ValueError);
    ``what`` is added to the message (e.g. ``"or None (all images)"``)."""
    want = "an int" + (f" in {low}..{high}" if low is not None and high is not None else
                       f" ≥ {low}" if low is not None else f" ≤ {high}" if high is not None else "")
    want += f" {what}" if what else ""
    if not _is_int(value):
        raise TypeError(f"{arg}: expected {want}, got {describe(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{arg}: expected {want}, got {value!r}")
    return int(value)


def check_class(j: Any, C: int, arg: str) -> int:
    """``j`` must be a class index in 0..C-1 (an int or a one-element integer tensor)."""
    if isinstance(j, torch.Tensor) and j.numel() == 1 and not j.is_floating_point():
        j = int(j.item())
    if isinstance(j, (bool, np.bool_)) or not isinstance(j, (int, np.integer)):
        raise TypeError(f"{arg}: expected a class index (int), got {describe(j)}")
    if not 0 <= int(j) < C:
        raise ValueError(f"{arg}: class {int(j)} is out of range for {C} classes (valid: 0..{C - 1})")
    return int(j)


def check_choice(value: Any, arg: str, choices: tuple[str, ...]) -> str:
    """``value`` must be one of the strings ``choices`` (the message lists them)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{arg}: expected one of {', '.join(map(repr, choices))}, got {describe(value)}")
    return value


def check_bool(value: Any, arg: str) -> bool:
    """``value`` must be a bool (``numpy.bool_`` too; not 0/1)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{arg}: expected a bool, got {describe(value)}")
    return bool(value)


def check_flag_or_auto(value: Any, arg: str) -> bool | str:
    """``value`` must be True, False or ``"auto"``."""
    if not (value is True or value is False or (isinstance(value, str) and value == "auto")):
        raise ValueError(f"{arg}: expected True, False or 'auto', got {value!r}")
    return value


def check_path(value: Any, arg: str, *, allow_none: bool = False) -> Path | None:
    """``value`` must be a folder path (a str or an ``os.PathLike``), or None with ``allow_none``;
    returned as a ``Path`` (not resolved, not required to exist)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{arg}: expected a folder path{' or None' if allow_none else ''} (str or os.PathLike), "
                        f"got {describe(value)}")
    return Path(value)


def check_positive_number(value: Any, arg: str, what: str = "") -> float:
    """``value`` must be a finite real number > 0 (not a bool); ``what`` as in :func:`check_positive_int`."""
    want = f"a positive number{f' ({what})' if what else ''}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{arg}: expected {want}, got {describe(value)}")
    if not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{arg}: expected {want}, got {value!r}")
    return float(value)


def check_fraction(value: Any, arg: str) -> float:
    """``value`` must be a real number strictly between 0 and 1 (not a bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0 < value < 1:
        raise ValueError(f"{arg}: expected a number in (0, 1), got {value!r}")
    return float(value)


def check_unique_items(values: Any, arg: str, check_one: Callable[[Any, str], Any], *, is_one: Callable[[Any], bool],
                       what: str, known: str, noun: str) -> tuple:
    """One item (``is_one(values)``) or a non-empty sequence of unique items, each checked by
    ``check_one(item, arg)`` (its results returned, as a tuple). The messages name ``arg``: ``what``
    the sequence expected, ``known`` the valid items, ``noun`` what the items are."""
    if is_one(values):
        values = (values,)
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{arg}: expected {what} ({known}), got {describe(values)}") from None
    if not values:
        raise ValueError(f"{arg}: expected at least one of {known}, got an empty sequence")
    out = tuple(check_one(v, arg) for v in values)
    if len(set(out)) != len(out):
        raise ValueError(f"{arg}: {noun} must be unique, got {list(out)}")
    return out
