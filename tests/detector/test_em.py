"""Our EM (detector.em) against scikit-learn's GaussianMixture: same start, same answer.

Small problems only (fast with one thread): the paper-scale
comparison is `backdoor-gate bench`, never a timed test.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from detector import em
from detector.gmm import Mixture, _to_sklearn_precisions, fit_mixture, neuron_init, select_mixture

RTOL = 1e-9  # agreement to rounding: the pruned E-step drops < 1e-21 of any point's density


def _neurons(rng, M=12, n=40, d=5, spread=4.0, noise=0.3):
    """M 'networks' of n 'neurons' each: neuron i sits near the same centre in every network."""
    centres = rng.normal(0, spread, (n, d))
    groups = centres[None] + rng.normal(0, noise, (M, n, d)) * rng.uniform(0.5, 1.5, (1, n, d))
    return groups, groups.reshape(M * n, d)


def _sklearn(X, k, cov, reg, max_iter, tol=1e-3, init: Mixture | None = None, seed=0) -> GaussianMixture:
    kw = {}
    if init is not None:
        kw = dict(weights_init=init.weights, means_init=init.means, precisions_init=_to_sklearn_precisions(init))
    gm = GaussianMixture(k, covariance_type=cov, reg_covar=reg, max_iter=max_iter, tol=tol, random_state=seed, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return gm.fit(X)


def _assert_same(ours: Mixture, gm: GaussianMixture, X, rtol=RTOL):
    assert ours.n_iter == gm.n_iter_
    assert ours.converged == gm.converged_
    ll_ours = ours.score_samples(X, method="dense").sum()
    ll_sk = gm.score_samples(X).sum()
    np.testing.assert_allclose(ll_ours, ll_sk, rtol=rtol)
    np.testing.assert_allclose(ours.weights, gm.weights_, rtol=rtol, atol=1e-15)
    scale = np.abs(X).max()
    np.testing.assert_allclose(ours.means, gm.means_, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(ours.precisions_cholesky, gm.precisions_cholesky_, rtol=1e3 * rtol, atol=1e-9)


# -- same init, same iterations ---------------------------------------------------------------
@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("max_iter", [1, 3])
def test_from_the_same_init_and_iterations_we_match_sklearn(rng, cov, max_iter):
    groups, X = _neurons(rng)
    reg = 1e-3 * X.var(0).mean()
    init = neuron_init(groups, cov, reg)
    # perturb the closed form so the iterations have real work to do
    init = Mixture(init.weights, init.means + rng.normal(0, 0.2, init.means.shape), init.precisions_cholesky, cov)
    stats: dict = {}
    ours = em.fit(X, 40, covariance=cov, reg=reg, max_iter=max_iter, tol=0.0, init=init, stats=stats)
    _assert_same(ours, _sklearn(X, 40, cov, reg, max_iter, tol=0.0, init=init), X)
    # 40 components > the dense cut-off: the bound ran and skipped most (point, component) pairs
    assert 40 > em.DENSE_MAX_COMPONENTS
    assert stats["columns_per_point"][0] < 40


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_to_convergence_with_tol_we_stop_at_the_same_iteration(rng, cov):
    groups, X = _neurons(rng, n=36)
    reg = 1e-3 * X.var(0).mean()
    init = neuron_init(groups, cov, reg)
    init = Mixture(init.weights, init.means + rng.normal(0, 0.3, init.means.shape), init.precisions_cholesky, cov)
    ours = em.fit(X, 36, covariance=cov, reg=reg, max_iter=100, tol=1e-6, init=init)
    gm = _sklearn(X, 36, cov, reg, 100, tol=1e-6, init=init)
    assert ours.converged and ours.n_iter > 2
    _assert_same(ours, gm, X)


@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("k", [3, 50])
def test_kmeans_init_is_sklearns_default(rng, cov, k):
    _, X = _neurons(rng, M=10, n=25, d=4)
    reg = 1e-3 * X.var(0).mean()
    ours = em.fit(X, k, covariance=cov, reg=reg, max_iter=100, seed=3)
    _assert_same(ours, _sklearn(X, k, cov, reg, 100, seed=3), X, rtol=1e-7)


def test_the_hint_only_changes_speed(rng):
    groups, X = _neurons(rng)
    reg = 1e-3 * X.var(0).mean()
    init = neuron_init(groups, "diag", reg)
    right = np.tile(np.arange(40), 12)
    wrong = rng.integers(0, 40, len(X))
    a = em.fit(X, 40, covariance="diag", reg=reg, init=init, hint=right, max_iter=3, tol=0.0)
    b = em.fit(X, 40, covariance="diag", reg=reg, init=init, hint=wrong, max_iter=3, tol=0.0)
    c = em.fit(X, 40, covariance="diag", reg=reg, init=init, max_iter=3, tol=0.0)
    for m in (b, c):
        np.testing.assert_allclose(m.means, a.means, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m.precisions_cholesky, a.precisions_cholesky, rtol=1e-10)


def test_a_component_far_from_every_point_follows_sklearn(rng):
    """Responsibilities of exp(-60..-700): all pruned by the bound, recomputed densely."""
    groups, X = _neurons(rng)
    reg = 1e-3 * X.var(0).mean()
    init = neuron_init(groups, "diag", reg)
    means = init.means.copy()
    means[7] = X.max(0) + 8.0  # a component nobody belongs to
    P = init.precisions_cholesky.copy()
    P[7] = 0.5
    init = Mixture(init.weights, means, P, "diag")
    stats: dict = {}
    ours = em.fit(X, 40, covariance="diag", reg=reg, max_iter=2, tol=0.0, init=init, stats=stats)
    gm = _sklearn(X, 40, "diag", reg, 2, tol=0.0, init=init)
    _assert_same(ours, gm, X)
    assert 0 < gm.weights_[7] < 1e-12  # (nearly) dead, not underflowed to nothing
    assert stats["weak_components"][0] == 1


def test_float32_densities_stay_close(rng):
    groups, X = _neurons(rng)
    reg = 1e-3 * X.var(0).mean()
    init = neuron_init(groups, "diag", reg)
    a = em.fit(X, 40, covariance="diag", reg=reg, init=init, max_iter=3, tol=0.0)
    b = em.fit(X, 40, covariance="diag", reg=reg, init=init, max_iter=3, tol=0.0, dtype="float32")
    np.testing.assert_allclose(b.score_samples(X).sum(), a.score_samples(X).sum(), rtol=1e-5)


def test_max_iter_zero_returns_the_init(rng):
    groups, X = _neurons(rng, n=10)
    init = neuron_init(groups, "diag", 1e-3)
    out = em.fit(X, 10, covariance="diag", reg=1e-3, init=init, max_iter=0)
    np.testing.assert_array_equal(out.means, init.means)


# -- evaluation ----------------------------------------------------------------------------
@pytest.mark.parametrize("cov", ["diag", "full"])
def test_pruned_scores_equal_dense_scores(rng, cov):
    groups, X = _neurons(rng, n=60)
    init = neuron_init(groups, cov, 1e-3 * X.var(0).mean())
    dense = init.score_samples(X, method="dense")
    np.testing.assert_allclose(em.score_samples(init, X), dense, rtol=1e-11)
    np.testing.assert_allclose(init.score_samples(X, method="pruned"), dense, rtol=1e-11)
    # far-away points: nothing is close, yet every density is right
    far = X[:50] + 30.0
    np.testing.assert_allclose(em.score_samples(init, far), init.score_samples(far, method="dense"), rtol=1e-11)


# -- degenerate inputs -------------------------------------------------------------------------
def test_fewer_vectors_than_components_is_a_clear_error(rng):
    X = rng.normal(size=(5, 3))
    with pytest.raises(ValueError, match="cannot fit 6 Gaussian components to 5 vectors"):
        em.fit(X, 6)
    with pytest.raises(ValueError, match="at least 2 vectors"):
        em.fit(X[:1], 1)


def test_bad_inputs_are_clear_errors(rng):
    X = rng.normal(size=(50, 3))
    with pytest.raises(ValueError, match="NaN"):
        em.fit(np.where(np.eye(50, 3) > 0, np.nan, X), 2)
    with pytest.raises(ValueError, match="2-D"):
        em.fit(X[:, 0], 2)
    init = neuron_init(X.reshape(10, 5, 3), "diag", 1e-3)
    with pytest.raises(ValueError, match="init means have shape"):
        em.fit(X, 4, covariance="diag", init=init)
    with pytest.raises(ValueError, match="init is a 'diag' mixture"):
        em.fit(X, 5, covariance="full", init=init)
    with pytest.raises(ValueError, match="hint"):
        em.fit(X, 5, covariance="diag", init=init, hint=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="dtype"):
        em.fit(X, 2, dtype="float16")


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_constant_columns_are_held_by_reg(rng, cov):
    groups, X = _neurons(rng, n=36, d=4)
    X = np.concatenate([X, np.full((len(X), 1), 2.5)], 1)  # one dimension never varies
    ours = em.fit(X, 36, covariance=cov, reg=1e-4, max_iter=5)
    gm = _sklearn(X, 36, cov, 1e-4, 5)
    _assert_same(ours, gm, X, rtol=1e-7)
    assert np.isfinite(ours.score_samples(X)).all()


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_collapsed_component_without_reg_fails_like_sklearn(cov):
    X = np.repeat(np.arange(6.0)[:, None], 10, axis=0) @ np.ones((1, 2))  # 6 points, 10 copies each
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        _sklearn(X, 6, cov, 0.0, 5)
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        em.fit(X, 6, covariance=cov, reg=0.0, max_iter=5)


# -- the gmm module's seams --------------------------------------------------------------------
def test_fit_mixture_backends(rng):
    groups, X = _neurons(rng, n=36)
    reg = 1e-3 * X.var(0).mean()
    init = neuron_init(groups, "diag", reg)
    a = fit_mixture(X, 36, covariance="diag", reg=reg, init=init)  # default: torch
    b = fit_mixture(X, 36, covariance="diag", reg=reg, init=init, backend="sklearn")
    np.testing.assert_allclose(a.means, b.means, rtol=RTOL, atol=1e-12)
    with pytest.raises(ValueError, match="backend"):
        fit_mixture(X, 36, backend="cuda")


def test_select_mixture_keeps_its_behaviour_on_either_backend(rng):
    groups, X = _neurons(rng, M=15, n=36, d=3)
    reg = 1e-3 * X.var(0).mean()
    grid = [1, 5, 36, 60]
    best_t, table_t = select_mixture(X, groups, grid, covariance="diag", reg=reg)
    best_s, table_s = select_mixture(X, groups, grid, covariance="diag", reg=reg, backend="sklearn")
    assert best_t.n_components == best_s.n_components == 36
    assert [r.init for r in table_t] == ["kmeans", "kmeans", "neuron", "kmeans"]
    for rt, rs in zip(table_t, table_s):
        assert rt.n_iter == rs.n_iter
        np.testing.assert_allclose(rt.aic, rs.aic, rtol=1e-9)


def test_threads_are_asked_for_and_given_back():
    """``threads=n`` runs the EM on n threads and restores the caller's count; None keeps it."""
    before = torch.get_num_threads()
    seen = []
    real = torch.set_num_threads
    try:
        torch.set_num_threads = lambda n: (seen.append(n), real(n))[1]
        em.fit(np.random.default_rng(0).normal(size=(40, 2)), 2, threads=2)
        assert seen == [2, before] and torch.get_num_threads() == before
        seen.clear()
        em.fit(np.random.default_rng(0).normal(size=(40, 2)), 2)
        assert seen == [before] and torch.get_num_threads() == before
    finally:
        torch.set_num_threads = real


def test_a_full_init_given_in_any_cholesky_form_is_understood(rng):
    """The bound reads the leading block of an upper-triangular factor: a lower one is converted."""
    groups, X = _neurons(rng, n=36, d=4)
    init = neuron_init(groups, "full", 1e-3)
    lower = np.linalg.cholesky(_to_sklearn_precisions(init))  # L L^T = precision, lower-triangular
    other = Mixture(init.weights, init.means, lower, "full")
    np.testing.assert_allclose(em.score_samples(other, X), init.score_samples(X, method="dense"), rtol=1e-10)
    a = em.fit(X, 36, covariance="full", reg=1e-3, init=init, max_iter=2, tol=0.0)
    b = em.fit(X, 36, covariance="full", reg=1e-3, init=other, max_iter=2, tol=0.0)
    np.testing.assert_allclose(b.means, a.means, rtol=1e-10, atol=1e-12)
