"""Tests for vxnb.lasso: the μ-lasso against SPAMS, its path, the Gram entry point, the
estimator and bad inputs. Independent references: SPAMS (``spams.lasso`` mode 0), least
squares (numpy lstsq), KKT conditions checked by hand, and a de-duplicated design."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest

from vxnb.lasso import (LassoPath, MuLasso, gram_statistics, lasso_objective, lasso_path, mu_lasso,
                        mu_lasso_gram)



# ---------------------------------------------------------------------------- helpers
def _gauss(N, m, C, seed=0, multilabel=False):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, m))
    if multilabel:
        L = (rng.random((N, C)) < 0.3).astype(float)
        L[0] = 1.0  # every class has a positive
    else:
        y = rng.integers(0, C, N)
        y[:C] = np.arange(C)
        L = np.eye(C)[y]
    return X, L


def _responses(N, m, C, seed=0, blocks=(3, 5, 8, 4)):
    """Non-negative X whose per-"layer" blocks sum to 1 in every row (like filter responses)."""
    rng = np.random.default_rng(seed)
    widths = np.round(np.array(blocks) / sum(blocks) * m).astype(int)
    widths[-1] = m - widths[:-1].sum()
    y = rng.integers(0, C, N)
    y[:C] = np.arange(C)
    proto = rng.gamma(0.5, 1.0, (C, m))
    X = rng.gamma(0.5, 1.0, (N, m)) * (0.3 + proto[y]) + 1e-9
    s = 0
    for w in widths:
        X[:, s:s + w] /= X[:, s:s + w].sum(1, keepdims=True)
        s += w
    return X, np.eye(C)[y]


def _spams(X, L, mu):
    # only the tests that compare against SPAMS import it; the dev extra requires spams-bin, so a
    # missing SPAMS fails these tests instead of skipping the whole file
    import spams

    W = spams.lasso(np.asfortranarray(L, dtype=np.float64), D=np.asfortranarray(X, dtype=np.float64),
                    mode=0, lambda1=float(mu), numThreads=1)
    return W.toarray()


def _obj(X, L, W):
    R = X @ W - L
    return np.einsum("ij,ij->j", R, R)


def _assert_matches(X, L, W, W_ref, mu, rtol=1e-6):
    """‖w_j‖₁ ≤ μ exactly, and an objective no worse than the reference's by more than rtol
    (relative; where the optimum is ~0, relative to 1e-4·‖l_j‖², i.e. 1e-10·‖l_j‖² absolute).
    With the constraint met, a lower objective than the reference's means the reference
    stopped short of the optimum (SPAMS does on degenerate designs)."""
    f, f_ref = _obj(X, L, W), _obj(X, L, W_ref)
    scale = np.maximum(f_ref, 1e-4 * (L * L).sum(0))
    assert np.all(f - f_ref <= rtol * scale), (f, f_ref)
    assert np.all(np.abs(W).sum(0) <= mu)
    return f, f_ref


def _kkt(G, q, w, lam, tol=1e-8):
    """Lagrangian optimality of ½‖Xw − l‖² + λ‖w‖₁: |c_j| ≤ λ, c_j = λ sign(w_j) on the support."""
    c = q - G @ w
    scale = max(np.abs(q).max(), 1e-300)
    assert np.all(np.abs(c) <= lam + tol * scale)
    nz = w != 0
    np.testing.assert_allclose(c[nz], lam * np.sign(w[nz]), atol=tol * scale)


# ---------------------------------------------------------------------------- exactness vs SPAMS
@pytest.mark.parametrize("N, m, C, multilabel", [(80, 30, 3, False),    # m < N
                                                   (40, 90, 3, False),    # m > N
                                                   (60, 60, 4, True)])    # multi-label
@pytest.mark.parametrize("mu", [1e-3, 0.3, 2.0, 1e4])
def test_matches_spams_gaussian(N, m, C, multilabel, mu):
    X, L = _gauss(N, m, C, seed=N + m, multilabel=multilabel)
    W = mu_lasso(X, L, mu)
    assert W.shape == (m, C) and W.dtype == np.float64
    f, f_ref = _assert_matches(X, L, W, _spams(X, L, mu), mu)
    if mu < 10:   # constraint active, optimum well away from 0: both solvers agree both ways
        np.testing.assert_allclose(f, f_ref, rtol=1e-9)


@pytest.mark.parametrize("precision", ["single", "double"])
@pytest.mark.parametrize("N, m", [(150, 60), (50, 120)])
@pytest.mark.parametrize("mu", [0.05, 1.0, 5.0, 1e3])
def test_matches_spams_responses(N, m, mu, precision):
    X, L = _responses(N, m, 4, seed=m)
    W = mu_lasso(X, L, mu, precision=precision)
    _assert_matches(X, L, W, _spams(X, L, mu), mu)
    assert np.abs(W).sum(0).max() <= mu


def test_constraint_inactive_is_least_squares():
    X, L = _gauss(100, 20, 2, seed=3)
    W_ls = np.linalg.lstsq(X, L, rcond=None)[0]
    mu = 10 * np.abs(W_ls).sum(0).max()
    W = mu_lasso(X, L, mu, precision="double")
    np.testing.assert_allclose(W, W_ls, atol=1e-9)
    path = lasso_path(X=X, L=L, mu_max=mu, precision="double")
    assert path.status == ["end", "end"]
    assert not path.constraint_active(mu).any()
    assert path.constraint_active(0.5 * np.abs(W_ls).sum(0).min()).all()


def test_m_greater_than_n_interpolates_for_large_mu():
    X, L = _gauss(25, 70, 2, seed=4)
    W = mu_lasso(X, L, 1e6, precision="double")
    assert np.all(_obj(X, L, W) < 1e-12)
    assert np.all((W != 0).sum(0) <= 25)      # a basic solution: at most N non-zeros


def test_tiny_mu_selects_the_most_correlated_feature():
    X, L = _gauss(50, 30, 3, seed=5)
    mu = 1e-7
    W = mu_lasso(X, L, mu, precision="double")
    q = X.T @ L
    for j in range(3):
        i = np.argmax(np.abs(q[:, j]))
        assert np.flatnonzero(W[:, j]).tolist() == [i]
        assert W[i, j] == pytest.approx(np.sign(q[i, j]) * mu, rel=1e-11)


def test_duplicated_and_zero_columns():
    X, L = _gauss(60, 25, 3, seed=6)
    Xd = np.hstack([X, X[:, [2, 7, 7]], np.zeros((60, 2))])   # duplicates of 2 and 7, two zero columns
    for mu in (0.2, 1.0, 50.0):
        W = mu_lasso(Xd, L, mu)
        assert np.all(W[-2:] == 0)
        assert np.abs(W).sum(0).max() <= mu
        # duplicating a column does not change the optimum: SPAMS on the de-duplicated design
        _assert_matches(Xd, L, W, np.vstack([_spams(X, L, mu), np.zeros((5, 3))]), mu)
        # and never worse than SPAMS on the degenerate design itself
        assert np.all(_obj(Xd, L, W) <= _obj(Xd, L, _spams(Xd, L, mu)) * (1 + 1e-6))


# ---------------------------------------------------------------------------- the path
def test_path_equals_direct_solves_and_spams():
    X, L = _responses(120, 50, 3, seed=7)
    G, XtL = X.T @ X, X.T @ L
    path = lasso_path(G, XtL, mu_max=8.0)
    assert isinstance(path, LassoPath) and path.n_features == 50 and path.n_classes == 3
    for mu in (0.01, 0.37, 1.0, 2.5, 8.0):
        W = path.coef(mu)
        np.testing.assert_allclose(W, mu_lasso_gram(G, XtL, mu), atol=1e-10)
        _assert_matches(X, L, W, _spams(X, L, mu), mu)
    # a path cut at mu gives exactly the direct solve (which keeps only the end of each path)
    np.testing.assert_array_equal(lasso_path(G, XtL, mu_max=2.5).coef(2.5), mu_lasso_gram(G, XtL, 2.5))
    # beyond mu_max the path cannot answer (it was cut there)
    if "mu_max" in path.status:
        with pytest.raises(ValueError, match="mu"):
            path.coef(9.0)


def test_path_breakpoints_satisfy_kkt_and_are_monotone():
    X, L = _gauss(70, 40, 2, seed=8)
    G, XtL = X.T @ X, X.T @ L
    path = lasso_path(G, XtL)              # the whole path
    assert path.status == ["end", "end"]
    for j in range(2):
        mus, lams, Wj = path.breakpoints(j)
        assert mus[0] == 0 and np.all(np.diff(mus) >= 0)
        assert np.all(np.diff(lams) <= 0) and lams[-1] == 0
        for t in range(0, len(mus), 5):
            _kkt(G, XtL[:, j], Wj[t].toarray().ravel(), lams[t])
    rng = np.random.default_rng(0)
    for mu in rng.uniform(0.01, path.mu_end.min(), 5):
        W, lam = path.coef(mu), path.lambda_at(mu)
        for j in range(2):
            _kkt(G, XtL[:, j], W[:, j], lam[j])
            assert mu * (1 - 1e-11) <= np.abs(W[:, j]).sum() <= mu
    # past the end of the path: the last (least-squares) solution
    W_end = path.coef(path.mu_end.max() * 3)
    np.testing.assert_allclose(W_end, np.linalg.lstsq(X, L, rcond=None)[0], atol=1e-9)


def test_path_coef_per_class_mu_and_sparse_storage():
    X, L = _responses(100, 40, 4, seed=9)
    path = lasso_path(X=X, L=L, mu_max=3.0)
    mus = np.array([0.5, 1.0, 2.0, 3.0])
    W = path.coef(mus)
    for j, mu in enumerate(mus):
        np.testing.assert_array_equal(W[:, j], path.coef(mu)[:, j])
    assert path.values.shape[0] <= path.n_breakpoints.sum() * 40  # sparse breakpoints
    with pytest.raises(ValueError, match="mu"):
        path.coef(np.array([1.0, 2.0]))


def test_path_save_load_roundtrip(tmp_path):
    X, L = _gauss(60, 30, 3, seed=10)
    path = lasso_path(X=X, L=L, mu_max=2.0)
    file = tmp_path / "sub" / "path.npz"
    assert path.save(file) == file
    assert sorted(os.listdir(file.parent)) == ["path.npz"]     # no temporary left behind
    back = LassoPath.load(file)
    for mu in (0.1, 1.0, 2.0):
        np.testing.assert_array_equal(back.coef(mu), path.coef(mu))
    assert back.status == path.status and back.mu_max == 2.0
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError):
        LassoPath.load(bad)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="lasso path"):
        LassoPath.load(tmp_path / "other.npz")


# ---------------------------------------------------------------------------- entry points agree
def test_gram_entry_point_equals_x_entry_point():
    X, L = _responses(90, 35, 3, seed=11)
    for mu in (0.2, 2.0):
        W_x = mu_lasso(X, L, mu, precision="double")
        W_g = mu_lasso_gram(X.T @ X, X.T @ L, mu, LtL=L.T @ L)
        np.testing.assert_allclose(W_x, W_g, atol=1e-12)
        W_s = mu_lasso(X, L, mu)                     # float32 products for XᵀX
        f_s, f_d = _obj(X, L, W_s), _obj(X, L, W_x)
        np.testing.assert_allclose(f_s, f_d, rtol=1e-8)
    G, XtL, LtL = gram_statistics(X, L, precision="double")
    np.testing.assert_allclose(G, X.T @ X, rtol=1e-12)
    np.testing.assert_allclose(XtL, X.T @ L, rtol=1e-12)
    np.testing.assert_array_equal(LtL, L.sum(0))
    G32, XtL32, _ = gram_statistics(X, L, chunk_rows=16, precision="single")
    np.testing.assert_allclose(G32, X.T @ X, rtol=1e-5)
    np.testing.assert_allclose(XtL32, X.T @ L, rtol=1e-12)
    G1, _, _ = gram_statistics(X, L, precision="single")          # one float32 block
    np.testing.assert_allclose(G1, X.T @ X, rtol=1e-5)
    np.testing.assert_array_equal(G1, G1.T)


def test_integer_labels_equal_one_hot():
    X, L = _gauss(50, 20, 4, seed=12)
    y = L.argmax(1)
    np.testing.assert_array_equal(mu_lasso(X, y, 1.0, n_classes=4), mu_lasso(X, L, 1.0))
    with pytest.warns(RuntimeWarning) as rec:
        W = mu_lasso(X, y, 1.0, n_classes=6)                  # classes 4, 5 have no example
    assert sorted(str(r.message)[:7] for r in rec) == ["class 4", "class 5"]
    assert W.shape == (20, 6) and np.all(W[:, 4:] == 0)


def test_max_iter_warns_and_returns_a_feasible_iterate():
    X, L = _gauss(60, 30, 2, seed=16)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        W = mu_lasso(X, L, 5.0, max_iter=3)
    assert np.all((W != 0).sum(0) <= 3) and np.abs(W).sum(0).max() <= 5.0
    assert np.all(_obj(X, L, W) < (L * L).sum(0))          # it did make progress


def test_single_thread_equals_threads():
    X, L = _gauss(60, 30, 5, seed=13)
    np.testing.assert_array_equal(mu_lasso(X, L, 1.0, n_jobs=1), mu_lasso(X, L, 1.0, n_jobs=2))


# ---------------------------------------------------------------------------- estimator
def test_estimator():
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError

    X, L = _responses(80, 30, 3, seed=14)
    est = MuLasso(mu=1.5)
    with pytest.raises(NotFittedError):
        est.predict(X)
    assert est.fit(X, L) is est
    np.testing.assert_array_equal(est.coef_, mu_lasso(X, L, 1.5).T)   # scikit-learn: (n_classes, n_features)
    assert est.n_features_in_ == 30 and est.n_classes_ == 3
    np.testing.assert_allclose(est.predict(X), X @ est.coef_.T)
    np.testing.assert_allclose(est.objective_, lasso_objective(X, L, est.coef_.T), rtol=1e-6)
    np.testing.assert_allclose(est.path_.coef(0.5), mu_lasso(X, L, 0.5), atol=1e-12)
    g = clone(est).set_params(mu=0.7).fit_gram(X.T @ X, X.T @ L, L.T @ L)
    np.testing.assert_allclose(g.coef_.T, mu_lasso_gram(X.T @ X, X.T @ L, 0.7), atol=0)
    np.testing.assert_allclose(g.objective_, lasso_objective(X, L, g.coef_.T), rtol=1e-9)
    assert g.get_params()["mu"] == 0.7
    assert MuLasso(mu=0.7).fit_gram(X.T @ X, X.T @ L).objective_ is None
    with pytest.raises(ValueError, match="features"):
        est.predict(X[:, :10])


def test_estimator_passes_scikit_learns_checks():
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(MuLasso(mu=1.0, progress=False), on_fail=None)
    failed = [f"{r['check_name']}: {r['exception']}" for r in results if r["status"] == "failed"]
    assert len(results) > 30 and failed == []


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("mu", [0, -1.0, np.nan, np.inf])
def test_bad_mu(mu):
    X, L = _gauss(20, 5, 2)
    with pytest.raises(ValueError, match="mu"):
        mu_lasso(X, L, mu)
    with pytest.raises(ValueError, match="mu"):
        mu_lasso_gram(X.T @ X, X.T @ L, mu)
    with pytest.raises(ValueError, match="mu"):
        MuLasso(mu=mu).fit(X, L)
    with pytest.raises(ValueError, match="mu"):
        lasso_path(X=X, L=L, mu_max=1.0).coef(mu)
    with pytest.raises(TypeError, match="mu"):
        mu_lasso(X, L, "10")


def test_nonfinite_x_names_the_column():
    X, L = _gauss(20, 6, 2)
    X[3, 4] = np.nan
    with pytest.raises(ValueError, match="column 4"):
        mu_lasso(X, L, 1.0)
    X[3, 4] = np.inf
    with pytest.raises(ValueError, match="column 4"):
        mu_lasso(X, L, 1.0, precision="double")
    cols = pd.DataFrame({"layer": ["conv1"] * 3 + ["fc6"] * 3, "channel": [0, 1, 2, 0, 1, 2]})
    with pytest.raises(ValueError, match=r"layer 'fc6', channel 1"):
        mu_lasso(X, L, 1.0, column_names=cols)
    with pytest.raises(ValueError, match="conv2/7"):
        mu_lasso(X, L, 1.0, column_names=[f"conv2/{i + 3}" for i in range(6)])
    X = np.ones((20, 6))
    X[0, 2] = 1e30                         # finite, but its square overflows float32
    with pytest.raises(ValueError, match="column 2.*overflows"):
        mu_lasso(X, L, 1.0, precision="single")


def test_row_mismatch_names_both_shapes():
    X, L = _gauss(20, 6, 2)
    with pytest.raises(ValueError, match=r"\(20, 6\).*\(19, 2\)"):
        mu_lasso(X, L[:19], 1.0)
    with pytest.raises(ValueError, match=r"\(20, 6\).*\(19, 3\)"):
        mu_lasso(X, np.arange(19) % 3, 1.0)


@pytest.mark.parametrize("bad", [2.0, -1.0, 0.5, np.nan])
def test_labels_not_binary(bad):
    X, L = _gauss(20, 6, 2)
    L[5, 1] = bad
    with pytest.raises(ValueError, match="L"):
        mu_lasso(X, L, 1.0)


def test_other_bad_inputs():
    X, L = _gauss(20, 6, 2)
    with pytest.raises(ValueError, match="L"):
        mu_lasso(X, np.full(20, 0.5), 1.0)               # 1-D, not class indices
    with pytest.raises(ValueError, match="n_classes"):
        mu_lasso(X, np.arange(20) % 3, 1.0, n_classes=2)
    with pytest.raises(ValueError, match="X"):
        mu_lasso(X[:, 0], L, 1.0)
    with pytest.raises(TypeError, match="X"):
        mu_lasso(X.astype(str), L, 1.0)
    with pytest.raises(ValueError, match="precision"):
        mu_lasso(X, L, 1.0, precision="half")
    with pytest.raises(ValueError, match="max_iter"):
        mu_lasso(X, L, 1.0, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        mu_lasso(X, L, 1.0, tol=2.0)
    with pytest.raises(ValueError, match="column_names"):
        mu_lasso(X, L, 1.0, column_names=["a"])
    with pytest.raises(ValueError, match="not both"):
        lasso_path(X.T @ X, X.T @ L, X=X, L=L)
    with pytest.raises(ValueError, match="n_jobs"):
        mu_lasso(X, L, 1.0, n_jobs=0)


def test_class_without_positive_warns_and_is_zero():
    X, L = _gauss(40, 10, 3, seed=15)
    L[:, 2] = 0
    with pytest.warns(RuntimeWarning, match="class 2"):
        W = mu_lasso(X, L, 1.0)
    assert np.all(W[:, 2] == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(W[:, :2], mu_lasso(X, L[:, :2], 1.0))
    with pytest.warns(RuntimeWarning, match="class 2 has no positive"):
        mu_lasso_gram(X.T @ X, X.T @ L, 1.0, LtL=L.T @ L)
    with pytest.warns(RuntimeWarning, match="class 2"):
        mu_lasso_gram(X.T @ X, X.T @ L, 1.0)


def test_bad_gram():
    X, L = _gauss(30, 8, 2)
    G, XtL = X.T @ X, X.T @ L
    with pytest.raises(ValueError, match="G.*square"):
        mu_lasso_gram(G[:, :7], XtL, 1.0)
    with pytest.raises(ValueError, match="G.*square"):
        mu_lasso_gram(G[0], XtL, 1.0)
    Ga = G.copy()
    Ga[1, 5] += 1e-3
    with pytest.raises(ValueError, match="G.*symmetric"):
        mu_lasso_gram(Ga, XtL, 1.0)
    with pytest.raises(ValueError, match="XtL"):
        mu_lasso_gram(G, XtL[:7], 1.0)
    with pytest.raises(ValueError, match="XtL"):
        mu_lasso_gram(G, XtL.T, 1.0)
    Gn = G.copy()
    Gn[3, 3] = np.nan
    with pytest.raises(ValueError, match="G"):
        mu_lasso_gram(Gn, XtL, 1.0)
    with pytest.raises(ValueError, match="LtL"):
        mu_lasso_gram(G, XtL, 1.0, LtL=np.ones(5))
    with pytest.raises(ValueError, match="give G"):
        lasso_path(G)


# ---------------------------------------------------------------------------- rows of G on demand
def _paths_equal(p, q, mus, atol):
    for mu in mus:
        np.testing.assert_allclose(p.coef(mu), q.coef(mu), rtol=0, atol=atol)
    assert p.status == q.status


@pytest.mark.parametrize("prefetch", [16, 0])
@pytest.mark.parametrize("precision, atol", [("double", 1e-11), ("single", 1e-6)])
def test_rows_on_demand_equal_the_full_gram(precision, atol, prefetch, monkeypatch):
    """gram="rows" (only the rows the homotopies visit) walks the same paths as all of XᵀX."""
    import vxnb.lasso as la

    monkeypatch.setattr(la, "_ROWS_PREFETCH", prefetch)   # 0: one pass per missing row
    X, L = _responses(400, 600, 8, seed=11)
    rows = lasso_path(X=X, L=L, mu_max=2.0, precision=precision, gram="rows")
    full = lasso_path(X=X, L=L, mu_max=2.0, precision=precision, gram="full")
    assert rows.gram_info["gram"] == "rows" and full.gram_info == {"gram": "full"}
    # fewer rows than a quarter of m were formed, and every row a path holds at any
    # breakpoint is among them (the homotopy reads no other)
    visited = np.unique(rows.indices)
    assert visited.size <= rows.gram_info["rows"] < 0.25 * 600
    assert rows.gram_info["passes"] >= (1 if prefetch else visited.size // 8)
    _paths_equal(rows, full, (0.05, 0.5, 1.0, 2.0), atol)
    W = rows.coef(2.0)
    f_ref = _obj(X, L, _spams(X, L, 2.0))
    assert np.all(_obj(X, L, W) <= f_ref * (1 + 1e-9))
    np.testing.assert_allclose(mu_lasso(X, L, 2.0, precision=precision, gram="rows"), W, atol=atol)


def test_rows_on_demand_degenerate_design_and_empty_class():
    X, L = _gauss(60, 25, 3, seed=6)
    Xd = np.hstack([X, X[:, [2, 7, 7]], np.zeros((60, 2))])   # duplicates and zero columns
    Ld = np.hstack([L, np.zeros((60, 1))])                       # a class without positives
    with pytest.warns(RuntimeWarning, match="positive"):
        rows = lasso_path(X=Xd, L=Ld, mu_max=50.0, precision="double", gram="rows")
    with pytest.warns(RuntimeWarning, match="positive"):
        full = lasso_path(X=Xd, L=Ld, mu_max=50.0, precision="double", gram="full")
    for mu in (0.2, 1.0, 50.0):
        Wr, Wf = rows.coef(mu), full.coef(mu)
        # rounding may pick the other copy of a duplicated column: fold the copies together
        fold = lambda W: np.vstack([W[:2], W[2] + W[25], W[3:7], W[7] + W[26] + W[27], W[8:25]])  # noqa: E731
        np.testing.assert_allclose(fold(Wr), fold(Wf), atol=1e-9)
        np.testing.assert_allclose(_obj(Xd, Ld, Wr), _obj(Xd, Ld, Wf), rtol=1e-10)
        assert np.all(Wr[-2:] == 0) and np.all(Wr[:, 3] == 0)
    assert rows.status == full.status and rows.status[3] == "zero"


def test_rows_on_demand_fall_back_to_the_full_gram(monkeypatch):
    """Past _ROWS_MAX_SHARE·m rows all of XᵀX is formed (one syrk) and the paths go on."""
    import vxnb._gram
    import vxnb.lasso as la

    X, L = _responses(300, 500, 6, seed=12)
    full = lasso_path(X=X, L=L, mu_max=4.0, gram="full", precision="double")
    monkeypatch.setattr(vxnb._gram, "_ROWS_MAX_SHARE", 0.02)
    rows = lasso_path(X=X, L=L, mu_max=4.0, gram="rows", precision="double")
    assert rows.gram_info["gram"] == "full" and rows.gram_info["passes"] >= 2
    _paths_equal(rows, full, (0.1, 1.0, 4.0), 1e-10)
    # X too large to copy: converted block by block on every pass, same paths
    monkeypatch.setattr(vxnb._gram, "_ROWS_MAX_SHARE", 0.25)
    monkeypatch.setattr(vxnb._gram, "_ROWS_COPY_BYTES", 0)
    monkeypatch.setattr(la, "_ROWS_WAVE", 2)     # classes in waves of two share the rows formed
    uncopied = lasso_path(X=X, L=L, mu_max=4.0, gram="rows", precision="double")
    assert uncopied.gram_info["gram"] == "rows"
    _paths_equal(uncopied, full, (0.1, 1.0, 4.0), 1e-10)


def test_rows_on_demand_estimator_objective_and_auto_rule():
    X, L = _responses(300, 600, 4, seed=13)
    est = MuLasso(mu=2.0, gram="rows").fit(X, L)
    assert est.path_.gram_info["gram"] == "rows"
    np.testing.assert_allclose(est.objective_, lasso_objective(X, L, est.coef_.T), rtol=1e-6)
    # "auto" forms rows only where XᵀX dominates: N·m² > 2e9
    assert lasso_path(X=X, L=L, mu_max=1.0).gram_info == {"gram": "full"}


def test_rows_on_demand_bad_inputs():
    X, L = _gauss(20, 6, 2)
    with pytest.raises(ValueError, match="gram: expected 'auto', 'full' or 'rows', got 'fast'"):
        mu_lasso(X, L, 1.0, gram="fast")
    with pytest.raises(ValueError, match="gram: expected"):
        lasso_path(X.T @ X, X.T @ L, mu_max=1.0, gram=None)
    X[3, 4] = np.nan
    with pytest.raises(ValueError, match="column 4"):
        mu_lasso(X, L, 1.0, gram="rows")
    X = np.ones((20, 6))
    X[0, 2] = 1e30                         # finite, but its square overflows float32
    with pytest.raises(ValueError, match="column 2.*overflows"):
        mu_lasso(X, L, 1.0, precision="single", gram="rows")
