"""Datasets: an8Flower (rendered here), real MNIST digits, and user image folders.

Every dataset follows torchvision's habits: ``classes``, ``__len__``, ``__getitem__`` giving
``(image, label)`` or, where ground truth exists, ``(image, label, mask)``.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset, Subset

__all__ = ["dataset_labels", "dataset_classes", "class_examples"]


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """The label of every item, read from the dataset's metadata when it has some (no image loads)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    for attr in ("targets", "labels"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return np.asarray(value, dtype=np.int64)
    index = getattr(dataset, "index", None)
    if index is not None and "label" in getattr(index, "columns", ()):
        return index["label"].to_numpy(dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def dataset_classes(dataset: Dataset) -> list[str]:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise ValueError(f"dataset: {type(dataset).__name__} has no 'classes' attribute")
    return list(classes)


def class_examples(dataset: Dataset, per_class: int = 1, seed: int = 0) -> list[tuple]:
    """``per_class`` items of every class (seeded choice), ordered by class."""
    if per_class < 1:
        raise ValueError(f"per_class: expected >= 1, got {per_class}")
    labels = dataset_labels(dataset)
    rng = np.random.default_rng(seed)
    items = []
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        for i in rng.choice(where, size=min(per_class, len(where)), replace=False):
            items.append(dataset[int(i)])
    return items
