"""The features cache: content keys (model, data, layers, options) through :mod:`vxnb._store`."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from .. import _store
from .container import FORMAT_VERSION, Features

__all__ = ["fingerprint_data", "cache_entry", "load_cached", "cached_features"]


def _hash_update(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (tuple, list)):
        h.update(f"L{len(obj)}".encode())
        for o in obj:
            _hash_update(h, o)
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _hash_update(h, obj[k])
    else:
        h.update(repr(obj).encode())


def fingerprint_data(data: Any, ds: Any) -> str | None:
    h = hashlib.blake2b(digest_size=16)
    if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
        return None
    n = len(ds)
    h.update(f"{type(ds).__qualname__}:{n}".encode())
    for i in sorted({0, n // 2, n - 1}):
        _hash_update(h, ds[i])
    if isinstance(data, DataLoader):
        sampler = data.sampler
        h.update(type(sampler).__qualname__.encode())
        try:
            h.update(str(len(sampler)).encode())
        except TypeError:
            pass
        _hash_update(h, list(getattr(sampler, "indices", [])))
    return h.hexdigest()


def cache_entry(model: nn.Module, data: Any, ds: Any, layers: list[str], cache_dir: Any, data_key: str | None,
               n_classes: int | None, gram_dtype: Any, keep_X: Any, max_bytes: int
               ) -> tuple[Path | None, dict[str, Any], str | None]:
    """(cache file, what its key hashes, the key) through :mod:`vxnb._store`; (None, {}, None)
    without a cache."""
    if cache_dir is None:
        return None, {}, None
    dkey = data_key if data_key is not None else fingerprint_data(data, ds)
    if dkey is None:
        warnings.warn("cache_dir: an iterable dataset cannot be fingerprinted; pass data_key=... to cache it")
        return None, {}, None
    key_info = dict(model=_store.model_fingerprint(model), data=dkey, layers=list(layers), n_classes=n_classes,
                    gram_dtype=str(gram_dtype), keep_X=keep_X, max_bytes=int(max_bytes) if keep_X == "auto" else None)
    key = _store.key("features", key_info, version=FORMAT_VERSION)
    return Path(cache_dir) / f"features-{key}.npz", key_info, key


def load_cached(path: Path, key: str) -> Features:
    f = Features.load(path)
    if f.meta.get("store_key") != key:
        raise ValueError(f"it holds the features of key {f.meta.get('store_key')}, not {key}")
    f.meta["cache_hit"] = True
    return f


def cached_features(cache_path: Path, key: str, callbacks: list, shard: Any) -> Features | None:
    """Under a shard (``torch.distributed`` or checkpoints) every rank takes part in the pass, so
    there is no lock: rank 0 reads the file (a damaged one is removed with a warning) and the
    other ranks follow its decision. None: compute."""
    if callbacks:
        return None
    hit, cached = False, None
    if shard.rank == 0:
        hit, cached = _store.try_load(cache_path, lambda p: load_cached(p, key), "features")
    if shard.decide(bool(hit), "sharing rank 0's cache check"):
        cached = cached if cached is not None else load_cached(cache_path, key)
        shard.finish()
        return cached
    return None
