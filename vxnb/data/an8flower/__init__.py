"""an8Flower: a synthetic flower dataset whose class-defining region is known pixel for pixel.

Three modules, each importing only the ones before it:

* :mod:`.render` -- the scene, the ray caster, the crops and rotations, the classes of each
  variant (:func:`render_view`: one viewpoint's items in memory);
* :mod:`.png` -- the PNG codec of the cache files;
* :mod:`.dataset` -- the cache on disk (:func:`generate`, :func:`cache_dir`, manifest and
  index), the folds (:func:`fold_of_view`) and the torch Dataset :class:`An8Flower`.

Every public name is re-exported here: ``from vxnb.data.an8flower import An8Flower``.
"""
from __future__ import annotations

from .dataset import (FOLD_SPLITS, GALLERY_VIEW, N_FOLDS, An8Flower, cache_dir, check_fold, fold_of_view, gallery,
                      generate)
from .render import (ANGLES, COLOURS, CROPS, DEFAULT_KNOBS, MAX_SIZE, MIN_SIZE, N_VIEWS, RENDER_VERSION,
                     SUPERSAMPLE, VARIANTS, Knobs, attribute_colour, counterfactual_label, render_size, render_view,
                     variant_classes)

__all__ = [
    "VARIANTS",
    "N_VIEWS",
    "CROPS",
    "ANGLES",
    "N_FOLDS",
    "FOLD_SPLITS",
    "fold_of_view",
    "check_fold",
    "GALLERY_VIEW",
    "RENDER_VERSION",
    "COLOURS",
    "variant_classes",
    "render_size",
    "cache_dir",
    "generate",
    "render_view",
    "An8Flower",
    "gallery",
    "Knobs",
    "DEFAULT_KNOBS",
    "counterfactual_label",
    "attribute_colour",
]
