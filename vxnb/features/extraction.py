"""The one public entry point of the features package, :func:`extract_features`, and its option
objects (:class:`CacheOptions`, :class:`DistOptions`), validated here, at the boundary."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .. import _store
from .. import distributed as _distributed
from .._checks import check_flag_or_auto, check_model, check_path, check_positive_int
from .._graph import LayerAnalysis as _Analysis, analyse_layers as _analyse
from ..utils import describe
from .cache import cache_entry, cached_features, fingerprint_data, load_cached
from .container import FORMAT_VERSION, Features
from .layers import resolve_layers
from .loader import as_loader, dataset_classes, resolve_device
from .stream import Stream

__all__ = ["extract_features", "CacheOptions", "DistOptions"]


@dataclass(frozen=True)
class CacheOptions:
    """Where :func:`extract_features` keeps its result, and how the data is named in the key.

    cache_dir: the folder (``<cache_dir>/features-<key>.npz``); None: no cache.
    data_key: a str naming the data in the key (default: a fingerprint of the dataset — its
    class, length, sampler and first, middle and last items; required for an iterable dataset).
    """

    cache_dir: str | os.PathLike | None = None
    data_key: str | None = None

    def __post_init__(self) -> None:
        check_path(self.cache_dir, "cache_dir", allow_none=True)
        if self.data_key is not None and not isinstance(self.data_key, str):
            raise TypeError(f"data_key: expected a str, got {describe(self.data_key)}")


@dataclass(frozen=True)
class DistOptions:
    """Checkpoints of a pass (one process or each rank under ``torch.distributed``).

    checkpoint_dir: write this process's partial sums there every ``checkpoint_every`` batches
    (a restarted pass resumes from them); None: no checkpoints.
    """

    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        check_path(self.checkpoint_dir, "checkpoint_dir", allow_none=True)
        check_positive_int(self.checkpoint_every, "checkpoint_every", "batches")


_LEGACY = {"cache_dir": "cache", "data_key": "cache", "checkpoint_dir": "dist", "checkpoint_every": "dist"}


def _options(cache: Any, dist: Any, legacy: dict[str, Any]) -> tuple[CacheOptions, DistOptions]:
    """``cache`` / ``dist`` as option objects; the keywords of earlier versions fill them."""
    unknown = sorted(set(legacy) - set(_LEGACY))
    if unknown:
        raise TypeError(f"extract_features() got unexpected keyword argument(s) {unknown}")
    if isinstance(cache, (str, os.PathLike)):
        cache = CacheOptions(cache_dir=cache)
    for name, given, cls in (("cache", cache, CacheOptions), ("dist", dist, DistOptions)):
        old = {k: v for k, v in legacy.items() if _LEGACY[k] == name}
        if given is not None and old:
            raise ValueError(f"{name}: give either {name}={cls.__name__}(...) or {sorted(old)}, not both")
        if given is not None and not isinstance(given, cls):
            raise TypeError(f"{name}: expected a {cls.__name__} or None, got {describe(given)}")
    cache = cache if cache is not None else CacheOptions(**{k: v for k, v in legacy.items() if _LEGACY[k] == "cache"})
    dist = dist if dist is not None else DistOptions(**{k: v for k, v in legacy.items() if _LEGACY[k] == "dist"})
    return cache, dist


def _check_extract_args(model: Any, layers: Any, only_conv: bool, keep_X: Any, max_bytes: Any, n_classes: Any,
                        gram_dtype: Any, callbacks: Any, overlap: Any
                        ) -> tuple[_Analysis, list[str], list[Callable[..., Any]]]:
    """Validate :func:`extract_features`' arguments; (model analysis, layer names, callbacks)."""
    analysis = _analyse(check_model(model))
    layers = resolve_layers(model, layers, only_conv, analysis)
    check_flag_or_auto(keep_X, "keep_X")
    if not isinstance(max_bytes, (int, np.integer)) or isinstance(max_bytes, bool) or max_bytes < 0:
        raise ValueError(f"max_bytes: expected an int ≥ 0, got {max_bytes!r}")
    check_positive_int(n_classes, "n_classes", allow_none=True)
    if not (gram_dtype in (torch.float64, torch.float32) or (isinstance(gram_dtype, str) and gram_dtype == "auto")):
        raise ValueError(f"gram_dtype: expected 'auto', torch.float64 or torch.float32, got {gram_dtype!r}")
    if callable(callbacks):
        callbacks = [callbacks]
    callbacks = list(callbacks)
    for i, cb in enumerate(callbacks):
        if not callable(cb):
            raise TypeError(f"callbacks[{i}]: expected a callable cb(outputs, index), got {describe(cb)}")
    check_flag_or_auto(overlap, "overlap")
    return analysis, layers, callbacks


def extract_features(model: nn.Module, data: Any, layers: Sequence[str] | str | None = None,
                     only_conv: bool = False, *, batch_size: int = 64, num_workers: int = 0,
                     device: str | torch.device | None = None, keep_X: bool | str = "auto",
                     max_bytes: int = 2**30, n_classes: int | None = None, gram_dtype: torch.dtype | str = "auto",
                     callbacks: Sequence[Callable[[dict[str, torch.Tensor], torch.Tensor], Any]] = (),
                     progress: bool = True, overlap: bool | str = "auto",
                     cache: CacheOptions | str | os.PathLike | None = None, dist: DistOptions | None = None,
                     **legacy: Any) -> Features:
    """Filter-wise responses x of every image of ``data`` and the statistics G = XᵀX, XᵀL.

    Args:
        model: the network (left as it was: hooks removed, train/eval modes restored, moved back
            to its device).
        data: a Dataset or DataLoader yielding ``(image, label[, mask])`` (labels int class ids).
            A DataLoader keeps its sampler, workers and collate function; its dataset indices are
            recovered for every row (``Features.index``).
        layers: module names to describe (any module: activations, pooling, normalisation,
            residual blocks such as ResNet's ``layer1.0``); default :func:`default_layers`.
        only_conv: with ``layers=None``, the OnlyConv pool (convolutional blocks only).
        batch_size, num_workers: for a Dataset (a DataLoader brings its own).
        device: where to run; default the model's device if it is a GPU, else CUDA when present
            (the model is moved there for the pass and back afterwards), else the CPU.
        keep_X: also return the matrix X (N, m) float32: ``"auto"`` when N·m·4 ≤ ``max_bytes``,
            True always, False never. G, XtL, labels are always returned.
        n_classes: C (default: ``len(dataset.classes)`` or the largest label + 1).
        cache: a :class:`CacheOptions` (or just its folder, a path): reuse/store the result as
            ``<cache_dir>/features-<key>.npz`` through
            :mod:`vxnb._store`, the key hashing the model (class, structure and state_dict
            bytes), the data (``CacheOptions.data_key`` if given, else its class, length, sampler and a hash
            of its first, middle and last items), the layers and the options. Written
            atomically under a file lock (a concurrent process waits and reads it); a damaged
            file is recomputed with a warning. Not read when ``callbacks`` are given (they need
            the pass); an iterable dataset without ``data_key`` is not cached.
        gram_dtype: dtype of the GEMMs accumulating G (always summed into float64):
            ``torch.float64`` (exact to float64 rounding), ``torch.float32`` (blocks of ≤ 1024
            rows multiplied in float32, then added in float64: relative error ~1e-7, twice as
            fast on CPUs, far faster on GPUs with slow float64) or ``"auto"`` (default: on the CPU
            float32 when N·m² > 2·10⁹ — where float64 products would cost a small network several
            per cent of its forward pass — else float64; float64 on datacenter GPUs, float32 on
            consumer GPUs). The choice is recorded in ``meta["gram_dtype"]``; pass
            :attr:`Features.lasso_tol` to ``vxnb.lasso`` (``runs.get_lasso_path`` does).
        callbacks: callables ``cb(outputs, index)`` called after each batch's forward pass, with
            ``outputs`` = ``{layer: tensor}`` the raw outputs of the described layers for that
            batch ((B, C, H, W) or (B, C), on the device, detached clones taken inside the hook
            so in-place ops later in the network cannot change them) and ``index`` = LongTensor
            (B,) of the batch's dataset indices. E.g. ``vxnb.interpret.TopPatches`` collects the
            top images per feature in the same pass. Keeping the clones costs the memory of
            one batch of those layers' outputs.
        progress: tqdm progress bar.
        dist: a :class:`DistOptions`: with ``checkpoint_dir``, write this process's partial sums
            (and the callbacks' states) there every ``checkpoint_every`` batches, atomically; a
            restarted pass resumes from them (see ``vxnb.distributed``). ``data`` must then be a
            Dataset.
        overlap: on the CPU, accumulate each batch (descriptors, G, XᵀL, X) on a second thread,
            fed through a bounded queue (2 batches), while the forward pass of the next batch
            runs; torch and the BLAS syrk of ``vxnb._gram`` (called so that it releases the GIL)
            run outside the GIL, so on ≥ 2 cores the G update is hidden behind the forward pass.
            With the thread, G gets one syrk per batch (not one per ~1024 rows, which would leave
            the last block's product after the last forward pass): the same sums rounded
            differently, within the accuracy of ``gram_dtype`` (relative ~1e-7 for float32
            products, float64 rounding otherwise); XᵀL, X, labels and index are bit-identical.
            An error on the thread is raised here (the same exception), nothing is written, and
            the thread never outlives the call (also on an exception or KeyboardInterrupt in the
            forward pass). ``"auto"`` (default): on for a CPU pass when the process may use ≥ 2
            cores; off on CUDA (the device already runs the G update asynchronously to the host;
            not measured with the thread) and on one core. True / False force it (True is
            ignored on CUDA). With the thread, numpy's BLAS gets the cores torch's threads leave
            (at least 1). See ``benchmarks/bench_features.py`` for the measured effect.

    Under ``torch.distributed`` (an initialised process group, e.g. started by ``torchrun``) each
    rank streams its shard of ``data`` (a Dataset; every image counted once), the sums are
    all-reduced in float64, labels/indices/X gathered in dataset order and callbacks with
    ``sync_distributed()`` (``TopPatches``) merged: every rank returns what one process would.
    Rank 0 writes the cache; the others wait for it at a barrier. See ``vxnb.distributed``.

    The keywords ``cache_dir``, ``data_key``, ``checkpoint_dir`` and ``checkpoint_every`` of
    earlier versions are still accepted (they fill ``cache`` / ``dist``; not together with them).

    Returns:
        :class:`Features`.

    Memory: G takes m²·8 bytes (m = number of channels described; e.g. ~1 GB for VGG-11 with its
    two 4096-unit FC layers).
    """
    cache, dist = _options(cache, dist, legacy)
    analysis, layers, callbacks = _check_extract_args(model, layers, only_conv, keep_X, max_bytes, n_classes,
                                                      gram_dtype, callbacks, overlap)
    dev = resolve_device(model, device)
    shard = _open_shard(model, data, layers, dev, cache.data_key, n_classes, gram_dtype, keep_X, batch_size,
                        num_workers, dist)
    progress = progress and (shard is None or shard.rank == 0)  # one progress bar, rank 0's
    loader, ds, n_expected, index_known = as_loader(data if shard is None else shard.loader, batch_size,
                                                    num_workers, pin=dev.type == "cuda")
    n_total = n_expected if shard is None else shard.n  # the whole dataset's N, for the "auto" choices
    classes = dataset_classes(ds)
    if n_classes is not None and classes is not None and len(classes) != n_classes:
        raise ValueError(f"n_classes: {n_classes} given, but the dataset has {len(classes)} classes")
    cache_path, key_info, key = cache_entry(model, data, ds, layers, cache.cache_dir, cache.data_key, n_classes,
                                            gram_dtype, keep_X, max_bytes)

    def compute(key_info: dict[str, Any]) -> Features:
        stream = Stream(model, layers, analysis, dev, n_expected, n_total, n_classes, classes, keep_X, max_bytes,
                        gram_dtype, shard, callbacks)
        stream.run(loader, callbacks, progress, overlap)
        return stream.features(only_conv, index_known, key_info)

    return _cached_or_computed(compute, cache_path, key, key_info, callbacks, shard)


def _open_shard(model: nn.Module, data: Any, layers: list[str], dev: torch.device, data_key: str | None,
                n_classes: int | None, gram_dtype: Any, keep_X: Any, batch_size: int, num_workers: int,
                dist: DistOptions) -> Any:
    """This process's shard of ``data`` under torch.distributed / with checkpoints (None for a
    plain single-process pass)."""
    return _distributed.Shard.open(data, batch_size=batch_size, num_workers=num_workers, pin=dev.type == "cuda",
                                   fingerprint=lambda: {"model": _store.model_fingerprint(model),
                                                        "layers": list(layers),
                                                        "data": data_key or fingerprint_data(data, data),
                                                        "n_classes": n_classes, "gram_dtype": str(gram_dtype),
                                                        "keep_X": keep_X},
                                   checkpoint_dir=dist.checkpoint_dir, checkpoint_every=dist.checkpoint_every)


def _cached_or_computed(compute: Callable[[dict[str, Any]], Features], cache_path: Path | None, key: str | None,
                        key_info: dict[str, Any], callbacks: list[Callable[..., Any]], shard: Any) -> Features:
    """The pass's :class:`Features`: read from / written to the cache entry when there is one
    (one process: under the artifact's lock; a shard: rank 0 writes it for all)."""
    if cache_path is not None and shard is None:  # one process: load or compute under the artifact's lock
        def save(f: Features, tmp: Path) -> None:
            f.meta.update(key=key_info, store_key=key)
            f.save(tmp)

        feats, _ = _store.load_or_compute(cache_path, key, "features", lambda: compute({}),
                                          load=lambda p: load_cached(p, key), save=save, recompute=bool(callbacks),
                                          settings=key_info, version=FORMAT_VERSION)
        return feats
    if cache_path is not None:
        cached = cached_features(cache_path, key, callbacks, shard)
        if cached is not None:
            return cached
    feats = compute(key_info)
    if cache_path is not None and shard.rank == 0:  # a shard's result: rank 0 writes it for all
        feats.meta["store_key"] = key
        _store.load_or_compute(cache_path, key, "features", lambda: feats, load=None, save=lambda f, tmp: f.save(tmp),
                               recompute=True, lock=False, settings=key_info, version=FORMAT_VERSION)
    if shard is not None:
        shard.finish()
    return feats
