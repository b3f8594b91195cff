"""Benchmark: extraction on 1 vs 2 processes, and the cost of the float64 all-reduce of G.

1. Throughput. ``vxnb.features.extract_features`` (FlowerNet, default layers, random images)
   on one process, then on two gloo processes (one thread each), started here as torchrun
   would start them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT on 127.0.0.1). The time is the
   wall time of the ``extract_features`` call on rank 0, from a barrier after start-up to the
   end (the all-reduce, gathers and top-k merge included); images/s and the speed-up of 2
   processes over 1, measured in the same run, are printed.
2. All-reduce. Two processes each hold a float64 G of m × m (m = 15,000: 1.8 GB) and sum it
   with ``vxnb.distributed.all_reduce_sum`` (gloo): the time, the rate in GB/s, and the ratio to
   the reference measured in the same run, one local ``G += G2`` of the same size (what
   combining two partial sums costs in one process). Each m runs only when the machine has
   enough free memory (three copies of G per process); otherwise it says so and is skipped.

No goal is asserted: on a shared 2-core machine the figures depend on the other load.

    python benchmarks/bench_distributed.py                 # N=512 images of 128 px, m = 8,000 and 15,000
    python benchmarks/bench_distributed.py --quick         # N=128 images of 64 px, m = 2,000
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.abspath(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, args: list[str]) -> dict:
    """Run this file's worker on ``world`` processes; rank 0's JSON line."""
    port = str(_free_port())
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, HERE, "--worker", *args], env=env, stdout=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"worker failed: {[p.returncode for p in procs]}\n{outs}")
    return json.loads(outs[0].strip().splitlines()[-1])


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------- workers
def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    from vxnb import distributed
    from vxnb.features import extract_features
    from vxnb.models import build_model

    distributed.init(timeout=600, backend="gloo")
    rank = torch.distributed.get_rank()
    if args.task == "extract":
        g = torch.Generator().manual_seed(0)
        images = torch.rand(args.n, 3, args.size, args.size, generator=g)
        labels = torch.arange(args.n) % 6
        data = torch.utils.data.TensorDataset(images, labels)
        torch.manual_seed(0)
        model = build_model("flowernet", num_classes=6, size=args.size).eval()
        distributed.barrier("start")
        t0 = time.perf_counter()
        feats = extract_features(model, data, batch_size=32, n_classes=6, progress=False, device="cpu")
        seconds = time.perf_counter() - t0
        out = {"seconds": seconds, "n": feats.n, "m": feats.m}
    else:
        m = args.m
        G = np.full((m, m), 1.0 + rank, dtype=np.float64)  # touched: the pages exist before timing
        distributed.barrier("start")
        t0 = time.perf_counter()
        S = distributed.all_reduce_sum(G, "the benchmark's all-reduce")
        seconds = time.perf_counter() - t0
        assert S[0, 0] == 3.0 and S[-1, -1] == 3.0
        out = {"seconds": seconds, "m": m}
    if rank == 0:
        print(json.dumps(out), flush=True)
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--task", default="extract", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help="images (default 512; quick 128)")
    p.add_argument("--size", type=int, default=None, help="image size (default 128; quick 64)")
    p.add_argument("--m", type=int, nargs="*", default=None, help="sizes of G for the all-reduce")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting (the best is printed)")
    args = p.parse_args()
    if args.worker:
        args.m = args.m[0] if isinstance(args.m, list) else args.m
        _worker(args)
        return
    n = args.n or (128 if args.quick else 512)
    size = args.size or (64 if args.quick else 128)
    ms = args.m or ([2000] if args.quick else [8000, 15000])
    print(f"extraction: FlowerNet, {n} random {size}px images, batch 32, one thread per process (CPU)")
    best = {}
    for world in (1, 2):
        runs = [_launch(world, ["--task", "extract", "--n", str(n), "--size", str(size)]) for _ in range(args.repeats)]
        best[world] = min(r["seconds"] for r in runs)
        print(f"  {world} process(es): {best[world]:.2f} s (best of {args.repeats}: "
              f"{', '.join('%.2f' % r['seconds'] for r in runs)}), {n / best[world]:.0f} images/s, m = {runs[0]['m']}")
    print(f"  speed-up of 2 processes over 1: {best[1] / best[2]:.2f}×")
    print("all-reduce of G (float64, 2 gloo processes on this machine):")
    for m in ms:
        gb = m * m * 8 / 1e9
        need = 2 * 3 * m * m * 8
        if _mem_available() < need:
            print(f"  m = {m}: skipped, needs ~{need / 1e9:.1f} GB free, {_mem_available() / 1e9:.1f} GB available")
            continue
        a = np.full((m, m), 1.0)
        b = np.full((m, m), 2.0)
        t0 = time.perf_counter()
        a += b
        local = time.perf_counter() - t0
        del a, b
        r = _launch(2, ["--task", "allreduce", "--m", str(m)])
        print(f"  m = {m} (G = {gb:.2f} GB): all-reduce {r['seconds']:.2f} s ({gb / r['seconds']:.2f} GB/s); "
              f"reference, one local G += G2: {local:.2f} s; ratio {r['seconds'] / local:.1f}×")


if __name__ == "__main__":
    main()
