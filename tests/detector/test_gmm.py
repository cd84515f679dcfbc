"""Our mixture arithmetic against scikit-learn, the closed-form init, and AIC model selection."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from detector.gmm import Mixture, fit_mixture, neuron_init, select_mixture, select_mixture_scored


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_score_samples_matches_sklearn(rng, cov):
    X = rng.normal(size=(300, 5)) + rng.integers(0, 3, size=(300, 1)) * 4.0
    gm = GaussianMixture(3, covariance_type=cov, random_state=0).fit(X)
    ours = Mixture(gm.weights_, gm.means_, gm.precisions_cholesky_, cov)
    np.testing.assert_allclose(ours.score_samples(X), gm.score_samples(X), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ours.aic(X), gm.aic(X), rtol=1e-10)
    np.testing.assert_allclose(ours.bic(X), gm.bic(X), rtol=1e-10)
    # chunked evaluation over components gives the same numbers
    np.testing.assert_allclose(ours.score_samples(X, chunk_bytes=1), gm.score_samples(X), rtol=1e-10)


def _neurons(rng, M=15, n=6, d=4, spread=5.0, noise=0.3):
    centres = rng.normal(0, spread, (n, d))
    return centres[None] + rng.normal(0, noise, (M, n, d))


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_neuron_init_is_the_per_index_mean_and_an_em_fixed_point(rng, cov):
    groups = _neurons(rng)
    init = neuron_init(groups, cov, reg=1e-6)
    np.testing.assert_allclose(init.means, groups.mean(axis=0))
    X = groups.reshape(-1, groups.shape[2])
    fitted = fit_mixture(X, groups.shape[1], covariance=cov, reg=1e-6, init=init)
    assert fitted.n_iter <= 2  # EM has nothing left to do from the closed form
    np.testing.assert_allclose(fitted.score_samples(X).sum(), init.score_samples(X).sum(), rtol=1e-6)


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_aic_picks_the_planted_one_cluster_per_neuron(rng, cov):
    groups = _neurons(rng, M=20, n=6, d=3)
    X = groups.reshape(-1, 3)
    # reg as ViewReference sets it: relative to the data's variance (an absolute 1e-6 lets
    # k-means components collapse onto single points, which AIC then rewards)
    best, table = select_mixture(X, groups, [1, 2, 3, 6, 12, 24], covariance=cov, reg=1e-3 * X.var(0).mean())
    assert best.n_components == 6, [(r.n_components, round(r.aic)) for r in table]
    assert [r.init for r in table if r.n_components == 6] == ["neuron"]


def test_the_scores_kept_beside_the_choice_are_the_chosen_mixtures(rng):
    """A reference keeps the criterion's per-vector scores instead of scoring again: they must be
    the chosen mixture's, not the last one fitted (planted: 6 clusters, the grid goes past it)."""
    groups = _neurons(rng, M=20, n=6, d=3)
    X = groups.reshape(-1, 3)
    best, table, scores = select_mixture_scored(X, groups, [1, 6, 12], covariance="diag", reg=1e-3 * X.var(0).mean())
    assert best.n_components == 6 != table[-1].n_components
    np.testing.assert_array_equal(scores, best.score_samples(X))
    assert sum(scores) == pytest.approx(next(r.log_likelihood for r in table if r.n_components == 6), rel=1e-12)


def test_aic_picks_planted_clusters_shared_by_neurons(rng):
    # 12 neurons, but only 3 distinct places: neuron k sits at centre k % 3.
    centres = rng.normal(0, 6.0, (3, 3))
    groups = centres[np.arange(12) % 3][None] + rng.normal(0, 0.3, (20, 12, 3))
    X = groups.reshape(-1, 3)
    best, table = select_mixture(X, groups, [1, 2, 3, 5, 12], covariance="full", reg=1e-3 * X.var(0).mean())
    assert best.n_components == 3, [(r.n_components, round(r.aic)) for r in table]


def test_bic_penalises_more_than_aic(rng):
    groups = _neurons(rng, M=20, n=6, d=3)
    _, table = select_mixture(groups.reshape(-1, 3), groups, [1, 6], reg=1e-6)
    for r in table:
        assert r.bic > r.aic
