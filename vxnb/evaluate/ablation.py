"""Importance of the identified relevant features (Sec. 4.1, Fig. 4; supplementary Fig. 10).

- :func:`ablation_curve` — mean class accuracy (mCA) of the network as the top-n relevant
  features are zeroed, for the *All* and *OnlyConv* feature sets, a *Random* control and the
  intact network.
- :func:`class_reconstruction` — how well the relevant features alone "reconstruct" each class:
  mean ROC-AUC over classes of the score ``X_test w_j`` on held-out data, for several μ.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..features import Features, as_loader, on_device, resolve_device, split_batch
from ..relevance import Ablator, feature_pairs, rank_features
from ..utils import check_layer_names, describe, eval_mode, get_module

__all__ = ["ablation_curve", "class_reconstruction", "ranked_pairs", "mean_class_accuracy_from_counts"]

METHODS = ("intact", "All", "OnlyConv", "Random", "Random (union)")
#: How the Random control draws its channels (see :func:`ablation_curve`).
RANDOM_DRAWS = ("matched", "union")


def ranked_pairs(features: Any, rank_by: str = "max", arg: str = "features") -> list[tuple[str, int]]:
    """Distinct (layer, channel) pairs, most relevant first.

    A DataFrame of :func:`vxnb.relevance.relevant_features` (columns ``class`` and ``weight``) is
    ranked with :func:`vxnb.relevance.rank_features` (``rank_by``: ``"max"`` weight over classes,
    ``"sum"`` or ``"abs"``); anything else :func:`vxnb.relevance.feature_pairs` accepts is taken
    in the order given (duplicates dropped).
    """
    if isinstance(features, pd.DataFrame) and {"class", "weight", "layer_number", "kind"} <= set(features.columns):
        ranked = rank_features(features, by=rank_by)
        return list(zip(ranked["layer"].tolist(), [int(c) for c in ranked["channel"]]))
    return list(dict.fromkeys(feature_pairs(features, arg)))


def mean_class_accuracy_from_counts(correct: np.ndarray, total: np.ndarray) -> float:
    """Mean over the classes with at least one image of correct / total."""
    present = total > 0
    if not present.any():
        return float("nan")
    return float(np.mean(correct[present] / total[present]))


def _check_counts(counts: Any, n_max: int) -> list[int]:
    if counts is None:
        return sorted({int(round(v)) for v in np.linspace(0, n_max, 11)})
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer) or (arr < 0).any():
        raise ValueError(f"counts: expected a non-empty list of ints ≥ 0, got {counts!r}")
    return sorted({int(v) for v in arr})


def ablation_curve(model: nn.Module, data: Any, features_all: Any, features_onlyconv: Any = None, *,
                   counts: Sequence[int] | None = None, n_random: int = 5, seed: int = 0, rank_by: str = "max",
                   random: str | Sequence[str] = "matched",
                   batch_size: int = 64, num_workers: int = 0, device: str | torch.device | None = None,
                   shared_prefix: bool | str = "auto", progress: bool = True) -> pd.DataFrame:
    """mCA of ``model`` on ``data`` with the top-n relevant features ablated (Fig. 4).

    Args:
        model: the classifier (outputs (B, C) logits); left as it was.
        data: Dataset or DataLoader of ``(image, label[, mask])``.
        features_all, features_onlyconv: the relevant features of the *All* and *OnlyConv* pools
            (DataFrames of :func:`vxnb.relevance.relevant_features`, ranked by
            :func:`ranked_pairs` with ``rank_by``; or (layer, channel) pairs already in rank
            order). ``features_onlyconv=None`` skips that curve.
        counts: the numbers n of ablated features (default: 11 values from 0 to the size of the
            larger set). A method's curve stops at the size of its set.
        n_random: draws of the *Random* control (≥ 1; the paper's figure uses several, we
            default to 5). For each n, draw d zeroes as many channels *in each layer* as the
            top-n of the All set has there, chosen uniformly at random among all channels of
            that layer (relevant ones included); draws are nested in n (one random
            permutation of each layer's channels per draw, seeded by ``(seed, d)``).
        random: which Random control(s): ``"matched"`` (above, method ``"Random"``) and/or
            ``"union"`` — the paper's draw "from the layers indicated in the sets a) and b)":
            n channels uniformly among all channels of the layers of the All and OnlyConv sets
            together (method ``"Random (union)"``; nested in n, one permutation of that pool
            per draw, seeded by ``(seed, d, 1)``).
        seed: seed of the random draws.
        batch_size, num_workers, device, progress: as in :func:`vxnb.features.extract_features`.
        shared_prefix: how each batch runs through the configurations. ``True``: the model must
            be a plain ``nn.Sequential`` (its own ``forward``, each hooked module inside one
            child), run child by child as a tree — configurations that ablate the same channels
            in the first children share those children's outputs, and only where they differ
            does the pass split (the same operations on the same tensors as one forward pass per
            configuration, so the same logits bit for bit, at a fraction of the work: the
            reference networks' early, costly layers are ablated in few distinct ways).
            ``False``: one whole forward pass per configuration. ``"auto"`` (default): ``True``
            where the model qualifies, else ``False``.

    Returns:
        A tidy DataFrame ``method, n_ablated, mca, mca_std, n_draws``: ``method`` in
        ``intact`` (the same value at every n), ``All``, ``OnlyConv``, ``Random`` (mean and
        standard deviation (ddof=1) over the draws; ``mca_std`` is NaN for the other methods).
        mCA = mean over the classes present in ``data`` of the per-class accuracy (0..1).
        Every configuration is evaluated in a single pass over the data; identical feature sets
        (e.g. n = 0 of every method) are evaluated once, so n = 0 equals the intact network.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    if isinstance(n_random, bool) or not isinstance(n_random, (int, np.integer)) or n_random < 0:
        raise ValueError(f"n_random: expected an int ≥ 0, got {n_random!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {describe(seed)}")
    draws = _check_random(random)
    if not (isinstance(shared_prefix, bool) or isinstance(shared_prefix, str) and shared_prefix == "auto"):
        raise ValueError(f"shared_prefix: expected True, False or 'auto', got {describe(shared_prefix)}")
    ranked_all = ranked_pairs(features_all, rank_by, "features_all")
    ranked_conv = ranked_pairs(features_onlyconv, rank_by, "features_onlyconv") if features_onlyconv is not None else None
    hooked = list(dict.fromkeys(l for l, _ in [*ranked_all, *(ranked_conv or [])]))  # All's layers first
    check_layer_names(model, hooked, "features")
    n_max = max(len(ranked_all), len(ranked_conv) if ranked_conv is not None else 0)
    counts = _check_counts(counts, n_max)

    children = _sequential_children(model, hooked, shared_prefix)
    dev = resolve_device(model, device)
    loader, _, _, _ = as_loader(data, batch_size, num_workers, pin=dev.type == "cuda")
    try:
        total_batches = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total_batches = None

    configs: dict[frozenset, int] = {}
    config_pairs: list[list[tuple[str, int]]] = []

    def config(pairs: list[tuple[str, int]]) -> int:
        key = frozenset(pairs)
        if key not in configs:
            configs[key] = len(config_pairs)
            config_pairs.append(pairs)
        return configs[key]

    plan: list[tuple[str, int, int]] = []  # (method, n, config id)
    plan += [("intact", n, config([])) for n in counts]
    plan += [("All", n, config(ranked_all[:n])) for n in counts if n <= len(ranked_all)]
    if ranked_conv is not None:
        plan += [("OnlyConv", n, config(ranked_conv[:n])) for n in counts if n <= len(ranked_conv)]

    correct: np.ndarray | None = None
    total: np.ndarray | None = None
    widths: dict[str, int] = {}
    with on_device(model, dev), eval_mode(model), torch.inference_mode(), \
            Ablator(model, layers=hooked) as ablator:
        it = iter(loader)
        bar = tqdm(total=total_batches, desc="ablation", disable=None if progress else True, leave=False)
        first = True
        try:
            for _, batch in it:
                images, labels = split_batch(batch)
                if images.shape[0] == 0:
                    continue
                x = images.to(dev, non_blocking=True)
                if first:  # the widths of the ablated layers, for the random draws
                    widths.update(_layer_widths(model, ablator, hooked, x))
                    if "matched" in draws:
                        plan += _random_plan(ranked_all, counts, widths, n_random, seed, config)
                    if "union" in draws:
                        plan += _random_union_plan(hooked, [n for n in counts if n <= n_max], widths, n_random,
                                                   seed, config)
                    first = False
                outputs = (_shared_prefix_forward(children, ablator, x, config_pairs) if children is not None
                           else _each_forward(model, ablator, x, config_pairs))
                correct, total = _count_hits(outputs, labels, correct, total)
                bar.update(1)
        finally:
            bar.close()
    if correct is None:
        raise ValueError("data: no images")
    mca = np.array([mean_class_accuracy_from_counts(correct[c], total) for c in range(len(config_pairs))])
    return _curve_frame(plan, mca, n_random, seed, hooked)


def _count_hits(outputs: list[Any], labels: torch.Tensor, correct: np.ndarray | None,
                total: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Add one batch's correct predictions per (configuration, class) and its images per class
    (the count arrays are made at the first batch, sized by the model's outputs)."""
    for cid, out in enumerate(outputs):
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ValueError(f"model: expected (B, C) logits, got {describe(out)}")
        if correct is None:
            correct = np.zeros((len(outputs), out.shape[1]), dtype=np.int64)
            total = np.zeros(out.shape[1], dtype=np.int64)
        if cid == 0 and int(labels.max()) >= correct.shape[1]:
            raise ValueError(f"data: label {int(labels.max())} out of range for a model with "
                             f"{correct.shape[1]} outputs")
        pred = out.argmax(dim=1).cpu()
        correct[cid] += np.bincount(labels[pred == labels].numpy(), minlength=correct.shape[1])
    total += np.bincount(labels.numpy(), minlength=correct.shape[1])
    return correct, total


def _sequential_children(model: nn.Module, hooked: list[str], shared_prefix: Any) -> list[tuple[str, nn.Module]] | None:
    """The children of ``model`` for :func:`_shared_prefix_forward`, or None for one forward per
    configuration (``shared_prefix`` False, or "auto" with a model that does not qualify)."""
    if shared_prefix is False:
        return None
    why = None
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        why = f"a plain nn.Sequential (its own forward), got {describe(model)}"
    else:
        children = list(model.named_children())
        # every hooked module under exactly one child (a module shared by two children is ablated in both)
        homes: dict[int, set[str]] = {}
        for name, mod in model.named_modules(remove_duplicate=False):
            if name:
                homes.setdefault(id(mod), set()).add(name.split(".")[0])
        shared = [l for l in hooked if len(homes.get(id(get_module(model, l)), ())) != 1]
        if shared:
            why = f"each ablated module inside one child of the model; {shared} are reached from several"
    if why is None:
        return children
    if shared_prefix is True:
        raise ValueError(f"shared_prefix: True needs {why}")
    return None


def _each_forward(model: nn.Module, ablator: Any, x: torch.Tensor, config_pairs: list) -> list[Any]:
    """The outputs of one whole forward pass per configuration."""
    outputs = []
    for pairs in config_pairs:
        ablator.set(pairs)
        outputs.append(model(x))
    return outputs


def _shared_prefix_forward(children: list[tuple[str, nn.Module]], ablator: Any, x: torch.Tensor,
                           config_pairs: list) -> list[Any]:
    """The outputs of a Sequential's forward pass under each configuration, run as a tree over its
    children: configurations with the same ablations in children 0..i share those children's output
    (computed once), and the pass branches at the child where their ablations first differ."""
    home = {name: i for i, (name, _) in enumerate(children)}
    per_child: list[list[frozenset]] = []
    for pairs in config_pairs:
        parts: list[set] = [set() for _ in children]
        for layer, ch in pairs:
            parts[home[layer.split(".")[0]]].add((layer, ch))
        per_child.append([frozenset(p) for p in parts])
    outputs: list[Any] = [None] * len(config_pairs)

    def branches(i: int, h: Any, cids: list[int]) -> list[tuple[int, Any, frozenset, list[int]]]:
        groups: dict[frozenset, list[int]] = {}
        for c in cids:
            groups.setdefault(per_child[c][i], []).append(c)
        return [(i, h, key, sub) for key, sub in reversed(list(groups.items()))]

    # depth first: (child index, its input, its ablations, configurations); a child's output is
    # computed when its entry is popped, so one activation per level is alive
    stack = branches(0, x, list(range(len(config_pairs))))
    while stack:
        i, h, key, cids = stack.pop()
        ablator.set(sorted(key))
        child = children[i][1]
        if isinstance(child, nn.MaxPool2d) and isinstance(h, torch.Tensor) and h.dim() == 4:
            # the same maxima, read in half the time or less from channels-last memory (the layout
            # of the output is restored, so the next layers compute exactly as before)
            out = child(h.contiguous(memory_format=torch.channels_last)).contiguous()
        else:
            out = child(h)
        if i + 1 == len(children):
            for c in cids:
                outputs[c] = out
        else:
            stack += branches(i + 1, out, cids)
    return outputs


def _check_random(random: Any) -> tuple[str, ...]:
    draws = (random,) if isinstance(random, str) else tuple(random) if isinstance(random, (list, tuple)) else None
    if not draws or any(d not in RANDOM_DRAWS for d in draws) or len(set(draws)) != len(draws):
        raise ValueError(f"random: expected one or both of {', '.join(map(repr, RANDOM_DRAWS))}, got {describe(random)}")
    return draws


def _layer_widths(model: nn.Module, ablator: Any, layers: list[str], x: torch.Tensor) -> dict[str, int]:
    """The channel count of each layer's output, from one intact forward pass of ``x``."""
    probe: dict[str, int] = {}
    modules = dict(model.named_modules())
    handles = [modules[l].register_forward_hook(lambda mod, inp, out, l=l: probe.__setitem__(l, out.shape[1]))
               for l in layers]
    try:
        ablator.set([])
        model(x)
    finally:
        for h in handles:
            h.remove()
    return probe


def _curve_frame(plan: list[tuple[str, int, int]], mca: np.ndarray, n_random: int, seed: int,
                 hooked: list[str]) -> pd.DataFrame:
    """:func:`ablation_curve`'s tidy frame from its plan (method, n, config id) and the mCA of
    each config: Random rows averaged over their draws."""
    rows = []
    frame = pd.DataFrame(plan, columns=["method", "n_ablated", "config"])
    for (method, n), g in frame.groupby(["method", "n_ablated"], sort=False):
        rnd = method.startswith("Random")
        vals = mca[g["config"].to_numpy()] if rnd else mca[g["config"].to_numpy()[:1]]
        rows.append(dict(method=method, n_ablated=int(n), mca=float(np.mean(vals)),
                         mca_std=float(np.std(vals, ddof=1)) if rnd and len(vals) > 1 else float("nan"),
                         n_draws=int(len(g)) if rnd else 1))
    out = pd.DataFrame(rows, columns=["method", "n_ablated", "mca", "mca_std", "n_draws"])
    order = {m: i for i, m in enumerate(METHODS)}
    out = out.sort_values(["method", "n_ablated"], key=lambda s: s.map(order) if s.name == "method" else s,
                          kind="mergesort").reset_index(drop=True)
    out.attrs["random"] = ("per layer, as many channels as All's top-n has there, uniformly among all channels "
                           f"of the layer; {n_random} nested draws, seed {seed}")
    out.attrs["random_union"] = (f"n channels uniformly among all channels of the layers {hooked} (All ∪ OnlyConv); "
                                 f"{n_random} nested draws, seed {seed}")
    return out


def _random_plan(ranked_all: list[tuple[str, int]], counts: list[int], widths: dict[str, int], n_random: int,
                 seed: int, config: Callable[[list[tuple[str, int]]], int]) -> list[tuple[str, int, int]]:
    plan = []
    layers = list(dict.fromkeys(l for l, _ in ranked_all))
    for layer, ch in ranked_all:
        if ch >= widths[layer]:
            raise ValueError(f"features_all: layer {layer!r} has {widths[layer]} channels, got channel {ch}")
    for d in range(n_random):
        rng = np.random.default_rng([int(seed), d])
        perm = {l: rng.permutation(widths[l]) for l in layers}
        for n in counts:
            if n > len(ranked_all):
                continue
            per_layer: dict[str, int] = {}
            for l, _ in ranked_all[:n]:
                per_layer[l] = per_layer.get(l, 0) + 1
            pairs = [(l, int(c)) for l in layers for c in perm[l][: per_layer.get(l, 0)]]
            plan.append(("Random", n, config(pairs)))
    return plan


def _random_union_plan(layers: list[str], counts: list[int], widths: dict[str, int], n_random: int, seed: int,
                       config: Callable[[list[tuple[str, int]]], int]) -> list[tuple[str, int, int]]:
    """Random (union): the first n of one permutation per draw of every (layer, channel) of ``layers``."""
    pool = [(l, c) for l in layers for c in range(widths[l])]
    plan = []
    for d in range(n_random):
        perm = np.random.default_rng([int(seed), d, 1]).permutation(len(pool))
        for n in counts:
            plan.append(("Random (union)", n, config([pool[i] for i in perm[:min(n, len(pool))]])))
    return plan


# ============================================================================ class reconstruction
def _path_weights(train: Features, mus: Sequence[float], progress: bool) -> dict[float, np.ndarray]:
    """W for every μ from one μ-lasso path (:func:`vxnb.lasso.lasso_path`) up to max(mus)."""
    from ..lasso import lasso_path

    path = lasso_path(train.G, train.XtL, mu_max=max(mus), LtL=train.class_counts.astype(np.float64),
                      progress=None if progress else False, tol=train.lasso_tol)
    return {mu: np.asarray(path.coef(mu), dtype=np.float64) for mu in mus}


def _check_features(f: Any, arg: str) -> Features:
    if not isinstance(f, Features):
        raise TypeError(f"{arg}: expected vxnb.features.Features, got {describe(f)}")
    return f


def class_reconstruction(train_features: Features, test_features: Features,
                         mus: Sequence[float] = (0.1, 0.5, 1, 2, 5, 10, 20, 50), *,
                         solver: Callable[[np.ndarray, np.ndarray, float], Any] | None = None,
                         per_class: bool = False, progress: bool = True) -> pd.DataFrame:
    """Mean ROC-AUC over classes of the score ``X_test w_j`` for each μ (supplementary Fig. 10).

    W is learnt with the μ-lasso on ``train_features`` (its G and XtL; default solver
    :mod:`vxnb.lasso`, one path up to max(mus)), or with ``solver(G, XtL, mu) -> W (m, C)``.
    The score of test image i for class j is ``X_test[i] · w_j``; AUC from
    ``sklearn.metrics.roc_auc_score`` of class j against the rest. A class absent from the test
    set (or the only one present) is left out of the mean.

    test_features must hold X (``extract_features(..., keep_X=True)``) and have the same columns.

    Returns one row per μ: ``mu, mean_auc, std_auc, n_classes, n_features`` (distinct features
    with a non-zero weight for some class), ``n_weights`` (non-zero entries of W); with
    ``per_class=True`` one row per (μ, class): ``mu, class, class_name, auc, n_features``.
    """
    from sklearn.metrics import roc_auc_score

    train = _check_features(train_features, "train_features")
    test = _check_features(test_features, "test_features")
    if test.X is None:
        raise ValueError("test_features: X was not kept; extract the test set with keep_X=True")
    a = train.columns[["layer", "channel"]].to_numpy()
    b = test.columns[["layer", "channel"]].to_numpy()
    if a.shape != b.shape or not (a == b).all():
        raise ValueError("test_features: its columns (layer, channel) differ from train_features'; "
                         "extract both with the same model and layers")
    if test.n_classes != train.n_classes:
        raise ValueError(f"test_features: {test.n_classes} classes, train_features has {train.n_classes}")
    mus_arr = np.asarray(mus, dtype=np.float64)
    if mus_arr.ndim != 1 or mus_arr.size == 0 or not np.isfinite(mus_arr).all() or (mus_arr <= 0).any():
        raise ValueError(f"mus: expected a non-empty list of positive numbers, got {mus!r}")
    mus_list = [float(v) for v in mus_arr]
    if solver is None:
        weights = _path_weights(train, mus_list, progress)
    else:
        if not callable(solver):
            raise TypeError(f"solver: expected a callable solver(G, XtL, mu) -> W, got {describe(solver)}")
        weights = {mu: solver(train.G, train.XtL, mu) for mu in
                   tqdm(mus_list, desc="μ-lasso", disable=None if progress else True, leave=False)}
    X = test.X.astype(np.float64)
    names = train.class_names
    rows, long_rows = [], []
    for mu in mus_list:
        W = weights[mu]
        W = W.detach().cpu().numpy() if isinstance(W, torch.Tensor) else np.asarray(W, dtype=np.float64)
        if W.shape != (train.m, train.n_classes):
            raise ValueError(f"solver: returned W of shape {W.shape} for μ={mu}, expected {(train.m, train.n_classes)}")
        S = X @ W
        aucs = []
        for j in range(train.n_classes):
            y = test.labels == j
            auc = float(roc_auc_score(y, S[:, j])) if 0 < y.sum() < len(y) else float("nan")
            aucs.append(auc)
            long_rows.append(dict(mu=mu, **{"class": j}, class_name=names[j], auc=auc,
                                  n_features=int(np.count_nonzero(W[:, j]))))
        aucs_arr = np.array(aucs)
        ok = ~np.isnan(aucs_arr)
        rows.append(dict(mu=mu, mean_auc=float(aucs_arr[ok].mean()) if ok.any() else float("nan"),
                         std_auc=float(aucs_arr[ok].std()) if ok.any() else float("nan"), n_classes=int(ok.sum()),
                         n_features=int(np.count_nonzero(np.any(W != 0, axis=1))),
                         n_weights=int(np.count_nonzero(W))))
    if per_class:
        return pd.DataFrame(long_rows, columns=["mu", "class", "class_name", "auc", "n_features"])
    return pd.DataFrame(rows, columns=["mu", "mean_auc", "std_auc", "n_classes", "n_features", "n_weights"])
