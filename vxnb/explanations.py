"""Visual explanations at test time (Sec. 3.2 of the paper) and the visual-quality comparison (Sec. 4.2).

At training time the μ-lasso selects, for every class j, a sparse weight vector w_j over the
filter-wise responses x (``vxnb.lasso``, ``vxnb.relevance``). At test time an image is pushed
through the network, giving the prediction ĵ; its descriptor x (``vxnb.features.descriptors``)
gives the response ``r = w_ĵ ∘ x`` of every relevant feature; the k features (layer, channel)
with the largest positive response are visualised with the resampled DeconvNet + guided
backprop of ``vxnb.deconv`` (Sec. 3.3):

>>> rel = Relevance.from_path(path, feats, mu=10.0)      # W = path.coef(10.0) and its columns
>>> e = explain(model, rel, image, k=5)                   # one image (C, H, W)
>>> e.features                                            # the top-k: layer, channel, weight, response
>>> e.heatmaps.shape, e.combined.shape                    # (k, H, W), (H, W)
>>> H = explain_batch(model, rel, images, k=5)            # combined heatmaps (B, H, W)
>>> fn = make_explain_fn(rel, k=5)                        # fn(model, x, target) for vxnb.evaluate

The **combined heatmap** (what the an8Flower benchmark scores as "ours") is, by default
(``combine="max"``), the pixel-wise maximum of the k normalised heatmaps, renormalised to
[0, 1], as in the authors' released code: on single-6c (five folds, 300 images each) it scored
+2.5 ± 1.0 points of IoU area above the weighted sum in every fold (Wilcoxon p = 4e-58 over
the 1500 images). ``combine="weighted"`` is the response-weighted sum:

    c = Σ_i r_i · h_i,    combined = (c − min c) / (max c − min c)     (all zero if c is constant)

with h_i = ``vxnb.deconv.heatmap(v_i)`` ∈ [0, 1] (the colour-summed |v_i|, min-max normalised per
map) and r_i > 0 the response of feature i. Dividing c by Σ r_i would change nothing.
:func:`feature_heatmaps` returns the k maps before they are combined, drawn by the
resampled or the plain DeconvNet+GB or as upsampled activation maps (Table 1's three rows).

:func:`compare_methods` computes the paper's Fig. 2 / Fig. 7 comparison for chosen (layer,
channel) pairs: upsampled activation maps, DeconvNet+GB (plain, ``resample=False``) and ours
(``resample=True``), each with its grid-artifact score (``vxnb.deconv.grid_score`` at the
layer's total stride, :func:`total_stride`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._checks import check_bool, check_choice, check_class, check_model, check_positive_int
from ._graph import first_conv_in_channels, stride_at
from .deconv import (RecordedForward, as_composite, grid_score, heatmap, record_forward, run_backward,
                     signed_rgb, visualize)
from .features import default_layers, descriptors, layer_numbers
from .features.hooks import layout as feature_layout
from .relevance import Relevance, top_features
from .utils import check_image_batch, describe, eval_mode, get_module

__all__ = [
    "Explanation",
    "explain",
    "explain_batch",
    "make_explain_fn",
    "combine_heatmaps",
    "feature_heatmaps",
    "COMBINES",
    "DEFAULT_COMBINE",
    "DRAWS",
    "total_stride",
    "comparison_features",
    "compare_methods",
    "Comparison",
    "COMPARISON_METHODS",
    "FEATURE_COLUMNS",
]

#: Columns of :attr:`Explanation.features`.
FEATURE_COLUMNS = ("rank", "feature", "layer", "layer_number", "kind", "channel", "weight", "x", "response")
#: Rows of the visual-quality comparison (paper, Fig. 2 / Fig. 7).
COMPARISON_METHODS = ("upsampled activation", "Deconv+GB", "ours (resampled)")


# ============================================================================ checks
def _check_k(k: Any) -> int:
    return check_positive_int(k, "k", "the number of features to show")


def _check_relevance(relevant: Any) -> Relevance:
    if isinstance(relevant, Relevance):
        return relevant
    if isinstance(relevant, pd.DataFrame):
        return Relevance.from_frame(relevant)
    raise TypeError("relevant: expected a vxnb.relevance.Relevance (e.g. Relevance.from_path(path, features, mu)) "
                    f"or the DataFrame of vxnb.relevance.relevant_features, got {describe(relevant)}")


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, (p.dtype if p.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


def _check_single_image(model: nn.Module, image: Any, arg: str = "image") -> Tensor:
    if not isinstance(image, Tensor):
        raise TypeError(f"{arg}: expected a float torch.Tensor (C, H, W) or (1, C, H, W), got {describe(image)}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    elif image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"{arg}: expected one image (C, H, W) or (1, C, H, W), got shape {tuple(image.shape)}"
                         + (" (use explain_batch for a batch)" if image.dim() == 4 else ""))
    return _prepare_batch(model, image, arg)


def _prepare_batch(model: nn.Module, x: Any, arg: str) -> Tensor:
    x = check_image_batch(x, arg, channels=first_conv_in_channels(model))
    if x.shape[0] == 0:
        raise ValueError(f"{arg}: empty batch")
    device, dtype = _device_dtype(model)
    return x.to(device=device, dtype=dtype)


def _check_targets(targets: Any, B: int, C: int, arg: str = "targets") -> np.ndarray | None:
    if targets is None:
        return None
    if isinstance(targets, Tensor):
        if targets.is_floating_point() or targets.dtype == torch.bool or targets.dim() > 1:
            raise TypeError(f"{arg}: expected integer class indices, got {describe(targets)}")
        targets = targets.detach().cpu().numpy()
    if isinstance(targets, (int, np.integer)) and not isinstance(targets, (bool, np.bool_)):
        t = np.full(B, int(targets), dtype=np.int64)
    else:
        arr = np.asarray(targets)
        if arr.ndim == 0:
            return _check_targets(arr.item() if np.issubdtype(arr.dtype, np.integer) else targets, B, C, arg)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{arg}: expected an int, a sequence of {B} ints or None, got {describe(targets)}")
        if arr.shape[0] != B:
            raise ValueError(f"{arg}: expected one class per image ({B}), got {arr.shape[0]}")
        t = arr.astype(np.int64)
    bad = t[(t < 0) | (t >= C)]
    if bad.size:
        raise ValueError(f"{arg}: class {int(bad[0])} is out of range for a model with {C} outputs (valid: 0..{C - 1})")
    return t


# ============================================================================ the forward pass
@contextlib.contextmanager
def _width_probe(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, int]]:
    """Record the number of channels of each layer's output during a forward pass (dim 1, or
    the last dim of a token tensor / channels-last map: ``vxnb.features.hooks.layout``)."""
    widths: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Callable:
        last = _seed_layout(model, name)[0] == "last"

        def fn(module: nn.Module, inp: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.dim() >= 2:
                widths.setdefault(name, int(out.shape[-1] if last and out.dim() > 2 else out.shape[1]))
        return fn

    try:
        for n in layers:
            handles.append(get_module(model, n).register_forward_hook(hook(n)))
        yield widths
    finally:
        for h in handles:
            h.remove()


def _forward(model: nn.Module, x: Tensor, rel: Relevance, layers: Sequence[str],
             rec: RecordedForward | None = None) -> tuple[Tensor, Tensor | None, np.ndarray]:
    """One forward pass: logits (B, C), the descriptor of ``rel``'s columns restricted to
    ``layers`` (B, m_sub) (None without layers) and the rows of ``rel.columns`` it holds.
    With ``rec`` (a ``vxnb.deconv.RecordedForward`` of ``x``), the pass runs under the DeconvNet
    rules and is kept, so the visualisations need no second forward."""
    if not layers:
        with eval_mode(model), torch.no_grad():
            logits = model(x)
        return _check_logits(logits, x.shape[0]), None, np.zeros(0, dtype=np.int64)
    with _width_probe(model, layers) as widths:
        if rec is None:
            desc, logits = descriptors(model, x, layers=list(layers), return_output=True)
        else:
            with rec.forward() as x_leaf:
                desc, logits = descriptors(model, x_leaf, layers=list(layers), return_output=True, keep_graph=True)
            desc = desc.detach()
    logits = _check_logits(logits, x.shape[0])
    offsets, start = {}, 0
    for n in layers:
        offsets[n] = start
        start += widths[n]
    rows = np.flatnonzero(rel.columns["layer"].isin(layers).to_numpy())
    sub = rel.columns.iloc[rows]
    ch = sub["channel"].to_numpy()
    w = sub["layer"].map(widths).to_numpy()
    if (ch >= w).any():
        i = int(np.flatnonzero(ch >= w)[0])
        raise ValueError(f"relevant: feature ({sub['layer'].iloc[i]!r}, channel {ch[i]}) does not exist: that layer "
                         f"has {w[i]} channels in this model (was W learnt on another model?)")
    pos = torch.as_tensor(sub["layer"].map(offsets).to_numpy() + ch, device=desc.device)
    return logits, desc[:, pos], rows


def _check_logits(logits: Any, B: int) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != B:
        raise ValueError(f"model: expected logits of shape (B, num_classes), got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else describe(logits)}")
    return logits.detach()


def _top(rel: Relevance, model: nn.Module, x: Tensor, targets: Any, k: int, rec: RecordedForward | None = None
         ) -> tuple[Tensor, np.ndarray, np.ndarray, pd.DataFrame, Relevance]:
    """Forward + top-k. Returns logits, predicted (B,), explained classes (B,), the top-k
    frame (``image, rank, …``; see ``vxnb.relevance.top_features``) and the relevance used."""
    # layers of every class: the target is unknown before the forward (descriptors are cheap)
    layers = rel.layers
    logits, xs, rows = _forward(model, x, rel, layers, rec)
    C = logits.shape[1]
    if rel.n_classes != C:
        raise ValueError(f"relevant: W has {rel.n_classes} classes but the model has {C} outputs; "
                         "use the relevance learnt for this model")
    predicted = logits.argmax(1).cpu().numpy().astype(np.int64)
    t = _check_targets(targets, x.shape[0], C)
    cls = predicted if t is None else t
    if xs is None or len(rows) == 0:
        return logits, predicted, cls, _empty_top(), rel
    top = top_features(rel.W[rows], xs, cls, rel.columns.iloc[rows].reset_index(drop=True), k=k)
    # keep the feature ids of the full columns
    return logits, predicted, cls, top if len(top) else _empty_top(), rel


def _empty_top() -> pd.DataFrame:
    """The top-k frame without rows (built only when needed: ~1 ms of pandas)."""
    return pd.DataFrame({c: pd.Series(dtype=d) for c, d in
                         [("image", np.int64), ("rank", np.int64), ("class", np.int64), ("feature", np.int64),
                          ("layer", object), ("layer_number", np.int64), ("kind", object), ("channel", np.int64),
                          ("weight", np.float64), ("x", np.float64), ("response", np.float64)]})


# ============================================================================ maps
def _seed_layout(model: nn.Module, layer: str) -> tuple[str, int]:
    """Where ``layer``'s output holds the channels its features are taken from, as the
    descriptors see it (``vxnb.features.hooks.layout``): ``("first", 0)`` or ``("last", p)``."""
    kind, prefix = feature_layout(model, layer)
    return ("last", prefix) if kind in ("last", "tokens?") else ("first", 0)


def _layer_maps(model: nn.Module, x: Tensor, layer: str, chans: list[list[int]], resample: bool,
                rec: RecordedForward | None = None, composite: Any = None) -> Tensor:
    """(B, K, C, H, W): image b's channels ``chans[b]`` (padded with zero maps to K) at ``layer``.

    One image: ``vxnb.deconv.visualize`` with all its channels after one forward (or
    ``rec.visualize``: through ``rec``, the recorded prediction forward of :func:`explain`).
    Several: one forward and one batched backward with a per-image seed (image b, slot i
    carries the activation map of channel ``chans[b][i]``)."""
    K = max(len(c) for c in chans)
    if x.shape[0] == 1:
        lay = _seed_layout(model, layer)
        out = rec.visualize(layer, chans[0], lay) if rec is not None else None
        return out if out is not None else visualize(model, x, layer, chans[0], resample=resample,
                                                     composite=composite, layout=lay)
    kind, prefix = _seed_layout(model, layer)
    pad = [c + [-1] * (K - len(c)) for c in chans]
    idx = torch.as_tensor(pad, dtype=torch.long, device=x.device)  # (B, K), -1 = no map

    def seed(a: Tensor, i: int) -> Tensor:
        g = torch.zeros_like(a)
        q = idx[:, i]
        keep = torch.nonzero(q >= 0).reshape(-1)
        last = kind == "last" and a.dim() > 2
        n = a.shape[-1] if last else a.shape[1]
        if keep.numel():
            if int(q[keep].max()) >= n:
                raise IndexError(f"channel {int(q[keep].max())} is out of range for layer {layer!r} "
                                 f"({n} channels)")
            if not last:
                g[keep, q[keep]] = a[keep, q[keep]]
            elif a.dim() == 3:  # tokens (B, T, D): feature q at the patch tokens
                g[keep, prefix:, q[keep]] = a[keep, prefix:, q[keep]]
            else:  # channels-last map (B, H, W, C)
                g[keep, :, :, q[keep]] = a[keep, :, :, q[keep]]
        return g

    return run_backward(model, x, layer, resample, seed, K, composite)


#: How the top-k maps of an image become one map (:func:`combine_heatmaps`).
COMBINES = ("weighted", "max")
#: The one default of every function that combines top-k maps (here and in the benchmark).
DEFAULT_COMBINE = "max"
#: How the top-k features are drawn (:func:`feature_heatmaps`): resampled DeconvNet+GB (ours),
#: plain DeconvNet+GB, upsampled activation maps.
DRAWS = ("resampled", "deconv", "upsampled")


def combine_heatmaps(heatmaps: Tensor, responses: Tensor, combine: str = DEFAULT_COMBINE) -> Tensor:
    """The combined map of :func:`explain`, min-max normalised to [0, 1] per image (zeros when
    constant, e.g. no feature).

    ``combine="weighted"``: ``c = Σ_i r_i h_i`` over the k maps (ours). ``"max"``: the
    pixel-wise maximum of the maps with r_i > 0 (the authors' released code); slots with
    r_i = 0 (unused, or not drawable) are left out of both.

    heatmaps: (..., k, H, W) in [0, 1]; responses: (..., k), ≥ 0 (0 for unused slots).
    Returns (..., H, W)."""
    combine = check_choice(combine, "combine", COMBINES)
    if not isinstance(heatmaps, Tensor) or heatmaps.dim() < 3:
        raise TypeError(f"heatmaps: expected a tensor (..., k, H, W), got {describe(heatmaps)}")
    responses = torch.as_tensor(responses, dtype=heatmaps.dtype, device=heatmaps.device)
    if tuple(responses.shape) != tuple(heatmaps.shape[:-2]):
        raise ValueError(f"responses: expected shape {tuple(heatmaps.shape[:-2])}, got {tuple(responses.shape)}")
    if combine == "weighted":
        c = (heatmaps * responses[..., None, None]).sum(dim=-3)
    else:
        c = (heatmaps * (responses > 0)[..., None, None].to(heatmaps.dtype)).amax(dim=-3)
    lo = c.amin(dim=(-2, -1), keepdim=True)
    span = c.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (c - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(c))


def _activation_maps_for_top(model: nn.Module, x: Tensor, top: pd.DataFrame, k: int
                             ) -> tuple[Tensor, Tensor, np.ndarray]:
    """Upsampled activation maps (B, k, H, W) of the top-k features (ReLU'd channel map,
    bilinear to the input size, min-max normalised per map), their responses (B, k) and,
    per row of ``top``, whether it could be drawn: features of layers without a spatial
    map (fully connected) get a zero map and response 0, i.e. are left out. A token layer's
    patch tokens and a channels-last map are put on their grid first
    (:func:`vxnb.baselines.layer_maps`)."""
    from .baselines import layer_maps

    B, _, H, W = x.shape
    h = torch.zeros((B, k, H, W), device=x.device, dtype=x.dtype)
    r = torch.zeros((B, k), device=x.device, dtype=x.dtype)
    drawn = np.zeros(len(top), dtype=bool)
    if len(top) == 0:
        return h, r, drawn
    acts: dict[str, Tensor] = {}
    layers = list(dict.fromkeys(top["layer"]))
    handles = [get_module(model, l).register_forward_hook(
        lambda mod, i, o, l=l: acts.setdefault(l, o.detach()) if isinstance(o, Tensor) else None) for l in layers]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for hd in handles:
            hd.remove()
    maps = {l: layer_maps(model, l, a, (H, W)) for l, a in acts.items()}  # tokens on their grid
    for i, (b, rk, layer, ch, resp) in enumerate(zip(top["image"], top["rank"], top["layer"], top["channel"],
                                                     top["response"])):
        a = maps.get(layer)
        if a is None:
            continue
        m = a[int(b):int(b) + 1, int(ch)].clamp_min(0)[:, None]  # as vxnb.baselines' "activation"
        if tuple(m.shape[-2:]) != (H, W):
            m = torch.nn.functional.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
        h[int(b), int(rk)] = _minmax(m[0, 0].clamp_min(0))
        r[int(b), int(rk)] = float(resp)
        drawn[i] = True
    return h, r, drawn


def _maps_for_top(model: nn.Module, x: Tensor, top: pd.DataFrame, k: int, resample: bool,
                  rec: RecordedForward | None = None, composite: Any = None) -> tuple[Tensor, Tensor]:
    """Visualisations (B, k, C, H, W) by rank (zero where an image has fewer features) and
    the responses (B, k); ``rec``: the recorded forward of the one image ``x``."""
    B, C, H, W = x.shape
    v = torch.zeros((B, k, C, H, W), device=x.device, dtype=x.dtype)
    r = torch.zeros((B, k), device=x.device, dtype=x.dtype)
    if len(top) == 0:
        return v, r
    img = torch.tensor(top["image"].to_numpy(dtype=np.int64), device=x.device)
    rank = torch.tensor(top["rank"].to_numpy(dtype=np.int64), device=x.device)
    r[img, rank] = torch.tensor(top["response"].to_numpy(dtype=np.float64), dtype=x.dtype, device=x.device)
    for layer, g in top.groupby("layer", sort=False):
        images = sorted(set(g["image"].tolist()))
        chans = [g.loc[g["image"] == b, "channel"].astype(int).tolist() for b in images]
        ranks = [g.loc[g["image"] == b, "rank"].astype(int).tolist() for b in images]
        maps = _layer_maps(model, x[images], layer, chans, resample, rec, composite)  # (B', K, C, H, W)
        for i, b in enumerate(images):
            for slot, rk in enumerate(ranks[i]):
                v[b, rk] = maps[i, slot]
    return v, r


# ============================================================================ explain
@dataclass(eq=False)
class Explanation:
    """The visual explanation of one image (see :func:`explain`).

    Attributes:
        image: (C, H, W) the image explained (CPU).
        predicted: ĵ, the model's class; target: the class explained (ĵ unless overridden).
        probabilities: (C,) softmax of the logits (float64).
        features: the top-k' (k' ≤ k) features by response r = w_target ∘ x with r > 0, one row
            each: ``rank, feature, layer, layer_number, kind, channel, weight, x, response``.
        heatmaps: (k', H, W) in [0, 1], ``vxnb.deconv.heatmap`` of each feature's visualisation.
        rgb: (k', 3, H, W) in [0, 1], the signed visualisations (``vxnb.deconv.signed_rgb``).
        combined: (H, W) in [0, 1], the heatmaps combined (:func:`combine_heatmaps`: pixel-wise
            maximum by default), renormalised; all zero without features.
        classes: the class names; resample: whether the resampled DeconvNet was used.
        message: None, or why there is no feature (the class has no relevant feature at this μ,
            or none of them responds to the image).
    """

    image: Tensor
    predicted: int
    target: int
    probabilities: np.ndarray
    features: pd.DataFrame
    heatmaps: Tensor
    rgb: Tensor
    combined: Tensor
    classes: list[str] = field(default_factory=list)
    resample: bool = True
    message: str | None = None

    @property
    def k(self) -> int:
        return int(len(self.features))

    @property
    def predicted_name(self) -> str:
        return self.classes[self.predicted] if self.classes else str(self.predicted)

    @property
    def target_name(self) -> str:
        return self.classes[self.target] if self.classes else str(self.target)

    def __repr__(self) -> str:
        feats = ", ".join(f"{l}:{c}" for l, c in zip(self.features["layer"], self.features["channel"]))
        msg = f", message={self.message!r}" if self.message else ""
        return (f"Explanation(predicted={self.predicted_name!r} (p={self.probabilities[self.predicted]:.2f}), "
                f"target={self.target_name!r}, features=[{feats}]{msg})")


def explain(model: nn.Module, relevant: Relevance | pd.DataFrame, image: Tensor, k: int = 5,
            target: int | None = None, *, resample: bool = True, combine: str = DEFAULT_COMBINE,
            composite: Any = None) -> Explanation:
    """Explain the prediction of ``model`` on one image with its top-k relevant features.

    One forward pass gives the prediction ĵ (explained unless ``target`` is given) and the
    descriptor x on the layers holding relevant features; the response r = w_target ∘ x
    ranks the relevant features; the k strongest with r > 0 are visualised as
    ``vxnb.deconv.visualize`` does, carried back through that same forward (recorded under
    the DeconvNet rules: the network runs once), and turned into heatmaps
    (``vxnb.deconv.heatmap``). The **combined heatmap** is their pixel-wise
    maximum (``combine="max"``, default) or their response-weighted sum ``c = Σ_i r_i h_i``
    (``"weighted"``), renormalised to [0, 1] — the map the an8Flower benchmark scores as "ours".

    Args:
        model: the classifier (logits (B, C)); left as it was. Its forward runs under the
            DeconvNet rules, which compute the same outputs (a ``ReLU(inplace=True)`` then
            runs out of place: a forward that relies on its side effect is not supported).
        relevant: a :class:`Relevance` (e.g. ``Relevance.from_path(path, features, mu)``) or
            the DataFrame of ``vxnb.relevance.relevant_features``.
        image: float (C, H, W) or (1, C, H, W), C matching the model.
        k: the number of features to show (fewer when fewer respond).
        target: explain this class instead of the predicted one.
        resample: the paper's resampled DeconvNet+GB (False: plain DeconvNet+GB).
        combine: ``"weighted"`` (response-weighted sum) or ``"max"`` (pixel-wise maximum, the
            authors' code) — see :func:`combine_heatmaps`.
        composite: the DeconvNet rules of this call (``vxnb.deconv.Composite`` or a dict merged
            onto ``vxnb.deconv.DEFAULT_COMPOSITE``; None: the default).

    Returns:
        :class:`Explanation`. A class without relevant features, or whose features do not
        respond to the image, gives no features, an all-zero combined map and a ``message``.

    Raises:
        TypeError: model / relevant / image of the wrong type, an integer image, a non-int target.
        ValueError: image not (C, H, W) / (1, C, H, W) or with the wrong number of channels;
            target out of range; W's classes do not match the model's outputs; k < 1.
    """
    model = check_model(model)
    rel = _check_relevance(relevant)
    k = _check_k(k)
    combine = check_choice(combine, "combine", COMBINES)
    composite = as_composite(composite)
    check_bool(resample, "resample")
    if isinstance(target, Tensor) and target.numel() == 1 and not target.is_floating_point() \
            and target.dtype != torch.bool:
        target = int(target.item())
    if target is not None and (isinstance(target, (bool, np.bool_)) or not isinstance(target, (int, np.integer))):
        raise TypeError(f"target: expected a class index (int) or None, got {describe(target)}")
    x = _check_single_image(model, image)
    if isinstance(relevant, pd.DataFrame):  # a frame does not know the number of classes
        with eval_mode(model), torch.no_grad():
            rel = rel._padded(max(rel.n_classes, _check_logits(model(x), 1).shape[1]))
    # the prediction's forward is recorded under the rules and carries the signals back
    rec = record_forward(model, x, resample, rel.layers, composite)
    logits, predicted, cls, top, rel = _top(rel, model, x, target, k, rec)
    j = int(cls[0])
    probs = torch.softmax(logits[0].double(), 0).cpu().numpy()
    H, W = x.shape[-2:]
    top = top.drop(columns=["image", "class"]).reset_index(drop=True)[list(FEATURE_COLUMNS)]
    name = rel.classes[j]
    message = None
    if len(top) == 0:
        n_rel = int((rel.W[:, j] != 0).sum())
        mu = f" at μ = {rel.mu:g}" if rel.mu is not None else ""
        if n_rel == 0:
            message = f"class {name!r} ({j}) has no relevant feature{mu}: nothing to visualise (try a larger μ)"
        else:
            message = (f"none of the {n_rel} relevant features of class {name!r} ({j}) responds to this image "
                       "(all responses w∘x are ≤ 0)")
        z = torch.zeros((0, H, W))
        return Explanation(image=x[0].detach().cpu(), predicted=int(predicted[0]), target=j, probabilities=probs,
                           features=top, heatmaps=z, rgb=torch.zeros((0, 3, H, W)), combined=torch.zeros((H, W)),
                           classes=list(rel.classes), resample=resample, message=message)
    kk = len(top)
    v, r = _maps_for_top(model, x, top.assign(image=0), kk, resample, rec, composite)
    del rec  # the recorded graph
    h = heatmap(v[0])                                                   # (k', H, W)
    combined = combine_heatmaps(h, r[0], combine)
    return Explanation(image=x[0].detach().cpu(), predicted=int(predicted[0]), target=j, probabilities=probs,
                       features=top, heatmaps=h.detach().cpu(), rgb=signed_rgb(v[0]).detach().cpu(),
                       combined=combined.detach().cpu(), classes=list(rel.classes), resample=resample)


def explain_batch(model: nn.Module, relevant: Relevance | pd.DataFrame, images: Tensor, k: int = 5,
                  targets: Any = None, *, resample: bool = True, combine: str = DEFAULT_COMBINE, batch_size: int = 32,
                  progress: bool = False, composite: Any = None) -> Tensor:
    """Combined heatmaps (B, H, W) of :func:`explain` for a batch of images, on the model's device.

    images: float (B, C, H, W). targets: None (the predicted classes), an int for all or one
    class per image (sequence, array or LongTensor). Each chunk of ``batch_size`` images takes
    one forward for the descriptors and, per layer holding a top-k feature of any image, one
    forward and one batched backward (each image carrying its own channels). Images of a class
    without responding features get an all-zero map. ``combine``: see :func:`combine_heatmaps`.
    """
    combine = check_choice(combine, "combine", COMBINES)
    check_bool(resample, "resample")
    h, r, _ = feature_heatmaps(model, relevant, images, k, targets, draw="resampled" if resample else "deconv",
                               batch_size=batch_size, progress=progress, composite=composite)
    return combine_heatmaps(h, r, combine).detach()


def feature_heatmaps(model: nn.Module, relevant: Relevance | pd.DataFrame, images: Tensor, k: int = 5,
                     targets: Any = None, *, draw: str = "resampled", batch_size: int = 32,
                     progress: bool = False, composite: Any = None) -> tuple[Tensor, Tensor, pd.DataFrame]:
    """The top-k relevant features of each image drawn one way, before they are combined.

    The features are those of :func:`explain` (the k largest responses r = w_ĵ ∘ x > 0 of the
    explained class); ``draw`` says how each is drawn: ``"resampled"`` (ours,
    ``heatmap(visualize(..., resample=True))``), ``"deconv"`` (plain DeconvNet+GB,
    ``resample=False``) or ``"upsampled"`` (the ReLU'd activation map of the channel,
    upsampled bilinearly and min-max normalised). Upsampled activation maps of fully connected
    features do not exist: those slots get a zero map and response 0 (left out of any
    combination) and ``drawn = False`` in the returned frame.

    Returns ``(heatmaps (B, k, H, W) in [0, 1], responses (B, k) (0 for unused or undrawable
    slots), features)``: one row per (image, rank) with ``image, rank, class, feature, layer,
    layer_number, kind, channel, weight, x, response, drawn``. Combine with
    :func:`combine_heatmaps`. ``composite``: the DeconvNet rules (see :func:`explain`).
    """
    model = check_model(model)
    rel = _check_relevance(relevant)
    k = _check_k(k)
    draw = check_choice(draw, "draw", DRAWS)
    composite = as_composite(composite)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    x_all = _prepare_batch(model, images, "images")
    B = x_all.shape[0]
    if isinstance(relevant, pd.DataFrame):
        with eval_mode(model), torch.no_grad():
            rel = rel._padded(max(rel.n_classes, _check_logits(model(x_all[:1]), 1).shape[1]))
    # the shape of targets now; their range once the model's number of outputs is known
    t_all = _check_targets(targets, B, np.iinfo(np.int64).max, "targets")
    hs, rs, frames = [], [], []
    starts = range(0, B, int(batch_size))
    for s in tqdm(starts, desc="explain", disable=None if progress else True, leave=False):
        x = x_all[s:s + batch_size]
        t = None if t_all is None else t_all[s:s + batch_size]
        _, _, _, top, _ = _top(rel, model, x, t, k)
        if draw == "upsampled":
            h, r, drawn = _activation_maps_for_top(model, x, top, k)
        else:
            v, r = _maps_for_top(model, x, top, k, draw == "resampled", composite=composite)
            h, drawn = heatmap(v), np.ones(len(top), dtype=bool)
        hs.append(h.detach())
        rs.append(r.detach())
        frames.append(top.assign(image=top["image"].to_numpy(dtype=np.int64) + s, drawn=drawn))
    feats = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return torch.cat(hs), torch.cat(rs), feats


def make_explain_fn(relevant: Relevance | pd.DataFrame, k: int = 5, *, resample: bool = True,
                    combine: str = DEFAULT_COMBINE, batch_size: int = 32) -> Callable[[nn.Module, Tensor, Any], Tensor]:
    """``fn(model, x, target) -> (B, H, W)`` (the explain-function signature of
    ``vxnb.evaluate``): the combined heatmaps of :func:`explain_batch`."""
    rel = _check_relevance(relevant)
    k = _check_k(k)
    combine = check_choice(combine, "combine", COMBINES)

    def explain_fn(model: nn.Module, x: Tensor, target: Any = None) -> Tensor:
        return explain_batch(model, rel, x, k, target, resample=resample, combine=combine, batch_size=batch_size)

    explain_fn.__name__ = "ours (resampled)" if resample else "ours (plain)"
    return explain_fn


# ============================================================================ visual-quality comparison
def total_stride(model: nn.Module, x: Tensor, layer: str) -> int:
    """The product of the strides of the Conv2d / MaxPool2d / AvgPool2d layers on the path from
    the input to ``layer``'s output (itself included; a parallel branch such as a ResNet
    downsample counts once), i.e. the period of the grid the plain DeconvNet leaves at that layer
    (pass it to ``vxnb.deconv.grid_score``); a fully connected layer has that of the last feature
    map before it. For a rectangular stride the larger of the two counts. x: (B, C, H, W), whose
    size is used (``vxnb._graph.stride_at``)."""
    model = check_model(model)
    x = _prepare_batch(model, x, "x")
    return stride_at(model, layer, tuple(x.shape[1:]))[0]


def comparison_features(model: nn.Module, relevant: Relevance | pd.DataFrame | None, image: Tensor,
                        layers: dict[str, str] | None = None, target: int | None = None) -> pd.DataFrame:
    """The (layer, channel) pairs to compare at a low, a high and an FC layer (Fig. 2 / 7).

    layers: ``{column label: layer name}``; default ``{"low": the first conv layer of
    ``vxnb.features.default_layers`` with a total stride > 1 (where grid artifacts appear),
    "high": the last conv layer, "FC": the first fully connected one}`` (labels without such a
    layer are left out). In each layer the channel is the relevant feature of the target
    class (default: the predicted one) with the largest response w∘x (``source`` =
    "relevant"), else the channel with the largest descriptor value x ("most active").

    Returns ``column, layer, layer_number, kind, channel, source``.
    """
    model = check_model(model)
    x = _check_single_image(model, image)
    table = layer_numbers(model)
    meta = {h: (int(n), k) for h, n, k in zip(table["hook"], table["layer_number"], table["kind"])}
    if layers is None:
        defaults = default_layers(model)
        conv = [l for l in defaults if meta.get(l, (0, ""))[1] == "conv"]
        fc = [l for l in defaults if meta.get(l, (0, ""))[1] == "fc"]
        layers = {}
        if conv:
            low = next((l for l in conv if total_stride(model, x, l) > 1), conv[0])
            layers["low"] = low
            if conv[-1] != low:
                layers["high"] = conv[-1]
        if fc:
            layers["FC"] = fc[0]
    if not isinstance(layers, dict) or not layers:
        raise TypeError(f"layers: expected a non-empty {{label: layer name}} dict or None, got {describe(layers)}")
    names = list(dict.fromkeys(layers.values()))
    for n in names:
        get_module(model, n)
    with _width_probe(model, names) as widths:
        desc, logits = descriptors(model, x, layers=names, return_output=True)
    logits = _check_logits(logits, 1)
    j = int(logits.argmax(1)) if target is None else check_class(target, logits.shape[1], "target")
    rel = _check_relevance(relevant) if relevant is not None else None
    offsets, s = {}, 0
    for n in names:
        offsets[n] = s
        s += widths[n]
    d = desc[0].cpu().double().numpy()
    rows = []
    for label, n in layers.items():
        xs = d[offsets[n]:offsets[n] + widths[n]]
        ch, source = int(np.argmax(xs)), "most active"
        if rel is not None and j < rel.n_classes:
            cand = rel.columns[(rel.columns["layer"] == n) & (rel.W[:, j] > 0)]
            cand = cand[cand["channel"] < widths[n]]
            if len(cand):
                resp = rel.W[cand.index.to_numpy(), j] * xs[cand["channel"].to_numpy()]
                if resp.max() > 0:
                    ch, source = int(cand["channel"].iloc[int(np.argmax(resp))]), "relevant"
        num, kind = meta.get(n, (0, "other"))
        if rel is not None and (rel.columns["layer"] == n).any():
            r0 = rel.columns[rel.columns["layer"] == n].iloc[0]
            num, kind = int(r0["layer_number"]), str(r0["kind"])
        rows.append(dict(column=label, layer=n, layer_number=num, kind=kind, channel=ch, source=source))
    return pd.DataFrame(rows, columns=["column", "layer", "layer_number", "kind", "channel", "source"])


@dataclass(eq=False)
class Comparison:
    """The visual-quality comparison of one image (see :func:`compare_methods`).

    image: (C, H, W); features: one row per column (``column, layer, layer_number, kind,
    channel``, …); methods: the rows; maps: ``{method: [(H, W) map in [0, 1] or None (not
    applicable) per column]}``; scores: ``method, column, layer, layer_number, kind, channel,
    stride, grid_score`` (NaN where not applicable).
    """

    image: Tensor
    features: pd.DataFrame
    methods: tuple[str, ...]
    maps: dict[str, list[Tensor | None]]
    scores: pd.DataFrame


def _minmax(h: Tensor) -> Tensor:
    lo, hi = h.min(), h.max()
    return (h - lo) / (hi - lo) if hi > lo else torch.zeros_like(h)


def compare_methods(model: nn.Module, image: Tensor, features: pd.DataFrame,
                    methods: Sequence[str] = COMPARISON_METHODS) -> Comparison:
    """Heatmaps of one image for each (layer, channel) of ``features`` by each method.

    ``"upsampled activation"``: the channel's ReLU'd activation map upsampled bilinearly
    (``vxnb.baselines.attribution("activation", …, channel=q)``), min-max normalised; None
    (not applicable) at fully connected layers. ``"Deconv+GB"``: ``heatmap(visualize(…,
    resample=False))``; ``"ours (resampled)"``: ``resample=True``. Each map gets its
    ``vxnb.deconv.grid_score`` at the layer's :func:`total_stride`.

    features: a DataFrame with ``layer, channel`` (and optionally ``column, layer_number,
    kind``), e.g. :func:`comparison_features`.
    """
    from .baselines import attribution

    model = check_model(model)
    x = _check_single_image(model, image)
    if not isinstance(features, pd.DataFrame) or not {"layer", "channel"} <= set(features.columns) or not len(features):
        raise TypeError("features: expected a non-empty DataFrame with columns layer, channel, "
                        f"got {describe(features)}")
    methods = tuple(methods)
    bad = [m for m in methods if m not in COMPARISON_METHODS]
    if bad or not methods:
        raise ValueError(f"methods: expected some of {COMPARISON_METHODS}, got {list(methods)}")
    feats = features.reset_index(drop=True).copy()
    if "column" not in feats.columns:
        feats["column"] = [f"{l}:{c}" for l, c in zip(feats["layer"], feats["channel"])]
    for c, default in (("layer_number", 0), ("kind", "other")):
        if c not in feats.columns:
            feats[c] = default
    maps: dict[str, list[Tensor | None]] = {m: [] for m in methods}
    rows = []
    for _, f in feats.iterrows():
        layer, ch = str(f["layer"]), int(f["channel"])
        stride, spatial = stride_at(model, layer, tuple(x.shape[1:]))
        for m in methods:
            h: Tensor | None
            if m == "upsampled activation":  # only for convolutional maps (B, C, h, w)
                h = (_minmax(attribution("activation", model, x, None, layer=layer, channel=ch)[0])
                     if spatial else None)
            else:
                h = heatmap(visualize(model, x, layer, [ch], resample=(m == "ours (resampled)")))[0, 0]
            h = None if h is None else h.detach().cpu()
            maps[m].append(h)
            score = float(grid_score(h, stride)) if h is not None else float("nan")
            rows.append(dict(method=m, column=f["column"], layer=layer, layer_number=int(f["layer_number"]),
                             kind=f["kind"], channel=ch, stride=stride, grid_score=score))
    return Comparison(image=x[0].detach().cpu(), features=feats, methods=methods, maps=maps,
                      scores=pd.DataFrame(rows))
