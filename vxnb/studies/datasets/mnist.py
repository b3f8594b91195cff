"""MNIST: the real digits (IDX files under the data folder), a fixed stratified 80/20 split."""
from __future__ import annotations

from typing import Any

import numpy as np

from vxnb import _store

from .base import DatasetSpec, limit_split


class MnistSpec(DatasetSpec):
    name = "mnist"
    label = "MNIST"
    reference_model = "mnistnet"

    def check(self, cfg: Any) -> None:
        cfg.size = 28

    def train_options(self, cfg: Any) -> dict[str, Any]:
        # ``vxnb.models.MNIST_RECIPE`` (issue 26) in the full setting; the quick (CI) setting trains the plain way
        from vxnb import models

        return {} if cfg.quick else dict(models.MNIST_RECIPE)

    def fingerprint(self, spec: dict[str, Any]) -> str | None:
        """The sha256 of each IDX file."""
        from vxnb.data.mnist import mnist_files

        files = mnist_files(spec["root"])
        if not files:
            return None
        return _store.key("mnist-files", {k: [_store.file_fingerprint(p) for p in pair]
                                          for k, pair in sorted(files.items())})

    def load(self, cfg: Any):
        from vxnb.data.mnist import MnistDataset, load_mnist, stratified_split

        images, labels_t = load_mnist(cfg.data_dir)
        labels = np.asarray(labels_t)
        full = MnistDataset(images, labels_t)
        train_idx, test_idx = stratified_split(labels, test_fraction=0.2, seed=cfg.seed)
        return limit_split(full, train_idx, test_idx, labels, list(full.classes), cfg)
