"""Dataset-scale extraction under ``torch.distributed``: shards, reductions, top-k merges, checkpoints.

Everything ``vxnb.features.extract_features`` accumulates is a sum over images (G = XᵀX, XᵀL,
labels and indices) or a mergeable top-k (``vxnb.interpret.TopPatches``), so it shards. When a
process group is initialised (``torchrun``, or ``torch.distributed.init_process_group``) every
rank streams its own shard of the dataset and the partial results are combined here:

- **Shards.** ``DistributedSampler(shuffle=False)`` deals the batches of the one-process pass
  (batch ``b`` to rank ``b mod world``); it pads the last round by repeating the first ones so
  that all ranks get as many, and those repeats are dropped (:func:`shard_positions`), so every
  image is counted exactly once. Whole batches, not single images, because a float32 forward
  pass can round differently when an image sits in another batch (measured: XᵀL off by 4e-8,
  top-k ties reordered); dealt this way every descriptor is bit-identical to one process's. A
  world larger than the dataset (or than its number of batches) is refused.
- **Agreement.** Before any work the ranks compare the model fingerprint, the layers and the
  dataset length; a rank that differs is refused with both values named.
- **Sums** are all-reduced in float64 (G within ~1e-15 relative of one process: only the
  summation order differs); labels and indices are gathered and put in dataset order.
- **Top-k** lists are gathered and merged by (score descending, dataset index ascending): the
  order a single sequential pass keeps, so the result does not depend on the number of ranks.
- **Checkpoints** (``checkpoint_dir``): every ``checkpoint_every`` batches each rank writes its
  partial sums and its callbacks' states, atomically, to ``extract-<key>-rank<r>of<w>.pt``.
  A restarted job with the same world size and content key resumes from them; one with another
  world size starts afresh and says why. They are removed once the result is complete.
- **Shared folders.** Rank 0 renders or fetches the data, trains the model and writes the
  caches; the other ranks read them from the same folders. That needs a filesystem every node
  shares: :func:`check_shared_folders` checks it before any rank reads, and refuses the job
  otherwise (a node with its own disk would read stale files, or train the model again itself).
- **Faults.** Collectives run under the process group's timeout; a rank that dies makes the
  others fail with a RuntimeError naming the step, and no cache is written.

Backend: NCCL when CUDA is available, else gloo (:func:`init`).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from .utils import atomic_torch_save, describe

__all__ = ["init", "is_initialized", "rank_and_world", "shard_positions", "merge_topk", "Shard",
           "check_shared_folders"]

CHECKPOINT_VERSION = 1


# ============================================================================ process group
def is_initialized() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if not is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def init(timeout: float = 1800.0, backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); return False (and do nothing) when not started by torchrun.

    backend: default NCCL when CUDA is available (each rank on GPU ``LOCAL_RANK``), else gloo.
    timeout: seconds a collective waits for the other ranks before failing (a dead rank).
    """
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    if is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend: expected 'nccl', 'gloo' or None, got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout)))
    return True


def _device() -> torch.device:
    """Where collectives' tensors must live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run one collective; a failure (a dead or hung rank, past the timeout) becomes a clear error."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ValueError) as err:
        rank, world = rank_and_world()
        raise RuntimeError(f"torch.distributed: {what} failed on rank {rank} of {world} ({type(err).__name__}: "
                           f"{err}); another rank died or did not answer within the process group's timeout. "
                           "Nothing was written; restart the job (same world size resumes from the "
                           "checkpoints)") from err


def barrier(what: str) -> None:
    if is_initialized():
        _collective(what, dist.barrier)


def all_gather_object(obj: Any, what: str) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    _collective(what, dist.all_gather_object, out, obj)
    return out


def all_reduce_sum(array: np.ndarray, what: str) -> np.ndarray:
    """The float64 sum of ``array`` over all ranks (in place where ``array`` is float64 and
    C-contiguous on the CPU under gloo)."""
    a = np.ascontiguousarray(array, dtype=np.float64)
    if not is_initialized():
        return a
    t = torch.from_numpy(a)
    dev = _device()
    if dev.type != "cpu":
        t = t.to(dev)
    _collective(what, dist.all_reduce, t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy() if dev.type != "cpu" else a


# ============================================================================ shards
def shard_positions(n: int, rank: int, world: int, batch_size: int = 1) -> np.ndarray:
    """The dataset positions rank ``rank`` of ``world`` reads, in whole batches of the
    single-process pass: the batches ``[b·batch_size, (b+1)·batch_size)`` are dealt by
    ``DistributedSampler`` (no shuffling; batch ``b`` to rank ``b mod world``) and its padding
    repeats are dropped. Over all ranks every position in ``range(n)`` appears exactly once,
    and every batch a rank forms (``batch_size`` consecutive entries of the result) is a batch
    of the one-process pass, so each image's descriptor is computed bit for bit as there."""
    for name, v in (("n", n), ("rank", rank), ("world", world), ("batch_size", batch_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"{name}: expected an int, got {describe(v)}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 ≤ rank < world (world ≥ 1), got rank={rank}, world={world}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if world > n:
        raise ValueError(f"world size: {world} processes for a dataset of {n} images; every rank needs at "
                         f"least one image, so run at most {n} processes")
    n_batches = -(-n // batch_size)
    if world > n_batches:
        raise ValueError(f"world size: {world} processes, but the {n} images make only {n_batches} batches of "
                         f"batch_size={batch_size}; every rank needs at least one batch: use batch_size ≤ "
                         f"{n // world} or at most {n_batches} processes")
    sampler = DistributedSampler(range(n_batches), num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    batches = np.fromiter(iter(sampler), dtype=np.int64)
    batches = batches[rank + world * np.arange(len(batches)) < n_batches]  # drop the padding repeats
    if not len(batches):
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(b * batch_size, min(n, (b + 1) * batch_size)) for b in batches])


def merge_topk(tables: Sequence[Mapping[str, torch.Tensor]], k: int, score: str = "score",
               index: str = "index") -> dict[str, torch.Tensor]:
    """Merge top-k tables of the same rows (features) into one: the k best entries of each row
    by ``score`` descending, ties broken by dataset ``index`` ascending (empty slots, index < 0,
    last). Tensors of shape (F, k, …) are reordered along with the scores; any other entry
    (e.g. the channel list) must be equal in every table and is kept."""
    if not tables:
        raise ValueError("tables: expected at least one top-k table")
    first = tables[0]
    out: dict[str, torch.Tensor] = {}
    s = torch.cat([t[score] for t in tables], dim=1).to(torch.float64)
    idx = torch.cat([t[index] for t in tables], dim=1).to(torch.long)
    rows, width = s.shape
    key_s = (-s).numpy().copy()
    key_s[idx.numpy() < 0] = np.inf  # empty slots go last
    key_i = np.where(idx.numpy() < 0, np.iinfo(np.int64).max, idx.numpy())
    order = torch.from_numpy(np.lexsort((key_i, key_s), axis=-1)[:, :k].copy())
    for name, t0 in first.items():
        if t0.dim() >= 2 and t0.shape[1] == first[score].shape[1] and t0.shape[0] == rows:
            cat = torch.cat([t[name] for t in tables], dim=1)
            o = order.reshape(order.shape + (1,) * (cat.dim() - 2)).expand(-1, -1, *cat.shape[2:])
            out[name] = torch.gather(cat, 1, o)
        else:
            for r, t in enumerate(tables[1:], 1):
                if not torch.equal(t[name], t0):
                    raise ValueError(f"tables: entry {name!r} differs between table 0 ({t0.tolist()}) and "
                                     f"table {r} ({t[name].tolist()})")
            out[name] = t0
    return out


# ============================================================================ one rank's pass
def _key_hash(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=10).hexdigest()


class Shard:
    """One process's part of an extraction pass (see the module docstring).

    Built by :meth:`open` inside ``extract_features`` when a process group is initialised or a
    ``checkpoint_dir`` is given; ``loader`` reads the positions not yet done.
    """

    def __init__(self, dataset: Any, rank: int, world: int, positions: np.ndarray, batch_size: int,
                 num_workers: int, pin: bool, key: Mapping[str, Any], checkpoint_dir: Path | None,
                 checkpoint_every: int):
        self.dataset, self.rank, self.world = dataset, rank, world
        self.n = len(dataset)
        self.positions = positions
        self.batch_size = int(batch_size)
        self.key = dict(key)
        self.every = int(checkpoint_every)
        self.batches = 0  # batches done in this shard, the resumed ones included
        self.prefix: dict[str, Any] | None = None
        self.path: Path | None = None
        if checkpoint_dir is not None:
            # the name leaves out the world size, so that checkpoints of another world size are found
            # (and reported); the content key stored inside (world size included) decides a resume
            stem = f"extract-{_key_hash({k: v for k, v in self.key.items() if k != 'world'})}"
            self.path = Path(checkpoint_dir) / f"{stem}-rank{rank}of{world}.pt"
            self._resume(Path(checkpoint_dir), stem)
        start = self.batches * self.batch_size
        self.loader = DataLoader(dataset, batch_size=self.batch_size, sampler=self.positions[start:].tolist(),
                                 num_workers=int(num_workers), pin_memory=pin)

    @classmethod
    def open(cls, data: Any, *, batch_size: int, num_workers: int, pin: bool,
             fingerprint: Callable[[], Mapping[str, Any]], checkpoint_dir: Any = None,
             checkpoint_every: int = 100) -> "Shard | None":
        """The shard of this rank, or None when neither a process group nor checkpoints apply.

        fingerprint: returns what every rank must agree on (model, layers, …; the dataset length
        is added); called only when a shard applies, compared across ranks before any work. Also
        the checkpoints' content key.
        """
        if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir: expected a folder path or None, got {describe(checkpoint_dir)}")
        if not isinstance(checkpoint_every, (int, np.integer)) or isinstance(checkpoint_every, bool) \
                or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every: expected a positive int (batches), got {checkpoint_every!r}")
        if not is_initialized() and checkpoint_dir is None:
            return None
        if isinstance(data, DataLoader) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise TypeError("data: under torch.distributed or with checkpoint_dir, pass a map-style Dataset (each "
                            f"rank builds its own loader over its shard), got {describe(data)}")
        n = len(data)
        rank, world = rank_and_world()
        values = {"dataset length": n, **fingerprint()}
        check_agreement(values)
        positions = shard_positions(n, rank, world, int(batch_size))
        key = {"version": CHECKPOINT_VERSION, **values, "batch_size": int(batch_size), "world": world}
        return cls(data, rank, world, positions, batch_size, num_workers, pin, key, checkpoint_dir,
                   int(checkpoint_every))

    # ---- checkpoints
    def _resume(self, folder: Path, stem: str) -> None:
        if self.path.is_file():
            try:
                ckpt = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - a damaged checkpoint is never trusted
                warnings.warn(f"checkpoint_dir: ignoring unreadable checkpoint {self.path} ({type(err).__name__}: "
                              f"{err}); starting this shard afresh")
                ckpt = None
            if ckpt is not None and ckpt.get("key") == _json_safe(self.key):
                self.prefix = ckpt
                self.batches = int(ckpt["batches"])
                print(f"rank {self.rank}: resuming from {self.path.name} after {self.batches} batches "
                      f"({int(ckpt['labels'].shape[0])} of {len(self.positions)} images)", flush=True)
                return
        others = sorted(p.name for p in folder.glob(f"{stem}-rank*of*.pt") if p != self.path
                        and not p.name.endswith(f"of{self.world}.pt"))
        if others and self.rank == 0:
            warnings.warn(f"checkpoint_dir: found checkpoints of a run with another number of processes "
                          f"({', '.join(others)}); this run has {self.world}, and shards depend on it: "
                          "starting afresh")

    def due(self) -> bool:
        """Count one batch done; True when a checkpoint is due."""
        self.batches += 1
        return self.path is not None and self.batches % self.every == 0

    def save(self, G: np.ndarray | None, S: torch.Tensor | None, labels: Sequence[np.ndarray],
             index: Sequence[np.ndarray], X: np.ndarray | None, widths: Sequence[int] | None,
             gram_dtype: Any, callbacks: Sequence[Any]) -> None:
        """Write this rank's partial sums (the resumed prefix included), atomically."""
        G, S_np, X = self._with_prefix(G, None if S is None else S.cpu().numpy(), X)
        state = {
            "key": _json_safe(self.key), "batches": self.batches,
            "G": torch.from_numpy(np.ascontiguousarray(G)), "S": torch.from_numpy(np.ascontiguousarray(S_np)),
            "labels": torch.from_numpy(np.concatenate(list(labels)).astype(np.int64)),
            "index": torch.from_numpy(np.concatenate(list(index)).astype(np.int64)),
            "X": None if X is None else torch.from_numpy(np.ascontiguousarray(X)),
            "widths": list(widths or []), "gram_dtype": str(gram_dtype),
            "callbacks": [cb.state_dict() for cb in callbacks],
        }
        atomic_torch_save(state, self.path)

    def restore_callbacks(self, callbacks: Sequence[Any]) -> None:
        """Give resumed callbacks their checkpointed states; refuse callbacks that cannot be resumed."""
        if self.path is None:
            return
        bad = [describe(cb) for cb in callbacks if not (hasattr(cb, "state_dict") and hasattr(cb, "load_state_dict"))]
        if bad:
            raise TypeError(f"callbacks: with checkpoint_dir every callback needs state_dict()/load_state_dict() "
                            f"to be resumed (vxnb.interpret.TopPatches has them); got {bad}")
        if self.prefix is not None:
            for cb, state in zip(callbacks, self.prefix["callbacks"]):
                cb.load_state_dict(state)

    def restored(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The labels and indices of the resumed batches (empty lists when not resumed)."""
        if self.prefix is None:
            return [], []
        return [self.prefix["labels"].numpy()], [self.prefix["index"].numpy()]

    @property
    def gram_dtype(self) -> str | None:
        """The G product dtype the resumed part used (None when not resumed)."""
        return None if self.prefix is None else self.prefix["gram_dtype"]

    def _with_prefix(self, G: np.ndarray | None, S: np.ndarray | None, X: np.ndarray | None):
        p = self.prefix
        if p is None:
            return G, S, X
        pG, pS = p["G"].numpy(), p["S"].numpy()
        G = pG.copy() if G is None else G + pG
        if S is None:
            S = pS.copy()
        else:
            rows = max(S.shape[0], pS.shape[0])
            S = _pad_rows(S, rows) + _pad_rows(pS, rows)
        if p["X"] is not None:
            X = p["X"].numpy() if X is None else np.concatenate([p["X"].numpy(), X])
        return G, S, X

    # ---- the end of the pass
    def combine(self, G: np.ndarray | None, S: np.ndarray | None, labels: np.ndarray, index: np.ndarray,
                X: np.ndarray | None, widths: Sequence[int] | None):
        """Add the resumed prefix, then sum over ranks (float64 all-reduce) and gather labels,
        indices (and X) in dataset order. → (G, S, labels, index, X, widths)."""
        if widths is None and self.prefix is not None:
            widths = list(self.prefix["widths"])
        elif self.prefix is not None and list(self.prefix["widths"]) != list(widths):
            raise ValueError(f"checkpoint: channel counts {list(self.prefix['widths'])} in {self.path}, "
                             f"{list(widths)} now; delete the checkpoint")
        if G is None and self.prefix is None:
            raise ValueError("data: no images (the data yielded no non-empty batch)")
        G, S, X = self._with_prefix(G, S, X)
        shapes = all_gather_object((list(widths), S.shape[0], X is not None), "comparing the ranks' shapes")
        if len({tuple(s[0]) for s in shapes}) > 1:
            raise ValueError(f"layers: the ranks found different channel counts {[s[0] for s in shapes]}")
        S = _pad_rows(S, max(s[1] for s in shapes))
        G = all_reduce_sum(G, "the all-reduce of G = XᵀX")
        S = all_reduce_sum(S, "the all-reduce of the class sums XᵀL")
        parts = all_gather_object((labels, index), "gathering labels and indices")
        labels = np.concatenate([p[0] for p in parts])
        index = np.concatenate([p[1] for p in parts])
        order = np.argsort(index, kind="stable")
        if all(s[2] for s in shapes):
            X = np.concatenate(all_gather_object(X, "gathering X"))[order]
        else:
            X = None
        return G, S, labels[order], index[order], X, widths

    def sync(self, callbacks: Sequence[Any]) -> None:
        """Merge the callbacks' per-rank states (``cb.sync_distributed()``) after the pass."""
        if not is_initialized():
            return
        for cb in callbacks:
            sync = getattr(cb, "sync_distributed", None)
            if sync is None:
                raise TypeError(f"callbacks: under torch.distributed every callback needs sync_distributed() "
                                f"to merge the ranks' states (vxnb.interpret.TopPatches has it); got {describe(cb)}")
            sync()

    def decide(self, flag: bool, what: str) -> bool:
        """Rank 0's ``flag``, on every rank."""
        if not is_initialized():
            return flag
        return bool(all_gather_object(bool(flag), what)[0])

    def finish(self) -> None:
        """The result is complete (and cached): drop this rank's checkpoint."""
        barrier("waiting for rank 0 to write the cache")
        if self.path is not None and self.path.exists():
            self.path.unlink()


def check_agreement(values: Mapping[str, Any]) -> None:
    """Refuse ranks that disagree on any of ``values`` (compared with rank 0's), naming both values."""
    gathered = all_gather_object(_json_safe(dict(values)), "comparing the ranks' fingerprints")
    ref = gathered[0]
    for r, got in enumerate(gathered[1:], 1):
        for name in values:  # in the caller's order: the plainest difference first
            if got.get(name) != ref.get(name):
                raise ValueError(f"{name}: rank {r} has {got.get(name)!r}, rank 0 has {ref.get(name)!r}; every rank "
                                 "must run the same model on the same layers and data")


SHARED_PREFIX = ".vxnb-shared-"


def check_shared_folders(folders: Mapping[str, str | os.PathLike]) -> None:
    """Refuse a job whose ranks do not share ``folders`` (name → folder, e.g. ``{"runs_root": …}``).

    The ranks exchange files through these folders: rank 0 trains the model and writes the
    caches, the others read them. On nodes with their own disks a rank would read a stale file
    or, finding none, compute it again itself. So rank 0 writes a file with a fresh random name
    into each folder, every rank looks for it, and unless all see it the job is refused on every
    rank with a RuntimeError naming the ranks, their hosts and the folders. A no-op outside a
    process group."""
    if not is_initialized():
        return
    import socket

    rank, _ = rank_and_world()
    token = os.urandom(8).hex() if rank == 0 else None
    token = all_gather_object(token, "sharing the shared-folder check's token")[0]
    files = {name: Path(folder) / f"{SHARED_PREFIX}{token}" for name, folder in folders.items()}
    if rank == 0:
        for name, file in files.items():
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(token)
    barrier("waiting for rank 0 to write the shared-folder check's files")
    seen = {}
    for name, file in files.items():
        try:
            seen[name] = file.read_text() == token
        except OSError:
            seen[name] = False
    gathered = all_gather_object({"host": socket.gethostname(), "seen": seen}, "checking the shared folders")
    if rank == 0:
        for file in files.values():
            file.unlink(missing_ok=True)
    missing = [(r, g["host"], name) for r, g in enumerate(gathered) for name, ok in g["seen"].items() if not ok]
    if missing:
        where = "; ".join(f"rank {r} on {host} does not see {name} {Path(folders[name])}" for r, host, name in missing)
        raise RuntimeError(
            f"torch.distributed: the ranks do not share their folders ({where}). Rank 0 writes the model and the "
            f"caches into {', '.join(folders)} and the other ranks read them there, so every node needs them on a "
            "filesystem all nodes share (NFS, Lustre, …) at the same path; nothing was computed")


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    if a.shape[0] >= rows:
        return a
    return np.concatenate([a, np.zeros((rows - a.shape[0],) + a.shape[1:], dtype=a.dtype)])
