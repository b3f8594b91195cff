"""What a dataset spec is: :class:`DatasetSpec`, and the split helpers the specs share."""
from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset


class DatasetSpec:
    """One dataset a run can use. Subclass it in a file of ``vxnb.studies.datasets`` and add an
    instance to ``DATASET_SPECS``. Methods take the run's ``RunConfig`` (``cfg``).

    Class attributes:
        name: the value of ``RunConfig.dataset``.
        label: how a table names the dataset (:meth:`display_name`'s default).
        reference_model: the ``vxnb.models.build_model`` architecture trained on it, or None when
            the run uses the user's model (never trained here; :meth:`user_model`).
        benchmark: what the localisation benchmark does with it: ``"folds"`` (an8Flower's
            variants and folds), ``"split"`` (one train/validation split, needs masks) or None.
        paper_numbers: the paper's Table 1 numbers are this dataset's (cells tagged
            ``an8flower-only`` run only then).
        quick_resizes: the quick setting shrinks the images (not a user's model's input).
        prepare_with: other datasets the report prepares with this one (``--prepare-data``).
        has_knobs: the dataset is rendered with the renderer's difficulty knobs (``RunConfig``'s
            part_scale, distractor_rate, clutter); on the others they must keep their defaults.
    """

    name: str = ""
    label: str = ""
    reference_model: str | None = None
    benchmark: str | None = None
    paper_numbers: bool = False
    quick_resizes: bool = True
    has_knobs: bool = False
    prepare_with: tuple[str, ...] = ()
    #: The Markdown sentence of notebook 05 on this dataset's masks (None: the generic ones).
    masks_note: str | None = None

    # ----------------------------------------------------------------- config
    def check(self, cfg: Any) -> None:
        """Check (and where the dataset fixes them, set) the config's dataset-specific fields."""

    def has_masks(self, cfg: Any) -> bool:
        """Whether the run's images have ground-truth masks."""
        return False

    def run_name(self, cfg: Any) -> str:
        """The dataset's part of the run folder's name (before ``-seed<seed>``)."""
        return self.name

    def display_name(self, cfg: Any) -> str:
        return self.label or self.name

    # ----------------------------------------------------------------- data
    def data_spec(self, cfg: Any) -> dict[str, Any]:
        """The settings that pick the data on disk (beyond the dataset and its root), recorded
        with every artifact made from it."""
        return {}

    def fingerprint(self, spec: dict[str, Any]) -> str | None:
        """The fingerprint of the data a :meth:`data_spec` record names, as it is on disk now;
        None when it is not there."""
        return None

    def load(self, cfg: Any) -> tuple[Dataset, Dataset, list[str]]:
        """(train, test, class names), ``cfg.train_limit`` applied (see :func:`limit_split`)."""
        raise NotImplementedError(f"dataset {self.name!r}: load")

    # ----------------------------------------------------------------- model
    def epochs(self, cfg: Any) -> int:
        """Training epochs of the reference model: ``cfg.epochs``, else the dataset's default
        (``vxnb.models.default_epochs``)."""
        from vxnb import models

        return cfg.epochs or models.default_epochs(self.name, quick=cfg.quick)

    def checkpoint_settings(self, cfg: Any) -> dict[str, Any]:
        """The dataset's settings that change the trained reference model (part of its key)."""
        return {}

    def train_options(self, cfg: Any) -> dict[str, Any]:
        """Extra arguments of ``vxnb.models.train_model`` for the reference model (all of them
        part of the checkpoint key); ``{}``: its defaults."""
        return {}

    def build_reference_model(self, cfg: Any, classes: list[str]):
        """A fresh (untrained) reference model for this dataset."""
        from vxnb import models

        if self.reference_model is None:
            raise ValueError(f"dataset {self.name!r} uses the user's model; it has no reference model to train")
        return models.build_model(self.reference_model, num_classes=len(classes), **self.model_options(cfg))

    def model_options(self, cfg: Any) -> dict[str, Any]:
        """Extra arguments of ``vxnb.models.build_model`` for the reference model."""
        return {}

    def user_model(self, cfg: Any):
        """The user's model of a run that does not train one (``reference_model`` None)."""
        raise ValueError(f"cfg: dataset {self.name!r} trains its reference model; it has no user model")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def stratified_subset(idx: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded subset of ``idx`` with ``max(1, n // C)`` items per class (sorted)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = max(1, n // len(classes))
    keep = [rng.permutation(idx[labels == c])[:per] for c in classes]
    return np.sort(np.concatenate(keep))


def limit_split(full: Dataset, train_idx: np.ndarray, test_idx: np.ndarray, labels: np.ndarray,
                classes: list[str], cfg: Any) -> tuple[Dataset, Dataset, list[str]]:
    """(train, test, classes) as subsets of ``full``; with ``cfg.train_limit``, a class-stratified
    subset of that many training images and a quarter as many test images (at least one per class)."""
    if cfg.train_limit is not None and cfg.train_limit < len(train_idx):
        train_idx = stratified_subset(train_idx, labels[train_idx], cfg.train_limit, cfg.seed)
        test_idx = stratified_subset(test_idx, labels[test_idx], max(cfg.train_limit // 4, len(classes)),
                                     cfg.seed + 1)
    return Subset(full, train_idx.tolist()), Subset(full, test_idx.tolist()), classes
