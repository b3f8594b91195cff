"""Small helpers shared by every module: device choice, seeding, atomic file writes and
argument checks that raise errors naming the argument, what was expected and what came."""
from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

__all__ = [
    "import_object",
    "get_device",
    "seed_everything",
    "atomic_path",
    "fsync_tree",
    "fsync_dir",
    "atomic_write_json",
    "atomic_torch_save",
    "atomic_savez",
    "read_npz",
    "read_json",
    "json_ready",
    "get_module",
    "ForwardHooks",
    "check_layer_names",
    "check_image_batch",
    "all_finite",
    "eval_mode",
    "torch_threads",
    "describe",
    "TERMINAL_PROGRESS_ENV",
    "mirror_progress_to_terminal",
]


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: ``device`` if given, else CUDA when present, else the CPU."""
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from err
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: nn.Module, default: torch.device | None = None) -> torch.device:
    """The device of the model's first parameter or buffer; ``default`` (the CPU if None) for a
    model that has neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return default if default is not None else torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator seeded the same way."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))
    return torch.Generator().manual_seed(int(seed))


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush a file (or every file of a folder, and the folder) to disk, so a rename that follows
    never publishes an empty file after a power loss."""
    path = Path(path)
    files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if path.is_dir():
        for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
            fsync_dir(d)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    An exception (or an interrupted process) leaves ``path`` untouched: a reader never
    sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; the result is an ordinary file
            fsync_tree(tmp_path)  # on disk before the rename: never an empty file after a power loss
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: corrupt JSON file ({err}); delete it to recompute") from err


def json_ready(obj: Any) -> Any:
    """``obj`` as plain JSON data (numpy scalars and arrays, paths converted), as
    :func:`atomic_write_json` would write it."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def read_npz(path: str | os.PathLike, arg: str, what: str, need: Any = ()) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (as :func:`atomic_savez` writes), read without pickles.

    FileNotFoundError when there is no such file; ValueError when it cannot be read or lacks one
    of the names ``need``; each message names ``arg``, the file and ``what`` it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{arg}: no {what} at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as err:  # noqa: BLE001 (zip, OS, format and pickle errors alike)
        raise ValueError(f"{arg}: {path} is not a readable {what} ({err}); delete it to recompute") from err
    missing = sorted(set(need) - set(data))
    if missing:
        raise ValueError(f"{arg}: {path} lacks {missing}; not a {what}")
    return data


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (as in ``model.named_modules()``, found along the path of
    child names; a module shared under two names is found by either); a clear error otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"layer: expected a module name (str), got {type(name).__name__}")
    module: Any = model if name else None
    for part in name.split(".") if name else ():  # the path through the children: no walk over all modules
        module = module._modules.get(part) if isinstance(module, nn.Module) else None
    if isinstance(module, nn.Module) and module is not model:
        return module
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        names = [n for n in modules if n]
        raise ValueError(f"layer: the model has no module {name!r}; it has: {', '.join(names)}")
    return modules[name]


def check_layer_names(model: nn.Module, names: Iterable[str], arg: str = "layers") -> list[str]:
    """Check that every name is a submodule of ``model``; return them as a list."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or n == ""]
    if missing:
        have = [n for n in modules if n]
        raise ValueError(f"{arg}: the model has no module(s) {missing}; it has: {', '.join(have)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{arg}: names must be unique, got {names}")
    return names


def check_image_batch(x: Any, arg: str = "x", channels: int | None = None) -> torch.Tensor:
    """A float tensor of shape (B, C, H, W); ``channels`` checks C when given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg}: expected a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{arg}: expected a floating-point image tensor, got dtype {x.dtype} "
                        "(convert with x.float() / 255 for 8-bit images)")
    if x.dim() != 4:
        raise ValueError(f"{arg}: expected a batched image tensor (B, C, H, W), got shape {tuple(x.shape)}"
                         + (" (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else ""))
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{arg}: the model expects {channels} input channel(s), got {x.shape[1]} "
                         f"(shape {tuple(x.shape)})")
    if not all_finite(x):
        raise ValueError(f"{arg}: contains NaN or inf")
    return x


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite. For a non-empty float tensor: whether its
    minimum and maximum are (``torch.aminmax`` propagates NaN; one pass and no boolean copy,
    ~10x faster than ``torch.isfinite(t).all()`` on the CPU)."""
    if t.numel() == 0 or not t.is_floating_point():
        return bool(torch.isfinite(t).all())
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore each module's mode afterwards.
    A model already in eval mode everywhere is left as it is (``model.eval()`` and the restore
    set each module's flag through ``nn.Module.__setattr__``: about 1 ms for EfficientNet-B0's
    337 modules, paid several times per ``explain``); only flags that changed are restored."""
    modes = {m: m.training for m in model.modules()}
    if any(modes.values()):
        model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            if m.training != mode:
                m.training = mode


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (``torch.set_num_threads``), restored
    afterwards; ``None``: as set. On the CPU, sums inside convolutions and matrix products are
    split by thread, so the same training run gives other weights (by ~1e-7) on another thread
    count: a fixed count makes them the same on every machine."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def describe(x: Any) -> str:
    """A short description of a value for error messages."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"[:200]


#: Set (by ``vxnb.report``) in the environment of the notebook kernels: their progress bars are
#: mirrored as text to the kernel's inherited stderr, the terminal of ``make report``.
TERMINAL_PROGRESS_ENV = "VXNB_TERMINAL_PROGRESS"
#: A mirrored bar that ran at least this long stays in the terminal as a line once finished.
MIRROR_KEEP_SECONDS = 2.0


def _mirrored_tqdm(base: type) -> type:
    """A subclass of ``base`` (a tqdm class) that also draws a text bar on ``sys.__stderr__``."""
    import sys

    from tqdm.std import tqdm as text_tqdm

    class Mirrored(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.disable:  # a disabled bar has no state to mirror
                self._mirror = None
                return
            self._mirror = text_tqdm(total=self.total, desc=f"  {self.desc or 'working'}", file=sys.__stderr__,
                                     leave=True, mininterval=2.0, ascii=True, position=0,
                                     dynamic_ncols=False, ncols=100)

        def update(self, n: float = 1) -> Any:
            out = super().update(n)
            mirror = getattr(self, "_mirror", None)
            if mirror is not None and not mirror.disable:
                mirror.n = self.n
                mirror.total = self.total
                mirror.refresh() if mirror.n >= (mirror.total or 0) else mirror.update(0)
            return out

        def set_postfix(self, *args: Any, **kwargs: Any) -> None:
            super().set_postfix(*args, **kwargs)
            mirror = getattr(self, "_mirror", None)
            if mirror is not None:
                mirror.set_postfix(*args, refresh=False, **{k: v for k, v in kwargs.items() if k != "refresh"})

        def close(self) -> None:
            mirror = getattr(self, "_mirror", None)
            if mirror is not None:
                mirror.n = self.n
                # a bar that ran for a while stays as a line in the terminal's log; short ones vanish
                mirror.leave = mirror._time() - mirror.start_t >= MIRROR_KEEP_SECONDS
                mirror.close()
            super().close()

    Mirrored.__name__ = Mirrored.__qualname__ = f"Mirrored{base.__name__}"
    return Mirrored


def mirror_progress_to_terminal(force: bool = False) -> bool:
    """Where :data:`TERMINAL_PROGRESS_ENV` is set (or ``force``), make the ``tqdm.auto`` bars of
    vxnb also print, as plain text every two seconds, to ``sys.__stderr__`` — in a notebook
    kernel started by the report, the terminal that runs it. Returns whether it did."""
    import sys

    import tqdm.auto

    if not (force or os.environ.get(TERMINAL_PROGRESS_ENV)):
        return False
    base = tqdm.auto.tqdm
    if getattr(base, "_vxnb_mirrored", False):
        return True
    mirrored = _mirrored_tqdm(base)
    mirrored._vxnb_mirrored = True
    tqdm.auto.tqdm = mirrored
    for name, module in list(sys.modules.items()):
        if (name == "vxnb" or name.startswith("vxnb.")) and getattr(module, "tqdm", None) is base:
            module.tqdm = mirrored
    return True


def import_object(spec: Any, arg: str, expected: str = "'package.module:name'") -> Any:
    """The object named by ``"package.module:attr"`` (``attr`` may be dotted); a clear ValueError
    naming ``arg`` when the spec is malformed, the module cannot be imported or has no such attribute."""
    import importlib

    module_name, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module_name or not attr:
        raise ValueError(f"{arg}: expected {expected}, got {describe(spec)}")
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - ImportError, SyntaxError, errors at import time
        raise ValueError(f"{arg}: cannot import {module_name!r} for {spec!r} ({type(err).__name__}: {err}); "
                         "is it on the PYTHONPATH?") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{arg}: {module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


class ForwardHooks:
    """Forward hooks as a context manager: on entry ``self._hook(name)`` is registered on each
    module of ``self.hooked`` (``{name: module}``, set by the subclass's ``__init__``); every hook
    is removed on exit, by :meth:`remove`, and when registering one of them fails."""

    hooked: dict[str, nn.Module]

    def _hook(self, name: str) -> Any:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self) -> Any:
        self._handles = getattr(self, "_handles", [])
        try:
            for n, m in self.hooked.items():
                self._handles.append(m.register_forward_hook(self._hook(n)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []

    def __exit__(self, *exc: Any) -> None:
        self.remove()
