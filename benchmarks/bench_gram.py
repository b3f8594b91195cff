"""Benchmark: the Gram kernel ``vxnb._gram.SyrkGram`` against one float32 syrk of the same X.

X: VGG-F-like responses (``bench_lasso.make_responses``: 7 layers, non-negative, rows
L1-normalised per layer), float32, N rows, m columns (``--scale`` divides VGG-F's widths).
Timed, alternating, ``--repeats`` times, process CPU time (all threads), median kept:

* ``syrk``: ONE ``ssyrk`` over all N rows (the physical floor: half the flops of XᵀX);
* ``kernel fold=F``: ``SyrkGram`` fed blocks of ``--block`` rows (1024: what
  ``extract_features`` gathers), folding its float32 sums into the float64 G every F rows
  (F = block: what the code did before this kernel, one m×m float64 pass per block);
* ``before (lasso)``: the previous ``gram_statistics`` single path: numpy ``blk.T @ blk``
  per block of ``chunk_rows`` (its default) and ``np.add`` into a float64 G.

Printed beside each: the time ratio to ``syrk`` (goal ≤ 1.15) and the error against the
float64 G, max |ΔG_ij| / √(G_ii G_jj) (``vxnb._gram.gram_error``; contract ≤ 1e-6).

    python benchmarks/bench_gram.py               # N=20000, m=4640 (VGG-F widths / 2)
    python benchmarks/bench_gram.py --scale 1     # m=9280, the size of bench_lasso.py
    python benchmarks/bench_gram.py --quick       # N=8192, m=2320
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from bench_lasso import VGGF_WIDTHS, make_responses
from scipy.linalg.blas import ssyrk

import vxnb._gram as vg
from vxnb._gram import SyrkGram, gram_error


def one_syrk(X32: np.ndarray) -> np.ndarray:
    return ssyrk(1.0, X32.T, trans=0, lower=0)


def kernel(X32: np.ndarray, block: int, fold: int) -> np.ndarray:
    g = SyrkGram(X32.shape[1], np.float32, fold_rows=fold)
    for i in range(0, X32.shape[0], block):
        g.add(X32[i:i + block])
    return g.result()


def before_lasso(X32: np.ndarray) -> np.ndarray:
    N, m = X32.shape
    chunk = max(4096, 2**30 // (4 * m))
    G = np.zeros((m, m))
    for i in range(0, N, chunk):
        b = X32[i:i + chunk]
        np.add(G, b.T @ b, out=G)
    return G


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=8192, m=2320")
    p.add_argument("--n", type=int, default=None, help="rows (default 20000)")
    p.add_argument("--scale", type=int, default=None, help="divide VGG-F's widths by this (default 2)")
    p.add_argument("--block", type=int, default=1024, help="rows per add() (default 1024)")
    p.add_argument("--folds", type=int, nargs="+", default=None,
                   help="fold_rows to time (default: block, 4096, FOLD_ROWS, N)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    N = args.n or (8192 if args.quick else 20000)
    scale = args.scale or (4 if args.quick else 2)
    widths = tuple(max(4, w // scale) for w in VGGF_WIDTHS)
    X, _ = make_responses(N, widths, 10)
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    del X
    m = X32.shape[1]
    X64 = X32.astype(np.float64)
    ref = X64.T @ X64  # float64 syrk: the reference for the error
    del X64
    folds = args.folds or sorted({args.block, 4096, vg.FOLD_ROWS, N})
    runs = {"syrk (one call)": lambda: one_syrk(X32)}
    runs.update({f"kernel fold={f}": (lambda f=f: kernel(X32, args.block, f)) for f in folds})
    runs["before (lasso path)"] = lambda: before_lasso(X32)
    print(f"N={N}, m={m}, block={args.block} rows, {args.repeats} alternating repeats, process CPU time, "
          f"BLAS threads from the environment; load avg {' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    times: dict[str, list[float]] = {k: [] for k in runs}
    errors: dict[str, float] = {}
    for r in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.process_time()
            G = fn()
            times[name].append(time.process_time() - t0)
            if r == 0 and name != "syrk (one call)":
                errors[name] = gram_error(G, ref)
            del G
    t_ref = statistics.median(times["syrk (one call)"])
    print(f"{'':<22} {'median s':>9} {'/ syrk':>7} {'goal':>6} {'error':>9} {'contract':>9}")
    for name, ts in times.items():
        t = statistics.median(ts)
        err = f"{errors[name]:9.1e}" if name in errors else f"{'':>9}"
        print(f"{name:<22} {t:9.2f} {t / t_ref:7.2f} {'≤1.15' if name.startswith('kernel') else '':>6} {err} "
              f"{'≤1e-6' if name in errors else '':>9}", flush=True)
    print(f"load avg {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
