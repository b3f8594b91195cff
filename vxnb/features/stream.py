"""The streamed pass of :func:`vxnb.features.extract_features`: hooks on, batch by batch G = XᵀX,
XᵀL and the rows of X, optionally on an accumulating thread beside the forward pass."""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .. import _store
from .._graph import LayerAnalysis as _Analysis
from .._gram import StreamGram, auto_gram_dtype
from ..utils import eval_mode
from .container import Features
from .hooks import Recorder, check_nonfinite, column_layers, l1_normalise
from .layers import feature_columns
from .loader import on_device, split_batch

__all__ = ["Stream", "WORKER_NAME"]


class _Rows:
    """A growing (n, m) float32 array (preallocated when the number of rows is known)."""

    def __init__(self, m: int, capacity: int | None = None):
        self.buf = np.empty((max(1, capacity or 256), m), dtype=np.float32)
        self.n = 0

    @property
    def nbytes(self) -> int:
        return self.n * self.buf.shape[1] * 4

    def add(self, rows: np.ndarray) -> None:
        need = self.n + rows.shape[0]
        if need > self.buf.shape[0]:
            new = np.empty((max(need, 2 * self.buf.shape[0]), self.buf.shape[1]), dtype=np.float32)
            new[: self.n] = self.buf[: self.n]
            self.buf = new
        self.buf[self.n:need] = rows
        self.n = need

    def result(self) -> np.ndarray:
        return self.buf if self.n == self.buf.shape[0] else self.buf[: self.n].copy()


class _Pending:
    """One batch whose host copies may still be in flight (CUDA) — finished one batch later,
    so that the GPU keeps working while the host waits."""

    def __init__(self, raw: torch.Tensor, bad: torch.Tensor, x_host: torch.Tensor | None,
                 event: Any, labels: torch.Tensor, index: torch.Tensor):
        self.raw, self.bad, self.x_host, self.event = raw, bad, x_host, event
        self.labels, self.index = labels, index

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


#: pass runs at most this many batches ahead of the G update, and their (B, m) rows are all
#: the extra memory).
_OVERLAP_DEPTH = 2
_STOP = object()


def _cpu_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _resolve_overlap(overlap: Any, device: torch.device) -> bool:
    """``overlap="auto"``: on for a CPU pass on a machine with ≥ 2 cores (the G update then runs
    beside the forward pass), off on CUDA (the device already runs asynchronously to the host;
    not measured) and on one core (the two threads would only take turns)."""
    if overlap is True or overlap is False:
        return overlap
    return device.type == "cpu" and _cpu_cores() >= 2


#: the name of the accumulating thread (tests check that none is left behind)
WORKER_NAME = "vxnb-features-accumulate"

class _Worker:
    """One thread applying ``fn(*item)`` to the items :meth:`submit` hands it, in order, through
    a bounded queue (``submit`` blocks while ``depth`` items wait).

    An exception raised by ``fn`` is kept and raised — the same exception object, with its
    message and traceback — by the next :meth:`submit` or :meth:`drain` in the caller's thread;
    the items after it are discarded. :meth:`close` (always called, also when the caller fails
    or is interrupted) drops what is still queued and joins the thread, so no thread outlives
    the pass."""

    def __init__(self, fn: Callable[..., None], depth: int = _OVERLAP_DEPTH, context: Callable[[], Any] | None = None):
        self.fn, self.context = fn, context
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self.error: BaseException | None = None
        self.cancelled = False
        self.thread = threading.Thread(target=self._loop, name=WORKER_NAME, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        with contextlib.ExitStack() as stack:
            try:
                if self.context is not None:
                    stack.enter_context(self.context())
            except BaseException as err:  # noqa: BLE001 — raised by the next submit; the loop still consumes
                self.error = err
            while True:
                item = self.queue.get()
                try:
                    if item is _STOP:
                        return
                    if self.error is None and not self.cancelled:
                        self.fn(*item)
                except BaseException as err:  # noqa: BLE001 — handed to the caller's thread
                    self.error = err
                finally:
                    self.queue.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            self.cancelled = True  # nothing after a failed item is applied
            raise err

    def submit(self, *item: Any) -> None:
        self._raise()
        self.queue.put(item)

    def drain(self) -> None:
        """Wait until every submitted item is applied; raise the first error."""
        self.queue.join()
        self._raise()

    def close(self) -> None:
        self.cancelled = True
        self.queue.put(_STOP)  # the loop keeps consuming, so this cannot block for long
        self.thread.join()


class Stream:
    """The pass of :func:`extract_features` over the data and what it accumulates.

    Per batch: the layers' outputs → descriptors x (B, m) → G += xᵀx (:class:`StreamGram`),
    S[label] += x (XᵀL), the rows of X while they fit. The first batch fixes m (:meth:`_setup`).
    On CUDA the host copies of x and of the non-finite flag are asynchronous and finished one
    batch later (:meth:`_finish`), so the device never waits for the host. On the CPU with
    ``overlap`` all of it runs on a :class:`_Worker` thread (:meth:`_accumulate`), the forward
    pass of the next batch beside it. Under
    ``torch.distributed`` / with checkpoints (``shard``, ``vxnb.distributed.Shard``) it resumes
    from the checkpointed part, checkpoints as it goes and combines the ranks' parts.
    """

    def __init__(self, model: nn.Module, layers: list[str], analysis: _Analysis, dev: torch.device,
                 n_expected: int | None, n_total: int | None, n_classes: int | None, classes: list[str] | None,
                 keep_X: Any, max_bytes: int, gram_dtype: Any, shard: Any, callbacks: list) -> None:
        self.model, self.layers, self.analysis, self.dev = model, layers, analysis, dev
        self.n_expected, self.n_classes, self.classes, self.max_bytes = n_expected, n_classes, classes, max_bytes
        self.n_total = n_total  # the whole dataset's N (n_expected: this process's shard)
        self.shard, self.callbacks = shard, callbacks
        self.gram_dtype = gram_dtype
        self.keep: bool | None = None if keep_X == "auto" else bool(keep_X)
        self.is_cuda = dev.type == "cuda"
        self.gram: StreamGram | None = None
        self.gram_args: tuple = ()
        self.overlap = False
        self.S: torch.Tensor | None = None
        self.columns: pd.DataFrame | None = None
        self.widths: list[int] | None = None
        self.col_layer: torch.Tensor | None = None
        self.x_rows: _Rows | None = None
        self.label_chunks: list[np.ndarray] = []
        self.index_chunks: list[np.ndarray] = []
        if shard is not None:  # a resumed shard: its checkpointed part
            self.label_chunks, self.index_chunks = shard.restored()
            shard.restore_callbacks(callbacks)
            if shard.gram_dtype is not None and isinstance(gram_dtype, str):
                self.gram_dtype = getattr(torch, shard.gram_dtype.replace("torch.", ""))
        self.c_cap = n_classes if n_classes is not None else (len(classes) if classes is not None else 1)

    def _setup(self, raws: Sequence[torch.Tensor], bsz: int) -> None:
        """First batch: now m is known."""
        self.widths = [r.shape[1] for r in raws]
        self.columns = feature_columns(self.model, self.layers, self.widths, self.analysis)
        m = len(self.columns)
        if isinstance(self.gram_dtype, str):  # "auto": needs m, known from the first batch
            self.gram_dtype = auto_gram_dtype(self.dev, self.n_total, m)
        self.gram_args = (m, self.dev, self.gram_dtype, bsz, self.n_expected, self.overlap)  # made by _add
        self.col_layer = column_layers(self.widths, self.dev)
        self.S = torch.zeros((self.c_cap, m), dtype=torch.float64, device=self.dev)
        if self.keep is None and self.n_total is not None:
            self.keep = self.n_total * m * 4 <= self.max_bytes

    def _add(self, raws: Sequence[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> _Pending:
        """Accumulate one batch on the device; its host side is finished later (:meth:`_finish`)."""
        dev, S = self.dev, self.S
        raw, x, sums = l1_normalise(raws, self.col_layer)
        bad = ~torch.isfinite(sums).all()  # (B, layers), not (B, m): a NaN or inf shows in its layer's sum
        if self.gram is None:  # here, not in _setup: on the overlap thread it allocates G beside the forward
            self.gram = StreamGram(*self.gram_args)
        self.gram.add(x)
        # XᵀL: class sums
        ymax = int(labels.max())
        if ymax >= S.shape[0]:
            S = self.S = torch.cat([S, torch.zeros((ymax + 1 - S.shape[0], S.shape[1]), dtype=S.dtype, device=dev)])
        S.index_add_(0, labels.to(dev, non_blocking=True), x.double())
        # host copies (asynchronous on CUDA, finished one batch later)
        x_host = None
        event = None
        if self.keep is not False:
            if self.is_cuda:
                x_host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                x_host.copy_(x, non_blocking=True)
            else:
                x_host = x
        if self.is_cuda:
            bad_host = torch.empty((), dtype=torch.bool, pin_memory=True)
            bad_host.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            bad = bad_host
        return _Pending(raw, bad, x_host, event, labels, index)

    def _finish(self, p: _Pending) -> None:
        p.wait()
        if bool(p.bad):
            check_nonfinite(p.raw, self.columns, self.layers, self.widths)  # raises, naming layer and channel
        self.label_chunks.append(p.labels.numpy())
        self.index_chunks.append(p.index.numpy())
        if p.x_host is not None and self.keep is not False:
            if self.x_rows is None:
                self.x_rows = _Rows(p.x_host.shape[1], self.n_expected if self.keep else None)
            self.x_rows.add(p.x_host.numpy())  # copied: the batch's tensor is freed at once
            if self.keep is None and self.x_rows.nbytes > self.max_bytes:  # auto, N unknown: give up on X
                self.keep = False
                self.x_rows = None
                warnings.warn(f"keep_X='auto': X exceeds max_bytes={self.max_bytes}; only G and XtL are kept")

    def _accumulate(self, raws: Sequence[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> None:
        """A CPU batch, whole: :meth:`_add` and :meth:`_finish` (on the overlap thread)."""
        self._finish(self._add(raws, labels, index))

    def run(self, loader: Iterable, callbacks: list, progress: bool, overlap: bool | str = False) -> None:
        """One pass over ``loader``: hooks on, model on the device in eval mode, all undone after.

        ``overlap`` (CPU only; ``"auto"``: :func:`_resolve_overlap`): everything after the hooks —
        descriptors, G, XᵀL, X — runs on a :class:`_Worker` thread while the forward pass of the
        next batches goes on; it is drained before a checkpoint is written and before G is read,
        and closed whatever happens."""
        total = None
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError:
            pass
        pending: _Pending | None = None
        overlap = self.overlap = _resolve_overlap(overlap, self.dev) and not self.is_cuda
        with contextlib.ExitStack() as stack:
            stack.enter_context(on_device(self.model, self.dev))
            stack.enter_context(eval_mode(self.model))
            rec = stack.enter_context(Recorder(self.model, self.layers, keep_outputs=bool(callbacks)))
            stack.enter_context(torch.inference_mode())
            if self.dev.type == "cpu":  # syrk runs in numpy's BLAS: as many threads as torch uses
                # (with the overlap thread: beside the forward's threads, on the cores they leave, ≥ 1)
                blas = torch.get_num_threads()
                if overlap:
                    blas = max(1, min(blas, _cpu_cores() - blas))
                stack.enter_context(threadpool_limits(limits=blas, user_api="blas"))
            worker = None
            if overlap:  # closed (queue dropped, thread joined) on any exit, the worker's errors raised
                worker = _Worker(self._accumulate, context=torch.inference_mode)
                stack.callback(worker.close)
            for index, batch in tqdm(loader, total=total, desc="features", disable=None if progress else True,
                                     leave=False):
                images, labels = split_batch(batch, self.n_classes)
                index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
                bsz = images.shape[0]
                if bsz == 0:
                    continue
                if index.shape[0] != bsz:
                    raise ValueError(f"data: {index.shape[0]} indices for a batch of {bsz} images")
                rec.reset()
                self.model(images.to(self.dev, non_blocking=True))
                raws = rec.collect(bsz, self.widths)
                if self.widths is None:
                    self._setup(raws, bsz)
                if worker is not None:
                    worker.submit(raws, labels, index)
                else:
                    added = self._add(raws, labels, index)
                for cb in callbacks:
                    cb(dict(rec.outputs), index)
                if worker is None:
                    if pending is not None:
                        self._finish(pending)
                    pending = added
                _store.fault_point("extract")
                if self.shard is not None and self.shard.due():  # a checkpoint: everything up to this batch
                    if worker is not None:
                        worker.drain()
                    if pending is not None:
                        self._finish(pending)
                    pending = None
                    self.gram.flush()
                    self.shard.save(self.gram.result(), self.S, self.label_chunks, self.index_chunks,
                                    None if self.x_rows is None else self.x_rows.result(), self.widths,
                                    self.gram_dtype, callbacks)
            if worker is not None:
                worker.drain()
            if pending is not None:
                self._finish(pending)
            if self.gram is None and self.shard is None:
                raise ValueError("data: no images (the data yielded no non-empty batch)")
            self.G = None if self.gram is None else self.gram.result()
            self.S_np = None if self.S is None else self.S.cpu().numpy()

    def features(self, only_conv: bool, index_known: bool, key_info: dict[str, Any]) -> Features:
        """The :class:`Features` of the finished pass."""
        labels_np = np.concatenate(self.label_chunks).astype(np.int64) if self.label_chunks else np.zeros(0, np.int64)
        index_np = np.concatenate(self.index_chunks).astype(np.int64) if self.index_chunks else np.zeros(0, np.int64)
        X = self.x_rows.result() if self.keep is not False and self.x_rows is not None else None
        G, S_np, widths, columns, shard = self.G, self.S_np, self.widths, self.columns, self.shard
        if shard is not None:  # the resumed part and the other ranks' parts
            G, S_np, labels_np, index_np, X, widths = shard.combine(G, S_np, labels_np, index_np, X, widths)
            shard.sync(self.callbacks)
            if columns is None:
                columns = feature_columns(self.model, self.layers, widths, self.analysis)
        C, classes = S_np.shape[0], self.classes
        if self.n_classes is None:
            C = len(classes) if classes is not None else int(labels_np.max()) + 1
            if classes is not None and int(labels_np.max()) >= C:
                raise ValueError(f"data: label {int(labels_np.max())} out of range for the dataset's {C} classes")
        XtL = np.ascontiguousarray(S_np[:C].T)
        meta = dict(layers=list(self.layers), only_conv=bool(only_conv), gram_dtype=str(self.gram_dtype),
                    index_known=index_known, device=str(self.dev), key=key_info or None, cache_hit=False,
                    world_size=1 if shard is None else shard.world)
        return Features(G=G, XtL=XtL, labels=labels_np, index=index_np, columns=columns,
                        layers=list(self.layers), n_classes=int(C), classes=classes, X=X, meta=meta)
