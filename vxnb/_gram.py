"""Every kernel for G = XᵀX, in one place:

- :class:`SyrkGram`, the one CPU kernel (BLAS syrk), used by ``vxnb.lasso.gram_statistics`` (X in
  memory), by :class:`RowGram` and by :class:`StreamGram` on the CPU;
- :class:`StreamGram`, the streaming accumulator of ``vxnb.features.extract_features`` (rows from
  the forward pass): the syrk on the CPU, column blocks on and above the diagonal on CUDA;
  :func:`auto_gram_dtype` chooses its product dtype;
- :class:`RowGram`, the rows of G formed on demand for ``vxnb.lasso`` (X in memory).

The CPU kernel:

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
from typing import Any, Callable

import numpy as np
import torch
from scipy.linalg import blas as _scipy_blas

__all__ = ["SyrkGram", "StreamGram", "RowGram", "FOLD_ROWS", "auto_gram_dtype", "gram_error", "syrk_upper"]

#: float32 mode: rows summed by syrk in float32 before one fold into the float64 G
#: (measured in ``benchmarks/bench_gram.py``: relative error ≤ 1e-7 and < 5 % over one syrk).
FOLD_ROWS = 16384
#: columns per tile when adding or mirroring triangles (cache-sized pieces)
TILE = 512


#: Rows of X gathered before one float64 update of G (a larger GEMM is cheaper per row than
#: one per batch); capped so that the buffer stays under ~64 MiB.
_GRAM_BLOCK_ROWS = 1024
_GRAM_BLOCK_BYTES = 64 * 2**20
#: G is computed in column blocks of at least this many columns, at most this many blocks.
_GRAM_MIN_SPLIT = 1536
_GRAM_MAX_SPLITS = 6
_GRAM_MIN_ROWS_SPLIT = 128
#: On the CPU, G is updated by BLAS syrk (the upper triangle only: half the flops of a GEMM).
_CPU_SYRK = True
#: ``vxnb.lasso`` row-wise G (:class:`RowGram`): past this share of m rows asked for, all of XᵀX
#: (one syrk, half a GEMM's flops) is formed instead
_ROWS_MAX_SHARE = 0.25
_ROWS_COPY_BYTES = 4 * 2**30  # X is copied once in the product dtype up to this size

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


# ============================================================================ streamed rows (features)
#: gram_dtype="auto" on the CPU: float32 products when N·m² exceeds this (the rule of
#: ``vxnb.lasso.gram_statistics``: where G is a noticeable part of the work), else float64.
_AUTO_SINGLE_FLOPS = 2e9


def auto_gram_dtype(device: torch.device, n_rows: int | None, m: int) -> torch.dtype:
    """The dtype of the products accumulating G for ``gram_dtype="auto"``.

    CUDA: float64 on datacenter GPUs of compute capability x.0 ≥ 6.0 (P100, V100, A100, H100,
    B200), where float64 GEMMs are fast, float32 elsewhere (consumer GPUs run float64 at
    1/32–1/64 of float32). CPU: float32 when N·m² > 2·10⁹ (N unknown counts as large): there
    the float64 syrk (and its float32→float64 copy) cost FlowerNet ~6 % of its forward pass
    (``benchmarks/bench_features.py --float64``); float64 below."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return torch.float64 if (minor == 0 and major >= 6) else torch.float32
    if n_rows is not None and n_rows * m * m <= _AUTO_SINGLE_FLOPS:
        return torch.float64
    return torch.float32


class StreamGram:
    """Streams rows of X into G = XᵀX (float64).

    Rows are gathered in a float32 buffer and added one block at a time (a larger product
    costs less per row than one per batch). On the CPU each block is one BLAS syrk into the
    upper triangle of a Fortran-ordered G (half the flops of XᵀX), in float64, or in float32
    into a scratch matrix whose upper triangle is then added to G; the lower triangle is
    mirrored once at the end. On CUDA, where there is no syrk in torch, only the column
    blocks on and above the diagonal are multiplied (up to 6 blocks: ~40 % fewer flops than
    XᵀX) and mirrored likewise. The first block overwrites G, so G is never zero-filled.
    ``per_batch`` (the overlap thread of ``vxnb.features.extract_features``): one syrk per batch and G's
    pages touched at once (zero-filled), both on that thread while the forward pass runs.
    """

    def __init__(self, m: int, device: torch.device, dtype: torch.dtype = torch.float64, batch: int = 1,
                 n_rows: int | None = None, per_batch: bool = False):
        self.m, self.dtype = m, dtype
        self.rows = max(batch, min(_GRAM_BLOCK_ROWS, max(1, _GRAM_BLOCK_BYTES // (4 * m))))
        if per_batch and device.type == "cpu" and _CPU_SYRK:
            # overlap thread: one syrk per batch, so that the products run beside the forward pass
            # (not in one block after the last batch); the pages of G are touched now, on that
            # thread, not in the first fold (after the last batch, for N < FOLD_ROWS)
            self.rows = max(1, batch)
        self.buf = torch.empty((self.rows, m), dtype=torch.float32, device=device)
        self.filled = 0
        self.started = False
        self.syrk = device.type == "cpu" and _CPU_SYRK
        self.scratch: Any = None
        if self.syrk:  # the one CPU Gram kernel, shared with vxnb.lasso
            self.kernel = SyrkGram(m, np.float64 if dtype == torch.float64 else np.float32)
            if per_batch:
                self.kernel.G.fill(0.0)
            return
        self.G = torch.empty((m, m), dtype=torch.float64, device=device)
        splits = max(1, min(_GRAM_MAX_SPLITS, m // _GRAM_MIN_SPLIT))
        if n_rows is not None and n_rows < _GRAM_MIN_ROWS_SPLIT:
            splits = 1
        self.edges = [round(i * m / splits) for i in range(splits + 1)]
        # float32 mode: each block's product goes to a reused float32 scratch, then into G
        if dtype == torch.float32:
            biggest = max((hi - lo) * (m - lo) for lo, hi in zip(self.edges[:-1], self.edges[1:]))
            self.scratch = torch.empty(biggest, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        start, n = 0, x.shape[0]
        while start < n:
            take = min(n - start, self.rows - self.filled)
            self.buf[self.filled:self.filled + take] = x[start:start + take]
            self.filled += take
            start += take
            if self.filled == self.rows:
                self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        if self.syrk:
            self._flush_syrk()
        else:
            self._flush_blocks()
        self.started = True
        self.filled = 0

    def _flush_syrk(self) -> None:
        self.kernel.add(self.buf[:self.filled].numpy())

    def _flush_blocks(self) -> None:
        b = self.buf[:self.filled]
        if self.dtype == torch.float64:
            b = b.double()
        for lo, hi in zip(self.edges[:-1], self.edges[1:]):
            out = self.G[lo:hi, lo:]
            if self.dtype == torch.float64:
                out.addmm_(b[:, lo:hi].T, b[:, lo:], beta=1.0 if self.started else 0.0)
            else:
                prod = self.scratch[: (hi - lo) * (self.m - lo)].view(hi - lo, self.m - lo)
                torch.mm(b[:, lo:hi].T, b[:, lo:], out=prod)
                out.add_(prod) if self.started else out.copy_(prod)

    def result(self) -> np.ndarray:
        """G as a float64 numpy array (symmetric)."""
        self.flush()
        if self.syrk:
            return self.kernel.result()
        if not self.started:
            return self.G.zero_().cpu().numpy()
        e = self.edges
        for i in range(len(e) - 1):
            for j in range(i + 1, len(e) - 1):
                self.G[e[j]:e[j + 1], e[i]:e[i + 1]] = self.G[e[i]:e[i + 1], e[j]:e[j + 1]].T
        return self.G.cpu().numpy()


# ============================================================================ rows on demand (lasso)
class RowGram:
    """G = XᵀX row by row, formed only when a homotopy asks for it (``fetch``).

    The μ-lasso path of a class visits few variables (tens to hundreds of m), and the paths of
    all classes share most of them: forming just those rows, Xᵀ X[:, J] (2·N·m·|J| flops), costs
    a fraction of the full syrk (N·m² flops) — about a quarter for VGG-F-like data at μ = 10.
    Rows are products in ``precision`` (float32: summed in float32 over at most
    :data:`FOLD_ROWS` rows, then in float64 — the accuracy of ``SyrkGram``); once more
    than ``_ROWS_MAX_SHARE``·m rows are asked for, all of G is formed with ``SyrkGram`` and
    served from then on. Exact in the same sense as the full G: a homotopy only ever reads the
    rows of the variables that enter its active set.
    """

    def __init__(self, X: np.ndarray, precision: str, chunk_rows: int):
        self.dtype = np.float32 if precision == "single" else np.float64
        N, m = X.shape
        self.shape = (m, m)
        self.src = X
        copy = N * m * np.dtype(self.dtype).itemsize <= _ROWS_COPY_BYTES
        self.X = np.ascontiguousarray(X, dtype=self.dtype) if copy else None  # else converted per pass
        self.chunk_rows = min(int(chunk_rows), FOLD_ROWS) if self.dtype == np.float32 else int(chunk_rows)
        diag = np.zeros(m)
        for Xb in self._blocks():
            with np.errstate(over="ignore", invalid="ignore"):
                diag += np.einsum("ij,ij->j", Xb, Xb, dtype=np.float64)
        if self.dtype == np.float32:  # a square past float32's range overflows the products
            diag[diag > np.finfo(np.float32).max] = np.inf
        self.diag = diag
        self.pos = np.full(m, -1, dtype=np.int64)   # row j of G is rows[pos[j]]
        self.rows = np.empty((0, m))
        self.n = 0
        self.full: np.ndarray | None = None
        self.passes = 0                             # passes over X (forming rows, or all of G)

    def _blocks(self):
        N = self.src.shape[0]
        for i0 in range(0, N, self.chunk_rows):
            if self.X is not None:
                yield self.X[i0:i0 + self.chunk_rows]
            else:
                yield np.ascontiguousarray(self.src[i0:i0 + self.chunk_rows], dtype=self.dtype)

    def row(self, j: int) -> np.ndarray | None:
        if self.full is not None:
            return self.full[j]
        p = self.pos[j]
        return self.rows[p] if p >= 0 else None

    def missing(self, idx: np.ndarray) -> np.ndarray:
        return idx[self.pos[idx] < 0] if self.full is None else idx[:0]

    def fetch(self, need: np.ndarray, ahead: np.ndarray) -> None:
        """Form rows ``need`` (and ``ahead`` as far as the share allows), or all of G."""
        if self.full is not None:
            return
        m = self.shape[0]
        need = np.unique(self.missing(need))
        if self.n + need.size > _ROWS_MAX_SHARE * m:
            self._form_full()
            return
        ahead = np.setdiff1d(np.unique(self.missing(ahead)), need)
        room = (int(_ROWS_MAX_SHARE * m) - self.n - need.size) // 2   # guesses never take it all
        J = np.concatenate([need, ahead[:max(room, 0)]]).astype(np.int64)
        if not J.size:
            return
        acc = np.zeros((m, J.size))
        with np.errstate(over="ignore", invalid="ignore"):
            for Xb in self._blocks():
                acc += Xb.T @ Xb[:, J]            # one GEMM per block: (m, |J|)
        self.passes += 1
        if self.n + J.size > self.rows.shape[0]:
            grown = np.empty((max(2 * self.rows.shape[0], self.n + J.size, 256), m))
            grown[:self.n] = self.rows[:self.n]
            self.rows = grown
        self.rows[self.n:self.n + J.size] = acc.T
        self.pos[J] = np.arange(self.n, self.n + J.size)
        self.n += J.size

    def _form_full(self) -> None:
        gram = SyrkGram(self.shape[0], self.dtype)
        for Xb in self._blocks():
            with np.errstate(over="ignore", invalid="ignore"):
                gram.add(Xb)
        self.full = gram.result()
        self.passes += 1
        self.rows, self.n = np.empty((0, self.shape[0])), 0
        self.pos[:] = -1

    def block(self, idx: np.ndarray) -> np.ndarray:
        """G[idx][:, idx] for rows already formed."""
        return np.stack([self.row(int(j))[idx] for j in idx]) if len(idx) else np.zeros((0, 0))

    @property
    def info(self) -> dict:
        return {"gram": "full" if self.full is not None else "rows", "rows": int(self.n),
                "passes": int(self.passes)}
