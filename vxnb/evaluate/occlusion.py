"""Box-occlusion study of heatmaps (Sec. 4.2 of the paper, after Zeiler & Fergus 2014).

Given a heatmap, the image is occluded with square patches whose centres are sampled from
the distribution the heatmap defines (probability proportional to the heatmap value, without
replacement), adding patches until a given fraction of the image is covered (up to 30 %).
The curve is the model's softmax confidence in the originally predicted class (or a given
target) against the covered fraction: a heatmap that points at what the model uses makes the
confidence drop faster. The paper reports a mean difference in confidence of 2 % between its
heatmaps and DeconvNet + guided backpropagation.

Conventions (documented choices):

* heatmaps are min-max normalised per image first (as in :mod:`vxnb.evaluate.iou`), so the
  sampling probability of a pixel is ``(h - min) / sum(h - min)``; pixels with probability 0
  (and every pixel of a constant heatmap) are still drawn, uniformly at random, once every
  pixel with positive probability has been drawn, so any coverage up to 100 % is reachable;
* the order of the centres is a weighted sample without replacement of all pixels
  (Efraimidis & Spirakis keys ``u ** (1 / w)``), drawn from ``numpy.random.default_rng([seed, i])``
  for image ``i``: results are deterministic, and all methods compared with the same seed see
  the same random numbers;
* a patch of side ``patch`` centred at ``(r, c)`` covers rows ``r - patch // 2 ...`` (clipped
  at the image border); for each requested level the number of patches is the smallest whose
  union covers at least that fraction of the pixels, and the fraction actually covered is
  reported;
* occluded pixels are filled with the image's own per-channel mean (``fill="mean"``, the
  default: no new colour or brightness is introduced), with 0 (``fill="zero"``) or a given
  number.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from vxnb._checks import check_model, check_nonnegative_int, check_positive_int
from vxnb.evaluate.iou import check_heatmaps, normalize_flat
from vxnb.utils import check_image_batch, eval_mode, model_device

__all__ = [
    "DEFAULT_COVERAGE",
    "occlusion_order",
    "occlusion_masks",
    "box_occlusion_curve",
    "occlusion_study",
    "mean_confidence_difference",
]

#: Coverage levels of the paper's study: 0, 5, ..., 30 % of the image.
DEFAULT_COVERAGE: tuple[float, ...] = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30)


# ----------------------------------------------------------------------------- helpers
@torch.no_grad()
def batched_logits(model: nn.Module, images: torch.Tensor, *, batch_size: int = 64,
                   device: torch.device | None = None, arg: str = "images") -> torch.Tensor:
    """Run ``model`` (in eval mode) over ``images`` (B, C, H, W) in batches; (B, K) float CPU logits.

    A batch the model cannot run on (wrong channels or size) raises a ``ValueError`` naming
    ``arg``; an output that is not (B, K) raises too.
    """
    device = model_device(model) if device is None else device
    out = []
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            try:
                y = model(x)
            except RuntimeError as err:
                raise ValueError(f"{arg}: the model could not run on a batch of shape {tuple(x.shape)}: "
                                 f"{err}") from err
            if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != x.shape[0]:
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"model: expected class scores of shape ({x.shape[0]}, num_classes), "
                                 f"got {shape}")
            out.append(y.detach().float().cpu())
    return torch.cat(out)


def check_targets(target: Any, n: int, num_classes: int, arg: str = "target") -> torch.Tensor:
    """An int or (n,) ints in [0, num_classes) -> LongTensor (n,)."""
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        t = torch.full((n,), int(target), dtype=torch.long)
    else:
        if isinstance(target, np.ndarray):
            target = torch.from_numpy(target)
        elif isinstance(target, (list, tuple)):
            target = torch.tensor(target)
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"{arg}: expected an int or a sequence of {n} ints, got {type(target).__name__}")
        if target.dtype.is_floating_point or target.dtype == torch.bool or target.dtype.is_complex:
            raise TypeError(f"{arg}: expected integer class indices, got dtype {target.dtype}")
        if target.shape != (n,):
            raise ValueError(f"{arg}: expected one class per image, shape ({n},), got {tuple(target.shape)}")
        t = target.long().cpu()
    if n and (t.min() < 0 or t.max() >= num_classes):
        bad = t[(t < 0) | (t >= num_classes)]
        raise ValueError(f"{arg}: class indices must be in [0, {num_classes}) for this model, "
                         f"got {bad[:5].tolist()}")
    return t


def _check_levels(coverage: Any) -> np.ndarray:
    try:
        c = np.asarray(coverage, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise TypeError(f"coverage: expected a sequence of fractions in [0, 1], got {coverage!r}") from err
    if c.size == 0 or not np.isfinite(c).all() or c.min() < 0 or c.max() > 1:
        raise ValueError(f"coverage: expected a non-empty sequence of fractions in [0, 1], got {c.tolist()}")
    if (np.diff(c) <= 0).any():
        raise ValueError(f"coverage: expected strictly increasing fractions, got {c.tolist()}")
    return c


def _check_heatmaps_for(images: torch.Tensor, heatmaps: Any, arg: str = "heatmaps") -> np.ndarray:
    h = check_heatmaps(heatmaps, arg)
    want = (images.shape[0], images.shape[2], images.shape[3])
    if h.shape != want:
        raise ValueError(f"{arg}: expected one (H, W) map per image, shape {want}, got {tuple(h.shape)}")
    return h


# ----------------------------------------------------------------------------- sampling
def occlusion_order(heatmap: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All pixel indices of a (H, W) heatmap (>= 0) in a weighted random order without replacement.

    Pixel ``p`` comes first with probability ``w_p / sum(w)`` and so on (Efraimidis–Spirakis);
    zero-weight pixels come last in uniform random order.
    """
    w = np.asarray(heatmap, dtype=np.float64).reshape(-1)
    u = 1.0 - rng.random(w.size)          # (0, 1]
    tie = rng.random(w.size)
    with np.errstate(divide="ignore"):
        key = np.where(w > 0, np.log(u) / np.where(w > 0, w, 1.0), -np.inf)  # log(u ** (1/w))
    return np.lexsort((tie, -key))


def occlusion_masks(heatmap: np.ndarray, coverage: Sequence[float], patch: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Occlusion masks of one heatmap at each coverage level.

    Args:
        heatmap: (H, W), non-negative (already normalised).
        coverage: L increasing fractions in [0, 1].
        patch: side of the square patches in pixels.
        rng: the generator drawing the centres.

    Returns:
        ``(masks, covered, n_patches)``: (L, H, W) bool, (L,) covered fractions (each
        ``>=`` its level), (L,) number of patches placed.
    """
    hh, ww = heatmap.shape
    total = hh * ww
    levels = np.asarray(coverage, dtype=np.float64)
    need = np.ceil(levels * total - 1e-9).astype(np.int64)
    masks = np.zeros((len(levels), hh, ww), dtype=bool)
    covered = np.zeros(len(levels))
    n_patches = np.zeros(len(levels), dtype=np.int64)
    cur = np.zeros((hh, ww), dtype=bool)
    count, placed, k = 0, 0, 0
    while k < len(levels) and need[k] <= 0:
        k += 1
    if k < len(levels):
        half = patch // 2
        for p in occlusion_order(heatmap, rng):
            r, c = divmod(int(p), ww)
            r0, c0 = max(0, r - half), max(0, c - half)
            r1, c1 = min(hh, r - half + patch), min(ww, c - half + patch)
            block = cur[r0:r1, c0:c1]
            count += block.size - int(block.sum())
            block[...] = True
            placed += 1
            while k < len(levels) and count >= need[k]:
                masks[k] = cur
                covered[k] = count / total
                n_patches[k] = placed
                k += 1
            if k == len(levels):
                break
    return masks, covered, n_patches


# ----------------------------------------------------------------------------- curves
def _check_patch(patch: Any, hh: int, ww: int) -> int:
    """The patch side: default ``max(1, round(min(H, W) / 8))``, else an int in [1, min(H, W)]."""
    if patch is None:
        patch = max(1, round(min(hh, ww) / 8))
    if isinstance(patch, bool) or not isinstance(patch, (int, np.integer)) or not 1 <= patch <= min(hh, ww):
        raise ValueError(f"patch: expected an int in [1, {min(hh, ww)}] (the image side), got {patch!r}")
    return int(patch)


def _check_fill(fill: Any) -> None:
    if isinstance(fill, str):
        if fill not in ("mean", "zero"):
            raise ValueError(f"fill: expected 'mean', 'zero' or a number, got {fill!r}")
    elif isinstance(fill, bool) or not isinstance(fill, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(fill)):
        raise ValueError(f"fill: expected 'mean', 'zero' or a finite number, got {fill!r}")


def _fill_value(x: torch.Tensor, fill: str | float) -> torch.Tensor:
    """What covers a patch of image ``x`` (C, H, W): its per-channel mean, zero or a number."""
    if fill == "mean":
        return x.mean(dim=(1, 2), keepdim=True)
    if fill == "zero":
        return torch.zeros((), dtype=x.dtype)
    return torch.tensor(float(fill), dtype=x.dtype)


def box_occlusion_curve(
    model: nn.Module,
    images: torch.Tensor,
    heatmaps: Any,
    *,
    target: Any = None,
    patch: int | None = None,
    coverage: Sequence[float] = DEFAULT_COVERAGE,
    seed: int = 0,
    fill: str | float = "mean",
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Model confidence as patches sampled from each heatmap cover more of the image.

    Args:
        model: a classifier returning logits (B, K); run in eval mode, not modified, on
            ``device`` (default: the device its parameters are on).
        images: (N, C, H, W) float in [0, 1].
        heatmaps: (N, H, W) numpy or torch, one per image; min-max normalised per image and
            read as a sampling distribution (see the module docstring).
        target: class whose softmax confidence is tracked: an int, (N,) ints, or ``None``
            for the class the model predicts on the unoccluded image.
        patch: side of the square patches in pixels; default ``max(1, round(min(H, W) / 8))``.
        coverage: increasing fractions of the image to cover; default 0, 5, ..., 30 %.
        seed: seed of the centre sampling (image ``i`` uses ``default_rng([seed, i])``).
        fill: ``"mean"`` (per-image, per-channel mean), ``"zero"`` or a number.
        batch_size: images per forward pass.
        device: where to run the model.
        progress: show a progress bar (``None``: only on a terminal).

    Returns:
        Tidy DataFrame with one row per image and level: ``image``, ``level`` (requested
        fraction), ``coverage`` (fraction actually covered, >= level), ``n_patches``,
        ``target``, ``confidence`` (softmax probability of ``target``).
    """
    model = check_model(model)
    images = check_image_batch(images, "images")
    n, ch, hh, ww = images.shape
    if n == 0:
        raise ValueError("images: expected at least one image, got an empty batch")
    h = _check_heatmaps_for(images, heatmaps)
    levels = _check_levels(coverage)
    batch_size = check_positive_int(batch_size, "batch_size")
    patch = _check_patch(patch, hh, ww)
    _check_fill(fill)
    check_nonnegative_int(seed, "seed")
    device = model_device(model) if device is None else torch.device(device)

    images_cpu = images.detach().cpu()
    if target is None:
        target_t = batched_logits(model, images_cpu, batch_size=batch_size, device=device).argmax(1)
    else:
        probe = batched_logits(model, images_cpu[:1], batch_size=1, device=device)
        target_t = check_targets(target, n, probe.shape[1])

    norm = normalize_flat(h.reshape(n, -1)).reshape(h.shape)
    n_levels = len(levels)
    per_chunk = max(1, batch_size // n_levels)
    conf = np.empty((n, n_levels))
    covered = np.empty((n, n_levels))
    n_patches = np.empty((n, n_levels), dtype=np.int64)
    bar = tqdm(total=n, desc="box occlusion", disable=None if progress is None else not progress)
    for start in range(0, n, per_chunk):
        stop = min(n, start + per_chunk)
        batch = []
        for i in range(start, stop):
            masks, covered[i], n_patches[i] = occlusion_masks(
                norm[i], levels, int(patch), np.random.default_rng([int(seed), i]))
            x = images_cpu[i]
            m = torch.from_numpy(masks)[:, None]  # (L, 1, H, W)
            batch.append(torch.where(m, _fill_value(x, fill), x))
        logits = batched_logits(model, torch.cat(batch), batch_size=batch_size, device=device)
        probs = torch.softmax(logits, dim=1).reshape(stop - start, n_levels, -1)
        t = target_t[start:stop]
        conf[start:stop] = probs[torch.arange(stop - start), :, t].numpy()
        bar.update(stop - start)
    bar.close()
    return pd.DataFrame({
        "image": np.repeat(np.arange(n), n_levels),
        "level": np.tile(levels, n),
        "coverage": covered.reshape(-1),
        "n_patches": n_patches.reshape(-1),
        "target": np.repeat(target_t.numpy(), n_levels),
        "confidence": conf.reshape(-1),
    })


def occlusion_study(
    model: nn.Module,
    images: torch.Tensor,
    heatmaps_by_method: Mapping[str, Any],
    *,
    target: Any = None,
    reduce: str = "mean",
    **kwargs: Any,
) -> pd.DataFrame:
    """:func:`box_occlusion_curve` for several heatmap methods on the same images and targets.

    Args:
        model, images, target: as in :func:`box_occlusion_curve`; with ``target=None`` the
            predicted class of each unoccluded image is used for every method.
        heatmaps_by_method: ``{method name: (N, H, W) heatmaps}``.
        reduce: ``"mean"``: one row per method and level with columns ``method``, ``level``,
            ``coverage`` (mean actual fraction), ``confidence`` (mean), ``confidence_std``,
            ``n_images``; ``"none"``: the per-image rows of every method with a ``method``
            column.
        **kwargs: passed on (``patch``, ``coverage``, ``seed``, ``fill``, ``batch_size``,
            ``device``, ``progress``).
    """
    model = check_model(model)
    images = check_image_batch(images, "images")
    if not isinstance(heatmaps_by_method, Mapping) or not heatmaps_by_method:
        raise ValueError("heatmaps_by_method: expected a non-empty dict {method name: (N, H, W) heatmaps}, "
                         f"got {type(heatmaps_by_method).__name__}")
    if reduce not in ("mean", "none"):
        raise ValueError(f"reduce: expected 'mean' or 'none', got {reduce!r}")
    for name, h in heatmaps_by_method.items():
        _check_heatmaps_for(images, h, f"heatmaps_by_method[{name!r}]")
    if target is None:
        bs = check_positive_int(kwargs.get("batch_size", 64), "batch_size")
        target = batched_logits(model, images.detach().cpu(), batch_size=bs,
                                device=kwargs.get("device")).argmax(1)
    frames = []
    for name, h in heatmaps_by_method.items():
        df = box_occlusion_curve(model, images, h, target=target, **kwargs)
        df.insert(0, "method", name)
        frames.append(df)
    per_image = pd.concat(frames, ignore_index=True)
    if reduce == "none":
        return per_image
    g = per_image.groupby(["method", "level"], sort=False)
    out = g.agg(coverage=("coverage", "mean"), confidence=("confidence", "mean"),
                confidence_std=("confidence", "std"), n_images=("image", "nunique")).reset_index()
    return out


def mean_confidence_difference(study: pd.DataFrame, method: str, reference: str, *,
                               include_zero: bool = False) -> float:
    """Mean over coverage levels of ``confidence(method) - confidence(reference)``.

    Args:
        study: the output of :func:`occlusion_study` (either ``reduce``).
        method, reference: two values of its ``method`` column.
        include_zero: also average over the level 0 (no occlusion, where both curves agree).

    Returns:
        A fraction (0.02 is the paper's "2 %"); negative when ``method``'s heatmaps make the
        confidence drop faster than ``reference``'s.
    """
    if not isinstance(study, pd.DataFrame) or not {"method", "level", "confidence"} <= set(study.columns):
        raise ValueError("study: expected the DataFrame of occlusion_study (columns method, level, confidence)")
    have = list(dict.fromkeys(study["method"]))
    for arg, name in (("method", method), ("reference", reference)):
        if name not in have:
            raise ValueError(f"{arg}: {name!r} is not in the study; it has {have}")
    curves = study.groupby(["method", "level"])["confidence"].mean().unstack("level")
    diff = curves.loc[method] - curves.loc[reference]
    if not include_zero:
        diff = diff[diff.index > 0]
    if diff.empty:
        raise ValueError("study: no coverage level above 0 to compare (pass include_zero=True)")
    return float(diff.mean())
