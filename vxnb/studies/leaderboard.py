"""The an8Flower leaderboard (issue 27): every method scored the same way, on one page.

Rows: every method of the registry (:data:`vxnb.studies.table1.METHOD_REGISTRY`: ours drawn
three ways, the Grad-CAM family, the class-level extras), the built-in peers of
:data:`EXTRA_METHODS` (Captum saliency, integrated gradients and guided backprop; zennit LRP
with ``EpsilonPlusFlat``; zennit-crp conditional heatmaps of *our* selected features, a second
way to draw them beside the resampled DeconvNet+GB), and any method scored with
:func:`vxnb.studies.benchmark.score_callable` (its table in the benchmark's run folder).
Each is scored by :func:`score_callable` on the benchmark's own fold models and images;
:func:`leaderboard_table` sorts them by IoU area with a 95 % interval over folds and
:func:`write_leaderboard` writes the offline page (plain HTML and SVG, no script).
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from vxnb import paths
from vxnb.evaluate.counterfactual import mean_ci
from vxnb.studies import benchmark, runs, table1
from vxnb.utils import atomic_path, describe

__all__ = ["EXTRA_METHODS", "LEADERBOARD_PAGE", "saliency", "integrated_gradients", "guided_backprop", "lrp",
           "crp_ours", "registry_method", "run_leaderboard", "collect_scores", "leaderboard_table",
           "write_leaderboard", "leaderboard_page"]

#: The page's file name in the report's folder (linked from its index when a run wrote it).
LEADERBOARD_PAGE = paths.LEADERBOARD_PAGE


def _captum(cls_name: str, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, **kw) -> torch.Tensor:
    import captum.attr

    x = torch.as_tensor(inputs).float().clone().requires_grad_(True)
    with torch.enable_grad():
        a = getattr(captum.attr, cls_name)(model).attribute(x, target=torch.as_tensor(targets).long(), **kw)
    return a.detach().abs().sum(1)


def saliency(model: torch.nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
    """Captum ``Saliency``: |∂ logit / ∂ input|, summed over colour channels."""
    return _captum("Saliency", model, inputs, targets, abs=True)


def integrated_gradients(model: torch.nn.Module, inputs: Any, targets: Any, n_steps: int = 32) -> torch.Tensor:
    """Captum ``IntegratedGradients`` from a black image (``n_steps`` steps), |·| summed over channels."""
    return _captum("IntegratedGradients", model, inputs, targets, n_steps=n_steps, internal_batch_size=64)


def guided_backprop(model: torch.nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
    """Captum ``GuidedBackprop`` from the logit, |·| summed over channels."""
    return _captum("GuidedBackprop", model, inputs, targets)


def lrp(model: torch.nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
    """zennit LRP with ``EpsilonPlusFlat`` (BatchNorm merged into the convolution before it):
    the relevance of the target logit at the input, summed over channels, positive part."""
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    x = torch.as_tensor(inputs).float()
    t = torch.as_tensor(targets).long()
    was = model.training
    model.eval()
    try:
        with torch.enable_grad(), Gradient(model, EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])) as attr:
            out = model(x[:1])
            onehot = torch.zeros(len(x), out.shape[1])
            onehot[torch.arange(len(x)), t] = 1.0
            _, rel = attr(x, onehot)
    finally:
        model.train(was)
    return rel.detach().sum(1).clamp_min(0)


def crp_ours(model: torch.nn.Module, inputs: Any, targets: Any, *, relevant: Any = None, k: int = 5) -> torch.Tensor:
    """Our top-``k`` μ-lasso-selected features of each image (as ``"ours"`` picks them), each drawn as
    a zennit-crp conditional heatmap (``EpsilonPlusFlat``: the relevance of the target logit
    through that channel only), positive part, combined by the response-weighted sum."""
    from crp.attribution import CondAttribution
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    from vxnb.explanations import feature_heatmaps

    if relevant is None:
        raise ValueError("relevant: crp_ours draws our selected features; give the fold's relevant features "
                         "(vxnb.studies.benchmark.fold_relevant)")
    x = torch.as_tensor(inputs).float()
    t = torch.as_tensor(targets).long()
    _, _, feats = feature_heatmaps(model, relevant, x, k, t, draw="upsampled")
    out = torch.zeros(x.shape[0], x.shape[2], x.shape[3])
    if len(feats) == 0:
        return out
    composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
    was = model.training
    model.eval()
    try:
        attribution = CondAttribution(model, no_param_grad=True)
        for b, group in feats.groupby("image"):
            # one call per layer: conditions naming different layers in one call are crossed by
            # zennit-crp (3 features in 2 layers gave 9 maps), so each call names one layer
            parts, weights = [], []
            for layer, lg in group.groupby("layer", sort=False):
                conds = [{str(layer): [int(ch)], "y": [int(t[b])]} for ch in lg["channel"]]
                xb = x[b:b + 1].repeat(len(conds), 1, 1, 1).requires_grad_(True)
                with torch.enable_grad():
                    res = attribution(xb, conds, composite)
                if res.heatmap.shape[0] != len(conds):
                    raise RuntimeError(f"zennit-crp returned {res.heatmap.shape[0]} maps for {len(conds)} conditions")
                parts.append(res.heatmap.detach().clamp_min(0))
                weights.append(lg["response"].to_numpy(dtype=np.float64, copy=True))
            maps = torch.cat(parts)
            w = torch.as_tensor(np.concatenate(weights), dtype=maps.dtype).clamp_min(0)
            maps = maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
            out[int(b)] = (w[:, None, None] * maps).sum(0) / w.sum().clamp_min(1e-12)
    finally:
        model.train(was)
    return out


#: The built-in peers beside the registry's methods: name → (label, explain function, needs
#: our relevant features).
EXTRA_METHODS: dict[str, tuple[str, Callable, bool]] = {
    "captum_saliency": ("Saliency (Captum)", saliency, False),
    "captum_ig": ("Integrated gradients (Captum)", integrated_gradients, False),
    "captum_gb": ("Guided backprop (Captum)", guided_backprop, False),
    "zennit_lrp": ("LRP EpsilonPlusFlat (zennit)", lrp, False),
    "crp_ours": ("Ours drawn by CRP (zennit-crp)", crp_ours, True),
}


def registry_method(method: str, *, k: int = 5, combine: str = "weighted") -> Callable:
    """A registry method as an explain function ``f(model, inputs, targets, relevant=None)``
    (:func:`vxnb.studies.benchmark.method_heatmaps`)."""
    if method not in table1.METHOD_REGISTRY:
        raise ValueError(f"method: expected one of {', '.join(table1.METHODS)}, got {describe(method)}")

    def explain(model, inputs, targets, relevant=None):
        return benchmark.method_heatmaps(method, model, torch.as_tensor(inputs), torch.as_tensor(targets),
                                         relevant=relevant, k=k, combine=combine)
    explain.__qualname__ = f"registry_method[{method},{k},{combine}]"
    return explain


def _relevant_kwargs(mu: float):
    def fold_relevant(cfg, model, data):
        return {"relevant": benchmark.fold_relevant(cfg, model, mu, data=data, progress=False)}
    fold_relevant.__qualname__ = f"fold_relevant[mu={mu}]"
    return fold_relevant


def run_leaderboard(config: Any = None, *, variant: str = "single-6c", split: str = "blocks",
                    folds: Sequence[int] = (0, 1, 2, 3, 4), n_images: int | None = 100, methods: Sequence[str] | None = None,
                    extra: Mapping[str, Callable] | None = None, mu: float = 10.0, k: int = 5,
                    sanity_images: int = 16, progress: bool = True) -> pd.DataFrame:
    """Score the leaderboard's rows with :func:`vxnb.studies.benchmark.score_callable`: ``methods``
    (default: every registry method and every :data:`EXTRA_METHODS` entry) and ``extra`` ({name:
    explain function}), on the same folds and images. Returns the tidy per-fold table of them all
    (``label`` added); each method's scores are cached per fold."""
    known = [*table1.METHODS, *EXTRA_METHODS]
    methods = known if methods is None else list(methods)
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(f"methods: expected names among {', '.join(known)}, got {bad}")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra: expected a dict {{name: explain function}}, got {describe(extra)}")
    tables = []
    common = dict(variant=variant, split=split, folds=folds, n_images=n_images, config=config,
                  sanity_images=sanity_images, as_numpy=False, progress=progress)
    for m in methods:
        if m in EXTRA_METHODS:
            label, fn, needs = EXTRA_METHODS[m]
            kw = {"explain_kwargs": {"k": k}} if needs else {}
        else:
            label, fn = table1.METHOD_LABELS[m], registry_method(m, k=k)
            needs, kw = table1.METHOD_REGISTRY[m].ours, {}
        t = benchmark.score_callable(fn, name=m, fold_kwargs=_relevant_kwargs(mu) if needs else None, **kw, **common)
        tables.append(t.assign(label=label))
    for name, fn in (extra or {}).items():
        tables.append(benchmark.score_callable(fn, name=name, **{**common, "as_numpy": True}).assign(label=name))
    return pd.concat(tables, ignore_index=True)


def collect_scores(config: Any = None, *, variant: str = "single-6c", split: str = "blocks") -> pd.DataFrame:
    """Every table :func:`vxnb.studies.benchmark.score_callable` wrote for this variant and split
    (the benchmark's run folder): per method the table over the most folds."""
    import dataclasses

    config = runs.RunConfig() if config is None else config
    folder = runs.run_dir(benchmark.benchmark_config(dataclasses.replace(config, folds=split)))
    best: dict[str, pd.DataFrame] = {}
    for file in sorted(folder.glob(f"scores-*-{variant}-f*.csv")):
        t = pd.read_csv(file)
        if t.empty or not set(benchmark.SCORE_COLUMNS) <= set(t.columns):
            continue
        name = str(t["method"].iloc[0])
        if name not in best or len(t) > len(best[name]):
            best[name] = t
    return pd.concat(best.values(), ignore_index=True) if best else pd.DataFrame(columns=list(benchmark.SCORE_COLUMNS))


_MEANS = ("pointing_game", "relevance_mass", "relevance_rank", "auc", "top_k", "randomisation_spearman",
          "random_logit_ssim")


def leaderboard_table(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per method, sorted by mean IoU area (best first): ``iou_area`` and its 95 %
    Student-t interval over folds (``ci_low``, ``ci_high``; NaN for one fold), ``n_folds``, the
    other metrics' means, and ``n_images`` / ``n_failed`` summed over folds."""
    if not isinstance(scores, pd.DataFrame) or not {"method", "fold", "iou_area"} <= set(scores.columns):
        raise ValueError(f"scores: expected score_callable's table (method, fold, iou_area, …), got {describe(scores)}")
    rows = []
    for method, g in scores.groupby("method", sort=False):
        mean, low, high = mean_ci(g["iou_area"])
        label = g["label"].iloc[0] if "label" in g and pd.notna(g["label"].iloc[0]) else method
        rows.append({"method": method, "label": label, "iou_area": mean, "ci_low": low, "ci_high": high,
                     "n_folds": int(g["fold"].nunique()),
                     **{c: float(np.nanmean(g[c])) if g[c].notna().any() else np.nan for c in _MEANS if c in g},
                     "n_images": int(g["n_images"].sum()), "n_failed": int(g["n_failed"].sum())})
    out = pd.DataFrame(rows)
    return out.sort_values("iou_area", ascending=False, na_position="last", kind="stable", ignore_index=True)


def _svg_bar(value: float, low: float, high: float, top: float, width: int = 220) -> str:
    if not np.isfinite(value):
        return ""
    x = lambda v: 4 + (width - 8) * max(0.0, min(v, top)) / top  # noqa: E731
    bar = f'<rect x="4" y="4" width="{x(value) - 4:.1f}" height="12" fill="#4c78a8"/>'
    if np.isfinite(low) and np.isfinite(high):
        bar += (f'<line x1="{x(low):.1f}" x2="{x(high):.1f}" y1="10" y2="10" stroke="#222" stroke-width="1.5"/>'
                f'<line x1="{x(low):.1f}" x2="{x(low):.1f}" y1="5" y2="15" stroke="#222"/>'
                f'<line x1="{x(high):.1f}" x2="{x(high):.1f}" y1="5" y2="15" stroke="#222"/>')
    return f'<svg width="{width}" height="20" role="img" aria-label="{value:.1f}">{bar}</svg>'


def write_leaderboard(table: pd.DataFrame, path: str | Path, *, title: str = "an8Flower leaderboard",
                      note: str = "") -> Path:
    """The leaderboard page (offline: plain HTML and inline SVG, no script, no network), written
    atomically. ``table``: :func:`leaderboard_table`'s rows, in their order."""
    if not isinstance(table, pd.DataFrame) or not {"label", "iou_area", "ci_low", "ci_high"} <= set(table.columns):
        raise ValueError(f"table: expected leaderboard_table's frame, got {describe(table)}")
    path = Path(path)
    finite = table[["iou_area", "ci_high"]].to_numpy(dtype=float)
    top = float(np.nanmax(finite)) * 1.05 if np.isfinite(finite).any() else 1.0
    fmt = lambda v, d=3: "–" if not np.isfinite(v) else f"{v:.{d}f}"  # noqa: E731
    cols = [c for c in _MEANS if c in table.columns]
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in cols)
    body = []
    for i, r in enumerate(table.itertuples(index=False), 1):
        ci = "" if not np.isfinite(r.ci_low) else f" [{r.ci_low:.1f}, {r.ci_high:.1f}]"
        cells = "".join(f"<td>{fmt(getattr(r, c))}</td>" for c in cols)
        failed = f' <b style="color:#b00">{r.n_failed} failed</b>' if getattr(r, "n_failed", 0) else ""
        body.append(f"<tr><td>{i}</td><td>{html.escape(str(r.label))}</td><td>{fmt(r.iou_area, 1)}{ci}</td>"
                    f"<td>{_svg_bar(r.iou_area, r.ci_low, r.ci_high, top)}</td><td>{r.n_folds}</td>{cells}"
                    f"<td>{getattr(r, 'n_images', '')}{failed}</td></tr>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em auto;max-width:80em}} table{{border-collapse:collapse}}
td,th{{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}} td:nth-child(2){{text-align:left}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>Sorted by the area under the IoU curve (%, Table 1's score), mean over folds with its 95 % interval
(Student t). Localisation metrics: Quantus's, in [0, 1], larger is better. Sanity checks: randomisation
spearman (maps after every layer is randomised vs. the originals) and random-logit SSIM (maps of a random
other class): smaller is better. {html.escape(note)}</p>
<table><tr><th>#</th><th>method</th><th>IoU area</th><th></th><th>folds</th>{head}<th>images</th></tr>
{chr(10).join(body)}
</table></body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def leaderboard_page(config: Any = None, *, variant: str = "single-6c", split: str = "blocks",
                     folds: Sequence[int] = (0, 1, 2, 3, 4), n_images: int | None = 100, mu: float = 10.0, k: int = 5,
                     methods: Sequence[str] | None = None, path: str | Path | None = None,
                     progress: bool = True) -> pd.DataFrame:
    """Notebook 05's leaderboard: the built-in rows (:func:`run_leaderboard`) and every other
    method scored with ``score_callable`` for this variant and split (:func:`collect_scores`),
    as :func:`leaderboard_table`, written to ``path`` (default: ``benchmark.html`` in the
    report's folder, :func:`vxnb.paths.report_dir`). ``methods``: as in :func:`run_leaderboard`. Returns the table (``attrs["file"]``: the page)."""
    scores = run_leaderboard(config, variant=variant, split=split, folds=folds, n_images=n_images, mu=mu, k=k,
                             methods=methods, progress=progress)
    others = collect_scores(config, variant=variant, split=split)
    others = others[~others["method"].isin(set(scores["method"]))]
    table = leaderboard_table(pd.concat([scores, others], ignore_index=True) if len(others) else scores)
    note = (f"Variant {variant}, {split} split, folds {', '.join(map(str, folds))}, "
            f"{'all' if n_images is None else n_images} images per fold; our rows: μ = {mu:g}, k = {k}.")
    table.attrs["file"] = write_leaderboard(table, path or paths.report_dir() / LEADERBOARD_PAGE, note=note)
    return table
