"""The counterfactual interpretation study (issue 27, item 3) on run folders.

For one run (:func:`counterfactual_run`: a model trained on an an8Flower fold) every selector
of :data:`vxnb.evaluate.counterfactual.SELECTORS` picks the same number of features per class
(``k``, or fewer where the μ-lasso at ``mu`` keeps fewer non-zero weights for a class: then
every selector takes that many); for each selected feature:

* ``drop``: its causal specificity -- the relative drop of its mean response over the test
  images of its class when their class colour is swapped to another class's (the
  counterfactual renders ``An8Flower(..., counterfactual=shift)``, same pose, crop, rotation);
* ``precision``: its part precision -- the share of its top training patches' receptive
  fields inside the class part's mask.

:func:`counterfactual_study` runs it over folds and seeds and summarises each measure with
``vxnb.evaluate.counterfactual.compare_selectors`` (mean ± 95 % interval over the (fold, seed)
units, Wilcoxon signed-rank of the μ-lasso against each selector).

>>> table, summary = counterfactual_study(RunConfig(size=64, quick=True), folds=(0, 1), seeds=(0,))
>>> summary["drop"]        # selector, n, mean, ci_low, ci_high, wilcoxon_p, reference_better

The shortcut demonstration (issue 27, item 4), :func:`shortcut_study`: a model trained on
renders with a planted shortcut (``RunConfig.distractor_rate`` > 0: that fraction of the
training images carries a ball of its class colour elsewhere in the image) and a model trained
without it (rate 0). For each, the μ-lasso's features of every class (:func:`shortcut_run`)
collect their top patches on the run's test images rendered again with a distractor in every
one (:func:`shortcut_probe`); a class *finds the shortcut* when one of its features has at least
``threshold`` of its top patches' receptive fields on the distractor
(``vxnb.evaluate.counterfactual.shortcut_detection``). The share of such classes is the
detection rate for the shortcut model and the false-alarm rate for the rate-0 model.

>>> table, summary = shortcut_study(RunConfig(size=64, quick=True), rate=1.0, folds=(0,))
>>> summary            # role (false alarm / detection), distractor_rate, n, rate, ci_low, ci_high
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from torch.utils.data import Subset
from tqdm.auto import tqdm

from vxnb import _store
from vxnb._checks import check_int, check_positive_int
from vxnb.evaluate.counterfactual import (SELECTORS, causal_specificity, compare_selectors, crp_channel_relevance,
                                          distractor_precision, mean_ci, part_precision, select_features,
                                          selection_frame, shortcut_detection)
from vxnb.utils import describe, read_json
from vxnb.studies import benchmark, runs
from vxnb.studies.datasets.an8flower import knobs as run_knobs

__all__ = ["MEASURES", "COUNTERFACTUAL_VERSION", "SHORTCUT_VERSION", "counterfactual_data", "counterfactual_run", "counterfactual_study", "shortcut_probe",
           "find_shortcut", "shortcut_run", "shortcut_study"]

#: The two measures, each a column of the run table and a summary of the study.
MEASURES: tuple[str, ...] = ("drop", "precision")

#: Format versions of the two run tables in the store (``counterfactual-<key>.csv``,
#: ``shortcut-<key>.csv`` in the run folder), keyed by their settings and the run's checkpoint.
COUNTERFACTUAL_VERSION = 1
SHORTCUT_VERSION = 1
runs.register_artifact("counterfactual-table", COUNTERFACTUAL_VERSION)
runs.register_artifact("shortcut-table", SHORTCUT_VERSION)


def _table_address(cfg: runs.RunConfig, kind: str, version: int, settings: dict[str, Any]
                   ) -> tuple[Path, str, dict[str, Any], str]:
    """Where a run's result table of ``kind`` is stored and under which key: (path, key, inputs,
    checkpoint key). Computed from the settings alone, so nothing is trained or loaded."""
    ckey = runs.checkpoint_key(cfg)
    inputs = {"checkpoint": ckey, **benchmark.fold_inputs(cfg)}
    key = _store.key(kind, settings, inputs, version)
    return runs.run_dir(cfg) / f"{kind.split('-')[0]}-{key}.csv", key, inputs, ckey


def _stored_table(cfg: runs.RunConfig, kind: str, version: int, settings: dict[str, Any], compute, *,
                  recompute: bool = False) -> pd.DataFrame:
    """A run's result table through the store: ``<kind>-<key>.csv`` in the run folder, keyed by
    ``settings``, the run's checkpoint and the settings that pick its features
    (``benchmark.fold_inputs``), so a second call with the same settings reads it back and a
    retrained model or other data never does."""
    path, key, inputs, ckey = _table_address(cfg, kind, version, settings)
    table, _ = _store.load_or_compute(
        path, key, kind, compute,
        load=lambda f: pd.read_csv(f, dtype={"layer": str, "class_name": str}),
        save=lambda t, tmp: t.to_csv(tmp, index=False), recompute=recompute, settings=settings, inputs=inputs,
        upstream=[ckey], version=version, root=cfg.runs_dir)
    return table


def _check_cfg(cfg: Any) -> runs.RunConfig:
    if not isinstance(cfg, runs.RunConfig):
        raise TypeError(f"cfg: expected a RunConfig, got {describe(cfg)}")
    if cfg.dataset != "an8flower" or cfg.variant == "part-2c":
        raise ValueError("cfg: the counterfactual study needs dataset='an8flower' with a colour variant "
                         f"('single-6c' or 'double-12c'), got dataset={cfg.dataset!r}, variant={cfg.variant!r}")
    return cfg


def counterfactual_data(cfg: runs.RunConfig, test: Any, shift: int = 1, *, progress: bool = True):
    """The counterfactual twins of the run's ``test`` split (a Subset of the run's an8Flower) and
    a content key for them (the counterfactual cache's manifest and the split's indices)."""
    from vxnb.data.an8flower import An8Flower

    full = An8Flower(cfg.data_dir, cfg.variant, cfg.size, seed=cfg.seed, knobs=run_knobs(cfg), counterfactual=shift,
                     progress=progress)
    indices = np.asarray(getattr(test, "indices", np.arange(len(test))), dtype=np.int64)
    cf = Subset(full, indices.tolist())
    key = _store.key("split", {"split": f"test-cf{shift}"},
                     {"data": _store.key("an8flower-manifest", read_json(full.folder / "manifest.json")),
                      "indices": _store.array_fingerprint(indices)})
    return cf, key


def counterfactual_run(cfg: runs.RunConfig, *, k: int = 5, mu: float = 10.0, mu_max: float = 50.0, shift: int = 1,
                       selectors: Sequence[str] = SELECTORS, top_n: int = 20, crp_per_class: int = 50,
                       n_random: int = 3, recompute: bool = False, progress: bool = True) -> pd.DataFrame:
    """One run's table: one row per (selector, class, selected feature) with ``drop`` and
    ``precision`` (see the module docstring), and the run's fold and seed.

    k: features per class; mu, mu_max: the μ-lasso's bound and its path's end;
    shift: which counterfactual (``vxnb.data.an8flower.counterfactual_label``);
    top_n: top patches per feature for the part precision; crp_per_class: training images per
    class whose CRP relevances rank the channels; n_random: random draws (seeds
    ``cfg.seed * 1000 + i``), averaged by the summary.

    The run's model, training features and μ-lasso path are the ones Table 1's benchmark
    builds for the same fold (``benchmark.fold_relevant``: the same keys, loaded, not
    recomputed). The table is stored by content key (its settings and the run's checkpoint), so
    a second call reads it back; ``recompute``: compute it again. It is also written as the
    run's table ``counterfactual-cf<shift>-k<k>-mu<mu>``.
    """
    cfg = _check_cfg(cfg)
    k = check_positive_int(k, "k")
    top_n = check_positive_int(top_n, "top_n")
    crp_per_class = check_positive_int(crp_per_class, "crp_per_class")
    n_random = check_positive_int(n_random, "n_random")
    bad = [s for s in selectors if s not in SELECTORS]
    if isinstance(selectors, str) or not selectors or bad or "mu-lasso" not in selectors:
        raise ValueError(f"selectors: expected a list of {SELECTORS} including 'mu-lasso', got {selectors!r}")
    settings = {"k": k, "mu": float(mu), "mu_max": float(mu_max), "shift": int(shift), "selectors": list(selectors),
                "top_n": top_n, "crp_per_class": crp_per_class, "n_random": n_random}
    table = _stored_table(cfg, "counterfactual-table", COUNTERFACTUAL_VERSION, settings,
                          lambda: _counterfactual_table(cfg, progress=progress, **settings), recompute=recompute)
    runs.save_table(cfg, f"counterfactual-cf{shift}-k{k}-mu{mu:g}", table)
    return table


def _train_features(cfg: runs.RunConfig, model: Any, data: Any, progress: bool):
    """The run's training features with X, under the key Table 1's ``fold_relevant`` uses
    (``keep_X="auto"``) when that keeps X, else extracted again with X."""
    feats = runs.get_features(cfg, model, "train", data=data, progress=progress)
    if feats.X is None:
        feats = runs.get_features(cfg, model, "train", data=data, progress=progress, keep_X=True)
    return feats


def _counterfactual_table(cfg: runs.RunConfig, *, k: int, mu: float, mu_max: float, shift: int,
                          selectors: Sequence[str], top_n: int, crp_per_class: int, n_random: int,
                          progress: bool) -> pd.DataFrame:
    from vxnb.features import extract_features
    from vxnb.interpret import receptive_field, top_patch_table

    data = runs.load_data(cfg, progress=progress)
    train, test, classes = data
    model, _ = runs.get_model(cfg, progress=progress, data=data)
    feats = _train_features(cfg, model, data, progress)
    layers = list(dict.fromkeys(feats.columns["layer"]))
    tfeats = runs.get_features(cfg, model, "test", data=data, progress=progress, keep_X=True, layers=layers)
    cf_test, cf_key = counterfactual_data(cfg, test, shift, progress=progress)
    cfeats = extract_features(model, cf_test, layers=layers, n_classes=len(classes), keep_X=True,
                              cache_dir=runs.run_dir(cfg) / "features", data_key=cf_key, progress=progress,
                              batch_size=cfg.batch_size)
    for name, f in (("test", tfeats), ("counterfactual", cfeats)):
        if not f.columns[["layer", "channel"]].equals(feats.columns[["layer", "channel"]]):
            raise RuntimeError(f"{name} features have other columns than the training features")
    W = runs.get_lasso_path(cfg, feats, mu_max=mu_max).coef(mu)
    ks = np.minimum(k, (W != 0).sum(axis=0)).astype(np.int64)

    picks: dict[str, list[list[np.ndarray]]] = {}
    for sel in selectors:
        if sel == "random":
            picks[sel] = [select_features("random", feats.X, feats.labels, ks, n_classes=len(classes),
                                          seed=cfg.seed * 1000 + i) for i in range(n_random)]
        elif sel == "crp":
            rows = _per_class(feats.labels, crp_per_class, cfg.seed)
            images = np.stack([train[int(feats.index[r])][0].numpy() for r in rows])
            rel = _columns_relevance(crp_channel_relevance(model, images, feats.labels[rows], layers), feats, layers)
            picks[sel] = [select_features("crp", feats.X[rows], feats.labels[rows], ks, relevance=rel,
                                          n_classes=len(classes))]
        else:
            picks[sel] = [select_features(sel, feats.X, feats.labels, ks, W=W, n_classes=len(classes))]

    cols = feats.columns
    wanted = sorted({int(j) for draws in picks.values() for sel in draws for f in sel for j in f})
    pairs = [(cols["layer"].iloc[j], int(cols["channel"].iloc[j])) for j in wanted]
    top = top_patch_table(model, train, pairs, k=top_n, cache_dir=runs.run_dir(cfg),
                          data_key=runs.split_key(cfg, "train", train), progress=progress)
    fields = {layer: receptive_field(model, layer, input_size=cfg.size) for layer in {p[0] for p in pairs}}
    prec = part_precision(top, fields, lambda i: train[i][2], cfg.size)
    prec = prec.set_index(["layer", "channel"])["precision"]

    frames = []
    for sel, draws in tqdm(picks.items(), desc="counterfactual measures", disable=None if progress else True):
        for draw, chosen in enumerate(draws):
            out = causal_specificity(tfeats.X, cfeats.X, tfeats.labels, chosen)
            out["layer"] = cols["layer"].to_numpy()[out["feature"]]
            out["channel"] = cols["channel"].to_numpy()[out["feature"]].astype(np.int64)
            out["precision"] = [prec.get((lay, ch), np.nan) for lay, ch in zip(out["layer"], out["channel"])]
            out.insert(0, "draw", draw)
            out.insert(0, "selector", sel)
            frames.append(out)
    table = pd.concat(frames, ignore_index=True)
    table.insert(1, "fold", cfg.test_fold)
    table.insert(2, "seed", cfg.seed)
    table["class_name"] = [classes[c] for c in table["class"]]
    return table


def _per_class(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` rows of every class, drawn with ``seed`` (sorted)."""
    rng = np.random.default_rng(seed)
    rows = [rng.choice(np.flatnonzero(labels == c), size=min(n, int((labels == c).sum())), replace=False)
            for c in np.unique(labels)]
    return np.sort(np.concatenate(rows))


def _columns_relevance(rel: np.ndarray, feats: Any, layers: list[str]) -> np.ndarray:
    """CRP's (N, channels of every layer side by side) as (N, m) in the order of ``feats.columns``."""
    offsets, start = {}, 0
    counts = feats.columns.groupby("layer", sort=False)["channel"].max() + 1
    for layer in layers:
        offsets[layer] = start
        start += int(counts[layer])
    if start != rel.shape[1]:
        raise RuntimeError(f"CRP returned {rel.shape[1]} channels, the features have {start}")
    idx = [offsets[lay] + int(ch) for lay, ch in zip(feats.columns["layer"], feats.columns["channel"])]
    return rel[:, idx]


def counterfactual_study(cfg: runs.RunConfig, *, folds: Sequence[int] = (0, 1, 2, 3, 4), seeds: Sequence[int] = (0,),
                         progress: bool = True, **kwargs: Any) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """:func:`counterfactual_run` on every (fold, seed) -- a model per unit -- and the summary of
    each measure of :data:`MEASURES` (``compare_selectors``). Returns (table, {measure: summary})."""
    cfg = _check_cfg(cfg)
    if isinstance(folds, (int, str)) or not folds or any(not isinstance(f, int) or not 0 <= f < 5 for f in folds):
        raise ValueError(f"folds: expected a list of ints in 0..4, got {folds!r}")
    if isinstance(seeds, (int, str)) or not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds: expected a list of ints >= 0, got {seeds!r}")
    tables = [counterfactual_run(dataclasses.replace(cfg, test_fold=f, seed=s, name=None), progress=progress, **kwargs)
              for f in folds for s in seeds]
    table = pd.concat(tables, ignore_index=True)
    return table, {m: compare_selectors(table, m) for m in MEASURES}


# -------------------------------------------------------------------------------- the shortcut
def _check_rate(rate: Any, arg: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0 < rate <= 1):
        raise ValueError(f"{arg}: expected a distractor rate in (0, 1], got {describe(rate)}")
    return float(rate)


def _check_an8flower(cfg: Any) -> runs.RunConfig:
    if not isinstance(cfg, runs.RunConfig):
        raise TypeError(f"cfg: expected a RunConfig, got {describe(cfg)}")
    if not cfg.spec.has_knobs:
        raise ValueError(f"cfg: the shortcut study needs a dataset rendered with distractors (dataset='an8flower'), "
                         f"got {cfg.dataset!r}")
    return cfg


def shortcut_probe(cfg: runs.RunConfig, *, rate: float = 1.0, progress: bool = True) -> Subset:
    """The run's test split rendered again with distractors at ``rate`` (1: in every image): the
    same items (views, crops, angles, classes; the same ``train_limit`` subset) and the run's
    other knobs -- the images whose distractor masks are the truth of :func:`find_shortcut`."""
    cfg = _check_an8flower(cfg)
    rate = _check_rate(rate, "rate")
    return runs.load_data(dataclasses.replace(cfg, distractor_rate=rate, name=None), progress=progress)[1]


def find_shortcut(model: Any, selected: pd.DataFrame, probe: Any, *, top_n: int = 20, threshold: float = 0.5,
                  progress: bool = True) -> pd.DataFrame:
    """Whether each class's selected features point at the planted distractor.

    selected: one row per (class, feature) with class, layer, channel (``selection_frame``);
    probe: an An8Flower with distractors, or a Subset of one (:func:`shortcut_probe`). Each
    feature's ``top_n`` top patches over the probe are scored by the share of their receptive
    fields on the distractor (``distractor_precision``). Returns one row per class: class,
    n_features, best (the largest share), detected (best >= threshold).
    """
    if not isinstance(selected, pd.DataFrame) or not {"class", "layer", "channel"} <= set(selected.columns):
        raise TypeError(f"selected: expected a DataFrame with columns class, layer, channel, got {describe(selected)}")
    if selected.empty:
        raise ValueError("selected: no feature selected for any class")
    pairs = selected[["layer", "channel"]].drop_duplicates().reset_index(drop=True)
    prec = distractor_precision(model, probe, pairs, k=check_positive_int(top_n, "top_n"), progress=progress)
    return shortcut_detection(selected, prec, threshold)


def shortcut_run(cfg: runs.RunConfig, *, k: int = 5, mu: float = 10.0, mu_max: float = 50.0, top_n: int = 20,
                 threshold: float = 0.5, probe_rate: float = 1.0, recompute: bool = False,
                 progress: bool = True) -> pd.DataFrame:
    """One run (trained at ``cfg.distractor_rate``): the μ-lasso's top-``k`` features of every
    class at ``mu`` (fewer where fewer weights are non-zero) and :func:`find_shortcut` on
    :func:`shortcut_probe` at ``probe_rate``. Returns one row per class with the run's
    distractor_rate, fold, seed, class_name, n_features, best, detected, and the model's test
    accuracy on its own test split (``test_accuracy``) and on the probe (``probe_accuracy``);
    saved as the run's table ``shortcut-k<k>-mu<mu>-p<probe_rate>``.

    At rate 0 the run is Table 1's fold (its model, features and lasso path are loaded). The
    table is stored by content key (settings and checkpoint): a second call reads it back;
    ``recompute``: compute it again."""
    cfg = _check_an8flower(cfg)
    settings = _shortcut_settings(k=k, mu=mu, mu_max=mu_max, top_n=top_n, threshold=threshold, probe_rate=probe_rate)
    k, probe_rate = settings["k"], settings["probe_rate"]
    out = _stored_table(cfg, "shortcut-table", SHORTCUT_VERSION, settings,
                        lambda: _shortcut_table(cfg, progress=progress, **settings), recompute=recompute)
    runs.save_table(cfg, f"shortcut-k{k}-mu{mu:g}-p{probe_rate:g}", out)
    return out


def _shortcut_settings(*, k: int = 5, mu: float = 10.0, mu_max: float = 50.0, top_n: int = 20,
                       threshold: float = 0.5, probe_rate: float = 1.0) -> dict[str, Any]:
    """:func:`shortcut_run`'s settings, checked: the key of its stored table."""
    k = check_positive_int(k, "k")
    top_n = check_positive_int(top_n, "top_n")
    probe_rate = _check_rate(probe_rate, "probe_rate")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold: expected a number in (0, 1], got {describe(threshold)}")
    return {"k": k, "mu": float(mu), "mu_max": float(mu_max), "top_n": top_n, "threshold": float(threshold),
            "probe_rate": probe_rate}


def _shortcut_table(cfg: runs.RunConfig, *, k: int, mu: float, mu_max: float, top_n: int, threshold: float,
                    probe_rate: float, progress: bool) -> pd.DataFrame:
    from vxnb.models import accuracy

    data = runs.load_data(cfg, progress=progress)
    classes = data[2]
    model, _ = runs.get_model(cfg, progress=progress, data=data)
    feats = runs.get_features(cfg, model, "train", data=data, progress=progress)
    W = runs.get_lasso_path(cfg, feats, mu_max=mu_max).coef(mu)
    ks = np.minimum(k, (W != 0).sum(axis=0)).astype(np.int64)
    selected = selection_frame(select_features("mu-lasso", k=ks, W=W), feats.columns)
    probe = shortcut_probe(cfg, rate=probe_rate, progress=progress)
    out = find_shortcut(model, selected, probe, top_n=top_n, threshold=threshold, progress=progress)
    out.insert(0, "distractor_rate", cfg.distractor_rate)
    out.insert(1, "fold", cfg.test_fold)
    out.insert(2, "seed", cfg.seed)
    out.insert(4, "class_name", [classes[c] for c in out["class"]])
    out["test_accuracy"] = accuracy(model, data[1], batch_size=cfg.batch_size)
    out["probe_accuracy"] = accuracy(model, probe, batch_size=cfg.batch_size)
    return out


def shortcut_study(cfg: runs.RunConfig, *, rate: float = 0.5, folds: Sequence[int] = (0,), seeds: Sequence[int] = (0,),
                   progress: bool = True, train_workers: int | None = None, **kwargs: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`shortcut_run` for a model trained at distractor rate 0 and one at ``rate`` (a
    planted shortcut), on every (fold, seed). Returns (table, summary): the summary has one row
    per rate -- role ("false alarm" at rate 0, "detection" at ``rate``), n (classes × units),
    the share of classes whose features found the distractor (``rate_found``) with its 95 %
    interval over the (fold, seed) units, and the mean test and probe accuracies.

    The models of the runs whose table is not stored yet are trained first, ``train_workers``
    at a time (:func:`vxnb.studies.runs.train_models`; None: one per CPU core); ``kwargs`` go to
    :func:`shortcut_run`."""
    cfg = _check_an8flower(cfg)
    rate = _check_rate(rate, "rate")
    if isinstance(folds, (int, str)) or not folds or any(not isinstance(f, int) or not 0 <= f < 5 for f in folds):
        raise ValueError(f"folds: expected a list of ints in 0..4, got {folds!r}")
    if isinstance(seeds, (int, str)) or not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds: expected a list of ints >= 0, got {seeds!r}")
    if train_workers is not None:
        train_workers = check_int(train_workers, "train_workers", 1, None, "or None (one per CPU core)")
    settings = _shortcut_settings(**{k: v for k, v in kwargs.items() if k != "recompute"})
    cfgs = [dataclasses.replace(cfg, distractor_rate=r, test_fold=f, seed=s, name=None)
            for r in (0.0, rate) for f in folds for s in seeds]
    # the models of the runs whose table is not stored yet, trained up front in parallel workers
    # (runs.train_models skips those whose checkpoint is there: at rate 0, Table 1's folds)
    pending = [c for c in cfgs if kwargs.get("recompute")
               or not _table_address(c, "shortcut-table", SHORTCUT_VERSION, settings)[0].exists()]
    runs.train_models(pending, workers=train_workers, progress=progress)
    tables = [shortcut_run(c, progress=progress, **kwargs)
              for c in tqdm(cfgs, desc="shortcut runs", disable=None if progress else True)]
    table = pd.concat(tables, ignore_index=True)
    rows = []
    for r, part in table.groupby("distractor_rate", sort=True):
        per_unit = part.groupby(["fold", "seed"])["detected"].mean()
        mean, lo, hi = mean_ci(per_unit.to_numpy())
        rows.append({"role": "false alarm" if r == 0 else "detection", "distractor_rate": r, "n": len(part),
                     "rate_found": mean, "ci_low": lo, "ci_high": hi,
                     "test_accuracy": part.groupby(["fold", "seed"])["test_accuracy"].first().mean(),
                     "probe_accuracy": part.groupby(["fold", "seed"])["probe_accuracy"].first().mean()})
    return table, pd.DataFrame(rows)
