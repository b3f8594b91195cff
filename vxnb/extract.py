"""Extract a run's feature statistics and top patches, on one process or many.

    python -m vxnb.extract --params my-run.yaml [-p name value ...]
    torchrun --nproc_per_node=N -m vxnb.extract --params my-run.yaml [-p name value ...]
    torchrun --nnodes=M --nproc_per_node=N --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT \\
        -m vxnb.extract --params my-run.yaml

The parameters are the notebooks' (``vxnb.params``: a YAML/JSON file, ``-p`` pairs on top); those
of ``vxnb.studies.runs.RunConfig`` pick the run, ``top_n`` the top images per feature (quick: at most
20, as notebook 03), other notebook parameters are ignored. Writes into the run folder what the
notebooks read there: the training split's ``features/features-<key>.npz`` (G, XᵀL, …, as
``runs.get_features`` caches it) and ``top_patches-<key>.csv`` (every channel of the default
layers, as ``interpret.top_patch_table`` caches it). Under torchrun each rank streams its shard
(``vxnb.distributed``); rank 0 prepares the data and the model first (rendering, training; the
others wait up to ``--timeout``) and writes the results; per-rank checkpoints in
``<run>/checkpoints/`` let a restarted job resume. Across nodes, ``runs_root`` (and the
``data_root`` of an8Flower/MNIST) must be on a filesystem every node shares: that is checked
before any rank reads, and a job whose nodes do not share them is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

__all__ = ["main", "extract_run"]

#: Parameters of this command besides RunConfig's (the notebooks' others are ignored).
OWN = ("top_n",)


def extract_run(params: dict[str, Any], *, batch_size: int | None = None, checkpoint_every: int = 100,
                progress: bool = True) -> dict[str, Any]:
    """Extract the run ``params`` describe (in the current process group, if any). ``batch_size``:
    images per batch and rank; None (the default) takes the run's ``batch_size`` parameter.
    → ``{"config", "features", "top", "seconds"}`` (top: the table, on rank 0 only; else None)."""
    from . import distributed, features, interpret
    from ._checks import check_positive_int
    from .studies import runs

    fields = {f.name for f in dataclasses.fields(runs.RunConfig)}
    cfg = runs.RunConfig.from_params(**{k: v for k, v in params.items() if k in fields})
    top_n = check_positive_int(params.get("top_n", 100), "top_n")
    batch_size = cfg.batch_size if batch_size is None else check_positive_int(batch_size, "batch_size")
    if cfg.quick:
        top_n = min(top_n, 20)
    rank, world = distributed.rank_and_world()
    t0 = time.perf_counter()
    if rank == 0:  # renders / trains at most once, before the others read
        data = runs.load_data(cfg, progress=progress)
        model, _ = runs.get_model(cfg, data=data, progress=progress)
    distributed.barrier("waiting for rank 0 to prepare the data and the model")
    # the other ranks read what rank 0 made: refused unless every node sees the same folders
    shared = {"runs_root": cfg.runs_dir}
    if cfg.dataset != "folder":  # rendered/fetched by rank 0 (a user's folder is only read)
        shared["data_root"] = cfg.data_dir
    distributed.check_shared_folders(shared)
    if rank != 0:
        data = runs.load_data(cfg, progress=False)
        model, _ = runs.get_model(cfg, data=data, progress=False)
    train = data[0]
    tracker = interpret.TopPatches(model, layers=features.select_layers(model, cfg.layers), k=top_n)
    folder = runs.run_dir(cfg)
    feats = runs.get_features(cfg, model, "train", data=data, callbacks=[tracker], batch_size=batch_size,
                              checkpoint_dir=folder / "checkpoints", checkpoint_every=checkpoint_every,
                              progress=progress and rank == 0)
    top = None
    if rank == 0:
        wanted = tracker.to_frame()[["layer", "channel"]].drop_duplicates()
        top = interpret.top_patch_table(model, train, wanted, k=top_n, tracker=tracker, cache_dir=folder,
                                        data_key=runs.split_key(cfg, "train", train), progress=False)
    distributed.barrier("waiting for rank 0 to write the top patches")
    return {"config": cfg, "features": feats, "top": top, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None, prog: str = "python -m vxnb.extract") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None, help="parameter file (.yaml, .yml or .json)")
    parser.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                        help="one parameter (wins over the file)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per batch and rank (default: the run's batch_size parameter, else 64)")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="batches between two checkpoints of each rank (default 100)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds a rank waits for the others before failing (default 1800)")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                        help="default: nccl with CUDA, else gloo")
    args = parser.parse_args(argv)
    from . import distributed
    from .studies import runs
    from .params import collect_params

    params = collect_params(args.params, args.p)
    fields = {f.name for f in dataclasses.fields(runs.RunConfig)}
    joined = distributed.init(timeout=args.timeout, backend=args.backend)
    rank, world = distributed.rank_and_world()
    ignored = sorted(set(params) - fields - set(OWN))
    if ignored and rank == 0:
        print(f"vxnb.extract: ignoring parameters {', '.join(ignored)} (not needed for extraction)", flush=True)
    try:
        out = extract_run(params, batch_size=args.batch_size, checkpoint_every=args.checkpoint_every)
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        f = out["features"]
        print(f"vxnb.extract: {f.n} images, {f.m} features, {len(out['top'])} top-patch rows on {world} "
              f"process(es) in {out['seconds']:.1f} s → {runs.run_dir(out['config'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
