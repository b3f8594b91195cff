"""an8Flower (the embedded default): rendered here, with a ground-truth mask of the class part of
every image, five folds grouped by viewpoint; the paper's Table 1 is measured on it."""
from __future__ import annotations

from typing import Any

from vxnb import _store
from vxnb.utils import read_json

from .base import DatasetSpec, limit_split


def knobs(cfg: Any):
    """The run's renderer knobs (``RunConfig.part_scale``, ``distractor_rate``, ``clutter``) as a
    ``vxnb.data.an8flower.Knobs``; a bad value is refused naming the RunConfig field."""
    from vxnb.data.an8flower import Knobs
    from vxnb.data.an8flower.render import check_knobs

    try:
        return check_knobs(Knobs(cfg.part_scale, cfg.distractor_rate, cfg.clutter))
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).removeprefix("knobs.")) from None


class An8FlowerSpec(DatasetSpec):
    name = "an8flower"
    label = "an8Flower"
    reference_model = "flowernet"
    benchmark = "folds"
    paper_numbers = True
    has_knobs = True
    prepare_with = ("mnist",)
    masks_note = "an8Flower has a ground-truth mask of the class-defining part for every image."

    def check(self, cfg: Any) -> None:
        if cfg.size < 32:
            raise ValueError(f"size: expected an int >= 32 for an8Flower, got {cfg.size!r}")
        knobs(cfg)

    def run_name(self, cfg: Any) -> str:
        base = f"an8flower-{cfg.variant}-s{cfg.size}-f{cfg.test_fold}"
        return base + (f"-{cfg.folds}" if cfg.folds != "views" else "") + knobs(cfg).tag()

    def has_masks(self, cfg: Any) -> bool:
        return True

    def display_name(self, cfg: Any) -> str:
        return f"an8Flower {cfg.variant}"

    def data_spec(self, cfg: Any) -> dict[str, Any]:
        # default knobs add nothing, so the paper's renders keep the records they had
        return {"variant": cfg.variant, "size": cfg.size, "seed": cfg.seed, **knobs(cfg).manifest()}

    def fingerprint(self, spec: dict[str, Any]) -> str | None:
        """Its manifest: render version, settings, CRC of the index of every image and mask."""
        from vxnb.data.an8flower import cache_dir

        folder = cache_dir(spec["root"], spec["variant"], spec["size"], spec["seed"], knobs=spec.get("knobs"))
        man = folder / "manifest.json"
        if not man.is_file():
            return None
        try:
            return _store.key("an8flower-manifest", read_json(man))
        except ValueError:
            return None

    def load(self, cfg: Any):
        """test = the held-out fold (grouped by viewpoint), train = the other four."""
        from vxnb.data.an8flower import An8Flower

        full = An8Flower(cfg.data_dir, variant=cfg.variant, size=cfg.size, generate=True, seed=cfg.seed,
                         knobs=knobs(cfg))
        train_idx, test_idx = full.fold_indices(cfg.test_fold, cfg.folds)
        return limit_split(full, train_idx, test_idx, full.index["label"].to_numpy(), list(full.classes), cfg)

    def checkpoint_settings(self, cfg: Any) -> dict[str, Any]:
        # folds: the split ("views" or "blocks") picks the training images; fold f of each is another model
        return {"variant": cfg.variant, "size": cfg.size, "test_fold": cfg.test_fold, "folds": cfg.folds,
                **knobs(cfg).manifest()}

    def train_options(self, cfg: Any) -> dict[str, Any]:
        # ``vxnb.models.FOLD_RECIPE`` (issue 26; empty: the plain recipe); the quick (CI) setting
        # always trains the plain way
        from vxnb import models

        return {} if cfg.quick else dict(models.FOLD_RECIPE)

    def model_options(self, cfg: Any) -> dict[str, Any]:
        return {"size": cfg.size}
