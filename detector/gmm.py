"""Gaussian mixtures: EM fitting, our own log-likelihood, AIC/BIC.

The fitted mixture is kept as plain arrays (:class:`Mixture`) so it can be stored without
pickle and evaluated without scikit-learn internals. :func:`fit_mixture` runs our EM by
default (:mod:`detector.em`: scikit-learn's algorithm with an exact pruned E-step, much faster
at the paper's scale: ``make bench`` prints by how much);
``backend="sklearn"`` runs ``sklearn.mixture.GaussianMixture``, the reference implementation
the tests and the bench compare against.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from detector import em
from detector.em import Mixture

__all__ = ["Mixture", "fit_mixture", "neuron_init", "select_mixture", "select_mixture_scored"]

#: EM implementation used when a caller does not choose: "torch" (detector.em) or "sklearn".
DEFAULT_BACKEND = "torch"
BACKENDS = ("torch", "sklearn")


def neuron_init(groups: np.ndarray, covariance: str, reg: float) -> Mixture:
    """Closed-form mixture with one component per neuron index.

    ``groups`` is (n_networks, n_vectors, d): vector i of every reference network is the
    same neuron, so component i is the mean/covariance of those M vectors. This is what the
    paper's best N_G (= vectors per network) converges to, found without k-means.
    """
    M, k, d = groups.shape
    means = groups.mean(axis=0)
    centred = groups - means[None]
    if covariance == "diag":
        var = (centred**2).mean(axis=0) + reg
        return Mixture(np.full(k, 1.0 / k), means, 1.0 / np.sqrt(var), "diag")
    cov = np.einsum("mkd,mke->kde", centred, centred) / M + reg * np.eye(d)[None]
    return Mixture(np.full(k, 1.0 / k), means, _precisions_cholesky(cov), "full")


def _precisions_cholesky(cov: np.ndarray) -> np.ndarray:
    """Upper-triangular P with P P^T = inv(cov), as scikit-learn stores it (the EM's own routine)."""
    import torch

    return em.precision_cholesky(torch.from_numpy(np.ascontiguousarray(cov, dtype=np.float64)), "full").numpy()


def _to_sklearn_precisions(m: Mixture) -> np.ndarray:
    if m.covariance == "diag":
        return m.precisions_cholesky**2
    return np.einsum("kij,kej->kie", m.precisions_cholesky, m.precisions_cholesky)


def fit_mixture(
    X: np.ndarray,
    n_components: int,
    *,
    covariance: str = "full",
    reg: float = 1e-6,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    init: Mixture | None = None,
    backend: str | None = None,
    hint: np.ndarray | None = None,
) -> Mixture:
    """EM from ``init`` (e.g. :func:`neuron_init`) or from k-means when none is given.

    Both backends run the same algorithm from the same start (scikit-learn's k-means labels
    for ``seed``): ``"torch"`` (default, :func:`detector.em.fit`) and ``"sklearn"``. ``hint``
    (a likely component per row, e.g. the neuron index) only speeds the torch backend up.
    """
    backend = backend or DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return em.fit(
            X, n_components, covariance=covariance, reg=reg, max_iter=max_iter, tol=tol, seed=seed, init=init, hint=hint
        )

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    kwargs = {}
    if init is not None:
        kwargs = dict(
            weights_init=init.weights,
            means_init=init.means,
            precisions_init=_to_sklearn_precisions(init),
            init_params="random_from_data",  # cheap; overridden by the *_init arrays anyway
        )
    gm = GaussianMixture(
        n_components=n_components,
        covariance_type=covariance,
        reg_covar=reg,
        max_iter=max_iter,
        tol=tol,
        random_state=seed,
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(X)
    return Mixture(
        weights=gm.weights_,
        means=gm.means_,
        precisions_cholesky=gm.precisions_cholesky_,
        covariance=covariance,
        n_iter=int(gm.n_iter_),
        converged=bool(gm.converged_),
    )


@dataclass(frozen=True)
class Candidate:
    """One row of the model-selection table."""

    n_components: int
    init: str
    aic: float
    bic: float
    log_likelihood: float
    n_iter: int
    converged: bool
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def select_mixture(
    X: np.ndarray, groups: np.ndarray, grid: list[int], **options: Any
) -> tuple[Mixture, list[Candidate]]:
    """Fit one mixture per N_G in ``grid`` and keep the one with the lowest AIC (or BIC): the
    chosen mixture and the table (``options``: :func:`select_mixture_scored`'s)."""
    best, table, _ = select_mixture_scored(X, groups, grid, **options)
    return best, table


def select_mixture_scored(
    X: np.ndarray,
    groups: np.ndarray,
    grid: list[int],
    *,
    criterion: str = "aic",
    covariance: str = "full",
    reg: float = 1e-6,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    progress: Callable[..., Any] | None = None,
    backend: str | None = None,
) -> tuple[Mixture, list[Candidate], np.ndarray]:
    """(the mixture with the lowest AIC (or BIC) of one per N_G in ``grid``, the table, its
    log-likelihood of each row of ``X``): the criterion needs them, and a reference keeps them
    (a GMM view scored every reference vector twice: once for the criterion, once to keep them).

    N_G equal to the number of vectors per network starts from :func:`neuron_init`; other
    sizes from k-means. Ties go to the smaller mixture.
    """
    n_nets, n_per_net = groups.shape[:2]
    neuron_of_row = np.tile(np.arange(n_per_net), n_nets)  # X is groups.reshape(M * n, d)
    best: tuple[float, int, Mixture, np.ndarray] | None = None
    table: list[Candidate] = []
    for g in grid:
        t0 = time.perf_counter()
        init = neuron_init(groups, covariance, reg) if g == n_per_net else None
        hint = neuron_of_row if init is not None and len(X) == len(neuron_of_row) else None
        m = fit_mixture(
            X,
            g,
            covariance=covariance,
            reg=reg,
            max_iter=max_iter,
            tol=tol,
            seed=seed,
            init=init,
            backend=backend,
            hint=hint,
        )
        per_row = m.score_samples(X)
        ll = float(per_row.sum())
        p = m.n_parameters()
        row = Candidate(
            n_components=g,
            init="neuron" if init is not None else "kmeans",
            aic=-2.0 * ll + 2.0 * p,
            bic=-2.0 * ll + p * float(np.log(len(X))),
            log_likelihood=ll,
            n_iter=m.n_iter,
            converged=m.converged,
            seconds=time.perf_counter() - t0,
        )
        table.append(row)
        value = row.aic if criterion == "aic" else row.bic
        if best is None or value < best[0]:
            best = (value, g, m, per_row)
        if progress is not None:
            progress(row)
    assert best is not None
    return best[2], table, best[3]
