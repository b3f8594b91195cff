"""Shared argument checks: one home for the checks that several modules make at their boundary.

Each raises a ``TypeError``/``ValueError`` naming the argument, what was expected and what came,
and returns the checked value in a normal form.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .utils import describe

__all__ = ["check_model", "check_positive_int", "check_nonnegative_int", "check_class", "check_choice"]


def check_model(model: Any, arg: str = "model") -> nn.Module:
    """``model`` must be a ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{arg}: expected a torch.nn.Module, got {describe(model)}")
    return model


def check_positive_int(value: Any, arg: str, what: str = "") -> int:
    """``value`` must be an int ≥ 1 (not a bool); ``what`` says what it counts, for the message."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{arg}: expected a positive int{f' ({what})' if what else ''}, got {value!r}")
    return int(value)


def check_nonnegative_int(value: Any, arg: str, what: str = "") -> int:
    """``value`` must be an int ≥ 0 (not a bool), e.g. a seed; ``what`` as in :func:`check_positive_int`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{arg}: expected a non-negative int{f' ({what})' if what else ''}, got {value!r}")
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
