"""The μ-lasso of Sec. 3.1 of the paper, and its whole path over μ.

For every class j the relevance weights solve

    w_j = argmin_w ‖X w − l_j‖²   subject to   ‖w‖₁ ≤ μ            (no intercept)

with X (N, m) the filter-wise responses and l_j ∈ {0, 1}^N the labels of class j. The
paper solves it with SPAMS; here it is solved exactly with the LARS-lasso homotopy on the
Gram matrix G = XᵀX (Cholesky updates of the active set, variables leaving it when their
weight crosses zero). The homotopy walks the whole regularisation path of each class
from w = 0, so one solve gives the exact solution for *every* μ up to ``mu_max``:

>>> path = lasso_path(G, XtL, mu_max=50.0)     # G = XᵀX (m, m), XtL = XᵀL (m, C)
>>> W = path.coef(10.0)                          # (m, C), a few milliseconds
>>> W = mu_lasso(X, L, mu=10.0)                  # the same from X (N, m) and L (N, C)

Along the path ‖w‖₁ grows piecewise-linearly, so ``coef(mu)`` interpolates linearly
between the two stored breakpoints around μ. Beyond the end of a class's path (the
least-squares fit is reached, the constraint is inactive) the last solution is returned.

Only XᵀX and XᵀL are needed, so X never has to be in memory (``vxnb.features`` streams
them); :func:`gram_statistics` forms them from an X that is (for large X with float32
products, which moves the objective by ~1e-14 relative: see ``precision``). From an X in
memory, large problems need not form all of XᵀX: the homotopy reads only the rows of the
variables entering its active set, so ``gram="rows"`` forms just those, on demand
(``vxnb._gram.RowGram``; a fraction of the full product's cost, the same paths).

Degenerate designs are handled: all-zero columns never enter; a column linearly dependent
on the active set (a duplicate, or the rank min(N, m) reached) is held at zero (SPAMS stops
early there). Classes are solved on all cores (threads; numpy and BLAS release the GIL).
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.linalg.blas import get_blas_funcs
from sklearn.base import BaseEstimator
from tqdm.auto import tqdm

from ._gram import RowGram, SyrkGram
from .utils import atomic_savez, describe, read_npz

__all__ = [
    "mu_lasso",
    "mu_lasso_gram",
    "lasso_path",
    "LassoPath",
    "MuLasso",
    "gram_statistics",
    "lasso_objective",
]

_FORMAT_VERSION = 1
#: The format version of saved paths (public: part of the artifact store's keys).
PATH_FORMAT_VERSION = _FORMAT_VERSION
_AUTO_SINGLE_FLOPS = 2e9     # precision="auto": float32 products for XᵀX above this N·m²
# gram="auto" with X given: rows of XᵀX formed on demand (only those the paths visit) above the
# same N·m² (vxnb._gram.RowGram; past a quarter of m rows it forms all of XᵀX)
_ROWS_PREFETCH = 16          # rows fetched ahead for each class that asks for a missing one
_ROWS_WAVE = 64              # classes solved together (each holds its active rows of G)
# a candidate whose squared Cholesky pivot is below tol·G_jj is linearly dependent on the active set
_TOL_DOUBLE = 1e-10
_TOL_SINGLE = 1e-5           # XᵀX from float32 products: relative error ~1e-7
_L1_MARGIN = 1e-12           # coef() keeps ‖w_j‖₁ ≤ μ(1 − 1e-12): no summation order can cross μ
_trsv = get_blas_funcs("trsv", dtype=np.float64)


def _quiet() -> np.errstate:
    """A fresh errstate ignoring divide/invalid/over (around the homotopy's steps)."""
    return np.errstate(divide="ignore", invalid="ignore", over="ignore")

_axpy = get_blas_funcs("axpy", dtype=np.float64)

# status of a class's path
_REACHED_MU = 0   # stopped at mu_max (the constraint is active there)
_PATH_END = 1     # λ reached 0: the least-squares fit, the constraint is inactive beyond
_ZERO = 2         # XᵀL column is zero: w = 0 for every μ
_MAX_ITER = 3     # stopped after max_iter steps (warned)


# ============================================================================ input checks
def _check_mu(mu: Any, arg: str = "mu") -> float:
    if isinstance(mu, (bool, np.bool_)) or not isinstance(mu, (int, float, np.integer, np.floating)):
        raise TypeError(f"{arg}: expected a positive finite number, got {describe(mu)}")
    mu = float(mu)
    if not math.isfinite(mu) or mu <= 0:
        raise ValueError(f"{arg}: expected a positive finite number (the bound on ‖w_j‖₁), got {mu!r}")
    return mu


def _check_mu_max(mu_max: Any) -> float:
    if mu_max is None:
        return math.inf
    if isinstance(mu_max, (bool, np.bool_)) or not isinstance(mu_max, (int, float, np.integer, np.floating)):
        raise TypeError(f"mu_max: expected a positive number or None (the whole path), got {describe(mu_max)}")
    mu_max = float(mu_max)
    if math.isnan(mu_max) or mu_max <= 0:
        raise ValueError(f"mu_max: expected a positive number or None (the whole path), got {mu_max!r}")
    return mu_max


def _column_label(j: int, column_names: Any) -> str:
    if column_names is None:
        return f"column {j}"
    try:
        import pandas as pd

        if isinstance(column_names, pd.DataFrame):
            row = column_names.iloc[j]
            if "layer" in column_names.columns and "channel" in column_names.columns:
                return f"column {j} (layer {row['layer']!r}, channel {int(row['channel'])})"
            return f"column {j} ({dict(row)})"
    except ImportError:  # pragma: no cover - pandas is a dependency
        pass
    return f"column {j} ({column_names[j]})"


def _check_column_names(column_names: Any, m: int) -> Any:
    if column_names is None:
        return None
    try:
        n = len(column_names)
    except TypeError as err:
        raise TypeError(f"column_names: expected a sequence of m={m} names or the columns DataFrame of "
                        f"vxnb.features, got {describe(column_names)}") from err
    if n != m:
        raise ValueError(f"column_names: expected {m} entries (one per column of X), got {n}")
    return column_names


def _check_X(X: Any) -> np.ndarray:
    if isinstance(X, sp.spmatrix) or sp.issparse(X):
        raise TypeError("X: expected a dense (N, m) array, got a scipy sparse matrix (use X.toarray())")
    if hasattr(X, "detach") and hasattr(X, "cpu"):  # a torch tensor
        X = X.detach().cpu().numpy()
    X = np.asarray(X)
    if X.dtype == object or not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise TypeError(f"X: expected a real (N, m) array, got dtype {X.dtype}")
    if X.ndim != 2:
        raise ValueError(f"X: expected a 2-D array (N examples, m features), got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X: expected at least one row and one column, got shape {X.shape}")
    return X


def _check_labels(L: Any, n_rows: int | None, n_classes: int | None, x_shape: tuple | None = None) -> np.ndarray:
    """L as a (N, C) float64 0/1 matrix (a 1-D integer vector is one-hot encoded)."""
    if hasattr(L, "detach") and hasattr(L, "cpu"):
        L = L.detach().cpu().numpy()
    if sp.issparse(L):
        L = L.toarray()
    L = np.asarray(L)
    if L.dtype == object or not (np.issubdtype(L.dtype, np.number) or L.dtype == bool):
        raise TypeError(f"L: expected a (N, C) 0/1 matrix or a (N,) integer label vector, got dtype {L.dtype}")
    if L.ndim == 1:
        if not (np.issubdtype(L.dtype, np.integer) or (np.issubdtype(L.dtype, np.floating)
                                                      and np.all(np.isfinite(L)) and np.all(L == np.round(L)))):
            raise ValueError(f"L: a 1-D label vector must hold integer class indices, got dtype {L.dtype}")
        y = L.astype(np.int64)
        if y.size and y.min() < 0:
            raise ValueError(f"L: class indices must be >= 0, got {int(y.min())}")
        if n_classes is None:
            n_classes = int(y.max()) + 1 if y.size else 0
        elif isinstance(n_classes, (bool, np.bool_)) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
            raise ValueError(f"n_classes: expected a positive int, got {n_classes!r}")
        if y.size and y.max() >= n_classes:
            raise ValueError(f"L: class index {int(y.max())} is out of range for n_classes={n_classes}")
        out = np.zeros((y.shape[0], int(n_classes)))
        out[np.arange(y.shape[0]), y] = 1.0
        L = out
    elif L.ndim == 2:
        if n_classes is not None and L.shape[1] != n_classes:
            raise ValueError(f"n_classes: {n_classes} does not match L with {L.shape[1]} columns")
        L = np.asarray(L, dtype=np.float64)
        bad = ~((L == 0) | (L == 1))
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ValueError(f"L: expected a binary label matrix with entries in {{0, 1}}, got {float(L[i, j])!r} "
                             f"at row {i}, class {j}")
    else:
        raise ValueError(f"L: expected a (N, C) 0/1 matrix or a (N,) label vector, got shape {L.shape}")
    if L.shape[1] == 0:
        raise ValueError("L: expected at least one class, got 0 columns")
    if n_rows is not None and L.shape[0] != n_rows:
        raise ValueError(f"X and L: the number of rows differ: X has shape {x_shape}, L has shape {L.shape}")
    return L


def _check_gram(G: Any, XtL: Any, LtL: Any = None, check_symmetric: bool = True
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    for name, a in (("G", G), ("XtL", XtL)):
        if sp.issparse(a):
            raise TypeError(f"{name}: expected a dense array, got a scipy sparse matrix")
    G = np.asarray(G)
    if G.dtype == object or not np.issubdtype(G.dtype, np.number):
        raise TypeError(f"G: expected a real (m, m) array, got dtype {G.dtype}")
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ValueError(f"G: expected a square (m, m) matrix XᵀX, got shape {G.shape}")
    m = G.shape[0]
    G = np.ascontiguousarray(G, dtype=np.float64)
    XtL = np.asarray(XtL)
    if XtL.dtype == object or not np.issubdtype(XtL.dtype, np.number):
        raise TypeError(f"XtL: expected a real (m, C) array, got dtype {XtL.dtype}")
    if XtL.ndim == 1:
        XtL = XtL[:, None]
    if XtL.ndim != 2 or XtL.shape[0] != m or XtL.shape[1] == 0:
        raise ValueError(f"XtL: expected shape (m, C) = ({m}, C) to match G of shape {G.shape}, got {XtL.shape}")
    XtL = np.asarray(XtL, dtype=np.float64)
    diag = G.diagonal()
    if not np.all(np.isfinite(diag)):
        j = int(np.flatnonzero(~np.isfinite(diag))[0])
        raise ValueError(f"G: NaN or inf on the diagonal at column {j} (a non-finite feature?)")
    if not np.all(np.isfinite(XtL)):
        i, j = np.argwhere(~np.isfinite(XtL))[0]
        raise ValueError(f"XtL: NaN or inf at feature {i}, class {j}")
    if diag.min() < 0:
        j = int(np.argmin(diag))
        raise ValueError(f"G: expected a Gram matrix XᵀX (non-negative diagonal), got G[{j}, {j}] = {float(diag[j])!r}")
    if check_symmetric:
        _check_symmetric(G)
    if LtL is not None:
        LtL = np.asarray(LtL, dtype=np.float64)
        C = XtL.shape[1]
        if LtL.ndim == 2 and LtL.shape == (C, C):
            LtL = np.diagonal(LtL).copy()
        if LtL.shape != (C,):
            raise ValueError(f"LtL: expected LᵀL of shape ({C}, {C}) or its diagonal ({C},), got {LtL.shape}")
        if not np.all(np.isfinite(LtL)) or LtL.min() < 0:
            raise ValueError("LtL: expected finite, non-negative counts on the diagonal")
    return G, XtL, LtL


def _check_symmetric(G: np.ndarray, tile: int = 256) -> None:
    """Raise unless G is symmetric (up to 1e-9 of its largest diagonal entry).

    Compares tiles G[I, J] with G[J, I]ᵀ for J ≥ I: G is read once, in cache-sized pieces.
    """
    m = G.shape[0]
    tol = 1e-9 * max(float(G.diagonal().max()), np.finfo(float).tiny)
    for i0 in range(0, m, tile):
        for j0 in range(i0, m, tile):
            a = G[i0:i0 + tile, j0:j0 + tile]
            b = G[j0:j0 + tile, i0:i0 + tile].T
            ok = np.abs(a - b) <= tol
            if not ok.all():  # also catches NaN
                i, j = np.argwhere(~ok)[0]
                i, j = i + i0, j + j0
                raise ValueError(f"G: expected a symmetric matrix XᵀX, got G[{i}, {j}] = {float(G[i, j])!r} but "
                                 f"G[{j}, {i}] = {float(G[j, i])!r}")


def _warn(message: str) -> None:
    """A RuntimeWarning attributed to the first caller outside this module."""
    import sys

    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        level += 1
        frame = frame.f_back
    warnings.warn(message, RuntimeWarning, stacklevel=level)


def _warn_empty_classes(XtL: np.ndarray, LtL: np.ndarray | None) -> None:
    if LtL is not None:
        empty = np.flatnonzero(LtL == 0)
        for j in empty:
            _warn(f"class {j} has no positive example: its column of W is zero")
        zero = np.setdiff1d(np.flatnonzero(~np.any(XtL != 0, axis=0)), empty)
        why = "its examples have all-zero features"
    else:
        zero = np.flatnonzero(~np.any(XtL != 0, axis=0))
        why = "no positive example, or its examples have all-zero features"
    for j in zero:
        _warn(f"class {j}: XᵀL column is zero ({why}): its column of W is zero")


def _n_jobs(n_jobs: int | None) -> int:
    if n_jobs is None:
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    if isinstance(n_jobs, (bool, np.bool_)) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0:
        raise ValueError(f"n_jobs: expected a positive int, -1 (all cores) or None, got {n_jobs!r}")
    if n_jobs < 0:
        return max(1, (os.cpu_count() or 1) + 1 + int(n_jobs))
    return int(n_jobs)


# ============================================================================ statistics from X
def gram_statistics(X: Any, L: Any, *, n_classes: int | None = None, precision: str = "auto",
                    chunk_rows: int | None = None, column_names: Any = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """G = XᵀX, XᵀL and the diagonal of LᵀL from X and L held in memory.

    Args:
        X: (N, m) real array.
        L: (N, C) 0/1 label matrix, or (N,) integer class indices (one-hot with ``n_classes``).
        precision: ``"single"``: float32 BLAS syrk (about twice as fast), its sums folded
            into float64 every ``vxnb._gram.FOLD_ROWS`` rows (the one Gram kernel,
            ``vxnb._gram.SyrkGram``, shared with ``vxnb.features``; G then has a relative
            error ~1e-7, which moves the μ-lasso objective by ~1e-14 relative: at
            the constrained optimum the objective is flat to first order); ``"double"``: one
            float64 product; ``"auto"`` (default): single when N·m² > 2·10⁹ (where XᵀX
            dominates the time), else double. G is float64 and XᵀL exact (float64) either way.
        chunk_rows: rows of X converted to float32 at a time (default: about 1 GiB of
            float32, at least 4096 rows).
        column_names: names of the m columns (or the ``columns`` DataFrame of
            ``vxnb.features``) used to name a non-finite column in the error message.

    Returns:
        G (m, m) float64, XtL (m, C) float64, LtL (C,) float64 (positives per class).
    """
    X = _check_X(X)
    L = _check_labels(L, X.shape[0], n_classes, X.shape)
    column_names = _check_column_names(column_names, X.shape[1])
    precision = _resolve_precision(precision, X.shape)
    if chunk_rows is None:
        chunk_rows = max(4096, 2**30 // (4 * X.shape[1]))
    elif isinstance(chunk_rows, (bool, np.bool_)) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise ValueError(f"chunk_rows: expected a positive int or None, got {chunk_rows!r}")
    Ls = sp.csr_matrix(L)
    G, XtL = _gram(X, Ls, precision, int(chunk_rows))
    _check_finite_diag(G.diagonal(), X, precision, column_names)
    LtL = np.asarray(L.sum(axis=0), dtype=np.float64)
    return G, XtL, LtL


def _check_finite_diag(diag: np.ndarray, X: np.ndarray, precision: str, column_names: Any) -> None:
    """A non-finite diagonal of XᵀX named by its column: NaN/inf in X, or an overflow."""
    if np.all(np.isfinite(diag)):
        return
    j = int(np.flatnonzero(~np.isfinite(diag))[0])
    if np.all(np.isfinite(X[:, j])):
        raise ValueError(f"X: {_column_label(j, column_names)} overflows "
                         f"{'float32' if precision == 'single' else 'float64'} in XᵀX "
                         f"(max |x| = {np.abs(X[:, j]).max():.3g}); rescale X"
                         + (" or use precision='double'" if precision == "single" else ""))
    i = int(np.flatnonzero(~np.isfinite(X[:, j]))[0])
    raise ValueError(f"X: NaN or inf in {_column_label(j, column_names)} (row {i}: {X[i, j].item()!r})")


def _resolve_by_size(arg: str, value: Any, large: str, small: str, shape: tuple[int, int],
                     listed: tuple[str, str]) -> str:
    """``value`` checked against ("auto", *listed); "auto" → ``large`` when N·m² (XᵀX's flops)
    exceeds ``_AUTO_SINGLE_FLOPS``, else ``small``."""
    if value not in ("auto", large, small):
        raise ValueError(f"{arg}: expected 'auto', '{listed[0]}' or '{listed[1]}', got {value!r}")
    if value == "auto":
        N, m = shape
        return large if N * m * m > _AUTO_SINGLE_FLOPS else small
    return value


def _resolve_precision(precision: Any, shape: tuple[int, int]) -> str:
    return _resolve_by_size("precision", precision, "single", "double", shape, ("single", "double"))


def _gram(X: np.ndarray, Ls: sp.csr_matrix, precision: str, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(XᵀX, XᵀL) in one pass over the rows of X; XᵀL always in float64."""
    N, m = X.shape
    if precision == "double":
        Xd = np.asarray(X, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # reported by the caller, naming the column
            G = Xd.T @ Xd  # numpy calls BLAS syrk for a.T @ a and returns an exactly symmetric G
            XtL = np.ascontiguousarray((Ls.T @ Xd).T)
        return G, XtL
    gram = SyrkGram(m, np.float32)  # the one Gram kernel, shared with vxnb.features
    XtL = np.zeros((Ls.shape[1], m))
    for i0 in range(0, N, chunk_rows):
        blk = X[i0:i0 + chunk_rows]
        with np.errstate(over="ignore", invalid="ignore"):  # reported by the caller, naming the column
            XtL += Ls[i0:i0 + chunk_rows].T @ np.asarray(blk, dtype=np.float64)  # exact: float64
            gram.add(np.ascontiguousarray(blk, dtype=np.float32))
    return gram.result(), np.ascontiguousarray(XtL.T)


def _xtl(X: np.ndarray, Ls: sp.csr_matrix, chunk_rows: int) -> np.ndarray:
    """XᵀL (m, C) float64, exact, chunk by chunk of rows."""
    XtL = np.zeros((Ls.shape[1], X.shape[1]))
    for i0 in range(0, X.shape[0], chunk_rows):
        with np.errstate(over="ignore", invalid="ignore"):
            XtL += Ls[i0:i0 + chunk_rows].T @ np.asarray(X[i0:i0 + chunk_rows], dtype=np.float64)
    return np.ascontiguousarray(XtL.T)


# ============================================================================ the homotopy
def _homotopy(G: np.ndarray, q: np.ndarray, mu_max: float, max_iter: int, rtol: float = 1e-10,
              diag: np.ndarray | None = None, workspace: dict | None = None, keep_path: bool = True) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray], int]:
    """:func:`_homotopy_steps` with every row of G at hand (G (m, m) in memory)."""
    if diag is None:
        diag = np.ascontiguousarray(G.diagonal())
    steps = _homotopy_steps(q, mu_max, max_iter, rtol, diag, workspace, keep_path)
    try:
        with _quiet():
            j, _ = next(steps)
            while True:
                j, _ = steps.send(G[j])
    except StopIteration as done:
        return done.value


def _homotopy_steps(q: np.ndarray, mu_max: float, max_iter: int, rtol: float, diag: np.ndarray,
                    workspace: dict | None = None, keep_path: bool = True):
    """LARS-lasso path of min ‖Xw − l‖² along ‖w‖₁ from 0 to ``mu_max`` (or its end).

    A generator: for each variable entering the active set it yields ``(j, ranking)`` and must
    be sent row j of G = XᵀX (m,) (``ranking``, valid only until the row is sent: the inactive
    variables' distance to entering, smaller first; lets a caller that forms rows of G on
    demand fetch the likely next ones with it). q (m,) = Xᵀl; ``diag`` the diagonal of G.
    Returns (as its StopIteration value) the breakpoints: λ (K,), ‖w‖₁ (K,), and for each
    breakpoint the indices and values of its non-zero weights; then a status code.
    The objective is ½‖Xw − l‖² + λ‖w‖₁ (λ = the common |correlation| of the active set).
    ``workspace`` (a dict, one per thread) keeps the large buffer of active rows of G
    between calls, so it is allocated (and its pages faulted in) once, not per class.
    ``keep_path=False`` records only the first (w = 0) and the last breakpoint: the solution
    at mu_max alone, for direct solves (the full path is O(steps · active set) numbers).
    """
    m = q.shape[0]
    c = np.array(q, dtype=np.float64)              # correlations Xᵀ(l − Xw)
    excl = np.zeros(m)                               # +inf: not a candidate to enter
    excl[~(diag > 0)] = np.inf                       # all-zero columns never enter
    score = np.abs(c) + (-excl)                      # -inf on excluded
    j_in = int(np.argmax(score))
    lam = float(score[j_in])
    lams = [lam if lam > 0 else 0.0]
    mus = [0.0]
    idxs: list[np.ndarray] = [np.empty(0, np.int64)]
    vals: list[np.ndarray] = [np.empty(0)]
    if not lam > 0 or not math.isfinite(lam):
        return np.array(lams), np.array(mus), idxs, vals, _ZERO
    lam_end = lam * 1e-13
    wsp = {} if workspace is None else workspace
    GA = wsp.get("GA")                     # rows of G of the active set (in slot order)
    if GA is None or GA.shape[1] != m:
        GA = wsp["GA"] = np.empty((64, m))
    cap = GA.shape[0]
    A = np.empty(cap, np.int64)            # active indices, in Cholesky order
    s = np.empty(cap)                      # their signs
    w = np.empty(cap)                      # their weights
    slot = np.empty(cap, np.int64)         # row of GA holding G[A[i]]
    R = np.zeros((0, 0), order="F")        # G_AA = RᵀR, R upper triangular
    k = 0
    ignored: list[int] = []                # degenerate candidates (in the span of the active set)
    just_dropped = -1
    drop_sign = 0.0
    d = a = None
    sd = 0.0
    status = _MAX_ITER
    one = np.empty(m)
    two = np.empty(m)
    g1 = np.empty(m)
    g2 = np.empty(m)
    mask = np.empty(m, dtype=bool)
    # (no np.errstate here: a generator resumed on another thread cannot leave a context
    # entered elsewhere; the callers ignore divide/invalid/over around every step)
    for it in range(max_iter):
        if j_in >= 0:  # ---- add j_in to the active set
            j = j_in
            # row j of G, asked of the caller; with it the current ranking of the inactive
            # variables (smaller: sooner to enter), for a caller that forms rows on demand
            row = yield j, (g1 if d is not None else -score)
            if k:
                r = _trsv(R, row[A[:k]], trans=1)        # Rᵀ r = G_{A, j}
                piv2 = diag[j] - float(r @ r)
            else:
                r = np.empty(0)
                piv2 = diag[j]
            if piv2 <= rtol * diag[j]:
                # in the span of the active set (a duplicate column, or rank reached): it can
                # keep |c_j| = λ with w_j = 0; leave it out until the active set shrinks
                ignored.append(j)
                excl[j] = np.inf
                if d is None:  # pragma: no cover - the first variable has diag > 0
                    raise RuntimeError("degenerate first variable")
            else:
                if k == cap:
                    cap *= 2
                    A, s, w, slot = (np.resize(v, cap) for v in (A, s, w, slot))
                    GA2 = np.empty((cap, m))
                    GA2[:k] = GA[:k]
                    GA = wsp["GA"] = GA2
                Rn = np.zeros((k + 1, k + 1), order="F")
                Rn[:k, :k] = R
                Rn[:k, k] = r
                Rn[k, k] = math.sqrt(piv2)
                R = Rn
                A[k] = j
                s[k] = 1.0 if c[j] > 0 else -1.0
                w[k] = 0.0
                slot[k] = k
                GA[k] = row
                excl[j] = np.inf
                k += 1
                d = None
        if d is None:  # ---- direction: d = G_AA⁻¹ s, a = G_{:,A} d
            d = _trsv(R, _trsv(R, s[:k], trans=1))
            ds = np.empty(k)
            ds[slot[:k]] = d
            a = ds @ GA[:k]
            sd = float(s[:k] @ d)
        # ---- step length to the next event
        # entering: c_j − γ a_j = ±(λ − γ) for an inactive j, i.e. γ = (λ ∓ c_j) / (1 ∓ a_j);
        # a side whose denominator is ≤ 0 is never reached
        np.subtract(1.0, a, out=one)
        np.add(1.0, a, out=two)
        np.subtract(lam, c, out=g1)
        np.divide(g1, one, out=g1)
        np.add(lam, c, out=g2)
        np.divide(g2, two, out=g2)
        np.less_equal(one, 1e-12, out=mask)
        g1[mask] = np.inf
        np.less_equal(two, 1e-12, out=mask)
        g2[mask] = np.inf
        if just_dropped >= 0:
            # it left at c_j = ±λ: the root γ = 0 on that side is spurious; the other
            # side (re-entry with the opposite sign) is a genuine event
            (g1 if drop_sign > 0 else g2)[just_dropped] = np.inf
        np.minimum(g1, g2, out=g1)
        g1 += excl
        j_cand = int(np.argmin(g1))
        gam_in = float(g1[j_cand])
        if not gam_in < np.inf:
            j_cand = -1
        # leaving: a weight crosses zero
        ratio = -w[:k] / d
        ratio[~(ratio > 0)] = np.inf
        i_drop = int(np.argmin(ratio))
        gam_drop = float(ratio[i_drop])
        # target: ‖w + γ d‖₁ = mu_max (the signs hold along the segment)
        l1 = float(np.abs(w[:k]).sum())
        gam_mu = (mu_max - l1) / sd if mu_max < np.inf else np.inf
        gam_lam = lam
        gam = min(gam_mu, gam_lam, gam_drop, gam_in)
        gam = max(gam, 0.0)
        w[:k] += gam * d
        c = _axpy(a, c, a=-gam)                             # c −= γ a (in place)
        lam -= gam
        just_dropped = -1
        j_in = -1
        if gam == gam_mu:
            status = _REACHED_MU
        elif gam == gam_lam or lam <= lam_end:
            lam = 0.0
            status = _PATH_END
        elif gam == gam_drop:
            i = i_drop
            w[i] = 0.0
            just_dropped = int(A[i])
            drop_sign = s[i]
            excl[just_dropped] = 0.0
            # move the last GA row into the freed slot
            si, last = slot[i], k - 1
            if si != last:
                GA[si] = GA[last]
                slot[:k][slot[:k] == last] = si
            keep = np.r_[0:i, i + 1:k]
            A[:k - 1] = A[keep]
            s[:k - 1] = s[keep]
            w[:k - 1] = w[keep]
            slot[:k - 1] = slot[keep]
            k -= 1
            # refactor G_AA (k³/3 flops; drops are rare): exact, and no drift
            GAA = GA[np.ix_(slot[:k], A[:k])]
            R = np.asfortranarray(np.linalg.cholesky(GAA).T) if k else np.zeros((0, 0), order="F")
            for jj in ignored:   # the span shrank: degenerate candidates may enter again
                excl[jj] = 0.0
            ignored.clear()
            d = None
            if k == 0:  # pragma: no cover - ‖w‖₁ grows along the path, so one variable never leaves alone
                score = np.abs(c) - excl
                j_in = int(np.argmax(score))
        else:
            j_in = j_cand
        if status != _MAX_ITER or it % 32 == 31:
            # refresh the correlations from the weights (no drift over long paths)
            ws = np.empty(k)
            ws[slot[:k]] = w[:k]
            c = q - ws @ GA[:k]
        if not keep_path and status == _MAX_ITER and it < max_iter - 1:
            continue
        lams.append(lam)
        if status == _REACHED_MU:
            l1 = float(np.abs(w[:k]).sum())
            if l1 > mu_max:  # rounding: never exceed the bound
                w[:k] *= mu_max / l1
            mus.append(min(l1, mu_max))
        else:
            mus.append(float(np.abs(w[:k]).sum()))
        nz = w[:k] != 0
        idxs.append(A[:k][nz].copy())
        vals.append(w[:k][nz].copy())
        if status != _MAX_ITER:
            break
        if k == 0 and j_in < 0:  # pragma: no cover - cannot happen (λ > 0 has a candidate)
            status = _PATH_END
            break
    return np.array(lams), np.array(mus), idxs, vals, status


def _solve_paths(G: np.ndarray, XtL: np.ndarray, mu_max: float, *, n_jobs: int | None, max_iter: int | None,
                 progress: bool | None, tol: float | None = None, keep_path: bool = True) -> list[tuple]:
    """One homotopy per class (columns of XtL), on ``n_jobs`` threads (numpy/BLAS release the GIL);
    G is XᵀX in memory, or a :class:`RowGram` forming its rows on demand."""
    m, C = XtL.shape
    if max_iter is None:
        max_iter = 10 * m + 1000
    elif isinstance(max_iter, (bool, np.bool_)) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter: expected a positive int, got {max_iter!r}")
    tol = _TOL_DOUBLE if tol is None else float(tol)
    if not 0 < tol < 1:
        raise ValueError(f"tol: expected a number in (0, 1), got {tol!r}")
    jobs = min(_n_jobs(n_jobs), C)
    cols = [np.ascontiguousarray(XtL[:, j]) for j in range(C)]
    bar = tqdm(total=C, desc="μ-lasso path", unit="class", disable=None if progress is None else not progress,
               leave=False)
    try:
        if isinstance(G, RowGram):
            out = _solve_on_rows(G, cols, mu_max, int(max_iter), tol, keep_path, jobs, bar)
        else:
            out = _solve_on_gram(G, cols, mu_max, int(max_iter), tol, keep_path, jobs, bar)
    finally:
        bar.close()
    hit = [j for j, r in enumerate(out) if r[4] == _MAX_ITER]
    if hit:
        _warn(f"lasso_path: classes {hit} stopped after max_iter={max_iter} homotopy steps before reaching "
              f"mu_max; their path ends early (raise max_iter)")
    return out


def _solve_on_rows(G: "RowGram", cols: list[np.ndarray], mu_max: float, max_iter: int, tol: float,
                   keep_path: bool, jobs: int, bar: Any) -> list[tuple]:
    """The homotopies of all classes on rows of G formed on demand, in rounds: every class
    runs until it needs a row not yet formed; the rows asked for (with each asking class's
    ``_ROWS_PREFETCH`` likeliest next ones) are formed in one pass over X; repeat. Classes
    go in waves of ``_ROWS_WAVE`` (each holds its own active rows)."""
    from threadpoolctl import threadpool_limits

    out: list[Any] = [None] * len(cols)

    def advance(state: list) -> tuple | None:
        steps, asked = state          # asked: the row this class waits for (None: not started)
        try:
            with _quiet():
                j, rank = next(steps) if asked is None else steps.send(G.row(asked))
                while True:
                    row = G.row(j)
                    if row is None:
                        state[1] = j
                        top = np.argpartition(rank, min(_ROWS_PREFETCH, rank.size - 1))[:_ROWS_PREFETCH]
                        return j, G.missing(top[np.isfinite(rank[top])])
                    j, rank = steps.send(row)
        except StopIteration as done:
            state[0] = done.value
            return None

    with ThreadPoolExecutor(jobs) as ex:
        for w0 in range(0, len(cols), _ROWS_WAVE):
            live = {c: [_homotopy_steps(cols[c], mu_max, max_iter, tol, G.diag, None, keep_path), None]
                    for c in range(w0, min(len(cols), w0 + _ROWS_WAVE))}
            while live:
                with threadpool_limits(limits=1, user_api="blas"):
                    asks = list(ex.map(lambda c: advance(live[c]), list(live)))
                need, ahead = [], []
                for c, ask in zip(list(live), asks):
                    if ask is None:
                        out[c] = live.pop(c)[0]
                        bar.update()
                    else:
                        need.append(ask[0])
                        ahead.append(ask[1])
                if need:
                    G.fetch(np.array(need, dtype=np.int64), np.concatenate(ahead).astype(np.int64))
    return out


def _solve_on_gram(G: np.ndarray, cols: list[np.ndarray], mu_max: float, max_iter: int, tol: float,
                   keep_path: bool, jobs: int, bar: Any) -> list[tuple]:
    """The homotopies of all classes on G (m, m) in memory, classes on ``jobs`` threads."""
    from threadpoolctl import threadpool_limits

    C = len(cols)
    diag = np.ascontiguousarray(G.diagonal())
    local = threading.local()

    def one(j: int) -> tuple:
        if not hasattr(local, "ws"):
            local.ws = {}
        return _homotopy(G, cols[j], mu_max, max_iter, rtol=tol, diag=diag, workspace=local.ws,
                         keep_path=keep_path)

    out: list[tuple] = []
    # each step is a small matrix-vector product: multi-threaded BLAS only adds overhead there
    with threadpool_limits(limits=1, user_api="blas"):
        if jobs == 1:
            for j in range(C):
                out.append(one(j))
                bar.update()
        else:
            with ThreadPoolExecutor(jobs) as ex:
                for res in ex.map(one, range(C)):
                    out.append(res)
                    bar.update()
    return out


# ============================================================================ the path object
class LassoPath:
    """The μ-lasso solution of every class for every μ up to ``mu_max``.

    Built by :func:`lasso_path`. For class j the homotopy breakpoints are stored sparsely
    (the non-zero weights at each breakpoint); between breakpoints w_j is linear in
    μ = ‖w_j‖₁, so :meth:`coef` interpolates exactly.

    Attributes:
        n_features: m.
        n_classes: C.
        mu_max: the largest μ the path answers (``inf`` when it was run to its end).
        mu_end: (C,) ‖w_j‖₁ at the end of each class's path (= mu_max where the constraint
            is still active there; smaller where the least-squares fit was reached first).
        status: (C,) "mu_max", "end" (least-squares fit reached), "zero" (XᵀL column zero)
            or "max_iter".
    """

    _STATUS = ("mu_max", "end", "zero", "max_iter")

    def __init__(self, *, lambdas: np.ndarray, mus: np.ndarray, class_ptr: np.ndarray, indptr: np.ndarray,
                 indices: np.ndarray, values: np.ndarray, status: np.ndarray, mu_max: float, n_features: int,
                 ltl: np.ndarray | None = None, complete: bool = True):
        self.lambdas = np.asarray(lambdas, dtype=np.float64)
        self.mus = np.asarray(mus, dtype=np.float64)
        self.class_ptr = np.asarray(class_ptr, dtype=np.int64)
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.indices = np.asarray(indices)
        self.values = np.asarray(values, dtype=np.float64)
        self._status = np.asarray(status, dtype=np.int8)
        self.mu_max = float(mu_max)
        self.n_features = int(n_features)
        self.ltl = None if ltl is None or np.size(ltl) == 0 else np.asarray(ltl, dtype=np.float64)
        self.complete = bool(complete)   # False: only the end of each path (answers mu_max alone)
        C = self.class_ptr.shape[0] - 1
        K = self.mus.shape[0]
        if (C < 1 or self.class_ptr[0] != 0 or self.class_ptr[-1] != K or np.any(np.diff(self.class_ptr) < 1)
                or self.lambdas.shape != (K,) or self.indptr.shape != (K + 1,) or self.indptr[0] != 0
                or self.indptr[-1] != self.indices.shape[0] or self.values.shape != self.indices.shape
                or self._status.shape != (C,) or np.any(np.diff(self.indptr) < 0)
                or (self.indices.size and (self.indices.min() < 0 or self.indices.max() >= self.n_features))):
            raise ValueError("LassoPath: inconsistent arrays (a corrupt or foreign file?)")
        self._first = self.class_ptr[:-1]
        self._last = self.class_ptr[1:] - 1
        self._sizes = np.diff(self.class_ptr)

    @classmethod
    def _from_results(cls, results: list[tuple], mu_max: float, n_features: int,
                      ltl: np.ndarray | None, complete: bool = True) -> "LassoPath":
        lams, mus, idx, vals, status, ptr = [], [], [], [], [], [0]
        for lam_j, mu_j, idx_j, val_j, st in results:
            lams.append(lam_j)
            mus.append(mu_j)
            idx.extend(idx_j)
            vals.extend(val_j)
            status.append(st)
            ptr.append(ptr[-1] + len(mu_j))
        lens = np.array([len(i) for i in idx], dtype=np.int64)
        itype = np.int32 if n_features < 2**31 else np.int64
        return cls(lambdas=np.concatenate(lams), mus=np.concatenate(mus), class_ptr=np.array(ptr),
                   indptr=np.r_[0, np.cumsum(lens)], indices=np.concatenate(idx).astype(itype),
                   values=np.concatenate(vals), status=np.array(status), mu_max=mu_max, n_features=n_features,
                   ltl=ltl, complete=complete)

    # ---- shape and state
    @property
    def n_classes(self) -> int:
        return int(self.class_ptr.shape[0] - 1)

    @property
    def n_breakpoints(self) -> np.ndarray:
        """(C,) number of stored breakpoints of each class (w = 0 included)."""
        return self._sizes.copy()

    @property
    def mu_end(self) -> np.ndarray:
        return self.mus[self._last].copy()

    @property
    def status(self) -> list[str]:
        return [self._STATUS[s] for s in self._status]

    def __repr__(self) -> str:
        return (f"LassoPath(n_features={self.n_features}, n_classes={self.n_classes}, mu_max={self.mu_max:g}, "
                f"breakpoints={int(self._sizes.sum())}, nnz={self.indices.shape[0]})")

    # ---- queries
    def _mu_vector(self, mu: Any) -> np.ndarray:
        C = self.n_classes
        if np.ndim(mu) == 0:
            muv = np.full(C, _check_mu(mu))
        else:
            muv = np.asarray(mu)
            if muv.shape != (C,) or not np.issubdtype(muv.dtype, np.number):
                raise ValueError(f"mu: expected a positive number or an array of {C} (one per class), "
                                 f"got {describe(mu)}")
            muv = muv.astype(np.float64)
            if not np.all(np.isfinite(muv)) or np.any(muv <= 0):
                raise ValueError(f"mu: expected positive finite numbers, got {muv[~(np.isfinite(muv) & (muv > 0))][:5]}")
        if not self.complete:
            end = self.mus[self._last]
            bad = np.where(self._status == _REACHED_MU, np.abs(muv - end) > 1e-12 * end, muv < end * (1 - 1e-12))
            bad &= self._status != _ZERO
            if bad.any():
                raise ValueError(f"mu: this LassoPath keeps only the solution at mu_max={self.mu_max:g} "
                                 f"(got {muv[np.flatnonzero(bad)[0]]:g}); use lasso_path for other values")
        # a path stopped by max_iter (warned when it was computed) answers with its last iterate
        over = (self._status == _REACHED_MU) & (muv > self.mus[self._last] * (1 + 1e-12))
        if over.any():
            j = int(np.flatnonzero(over)[0])
            raise ValueError(f"mu: {muv[j]:g} is beyond the computed path (mu_max={self.mu_max:g}, class {j} "
                             f"ends at ‖w‖₁ = {self.mus[self._last[j]]:g}); recompute lasso_path with a larger mu_max")
        return muv

    def _locate(self, muv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Breakpoints t ≤ μ < t2 of each class and the weight θ of t2."""
        le = self.mus <= np.repeat(muv, self._sizes)
        t = self._first + np.add.reduceat(le.astype(np.int64), self._first) - 1
        t = np.maximum(t, self._first)
        at_end = t >= self._last
        t2 = np.where(at_end, t, t + 1)
        span = self.mus[t2] - self.mus[t]
        with np.errstate(divide="ignore", invalid="ignore"):
            theta = np.where(at_end | (span <= 0), 0.0, (muv - self.mus[t]) / span)
        return t, t2, np.clip(theta, 0.0, 1.0)

    def _gather(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        starts = self.indptr[b]
        lens = self.indptr[b + 1] - starts
        tot = int(lens.sum())
        offs = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(tot)
        cls = np.repeat(np.arange(b.shape[0]), lens)
        return self.indices[offs], cls, offs

    def coef(self, mu: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """W (m, C) float64 at ‖w_j‖₁ ≤ μ (a number, or one per class), in milliseconds.

        Exactly the μ-lasso solution for μ ≤ mu_max (linear interpolation between the path's
        breakpoints); where a class's path ended before μ (constraint inactive) its last
        solution (also where it was cut by ``max_iter``, which was warned about). Every column satisfies ‖w_j‖₁ ≤ μ (columns on the bound are within 1e-12
        relative of it, below: rounding in any summation order cannot cross it).
        """
        muv = self._mu_vector(mu)
        t, t2, theta = self._locate(muv)
        # never exceed the bound, however ‖w_j‖₁ is summed: where rounding could put it above μ,
        # shrink the column to μ(1 − 1e-12) (the objective moves by ~1e-12 relative). On a
        # segment the signs are fixed, so ‖w‖₁ interpolates linearly between the breakpoints'
        # (each stored as the sum of its |w|); the column sums agree with it to ~k·1e-16.
        target = muv * (1.0 - _L1_MARGIN)
        l1 = (1.0 - theta) * self.mus[t] + theta * self.mus[t2]
        scale = np.where(l1 > target, target / np.where(l1 > 0, l1, 1.0), 1.0)
        W = np.zeros((self.n_features, self.n_classes))
        rows, cls, offs = self._gather(t)
        W[rows, cls] = self.values[offs] * ((1.0 - theta) * scale)[cls]
        inner = theta > 0
        if inner.any():
            rows, cls, offs = self._gather(t2)
            keep = inner[cls]
            rows, cls, offs = rows[keep], cls[keep], offs[keep]
            W[rows, cls] += self.values[offs] * (theta * scale)[cls]
        return W

    def lambda_at(self, mu: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """(C,) the Lagrange multiplier λ_j(μ) (penalised form ½‖Xw − l‖² + λ‖w‖₁); 0 where the
        constraint is inactive."""
        muv = self._mu_vector(mu)
        t, t2, theta = self._locate(muv)
        return (1 - theta) * self.lambdas[t] + theta * self.lambdas[t2]

    def constraint_active(self, mu: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """(C,) bool: ‖w_j‖₁ = μ at the solution (False where the least-squares fit has ‖w‖₁ < μ)."""
        return self.lambda_at(mu) > 0

    def breakpoints(self, j: int) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
        """Class j's breakpoints: μ (K,), λ (K,), and the weights at each of them (K, m) sparse."""
        if isinstance(j, (bool, np.bool_)) or not isinstance(j, (int, np.integer)) or not 0 <= j < self.n_classes:
            raise ValueError(f"j: expected a class index in [0, {self.n_classes}), got {j!r}")
        a, b = self.class_ptr[j], self.class_ptr[j + 1]
        ip = self.indptr[a:b + 1]
        Wj = sp.csr_matrix((self.values[ip[0]:ip[-1]], self.indices[ip[0]:ip[-1]], ip - ip[0]),
                           shape=(b - a, self.n_features))
        return self.mus[a:b].copy(), self.lambdas[a:b].copy(), Wj

    # ---- persistence
    def save(self, file: str | os.PathLike) -> Path:
        """Write the path to ``file`` (``.npz``, atomically, no pickles)."""
        file = Path(file)
        atomic_savez(file, format_version=np.array(_FORMAT_VERSION), lambdas=self.lambdas, mus=self.mus,
                     class_ptr=self.class_ptr, indptr=self.indptr, indices=self.indices, values=self.values,
                     status=self._status, mu_max=np.array(self.mu_max), n_features=np.array(self.n_features),
                     ltl=np.empty(0) if self.ltl is None else self.ltl, complete=np.array(self.complete))
        return file

    @classmethod
    def load(cls, file: str | os.PathLike) -> "LassoPath":
        """Read a path written by :meth:`save`."""
        z = read_npz(file, "file", "lasso path file", ("format_version", "lambdas", "mus", "class_ptr", "indptr",
                                                       "indices", "values", "status", "mu_max", "n_features", "ltl",
                                                       "complete"))
        version = int(z["format_version"])
        if version != _FORMAT_VERSION:
            raise ValueError(f"{file}: lasso path format {version}, expected {_FORMAT_VERSION}")
        return cls(lambdas=z["lambdas"], mus=z["mus"], class_ptr=z["class_ptr"], indptr=z["indptr"],
                   indices=z["indices"], values=z["values"], status=z["status"], mu_max=float(z["mu_max"]),
                   n_features=int(z["n_features"]), ltl=z["ltl"], complete=bool(z["complete"]))


# ============================================================================ public entry points
def _resolve_gram(gram: Any, shape: tuple[int, int]) -> str:
    return _resolve_by_size("gram", gram, "rows", "full", shape, ("full", "rows"))


def _gram_block(G: Any, idx: np.ndarray) -> np.ndarray:
    """G[idx][:, idx] of XᵀX in memory or of a :class:`RowGram`."""
    return G.block(idx) if isinstance(G, RowGram) else G[np.ix_(idx, idx)]


def _fit(G: Any, XtL: Any, LtL: Any, X: Any, L: Any, *, mu_max: float, n_classes: int | None, column_names: Any,
         precision: str, n_jobs: int | None, max_iter: int | None, progress: bool | None, tol: float | None,
         check_input: bool = True, keep_path: bool = True, gram: str = "auto"
         ) -> tuple[LassoPath, Any, np.ndarray, np.ndarray | None]:
    if X is not None or L is not None:
        if G is not None or XtL is not None or LtL is not None:
            raise ValueError("lasso_path: give either (G, XtL[, LtL]) or (X=, L=), not both")
        if X is None or L is None:
            raise ValueError("lasso_path: X and L must be given together")
        X = _check_X(X)
        precision = _resolve_precision(precision, X.shape)
        if _resolve_gram(gram, X.shape) == "rows":
            L = _check_labels(L, X.shape[0], n_classes, X.shape)
            column_names = _check_column_names(column_names, X.shape[1])
            chunk_rows = max(4096, 2**30 // (4 * X.shape[1]))
            G = RowGram(X, precision, chunk_rows)
            _check_finite_diag(G.diag, X, precision, column_names)
            XtL = _xtl(X, sp.csr_matrix(L), chunk_rows)
            LtL = np.asarray(L.sum(axis=0), dtype=np.float64)
        else:
            G, XtL, LtL = gram_statistics(X, L, n_classes=n_classes, precision=precision,
                                          column_names=column_names)
        if tol is None:
            tol = _TOL_SINGLE if precision == "single" else _TOL_DOUBLE
    else:
        if G is None or XtL is None:
            raise ValueError("lasso_path: give G (XᵀX) and XtL (XᵀL), or X= and L=")
        _resolve_gram(gram, (0, 0))   # only the argument's check: G is in memory already
        G, XtL, LtL = _check_gram(G, XtL, LtL, check_symmetric=check_input)
    _warn_empty_classes(XtL, LtL)
    results = _solve_paths(G, XtL, mu_max, n_jobs=n_jobs, max_iter=max_iter, progress=progress, tol=tol,
                           keep_path=keep_path)
    path = LassoPath._from_results(results, mu_max, G.shape[0], LtL, complete=keep_path)
    path.gram_info = G.info if isinstance(G, RowGram) else {"gram": "full"}
    return path, G, XtL, LtL


def lasso_path(G: Any = None, XtL: Any = None, *, mu_max: float | None = None, LtL: Any = None, X: Any = None,
               L: Any = None, n_classes: int | None = None, column_names: Any = None, precision: str = "auto",
               gram: str = "auto", n_jobs: int | None = None, max_iter: int | None = None,
               tol: float | None = None, check_input: bool = True, progress: bool | None = None) -> LassoPath:
    """The μ-lasso path of every class, from w = 0 to ‖w_j‖₁ = ``mu_max``.

    Give either the statistics ``G`` = XᵀX (m, m) and ``XtL`` = XᵀL (m, C) (``LtL``, LᵀL or
    its diagonal, optional: it tells empty classes apart), or the data ``X`` (N, m) and ``L``
    (N, C) 0/1 (or (N,) class indices with ``n_classes``); see :func:`gram_statistics` for
    ``precision`` and ``column_names``.

    Args:
        gram: with X given, how XᵀX is formed: ``"full"`` all of it (:func:`gram_statistics`);
            ``"rows"`` only the rows the homotopies visit, formed on demand in a few passes
            over X (a path at moderate μ visits a few hundred of m variables, so this costs a
            fraction of the full product; past a quarter of m rows it forms all of XᵀX
            instead); ``"auto"`` (default): rows when N·m² > 2·10⁹, else full. The solution is
            the same either way (the homotopy reads only rows of variables entering its
            active set). ``path.gram_info`` says which route ran, how many rows and passes.
        mu_max: the largest μ the path must answer; None runs each path to its end (the
            least-squares fit; up to min(N, m) active features: slow for large m).
        n_jobs: threads solving classes in parallel (default: all cores).
        max_iter: homotopy steps per class (default 10·m + 1000).
        tol: a candidate whose squared Cholesky pivot is below ``tol``·G_jj is treated as
            linearly dependent on the active set (duplicated columns, rank reached) and
            kept at 0; default 1e-10, or 1e-5 when XᵀX is formed here in single precision.
        check_input: False skips the O(m²) symmetry check of G (shapes and finiteness are
            always checked); for a G you formed yourself.
        progress: a tqdm bar over classes (None: only on a terminal).

    Returns:
        A :class:`LassoPath`; ``path.coef(mu)`` is W (m, C) for any μ ≤ mu_max.
    """
    mu_max = _check_mu_max(mu_max)
    return _fit(G, XtL, LtL, X, L, mu_max=mu_max, n_classes=n_classes, column_names=column_names,
                precision=precision, n_jobs=n_jobs, max_iter=max_iter, progress=progress, tol=tol,
                check_input=check_input, gram=gram)[0]


def mu_lasso_gram(G: Any, XtL: Any, mu: float, LtL: Any = None, *, n_jobs: int | None = None,
                  max_iter: int | None = None, tol: float | None = None, check_input: bool = True,
                  progress: bool | None = None) -> np.ndarray:
    """W (m, C) float64 minimising ‖XW − L‖²_F s.t. ‖w_j‖₁ ≤ μ, from G = XᵀX (m, m) and XtL = XᵀL (m, C).

    ``LtL`` (LᵀL (C, C) or its diagonal) is optional; with it a class without positive
    examples is reported as such. X never needs to be in memory. See :func:`lasso_path`.
    """
    mu = _check_mu(mu)
    # only the end of each path is kept (the same numbers as lasso_path(...).coef(mu))
    return _fit(G, XtL, LtL, None, None, mu_max=mu, n_classes=None, column_names=None, precision="auto",
                n_jobs=n_jobs, max_iter=max_iter, progress=progress, tol=tol, check_input=check_input,
                keep_path=False)[0].coef(mu)


def mu_lasso(X: Any, L: Any, mu: float, *, n_classes: int | None = None, column_names: Any = None,
             precision: str = "auto", gram: str = "auto", n_jobs: int | None = None, max_iter: int | None = None,
             tol: float | None = None, progress: bool | None = None) -> np.ndarray:
    """W (m, C) float64 minimising ‖XW − L‖²_F subject to ‖w_j‖₁ ≤ μ for every class j.

    Args:
        X: (N, m) real array (filter responses).
        L: (N, C) 0/1 label matrix (multi-label allowed), or (N,) integer class indices
            (one-hot over ``n_classes``, default max + 1).
        mu: the bound on ‖w_j‖₁ (> 0).
        column_names: names of X's columns (or ``Features.columns``) for error messages.
        precision: the products of XᵀX, see :func:`gram_statistics`; ``gram``: all of XᵀX or
            only the rows the paths visit, see :func:`lasso_path`; other arguments as there.
    """
    mu = _check_mu(mu)
    return _fit(None, None, None, X, L, mu_max=mu, n_classes=n_classes, column_names=column_names,
                precision=precision, n_jobs=n_jobs, max_iter=max_iter, progress=progress, tol=tol,
                keep_path=False, gram=gram)[0].coef(mu)


def lasso_objective(X: Any, L: Any, W: Any, *, n_classes: int | None = None) -> np.ndarray:
    """(C,) ‖X w_j − l_j‖² for each class (float64)."""
    X = _check_X(X)
    L = _check_labels(L, X.shape[0], n_classes, X.shape)
    W = np.asarray(W, dtype=np.float64)
    if W.shape != (X.shape[1], L.shape[1]):
        raise ValueError(f"W: expected shape (m, C) = ({X.shape[1]}, {L.shape[1]}), got {W.shape}")
    R = np.asarray(X, dtype=np.float64) @ W - L
    return np.einsum("ij,ij->j", R, R)


# ============================================================================ estimator
class MuLasso(BaseEstimator):
    """The μ-lasso as a scikit-learn estimator: ``MuLasso(mu=10).fit(X, L).coef_`` (C, m).

    Follows scikit-learn's conventions (``coef_`` is (n_classes, n_features), the transpose of
    the W (m, C) of :func:`mu_lasso`; ``predict(X) = X @ coef_.T``) and passes
    ``sklearn.utils.estimator_checks.check_estimator``.

    Args:
        mu: the bound on ‖w_j‖₁ for every class.
        precision: how XᵀX is formed from X (``"auto"``, ``"single"`` or ``"double"``, see
            :func:`gram_statistics`).
        gram: all of XᵀX (``"full"``) or only the rows the paths visit (``"rows"``);
            ``"auto"``: see :func:`lasso_path`.
        n_jobs: threads (classes in parallel); None: all cores.
        progress: tqdm progress bar (None: only on a terminal).

    Attributes:
        coef_: (C, m) float64 weights, ``coef_[j]`` = w_j (``coef_.T`` is W).
        path_: the :class:`LassoPath` up to ``mu`` (``path_.coef(smaller_mu)`` is free).
        n_features_in_, n_classes_.
        objective_: (C,) ‖X w_j − l_j‖² (None after ``fit_gram`` without ``LtL``).
    """

    def __init__(self, mu: float = 10.0, *, precision: str = "auto", gram: str = "auto",
                 n_jobs: int | None = None, progress: bool | None = None):
        self.mu = mu
        self.precision = precision
        self.gram = gram
        self.n_jobs = n_jobs
        self.progress = progress

    def fit(self, X: Any, y: Any, *, n_classes: int | None = None, column_names: Any = None) -> "MuLasso":
        """Fit on X (N, m) and y = L (N, C) 0/1 or (N,) class indices."""
        from sklearn.utils.multiclass import type_of_target
        from sklearn.utils.validation import validate_data

        mu = _check_mu(self.mu)
        X, y = validate_data(self, _torch_to_numpy(X), _torch_to_numpy(y), multi_output=True)
        type_of_target(y, input_name="y", raise_unknown=True)  # class indices or 0/1 columns
        self.path_, G, XtL, LtL = _fit(None, None, None, X, y, mu_max=mu, n_classes=n_classes,
                                       column_names=column_names, precision=self.precision, n_jobs=self.n_jobs,
                                       max_iter=None, progress=self.progress, tol=None, gram=self.gram)
        return self._finish(G, XtL, LtL)

    def fit_gram(self, G: Any, XtL: Any, LtL: Any = None) -> "MuLasso":
        """Fit on the statistics G = XᵀX (m, m), XtL = XᵀL (m, C) (and LᵀL, optional)."""
        mu = _check_mu(self.mu)
        self.path_, G, XtL, LtL = _fit(G, XtL, LtL, None, None, mu_max=mu, n_classes=None, column_names=None,
                                       precision=self.precision, n_jobs=self.n_jobs, max_iter=None,
                                       progress=self.progress, tol=None)
        return self._finish(G, XtL, LtL)

    def _finish(self, G: np.ndarray, XtL: np.ndarray, LtL: np.ndarray | None) -> "MuLasso":
        W = self.path_.coef(float(self.mu))
        self.coef_ = np.ascontiguousarray(W.T)
        self.n_features_in_ = int(G.shape[0])
        self.n_classes_ = int(XtL.shape[1])
        if LtL is not None:  # ‖X w − l‖² = wᵀGw − 2 wᵀXᵀl + lᵀl, on the support of w only
            quad = np.empty(W.shape[1])
            for j in range(W.shape[1]):
                nz = np.flatnonzero(W[:, j])
                quad[j] = W[nz, j] @ _gram_block(G, nz) @ W[nz, j]
            self.objective_ = quad - 2 * np.einsum("ij,ij->j", W, XtL) + LtL
        else:
            self.objective_ = None
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Class scores X W = X @ coef_.T (N, C)."""
        from sklearn.utils.validation import check_is_fitted, validate_data

        check_is_fitted(self, "coef_")
        X = validate_data(self, _torch_to_numpy(X), reset=False)
        return np.asarray(X, dtype=np.float64) @ self.coef_.T


def _torch_to_numpy(a: Any) -> Any:
    """A torch tensor as a numpy array (for scikit-learn's validation); anything else as it is."""
    return a.detach().cpu().numpy() if hasattr(a, "detach") and hasattr(a, "cpu") else a
