"""The one CPU kernel for G = XᵀX: used by ``vxnb.lasso.gram_statistics`` (X in memory) and by
``vxnb.features.extract_features`` (rows streamed from the forward pass).

Rows arrive in blocks. Each block is one BLAS syrk (the upper triangle only: half the flops of
XᵀX) into the upper triangle of a Fortran-ordered matrix:

- float64 products: straight into G (float64), ``beta=1`` from the second block on;
- float32 products: into a float32 scratch, ``beta=1`` while it holds fewer than
  ``fold_rows`` rows, then *folded*: its upper triangle added to the float64 G, tile by tile.
  A fold reads and writes all of G (m²/2 float64), so folding after every small block makes
  memory traffic, not flops, the cost; folding every ``FOLD_ROWS`` rows keeps the float32
  sums short enough for a relative error ≲ 1e-7 (see ``benchmarks/bench_gram.py``, which
  measured the choice) at the speed of one float32 syrk over all the rows.

The lower triangle is mirrored once, in :meth:`SyrkGram.result`.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.linalg.blas import dsyrk, ssyrk

__all__ = ["SyrkGram", "FOLD_ROWS", "gram_error"]

#: float32 mode: rows summed by syrk in float32 before one fold into the float64 G
#: (measured in ``benchmarks/bench_gram.py``: relative error ≤ 1e-7 and < 5 % over one syrk).
FOLD_ROWS = 16384
#: columns per tile when adding or mirroring triangles (cache-sized pieces)
TILE = 512


class SyrkGram:
    """Streams float32 (or float64) row blocks into G = XᵀX, float64, on the CPU.

    ``add(block)`` takes a (rows, m) C-contiguous array (float32 in float32 mode; cast to
    float64 in float64 mode); ``result()`` returns G (m, m) float64, symmetric, C-contiguous.
    """

    def __init__(self, m: int, dtype: type | np.dtype = np.float32, fold_rows: int | None = None):
        fold_rows = FOLD_ROWS if fold_rows is None else fold_rows
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise ValueError(f"dtype: expected float32 or float64, got {dtype!r}")
        if isinstance(fold_rows, bool) or not isinstance(fold_rows, (int, np.integer)) or fold_rows < 1:
            raise ValueError(f"fold_rows: expected a positive int, got {fold_rows!r}")
        self.m, self.dtype, self.fold_rows = int(m), np.dtype(dtype), int(fold_rows)
        # Fortran-ordered (the transpose of a C-ordered tensor); allocated by torch, whose
        # allocator asks for transparent huge pages: faulting in 1 GB costs ~0.4 s, not ~2 s
        self.G = torch.empty((m, m), dtype=torch.float64).numpy().T  # upper triangle: syrk
        self.S = (torch.zeros((m, m), dtype=torch.float32).numpy().T   # lower triangle stays 0
                  if self.dtype == np.float32 else None)
        self.pending = 0       # rows summed in S, not yet in G
        self.started = False   # G holds a sum (else it is uninitialised)

    def add(self, block: np.ndarray) -> None:
        if block.ndim != 2 or block.shape[1] != self.m:
            raise ValueError(f"block: expected (rows, {self.m}), got shape {block.shape}")
        if not block.shape[0]:
            return
        if self.S is None:
            b = np.ascontiguousarray(block, dtype=np.float64)
            # b.T is (m, rows) and Fortran-contiguous: C = b.T @ b with no copy; G updated in place
            dsyrk(1.0, b.T, beta=1.0 if self.started else 0.0, c=self.G, trans=0, lower=0, overwrite_c=1)
            self.started = True
            return
        b = np.ascontiguousarray(block, dtype=np.float32)
        ssyrk(1.0, b.T, beta=1.0 if self.pending else 0.0, c=self.S, trans=0, lower=0, overwrite_c=1)
        self.pending += b.shape[0]
        if self.pending >= self.fold_rows:
            self._fold()

    def _fold(self) -> None:
        if not self.pending:
            return
        G, S = self.G, self.S
        for lo in range(0, self.m, TILE):  # upper triangle only, column block by column block
            hi = min(self.m, lo + TILE)
            if self.started:
                G[:hi, lo:hi] += S[:hi, lo:hi]
            else:
                G[:hi, lo:hi] = S[:hi, lo:hi]
        self.started, self.pending = True, 0

    def result(self) -> np.ndarray:
        """G (m, m) float64, symmetric and C-contiguous (zeros if nothing was added)."""
        if self.S is not None:
            self._fold()
        G = self.G
        if not self.started:
            G[...] = 0.0
        T = TILE // 2  # lower triangle ← upper, tile by tile (a transposed copy of whole
        for lo in range(0, self.m, T):  # column blocks strides through memory: 3× slower)
            hi = min(self.m, lo + T)
            D = G[lo:hi, lo:hi]
            D[...] = np.triu(D) + np.triu(D, 1).T
            for lo2 in range(hi, self.m, T):
                G[lo2:lo2 + T, lo:hi] = G[lo:hi, lo2:lo2 + T].T
        return G.T  # symmetric, so its transpose — a C-contiguous view — is G itself


def gram_error(G: np.ndarray, G_ref: np.ndarray) -> float:
    """max |G − G_ref|ᵢⱼ / √(G_ref,ᵢᵢ G_ref,ⱼⱼ): the error relative to the Cauchy–Schwarz bound
    of each entry (scale-free, and meaningful for entries near zero)."""
    d = np.sqrt(np.maximum(np.diag(G_ref), np.finfo(np.float64).tiny))
    return float(np.max(np.abs(G - G_ref) / d[:, None] / d[None, :]))
