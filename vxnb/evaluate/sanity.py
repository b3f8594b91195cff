"""Sanity checks of visual explanations (Sec. 4.4 of the paper; Nie et al. 2018; Adebayo et al. 2018).

Two checks, both measured with heatmap similarities (Spearman rank correlation, with and
without absolute values, and SSIM):

* **class sensitivity** (:func:`class_sensitivity`, the paper's Fig. 9 experiment): the
  explanation of the predicted class is compared with those of the runner-up class and of a
  random other class; a good explanation depends on the class, so the similarities are low;
* **model-parameter randomisation** (:func:`randomize_cascade`, :func:`randomization_curve`,
  Adebayo et al.'s cascading randomisation): the layers are re-initialised one after the other
  from the top of the network; an explanation that depends on what the model learned drifts
  away from the original explanation as more layers are randomised.

An *explain function* has the signature ``explain_fn(model, x, target) -> (B, H, W)`` with
``x`` (B, C, H, W) on the model's device and ``target`` a LongTensor (B,) on the same device
(e.g. ``lambda m, x, t: vxnb.baselines.attribution("gradcam", m, x, t)``). It is called with
the model in eval mode and gradients enabled.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.ndimage import uniform_filter
from scipy.stats import rankdata
from torch import nn
from tqdm.auto import tqdm

from vxnb._checks import check_model, check_nonnegative_int, check_positive_int, check_positive_number
from vxnb.evaluate.iou import normalize_flat, to_numpy
from vxnb.evaluate.occlusion import (
    batched_logits,
    check_targets,
)
from vxnb.utils import check_image_batch, check_layer_names, eval_mode, model_device

__all__ = [
    "spearman",
    "abs_spearman",
    "ssim",
    "class_sensitivity",
    "default_random_layers",
    "randomize_cascade",
    "randomization_curve",
]

ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], Any]

#: Module types randomised by default.
RANDOMIZED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
)


# ----------------------------------------------------------------------------- similarities
def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """Two maps (H, W) or batches (B, H, W) as float64 (B, H, W) arrays; whether batched."""
    x, y = to_numpy(a, "a"), to_numpy(b, "b")
    for arg, v in (("a", x), ("b", y)):
        if v.dtype == bool or not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
            raise TypeError(f"{arg}: expected real-valued heatmaps, got dtype {v.dtype}")
        if v.ndim not in (2, 3) or 0 in v.shape:
            raise ValueError(f"{arg}: expected a heatmap (H, W) or a batch (B, H, W), got shape {tuple(v.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"b: expected the shape of a {tuple(x.shape)}, got {tuple(y.shape)}")
    x, y = x.astype(np.float64), y.astype(np.float64)
    for arg, v in (("a", x), ("b", y)):
        if not np.isfinite(v).all():
            raise ValueError(f"{arg}: contains NaN or inf")
    batched = x.ndim == 3
    return (x, y, True) if batched else (x[None], y[None], False)


def _out(v: np.ndarray, batched: bool) -> np.ndarray | float:
    return v if batched else float(v[0])


def spearman(a: Any, b: Any) -> np.ndarray | float:
    """Spearman rank correlation over the pixels of each pair of maps.

    Args:
        a, b: (H, W) or (B, H, W), numpy or torch, same shape.

    Returns:
        (B,) float64 (a float for a single pair). Ties get average ranks. A constant map has
        no ranking: its correlation is NaN.
    """
    x, y, batched = _pair(a, b)
    rx = rankdata(x.reshape(len(x), -1), axis=1)
    ry = rankdata(y.reshape(len(y), -1), axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    num = (rx * ry).sum(axis=1)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return _out(np.clip(r, -1.0, 1.0), batched)


def abs_spearman(a: Any, b: Any) -> np.ndarray | float:
    """:func:`spearman` of the absolute values (Adebayo et al.'s "with absolute value")."""
    x, y, batched = _pair(a, b)
    return _out(spearman(np.abs(x), np.abs(y)), batched)


def ssim(a: Any, b: Any, *, win_size: int = 7) -> np.ndarray | float:
    """Structural similarity of each pair of maps after min-max normalising each to [0, 1].

    Equal to ``skimage.metrics.structural_similarity(n(a), n(b), data_range=1)`` with its
    defaults (7 x 7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance, mean over the
    window centres at least ``win_size // 2`` from the border), computed for a whole batch
    at once. A constant map normalises to zeros.

    Args:
        a, b: (H, W) or (B, H, W), numpy or torch, same shape; H and W at least ``win_size``.
        win_size: odd side of the window.

    Returns:
        (B,) float64 in [-1, 1] (a float for a single pair).
    """
    x, y, batched = _pair(a, b)
    if isinstance(win_size, bool) or not isinstance(win_size, (int, np.integer)) or win_size < 3 \
            or win_size % 2 == 0:
        raise ValueError(f"win_size: expected an odd int >= 3, got {win_size!r}")
    if min(x.shape[1:]) < win_size:
        raise ValueError(f"a: maps of shape {x.shape[1:]} are smaller than the SSIM window {win_size}; "
                         "pass a smaller odd win_size")
    n = len(x)
    x = normalize_flat(x.reshape(n, -1)).reshape(x.shape)
    y = normalize_flat(y.reshape(n, -1)).reshape(y.shape)
    size = (1, win_size, win_size)
    ux, uy = uniform_filter(x, size=size), uniform_filter(y, size=size)
    uxx, uyy, uxy = uniform_filter(x * x, size=size), uniform_filter(y * y, size=size), uniform_filter(x * y, size=size)
    npix = win_size ** 2
    cov_norm = npix / (npix - 1)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    return _out(s[:, pad:s.shape[1] - pad, pad:s.shape[2] - pad].mean(axis=(1, 2)), batched)


def _similarities(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    return {"spearman": spearman(a, b), "abs_spearman": abs_spearman(a, b), "ssim": ssim(a, b)}


# ----------------------------------------------------------------------------- explanations
def _check_explain_fns(explain_fn: Any) -> dict[str, ExplainFn]:
    if callable(explain_fn) and not isinstance(explain_fn, Mapping):
        return {getattr(explain_fn, "__name__", "explanation"): explain_fn}
    if isinstance(explain_fn, Mapping) and explain_fn and all(callable(f) for f in explain_fn.values()):
        return dict(explain_fn)
    raise TypeError("explain_fn: expected a callable explain_fn(model, x, target) -> (B, H, W) or a "
                    f"non-empty dict of them, got {type(explain_fn).__name__}")


def _explain(fn: ExplainFn, name: str, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
             batch_size: int, device: torch.device) -> np.ndarray:
    """Heatmaps (N, H', W') float64 from ``fn`` over batches, with the output checked."""
    out = []
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            t = targets[start:start + batch_size].to(device)
            h = fn(model, x, t)
            if isinstance(h, torch.Tensor):
                h = h.detach().float().cpu().numpy()
            if not isinstance(h, np.ndarray):
                raise TypeError(f"explain_fn {name!r}: expected a tensor/array (B, H, W), got {type(h).__name__}")
            if h.ndim != 3 or h.shape[0] != len(x):
                hint = " (squeeze the channel axis)" if h.ndim == 4 and h.shape[1] == 1 else ""
                raise ValueError(f"explain_fn {name!r}: expected heatmaps of shape ({len(x)}, H, W), "
                                 f"got {tuple(h.shape)}{hint}")
            if not np.isfinite(h).all():
                raise ValueError(f"explain_fn {name!r}: returned NaN or inf")
            out.append(h.astype(np.float64))
    shapes = {o.shape[1:] for o in out}
    if len(shapes) > 1:
        raise ValueError(f"explain_fn {name!r}: returned maps of different sizes {sorted(shapes)}")
    return np.concatenate(out)


def _summarise(per: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    g = per.groupby(keys, sort=False)
    cols = {}
    for c in ("spearman", "abs_spearman", "ssim"):
        cols[c] = (c, "mean")
        cols[f"{c}_std"] = (c, "std")
    cols["n_images"] = ("image", "nunique")
    return g.agg(**cols).reset_index()


def _prepare(explain_fn: Any, model: Any, images: Any, batch_size: Any, reduce: Any, device: Any):
    """Checks shared by the sanity studies; returns (fns, model, images on the CPU, batch_size,
    device, logits of the images)."""
    fns = _check_explain_fns(explain_fn)
    model = check_model(model)
    images = check_image_batch(images, "images")
    if len(images) == 0:
        raise ValueError("images: expected at least one image, got an empty batch")
    batch_size = check_positive_int(batch_size, "batch_size")
    if reduce not in ("mean", "none"):
        raise ValueError(f"reduce: expected 'mean' or 'none', got {reduce!r}")
    device = model_device(model) if device is None else torch.device(device)
    images = images.detach().cpu()
    logits = batched_logits(model, images, batch_size=batch_size, device=device)
    return fns, model, images, batch_size, device, logits


def class_sensitivity(
    explain_fn: ExplainFn | Mapping[str, ExplainFn],
    model: nn.Module,
    images: torch.Tensor,
    *,
    classes: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    reduce: str = "mean",
) -> pd.DataFrame:
    """How much the explanation of the predicted class differs from those of other classes.

    For each image, the explanation for the predicted class is compared with the
    explanation for the runner-up class (second highest score) and for a random class other
    than the predicted one, drawn uniformly from ``classes``.

    Args:
        explain_fn: ``explain_fn(model, x, target) -> (B, H, W)`` or ``{method name: explain_fn}``.
        model: the classifier (logits (B, K), K >= 2); not modified.
        images: (N, C, H, W) float.
        classes: candidate classes for the random comparison (default: all K).
        seed: seed of the random classes (``numpy.random.default_rng(seed)``).
        batch_size: images per call of ``explain_fn``.
        device: where to run (default: the model's device).
        reduce: ``"mean"``: one row per method and comparison with the mean (and std) of
            ``spearman``, ``abs_spearman`` and ``ssim`` over images and ``n_images``;
            ``"none"``: one row per method, image and comparison with ``predicted``,
            ``other`` (the class compared with) and the three similarities.

    Returns:
        DataFrame; ``comparison`` is ``"runner-up"`` or ``"random"``. Similarity 1 means the
        explanation ignores the class.
    """
    fns, model, images, batch_size, device, logits = _prepare(explain_fn, model, images, batch_size, reduce, device)
    k = logits.shape[1]
    if k < 2:
        raise ValueError(f"model: class sensitivity needs at least 2 classes, the model outputs {k}")
    top2 = logits.topk(2, dim=1).indices
    predicted, runner_up = top2[:, 0], top2[:, 1]
    if classes is None:
        cand = np.arange(k)
    else:
        cl = list(classes) if not isinstance(classes, (torch.Tensor, np.ndarray)) else classes
        if len(cl) == 0:
            raise ValueError("classes: expected a non-empty sequence of class indices, got an empty one")
        cand = np.unique(check_targets(cl, len(cl), k, "classes").numpy())
    rng = np.random.default_rng(seed)
    rand = np.empty(len(images), dtype=np.int64)
    for i, p in enumerate(predicted.tolist()):
        others = cand[cand != p]
        if others.size == 0:
            raise ValueError(f"classes: no class other than the predicted class {p} of image {i} to draw from")
        rand[i] = rng.choice(others)
    random_t = torch.from_numpy(rand)

    rows = []
    for name, fn in fns.items():
        base = _explain(fn, name, model, images, predicted, batch_size, device)
        for comparison, other in (("runner-up", runner_up), ("random", random_t)):
            h = _explain(fn, name, model, images, other, batch_size, device)
            if h.shape != base.shape:
                raise ValueError(f"explain_fn {name!r}: maps for different classes differ in shape "
                                 f"{base.shape} vs {h.shape}")
            sims = _similarities(base, h)
            rows.append(pd.DataFrame({"method": name, "comparison": comparison,
                                      "image": np.arange(len(images)), "predicted": predicted.numpy(),
                                      "other": other.numpy(), **sims}))
    per = pd.concat(rows, ignore_index=True)
    return per if reduce == "none" else _summarise(per, ["method", "comparison"])


# ----------------------------------------------------------------------------- randomisation
def default_random_layers(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Names of the Conv/Linear modules from the top of the network down.

    With ``example`` (an input batch) the order is the order in which the modules run in a
    forward pass (modules that do not run are left out); without it, the reverse of the
    registration order of ``model.named_modules()`` (the forward order for ``nn.Sequential``
    models such as ``vxnb.models``).
    """
    model = check_model(model)
    named = [(n, m) for n, m in model.named_modules() if n and isinstance(m, RANDOMIZED_TYPES)]
    if not named:
        raise ValueError(f"model: has no {', '.join(t.__name__ for t in RANDOMIZED_TYPES)} module to randomise")
    if example is None:
        return [n for n, _ in reversed(named)]
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: order.append(n) if n not in order else None)
               for n, m in named]
    try:
        with torch.no_grad(), eval_mode(model):
            batched_logits(model, example, batch_size=len(example), arg="example")
    finally:
        for hd in handles:
            hd.remove()
    return list(reversed(order))


def _layer_seed(seed: int, j: int) -> int:
    return int(np.random.SeedSequence([seed, j]).generate_state(1, np.uint64)[0] % (2**63 - 1))


def _reinit(layer: nn.Module, name: str, init: str, std: float, seed: int) -> None:
    subs = [m for m in layer.modules() if any(True for _ in m.parameters(recurse=False))]
    for j, sub in enumerate(subs):
        s = _layer_seed(seed, j)
        if init == "reset":
            if not hasattr(sub, "reset_parameters"):
                raise ValueError(f"layers: module {name!r} contains a {type(sub).__name__} without "
                                 "reset_parameters(); use init='normal'")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                fresh = copy.deepcopy(sub).cpu()
                fresh.reset_parameters()
            with torch.no_grad():
                for p, q in zip(sub.parameters(recurse=False), fresh.parameters(recurse=False)):
                    p.copy_(q)
        else:
            g = torch.Generator().manual_seed(s)
            with torch.no_grad():
                for p in sub.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)


def randomize_cascade(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    *,
    seed: int = 0,
    init: str = "reset",
    std: float = 0.01,
    mode: str = "cascade",
    example: torch.Tensor | None = None,
) -> Iterator[tuple[str, nn.Module]]:
    """Models with more and more layers re-initialised, from the top (Adebayo et al. 2018).

    Args:
        model: the trained model; never modified (every yielded model is a deep copy, on the
            same device).
        layers: module names in the order to randomise them (first = first randomised);
            default :func:`default_random_layers` (all Conv/Linear modules, top first).
            A named module that is a container has all its parametrised submodules re-initialised.
        seed: seeds the re-initialisation (layer ``j`` of the list uses a seed derived from
            ``(seed, j)``, the same on CPU and GPU).
        init: ``"reset"``: each module's own ``reset_parameters()`` (PyTorch's default
            initialisation, e.g. Kaiming-uniform weights for Conv/Linear), run on a CPU copy
            under a forked, seeded RNG; ``"normal"``: every parameter (weights and biases)
            drawn from N(0, std²), as in Adebayo et al.
        std: standard deviation for ``init="normal"``.
        mode: ``"cascade"``: step j has layers[0..j] randomised; ``"independent"``: only
            layers[j].
        example: an input batch used to find the forward order when ``layers`` is None.

    Returns:
        An iterator of ``(layer name, randomised model)``, one per layer. Argument errors
        are raised at the call, not at the first ``next``.
    """
    model = check_model(model)
    if layers is None:
        names = default_random_layers(model, example)
    else:
        names = check_layer_names(model, layers, "layers")
        modules = dict(model.named_modules())
        empty = [n for n in names if not any(True for _ in modules[n].parameters())]
        if empty:
            raise ValueError(f"layers: {empty} have no parameters to randomise")
    if init not in ("reset", "normal"):
        raise ValueError(f"init: expected 'reset' or 'normal', got {init!r}")
    if mode not in ("cascade", "independent"):
        raise ValueError(f"mode: expected 'cascade' or 'independent', got {mode!r}")
    check_positive_number(std, "std")
    check_nonnegative_int(seed, "seed")
    if init == "reset":  # fail now rather than half-way
        for n in names:
            for sub in dict(model.named_modules())[n].modules():
                if any(True for _ in sub.parameters(recurse=False)) and not hasattr(sub, "reset_parameters"):
                    raise ValueError(f"layers: module {n!r} contains a {type(sub).__name__} without "
                                     "reset_parameters(); use init='normal'")

    def gen() -> Iterator[tuple[str, nn.Module]]:
        work = copy.deepcopy(model) if mode == "cascade" else None
        for j, n in enumerate(names):
            m = work if mode == "cascade" else copy.deepcopy(model)
            _reinit(dict(m.named_modules())[n], n, init, float(std), _layer_seed(int(seed), j))
            yield n, (copy.deepcopy(m) if mode == "cascade" else m)

    return gen()


def randomization_curve(
    explain_fn: ExplainFn | Mapping[str, ExplainFn],
    model: nn.Module,
    images: torch.Tensor,
    targets: Any = None,
    layers: Sequence[str] | None = None,
    *,
    seed: int = 0,
    init: str = "reset",
    mode: str = "cascade",
    batch_size: int = 32,
    device: torch.device | str | None = None,
    reduce: str = "mean",
    progress: bool | None = None,
) -> pd.DataFrame:
    """Similarity of explanations to the original ones as layers are randomised (cascade).

    Args:
        explain_fn: ``explain_fn(model, x, target) -> (B, H, W)`` or ``{method name: explain_fn}``.
        model: the trained model (not modified).
        images: (N, C, H, W) float.
        targets: the classes explained (int or (N,) ints); default the original model's
            predictions. The same targets are used for every randomised model.
        layers, seed, init, mode: as in :func:`randomize_cascade` (the default layer order
            is the forward order found by running ``images[:1]``).
        batch_size: images per call of ``explain_fn``.
        device: where to run (default: the model's device).
        reduce: ``"mean"``: one row per method and step with the mean (and std) of
            ``spearman``, ``abs_spearman``, ``ssim`` over images and ``n_images``;
            ``"none"``: one row per method, step and image.
        progress: show a progress bar over the steps (``None``: only on a terminal).

    Returns:
        DataFrame with columns ``method``, ``step`` (1 = the first layer randomised),
        ``layer`` (the layer randomised at that step) and the similarities. Spearman is NaN
        where a map is constant (averages skip NaN).
    """
    fns, model, images, batch_size, device, logits = _prepare(explain_fn, model, images, batch_size, reduce, device)
    if targets is None:
        targets_t = logits.argmax(1)
    else:
        targets_t = check_targets(targets, len(images), logits.shape[1], "targets")
    example = images[:1].to(device) if layers is None else None
    cascade = randomize_cascade(model, layers, seed=seed, init=init, mode=mode, example=example)
    original = {name: _explain(fn, name, model, images, targets_t, batch_size, device)
                for name, fn in fns.items()}
    rows = []
    for step, (layer, rmodel) in enumerate(tqdm(cascade, desc="randomisation",
                                                disable=None if progress is None else not progress), 1):
        for name, fn in fns.items():
            h = _explain(fn, name, rmodel, images, targets_t, batch_size, device)
            if h.shape != original[name].shape:
                raise ValueError(f"explain_fn {name!r}: maps changed shape {original[name].shape} -> {h.shape}")
            rows.append(pd.DataFrame({"method": name, "step": step, "layer": layer,
                                      "image": np.arange(len(images)), **_similarities(original[name], h)}))
        del rmodel
    per = pd.concat(rows, ignore_index=True)
    order = {name: i for i, name in enumerate(fns)}
    per = per.sort_values(["method", "step", "image"], key=lambda c: c.map(order) if c.name == "method" else c,
                          kind="stable", ignore_index=True)
    return per if reduce == "none" else _summarise(per, ["method", "step", "layer"])
