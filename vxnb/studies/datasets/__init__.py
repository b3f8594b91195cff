"""The datasets a run can use, one :class:`DatasetSpec` per dataset, torchvision-style: one file
per dataset (``an8flower.py``, ``mnist.py``, ``folder.py``) and one line per dataset in
:data:`DATASET_SPECS`.

A spec says everything the studies need to know about its dataset — how its parameters are
checked, its part of a run's name, how it is loaded and fingerprinted, whether it has masks,
which reference model is trained on it (or that the user's model is used), what the benchmark
can do with it — so no study branches on a dataset's name. To add a dataset: a file here with
a :class:`DatasetSpec` subclass, and its line in :data:`DATASET_SPECS` (or
:func:`register_dataset` from outside the package).
"""
from __future__ import annotations

from typing import Any

from .base import DatasetSpec, limit_split, stratified_subset
from .an8flower import An8FlowerSpec
from .folder import FolderSpec, user_model
from .mnist import MnistSpec

__all__ = ["DatasetSpec", "DATASET_SPECS", "dataset_spec", "register_dataset", "limit_split", "stratified_subset",
           "An8FlowerSpec", "MnistSpec", "FolderSpec", "user_model"]

#: Every dataset a run can use, by the name ``RunConfig.dataset`` takes (the first is the default).
DATASET_SPECS: dict[str, DatasetSpec] = {
    "an8flower": An8FlowerSpec(),
    "mnist": MnistSpec(),
    "folder": FolderSpec(),
}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset (a :class:`DatasetSpec` instance) under ``spec.name``; returns it."""
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"spec: expected a DatasetSpec instance, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not spec.name or spec.name in DATASET_SPECS:
        raise ValueError(f"spec: its name must be a new non-empty string (taken: {', '.join(DATASET_SPECS)}), "
                         f"got {spec.name!r}")
    DATASET_SPECS[spec.name] = spec
    return spec


def dataset_spec(name: Any, arg: str = "dataset") -> DatasetSpec:
    """The spec of dataset ``name``; a ValueError naming ``arg`` and the datasets there are."""
    if not isinstance(name, str) or name not in DATASET_SPECS:
        raise ValueError(f"{arg}: expected one of {tuple(DATASET_SPECS)}, got {name!r}")
    return DATASET_SPECS[name]
