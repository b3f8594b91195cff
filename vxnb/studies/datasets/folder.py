"""Your images: an image folder (``vxnb.data.folder``), optional masks and class-name file, and
your trained model (``vxnb.models.load_user_model``), used as it is and never trained here."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Subset

from vxnb import _store
from vxnb._checks import check_fraction

from .base import DatasetSpec, stratified_subset


class FolderSpec(DatasetSpec):
    name = "folder"
    label = "your images"
    reference_model = None
    benchmark = "split"
    quick_resizes = False

    def check(self, cfg: Any) -> None:
        from vxnb.models import check_normalize

        if cfg.data_root is None:
            raise ValueError("data_root: a folder run needs the image folder (one sub-folder per class, or "
                             "train/ and val/ with one sub-folder per class each)")
        if not Path(cfg.data_root).is_dir():
            raise FileNotFoundError(f"data_root: no folder at {cfg.data_root}")
        if cfg.mask_root is not None and not Path(cfg.mask_root).is_dir():
            raise FileNotFoundError(f"mask_root: no folder at {cfg.mask_root}")
        if cfg.class_names is not None and not Path(cfg.class_names).is_file():
            raise FileNotFoundError(f"class_names: no file at {cfg.class_names}")
        if not cfg.model:
            raise ValueError("model: a folder run needs your model: a torchvision architecture name "
                             "(\"resnet50\", \"vgg16\", …) or \"package.module:factory\"")
        if cfg.weights is not None and not Path(cfg.weights).is_file():
            raise FileNotFoundError(f"weights: no file at {cfg.weights}")
        if isinstance(cfg.image_size, bool) or not isinstance(cfg.image_size, int) or cfg.image_size < 16:
            raise ValueError(f"image_size: expected an int >= 16, got {cfg.image_size!r}")
        check_fraction(cfg.val_fraction, "val_fraction")
        if cfg.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: expected 'raise' or 'skip', got {cfg.on_error!r}")
        check_normalize(cfg.normalize)
        if cfg.epochs is not None:
            raise ValueError(f"epochs: a folder run uses your trained model as it is (never trains it), "
                             f"got epochs={cfg.epochs!r}")
        cfg.size = cfg.image_size

    def has_masks(self, cfg: Any) -> bool:
        return cfg.mask_root is not None

    def run_name(self, cfg: Any) -> str:
        settings = json.dumps([cfg.image_size, cfg.normalize, cfg.val_fraction, cfg.on_error,
                               cfg.mask_root is not None, cfg.class_names], default=str)
        arch = cfg.model.replace(":", "-").replace(".", "_").split("-")[-1][:24]
        return (f"folder-{Path(cfg.data_root).resolve().name[:24]}-{arch}-{cfg.model_fingerprint[:10]}-"
                f"{hashlib.sha1(settings.encode()).hexdigest()[:6]}")

    def data_spec(self, cfg: Any) -> dict[str, Any]:
        return {"mask_root": str(Path(cfg.mask_root).resolve()) if cfg.mask_root else None,
                "class_names": str(Path(cfg.class_names).resolve()) if cfg.class_names else None,
                "image_size": cfg.image_size, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
                "on_error": cfg.on_error}

    def fingerprint(self, spec: dict[str, Any]) -> str | None:
        return _store.key("image-folder", spec, {name: tree_listing(spec[name])
                                                 for name in ("root", "mask_root", "class_names")})

    def load(self, cfg: Any):
        from vxnb.data import dataset_labels
        from vxnb.data.folder import load_image_folder, read_class_names

        train, test, folders = load_image_folder(cfg.data_root, mask_root=cfg.mask_root, image_size=cfg.image_size,
                                                 val_fraction=cfg.val_fraction, seed=cfg.seed, on_error=cfg.on_error)
        classes = read_class_names(cfg.class_names, folders) if cfg.class_names else folders
        if cfg.train_limit is None or cfg.train_limit >= len(train):
            return train, test, classes
        train_l, test_l = dataset_labels(train), dataset_labels(test)
        keep_train = stratified_subset(np.arange(len(train)), train_l, cfg.train_limit, cfg.seed)
        keep_test = stratified_subset(np.arange(len(test)), test_l, max(cfg.train_limit // 4, len(classes)),
                                      cfg.seed + 1)
        return Subset(train, keep_train.tolist()), Subset(test, keep_test.tolist()), classes

    def user_model(self, cfg: Any):
        return user_model(cfg)


def tree_listing(path: str | None) -> list | None:
    """(relative path, size, mtime in ns) of every file under ``path`` (or of the file itself):
    a user's image folder is fingerprinted by its listing, as make and rsync do, not by reading
    every image twice."""
    if path is None:
        return None
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [(str(p.relative_to(root)) if p != root else p.name, st.st_size, st.st_mtime_ns)
            for p in files for st in (p.stat(),)]


def user_model(cfg: Any):
    """A folder run's model (``vxnb.models.load_user_model``), loaded once per config object;
    its number of classes is checked against the data's."""
    from vxnb.data.folder import folder_layout
    from vxnb.models import load_user_model

    if cfg.spec.reference_model is not None:
        raise ValueError(f"cfg: user_model needs a run on your own model (dataset='folder'), got {cfg.dataset!r}")
    if "_model" not in cfg.__dict__:
        root = Path(cfg.data_root)
        split = folder_layout(root)
        top = split[0] if split else root
        n_classes = sum(1 for d in top.iterdir() if d.is_dir() and not d.name.startswith("."))
        if n_classes < 1:
            raise ValueError(f"data_root: {top} has no class sub-folders (expected data_root/<class>/<image>)")
        cfg.__dict__["_model"] = load_user_model(cfg.model, cfg.weights, num_classes=n_classes,
                                                 input_shape=(3, cfg.image_size, cfg.image_size),
                                                 normalize=cfg.normalize, trust_weights=cfg.trust_weights)
    return cfg.__dict__["_model"]
