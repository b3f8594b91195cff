"""The data side of a pass: any Dataset or DataLoader as batches with their dataset indices,
the model on the pass's device (also used by ``vxnb.evaluate.ablation``)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..utils import describe, get_device, model_device

__all__ = ["as_loader", "split_batch", "dataset_classes", "on_device", "resolve_device"]


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the block with the model on ``device``; move it back afterwards."""
    old = model_device(model)
    if _same_device(old, device) or next(iter(model.parameters()), None) is None:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to(old)


def resolve_device(model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        return get_device(device)
    own = model_device(model)
    return own if own.type != "cpu" else get_device(None)


class _IndexedFetch(Dataset):
    """Wraps a map-style dataset so that each fetch (a list of indices from a batch sampler)
    returns ``(indices, collated batch)``: the dataset indices survive any sampler."""

    def __init__(self, dataset: Any, collate_fn: Callable, auto_collation: bool):
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.auto_collation = auto_collation

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: Any) -> tuple[torch.Tensor, Any]:
        if self.auto_collation:
            idx = list(idx)
            return torch.as_tensor(idx, dtype=torch.long), self.collate_fn([self.dataset[i] for i in idx])
        return torch.as_tensor(idx, dtype=torch.long).reshape(-1), self.collate_fn(self.dataset[idx])


def _identity(x: Any) -> Any:
    return x


def as_loader(data: Any, batch_size: int, num_workers: int, pin: bool,
              arg: str = "data") -> tuple[Iterable, Any, int | None, bool]:
    """(iterable of (index, batch), dataset, expected N or None, index_known)."""
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if not isinstance(num_workers, (int, np.integer)) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int ≥ 0, got {num_workers!r}")
    if isinstance(data, DataLoader):
        ds = data.dataset
        if isinstance(ds, IterableDataset):
            return _count_index(data), ds, None, False
        sampler = data.batch_sampler if data.batch_sampler is not None else data.sampler
        auto = data.batch_sampler is not None
        kwargs: dict[str, Any] = dict(batch_size=None, sampler=sampler, num_workers=data.num_workers,
                                      collate_fn=_identity, pin_memory=data.pin_memory, timeout=data.timeout,
                                      worker_init_fn=data.worker_init_fn, generator=data.generator,
                                      multiprocessing_context=data.multiprocessing_context,
                                      persistent_workers=data.persistent_workers)
        if data.num_workers > 0:
            kwargs["prefetch_factor"] = data.prefetch_factor
        loader = DataLoader(_IndexedFetch(ds, data.collate_fn, auto), **kwargs)
        try:
            n = len(data.sampler)
        except TypeError:
            n = None
        return loader, ds, n, True
    if isinstance(data, IterableDataset):
        loader = DataLoader(data, batch_size=int(batch_size), num_workers=int(num_workers), pin_memory=pin)
        return _count_index(loader), data, None, False
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if len(data) == 0:
            raise ValueError(f"{arg}: the dataset is empty")
        from torch.utils.data import BatchSampler, SequentialSampler
        from torch.utils.data.dataloader import default_collate
        sampler = BatchSampler(SequentialSampler(range(len(data))), int(batch_size), drop_last=False)
        loader = DataLoader(_IndexedFetch(data, default_collate, True), batch_size=None, sampler=sampler,
                            num_workers=int(num_workers), collate_fn=_identity, pin_memory=pin)
        return loader, data, len(data), True
    raise TypeError(f"{arg}: expected a Dataset or DataLoader yielding (image, label[, mask]), got {describe(data)}")


class _count_index:
    """Iterable over a loader yielding (running index, batch) — for iterable datasets."""

    def __init__(self, loader: Iterable):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        start = 0
        for batch in self.loader:
            b = split_batch(batch)[0].shape[0]
            yield torch.arange(start, start + b), batch
            start += b


def split_batch(batch: Any, n_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"data: expected items (image, label) or (image, label, mask), got a batch of "
                         f"{describe(batch)}")
    images, labels = batch[0], batch[1]
    if not isinstance(images, torch.Tensor) or not torch.is_floating_point(images) or images.dim() < 2:
        raise ValueError(f"data: images must collate to a float tensor (B, C, H, W), got {describe(images)}")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool \
            or labels.shape[0] != images.shape[0]:
        raise ValueError(f"data: labels must collate to an integer tensor (B,) matching the {images.shape[0]} "
                         f"images, got {describe(labels)}")
    labels = labels.to(torch.long)
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"data: labels must be ≥ 0, got {int(labels.min())}")
    if n_classes is not None and labels.numel() and int(labels.max()) >= n_classes:
        raise ValueError(f"data: label {int(labels.max())} out of range for n_classes={n_classes}")
    return images, labels


def dataset_classes(ds: Any) -> list[str] | None:
    classes = getattr(ds, "classes", None)
    if classes is None:
        return None
    try:
        return [str(c) for c in classes]
    except TypeError:
        return None
