"""Run folders: the artifacts one notebook hands to the next.

A run is one (dataset, variant, size, seed, training setting). Everything it produces lives
in ``runs/<name>/`` — the checkpoint with its ``meta.json`` (``checkpoint-<key>/``), the
feature statistics (``features/features-<key>.npz``), the μ-lasso paths
(``lasso-<tag>-mu<μ>-<key>.npz``), benchmark folds and result tables — so each notebook can
run on its own once its inputs exist, and nothing passes through hidden global state.

The folder name is for people. Every artifact goes through :mod:`vxnb._store`: it is read back
only under its content key (its settings, the fingerprints of its inputs — the dataset's
manifest or file hashes, the upstream artifacts' keys — and its format version), computed by
one process at a time under a file lock, written atomically and indexed, so
``vxnb gc`` (:mod:`vxnb.studies.gc`) can remove what no current key reaches.

>>> cfg = RunConfig(dataset="an8flower", variant="single-6c", size=128)
>>> model, meta = get_model(cfg)          # trains once, then loads the checkpoint
>>> feats = get_features(cfg, model)      # X, XᵀX, XᵀL on the training split
>>> path = get_lasso_path(cfg, feats)     # W for any μ, instantly: path.coef(10.0)
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .. import _store
from .._checks import check_int, check_path, check_positive_int
from ..data.an8flower.render import Knobs, check_variant
from ..paths import work_dir
from ..utils import atomic_write_json, read_json, seed_everything
from .datasets import DATASET_SPECS, DatasetSpec, dataset_spec, user_model

__all__ = ["RunConfig", "DATASETS", "load_data", "get_model", "get_features", "get_lasso_path",
           "run_dir", "user_model", "gram_memory_check", "feature_count", "describe_model",
           "data_record", "split_key", "checkpoint_key", "checkpoint_dir", "train_models", "default_train_workers",
           "save_table", "table_key", "data_ok",
           "ARTIFACT_VERSIONS", "register_artifact", "artifact_versions"]

#: Format versions of the artifacts this module writes (part of their keys).
CHECKPOINT_VERSION = 2
TABLE_VERSION = 1

#: The current format version of every artifact kind the studies write, by kind. A study adds
#: its kinds with :func:`register_artifact` when it is imported; :func:`vxnb.studies.gc.gc`
#: reads this (an artifact of a kind not registered here is judged dead).
ARTIFACT_VERSIONS: dict[str, int] = {}


def register_artifact(kind: str, version: int) -> None:
    """Declare that the studies write artifacts of ``kind`` in format ``version`` (gc keeps them)."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind: expected a non-empty artifact kind name, got {kind!r}")
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"version: expected an int format version, got {version!r}")
    old = ARTIFACT_VERSIONS.get(kind)
    if old is not None and old != version:
        raise ValueError(f"kind: {kind!r} is already registered with version {old}, got {version}")
    ARTIFACT_VERSIONS[kind] = version


register_artifact("checkpoint", CHECKPOINT_VERSION)
register_artifact("user-model", CHECKPOINT_VERSION)
register_artifact("table", TABLE_VERSION)


def artifact_versions() -> dict[str, int]:
    """Every kind's current format version: those of the layers below (features, μ-lasso paths,
    top patches; imported here, on demand) and the registered ones (:data:`ARTIFACT_VERSIONS`)."""
    from ..features import FORMAT_VERSION
    from ..interpret import TOP_PATCHES_VERSION
    from ..lasso import PATH_FORMAT_VERSION

    return {"features": FORMAT_VERSION, "lasso-path": PATH_FORMAT_VERSION, "top-patches": TOP_PATCHES_VERSION,
            **ARTIFACT_VERSIONS}

#: The datasets shipped with vxnb; ``vxnb.studies.datasets.DATASET_SPECS`` also holds those added since.
DATASETS = tuple(DATASET_SPECS)
#: The quick (CI) setting: image size and number of training images.
QUICK_SIZE = 64
QUICK_TRAIN_LIMIT = 1200
#: A reference model whose final training accuracy stays below this has stalled (a plateau
#: where it tells only some classes apart); it is trained again from another initialisation,
#: at most TRAIN_ATTEMPTS times in all. Working reference models reach 0.9-1.0, even quick ones.
MIN_TRAIN_ACCURACY = 0.5
TRAIN_ATTEMPTS = 3
#: Runs of fewer epochs are not retried: a low accuracy there is under-training, not a stall.
MIN_EPOCHS_TO_RETRY = 3
#: Torch threads a reference model trains with (in its checkpoint key): on the CPU the weights
#: depend on the thread count, so one count gives the same model on every machine, in-process
#: or in any worker of :func:`train_models` (issue 26).
TRAIN_THREADS = 1
#: The most worker processes :func:`train_models` starts by default.
MAX_TRAIN_WORKERS = 8


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass
class RunConfig:
    """What a run is made of. ``quick=True`` is the small setting CI uses.

    dataset: "an8flower" (the embedded default), "mnist" or "folder" (your images and model).
    variant: the an8Flower variant ("single-6c", "double-12c", "part-2c"); ignored otherwise.
    size: an8Flower image size in pixels (MNIST is always 28; a folder run uses ``image_size``).
    epochs: training epochs (None: the model's default for the dataset and mode).
    test_fold: the an8Flower fold held out for testing (folds are grouped by viewpoint).
    folds: how an8Flower's viewpoints form folds: "views" (interleaved, ``view % 5``) or
        "blocks" (eight neighbouring views per fold); see ``vxnb.data.an8flower.fold_of_view``.
    train_limit: use at most this many training images (None: all) — the quick setting.
    seed: seeds rendering, splitting, training and random baselines.
    data_root: an8Flower/MNIST: where generated data is cached (default: data/ in the working
        folder, ``$VXNB_HOME`` or the current directory; see ``vxnb.paths``);
        folder: the image folder (``train/`` + ``val/`` or ``test/``, or one class-per-folder
        tree split by ``seed`` with ``val_fraction`` held out).
    runs_root: where run folders live (default: runs/ in the working folder).

    Folder runs only (``vxnb.data.folder``, ``vxnb.models.load_user_model``):
    mask_root: optional masks mirroring ``data_root``. class_names: optional JSON file of
    display names. image_size: short side resize, then centre crop (default 224). normalize:
    the model's input normalisation, "imagenet" (default), [mean, std] or "none". val_fraction:
    held out when ``data_root`` is not split. on_error: "raise" or "skip" unreadable images.
    model: a torchvision architecture name or "package.module:factory"; weights: its local
    weights file. The model is never trained or modified; the run is keyed by its fingerprint.
    trust_weights: read a weights file that needs full unpickling (a whole pickled model, which
    can run code); default False, such a file is refused.

    an8Flower runs only (the renderer's difficulty knobs, ``vxnb.data.an8flower.Knobs``; the
    defaults draw the paper's images and add nothing to keys or names): part_scale (0.5 to 1.5,
    size of the class-defining parts), distractor_rate (0 to 1, the fraction of images with a
    ball of their class colour elsewhere: a planted shortcut), clutter (0 to 20 neutral
    background balls). Non-default knobs are in the data record, the checkpoint's key and the
    run name (e.g. ``-dr0.5``).

    Every run: layers ("blocks": block outputs of residual networks, else every conv/FC block;
    "all": every conv/FC block; a list of names or glob patterns like "layer4.*") and
    batch_size (of feature extraction).
    """

    dataset: str = "an8flower"
    variant: str = "single-6c"
    size: int = 128
    epochs: int | None = None
    test_fold: int = 0
    folds: str = "views"
    train_limit: int | None = None
    seed: int = 0
    quick: bool = False
    data_root: str | None = None
    runs_root: str | None = None
    name: str | None = None
    mask_root: str | None = None
    class_names: str | None = None
    image_size: int = 224
    normalize: Any = "imagenet"
    val_fraction: float = 0.2
    on_error: str = "raise"
    model: str | None = None
    weights: str | None = None
    trust_weights: bool = False
    layers: Any = "blocks"
    batch_size: int = 64
    part_scale: float = 1.0
    distractor_rate: float = 0.0
    clutter: int = 0

    def __post_init__(self) -> None:
        spec = dataset_spec(self.dataset)
        check_variant(self.variant)
        if not _is_int(self.size):
            raise ValueError(f"size: expected an int (image size in pixels), got {self.size!r}")
        spec.check(self)
        if not spec.has_knobs:  # the knobs' defaults are the renderer's (Knobs), named once there
            for arg, default in ((f.name, f.default) for f in dataclasses.fields(Knobs)):
                if getattr(self, arg) != default or isinstance(getattr(self, arg), bool):
                    raise ValueError(f"{arg}: a renderer knob of an8Flower; dataset {self.dataset!r} is not rendered, "
                                     f"expected the default {default!r}, got {getattr(self, arg)!r}")
        check_int(self.test_fold, "test_fold", 0, 4)
        check_int(self.seed, "seed", 0)
        if self.folds not in ("views", "blocks"):
            raise ValueError(f"folds: expected one of 'views', 'blocks', got {self.folds!r}")
        check_positive_int(self.epochs, "epochs", allow_none=True)
        if self.train_limit is not None:
            check_int(self.train_limit, "train_limit", 1, None, "or None (all images)")
        for arg in ("quick", "trust_weights"):
            if not isinstance(getattr(self, arg), bool):
                raise TypeError(f"{arg}: expected a bool, got {type(getattr(self, arg)).__name__} "
                                f"{getattr(self, arg)!r}")
        for arg in ("data_root", "runs_root"):
            value = getattr(self, arg)
            check_path(value, arg, allow_none=True)
        if self.name is not None and (not isinstance(self.name, str) or not self.name or "/" in self.name
                                      or self.name.startswith(".")):
            raise ValueError(f"name: expected a folder name without '/' or a leading '.', or None, got {self.name!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {self.batch_size!r}")
        if not (isinstance(self.layers, str) and self.layers or isinstance(self.layers, (list, tuple)) and self.layers
                and all(isinstance(n, str) and n for n in self.layers)):
            raise ValueError(f"layers: expected 'blocks', 'all', a module name, a glob pattern or a list of them, "
                             f"got {self.layers!r}")

    @classmethod
    def from_params(cls, quick: bool = False, **params: Any) -> "RunConfig":
        """The notebooks' parameters → a config; ``quick`` shrinks size and data for CI (a folder
        run keeps its ``image_size``, which its model was trained for)."""
        params = {k: v for k, v in params.items() if v is not None}
        if quick:  # the CI setting overrides size and data volume, whatever the full setting says
            if getattr(DATASET_SPECS.get(params.get("dataset", cls.dataset)), "quick_resizes", True):
                params["size"] = min(int(params.get("size", QUICK_SIZE)), QUICK_SIZE)
            params["train_limit"] = min(int(params.get("train_limit", QUICK_TRAIN_LIMIT)), QUICK_TRAIN_LIMIT)
        return cls(quick=quick, **params)

    @classmethod
    def from_namespace(cls, namespace: dict[str, Any]) -> "RunConfig":
        """A notebook's config from its parameters (``RunConfig.from_namespace(globals())``): the
        names of the namespace that are fields of RunConfig, and ``quick``."""
        fields = set(cls.__dataclass_fields__) - {"quick"}
        return cls.from_params(quick=bool(namespace.get("quick", False)),
                               **{k: v for k, v in namespace.items() if k in fields})

    @property
    def spec(self) -> DatasetSpec:
        """The run's dataset (``vxnb.studies.datasets``)."""
        return DATASET_SPECS[self.dataset]

    @property
    def has_masks(self) -> bool:
        """Whether the run's images have ground-truth masks (an8Flower, or a folder with ``mask_root``)."""
        return self.spec.has_masks(self)

    @property
    def model_fingerprint(self) -> str | None:
        """A folder run: the fingerprint of the user's model (``vxnb.models.model_fingerprint``),
        computed once per config; None for the reference models (their checkpoints are keyed)."""
        if self.spec.reference_model is not None:
            return None
        if "_fingerprint" not in self.__dict__:
            self.__dict__["_fingerprint"] = user_model(self).vxnb_fingerprint
        return self.__dict__["_fingerprint"]

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        base = self.spec.run_name(self)
        tag = "-quick" if self.quick else ""
        # settings that change the trained model are part of the name, so a run folder never
        # hands one setting's checkpoint to another
        if self.epochs is not None:
            tag += f"-e{self.epochs}"
        if self.train_limit is not None and not (self.quick and self.train_limit == QUICK_TRAIN_LIMIT):
            tag += f"-n{self.train_limit}"
        return f"{base}-seed{self.seed}{tag}"

    @property
    def data_dir(self) -> Path:
        return Path(self.data_root) if self.data_root else work_dir("data")

    @property
    def runs_dir(self) -> Path:
        return Path(self.runs_root) if self.runs_root else work_dir("runs")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_dir(cfg: RunConfig) -> Path:
    """``runs_root/<run name>/`` (made if missing; the runs root gets its artifact index)."""
    path = cfg.runs_dir / cfg.run_name
    path.mkdir(parents=True, exist_ok=True)
    (cfg.runs_dir / _store.STORE_DIR).mkdir(exist_ok=True)
    return path


# ---------------------------------------------------------------------------- content keys
def _data_spec(cfg: RunConfig) -> dict[str, Any]:
    return {"dataset": cfg.dataset, "root": str(cfg.data_dir.resolve()), **cfg.spec.data_spec(cfg)}


def _data_fingerprint(spec: dict[str, Any]) -> str | None:
    """The fingerprint of the data a spec names as it is on disk now; None when it is not there
    (or its dataset is unknown): ``DatasetSpec.fingerprint``."""
    dataset = DATASET_SPECS.get(spec["dataset"])
    return None if dataset is None else dataset.fingerprint(spec)


def data_record(cfg: RunConfig) -> dict[str, Any]:
    """What a run's dataset is, with the fingerprint of its files as they are now (the data is
    rendered or fetched first when missing)."""
    spec = _data_spec(cfg)
    fp = _data_fingerprint(spec)
    if fp is None:
        load_data(cfg, progress=False)
        fp = _data_fingerprint(spec)
    if fp is None:
        raise RuntimeError(f"data: no {cfg.dataset} data under {cfg.data_dir} after preparing it")
    return {**spec, "fingerprint": fp}


def _data_record_now(cfg: RunConfig) -> dict[str, Any]:
    """The data record as the files are now, without rendering or fetching (fingerprint None
    when the data is not there)."""
    spec = _data_spec(cfg)
    return {**spec, "fingerprint": _data_fingerprint(spec)}


def data_ok(record: dict[str, Any]) -> bool:
    """Whether the input a stored record describes still has the fingerprint it recorded: a
    dataset (a :func:`data_record`) or a file (``{"file": path, "fingerprint": …}``, e.g. a
    user's weights)."""
    try:
        if "file" in record:
            return Path(record["file"]).is_file() and _store.file_fingerprint(record["file"]) == record["fingerprint"]
        spec = {k: v for k, v in record.items() if k != "fingerprint"}  # the spec as it was fingerprinted
        return _data_fingerprint(spec) == record.get("fingerprint")
    except (OSError, ValueError, KeyError):
        return False


def split_key(cfg: RunConfig, split: str, dataset: Any) -> str:
    """The content key of a split: the fingerprint of the run's dataset on disk (its manifest or
    files' hashes) and the split's image indices; for a dataset that is not on disk (built in
    memory), the bytes of every item of the split."""
    indices = np.asarray(getattr(dataset, "indices", np.arange(len(dataset))), dtype=np.int64)
    fp = _data_record_now(cfg)["fingerprint"]
    if fp is None:
        fp = _store.items_fingerprint(dataset)
    return _store.key("split", {"split": split}, {"data": fp, "indices": _store.array_fingerprint(indices)})


def _checkpoint_settings(cfg: RunConfig) -> dict[str, Any]:
    s = {"dataset": cfg.dataset, "seed": cfg.seed, "train_limit": cfg.train_limit,
         "epochs": cfg.spec.epochs(cfg),
         "min_train_accuracy": MIN_TRAIN_ACCURACY, "train_attempts": TRAIN_ATTEMPTS, "train_threads": TRAIN_THREADS}
    s.update(cfg.spec.checkpoint_settings(cfg))
    options = cfg.spec.train_options(cfg)
    if options:  # only where a dataset has them: the other datasets' keys stay as they were
        s["train_options"] = options
    return s


def checkpoint_key(cfg: RunConfig) -> str:
    """The content key of a run's trained model: its training settings and its data; for a
    folder run, the user's model (architecture and the fingerprint of its weights) and the data."""
    if cfg.spec.reference_model is None:
        model = user_model(cfg)
        return _store.key("user-model", {"model": cfg.model, "normalize": cfg.normalize},
                          {"weights": model.vxnb_fingerprint, "data": data_record(cfg)["fingerprint"]},
                          CHECKPOINT_VERSION)
    return _store.key("checkpoint", _checkpoint_settings(cfg), {"data": data_record(cfg)["fingerprint"]},
                      CHECKPOINT_VERSION)


def checkpoint_dir(cfg: RunConfig) -> Path:
    """The folder of a run's checkpoint (``model.pt`` + ``meta.json``, renamed into place as one)."""
    return run_dir(cfg) / f"checkpoint-{checkpoint_key(cfg)}"


# ---------------------------------------------------------------------------- data
def load_data(cfg: RunConfig, progress: bool = True) -> tuple[Dataset, Dataset, list[str]]:
    """The (train, test) datasets and the class names of a run (``DatasetSpec.load``).

    an8Flower: test = the held-out fold (grouped by viewpoint), train = the other four.
    MNIST: the fixed stratified 80/20 split of the digits found under ``data/``.
    ``train_limit`` keeps a seeded, class-stratified subset of the training split.
    """
    return cfg.spec.load(cfg)


# ---------------------------------------------------------------------------- model
def get_model(cfg: RunConfig, *, retrain: bool = False, progress: bool = True,
              data: tuple[Dataset, Dataset, list[str]] | None = None):
    """Load the run's checkpoint, or train the reference model and save it. → (model, meta).

    The initial weights are seeded by ``cfg.seed``. A training run of ≥ 3 epochs that stalls
    (final validation accuracy, else training accuracy, < :data:`MIN_TRAIN_ACCURACY`) is repeated from seed + 1000, + 2000
    with a warning, and the best attempt is kept; ``meta["train_attempts"]`` lists them all."""
    from .. import models

    if cfg.spec.reference_model is None:
        return _user_model_and_meta(cfg, data)
    record = data_record(cfg)
    ckey = checkpoint_key(cfg)
    folder = checkpoint_dir(cfg)

    def train_and_save():
        return _train(cfg, data if data is not None else load_data(cfg, progress=progress), progress)

    (model, meta), hit = _store.load_or_compute(
        folder, ckey, "checkpoint", train_and_save, load=models.load_checkpoint,
        save=lambda mm, tmp: models.save_checkpoint(tmp, mm[0], mm[1]), directory=True, recompute=retrain,
        settings=_checkpoint_settings(cfg), inputs={"data": record["fingerprint"]}, data=[record],
        version=CHECKPOINT_VERSION, root=cfg.runs_dir)
    return (model, meta) if hit else models.load_checkpoint(folder)  # fresh: as a later load gives it


def _train(cfg: RunConfig, data, progress: bool):
    from .. import models

    train, test, classes = data
    epochs = cfg.spec.epochs(cfg)
    attempts: list[dict[str, Any]] = []
    best = None
    for attempt in range(TRAIN_ATTEMPTS):
        seed = cfg.seed + 1000 * attempt
        seed_everything(seed)  # the initial weights too: the same config gives the same model
        model = cfg.spec.build_reference_model(cfg, classes)
        history = models.train_model(model, train, test, epochs=epochs, seed=seed, progress=progress,
                                     **{"threads": TRAIN_THREADS, **cfg.spec.train_options(cfg)})
        # a stall: by the held-out validation images where there are some (a run stopped after its
        # first epoch has a low accuracy on that epoch's dropout pass and may still be right)
        acc = (history.get("val_accuracy") or history["train_accuracy"])[-1]
        attempts.append({"seed": seed, "train_accuracy": history["train_accuracy"][-1],
                         "val_accuracy": (history.get("val_accuracy") or [None])[-1],
                         "test_accuracy": history.get("final_test_accuracy")})
        if best is None or acc > best[3]:
            best = (seed, model, history, acc)
        if acc >= MIN_TRAIN_ACCURACY or epochs < MIN_EPOCHS_TO_RETRY:
            break
        which = "validation" if history.get("val_accuracy") else "train"
        warnings.warn(f"training {cfg.run_name} with seed {seed} stalled at {which} accuracy {acc:.3f} "
                      f"(< {MIN_TRAIN_ACCURACY}); " + ("starting again from another initialisation"
                                                       if attempt + 1 < TRAIN_ATTEMPTS else
                                                       f"keeping the best of {TRAIN_ATTEMPTS} attempts"))
    seed, model, history, _ = best
    model.eval()
    meta = {
        "config": cfg.to_dict(),
        "classes": classes,
        "epochs": epochs,
        "history": history,
        "test_accuracy": history.get("final_test_accuracy"),
        "n_train": len(train),
        "n_test": len(test),
        "train_attempts": attempts,
    }
    return model, meta


def default_train_workers(configs: list[RunConfig]) -> int:
    """How many worker processes :func:`train_models` starts for ``configs`` (the models it will
    train) by default: one per usable CPU core, at most :data:`MAX_TRAIN_WORKERS` and one per model;
    1 (in-process) for one model or for quick (CI) models, which train in less time than a worker
    takes to start."""
    if len(configs) <= 1 or all(cfg.quick for cfg in configs):
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(len(configs), cores, MAX_TRAIN_WORKERS))


def _train_in_worker(cfg: RunConfig) -> None:
    """A worker's job: the run's checkpoint, trained and written as :func:`get_model` does it."""
    get_model(cfg, progress=False)


def _init_worker(parent: int) -> None:
    torch.set_num_threads(TRAIN_THREADS)  # the reading and checks around training too: one core each
    import threading

    def watch() -> None:  # the parent died (killed, its kernel restarted): stop, leaving no orphan training
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def train_models(configs: Any, *, workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the reference models of ``configs`` (RunConfigs) whose checkpoints are not there yet,
    ``workers`` at a time, each in its own process with :data:`TRAIN_THREADS` torch thread(s),
    and write each checkpoint as :func:`get_model` does (atomically, under its content key).

    Every model trains with the same thread count wherever it trains, so the weights are the same
    bit for bit for any ``workers`` (``workers`` is in no key). On a few cores, small convolutions
    at batch 32 use a second thread poorly: two one-thread workers train about twice the models
    per second that one two-thread process does.

    Args:
        configs: the runs (e.g. the benchmark's folds); configs of the same checkpoint are trained
            once; a folder run (the user's model) is never trained and is skipped.
        workers: processes at a time (``spawn`` context, so it also runs from a notebook kernel;
            a script that calls it needs Python's usual ``if __name__ == "__main__":`` guard);
            1: in this process, one model after the other; None: :func:`default_train_workers`.
        progress: a ``tqdm.auto`` bar over the models.

    Returns ``{"trained": [run names], "workers": n, "seconds": wall-clock}``. A model whose
    training fails (an error, or its worker killed) is named in the RuntimeError raised after the
    other models finished; nothing of it is written (a checkpoint is renamed into place only
    when complete), and the models that finished keep their checkpoints.
    """
    if isinstance(configs, RunConfig) or not hasattr(configs, "__iter__"):
        raise TypeError(f"configs: expected a sequence of RunConfig, got {type(configs).__name__}")
    configs = list(configs)
    for i, cfg in enumerate(configs):
        if not isinstance(cfg, RunConfig):
            raise TypeError(f"configs[{i}]: expected a RunConfig, got {type(cfg).__name__}")
    if workers is not None:
        workers = check_int(workers, "workers", 1, None, "or None (one per CPU core)")
    start = time.perf_counter()
    todo: dict[str, RunConfig] = {}
    for cfg in configs:  # data rendered here first (by the key), so no two workers render the same images
        if cfg.spec.reference_model is not None and not checkpoint_dir(cfg).exists():
            todo.setdefault(checkpoint_key(cfg), cfg)
    jobs = list(todo.values())
    n = default_train_workers(jobs) if workers is None else min(workers, max(1, len(jobs)))
    bar = tqdm(total=len(jobs), desc=f"training {len(jobs)} models ({n} at a time)",
               disable=None if progress and jobs else True)
    failed: list[tuple[str, BaseException]] = []
    try:
        if n == 1:
            for cfg in jobs:
                try:
                    get_model(cfg, progress=False)
                except Exception as err:  # noqa: BLE001 - named below, with the others
                    failed.append((cfg.run_name, err))
                bar.update(1)
        else:
            failed = _train_in_pool(jobs, n, bar)
    finally:
        bar.close()
    if failed:
        names = ", ".join(f"{name} ({type(err).__name__}: {err})" for name, err in failed)
        raise RuntimeError(f"training failed for {len(failed)} of {len(jobs)} models: {names}; nothing of theirs "
                           "was written (the others' checkpoints are kept)") from failed[0][1]
    return {"trained": [cfg.run_name for cfg in jobs], "workers": n, "seconds": time.perf_counter() - start}


def _train_in_pool(jobs: list[RunConfig], workers: int, bar: Any) -> list[tuple[str, BaseException]]:
    """Train ``jobs`` in ``workers`` spawned processes; the (run name, error) of each that failed."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    failed: list[tuple[str, BaseException]] = []
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(os.getpid(),))
    try:
        futures = {pool.submit(_train_in_worker, cfg): cfg for cfg in jobs}
        for fut in as_completed(futures):
            try:
                fut.result()
            except Exception as err:  # noqa: BLE001 - a worker's error or its death (BrokenProcessPool)
                failed.append((futures[fut].run_name, err))
            bar.update(1)
    except BaseException:  # interrupted (KeyboardInterrupt): start no more models
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return failed


def describe_model(meta: dict[str, Any], accuracy: float, n_test: int) -> str:
    """One sentence on a run's model and its accuracy on the held-out split."""
    if meta.get("trained_here") is False:
        return (f"your {meta.get('arch')} (fingerprint {meta.get('fingerprint')}, used as it is, never trained "
                f"here): accuracy {accuracy:.2%} on the {n_test} validation images")
    return f"test accuracy {accuracy:.2%} on {n_test} held-out images; {meta.get('epochs')} epochs"


def _user_model_and_meta(cfg: RunConfig, data) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The user's model and its record ``user-model-<key>.json`` (accuracy on the validation
    split), made through the store under the run's checkpoint key, so that gc sees the user's
    model as a live artifact (with its data and weights file as inputs) and keeps what hangs
    from it."""
    from ..models import accuracy

    model = user_model(cfg)
    record = data_record(cfg)
    ckey = checkpoint_key(cfg)
    inputs_ = [record]
    if cfg.weights is not None:
        inputs_.append({"file": str(Path(cfg.weights).resolve()), "fingerprint": _store.file_fingerprint(cfg.weights)})

    file = cfg.runs_dir / cfg.run_name / f"user-model-{ckey}.json"
    if data is None and not file.exists():
        data = load_data(cfg)  # checked before anything is written (a bad folder leaves no run folder)

    def compute() -> dict[str, Any]:
        train, test, classes = data if data is not None else load_data(cfg)
        return {"config": cfg.to_dict(), "classes": classes, "arch": model.vxnb_arch,
                "fingerprint": model.vxnb_fingerprint, "trained_here": False, "n_train": len(train),
                "n_test": len(test), "test_accuracy": accuracy(model, test, batch_size=cfg.batch_size)}

    def load(path: Path) -> dict[str, Any]:
        meta = read_json(path)
        if meta.get("fingerprint") != model.vxnb_fingerprint:
            raise ValueError(f"it describes the model {meta.get('fingerprint')}, not {model.vxnb_fingerprint}")
        return meta

    meta, _ = _store.load_or_compute(
        file, ckey, "user-model", compute, load=load,
        save=lambda m, tmp: atomic_write_json(m, tmp), settings={"model": cfg.model, "normalize": cfg.normalize},
        inputs={"weights": model.vxnb_fingerprint, "data": record["fingerprint"]}, data=inputs_,
        version=CHECKPOINT_VERSION, root=cfg.runs_dir)
    return model, meta


# ---------------------------------------------------------------------------- features
def gram_memory_check(m: int, device: torch.device | str = "cpu", *, available: int | None = None,
                      verbose: bool = True) -> int:
    """Print m and the memory G = XᵀX takes (m²·8 bytes), and refuse (ValueError naming
    ``layers``) when twice that (G and the copy the lasso solves on) exceeds the available
    memory (MemAvailable of /proc/meminfo, or the free memory of a CUDA device). Returns the bytes of G."""
    need = int(m) ** 2 * 8
    if available is None:
        available = _available_memory(torch.device(device))
    gib = 2 ** 30
    if verbose:
        print(f"features: m = {m}; G = XᵀX takes {need / gib:.2f} GiB"
              + (f" ({available / gib:.1f} GiB available)" if available else ""), flush=True)
    if available and 2 * need > available:
        raise ValueError(f"layers: m = {m} features need {need / gib:.1f} GiB for G = XᵀX (twice that while "
                         f"solving), more than the {available / gib:.1f} GiB available; describe fewer layers, e.g. "
                         "layers='layer4.*' or a list of module names")
    return need


def feature_count(model: torch.nn.Module, layers: list[str], shape: tuple[int, ...]) -> int:
    """m, the channels of ``layers`` summed, from a forward pass of a copy of the model on the
    meta device (shapes only: no computation, the model itself untouched); a one-image pass
    of the model where an operation has no meta implementation."""
    import copy

    from ..features import descriptors
    from ..features.hooks import layout

    try:
        probe = copy.deepcopy(model).to("meta")
        modules = dict(probe.named_modules())
        widths: dict[str, int] = {}

        kinds = {n: layout(model, n)[0] for n in layers}

        def hook(name: str):
            def fn(module, inputs, output):
                out = output[0] if isinstance(output, (tuple, list)) else output
                if out.dim() >= 3 and kinds[name] in ("last", "tokens?"):  # tokens (B, T, D) / (B, H, W, C)
                    widths.setdefault(name, int(out.shape[-1]))
                else:
                    widths.setdefault(name, int(out.shape[1]) if out.dim() > 1 else 1)
            return fn

        handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
        with torch.no_grad():
            probe.eval()(torch.zeros((1,) + shape, device="meta"))
        for h in handles:
            h.remove()
        return sum(widths[n] for n in layers)
    except Exception:  # noqa: BLE001 - an operation without a meta kernel: count on one real image
        return int(descriptors(model, torch.zeros((1,) + shape), layers).shape[1])


def _available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def get_features(cfg: RunConfig, model: torch.nn.Module, split: str = "train", *, only_conv: bool = False,
                 data: tuple[Dataset, Dataset, list[str]] | None = None, progress: bool = True, **kwargs):
    """Filter-wise responses of a split (cached in the run folder by ``vxnb.features``)."""
    from ..features import extract_features, select_layers
    from ..utils import model_device

    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    train, test, classes = data if data is not None else load_data(cfg, progress=progress)
    dataset = train if split == "train" else test
    if "layers" not in kwargs:
        kwargs["layers"] = select_layers(model, cfg.layers, only_conv)
        only_conv = False
    kwargs.setdefault("batch_size", cfg.batch_size)
    m = feature_count(model, kwargs["layers"], tuple(dataset[0][0].shape))
    gram_memory_check(m, kwargs.get("device") or model_device(model), verbose=progress)
    feats = extract_features(model, dataset, only_conv=only_conv, n_classes=len(classes),
                             cache_dir=run_dir(cfg) / "features", data_key=split_key(cfg, split, dataset),
                             progress=progress, **kwargs)
    fkey = feats.meta.get("store_key")
    if fkey:  # index it with the dataset it came from, so gc drops it when the data changes
        from ..features import FORMAT_VERSION

        _store.register(cfg.runs_dir, "features", fkey, run_dir(cfg) / "features" / f"features-{fkey}.npz",
                        settings=feats.meta.get("key") or {}, data=[_data_record_now(cfg)], version=FORMAT_VERSION)
    return feats


def get_lasso_path(cfg: RunConfig, features, *, mu_max: float = 50.0, tag: str | None = None):
    """The μ-lasso path of every class up to ``mu_max``, cached as
    ``lasso-<tag>-mu<mu_max>-<key>.npz``; the key holds the settings and a fingerprint of the
    statistics it was solved from (XᵀL and XᵀX), so a retrained model never reads another's
    path. A damaged file is recomputed with a warning."""
    from ..lasso import PATH_FORMAT_VERSION, LassoPath, lasso_path

    tag = tag or ("conv" if all(k == "conv" for k in features.columns["kind"]) else "all")
    tol = getattr(features, "lasso_tol", None)
    settings = {"tag": tag, "mu_max": float(mu_max), "tol": tol}
    inputs = {"features": _store.array_fingerprint(np.asarray(features.XtL, dtype=np.float64),
                                                   np.asarray(features.G, dtype=np.float64))}
    key = _store.key("lasso-path", settings, inputs, PATH_FORMAT_VERSION)
    file = run_dir(cfg) / f"lasso-{tag}-mu{mu_max:g}-{key}.npz"
    upstream = [k for k in [(getattr(features, "meta", None) or {}).get("store_key")] if k]
    path, _ = _store.load_or_compute(
        file, key, "lasso-path", lambda: lasso_path(features.G, features.XtL, mu_max=mu_max, tol=tol),
        load=LassoPath.load, save=lambda p, tmp: p.save(tmp), settings=settings, inputs=inputs,
        upstream=upstream, version=PATH_FORMAT_VERSION, root=cfg.runs_dir)
    return path


def table_key(cfg: RunConfig, name: str) -> str:
    """The content key of a run's result table ``name`` (:func:`save_table`): its name, the run
    and the fingerprint of the run's data as it is now."""
    return _store.key("table", {"name": name, "run": cfg.run_name}, {"data": _data_record_now(cfg)["fingerprint"]},
                      TABLE_VERSION)


def save_table(cfg: RunConfig, name: str, frame) -> Path:
    """Write a result table (pandas DataFrame) as ``<name>.csv`` into the run folder: under its
    lock, atomically (not at all when the same table is there), indexed with the run's dataset
    (so gc removes it when the data it was computed from changes)."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"name: expected a file stem without '/' or a leading '.', got {name!r}")
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame: expected a pandas DataFrame, got {type(frame).__name__}")
    file = run_dir(cfg) / f"{name}.csv"
    record = _data_record_now(cfg)  # a table is no reason to render or fetch data
    text = frame.to_csv(index=False)
    key = table_key(cfg, name)

    def same(path: Path) -> bool:  # the same table is there already: nothing to write
        if path.read_text() != text:
            raise ValueError("another version of the table")
        return True

    _store.load_or_compute(file, key, "table", lambda: text, load=same, save=lambda t, tmp: tmp.write_text(t),
                           settings={"name": name}, data=[record], version=TABLE_VERSION, root=cfg.runs_dir,
                           quiet=True)
    return file


# ---------------------------------------------------------------------------- relevance study
def relevance_study(cfg: RunConfig, *, mu: float = 10.0, mu_max: float = 50.0, n_random: int = 5,
                    mus: tuple[float, ...] = (0.1, 0.5, 1, 2, 5, 10, 20, 50),
                    random: tuple[str, ...] = ("matched", "union"), progress: bool = True) -> dict[str, Any]:
    """Sec. 4.1 for one run: relevant features of the All and OnlyConv pools at ``mu``, their
    counts, the ablation curves on the test split (Fig. 4; ``random``: the Random control(s) of
    ``vxnb.evaluate.ablation.ablation_curve``, per-layer matched and the paper's draw from the
    union of the sets' layers) and the class reconstruction over ``mus`` (supplementary
    Fig. 10). Tables are saved as CSV in the run folder.

    Returns ``{model, data, features, paths, relevant, counts, ablation, reconstruction}``.
    """
    from ..evaluate.ablation import ablation_curve, class_reconstruction
    from ..relevance import feature_counts, relevant_features

    data = load_data(cfg, progress=progress)
    classes = data[2]
    model, _ = get_model(cfg, data=data, progress=progress)
    feats = {"All": get_features(cfg, model, "train", data=data, progress=progress)}
    feats["OnlyConv"] = feats["All"].select(kind="conv")
    paths = {k: get_lasso_path(cfg, f, mu_max=max(mu_max, mu, *mus), tag=k.lower()) for k, f in feats.items()}
    relevant = {k: relevant_features(p.coef(mu), feats[k].columns, classes) for k, p in paths.items()}
    counts = {k: feature_counts(r) for k, r in relevant.items()}
    ablation = ablation_curve(model, data[1], relevant["All"], relevant["OnlyConv"], n_random=n_random,
                              seed=cfg.seed, random=random, progress=progress)
    test_feats = get_features(cfg, model, "test", data=data, progress=progress, keep_X=True)
    recon = pd.concat([class_reconstruction(feats[k], test_feats.select(kind="conv") if k == "OnlyConv" else test_feats,
                                            mus=mus, progress=progress).assign(pool=k) for k in feats],
                      ignore_index=True)
    save_table(cfg, f"ablation-mu{mu:g}", ablation)
    save_table(cfg, "class-reconstruction", recon)
    return {"model": model, "data": data, "features": feats, "paths": paths, "relevant": relevant,
            "counts": counts, "ablation": ablation, "reconstruction": recon}

