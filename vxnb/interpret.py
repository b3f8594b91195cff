"""Interpretation of relevant features: receptive fields and top-k patches (the average images
built from them are in :mod:`vxnb.averages`).

Sec. 4.1 "Qualitative Analysis" (Fig. 5) and the supplementary "Visual Interpretation"
section of the paper: for every class and each of its relevant features (layer p, channel q)
take the top-100 training images by that feature's response, crop each at the receptive
field around the position of the channel's maximum, and average the crops. For comparison
the same crops of three heatmaps are averaged too: our resampled DeconvNet+GB, plain
DeconvNet+GB and the upsampled activation map (the latter only exists for convolutional
features).

The pieces, each usable on its own:

- :func:`receptive_field` / :func:`receptive_fields` — geometry of a layer's units in input
  pixels, computed from the modules' kernel / stride / padding / dilation, through residual
  blocks (torch.fx traces any module that is not a plain ``nn.Sequential``).
- :class:`TopPatches` — a callback for ``vxnb.features.extract_features(..., callbacks=[cb])``
  that keeps, in O(features × k) memory, the top-k images of each tracked feature with the
  position of the channel map's maximum; :func:`collect_top_patches` runs its own pass.
- :func:`top_patch_table` — the top patches as a table, cached as CSV.
- :func:`vxnb.averages.average_images` — the averages, as a tidy ``AverageImages`` result.

Receptive-field convention
--------------------------
Input pixel ``k`` has coordinate ``k`` (its centre). A unit at output position ``(i, j)``
depends on the input pixels with rows ``offset_h + i*stride_h ± (size_h - 1)/2`` and columns
``offset_w + j*stride_w ± (size_w - 1)/2`` (inclusive): ``size`` is the extent in pixels,
``offset`` the centre of unit (0, 0)'s field (it may be negative or half-integer), ``stride``
the distance in input pixels between neighbouring units. :meth:`ReceptiveField.box` gives
the integer box ``(top, left, bottom, right)`` (bottom/right exclusive), *not* clipped to
the image: padding makes the fields of border units stick out of it. Where branches merge
(a residual sum, a concatenation) the field is the union of the branches' fields — the
largest extent, the downsample branch included. Units after a Flatten, a Linear layer, an
adaptive pooling (unless ``input_size`` shows it is the identity) or any global reduction
see the whole image: ``size = stride = offset = None`` and ``whole_image = True``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ._graph import ReceptiveField, state_to_rf, walk_model
from .relevance import feature_pairs
from .utils import check_image_batch, check_layer_names, describe, eval_mode, get_module, model_device
from ._checks import check_path

__all__ = [
    "ReceptiveField",
    "receptive_field",
    "receptive_fields",
    "TopPatches",
    "collect_top_patches",
    "top_patch_table",
    "SCORES",
]

SCORES = ("descriptor", "norm", "max")

# ============================================================================ receptive fields
# (the walk through the graph is vxnb._graph.walk_model)


def receptive_field(model: nn.Module, layer: str, input_size: Any = None) -> ReceptiveField:
    """The receptive field of the units of ``layer``'s output (see the module docstring).

    model: a CNN (``nn.Sequential`` reference models, torchvision ResNets/VGGs, or any module
        torch.fx can trace whose operations are supported).
    layer: a name from ``model.named_modules()``.
    input_size: optional S, (H, W) or (C, H, W); when given the model is run once on zeros of
        that size so adaptive pooling that does not change the map size counts as the identity
        (VGG's ``avgpool`` at 224 px). Without it adaptive pooling sees the whole image.

    A module called several times (torchvision's BasicBlock reuses ``relu``) reports the field
    of its last call — the one a forward hook keeps.
    """
    get_module(model, layer)  # clear error for a name that does not exist
    walker, _ = walk_model(model, input_size)
    if layer not in walker.record:
        raise ValueError(f"layer: module {layer!r} is not called in the model's forward pass")
    return state_to_rf(walker.record[layer][-1], layer)


def receptive_fields(model: nn.Module, input_size: Any = None) -> pd.DataFrame:
    """The receptive field of every module called in the forward pass, in call order.

    Columns: layer, type, whole_image, size_h, size_w, stride_h, stride_w, offset_h, offset_w,
    calls (how many times the module runs; the field is the last call's), and with
    ``input_size`` the output map size out_h, out_w. Whole-image rows have NaN geometry.
    """
    walker, shapes = walk_model(model, input_size)
    rows = []
    for name, states in walker.record.items():
        state = states[-1]
        if state is None:
            continue
        rf = state_to_rf(state, name)
        row = {"layer": name, "type": walker.types[name], "whole_image": rf.whole_image}
        for key, val in (("size", rf.size), ("stride", rf.stride), ("offset", rf.offset)):
            row[f"{key}_h"] = np.nan if val is None else val[0]
            row[f"{key}_w"] = np.nan if val is None else val[1]
        row["calls"] = len(states)
        if input_size is not None:
            out = shapes.get(name, (None, None))[1]
            row["out_h"], row["out_w"] = (out if out is not None else (np.nan, np.nan))
        rows.append(row)
    return pd.DataFrame(rows)


# ============================================================================ top-k patches


def _channel_scores(out: torch.Tensor, score: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel ranking scores, peak values and argmax positions of one layer output.

    out: (B, C, H, W) or (B, C). Returns scores (B, C) float64, peaks (B, C) float64 and
    positions (B, C, 2) int64 (row, col of the first maximum; -1 for (B, C) outputs).
    ``descriptor`` = the per-channel L2 norm L1-normalised over the layer's channels (the
    paper's filter-wise response, as in ``vxnb.features``); ``norm`` = the L2 norm alone;
    ``max`` = the map's maximum.
    """
    out = out.detach().to(torch.float64)
    b, c = out.shape[:2]
    if out.dim() == 4:
        flat = out.flatten(2)
        peak, arg = flat.max(dim=2)
        w = out.shape[3]
        pos = torch.stack([arg // w, arg % w], dim=-1)
        norms = flat.norm(dim=2)
    else:
        peak = out
        pos = torch.full((b, c, 2), -1, dtype=torch.long, device=out.device)
        norms = out.abs()
    if score == "max":
        scores = peak
    elif score == "norm":
        scores = norms
    else:
        total = norms.sum(dim=1, keepdim=True)
        scores = norms / torch.where(total > 0, total, torch.ones_like(total))
    return scores, peak, pos


def _parse_features(model: nn.Module, layers: Any, features: Any) -> dict[str, list[int] | None]:
    """{layer: channels (None = all)} from the TopPatches arguments."""
    if features is None:
        if layers is None:
            raise ValueError("layers/features: give the layers to track (all their channels) or the features "
                             "(a columns DataFrame, (layer, channel) pairs or {layer: channels})")
        names = check_layer_names(model, layers, "layers")
        return {n: None for n in names}
    pairs = feature_pairs(features)  # checks the form and the channels
    if not pairs:
        raise ValueError("features: no feature given")
    spec: dict[str, list[int]] = {}
    for lay, ch in pairs:
        spec.setdefault(str(lay), [])
        if ch not in spec[str(lay)]:
            spec[str(lay)].append(ch)
    check_layer_names(model, list(spec), "features")
    if layers is not None:
        allowed = set(check_layer_names(model, layers, "layers"))
        extra = sorted(set(spec) - allowed)
        if extra:
            raise ValueError(f"features: layers {extra} are not among layers={sorted(allowed)}")
    return spec


def _check_top_args(model: Any, k: Any, score: Any) -> None:
    """The arguments :class:`TopPatches` and :func:`top_patch_table` share."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")


class TopPatches:
    """Running top-k images per feature, with the position of the channel map's maximum.

    A callback for ``vxnb.features.extract_features(..., callbacks=[cb])``: each call
    ``cb(outputs, index)`` gets the raw outputs of the hooked layers for one batch
    (``{layer: (B, C, H, W) or (B, C)}``) and the dataset indices of the batch (``(B,)``).
    Memory is O(features × k) whatever the dataset size.

    model: the network (used to check layer names and for :meth:`receptive_field`).
    layers: track every channel of these layers (channel count read from the first batch).
    features: or track only these features — a columns DataFrame (layer, channel[, feature]),
        ``(layer, channel)`` pairs or ``{layer: channels}``.
    k: images kept per feature.
    score: how images are ranked — ``"descriptor"`` (default; the paper ranks images by the
        feature's response, the channel's L2 norm L1-normalised over its layer, i.e. the
        entry of x the lasso sees), ``"norm"`` (the L2 norm alone) or ``"max"`` (the map's
        maximum). The position is always the argmax of the channel map (first one in
        row-major order); ``peak`` is the map's value there. FC outputs have no position
        (row = col = -1). Ties go to the image seen first (dataset order for a sequential pass).

    After a pass: ``to_frame()`` (one row per feature and rank), ``top(layer, channel)``,
    ``n_seen_`` (images seen).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | str | None = None, features: Any = None,
                 k: int = 100, *, score: str = "descriptor") -> None:
        _check_top_args(model, k, score)
        self.model = model
        self.k = int(k)
        self.score = score
        self.spec = _parse_features(model, layers, features)
        self.layers = list(self.spec)
        self.n_seen_ = 0
        self._state: dict[str, dict[str, torch.Tensor]] = {}
        self._kind: dict[str, str] = {}

    # -- the callback ---------------------------------------------------------------------
    def __call__(self, outputs: Mapping[str, torch.Tensor], index: torch.Tensor) -> None:
        if not isinstance(outputs, Mapping):
            raise TypeError(f"outputs: expected a dict {{layer: tensor}}, got {describe(outputs)}")
        index = torch.as_tensor(index)
        if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"index: expected a 1-D integer tensor of dataset indices, got {describe(index)}")
        missing = [l for l in self.layers if l not in outputs]
        if missing:
            raise ValueError(f"outputs: tracked layers {missing} missing from the batch (got {sorted(outputs)}); "
                             "hook them in the extraction pass")
        for layer in self.layers:
            out = outputs[layer]
            if not isinstance(out, torch.Tensor) or out.dim() not in (2, 4):
                raise ValueError(f"outputs[{layer!r}]: expected a (B, C, H, W) or (B, C) tensor, got {describe(out)}")
            if out.shape[0] != index.shape[0]:
                raise ValueError(f"index: {index.shape[0]} indices for a batch of {out.shape[0]} "
                                 f"(outputs[{layer!r}] has shape {tuple(out.shape)})")
            if not torch.isfinite(out).all():
                raise ValueError(f"outputs[{layer!r}]: contains NaN or inf")
            self._update(layer, out, index)
        self.n_seen_ += int(index.shape[0])

    def _update(self, layer: str, out: torch.Tensor, index: torch.Tensor) -> None:
        scores, peak, pos = _channel_scores(out, self.score)
        n_ch = out.shape[1]
        st = self._state.get(layer)
        if st is None:
            chans = self.spec[layer]
            if chans is None:
                chans = list(range(n_ch))
            bad = [c for c in chans if c >= n_ch]
            if bad:
                raise ValueError(f"features: layer {layer!r} has {n_ch} channels (0..{n_ch - 1}); "
                                 f"channel(s) {bad} do not exist")
            f = len(chans)
            st = {
                "channels": torch.tensor(chans, dtype=torch.long),
                "score": torch.full((f, self.k), -math.inf, dtype=torch.float64),
                "peak": torch.full((f, self.k), math.nan, dtype=torch.float64),
                "index": torch.full((f, self.k), -1, dtype=torch.long),
                "pos": torch.full((f, self.k, 2), -1, dtype=torch.long),
                "n_channels": torch.tensor(n_ch),
            }
            self._state[layer] = st
            self._kind[layer] = "conv" if out.dim() == 4 else "fc"
        elif int(st["n_channels"]) != n_ch:
            raise ValueError(f"outputs[{layer!r}]: {n_ch} channels, earlier batches had {int(st['n_channels'])}")
        ch = st["channels"]
        s_new = scores[:, ch].T.cpu()                         # (F, B)
        p_new = peak[:, ch].T.cpu()
        pos_new = pos[:, ch].transpose(0, 1).cpu()            # (F, B, 2)
        i_new = index.to(torch.long).cpu().expand(len(ch), -1)
        s_all = torch.cat([st["score"], s_new], dim=1)
        order = torch.sort(s_all, dim=1, descending=True, stable=True).indices[:, : self.k]
        st["score"] = torch.gather(s_all, 1, order)
        st["peak"] = torch.gather(torch.cat([st["peak"], p_new], 1), 1, order)
        st["index"] = torch.gather(torch.cat([st["index"], i_new], 1), 1, order)
        pos_all = torch.cat([st["pos"], pos_new], 1)
        st["pos"] = torch.gather(pos_all, 1, order.unsqueeze(-1).expand(-1, -1, 2))

    # -- checkpoints and torch.distributed (used by extract_features) ---------------------
    def state_dict(self) -> dict[str, Any]:
        """What the tracker has collected (tensors, ints and strs only)."""
        return {"n_seen": self.n_seen_, "kind": dict(self._kind),
                "state": {layer: dict(st) for layer, st in self._state.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (a resumed extraction pass)."""
        self.n_seen_ = int(state["n_seen"])
        self._kind = dict(state["kind"])
        self._state = {layer: dict(st) for layer, st in state["state"].items()}

    def sync_distributed(self) -> None:
        """Merge the trackers of all ranks of the process group (each saw its shard) into the
        one a single pass over all the data gives: the same top-k, ties broken by dataset index."""
        from .distributed import all_gather_object, merge_topk

        states = all_gather_object(self.state_dict(), "gathering the top patches")
        self.n_seen_ = sum(int(s["n_seen"]) for s in states)
        for s in states:
            self._kind.update(s["kind"])
        layers = [l for l in self.layers if any(l in s["state"] for s in states)]
        self._state = {l: merge_topk([s["state"][l] for s in states if l in s["state"]], self.k) for l in layers}

    # -- results --------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self._state:
            raise RuntimeError("TopPatches: no batch seen yet; pass it as a callback to "
                               "vxnb.features.extract_features or use collect_top_patches")

    def to_frame(self) -> pd.DataFrame:
        """One row per (feature, rank): layer, channel, kind, rank, index, row, col, score, peak.

        ``index`` is the dataset index; ``row``/``col`` the argmax of the channel map (-1 for
        FC features); ``score`` the ranking score (see ``score``); ``peak`` the map's value at
        the argmax. Features seen on fewer than k images have fewer rows.
        """
        self._check_fitted()
        frames = []
        for layer in self.layers:
            st = self._state[layer]
            f, k = st["score"].shape
            valid = (st["index"] >= 0).numpy()
            frame = pd.DataFrame({
                "layer": layer,
                "channel": np.repeat(st["channels"].numpy(), k),
                "kind": self._kind[layer],
                "rank": np.tile(np.arange(k), f),
                "index": st["index"].numpy().ravel(),
                "row": st["pos"][..., 0].numpy().ravel(),
                "col": st["pos"][..., 1].numpy().ravel(),
                "score": st["score"].numpy().ravel(),
                "peak": st["peak"].numpy().ravel(),
            })
            frames.append(frame[valid.ravel()])
        return pd.concat(frames, ignore_index=True)

    def top(self, layer: str, channel: int) -> pd.DataFrame:
        """The top rows of one feature (rank order)."""
        self._check_fitted()
        if layer not in self._state:
            raise ValueError(f"layer: {layer!r} is not tracked; tracked layers: {self.layers}")
        chans = self._state[layer]["channels"].tolist()
        if channel not in chans:
            raise ValueError(f"channel: {channel!r} of layer {layer!r} is not tracked "
                             f"(layer has {int(self._state[layer]['n_channels'])} channels, tracked {len(chans)})")
        frame = self.to_frame()
        return frame[(frame["layer"] == layer) & (frame["channel"] == channel)].reset_index(drop=True)

    def receptive_field(self, layer: str, input_size: Any = None) -> ReceptiveField:
        """The receptive field of ``layer`` in this model (see :func:`receptive_field`)."""
        return receptive_field(self.model, layer, input_size)

    def __repr__(self) -> str:
        n = sum(len(s["channels"]) for s in self._state.values()) if self._state else "?"
        return f"TopPatches(layers={self.layers}, k={self.k}, score={self.score!r}, features={n}, seen={self.n_seen_})"


def as_dataset(data: Any, arg: str = "data"):
    """(dataset-like with __len__/__getitem__, loader factory) for a Dataset or an image tensor."""
    if isinstance(data, torch.Tensor):
        check_image_batch(data, arg)
        return torch.utils.data.TensorDataset(data)
    if isinstance(data, torch.utils.data.DataLoader):
        raise TypeError(f"{arg}: pass the Dataset (dataset indices are needed), not a DataLoader")
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"{arg}: expected a Dataset of (image, label[, mask]) items or an image tensor "
                        f"(N, C, H, W), got {describe(data)}")
    if len(data) == 0:
        raise ValueError(f"{arg}: the dataset is empty")
    return data


def collate_images(batch: list) -> torch.Tensor:
    imgs = [b[0] if isinstance(b, (tuple, list)) else b for b in batch]
    try:
        return torch.stack([torch.as_tensor(i) for i in imgs]).float()
    except RuntimeError as err:
        raise ValueError(f"data: images of one batch differ in size ({err}); resize them to a common size") from err


def collect_top_patches(model: nn.Module, data: Any, features: Any = None, k: int = 100, *,
                        layers: Sequence[str] | None = None, score: str = "descriptor", batch_size: int = 64,
                        num_workers: int = 0, progress: bool | None = True) -> TopPatches:
    """Run one forward pass over ``data`` and return the filled :class:`TopPatches`.

    Use it when no ``extract_features`` pass is at hand. ``data`` is a Dataset of
    ``(image, label[, mask])`` items (dataset index = position) or an image tensor
    (N, C, H, W) in [0, 1]. The model runs on the device its parameters are on, in eval mode.
    """
    from tqdm.auto import tqdm

    tracker = TopPatches(model, layers=layers, features=features, k=k, score=score)
    dataset = as_dataset(data)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate_images)
    modules = {name: get_module(model, name) for name in tracker.layers}
    captured: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, name=name: captured.__setitem__(name, out))
               for name, m in modules.items()]
    device = model_device(model)
    start = 0
    try:
        with eval_mode(model), torch.no_grad():
            for x in tqdm(loader, desc="top patches", disable=None if progress else True, leave=False):
                captured.clear()
                model(x.to(device))
                idx = torch.arange(start, start + x.shape[0])
                tracker(dict(captured), idx)
                start += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    return tracker


# ============================================================================ average images


_TOP_COLUMNS = ["layer", "channel", "kind", "rank", "index", "row", "col", "score", "peak"]


#: Format version of the cached top-patch tables (part of their key).
TOP_PATCHES_VERSION = 1


def _wanted_pairs(model: nn.Module, features: Any) -> list[tuple[str, int]]:
    """Distinct (layer, channel) pairs of ``features``; [] for an empty DataFrame or list."""
    if isinstance(features, pd.DataFrame) and len(features) == 0:
        missing = {"layer", "channel"} - set(features.columns)
        if missing:
            raise ValueError(f"features: the DataFrame needs columns 'layer' and 'channel', missing {sorted(missing)}")
        return []
    if isinstance(features, (list, tuple)) and len(features) == 0:
        return []
    spec = _parse_features(model, None, features)
    return [(layer, ch) for layer, chans in spec.items() for ch in chans]


def _read_top_table(file: Any) -> pd.DataFrame | None:
    """The table in ``file``, or None (with a warning) when it is not a readable top-patch table."""
    try:
        table = pd.read_csv(file, dtype={"layer": str, "kind": str})
    except Exception as err:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
        warnings.warn(f"top_patch_table: ignoring unreadable cache {file} ({type(err).__name__}: {err})")
        return None
    if list(table.columns) != _TOP_COLUMNS:
        warnings.warn(f"top_patch_table: ignoring {file}: columns {list(table.columns)}, expected {_TOP_COLUMNS}")
        return None
    return table


def top_patch_table(model: nn.Module, data: Any, features: Any, k: int = 100, *,
                    cache_dir: Any = None, data_key: str | None = None, score: str = "descriptor",
                    tracker: TopPatches | None = None, batch_size: int = 64,
                    progress: bool | None = True) -> pd.DataFrame:
    """The top-k rows (:meth:`TopPatches.to_frame`) of ``features``, collected at most once.

    model, data: as for :func:`collect_top_patches` (``data`` a Dataset; its positions are the
        indices stored in the table).
    features: the features needed — ``vxnb.relevance.relevant_features`` rows or any
        DataFrame with ``layer, channel``, ``(layer, channel)`` pairs or ``{layer: channels}``.
        An empty DataFrame / list gives an empty table.
    k, score: as for :class:`TopPatches`.
    cache_dir: keep the table as ``<cache_dir>/top_patches-<key>.csv`` (:mod:`vxnb._store`),
        the key hashing the model (class, structure and state_dict bytes), the data
        (``data_key``, else its type and length: pass a content key of the split such as
        ``vxnb.studies.runs.split_key``), ``k`` and ``score``. Features already in the file are read from
        it; only the missing ones are collected (one forward pass over ``data``, tracking only
        them) and added to the file, written atomically under the table's file lock. A damaged
        file is ignored (with a warning) and rewritten.
    tracker: a filled :class:`TopPatches` of this model over this whole ``data`` (e.g. the one
        passed to ``vxnb.features.extract_features(..., callbacks=[tracker])`` so the top
        images come with the extraction pass); its rows (ranks < k) are added first. It must
        use the same ``score`` and a ``k`` at least this one.

    Returns the rows of the requested features, sorted by (layer, channel, rank), with columns
    layer, channel, kind, rank, index, row, col, score, peak.
    """
    import contextlib
    from pathlib import Path

    from . import _store

    _check_top_args(model, k, score)
    if data_key is not None and not isinstance(data_key, str):
        raise TypeError(f"data_key: expected a str or None, got {describe(data_key)}")
    dataset = as_dataset(data, "data")
    wanted = _wanted_pairs(model, features)
    table = pd.DataFrame({c: pd.Series(dtype=object if c in ("layer", "kind") else np.int64) for c in _TOP_COLUMNS})
    file = None
    lock = contextlib.nullcontext()
    if cache_dir is not None:
        check_path(cache_dir, "cache_dir", allow_none=True)
        settings = {"k": int(k), "score": score}
        inputs = {"model": _store.model_fingerprint(model),
                  "data": data_key or f"{type(dataset).__name__}/{len(dataset)}"}
        key = _store.key("top-patches", settings, inputs, TOP_PATCHES_VERSION)
        file = Path(cache_dir) / f"top_patches-{key}.csv"
        file.parent.mkdir(parents=True, exist_ok=True)
        root = _store.store_root(file)
        lock = _store.artifact_lock(root, key)  # read, add the missing features, write: one process at a time
    with lock:
        return _top_patch_table(model, dataset, wanted, table, file, tracker, k, score, batch_size, progress,
                                None if file is None else (root, key, settings, inputs))


def _top_patch_table(model, dataset, wanted, table, file, tracker, k, score, batch_size, progress, store):
    from . import _store

    if file is not None:
        if file.is_file():
            cached = _read_top_table(file)
            if cached is not None:
                table = cached
    changed = False
    if tracker is not None:
        if not isinstance(tracker, TopPatches):
            raise TypeError(f"tracker: expected a filled vxnb.interpret.TopPatches or None, got {describe(tracker)}")
        if tracker.model is not model:
            raise ValueError("tracker: it was built for another model object; pass the model it tracked")
        if tracker.score != score or tracker.k < k:
            raise ValueError(f"tracker: expected score={score!r} and k >= {k}, got score={tracker.score!r}, "
                             f"k={tracker.k}")
        if tracker.n_seen_ != len(dataset):
            raise ValueError(f"tracker: it saw {tracker.n_seen_} images, but data has {len(dataset)}; "
                             "it must have seen one whole pass over the same data")
        frame = tracker.to_frame()
        frame = frame[frame["rank"] < k]
        have = set(zip(table["layer"], table["channel"]))
        new = [p not in have for p in zip(frame["layer"], frame["channel"])]
        if any(new):
            table = pd.concat([table, frame.loc[np.array(new, dtype=bool)]], ignore_index=True)
            changed = True
    have = set(zip(table["layer"], table["channel"]))
    missing = [p for p in wanted if p not in have]
    if missing:
        found = collect_top_patches(model, dataset, missing, k=int(k), score=score, batch_size=batch_size,
                                    progress=progress)
        table = pd.concat([table, found.to_frame()], ignore_index=True)
        changed = True
    if changed and file is not None:
        root, key, settings, inputs = store
        _store.load_or_compute(file, key, "top-patches", lambda: table[_TOP_COLUMNS], load=None, recompute=True,
                               save=lambda t, tmp: t.to_csv(tmp, index=False), settings=settings, inputs=inputs,
                               version=TOP_PATCHES_VERSION, root=root, lock=False)
    keep = set(wanted)
    out = table.loc[np.array([p in keep for p in zip(table["layer"], table["channel"])], dtype=bool)]
    out = out.sort_values(["layer", "channel", "rank"], kind="mergesort").reset_index(drop=True)
    for c in ("channel", "rank", "index", "row", "col"):
        out[c] = out[c].astype(np.int64)
    for c in ("score", "peak"):
        out[c] = out[c].astype(np.float64)
    for c in ("layer", "kind"):  # plain str objects, whether read back from CSV or fresh
        out[c] = pd.Series([str(v) for v in out[c]], index=out.index, dtype=object)
    return out[_TOP_COLUMNS]
