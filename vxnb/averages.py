"""Average images of the relevant features (Sec. 4.1 "Qualitative Analysis", Fig. 5; supplementary
"Visual Interpretation"), and how their crops fall on ground-truth masks.

For every class and each of its relevant features, the top training images by that feature's
response (:mod:`vxnb.interpret`: :class:`~vxnb.interpret.TopPatches` /
:func:`~vxnb.interpret.top_patch_table`) are cropped at the receptive field around the position
of the channel map's maximum (:func:`~vxnb.interpret.receptive_field`) and averaged; the same
crops of three heatmaps are averaged too (our resampled DeconvNet+GB, plain DeconvNet+GB, the
upsampled activation map). Receptive fields follow the convention of :mod:`vxnb.interpret`.

Average images
--------------
Images are ranked per feature by its response (default: the entry of the descriptor x the
lasso sees — the channel's L2 norm, L1-normalised over its layer, as ``vxnb.features``
computes it); the crop is centred on the argmax of the channel map. Crops that leave the
image are padded with zeros (or the image mean, ``pad="mean"``), also when the field is
larger than the whole image; every crop is resized to ``size`` × ``size`` (bilinear,
antialiased) before averaging. FC features crop the whole image, and have no upsampled
activation average (None). The heatmap averages use ``vxnb.deconv.visualize`` /
``heatmap``; without that module they raise NotImplementedError (``methods=("activation",)``
still works).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ._graph import ReceptiveField, state_to_rf, walk_model
from .interpret import TopPatches, as_dataset, collate_images
from ._checks import check_positive_int
from .utils import describe, eval_mode, model_device

__all__ = [
    "crop_patch",
    "AverageImage",
    "AverageImages",
    "average_images",
    "mask_overlap",
]


def crop_patch(image: torch.Tensor, box: Sequence[int], pad: str | float = "zeros") -> torch.Tensor:
    """Crop ``box = (top, left, bottom, right)`` (exclusive) from ``image`` (C, H, W) or (H, W).

    Parts of the box outside the image are padded: ``pad="zeros"`` (default) fills 0,
    ``"mean"`` the image's per-channel mean, a float that value. The result always has the
    box's size (bottom - top, right - left), also when the box is larger than the image.
    """
    if not isinstance(image, torch.Tensor) or image.dim() not in (2, 3):
        raise ValueError(f"image: expected a (C, H, W) or (H, W) tensor, got {describe(image)}")
    if len(box) != 4 or not all(isinstance(v, (int, np.integer)) for v in box):
        raise ValueError(f"box: expected 4 ints (top, left, bottom, right), got {box!r}")
    top, left, bottom, right = (int(v) for v in box)
    if bottom <= top or right <= left:
        raise ValueError(f"box: expected bottom > top and right > left, got {tuple(box)}")
    squeeze = image.dim() == 2
    img = image.unsqueeze(0) if squeeze else image
    c, h, w = img.shape
    if pad == "zeros":
        fill = torch.zeros(c, 1, 1, dtype=img.dtype, device=img.device)
    elif pad == "mean":
        fill = img.mean(dim=(1, 2), keepdim=True)
    elif isinstance(pad, (int, float)) and not isinstance(pad, bool):
        fill = torch.full((c, 1, 1), float(pad), dtype=img.dtype, device=img.device)
    else:
        raise ValueError(f"pad: expected 'zeros', 'mean' or a number, got {pad!r}")
    out = fill.expand(c, bottom - top, right - left).clone()
    t, l, b, r = max(top, 0), max(left, 0), min(bottom, h), min(right, w)
    if b > t and r > l:
        out[:, t - top:b - top, l - left:r - left] = img[:, t:b, l:r]
    return out[0] if squeeze else out


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) → (N, C, *size), bilinear with antialiasing when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


@dataclass
class AverageImage:
    """The average crops of one (class, feature).

    image: (C, S, S) float32 average of the image crops, in [0, 1].
    ours, deconv, activation: (S, S) float32 averages of the same crops of our resampled
        DeconvNet+GB heatmaps, plain DeconvNet+GB heatmaps and upsampled activation maps
        (each map min-max normalised to [0, 1] per image before cropping), or None when not
        computed — ``activation`` is always None for FC features, which have no map.
    indices: (n,) dataset indices of the images used (rank order); boxes: (n, 4) crop boxes
        (top, left, bottom, right) in image pixels (may extend beyond the image: padded).
    """

    klass: Any
    feature: Any
    layer: str
    channel: int
    kind: str
    weight: float
    rf: ReceptiveField
    indices: np.ndarray
    boxes: np.ndarray
    image: np.ndarray
    ours: np.ndarray | None = None
    deconv: np.ndarray | None = None
    activation: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(len(self.indices))


@dataclass
class AverageImages:
    """Result of :func:`average_images`.

    items: {(class, feature): AverageImage} in class order, features in ``relevant``'s order.
    summary: one row per item (class, class_name, feature, layer, layer_number, channel, kind,
        weight, n, whole_image, rf_size_h, rf_size_w, crop_padded — the fraction of crop
        pixels that were padding).
    messages: notes such as "class 3 has no relevant feature".
    """

    items: dict = field(default_factory=dict)
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    messages: list[str] = field(default_factory=list)

    def __getitem__(self, key) -> AverageImage:
        return self.items[key]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items.values())

    def for_class(self, klass: Any) -> list[AverageImage]:
        return [v for (c, _), v in self.items.items() if c == klass]


_METHODS = ("ours", "deconv", "activation")


def _top_table(top_patches: Any) -> pd.DataFrame:
    if isinstance(top_patches, TopPatches):
        return top_patches.to_frame()
    if isinstance(top_patches, pd.DataFrame):
        need = {"layer", "channel", "rank", "index", "row", "col"}
        missing = need - set(top_patches.columns)
        if missing:
            raise ValueError(f"top_patches: the DataFrame lacks columns {sorted(missing)} "
                             "(expected TopPatches.to_frame())")
        return top_patches
    raise TypeError(f"top_patches: expected a TopPatches or its to_frame() DataFrame, got {describe(top_patches)}")


def _check_relevant(relevant: Any) -> pd.DataFrame:
    if not isinstance(relevant, pd.DataFrame):
        raise TypeError("relevant: expected the DataFrame of vxnb.relevance.relevant_features (class, feature, "
                        f"layer, layer_number, kind, channel, weight), got {describe(relevant)}")
    missing = {"class", "feature", "layer", "channel"} - set(relevant.columns)
    if missing:
        raise ValueError(f"relevant: missing columns {sorted(missing)}; expected class, feature, layer, "
                         "layer_number, kind, channel, weight")
    return relevant


def _heatmap_fn():
    """vxnb.deconv's (visualize, heatmap), or a clear NotImplementedError when it is missing."""
    try:
        from .deconv import heatmap, visualize
    except ImportError as err:
        raise NotImplementedError(
            "average_images: the heatmap averages ('ours', 'deconv') need vxnb.deconv.visualize/heatmap, "
            f"which could not be imported ({err}); pass methods=('activation',) or methods=()") from err
    return visualize, heatmap


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation of (N, H, W) to [0, 1]; constant maps become 0."""
    flat = x.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    rng = hi - lo
    return torch.where(rng > 0, (x - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(x))


def _check_average_args(model: Any, dataset: Any, top_patches: Any, relevant: Any, n: Any, size: Any,
                        methods: Any, pad: Any, batch_size: Any) -> tuple:
    """Validate :func:`average_images`' arguments; (data, top table, relevant, methods, visualize, heatmap)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    data = as_dataset(dataset, "dataset")
    table = _top_table(top_patches)
    relevant = _check_relevant(relevant)
    check_positive_int(n, "n")
    check_positive_int(size, "size")
    if isinstance(methods, str):
        methods = [methods]
    methods = list(methods)
    bad = [m for m in methods if m not in _METHODS]
    if bad:
        raise ValueError(f"methods: expected a subset of {_METHODS}, got {bad}")
    if pad not in ("zeros", "mean") and not (isinstance(pad, (int, float)) and not isinstance(pad, bool)):
        raise ValueError(f"pad: expected 'zeros', 'mean' or a number, got {pad!r}")
    check_positive_int(batch_size, "batch_size")
    visualize = heatmap = None
    if "ours" in methods or "deconv" in methods:
        visualize, heatmap = _heatmap_fn()
    return data, table, relevant, methods, visualize, heatmap


def _work_items(relevant: pd.DataFrame, classes: Any, dataset: Any,
                result: AverageImages) -> list[tuple[Any, pd.Series]]:
    """The (class, relevant-feature row) pairs to average; a class without features adds a message."""
    if classes is None:
        ids = relevant["class"].tolist()
        dataset_classes = getattr(dataset, "classes", None)
        if dataset_classes is None and hasattr(dataset, "dataset"):  # torch Subset
            dataset_classes = getattr(dataset.dataset, "classes", None)
        if dataset_classes is not None and all(isinstance(c, (int, np.integer)) for c in ids):
            classes = list(range(len(dataset_classes)))
        else:
            classes = list(dict.fromkeys(ids))
    elif isinstance(classes, (str, int, np.integer)):
        classes = [classes]
    classes = list(classes)
    work: list[tuple[Any, pd.Series]] = []
    for c in classes:
        rows = relevant[relevant["class"] == c]
        if rows.empty and "class_name" in relevant.columns and isinstance(c, str):
            rows = relevant[relevant["class_name"] == c]  # a class given by name
        if rows.empty:
            msg = f"class {c!r} has no relevant feature (at this μ); nothing to average"
            result.messages.append(msg)
            warnings.warn(msg, stacklevel=3)
        for _, row in rows.iterrows():
            work.append((c, row))
    return work


def _check_tracked(model: nn.Module, data: Any, table: pd.DataFrame, work: list, input_size: Any
                   ) -> tuple[dict[str, nn.Module], dict, dict[str, ReceptiveField]]:
    """Check every feature before the expensive part; (modules, top rows per feature, receptive fields)."""
    modules = dict(model.named_modules())
    tracked = table.groupby(["layer", "channel"], sort=False)
    groups = {key: g.sort_values("rank") for key, g in tracked}
    max_index = len(data)
    for key, g in groups.items():
        if (g["index"] >= max_index).any():
            raise ValueError(f"top_patches: image indices up to {int(g['index'].max())} for feature {key}, "
                             f"but the dataset has {max_index} items (wrong dataset?)")
    if input_size is None:  # the images' size: adaptive pooling that keeps the map size is the identity
        first = int(table["index"].iloc[0]) if len(table) else 0
        item = data[first]
        input_size = tuple(torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item).shape)
    walker, _ = walk_model(model, input_size)
    rfs: dict[str, ReceptiveField] = {}
    for c, row in work:
        layer, ch = str(row["layer"]), row["channel"]
        if layer not in modules or layer == "":
            raise ValueError(f"relevant: feature {row['feature']!r} of class {c!r} names layer {layer!r}, which "
                             f"the model does not have; it has: {', '.join(n_ for n_ in modules if n_)}")
        if (layer, ch) not in groups:
            raise ValueError(f"relevant: feature {row['feature']!r} (layer {layer!r}, channel {ch!r}) of class {c!r} "
                             "is not tracked by top_patches (a wrong feature index, or track it: "
                             "TopPatches(model, layers=[...]) in the extraction pass)")
        if layer not in rfs:
            if layer not in walker.record:
                raise ValueError(f"relevant: layer {layer!r} is not called in the model's forward pass")
            rfs[layer] = state_to_rf(walker.record[layer][-1], layer)
    return modules, groups, rfs


def _assemble(result: AverageImages, work: list, cache: dict, rfs: dict[str, ReceptiveField]) -> AverageImages:
    """One :class:`AverageImage` per (class, feature) and the summary table."""
    rows = []
    for c, row in work:
        layer, ch = str(row["layer"]), int(row["channel"])
        res = cache[(layer, ch)]
        item = AverageImage(klass=c, feature=row["feature"], layer=layer, channel=ch,
                            kind=str(row.get("kind", res["kind"])), weight=float(row.get("weight", np.nan)),
                            rf=rfs[layer], indices=res["indices"], boxes=res["boxes"], image=res["image"],
                            ours=res.get("ours"), deconv=res.get("deconv"), activation=res.get("activation"))
        result.items[(c, row["feature"])] = item
        rows.append({"class": c, "class_name": row.get("class_name", str(c)), "feature": row["feature"],
                     "layer": layer, "layer_number": row.get("layer_number", np.nan), "channel": ch, "kind": item.kind,
                     "weight": item.weight, "n": item.n, "whole_image": item.rf.whole_image,
                     "rf_size_h": np.nan if item.rf.whole_image else item.rf.size[0],
                     "rf_size_w": np.nan if item.rf.whole_image else item.rf.size[1],
                     "crop_padded": res["padded"]})
    result.summary = _summary_frame(rows)
    return result


def average_images(model: nn.Module, dataset: Any, top_patches: Any, relevant: pd.DataFrame, *,
                   classes: Sequence[Any] | None = None, n: int = 100, size: int = 64,
                   methods: Sequence[str] = _METHODS, pad: str | float = "zeros", batch_size: int = 50,
                   input_size: Any = None, progress: bool | None = True) -> AverageImages:
    """Average crops of the top images of each class's relevant features (paper Fig. 5).

    model: the network the features come from (run on the device its parameters are on).
    dataset: the dataset ``top_patches`` indexes (the training split in the paper): items
        ``(image, label[, mask])`` with images (C, H, W) in [0, 1] of one common size, or an
        image tensor (N, C, H, W).
    top_patches: a filled :class:`TopPatches` (or its ``to_frame()``) that tracks every
        relevant feature with k ≥ n.
    relevant: ``vxnb.relevance.relevant_features(...)`` rows (class, feature, layer,
        layer_number, kind, channel, weight).
    classes: the classes to do (values of ``relevant["class"]``, or of ``relevant["class_name"]``
        when given as strings); default every class of
        ``dataset.classes`` when ``relevant`` uses integer class ids, else every class in
        ``relevant``. A class without relevant feature gives no item and a message.
    n: images per feature (the paper: 100). size: display size S of every crop.
    methods: which heatmap averages to add next to the image average — any of "ours"
        (resampled DeconvNet+GB, ``vxnb.deconv.visualize(resample=True)``), "deconv" (plain
        DeconvNet+GB, ``resample=False``) and "activation" (the layer's channel map upsampled
        bilinearly to the image; None for FC features, which have no map).
    pad: what fills crop pixels outside the image: "zeros" (default), "mean" (the image's
        per-channel mean) or a number. Heatmaps are always padded with 0.
    input_size: the input size for :func:`receptive_field` (default: the images' size).
    batch_size: images per forward/backward pass.

    For each feature the crop is the receptive field (:func:`receptive_field`) of the unit
    at the argmax of the channel map, padded where it leaves the image (fields larger than
    the image are padded all round), then resized to S × S (bilinear, antialiased) and
    averaged. FC features see the whole image: their crops are the whole images.
    """
    from tqdm.auto import tqdm

    data, table, relevant, methods, visualize, heatmap = _check_average_args(
        model, dataset, top_patches, relevant, n, size, methods, pad, batch_size)
    result = AverageImages()
    work = _work_items(relevant, classes, dataset, result)
    if not work:
        result.summary = _summary_frame([])
        return result
    modules, groups, rfs = _check_tracked(model, data, table, work, input_size)

    # -- one computation per distinct feature ---------------------------------------------
    device = model_device(model)
    cache: dict[tuple[str, int], dict] = {}
    images = _ImageCache()
    distinct = list(dict.fromkeys((str(r["layer"]), int(r["channel"])) for _, r in work))
    bar = tqdm(distinct, desc="average images", disable=None if progress else True, leave=False)
    with eval_mode(model):
        for layer, ch in bar:
            top = groups[(layer, ch)].head(n)
            cache[(layer, ch)] = _average_one(model, data, layer, ch, top, rfs[layer], modules[layer], size=size,
                                              methods=methods, pad=pad, batch_size=batch_size, device=device,
                                              visualize=visualize, heatmap=heatmap, images=images)
    return _assemble(result, work, cache, rfs)


def _summary_frame(rows: list[dict]) -> pd.DataFrame:
    cols = ["class", "class_name", "feature", "layer", "layer_number", "channel", "kind", "weight", "n",
            "whole_image", "rf_size_h", "rf_size_w", "crop_padded"]
    return pd.DataFrame(rows, columns=cols)


class _ImageCache:
    """Dataset images by index, kept up to ``budget`` bytes (features share many top images)."""

    def __init__(self, budget: int = 512 * 2**20) -> None:
        self.budget, self.used, self.store = budget, 0, {}

    def get(self, data: Any, i: int) -> torch.Tensor:
        img = self.store.get(i)
        if img is None:
            item = data[i]
            img = torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item)
            nbytes = img.numel() * img.element_size()
            if self.used + nbytes <= self.budget:
                self.store[i] = img
                self.used += nbytes
        return img


def _average_one(model, data, layer, ch, top, rf, module, *, size, methods, pad, batch_size, device,
                 visualize, heatmap, images) -> dict:
    """Averages of one feature over its top images (see :func:`average_images`)."""
    indices = top["index"].to_numpy().astype(np.int64)
    positions = top[["row", "col"]].to_numpy().astype(np.int64)
    S = (int(size), int(size))
    sums: dict[str, torch.Tensor] = {}
    boxes = []
    padded = 0.0
    total = 0.0
    kind = "fc" if rf.whole_image or (positions < 0).any() else "conv"
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        pos = positions[start:start + batch_size]
        x = collate_images([images.get(data, int(i)) for i in idx])
        h, w = x.shape[-2:]
        bxs = []
        for (r, c) in pos:
            if rf.whole_image or r < 0:
                bxs.append((0, 0, int(h), int(w)))
            else:
                bxs.append(rf.box(int(r), int(c)))
        boxes.extend(bxs)
        for (t, l, b, rr) in bxs:
            area = (b - t) * (rr - l)
            inside = max(0, min(b, h) - max(t, 0)) * max(0, min(rr, w) - max(l, 0))
            padded += area - inside
            total += area
        maps: dict[str, torch.Tensor] = {"image": x}
        xd = x.to(device)
        need_act = "activation" in methods and kind == "conv"
        captured: dict[str, torch.Tensor] = {}

        def keep_first(m, i, o):  # the layer output, caught during the first forward that runs
            if "out" not in captured:
                captured["out"] = o[:, ch:ch + 1].detach().float().cpu()

        handle = module.register_forward_hook(keep_first) if need_act else None
        try:
            for key, resample in (("ours", True), ("deconv", False)):
                if key in methods:
                    v = visualize(model, xd, layer, [ch], resample=resample)
                    maps[key] = heatmap(v)[:, 0].detach().float().cpu()
            if need_act and "out" not in captured:
                with torch.no_grad():
                    model(xd)
        finally:
            if handle is not None:
                handle.remove()
        if need_act:
            up = F.interpolate(captured["out"], size=(int(h), int(w)), mode="bilinear", align_corners=False)[:, 0]
            maps["activation"] = _minmax(up)
        for key, m in maps.items():
            fill = pad if key == "image" else "zeros"
            crops = torch.stack([crop_patch(m[i], bxs[i], fill) for i in range(len(bxs))])
            if crops.dim() == 3:
                crops = crops.unsqueeze(1)
            crops = _resize(crops.float(), S).sum(dim=0)
            sums[key] = crops if key not in sums else sums[key] + crops
    count = max(len(indices), 1)
    out = {"indices": indices, "boxes": np.asarray(boxes, dtype=np.int64).reshape(-1, 4), "kind": kind,
           "padded": padded / total if total else 0.0}
    for key, s in sums.items():
        avg = (s / count).numpy().astype(np.float32)
        out[key] = avg if key == "image" else avg[0]
    for key in _METHODS:
        out.setdefault(key, None)
    return out


# ============================================================================ cached top-patch tables, mask overlap


def _item_mask(data: Any, i: int) -> np.ndarray:
    item = data[i]
    if not isinstance(item, (tuple, list)) or len(item) < 3:
        raise ValueError(f"dataset: expected items (image, label, mask) with a ground-truth mask, got item {i} "
                         f"with {len(item) if isinstance(item, (tuple, list)) else 1} element(s)")
    m = torch.as_tensor(item[2]).detach().cpu()
    if m.dim() == 3 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise ValueError(f"dataset: expected a (H, W) mask in item {i}, got {describe(m)}")
    return (m > 0.5).numpy() if m.is_floating_point() else m.numpy().astype(bool)


def mask_overlap(average_images: AverageImages, dataset: Any, *, per: str = "feature") -> pd.DataFrame:
    """How much the crops behind the average images fall on the ground-truth masks.

    For every (class, feature) item of ``average_images`` and every crop of it (the receptive
    field box of the unit at the channel's maximum in one of the feature's top images), with
    the box clipped to the image and ``mask`` the ground-truth mask of that image (an8Flower:
    the part that defines the image's class):

    - ``overlap``: 1 if the box contains at least one mask pixel (large fields make this
      trivially 1 — compare the other two columns);
    - ``box_on_mask``: the fraction of the box's pixels on the mask;
    - ``center_on_mask``: 1 if the box's centre pixel (the centre of the unit's field) is on
      the mask;
    - ``chance``: the fraction of the whole image on the mask — what ``box_on_mask`` and
      ``center_on_mask`` would be for a box placed at random.

    Each is averaged over the crops. Features whose units see the whole image (FC layers) have
    no location: NaN for the first three (``chance`` is still given).

    average_images: the result of :func:`average_images`. dataset: the dataset it was
    computed on (its indices), with ``(image, label, mask)`` items.
    per: ``"feature"`` (one row per item: class, class_name, feature, layer, layer_number,
        kind, channel, weight, n, whole_image, overlap, box_on_mask, center_on_mask, chance)
        or ``"class"`` (one row per class, pooling the crops of its located features: class,
        class_name, n_features, n_located, n_crops, overlap, box_on_mask, center_on_mask,
        chance; NaN when the class has no located feature).
    """
    if not isinstance(average_images, AverageImages):
        raise TypeError(f"average_images: expected the AverageImages of vxnb.averages.average_images, "
                        f"got {describe(average_images)}")
    if per not in ("feature", "class"):
        raise ValueError(f"per: expected 'feature' or 'class', got {per!r}")
    data = as_dataset(dataset, "dataset")
    summary = average_images.summary
    meta: dict = {}
    if isinstance(summary, pd.DataFrame) and len(summary):
        for r in summary.to_dict("records"):
            meta[(r["class"], r["feature"])] = r
    masks: dict[int, np.ndarray] = {}
    rows, crops = [], []
    for (klass, feature), item in average_images.items.items():
        info = meta.get((klass, feature), {})
        located = not item.rf.whole_image
        vals: dict[str, list] = {"overlap": [], "box_on_mask": [], "center_on_mask": [], "chance": []}
        for i, box in zip(np.asarray(item.indices).tolist(), np.asarray(item.boxes).reshape(-1, 4).tolist()):
            if i < 0 or i >= len(data):
                raise ValueError(f"dataset: item {(klass, feature)!r} uses image {i}, but the dataset has "
                                 f"{len(data)} items (the dataset average_images was computed on?)")
            if i not in masks:
                masks[i] = _item_mask(data, i)
            mask = masks[i]
            h, w = mask.shape
            vals["chance"].append(float(mask.mean()))
            if not located:
                continue
            t, l, b, r = box
            tc, lc, bc, rc = max(t, 0), max(l, 0), min(b, h), min(r, w)
            area = max(bc - tc, 0) * max(rc - lc, 0)
            on = int(mask[tc:bc, lc:rc].sum()) if area else 0
            cy = min(max(int(math.floor((t + b - 1) / 2 + 0.5)), 0), h - 1)
            cx = min(max(int(math.floor((l + r - 1) / 2 + 0.5)), 0), w - 1)
            vals["overlap"].append(float(on > 0))
            vals["box_on_mask"].append(on / area if area else 0.0)
            vals["center_on_mask"].append(float(mask[cy, cx]))
        n = len(vals["chance"])
        row = {"class": klass, "class_name": info.get("class_name", str(klass)), "feature": feature,
               "layer": item.layer, "layer_number": info.get("layer_number", np.nan), "kind": item.kind,
               "channel": item.channel, "weight": item.weight, "n": n, "whole_image": not located}
        for key in ("overlap", "box_on_mask", "center_on_mask"):
            row[key] = float(np.mean(vals[key])) if located and n else np.nan
        row["chance"] = float(np.mean(vals["chance"])) if n else np.nan
        rows.append(row)
        crops.append(vals)
    feat_cols = ["class", "class_name", "feature", "layer", "layer_number", "kind", "channel", "weight", "n",
                 "whole_image", "overlap", "box_on_mask", "center_on_mask", "chance"]
    per_feature = pd.DataFrame(rows, columns=feat_cols)
    if per == "feature":
        return per_feature
    out = []
    for klass in dict.fromkeys(per_feature["class"].tolist()):
        sel = [j for j, r in enumerate(rows) if r["class"] == klass]
        located = [j for j in sel if not rows[j]["whole_image"]]
        pooled = {key: [v for j in located for v in crops[j][key]]
                  for key in ("overlap", "box_on_mask", "center_on_mask", "chance")}
        rec = {"class": klass, "class_name": rows[sel[0]]["class_name"], "n_features": len(sel),
               "n_located": len(located), "n_crops": len(pooled["overlap"])}
        for key, v in pooled.items():
            rec[key] = float(np.mean(v)) if v else np.nan
        out.append(rec)
    return pd.DataFrame(out, columns=["class", "class_name", "n_features", "n_located", "n_crops", "overlap",
                                      "box_on_mask", "center_on_mask", "chance"])
