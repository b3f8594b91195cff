"""Table 1 of the paper: its methods and rows, the paper's numbers, and how results are shown.

:class:`BenchmarkResult` (what :func:`vxnb.studies.benchmark.run_benchmark` returns) holds tidy
frames over variants and folds; this module turns them into Table 1's layout
(:func:`format_table`, :func:`tables_with_paper`) and sets them beside the paper's numbers
(:data:`PAPER_TABLE1`, :func:`compare_with_paper`). No run folders, no computation of heatmaps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from vxnb.baselines import METHOD_LABELS as _BASE_LABELS
from vxnb.evaluate.occlusion import mean_confidence_difference
from vxnb.data.an8flower import VARIANTS
from vxnb.explanations import COMBINES
from vxnb.utils import describe

__all__ = ["BenchmarkMethod", "METHOD_REGISTRY", "register_method", "unregister_method", "METHODS", "BASELINE_METHODS", "OURS_METHODS", "COMBINES", "METHOD_LABELS", "VARIANTS", "PAPER_TABLE1",
           "row_name", "row_labels", "BenchmarkResult", "format_table", "paper_table", "compare_with_paper",
           "tables_with_paper"]

@dataclass(frozen=True)
class BenchmarkMethod:
    """One row of the benchmark and of Table 1.

    ``draw``: our μ-lasso-selected top-k features drawn this way (``vxnb.explanations.DRAWS``);
    None for a class-level map, computed by ``heatmaps(model, images, targets, layer=...)`` →
    (N, H, W) (default: ``vxnb.baselines.attribution(name, ...)``).
    """

    name: str
    label: str
    draw: str | None = None
    heatmaps: Callable | None = None

    @property
    def ours(self) -> bool:
        return self.draw is not None


#: The one method registry: every method the benchmark runs, in Table 1's row order (the
#: paper's rows, then the extra class-level rows). ``METHODS``, ``OURS_METHODS``,
#: ``BASELINE_METHODS`` and ``METHOD_LABELS`` are read from it; add a method with
#: :func:`register_method` and it appears in the benchmark, Table 1 and the report.
METHOD_REGISTRY: dict[str, BenchmarkMethod] = {}
METHODS: tuple[str, ...] = ()
OURS_METHODS: tuple[str, ...] = ()
BASELINE_METHODS: tuple[str, ...] = ()
#: Display names: the paper's for its rows; the class-level extras say what they are.
METHOD_LABELS: dict[str, str] = dict(_BASE_LABELS)


def register_method(name: str, label: str, *, draw: str | None = None, heatmaps: Callable | None = None,
                    before: str | None = None) -> BenchmarkMethod:
    """Add a benchmark method (a row of Table 1), at the end or ``before`` another method.

    A class-level baseline needs ``heatmaps(model, images, targets, layer=None)`` → (N, H, W)
    unless ``name`` is a method of :func:`vxnb.baselines.attribution`.
    """
    global METHODS, OURS_METHODS, BASELINE_METHODS
    from vxnb.baselines import METHODS as ATTRIBUTIONS
    from vxnb.explanations import DRAWS

    if not isinstance(name, str) or not name or name in METHOD_REGISTRY or "[" in name:
        raise ValueError(f"name: expected a new method name without '[' (taken: {', '.join(METHOD_REGISTRY)}), "
                         f"got {name!r}")
    if not isinstance(label, str) or not label:
        raise ValueError(f"label: expected a non-empty display name, got {label!r}")
    if draw is not None and draw not in DRAWS:
        raise ValueError(f"draw: expected one of {DRAWS} or None, got {draw!r}")
    if draw is None and heatmaps is None and name not in ATTRIBUTIONS:
        raise ValueError(f"heatmaps: method {name!r} is not one of vxnb.baselines.attribution's "
                         f"({', '.join(ATTRIBUTIONS)}); give heatmaps(model, images, targets, layer=None)")
    if heatmaps is not None and not callable(heatmaps):
        raise TypeError(f"heatmaps: expected a callable, got {describe(heatmaps)}")
    if before is not None and before not in METHOD_REGISTRY:
        raise ValueError(f"before: expected one of {', '.join(METHOD_REGISTRY)}, got {before!r}")
    method = BenchmarkMethod(name, label, draw, heatmaps)
    items = list(METHOD_REGISTRY.items())
    at = len(items) if before is None else [n for n, _ in items].index(before)
    items.insert(at, (name, method))
    METHOD_REGISTRY.clear()
    METHOD_REGISTRY.update(items)
    METHODS = tuple(METHOD_REGISTRY)
    OURS_METHODS = tuple(n for n, m in METHOD_REGISTRY.items() if m.ours)
    BASELINE_METHODS = tuple(n for n, m in METHOD_REGISTRY.items() if not m.ours)
    METHOD_LABELS[name] = label
    return method


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (tests, notebooks trying one out)."""
    global METHODS, OURS_METHODS, BASELINE_METHODS
    if name not in METHOD_REGISTRY:
        raise ValueError(f"name: expected one of {', '.join(METHOD_REGISTRY)}, got {name!r}")
    del METHOD_REGISTRY[name]
    METHODS = tuple(METHOD_REGISTRY)
    OURS_METHODS = tuple(n for n, m in METHOD_REGISTRY.items() if m.ours)
    BASELINE_METHODS = tuple(n for n, m in METHOD_REGISTRY.items() if not m.ours)
    METHOD_LABELS.pop(name, None)
    METHOD_LABELS.update({k: v for k, v in _BASE_LABELS.items() if k not in METHOD_LABELS})


for _name, _label, _draw in (
        ("ours_upsampled", "Upsam. Act.", "upsampled"), ("ours_deconv", "Deconv+GB", "deconv"),
        ("gradcam", _BASE_LABELS["gradcam"], None), ("guided_gradcam", _BASE_LABELS["guided_gradcam"], None),
        ("gradcampp", _BASE_LABELS["gradcampp"], None), ("guided_gradcampp", _BASE_LABELS["guided_gradcampp"], None),
        ("ours", "Ours", "resampled"), ("activation", "Last-conv act. (class)", None),
        ("deconv_gb", "GB from logit (class)", None)):
    register_method(_name, _label, draw=_draw)

#: Table 1 of the paper: area under the IoU curve (%), mean and std over 5 folds, keyed by the
#: method that computes each row ("Upsam. Act." and "Deconv+GB" draw our selected features).
#: The paper reports no part-2c row.
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "single-6c": {
        "ours_upsampled": (16.8, 2.63), "ours_deconv": (21.3, 0.77), "gradcam": (17.5, 0.25),
        "guided_gradcam": (19.9, 0.61), "gradcampp": (15.6, 0.57), "guided_gradcampp": (19.6, 0.65),
        "ours": (22.5, 0.82),
    },
    "double-12c": {
        "ours_upsampled": (16.1, 1.30), "ours_deconv": (21.9, 0.72), "gradcam": (14.8, 0.16),
        "guided_gradcam": (19.4, 0.34), "gradcampp": (14.6, 0.12), "guided_gradcampp": (19.7, 0.27),
        "ours": (23.2, 0.60),
    },
}


def row_name(method: str, combine: str | None) -> str:
    """The key of one result row: the method, and for our methods the combination, ``"ours[max]"``."""
    return f"{method}[{combine}]" if method in OURS_METHODS else method


@dataclass
class BenchmarkResult:
    """What :func:`vxnb.studies.benchmark.run_benchmark` returns: tidy frames over variants and folds.

    ``per_fold``: variant, fold, method, combine ("" for class-level maps), label, auc,
    n_images, accuracy, model_test_accuracy, n_relevant, n_top, n_left_out, cached.
    ``curves``: variant, fold, method, combine, label, threshold, iou.
    ``per_image``: variant, fold, method, combine, image, auc, grid (our draws' mean grid score).
    ``quantus``: variant, fold, method, combine, label, the Quantus metrics, n_scored, n_refused.
    ``top_features``: variant, fold, class, layer, kind, channel, n, mean_response.
    ``occlusion``: variant, fold, method, label, level, coverage, confidence.
    ``timings``: variant, fold, phase, seconds (cached folds: the time of the run that made them).
    ``files``: CSV files written (name → path).
    """

    per_fold: pd.DataFrame
    curves: pd.DataFrame
    occlusion: pd.DataFrame
    timings: pd.DataFrame
    settings: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    per_image: pd.DataFrame = field(default_factory=pd.DataFrame)
    quantus: pd.DataFrame = field(default_factory=pd.DataFrame)
    top_features: pd.DataFrame = field(default_factory=pd.DataFrame)

    def summary(self) -> pd.DataFrame:
        """Per variant, method and combination: ``mean``, ``std`` (ddof=1) of the area over folds,
        ``n_folds``."""
        g = self.per_fold.groupby(["variant", "method", "combine"], sort=False)["auc"]
        out = g.agg(mean="mean", std="std", n_folds="count").reset_index()
        out.insert(3, "label", row_labels(out))
        return out

    def resampling_effect(self) -> pd.DataFrame:
        """The resampling's own effect: ``ours`` − ``ours_deconv`` (same features, same combination).

        Per variant and combination: ``mean_diff``, ``std_diff`` (ddof=1) of the per-fold areas'
        difference (points of %), ``n_folds``; ``p_area``: Wilcoxon signed-rank test (two-sided,
        ``scipy.stats.wilcoxon``) on the per-image areas, paired over all evaluated images of
        those folds (``n_images``); the grid score of the drawn maps, plain vs resampled, mean
        over images (``grid_deconv``, ``grid_ours``) and its Wilcoxon ``p_grid``.
        """
        from scipy.stats import wilcoxon

        rows = []
        pf, pi = self.per_fold, self.per_image
        for (variant, combine), g in pf[pf["method"].isin(["ours", "ours_deconv"])].groupby(
                ["variant", "combine"], sort=False):
            w = g.pivot(index="fold", columns="method", values="auc")
            if not {"ours", "ours_deconv"} <= set(w.columns):
                continue
            d = (w["ours"] - w["ours_deconv"]).dropna()
            img = pi[(pi["variant"] == variant) & (pi["combine"] == combine)]
            p = img.pivot_table(index=["fold", "image"], columns="method", values=["auc", "grid"])
            a_o, a_d = p[("auc", "ours")].to_numpy(), p[("auc", "ours_deconv")].to_numpy()
            ok = np.isfinite(a_o) & np.isfinite(a_d)
            g_o, g_d = p[("grid", "ours")].to_numpy(), p[("grid", "ours_deconv")].to_numpy()
            okg = np.isfinite(g_o) & np.isfinite(g_d)
            rows.append({"variant": variant, "combine": combine, "mean_diff": float(d.mean()),
                         "std_diff": float(d.std(ddof=1)) if len(d) > 1 else float("nan"), "n_folds": int(len(d)),
                         "n_images": int(ok.sum()), "p_area": _wilcoxon_p(wilcoxon, a_o[ok], a_d[ok]),
                         "grid_deconv": float(np.mean(g_d[okg])) if okg.any() else float("nan"),
                         "grid_ours": float(np.mean(g_o[okg])) if okg.any() else float("nan"),
                         "p_grid": _wilcoxon_p(wilcoxon, g_o[okg], g_d[okg])})
        return pd.DataFrame(rows, columns=["variant", "combine", "mean_diff", "std_diff", "n_folds", "n_images",
                                           "p_area", "grid_deconv", "grid_ours", "p_grid"])

    def quantus_summary(self) -> pd.DataFrame:
        """Quantus's metrics per variant, method and combination: the mean over folds, and the
        refused (constant) maps summed over folds."""
        from vxnb.evaluate.quantus_metrics import QUANTUS_METRICS

        if self.quantus.empty:
            return self.quantus.copy()
        g = self.quantus.groupby(["variant", "method", "combine"], sort=False)
        out = g.agg({**{m: "mean" for m in QUANTUS_METRICS}, "n_scored": "sum", "n_refused": "sum"}).reset_index()
        out.insert(3, "label", row_labels(out))
        return out

    def table(self) -> pd.DataFrame:
        """Table 1's layout: one row per method (paper order), one column per variant, 'mean ± std'."""
        return format_table(self.summary())

    def mean_curves(self) -> pd.DataFrame:
        """IoU curves averaged over folds: variant, method, combine, label, threshold, iou, iou_std."""
        g = self.curves.groupby(["variant", "method", "combine", "threshold"], sort=False)["iou"]
        out = g.agg(iou="mean", iou_std="std").reset_index()
        out.insert(3, "label", row_labels(out))
        return out

    def occlusion_curves(self) -> pd.DataFrame:
        """Box-occlusion curves averaged over folds: variant, method, label, level, coverage, confidence."""
        if self.occlusion.empty:
            return self.occlusion.copy()
        g = self.occlusion.groupby(["variant", "method", "level"], sort=False)
        out = g.agg(coverage=("coverage", "mean"), confidence=("confidence", "mean"),
                    confidence_std=("confidence", "std")).reset_index()
        out.insert(2, "label", out["method"].map(METHOD_LABELS))
        return out

    def occlusion_differences(self, reference: str = "ours_deconv") -> pd.DataFrame:
        """Mean over the coverage levels > 0 of confidence(method) − confidence(reference), per
        variant and method (a fraction; the paper reports about 0.02 for ours vs Deconv+GB)."""
        curves = self.occlusion_curves()
        rows = []
        for variant, frame in curves.groupby("variant", sort=False):
            if reference not in set(frame["method"]):
                continue
            for method in dict.fromkeys(frame["method"]):
                if method == reference:
                    continue
                rows.append({"variant": variant, "method": method, "label": METHOD_LABELS[method],
                             "reference": reference,
                             "mean_difference": mean_confidence_difference(frame, method, reference)})
        return pd.DataFrame(rows, columns=["variant", "method", "label", "reference", "mean_difference"])

    def compare_with_paper(self) -> pd.DataFrame:
        """See :func:`compare_with_paper`."""
        return compare_with_paper(self.summary())


def row_labels(frame: pd.DataFrame) -> list[str]:
    """Display name of each row: the method's, with the combination for our methods."""
    combine = frame["combine"] if "combine" in frame.columns else pd.Series([""] * len(frame), index=frame.index)
    return [METHOD_LABELS[m] + (f" ({c})" if c else "") for m, c in zip(frame["method"], combine)]


def _wilcoxon_p(wilcoxon: Callable, a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of a − b (NaN: too few or all-zero differences)."""
    d = np.asarray(a) - np.asarray(b)
    if d.size < 2 or not np.any(d != 0):
        return float("nan")
    return float(wilcoxon(a, b).pvalue)


def _row_order(frame: pd.DataFrame) -> list[tuple[str, str]]:
    combos = list(dict.fromkeys(frame["combine"])) if "combine" in frame.columns else [""]
    rank = {c: i for i, c in enumerate(("", *COMBINES))}
    keys = {(m, c) for m, c in zip(frame["method"], frame["combine"] if "combine" in frame.columns else [""] * len(frame))}
    return sorted(keys, key=lambda mc: (METHODS.index(mc[0]), rank.get(mc[1], len(rank)), combos.index(mc[1])))


def format_table(summary: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """A :meth:`BenchmarkResult.summary`-like frame (variant, method[, combine], mean, std) in Table 1's
    layout: one row per method (and combination), one column per variant, 'mean ± std'."""
    summary = summary if "combine" in summary.columns else summary.assign(combine="")
    cells = summary.assign(cell=[f"{m:.{digits}f} ± {s:.2f}" if np.isfinite(s) else f"{m:.{digits}f}"
                                 for m, s in zip(summary["mean"], summary["std"])])
    table = cells.pivot(index=["method", "combine"], columns="variant", values="cell")
    order = _row_order(summary)
    cols = [v for v in VARIANTS if v in table.columns]
    table = table.loc[order, cols]
    table.index = row_labels(pd.DataFrame(order, columns=["method", "combine"]))
    table.index.name = "method"
    table.columns.name = None
    return table


def paper_table() -> pd.DataFrame:
    """Table 1 of the paper as a tidy frame: variant, method, label, mean, std, n_folds (5)."""
    rows = [{"variant": v, "method": m, "label": METHOD_LABELS[m], "mean": ms[0], "std": ms[1], "n_folds": 5}
            for v, table in PAPER_TABLE1.items() for m, ms in table.items()]
    return pd.DataFrame(rows)


def compare_with_paper(summary: pd.DataFrame) -> pd.DataFrame:
    """Our areas next to the paper's, per variant, method and combination.

    The paper's number stands beside the method that computes its row (:data:`PAPER_TABLE1`),
    for every combination; the class-level extras ("activation", "deconv_gb") get none.
    Columns: variant, method, combine, label, mean, std, rank (1 = largest area within the
    variant and combination, class-level rows ranked with each), gap_to_deconv_gb (mean −
    "ours_deconv"'s mean, same combination; class-level rows: the first combination's),
    paper_mean, paper_std, paper_rank, paper_gap_to_deconv_gb (NaN where the paper has no
    number, e.g. part-2c).
    """
    if not isinstance(summary, pd.DataFrame) or not {"variant", "method", "mean", "std"} <= set(summary.columns):
        raise ValueError("summary: expected a DataFrame with columns variant, method, mean, std "
                         "(BenchmarkResult.summary())")
    summary = summary if "combine" in summary.columns else summary.assign(combine="")
    ours = summary[["variant", "method", "combine", "mean", "std"]].copy()
    paper = paper_table()[["variant", "method", "mean", "std"]].rename(
        columns={"mean": "paper_mean", "std": "paper_std"})
    out = ours.merge(paper, on=["variant", "method"], how="left")
    out.insert(3, "label", row_labels(out))
    parts = []
    for variant, g in out.groupby("variant", sort=False):
        combos = [c for c in dict.fromkeys(g["combine"]) if c] or [""]
        for c in combos:
            sub = g[(g["combine"] == c) | (g["combine"] == "")].copy()
            sub["rank"] = sub["mean"].rank(ascending=False, method="min").astype(int)
            sub["paper_rank"] = sub["paper_mean"].rank(ascending=False, method="min")
            ref = sub[sub["method"] == "ours_deconv"]
            sub["gap_to_deconv_gb"] = sub["mean"] - (ref["mean"].iloc[0] if len(ref) else np.nan)
            sub["paper_gap_to_deconv_gb"] = sub["paper_mean"] - (ref["paper_mean"].iloc[0] if len(ref) else np.nan)
            parts.append(sub if c == combos[0] else sub[sub["combine"] == c])
    out = pd.concat(parts, ignore_index=True)
    return out[["variant", "method", "combine", "label", "mean", "std", "rank", "gap_to_deconv_gb", "paper_mean",
                "paper_std", "paper_rank", "paper_gap_to_deconv_gb"]]


def tables_with_paper(results: Mapping[str, "BenchmarkResult"], digits: int = 1) -> pd.DataFrame:
    """Table 1 under several fold splits next to the paper's: ``{split: BenchmarkResult}`` →
    one row per method (and combination), columns (variant, split) and (variant, "paper");
    the paper's number stands beside the method that computes its row, "—" where it has none."""
    if not isinstance(results, Mapping) or not results or \
            not all(isinstance(r, BenchmarkResult) for r in results.values()):
        raise TypeError(f"results: expected a non-empty {{split: BenchmarkResult}} dict, got {describe(results)}")
    summ = pd.concat([r.summary().assign(split=s) for s, r in results.items()], ignore_index=True)
    summ["cell"] = [f"{m:.{digits}f} ± {s:.2f}" if np.isfinite(s) else f"{m:.{digits}f}"
                    for m, s in zip(summ["mean"], summ["std"])]
    wide = summ.pivot(index=["method", "combine"], columns=["variant", "split"], values="cell")
    order = _row_order(summ)
    cols = []
    for v in [v for v in VARIANTS if v in set(summ["variant"])]:
        cols += [(v, s) for s in results if (v, s) in wide.columns]
        paper = [PAPER_TABLE1.get(v, {}).get(m) for m, _ in order]
        wide[(v, "paper")] = pd.Series([f"{p[0]:.{digits}f} ± {p[1]:.2f}" if p else "—" for p in paper],
                                       index=pd.MultiIndex.from_tuples(order))
        cols.append((v, "paper"))
    out = wide.loc[order, cols].fillna("")
    out.index = row_labels(pd.DataFrame(order, columns=["method", "combine"]))
    out.index.name = "method"
    out.columns.names = ["variant", "folds"]
    return out
