"""Ground truth for the interpretation itself: do the selected features encode the class part?

an8Flower is rendered here, so every test image has a *counterfactual* twin
(``An8Flower(..., counterfactual=k)``): the same pose, crop, rotation, clutter and distractor,
with only the class-defining attribute (the colour of the class part) swapped to another
class's. For each selected feature j of class c this module measures

* **causal specificity** (:func:`causal_specificity`): the relative drop of j's response over
  the images of class c when c's attribute is swapped away,
  ``drop = (mean x_j - mean x_j^cf) / max(|mean x_j|, |mean x_j^cf|)`` in [-1, 1] (1: the
  response vanishes; 0: unchanged; negative: it grows; symmetric and bounded, so a feature
  that barely fires cannot dominate a mean);
* **part precision** (:func:`part_precision`): the mean, over j's top patches, of the share of
  the patch's receptive field (clipped to the image) that lies inside the class-defining
  part's mask of the patch's image.

and compares feature *selectors* at the same number of features per class
(:func:`select_features`: the μ-lasso, top-|w| of an L2 logistic regression on the same X,
the highest mean CRP channel relevance (:func:`crp_channel_relevance`, zennit-crp), the
highest mean activation for the class, random), with the mean ± 95 % interval over folds and
seeds and a Wilcoxon signed-rank test of the μ-lasso against each (:func:`compare_selectors`).

Everything here works on arrays, frames and models; the study over run folders lives in
:mod:`vxnb.studies.counterfactual`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._checks import check_model, check_positive_int
from .._graph import ReceptiveField
from ..utils import check_layer_names, describe, eval_mode, model_device

__all__ = [
    "SELECTORS",
    "select_features",
    "selection_frame",
    "causal_specificity",
    "part_precision",
    "crp_channel_relevance",
    "shortcut_detection",
    "distractor_precision",
    "compare_selectors",
    "mean_ci",
]

#: The feature selectors compared, the μ-lasso first (the reference of the Wilcoxon tests).
SELECTORS: tuple[str, ...] = ("mu-lasso", "logistic", "crp", "activation", "random")


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def _matrix(X: Any, arg: str, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    if not isinstance(X, np.ndarray) or X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
        raise TypeError(f"{arg}: expected a 2-D numeric array (numpy or torch), got {describe(X)}")
    if rows is not None and X.shape[0] != rows:
        raise ValueError(f"{arg}: expected {rows} rows, got {X.shape[0]}")
    if cols is not None and X.shape[1] != cols:
        raise ValueError(f"{arg}: expected {cols} columns, got {X.shape[1]}")
    if not np.isfinite(X).all():
        raise ValueError(f"{arg}: contains NaN or infinite values")
    return np.asarray(X, dtype=np.float64)


def _labels(labels: Any, n: int, arg: str = "labels") -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise ValueError(f"{arg}: expected {n} non-negative int class ids, got {describe(y)}")
    return y.astype(np.int64)


def _k_per_class(k: Any, C: int) -> np.ndarray:
    if isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)):
        return np.full(C, check_positive_int(k, "k"), dtype=np.int64)
    kk = np.asarray(k)
    if kk.shape != (C,) or not np.issubdtype(kk.dtype, np.integer) or (kk < 0).any():
        raise ValueError(f"k: expected a positive int or {C} ints >= 0 (one per class), got {describe(k)}")
    return kk.astype(np.int64)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores (ties: the lower index first)."""
    return np.argsort(-scores, kind="stable")[:k].astype(np.int64)


# --------------------------------------------------------------------------------------------
# selectors
# --------------------------------------------------------------------------------------------
def select_features(method: str, X: Any = None, labels: Any = None, k: Any = 5, *, W: Any = None,
                    relevance: Any = None, n_classes: int | None = None, seed: int = 0,
                    C: float = 1.0) -> list[np.ndarray]:
    """The features (column indices of X) that ``method`` selects for every class.

    method: one of :data:`SELECTORS`:
        ``"mu-lasso"``: the k entries of W's column c (``W`` (m, C), the μ-lasso's weights) with
        the largest weight among the non-zero ones (the order of ``vxnb.relevance``);
        ``"logistic"``: the k largest |w| of an L2-regularised multinomial logistic regression
        (scikit-learn, inverse strength ``C``) fitted on X (columns standardised) and labels;
        ``"crp"``: the k highest mean CRP relevances over the class's images (``relevance``
        (N, m), e.g. :func:`crp_channel_relevance`);
        ``"activation"``: the k highest mean responses X over the class's images;
        ``"random"``: k distinct features drawn with ``numpy.random.default_rng(seed)``.
    k: features per class: an int, or one int per class (e.g. the μ-lasso's non-zero counts,
        so every selector takes the same number).

    Returns a list of C int arrays (the selected columns of each class, best first). A
    μ-lasso column with fewer than k non-zero weights is an error (raise μ or lower k).
    """
    if not isinstance(method, str) or method not in SELECTORS:
        raise ValueError(f"method: expected one of {SELECTORS}, got {describe(method)}")
    if method == "mu-lasso":
        if W is None:
            raise ValueError("W: the 'mu-lasso' selector needs the lasso's weights W (m, C)")
        Wm = _matrix(W, "W")
        m, n_cls = Wm.shape
        ks = _k_per_class(k, n_cls)
        out = []
        for c in range(n_cls):
            nz = np.flatnonzero(Wm[:, c] != 0)
            if len(nz) < ks[c]:
                raise ValueError(f"k: class {c} has {len(nz)} non-zero μ-lasso weights, fewer than k={ks[c]}; "
                                 "solve at a larger μ or ask for fewer features")
            out.append(nz[_top(Wm[nz, c], ks[c])])
        return out
    Xm = _matrix(X, "X")
    n, m = Xm.shape
    y = _labels(labels, n)
    n_cls = int(y.max()) + 1 if n_classes is None else check_positive_int(n_classes, "n_classes")
    if y.max() >= n_cls:
        raise ValueError(f"labels: expected ids below n_classes={n_cls}, got {int(y.max())}")
    ks = _k_per_class(k, n_cls)
    if (ks > m).any():
        raise ValueError(f"k: expected at most m={m} features per class, got {int(ks.max())}")
    if method == "random":
        rng = np.random.default_rng(seed)
        return [np.sort(rng.choice(m, size=int(kc), replace=False)).astype(np.int64) for kc in ks]
    if method == "logistic":
        return _logistic(Xm, y, n_cls, ks, C)
    if method == "crp":
        if relevance is None:
            raise ValueError("relevance: the 'crp' selector needs per-image channel relevances (N, m); "
                             "see crp_channel_relevance")
        score_of = _matrix(relevance, "relevance", rows=n, cols=m)
    else:
        score_of = Xm
    out = []
    for c in range(n_cls):
        rows = y == c
        if not rows.any():
            raise ValueError(f"labels: class {c} has no image; cannot rank its features")
        out.append(_top(score_of[rows].mean(axis=0), ks[c]))
    return out


def _logistic(X: np.ndarray, y: np.ndarray, n_cls: int, ks: np.ndarray, C: float) -> list[np.ndarray]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if isinstance(C, bool) or not isinstance(C, (int, float)) or not C > 0:
        raise ValueError(f"C: expected a number > 0, got {describe(C)}")
    Xs = StandardScaler().fit_transform(X)
    clf = LogisticRegression(C=float(C), max_iter=2000)
    clf.fit(Xs, y)
    coef = clf.coef_
    if coef.shape[0] == 1:  # two classes: one row for class 1, its negative for class 0
        coef = np.vstack([-coef[0], coef[0]])
    full = np.zeros((n_cls, X.shape[1]))
    full[clf.classes_] = coef
    return [_top(np.abs(full[c]), ks[c]) for c in range(n_cls)]


def selection_frame(selected: Sequence[np.ndarray], columns: pd.DataFrame | None = None,
                    selector: str | None = None) -> pd.DataFrame:
    """One row per (class, feature): class, rank, feature[, layer, channel][, selector]."""
    rows = [(c, r, int(j)) for c, feats in enumerate(selected) for r, j in enumerate(feats)]
    out = pd.DataFrame(rows, columns=["class", "rank", "feature"])
    if columns is not None:
        out["layer"] = columns["layer"].to_numpy()[out["feature"]] if len(out) else []
        out["channel"] = columns["channel"].to_numpy()[out["feature"]].astype(np.int64) if len(out) else []
    if selector is not None:
        out.insert(0, "selector", selector)
    return out


# --------------------------------------------------------------------------------------------
# the two measures
# --------------------------------------------------------------------------------------------
def causal_specificity(X: Any, X_cf: Any, labels: Any, selected: Sequence[np.ndarray]) -> pd.DataFrame:
    """Response drop of every selected feature when its class's attribute is swapped away.

    X, X_cf: (N, m) responses of the factual images and of their counterfactual twins (same
        row order); labels: (N,) the factual classes; selected: per class, the feature columns.

    Returns one row per (class, feature): class, rank, feature, response (mean of X[:, j]
    over the class's images), response_cf (the same over their twins) and
    ``drop = (response - response_cf) / max(|response|, |response_cf|)`` (NaN where both are 0).
    """
    Xm = _matrix(X, "X")
    Xc = _matrix(X_cf, "X_cf", rows=Xm.shape[0], cols=Xm.shape[1])
    y = _labels(labels, Xm.shape[0])
    sel = _check_selected(selected, Xm.shape[1])
    rows = []
    for c, feats in enumerate(sel):
        on = y == c
        if len(feats) and not on.any():
            raise ValueError(f"labels: class {c} has selected features but no image")
        for r, j in enumerate(feats):
            a, b = float(Xm[on, j].mean()), float(Xc[on, j].mean())
            scale = max(abs(a), abs(b))
            rows.append((c, r, int(j), a, b, (a - b) / scale if scale > 0 else np.nan))
    return pd.DataFrame(rows, columns=["class", "rank", "feature", "response", "response_cf", "drop"])


def _check_selected(selected: Any, m: int) -> list[np.ndarray]:
    if not isinstance(selected, (list, tuple)):
        raise TypeError(f"selected: expected a list of int arrays (one per class), got {describe(selected)}")
    out = []
    for c, feats in enumerate(selected):
        f = np.asarray(feats)
        if f.ndim != 1 or (f.size and (not np.issubdtype(f.dtype, np.integer) or f.min() < 0 or f.max() >= m)):
            raise ValueError(f"selected[{c}]: expected feature columns in 0..{m - 1}, got {describe(feats)}")
        out.append(f.astype(np.int64))
    return out


def part_precision(top: pd.DataFrame, fields: Mapping[str, ReceptiveField], masks: Any,
                   image_size: Any) -> pd.DataFrame:
    """Share of the top patches' receptive fields inside the class-defining part's mask.

    top: top patches (``vxnb.interpret.TopPatches.to_frame()`` or ``top_patch_table``): columns
        layer, channel, index (dataset index of the image), row, col (the unit; -1 for FC).
    fields: the receptive field of every layer in ``top`` (``vxnb.interpret.receptive_field``).
    masks: ``masks[index]`` -> bool (H, W) mask of that image's class part (an array (N, H, W),
        or a callable ``index -> mask``).
    image_size: (H, W) of the images (an int for squares).

    Returns one row per (layer, channel): layer, channel, n_patches and ``precision``, the
    mean over its patches of (mask pixels in the field's box, clipped to the image) / (box
    pixels). A unit that sees the whole image counts the whole image.
    """
    if not isinstance(top, pd.DataFrame) or not {"layer", "channel", "index", "row", "col"} <= set(top.columns):
        raise TypeError(f"top: expected a DataFrame with columns layer, channel, index, row, col, got {describe(top)}")
    H, W = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
    get = masks if callable(masks) else (lambda i: masks[i])
    missing = sorted(set(top["layer"]) - set(fields))
    if missing:
        raise ValueError(f"fields: no receptive field for layers {missing}")
    share = np.empty(len(top))
    for t, (layer, idx, r, c) in enumerate(zip(top["layer"], top["index"], top["row"], top["col"])):
        m = get(int(idx))
        m = m.numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
        if m.shape != (H, W):
            raise ValueError(f"masks: expected ({H}, {W}) masks, got {describe(m)} for image {idx}")
        rf = fields[layer]
        if rf.whole_image or r < 0:
            t0, l0, b0, r0 = 0, 0, H, W
        else:
            t0, l0, b0, r0 = rf.clipped_box(int(r), int(c), H, W)
        area = max(b0 - t0, 0) * max(r0 - l0, 0)
        share[t] = m[t0:b0, l0:r0].sum() / area if area else np.nan
    frame = pd.DataFrame({"layer": top["layer"].to_numpy(), "channel": top["channel"].to_numpy(), "share": share})
    out = frame.groupby(["layer", "channel"], sort=False).agg(n_patches=("share", "size"), precision=("share", "mean"))
    return out.reset_index()


def shortcut_detection(selected: pd.DataFrame, precision: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Whether a class's selected features found a planted shortcut (issue 27, item 4).

    selected: one row per (class, selected feature) with columns class, layer, channel (e.g.
        :func:`selection_frame` with the feature columns).
    precision: :func:`part_precision` computed against the *distractor* masks
        (``An8Flower.distractor_mask``) instead of the class-part masks: columns layer, channel,
        precision -- the share of a feature's top patches on the distractor.
    threshold: a feature points at the shortcut when that share is at least this.

    Returns one row per class: class, n_features, best (the largest share among its
    features), detected (best >= threshold). The detection rate of a model trained with the
    shortcut is ``detected.mean()``; the same on a model trained at distractor rate 0 (with
    top patches collected on images that carry distractors) is the false-alarm rate.
    """
    for name, frame, cols in (("selected", selected, {"class", "layer", "channel"}),
                              ("precision", precision, {"layer", "channel", "precision"})):
        if not isinstance(frame, pd.DataFrame) or not cols <= set(frame.columns):
            raise TypeError(f"{name}: expected a DataFrame with columns {sorted(cols)}, got {describe(frame)}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold: expected a number in (0, 1], got {describe(threshold)}")
    share = precision.set_index(["layer", "channel"])["precision"]
    missing = [(lay, ch) for lay, ch in zip(selected["layer"], selected["channel"]) if (lay, ch) not in share.index]
    if missing:
        raise ValueError(f"precision: no row for the selected features {missing[:5]}")
    vals = selected[["class"]].copy()
    vals["share"] = [float(share.loc[(lay, ch)]) for lay, ch in zip(selected["layer"], selected["channel"])]
    out = vals.groupby("class").agg(n_features=("share", "size"), best=("share", "max")).reset_index()
    out["detected"] = out["best"] >= threshold
    return out


def distractor_precision(model: nn.Module, probe: Any, features: Any, *, k: int = 20, batch_size: int = 64,
                         progress: bool = True) -> pd.DataFrame:
    """:func:`part_precision` of ``features`` against the planted distractors of ``probe``.

    probe: an ``An8Flower`` rendered with a distractor rate > 0 (or a ``Subset`` of one) -- the
        images whose top patches are collected and whose ``distractor_mask`` is the truth.
    features: as for ``vxnb.interpret.top_patch_table`` (a frame with layer, channel, or pairs).
    Returns one row per feature: layer, channel, n_patches, precision (the share of its top-k
    patches' receptive fields on the distractor); feed it to :func:`shortcut_detection`.
    """
    from ..interpret import receptive_field, top_patch_table

    model = check_model(model)
    base, indices = (probe.dataset, list(probe.indices)) if hasattr(probe, "indices") else (probe, None)
    if not hasattr(base, "distractor_mask") or "distractor" not in getattr(base, "index", pd.DataFrame()).columns:
        raise ValueError(f"probe: expected an An8Flower with distractors (knobs.distractor_rate > 0) or a Subset "
                         f"of one, got {describe(probe)}")
    top = top_patch_table(model, probe, features, k=check_positive_int(k, "k"), batch_size=batch_size,
                          progress=progress)
    fields = {layer: receptive_field(model, layer, input_size=base.size) for layer in top["layer"].unique()}
    mask_of = (lambda i: base.distractor_mask(int(indices[i]))) if indices is not None else base.distractor_mask
    return part_precision(top, fields, mask_of, base.size)


# --------------------------------------------------------------------------------------------
# CRP channel relevance (zennit-crp)
# --------------------------------------------------------------------------------------------
def crp_channel_relevance(model: nn.Module, images: Any, labels: Any, layers: Sequence[str] | str, *,
                          batch_size: int = 32, composite: Any = None) -> np.ndarray:
    """Per-image relevance of every channel of ``layers`` for the image's own class (zennit-crp).

    The relevance of the logit of ``labels[i]`` is propagated with ``composite`` (default
    zennit's ``EpsilonPlusFlat`` with BatchNorm merged into the preceding convolution) and
    summed per channel (``ChannelConcept.attribute``, normalised by the sum of absolute
    values over the layer's channels). Returns (N, m) float64, the layers' channels side by
    side in the order given (the order of ``Features.columns`` for the same layers). The model
    is left as it was.
    """
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    model = check_model(model)
    layers = [layers] if isinstance(layers, str) else list(layers)
    check_layer_names(model, layers)
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim != 4:
        raise ValueError(f"images: expected a (N, C, H, W) batch, got {describe(x)}")
    y = _labels(labels, x.shape[0])
    batch_size = check_positive_int(batch_size, "batch_size")
    composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]) if composite is None else composite
    dev = model_device(model)
    cc = ChannelConcept()
    out = []
    with eval_mode(model):
        attribution = CondAttribution(model, no_param_grad=True)
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size].to(dev).float().requires_grad_(True)
            cond = [{"y": [int(c)]} for c in y[s:s + batch_size]]
            res = attribution(xb, cond, composite, record_layer=layers)
            out.append(np.concatenate([cc.attribute(res.relevances[name], abs_norm=True).detach().cpu().numpy()
                                       for name in layers], axis=1))
    return np.concatenate(out, axis=0).astype(np.float64)


# --------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------
def mean_ci(values: Any, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two ends of its Student-t ``level`` interval (NaNs dropped; NaN interval
    for fewer than two values)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return np.nan, np.nan, np.nan
    mean = float(v.mean())
    if len(v) < 2:
        return mean, np.nan, np.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return mean, mean - half, mean + half


def compare_selectors(table: pd.DataFrame, measure: str, *, reference: str = "mu-lasso",
                      units: Sequence[str] = ("fold", "seed")) -> pd.DataFrame:
    """Mean ± 95 % interval of ``measure`` per selector over ``units``, and a Wilcoxon
    signed-rank test of ``reference`` against each other selector, paired by unit.

    table: one row per (selector, unit..., [class, feature]); rows are first averaged to one
        value per (selector, unit) -- e.g. the mean drop over every selected feature of a fold
        and seed.
    Returns one row per selector: selector, n (units), mean, ci_low, ci_high, and for the
    others ``wilcoxon_p`` (two-sided; NaN when fewer than two paired units or all differences
    are zero) and ``reference_better`` (units where the reference's value is larger).
    """
    from scipy import stats

    units = list(units)
    need = {"selector", measure, *units}
    if not isinstance(table, pd.DataFrame) or not need <= set(table.columns):
        raise ValueError(f"table: expected a DataFrame with columns {sorted(need)}, got {describe(table)}")
    per_unit = table.groupby(["selector", *units], sort=False)[measure].mean().reset_index()
    wide = per_unit.pivot_table(index=units, columns="selector", values=measure)
    if reference not in wide.columns:
        raise ValueError(f"reference: {reference!r} is not among the selectors {list(wide.columns)}")
    rows = []
    for sel in per_unit["selector"].drop_duplicates():
        mean, lo, hi = mean_ci(wide[sel].to_numpy())
        row = {"selector": sel, "n": int(wide[sel].notna().sum()), "mean": mean, "ci_low": lo, "ci_high": hi,
               "wilcoxon_p": np.nan, "reference_better": np.nan}
        if sel != reference:
            pair = wide[[reference, sel]].dropna()
            d = pair[reference].to_numpy() - pair[sel].to_numpy()
            row["reference_better"] = int((d > 0).sum())
            if len(d) >= 2 and np.any(d != 0):
                row["wilcoxon_p"] = float(stats.wilcoxon(pair[reference], pair[sel]).pvalue)
        rows.append(row)
    return pd.DataFrame(rows)
