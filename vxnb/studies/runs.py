"""Run folders: the artifacts one notebook hands to the next.

A run is one (dataset, variant, size, seed, training setting). Everything it produces lives
in ``runs/<name>/`` — the checkpoint and its ``meta.json`` (``vxnb.models``), the feature
statistics (``vxnb.features``), the μ-lasso paths (``vxnb.lasso``) and result tables — so
each notebook can run on its own once its inputs exist, and nothing passes through hidden
global state. Every step below is "load if present, else compute and save atomically".

>>> cfg = RunConfig(dataset="an8flower", variant="single-6c", size=128)
>>> model, meta = get_model(cfg)          # trains once, then loads the checkpoint
>>> feats = get_features(cfg, model)      # X, XᵀX, XᵀL on the training split
>>> path = get_lasso_path(cfg, feats)     # W for any μ, instantly: path.coef(10.0)
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Subset

from ..paths import work_dir
from ..utils import atomic_write_json, read_json, seed_everything

__all__ = ["RunConfig", "DATASETS", "load_data", "get_model", "get_features", "get_lasso_path",
           "run_dir"]

DATASETS = ("an8flower", "mnist")
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


@dataclass
class RunConfig:
    """What a run is made of. ``quick=True`` is the small setting CI uses.

    dataset: "an8flower" (the embedded default) or "mnist".
    variant: the an8Flower variant ("single-6c", "double-12c", "part-2c"); ignored for MNIST.
    size: an8Flower image size in pixels (MNIST is always 28).
    epochs: training epochs (None: the model's default for the dataset and mode).
    test_fold: the an8Flower fold held out for testing (folds are grouped by viewpoint).
    folds: how an8Flower's viewpoints form folds: "views" (interleaved, ``view % 5``) or
        "blocks" (eight neighbouring views per fold); see ``vxnb.data.an8flower.fold_of_view``.
    train_limit: use at most this many training images (None: all) — the quick setting.
    seed: seeds rendering, splitting, training and random baselines.
    data_root, runs_root: where data and run folders live (default: data/ and runs/ in the
        working folder, ``$VXNB_HOME`` or the current directory; see ``vxnb.paths``).
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

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: expected one of {DATASETS}, got {self.dataset!r}")
        if self.dataset == "mnist":
            self.size = 28
        if not isinstance(self.size, int) or self.size < 32 and self.dataset == "an8flower":
            raise ValueError(f"size: expected an int >= 32 for an8Flower, got {self.size!r}")
        if not 0 <= self.test_fold < 5:
            raise ValueError(f"test_fold: expected 0..4, got {self.test_fold!r}")
        if self.folds not in ("views", "blocks"):
            raise ValueError(f"folds: expected one of 'views', 'blocks', got {self.folds!r}")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"epochs: expected a positive int or None, got {self.epochs!r}")

    @classmethod
    def from_params(cls, quick: bool = False, **params: Any) -> "RunConfig":
        """The notebooks' parameters → a config; ``quick`` shrinks size and data for CI."""
        params = {k: v for k, v in params.items() if v is not None}
        if quick:  # the CI setting overrides size and data volume, whatever the full setting says
            params["size"] = min(int(params.get("size", QUICK_SIZE)), QUICK_SIZE)
            params["train_limit"] = min(int(params.get("train_limit", QUICK_TRAIN_LIMIT)), QUICK_TRAIN_LIMIT)
        return cls(quick=quick, **params)

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        if self.dataset == "mnist":
            base = "mnist"
        else:
            base = f"an8flower-{self.variant}-s{self.size}-f{self.test_fold}"
            if self.folds != "views":
                base += f"-{self.folds}"
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
    path = cfg.runs_dir / cfg.run_name
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------- data
def load_data(cfg: RunConfig, progress: bool = True) -> tuple[Dataset, Dataset, list[str]]:
    """The (train, test) datasets and the class names of a run.

    an8Flower: test = the held-out fold (grouped by viewpoint), train = the other four.
    MNIST: the fixed stratified 80/20 split of the digits found under ``data/``.
    ``train_limit`` keeps a seeded, class-stratified subset of the training split.
    """
    if cfg.dataset == "an8flower":
        from ..data.an8flower import An8Flower

        full = An8Flower(cfg.data_dir, variant=cfg.variant, size=cfg.size, generate=True, seed=cfg.seed)
        train_idx, test_idx = full.fold_indices(cfg.test_fold, cfg.folds)
        labels = full.index["label"].to_numpy()
        classes = list(full.classes)
    else:
        from ..data.mnist import MnistDataset, load_mnist, stratified_split

        images, labels_t = load_mnist(cfg.data_dir)
        labels = np.asarray(labels_t)
        full = MnistDataset(images, labels_t)
        train_idx, test_idx = stratified_split(labels, test_fraction=0.2, seed=cfg.seed)
        classes = list(full.classes)
    if cfg.train_limit is not None and cfg.train_limit < len(train_idx):
        train_idx = _stratified_subset(train_idx, labels[train_idx], cfg.train_limit, cfg.seed)
        test_idx = _stratified_subset(test_idx, labels[test_idx], max(cfg.train_limit // 4, len(classes)),
                                      cfg.seed + 1)
    return Subset(full, train_idx.tolist()), Subset(full, test_idx.tolist()), classes


def _stratified_subset(idx: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = max(1, n // len(classes))
    keep = [rng.permutation(idx[labels == c])[:per] for c in classes]
    return np.sort(np.concatenate(keep))


# ---------------------------------------------------------------------------- model
def get_model(cfg: RunConfig, *, retrain: bool = False, progress: bool = True,
              data: tuple[Dataset, Dataset, list[str]] | None = None):
    """Load the run's checkpoint, or train the reference model and save it. → (model, meta).

    The initial weights are seeded by ``cfg.seed``. A training run of ≥ 3 epochs that stalls
    (final training accuracy < :data:`MIN_TRAIN_ACCURACY`) is repeated from seed + 1000, + 2000
    with a warning, and the best attempt is kept; ``meta["train_attempts"]`` lists them all."""
    from .. import models

    folder = run_dir(cfg)
    if not retrain and (folder / "model.pt").exists() and (folder / "meta.json").exists():
        return models.load_checkpoint(folder)
    train, test, classes = data if data is not None else load_data(cfg, progress=progress)
    epochs = cfg.epochs or models.default_epochs(cfg.dataset, quick=cfg.quick)
    attempts: list[dict[str, Any]] = []
    best = None
    for attempt in range(TRAIN_ATTEMPTS):
        seed = cfg.seed + 1000 * attempt
        seed_everything(seed)  # the initial weights too: the same config gives the same model
        if cfg.dataset == "mnist":
            model = models.build_model("mnistnet", num_classes=len(classes))
        else:
            model = models.build_model("flowernet", num_classes=len(classes), size=cfg.size)
        history = models.train_model(model, train, test, epochs=epochs, seed=seed, progress=progress)
        acc = history["train_accuracy"][-1]
        attempts.append({"seed": seed, "train_accuracy": acc, "test_accuracy": history.get("final_test_accuracy")})
        if best is None or acc > best[2]["train_accuracy"][-1]:
            best = (seed, model, history)
        if acc >= MIN_TRAIN_ACCURACY or epochs < MIN_EPOCHS_TO_RETRY:
            break
        warnings.warn(f"training {cfg.run_name} with seed {seed} stalled at train accuracy {acc:.3f} "
                      f"(< {MIN_TRAIN_ACCURACY}); " + ("starting again from another initialisation"
                                                       if attempt + 1 < TRAIN_ATTEMPTS else
                                                       f"keeping the best of {TRAIN_ATTEMPTS} attempts"))
    seed, model, history = best
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
    models.save_checkpoint(folder, model, meta)
    return models.load_checkpoint(folder)


# ---------------------------------------------------------------------------- features
def get_features(cfg: RunConfig, model: torch.nn.Module, split: str = "train", *, only_conv: bool = False,
                 data: tuple[Dataset, Dataset, list[str]] | None = None, progress: bool = True, **kwargs):
    """Filter-wise responses of a split (cached in the run folder by ``vxnb.features``)."""
    from ..features import extract_features

    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    train, test, classes = data if data is not None else load_data(cfg, progress=progress)
    dataset = train if split == "train" else test
    return extract_features(model, dataset, only_conv=only_conv, n_classes=len(classes),
                            cache_dir=run_dir(cfg) / "features",
                            data_key=f"{cfg.run_name}/{split}/{len(dataset)}", progress=progress, **kwargs)


def get_lasso_path(cfg: RunConfig, features, *, mu_max: float = 50.0, tag: str | None = None):
    """The μ-lasso path of every class up to ``mu_max``, cached as
    ``lasso-<tag>-mu<mu_max>-<key>.npz``; the key fingerprints the statistics it was solved
    from (XᵀL and the diagonal of XᵀX), so a retrained model never reads another's path."""
    import hashlib

    from ..lasso import LassoPath, lasso_path

    tag = tag or ("conv" if all(k == "conv" for k in features.columns["kind"]) else "all")
    digest = hashlib.sha1(np.ascontiguousarray(features.XtL, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(np.diagonal(features.G), dtype=np.float64).tobytes())
    file = run_dir(cfg) / f"lasso-{tag}-mu{mu_max:g}-{digest.hexdigest()[:12]}.npz"
    if file.exists():
        try:
            return LassoPath.load(file)
        except Exception as err:  # a stale or corrupt file is recomputed, never trusted
            file.unlink()
    path = lasso_path(features.G, features.XtL, mu_max=mu_max, tol=getattr(features, "lasso_tol", None))
    path.save(file)
    return path


def save_table(cfg: RunConfig, name: str, frame) -> Path:
    """Write a result table (pandas DataFrame) as CSV into the run folder, atomically."""
    from ..utils import atomic_path

    file = run_dir(cfg) / f"{name}.csv"
    with atomic_path(file) as tmp:
        frame.to_csv(tmp, index=False)
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
