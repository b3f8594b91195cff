"""The sanity checks of notebook 06 on a run: class sensitivity and model randomisation per method.

Thin layer over :mod:`vxnb.evaluate.sanity` that builds the explain functions of the compared
methods, runs both checks on the same test images and returns tidy tables:

>>> fns = sanity_methods(rel, k=5)                 # {"Ours": fn, "Deconv+GB": fn, "Grad-CAM": fn}
>>> res = sanity_study(fns, model, images)         # SanityResult
>>> res.sensitivity_summary()                      # method × comparison (runner-up, random)
>>> res.randomization_summary()                    # method × step (layers randomised from the top)
>>> out = run_study(cfg, mu=10.0, k=5, n_images=60)  # the same on a run folder, tables saved as CSV

**Ours after randomisation.** The relevant features (the μ-lasso weights W) stay those learnt on
the *trained* model; only the explanation is recomputed with the randomised weights: the
descriptor x (hence the responses r = w ∘ x and the top-k features) and the resampled
DeconvNet+GB maps come from the randomised network.

**Constant maps.** An explanation can be constant (all zero): ours when no relevant feature of
the explained class responds (r ≤ 0), Grad-CAM when the ReLU removes every weighted channel.
Its Spearman correlation is undefined (NaN, skipped by the means; ``n_constant`` counts such
pairs); its SSIM is computed on the normalised (all-zero) map, so it is low against any
non-constant map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from vxnb._checks import check_nonnegative_int, check_positive_int, check_positive_number
from vxnb.baselines import METHOD_LABELS
from vxnb.evaluate.sanity import class_sensitivity, randomization_curve
from vxnb.utils import check_image_batch, describe, eval_mode
from vxnb.studies import runs

__all__ = [
    "SANITY_METHODS",
    "METHOD_LABELS",
    "SIMILARITIES",
    "sanity_methods",
    "explain_classes",
    "row_similarities",
    "SanityResult",
    "sanity_study",
    "summarize",
    "run_study",
]

#: The methods compared by default (names of ``vxnb.baselines.attribution`` and ``"ours"``).
SANITY_METHODS: tuple[str, ...] = ("ours", "deconv_gb", "gradcam")
#: The similarity columns of every table.
SIMILARITIES: tuple[str, ...] = ("spearman", "abs_spearman", "ssim")

ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], Any]


# ============================================================================ explain functions
def _baseline_fn(method: str, layer: str | None) -> ExplainFn:
    from vxnb.baselines import attribution

    def fn(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return attribution(method, model, x, target, layer=layer)

    fn.__name__ = method
    return fn


def sanity_methods(relevant: Any = None, k: int = 5, methods: Sequence[str] = SANITY_METHODS, *,
                   layer: str | None = None, resample: bool = True, labels: bool = True) -> dict[str, ExplainFn]:
    """The explain functions ``fn(model, x, target) -> (B, H, W)`` of the compared methods.

    Args:
        relevant: ``"ours"`` only: a :class:`vxnb.relevance.Relevance` (or the DataFrame of
            ``vxnb.relevance.relevant_features``); required when ``methods`` holds ``"ours"``.
        k: ``"ours"``: top-k features combined (``vxnb.explanations.make_explain_fn``).
        methods: ``"ours"`` and / or names of ``vxnb.baselines.METHODS``.
        layer: the layer of the Grad-CAM family / activation maps (default: the last conv's ReLU).
        resample: ``"ours"``: the resampled DeconvNet+GB (the paper's).
        labels: key the dict by display name (:data:`METHOD_LABELS`) instead of method name.

    Returns:
        ``{name: explain_fn}`` in the order of ``methods``.
    """
    from vxnb.baselines import METHODS as BASELINES
    from vxnb.explanations import make_explain_fn

    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise TypeError(f"methods: expected a non-empty sequence of method names, got {describe(methods)}")
    known = ("ours",) + tuple(BASELINES)
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(f"methods: unknown method(s) {bad}; expected some of {list(known)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods: duplicated names in {list(methods)}")
    fns: dict[str, ExplainFn] = {}
    for m in methods:
        if m == "ours":
            if relevant is None:
                raise ValueError("relevant: method 'ours' needs the relevant features "
                                 "(vxnb.relevance.Relevance.from_path(path, features, mu)), got None")
            fn = make_explain_fn(relevant, k, resample=resample)
        else:
            fn = _baseline_fn(m, layer)
        fns[METHOD_LABELS.get(m, m) if labels else m] = fn
    return fns


def _check_fns(explain_fns: Any) -> dict[str, ExplainFn]:
    if isinstance(explain_fns, Mapping) and explain_fns and all(callable(f) for f in explain_fns.values()):
        return dict(explain_fns)
    raise TypeError("explain_fns: expected a non-empty dict {name: explain_fn(model, x, target) -> (B, H, W)} "
                    f"(e.g. sanity_methods(relevant)), got {describe(explain_fns)}")


def explain_classes(explain_fns: Mapping[str, ExplainFn], model: nn.Module, image: torch.Tensor,
                    classes: Sequence[int]) -> dict[str, torch.Tensor]:
    """The heatmaps of one image for several classes by every method (for the class widget).

    Args:
        explain_fns: ``{name: explain_fn}`` (:func:`sanity_methods`).
        model: the classifier.
        image: (C, H, W) or (1, C, H, W) float.
        classes: the classes to explain (ints in 0..K-1).

    Returns:
        ``{name: (len(classes), H', W') float tensor on the CPU}``, each map min-max normalised
        to [0, 1] (all zero when constant).
    """
    fns = _check_fns(explain_fns)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    if isinstance(image, torch.Tensor) and image.dim() == 3:
        image = image.unsqueeze(0)
    x = check_image_batch(image, "image")
    if x.shape[0] != 1:
        raise ValueError(f"image: expected one image (C, H, W) or (1, C, H, W), got shape {tuple(x.shape)}")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    x = x.to(device)
    with eval_mode(model), torch.no_grad():
        n_out = model(x).shape[1]
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (Sequence, np.ndarray, torch.Tensor)):
        raise TypeError(f"classes: expected a sequence of class indices, got {describe(classes)}")
    cl = [int(c) for c in classes] if len(classes) else []
    if not cl or any(isinstance(c, (bool, np.bool_)) for c in classes):
        raise ValueError(f"classes: expected a non-empty sequence of class indices, got {classes!r}")
    bad = [c for c in cl if not 0 <= c < n_out]
    if bad:
        raise ValueError(f"classes: class {bad[0]} is out of range for a model with {n_out} outputs "
                         f"(valid: 0..{n_out - 1})")
    xs = x.expand(len(cl), *x.shape[1:])
    t = torch.tensor(cl, dtype=torch.long, device=device)
    out = {}
    with eval_mode(model):
        for name, fn in fns.items():
            h = torch.as_tensor(fn(model, xs, t)).detach().float().cpu()
            if h.dim() != 3 or h.shape[0] != len(cl):
                raise ValueError(f"explain_fns[{name!r}]: expected heatmaps ({len(cl)}, H, W), got {tuple(h.shape)}")
            lo = h.amin(dim=(1, 2), keepdim=True)
            span = h.amax(dim=(1, 2), keepdim=True) - lo
            out[name] = torch.where(span > 0, (h - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                                    torch.zeros_like(h))
    return out


def row_similarities(maps: Mapping[str, Any]) -> pd.DataFrame:
    """Similarity of row 0 of every method's maps to each other row (of :func:`explain_classes`).

    Returns one row per method and compared row ``r >= 1``: ``method, row, spearman, ssim``
    (Spearman NaN when a map is constant)."""
    from vxnb.evaluate.sanity import spearman, ssim

    if not isinstance(maps, Mapping) or not maps:
        raise TypeError(f"maps: expected a non-empty dict {{method: (R, H, W) maps}}, got {describe(maps)}")
    rows = []
    for name, h in maps.items():
        h = h.detach().cpu().double().numpy() if isinstance(h, torch.Tensor) else np.asarray(h, dtype=np.float64)
        if h.ndim != 3 or len(h) < 2:
            raise ValueError(f"maps[{name!r}]: expected (R, H, W) maps with R >= 2, got shape {h.shape}")
        a = np.broadcast_to(h[:1], h[1:].shape)
        for r, (sp, ss) in enumerate(zip(spearman(a, h[1:]), ssim(a, h[1:])), 1):
            rows.append(dict(method=name, row=r, spearman=float(sp), ssim=float(ss)))
    return pd.DataFrame(rows, columns=["method", "row", "spearman", "ssim"])


# ============================================================================ the study
def summarize(per_image: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Mean and std of the similarities per group of ``keys`` (groups in order of appearance).

    Columns: ``keys``, ``spearman``, ``spearman_std``, ``abs_spearman``, ``abs_spearman_std``,
    ``ssim``, ``ssim_std``, ``n_images``, ``n_constant`` (pairs whose Spearman is undefined
    because a map is constant; skipped by the Spearman means).
    """
    if not isinstance(per_image, pd.DataFrame):
        raise TypeError(f"per_image: expected a DataFrame, got {describe(per_image)}")
    missing = [c for c in (*keys, *SIMILARITIES, "image") if c not in per_image.columns]
    if missing:
        raise ValueError(f"per_image: missing column(s) {missing}")
    g = per_image.groupby(list(keys), sort=False)
    cols: dict[str, Any] = {}
    for c in SIMILARITIES:
        cols[c] = (c, "mean")
        cols[f"{c}_std"] = (c, "std")
    cols["n_images"] = ("image", "nunique")
    cols["n_constant"] = ("spearman", lambda s: int(s.isna().sum()))
    return g.agg(**cols).reset_index()


@dataclass(eq=False)
class SanityResult:
    """Per-image results of :func:`sanity_study`.

    Attributes:
        sensitivity: one row per method, comparison (``"runner-up"``, ``"random"``) and image:
            ``method, comparison, image, predicted, other, spearman, abs_spearman, ssim``
            (similarity of the explanation of the predicted class to that of the other class).
        randomization: one row per method, step and image: ``method, step, layer, image,
            spearman, abs_spearman, ssim`` (similarity to the trained model's explanation after
            randomising layers[0..step-1], top first).
    """

    sensitivity: pd.DataFrame
    randomization: pd.DataFrame

    def sensitivity_summary(self) -> pd.DataFrame:
        """Means over images per method and comparison (see :func:`summarize`)."""
        return summarize(self.sensitivity, ["method", "comparison"])

    def randomization_summary(self) -> pd.DataFrame:
        """Means over images per method and step (see :func:`summarize`)."""
        return summarize(self.randomization, ["method", "step", "layer"])


def sanity_study(explain_fns: Mapping[str, ExplainFn], model: nn.Module, images: torch.Tensor, *,
                 layers: Sequence[str] | None = None, randomize: bool = True, seed: int = 0,
                 init: str = "reset", batch_size: int = 32, device: torch.device | str | None = None,
                 progress: bool | None = None) -> SanityResult:
    """Both sanity checks for every method on the same images.

    Args:
        explain_fns: ``{name: explain_fn(model, x, target) -> (B, H, W)}`` (:func:`sanity_methods`).
        model: the trained classifier (not modified).
        images: (N, C, H, W) float.
        layers: the layers randomised, top first (default: every Conv/Linear module in forward
            order, reversed; see ``vxnb.evaluate.sanity.randomize_cascade``).
        randomize: run the cascading randomisation (False: an empty ``randomization`` table).
        seed: random comparison classes and re-initialisation.
        init: ``"reset"`` (PyTorch's default initialisation) or ``"normal"`` (N(0, 0.01²)).
        batch_size, device, progress: as in ``vxnb.evaluate.sanity``.

    Returns:
        :class:`SanityResult`. Both checks explain the original model's predicted class.
    """
    fns = _check_fns(explain_fns)
    sens = class_sensitivity(fns, model, images, seed=seed, batch_size=batch_size, device=device, reduce="none")
    if randomize:
        rnd = randomization_curve(fns, model, images, layers=layers, seed=seed, init=init, batch_size=batch_size,
                                  device=device, reduce="none", progress=progress)
    else:
        rnd = pd.DataFrame({"method": pd.Series(dtype=object), "step": pd.Series(dtype=np.int64),
                            "layer": pd.Series(dtype=object), "image": pd.Series(dtype=np.int64),
                            **{c: pd.Series(dtype=np.float64) for c in SIMILARITIES}})
    return SanityResult(sensitivity=sens, randomization=rnd)


# ============================================================================ on a run folder
def run_study(cfg: Any, *, mu: float = 10.0, k: int = 5, n_images: int | None = 60,
              methods: Sequence[str] = SANITY_METHODS, randomize: bool = True, data: Any = None,
              seed: int | None = None, save: bool = True, progress: bool = True) -> dict[str, Any]:
    """Both sanity checks on a run (``vxnb.studies.runs``): model, relevant features at ``mu``, test images.

    Loads (or trains / computes) the run's model, training features and μ-lasso path, builds
    ``Relevance.from_path(path, features, mu)``, takes ``n_images`` class-stratified test images
    (seeded by ``cfg.seed``) and runs :func:`sanity_study`. With ``save``, writes the per-image
    tables ``sanity-sensitivity-mu<mu>.csv`` and ``sanity-randomization-mu<mu>.csv`` into the run
    folder (``runs.save_table``).

    Returns:
        ``{"config", "model", "data", "classes", "relevant", "explain_fns", "images", "labels",
        "positions", "result", "sensitivity", "randomization"}`` with the two summaries
        (:meth:`SanityResult.sensitivity_summary`, :meth:`SanityResult.randomization_summary`)
        carrying a ``dataset`` column (``"MNIST"`` or ``"an8Flower <variant>"``).
    """
    from vxnb.data import dataset_labels
    from vxnb.studies.benchmark import stratified_indices
    from vxnb.relevance import Relevance

    if not isinstance(cfg, runs.RunConfig):
        raise TypeError(f"cfg: expected a vxnb.studies.runs.RunConfig, got {describe(cfg)}")
    check_positive_number(mu, "mu")
    k = check_positive_int(k, "k")
    n_images = check_positive_int(n_images, "n_images", allow_none=True)
    seed = cfg.seed if seed is None else check_nonnegative_int(seed, "seed")
    data = data if data is not None else runs.load_data(cfg, progress=progress)
    train, test, classes = data
    model, _ = runs.get_model(cfg, data=data, progress=progress)
    relevant = None
    if "ours" in methods:
        feats = runs.get_features(cfg, model, "train", data=data, progress=progress)
        path = runs.get_lasso_path(cfg, feats, mu_max=max(50.0, float(mu)))
        relevant = Relevance.from_path(path, feats, float(mu), classes)
    fns = sanity_methods(relevant, k, methods)
    pos = stratified_indices(dataset_labels(test), n_images, seed=seed)
    items = [test[int(i)] for i in pos]
    images = torch.stack([it[0] for it in items]).float()
    labels = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
    result = sanity_study(fns, model, images, randomize=randomize, seed=seed, progress=progress)
    if save:
        runs.save_table(cfg, f"sanity-sensitivity-mu{mu:g}", result.sensitivity)
        if randomize:
            runs.save_table(cfg, f"sanity-randomization-mu{mu:g}", result.randomization)
    name = cfg.spec.display_name(cfg)
    return {"config": cfg, "model": model, "data": data, "classes": list(classes), "relevant": relevant,
            "explain_fns": fns, "images": images, "labels": labels, "positions": pos, "result": result,
            "sensitivity": result.sensitivity_summary().assign(dataset=name),
            "randomization": result.randomization_summary().assign(dataset=name)}
