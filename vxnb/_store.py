"""The one artifact store: content keys, atomic writes, a lock per artifact, an index for gc.

Every cached artifact of a run (checkpoint, features, μ-lasso paths, top patches, benchmark
folds, tables) is trusted by its **key** alone, never by the folder it sits in::

    key(kind, settings, inputs, version) = sha256(stable JSON of all four)[:24]

``settings`` are the options that change the result, ``inputs`` the fingerprints of what it was
computed from (the dataset's manifest or file hashes, the upstream artifacts' keys, a model's
weights) and ``version`` the file format. Change any of them and the key, hence the file name,
changes: the old file is never read back for the new setting.

:func:`load_or_compute` is the only way an artifact is read or made:

1. a file under its key is loaded ("hit"); a file that cannot be read (truncated ``.npz``,
   broken JSON) is removed with a warning and recomputed, never raised as ``BadZipFile``;
2. otherwise a file lock per artifact is taken (``filelock``): of two processes that need the
   same artifact one computes, the other waits and then reads what the first wrote;
3. the result is written to a temporary name beside the target and renamed into place (a file
   or a whole directory, e.g. a checkpoint with its metadata), so a reader never sees half of
   it, and an index entry (``<root>/.vxnb-store/index/<key>.json``) records its kind, path,
   settings, inputs and upstream keys, which ``python -m vxnb.studies.runs gc`` uses to find artifacts
   that no current key reaches.

Each hit, miss and save is appended to ``<root>/.vxnb-store/events.log`` (one JSON line:
pid, event, kind, key) so a test can count what was recomputed.

Fault injection (for the kill-safety test only): ``VXNB_FAULT=<point>`` in the environment
makes the process SIGKILL itself the first time it reaches :func:`fault_point` ``(<point>)``.
The points are named where they are called (``render``, ``train``, ``extract``, ``html``,
``benchmark-fold`` and ``save:<kind>`` between writing a temporary file and renaming it).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
import tempfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

__all__ = ["key", "stable_json", "model_fingerprint", "file_fingerprint", "array_fingerprint", "items_fingerprint",
           "store_root",
           "load_or_compute", "try_load", "artifact_lock", "register", "read_index", "log_event", "read_events",
           "fault_point", "gc", "STORE_DIR", "DAMAGED_ERRORS", "TMP_MIN_AGE"]

#: The store's own folder under a root (index, locks, events log).
STORE_DIR = ".vxnb-store"
_KEY_CHARS = 24


# ============================================================================ keys
def _canonical(obj: Any) -> Any:
    """``obj`` as plain JSON data with a stable form (tuples → lists, numpy scalars → Python)."""
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _canonical(obj.tolist())
    if isinstance(obj, (bool, type(None), str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return repr(float(obj))  # repr: the float's exact value; 1 and 1.0 differ on purpose
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"settings/inputs: cannot key a value of type {type(obj).__name__} ({obj!r:.80})")


def stable_json(obj: Any) -> str:
    """The canonical JSON text of ``obj`` (sorted keys, no spaces): equal data, equal text."""
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"))


def key(kind: str, settings: Mapping[str, Any], inputs: Mapping[str, Any] | None = None, version: int = 1) -> str:
    """The content key of an artifact: a hex digest of its kind, settings, input fingerprints and
    format version."""
    if not isinstance(kind, str) or not kind or not kind.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"kind: expected a short name of letters, digits, '-' or '_', got {kind!r}")
    if not isinstance(settings, Mapping):
        raise TypeError(f"settings: expected a dict, got {type(settings).__name__}")
    if inputs is not None and not isinstance(inputs, Mapping):
        raise TypeError(f"inputs: expected a dict of fingerprints or None, got {type(inputs).__name__}")
    if not isinstance(version, (int, np.integer)) or isinstance(version, bool):
        raise TypeError(f"version: expected an int, got {type(version).__name__}")
    text = stable_json({"kind": kind, "settings": settings, "inputs": inputs or {}, "version": int(version)})
    return hashlib.sha256(text.encode()).hexdigest()[:_KEY_CHARS]


def model_fingerprint(model: Any, arch: str | None = None, *, style: str = "store") -> str:
    """A digest of a torch module's state_dict (every entry's name, shape, dtype and bytes, in key
    order), the one home of model fingerprints. Two styles, each kept so that existing keys stay valid:

    ``"store"`` (default; the artifact keys): headed by the class's module and qualname and the
    printed structure; ``_KEY_CHARS`` hex digits.
    ``"model"`` (``vxnb.models.model_fingerprint``: run names, checkpoint meta): headed by
    ``arch``, else the architecture ``build_model`` recorded (``vxnb_arch``), else the class's
    qualname; 16 hex digits. ``arch`` is only read in this style.
    """
    import torch

    if style not in ("store", "model"):
        raise ValueError(f"style: expected 'store' or 'model', got {style!r}")
    h = hashlib.sha256()
    if style == "store":
        h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
        h.update(repr(model).encode())
    else:
        h.update((arch or getattr(model, "vxnb_arch", None) or type(model).__qualname__).encode())
    for name, t in model.state_dict().items():
        a = t.detach().cpu().contiguous()
        entry = f"{name}:{tuple(a.shape)}:{a.dtype}" if style == "store" else f"|{name}|{a.dtype}|{tuple(a.shape)}|"
        h.update(entry.encode())
        if a.numel():
            h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:_KEY_CHARS if style == "store" else 16]


def array_fingerprint(*arrays: Any) -> str:
    """A digest of numpy arrays' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:_KEY_CHARS]


def items_fingerprint(dataset: Any) -> str:
    """A digest of every item of a map-style dataset (tensors, arrays and numbers, by bytes): for
    data that exists only in memory, where no manifest or file names its content."""
    import torch

    h = hashlib.sha256()

    def add(v: Any) -> None:
        if isinstance(v, (tuple, list)):
            h.update(f"[{len(v)}".encode())
            for x in v:
                add(x)
        elif isinstance(v, torch.Tensor):
            add(v.detach().cpu().numpy())
        elif isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(repr(v).encode())

    h.update(f"{type(dataset).__qualname__}:{len(dataset)}".encode())
    for i in range(len(dataset)):
        add(dataset[i])
    return h.hexdigest()[:_KEY_CHARS]


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (remembered per process by path, size and mtime)."""
    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[memo] = h.hexdigest()[:_KEY_CHARS]
    return _FILE_HASHES[memo]


# ============================================================================ fault injection
def fault_point(name: str) -> None:
    """SIGKILL this process when ``VXNB_FAULT`` names this point (the kill-safety test's hook)."""
    if os.environ.get("VXNB_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ============================================================================ root, index, log
def store_root(path: str | os.PathLike) -> Path:
    """The store root an artifact at ``path`` belongs to: the nearest ancestor folder holding
    ``.vxnb-store/`` (a runs folder makes one), else the artifact's own folder."""
    path = Path(path).resolve()
    for folder in list(path.parents)[:4]:
        if (folder / STORE_DIR).is_dir():
            return folder
    return path.parent


def _store_dir(root: Path) -> Path:
    d = root / STORE_DIR
    (d / "index").mkdir(parents=True, exist_ok=True)
    (d / "locks").mkdir(parents=True, exist_ok=True)
    return d


def log_event(root: str | os.PathLike, event: str, kind: str, key_: str) -> None:
    """Append one line to the root's events log (one ``write`` of one short line: lines of
    concurrent processes do not interleave)."""
    line = json.dumps({"t": round(time.time(), 3), "pid": os.getpid(), "event": event, "kind": kind,
                       "key": key_}) + "\n"
    fd = os.open(_store_dir(Path(root)) / "events.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_events(root: str | os.PathLike) -> list[dict]:
    """The events log of a store root as a list of dicts (empty when there is none)."""
    file = Path(root) / STORE_DIR / "events.log"
    if not file.is_file():
        return []
    return [json.loads(l) for l in file.read_text().splitlines() if l.strip()]


def register(root: str | os.PathLike, kind: str, key_: str, path: str | os.PathLike, *,
             settings: Mapping | None = None, inputs: Mapping | None = None, upstream: Iterable[str] = (),
             data: Iterable[Mapping] = (), version: int = 1) -> None:
    """Write the index entry of an artifact (atomically)."""
    from .utils import atomic_write_json

    root = Path(root)
    rel = os.path.relpath(Path(path).resolve(), root.resolve())
    entry = {"kind": kind, "key": key_, "path": rel, "settings": _canonical(settings or {}),
             "inputs": _canonical(inputs or {}), "upstream": sorted(set(upstream)), "data": _canonical(list(data)),
             "version": int(version), "created": time.time()}
    atomic_write_json(entry, _store_dir(root) / "index" / f"{key_}.json")


def read_index(root: str | os.PathLike) -> dict[str, dict]:
    """key → index entry, for every readable entry under ``root`` (a damaged entry is skipped
    with a warning: its artifact then counts as unreachable)."""
    folder = Path(root) / STORE_DIR / "index"
    out = {}
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entry = json.loads(f.read_text())
            out[entry["key"]] = entry
        except (OSError, ValueError, KeyError) as err:
            warnings.warn(f"store index: ignoring damaged entry {f} ({err})")
    return out


@contextlib.contextmanager
def artifact_lock(root: str | os.PathLike, key_: str, timeout: float = -1):
    """A file lock for one artifact (blocking; ``timeout`` in seconds, -1 for none)."""
    from filelock import FileLock

    lock = FileLock(str(_store_dir(Path(root)) / "locks" / f"{key_}.lock"), timeout=timeout)
    with lock:
        yield


# ============================================================================ load or compute
def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


#: What a loader raises on a damaged file (truncated, half-written, not the format it claims):
#: only then is the file removed and recomputed. Anything else (MemoryError, PermissionError, a
#: TypeError or AttributeError from a bug in a loader) propagates and the file stays.
DAMAGED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, EOFError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError, FileNotFoundError,
    IsADirectoryError, NotADirectoryError, zlib.error)


def try_load(path: Path, load: Callable[[Path], Any], kind: str, quiet: bool = False) -> tuple[bool, Any]:
    """``(True, load(path))``, or ``(False, None)`` when there is no file or it is damaged (``load``
    raises one of :data:`DAMAGED_ERRORS`; then it is removed, with a warning unless ``quiet``).
    Any other error propagates and the file is kept."""
    if not path.exists():
        return False, None
    try:
        return True, load(path)
    except DAMAGED_ERRORS as err:  # a damaged file: never trusted
        if not quiet:
            warnings.warn(f"{kind}: {path} is unreadable ({type(err).__name__}: {err}); removing it and recomputing",
                          RuntimeWarning, stacklevel=3)
        _remove(path)
        return False, None


def _put(path: Path, value: Any, save: Callable[[Any, Path], Any], kind: str, directory: bool) -> None:
    """``save(value, tmp)``, flush it to disk, then rename ``tmp`` onto ``path`` (a file or a whole
    folder) and flush the rename."""
    from .utils import fsync_dir, fsync_tree

    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        save(value, tmp)
        if not directory:
            os.chmod(tmp, 0o644)
        fsync_tree(tmp)
        fault_point(f"save:{kind}")
        if directory and path.exists():
            _remove(path)  # a damaged folder under the same key (we hold its lock)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            _remove(tmp)


def load_or_compute(path: str | os.PathLike, key_: str, kind: str, compute: Callable[[], Any], *,
                    load: Callable[[Path], Any], save: Callable[[Any, Path], Any], recompute: bool = False,
                    directory: bool = False, settings: Mapping | None = None, inputs: Mapping | None = None,
                    upstream: Iterable[str] = (), data: Iterable[Mapping] = (), version: int = 1,
                    root: str | os.PathLike | None = None, lock: bool = True,
                    quiet: bool = False) -> tuple[Any, bool]:
    """The artifact at ``path`` (named by its key ``key_``): loaded if there and readable, else
    computed under its lock, written atomically and indexed. Returns ``(value, hit)``.

    ``load(path)`` reads it; ``save(value, tmp)`` writes it to a temporary file (``directory``:
    into a temporary folder) that is then renamed onto ``path``. ``recompute``: ignore a file
    that is there. ``lock=False``: the caller holds the artifact's lock already. ``quiet``: a
    file that ``load`` rejects is replaced without a warning (for outputs overwritten by design,
    such as a table whose content changed).
    """
    path = Path(path)
    root = Path(root) if root is not None else store_root(path)
    if not recompute:
        ok, value = try_load(path, load, kind, quiet)
        if ok:
            log_event(root, "hit", kind, key_)
            return value, True
    with artifact_lock(root, key_) if lock else contextlib.nullcontext():
        if not recompute:  # another process may have made it while we waited
            ok, value = try_load(path, load, kind, quiet)
            if ok:
                log_event(root, "hit", kind, key_)
                return value, True
        log_event(root, "miss", kind, key_)
        value = compute()
        _put(path, value, save, kind, directory)
        register(root, kind, key_, path, settings=settings, inputs=inputs, upstream=upstream, data=data,
                 version=version)
        log_event(root, "save", kind, key_)
    return value, False


# ============================================================================ gc
def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


#: Temporary files younger than this (seconds) may belong to a writer at work: gc leaves them.
TMP_MIN_AGE = 3600.0


def _why_dead(k: str, index: Mapping[str, dict], root: Path, versions: Mapping[str, int],
              data_ok: Callable[[Mapping], bool], memo: dict[str, str | None], seen: frozenset = frozenset()
              ) -> str | None:
    """None when the artifact ``k`` is live, else why it is not (one short sentence)."""
    if k in memo:
        return memo[k]
    e = index.get(k)
    if e is None:
        why = f"upstream artifact {k} is not in the index"
    elif k in seen:
        why = "its upstream artifacts form a cycle"
    elif not (root / e["path"]).exists():
        why = "its file is gone"
    elif versions.get(e["kind"]) != e["version"]:
        cur = versions.get(e["kind"])
        why = (f"format version {e['version']} of {e['kind']!r}, current is {cur}" if cur is not None else
               f"no current vxnb writes artifacts of kind {e['kind']!r}")
    else:
        why = None
        for d in e["data"]:
            if not data_ok(d):
                what = d.get("dataset") or d.get("file") or "its input"
                why = f"its data changed since it was made ({what} no longer has fingerprint {d.get('fingerprint')})"
                break
        if why is None:
            for u in e["upstream"]:
                up = _why_dead(u, index, root, versions, data_ok, memo, seen | {k})
                if up is not None:
                    kind = index.get(u, {}).get("kind", "artifact")
                    why = f"made from {kind} {u}, which is dead ({up})"
                    break
    memo[k] = why
    return why


def gc(root: str | os.PathLike, *, versions: Mapping[str, int], data_ok: Callable[[Mapping], bool],
       legacy: Iterable[str] = (), dry_run: bool = False, tmp_age: float = TMP_MIN_AGE) -> dict[str, Any]:
    """Find (and unless ``dry_run`` remove) what no current key reaches under ``root``.

    An indexed artifact is live when its file is there, its format version is the current one
    (``versions[kind]``), every input it was made from still has the fingerprint it recorded
    (``data_ok(record)``) and every upstream artifact it lists is live. Dead artifacts and their
    index entries are removed, each under its artifact lock (one that is locked, being written
    now, is left alone); also temporary files (``.*.tmp``) older than ``tmp_age`` seconds (younger
    ones may belong to a writer at work) and unindexed files matching the ``legacy`` glob
    patterns (caches of older versions that named files by run) outside live artifacts.

    Returns ``{"removed": [(path, bytes)], "reasons": {path: why}, "busy": [paths left because
    locked], "kept": n live artifacts, "freed": bytes}``.
    """
    from filelock import Timeout

    root = Path(root)
    index = read_index(root)
    memo: dict[str, str | None] = {}
    doomed: dict[Path, tuple[str, str | None]] = {}  # path -> (why, key whose lock guards it)
    live_paths = set()
    for k, e in index.items():
        why = _why_dead(k, index, root, versions, data_ok, memo)
        if why is None:
            live_paths.add((root / e["path"]).resolve())
        else:
            if (root / e["path"]).exists():
                doomed[root / e["path"]] = (f"{e['kind']} {k}: {why}", k)
            doomed[root / STORE_DIR / "index" / f"{k}.json"] = (f"index entry of {e['kind']} {k}: {why}", k)

    def inside_live(p: Path) -> bool:
        p = p.resolve()
        return p in live_paths or any(a in live_paths for a in p.parents)

    now = time.time()
    for p in root.rglob(".*.tmp"):
        if STORE_DIR in p.parts or p in doomed:
            continue
        age = now - p.lstat().st_mtime
        if age >= tmp_age:
            doomed[p] = (f"temporary file of an interrupted writer, {age / 3600:.1f} h old", None)
    def inside_doomed(p: Path) -> bool:  # removed with the dead artifact that holds it
        return p in doomed or any(a in doomed for a in p.parents)

    for pattern in legacy:
        for p in root.rglob(pattern):
            if not inside_doomed(p) and not inside_live(p) and STORE_DIR not in p.parts:
                doomed[p] = ("unkeyed file of an older vxnb version (no index entry)", None)
    removed, reasons, busy = [], {}, []
    for p, (why, k) in doomed.items():
        if not p.exists() and not p.is_symlink():
            continue
        try:
            with artifact_lock(root, k, timeout=0) if k is not None else contextlib.nullcontext():
                size = _size(p)
                if not dry_run:
                    _remove(p)
        except Timeout:
            busy.append(str(p))  # its writer holds the lock: being made right now
            continue
        removed.append((str(p), size))
        reasons[str(p)] = why
    kept = sum(1 for v in memo.values() if v is None)
    return {"removed": removed, "reasons": reasons, "busy": busy, "kept": kept,
            "freed": sum(s for _, s in removed)}
