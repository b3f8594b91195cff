"""vxnb._gram: the one CPU Gram kernel (lasso + features) against float64 products."""
from __future__ import annotations

import numpy as np
import pytest

import vxnb._gram as vg
from vxnb._gram import SyrkGram, gram_error


def _responses(N: int, m: int, seed: int = 0) -> np.ndarray:
    """Non-negative, L1-normalised rows with ReLU-like zeros: like vxnb's filter responses."""
    rng = np.random.default_rng(seed)
    X = rng.random((N, m), dtype=np.float32) ** 2
    X[rng.random((N, m)) < 0.3] = 0
    X += 1e-6
    return X / X.sum(1, keepdims=True)


@pytest.mark.parametrize("fold_rows,block", [(1, 7), (20, 7), (10_000, 64), (50, 1)])
def test_float32_products_within_1e6_of_float64(monkeypatch, fold_rows, block):
    monkeypatch.setattr(vg, "TILE", 8)  # several tiles when folding and mirroring
    X = _responses(301, 37)
    g = SyrkGram(37, np.float32, fold_rows=fold_rows)
    for i in range(0, len(X), block):
        g.add(X[i:i + block])
    G = g.result()
    Xd = X.astype(np.float64)
    ref = np.einsum("ni,nj->ij", Xd, Xd)  # float64, no BLAS
    assert G.dtype == np.float64 and G.flags.c_contiguous
    assert np.array_equal(G, G.T)  # the lower triangle is a copy of the upper one
    assert gram_error(G, ref) <= 1e-6
    np.testing.assert_allclose(G, ref, rtol=1e-6)


def test_default_fold_on_a_long_stream():
    """Many rows (more than FOLD_ROWS) of responses, the default fold: error ≤ 1e-6."""
    X = _responses(vg.FOLD_ROWS + 3000, 24, seed=1)
    g = SyrkGram(24)
    for i in range(0, len(X), 1024):
        g.add(X[i:i + 1024])
    Xd = X.astype(np.float64)
    assert gram_error(g.result(), Xd.T @ Xd) <= 1e-6


def test_float64_products_and_signed_data(monkeypatch):
    monkeypatch.setattr(vg, "TILE", 4)
    X = np.random.default_rng(2).standard_normal((55, 13))
    g = SyrkGram(13, np.float64)
    for i in range(0, 55, 10):
        g.add(X[i:i + 10])
    np.testing.assert_allclose(g.result(), np.einsum("ni,nj->ij", X, X), rtol=1e-12, atol=1e-12)
    g32 = SyrkGram(13, np.float32, fold_rows=20)
    for i in range(0, 55, 10):
        g32.add(X[i:i + 10].astype(np.float32))
    X32 = X.astype(np.float32).astype(np.float64)
    assert gram_error(g32.result(), X32.T @ X32) <= 1e-6


def test_gram_error_definition():
    ref = np.array([[4.0, 1.0], [1.0, 9.0]])
    G = ref + np.array([[0.0, 0.6], [0.6, 0.0]])
    assert gram_error(G, ref) == pytest.approx(0.6 / 6.0)


def test_empty_and_bad_input():
    assert np.array_equal(SyrkGram(3).result(), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="dtype"):
        SyrkGram(3, np.int32)
    with pytest.raises(ValueError, match="fold_rows"):
        SyrkGram(3, fold_rows=0)
    with pytest.raises(ValueError, match=r"block: expected \(rows, 3\)"):
        SyrkGram(3).add(np.zeros((2, 4), np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_syrk_upper_is_scipys_syrk_bit_for_bit_and_releases_the_gil(dtype):
    from scipy.linalg import blas

    from vxnb._gram import _SYRK, _syrk_function, syrk_upper

    rng = np.random.default_rng(0)
    b1, b2 = (rng.standard_normal((n, 29)).astype(dtype) for n in (17, 5))
    ref = np.zeros((29, 29), dtype, order="F")
    got = np.full((29, 29), 7.0, dtype, order="F")  # beta = 0 ignores what was there
    f = blas.ssyrk if dtype == np.float32 else blas.dsyrk
    for b, beta in ((b1, 0.0), (b2, 1.0)):
        f(1.0, b.T, beta=beta, c=ref, trans=0, lower=0, overwrite_c=1)
        syrk_upper(b, beta, got)
    assert np.array_equal(np.triu(got), np.triu(ref))
    assert np.all(got[np.tril_indices(29, -1)] == 7.0)  # the lower triangle untouched
    name = "ssyrk" if dtype == np.float32 else "dsyrk"
    assert _SYRK[name] is _syrk_function(name) and _SYRK[name].releases_gil  # ctypes, not the f2py wrapper
    with pytest.raises(ValueError, match="syrk_upper: expected"):
        syrk_upper(b1, 0.0, np.zeros((29, 29), dtype))  # C-ordered c
