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

The syrk is scipy's BLAS routine (``scipy.linalg.cython_blas``, the OpenBLAS that
``scipy.linalg.blas`` wraps, so the same numbers), called through ctypes, which releases the GIL
for the call: ``scipy.linalg.blas.ssyrk`` holds it, so a forward pass on another thread
(``vxnb.features.extract_features(overlap=True)``) would stall on its next Python step for the
whole product. Where the cython_blas function cannot be found the f2py wrapper is used with a
warning.
"""
from __future__ import annotations

import ctypes
import warnings
from typing import Callable

import numpy as np
import torch
from scipy.linalg import blas as _scipy_blas

__all__ = ["SyrkGram", "FOLD_ROWS", "gram_error", "syrk_upper"]

#: float32 mode: rows summed by syrk in float32 before one fold into the float64 G
#: (measured in ``benchmarks/bench_gram.py``: relative error ≤ 1e-7 and < 5 % over one syrk).
FOLD_ROWS = 16384
#: columns per tile when adding or mirroring triangles (cache-sized pieces)
TILE = 512


_SYRK: dict[str, Callable[[np.ndarray, float, np.ndarray], None]] = {}


def _cython_blas_syrk(name: str) -> Callable[[np.ndarray, float, np.ndarray], None]:
    """``fn(b, beta, c)``: the Fortran ``?syrk`` of scipy's BLAS through ctypes (a CFUNCTYPE
    pointer: the GIL is released during the call)."""
    from scipy.linalg import cython_blas

    cap = cython_blas.__pyx_capi__[name]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    ptr = api.PyCapsule_GetPointer(cap, api.PyCapsule_GetName(cap))
    if not ptr:
        raise RuntimeError(f"scipy.linalg.cython_blas.{name}: null function pointer")
    P = ctypes.c_void_p  # uplo, trans, n, k, alpha, a, lda, beta, c, ldc
    syrk = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, P, P, P, P, P, P, P, P)(ptr)
    real = ctypes.c_float if name == "ssyrk" else ctypes.c_double

    def fn(b: np.ndarray, beta: float, c: np.ndarray) -> None:
        # b.T is (m, rows) and Fortran-contiguous: C = A Aᵀ with A = b.T, uplo 'U', trans 'N'
        rows, m = b.shape
        n_, k_, one, be = ctypes.c_int(m), ctypes.c_int(rows), real(1.0), real(beta)
        syrk(b"U", b"N", ctypes.byref(n_), ctypes.byref(k_), ctypes.byref(one), b.ctypes.data, ctypes.byref(n_),
             ctypes.byref(be), c.ctypes.data, ctypes.byref(n_))
    fn.releases_gil = True  # type: ignore[attr-defined]
    return fn


def _f2py_syrk(name: str) -> Callable[[np.ndarray, float, np.ndarray], None]:
    f2py = getattr(_scipy_blas, name)

    def fn(b: np.ndarray, beta: float, c: np.ndarray) -> None:
        f2py(1.0, b.T, beta=beta, c=c, trans=0, lower=0, overwrite_c=1)
    fn.releases_gil = False  # type: ignore[attr-defined]
    return fn


def _syrk_function(name: str) -> Callable[[np.ndarray, float, np.ndarray], None]:
    fn = _SYRK.get(name)
    if fn is None:
        try:
            fn = _cython_blas_syrk(name)
        except Exception as err:  # noqa: BLE001 — an unusual scipy build: the f2py wrapper, said aloud
            warnings.warn(f"vxnb._gram: scipy.linalg.cython_blas.{name} is not callable through ctypes ({err}); "
                          "using scipy.linalg.blas, which holds the GIL during the product (the G update of "
                          "extract_features(overlap=True) then stalls the forward pass)", RuntimeWarning)
            fn = _f2py_syrk(name)
        _SYRK[name] = fn
    return fn


def syrk_upper(b: np.ndarray, beta: float, c: np.ndarray) -> None:
    """``triu(c) ← bᵀb + beta·triu(c)`` in place: one BLAS syrk, the GIL released.

    ``b`` (rows, m) C-contiguous, ``c`` (m, m) Fortran-contiguous, both float32 or both
    float64 (the lower triangle of ``c`` is not touched)."""
    rows, m = b.shape
    if (b.dtype not in (np.float32, np.float64) or c.dtype != b.dtype or c.shape != (m, m)
            or not b.flags.c_contiguous or not c.flags.f_contiguous or not c.flags.writeable):
        raise ValueError(f"syrk_upper: expected b (rows, m) C-contiguous and c (m, m) Fortran-contiguous and "
                         f"writeable of the same float dtype, got {b.dtype} {b.shape}, {c.dtype} {c.shape}")
    if rows:
        _syrk_function("ssyrk" if b.dtype == np.float32 else "dsyrk")(b, beta, c)


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
            syrk_upper(b, 1.0 if self.started else 0.0, self.G)
            self.started = True
            return
        b = np.ascontiguousarray(block, dtype=np.float32)
        syrk_upper(b, 1.0 if self.pending else 0.0, self.S)
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
