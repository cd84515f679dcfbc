"""The paper's estimator for one view: PCA to a variance target, then a GMM of N_G components
(one per neuron, or chosen by AIC over a grid), fitted on the view's vectors of several clean
networks (scikit-learn style)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone

from detector.config import PAPER_GRID
from detector.gmm import Mixture, select_mixture_scored
from detector.protocol import check_fitted, leave_one_out
from detector.views import view_vectors


class ViewReference(BaseEstimator):
    """PCA + GMM over one view's vectors of several clean networks.

    ``fit`` takes a list of weight matrices (one per network, same shape) and returns self.
    ``n_components``: ``"neurons"`` (one component per neuron, neuron-initialised: the paper's
    best N_G, in seconds instead of the sweep's minutes), ``"auto"`` (the lowest ``criterion``
    over ``grid``) or an int.
    """

    def __init__(
        self,
        view: str = "forward",
        variance: float = 0.95,
        n_components: int | str = "neurons",
        grid: Sequence[int] = PAPER_GRID,
        criterion: str = "aic",
        covariance_type: str = "diag",
        reg_covar: float = 1e-3,
        max_iter: int = 100,
        tol: float = 1e-3,
        random_state: int = 0,
    ):
        self.view = view
        self.variance = variance
        self.n_components = n_components
        self.grid = grid
        self.criterion = criterion
        self.covariance_type = covariance_type
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def _vectors(self, matrices: Sequence[np.ndarray]) -> np.ndarray:
        """(n_networks, n_vectors, dim): vector i of every network is the same neuron."""
        return np.stack([view_vectors(np.asarray(W, dtype=np.float64), self.view) for W in matrices])

    def fit(self, matrices: Sequence[np.ndarray], progress: Callable | None = None) -> ViewReference:
        from sklearn.decomposition import PCA

        shapes = {np.shape(W) for W in matrices}
        if len(matrices) < 2:
            raise ValueError(f"a reference needs at least 2 clean networks, got {len(matrices)}")
        if len(shapes) != 1:
            raise ValueError(f"reference networks disagree on the layer's shape: {sorted(shapes)}")
        t0 = time.perf_counter()
        V = self._vectors(matrices)
        M, n, d = V.shape
        X = V.reshape(M * n, d)
        # with more vectors than dimensions (every view of FaceNet's head) the eigenvectors of the
        # d x d covariance are the SVD's directions (seen: equal to 4e-15) at 3.5-6x less time
        solver = "covariance_eigh" if M * n >= d else "full"
        pca = PCA(n_components=self.variance if self.variance < 1.0 else None, svd_solver=solver)
        pca.fit(X)
        self.pca_mean_ = pca.mean_
        self.pca_components_ = pca.components_
        self.explained_variance_ = float(np.sum(pca.explained_variance_ratio_))
        Z = self._project(X)
        groups = Z.reshape(M, n, -1)
        self.reg_ = float(self.reg_covar * max(Z.var(axis=0).mean(), 1e-300))
        if self.n_components == "auto":
            grid = sorted({int(g) for g in self.grid if int(g) <= len(Z)})
            if not grid:
                raise ValueError(f"no N_G in grid {list(self.grid)} fits {len(Z)} reference vectors")
        elif self.n_components == "neurons":
            grid = [n]
        else:
            grid = [min(int(self.n_components), len(Z))]
        self.mixture_, table, per_vector = select_mixture_scored(
            Z,
            groups,
            grid,
            criterion=self.criterion,
            covariance=self.covariance_type,
            reg=self.reg_,
            max_iter=self.max_iter,
            tol=self.tol,
            seed=self.random_state,
            progress=progress,
        )
        self.selection_ = [row.to_dict() for row in table]
        self.n_components_ = self.mixture_.n_components
        self.n_networks_, self.n_vectors_, self.n_pca_ = M, n, int(Z.shape[1])
        self.shape_ = tuple(int(s) for s in np.shape(matrices[0]))
        #: per-vector log-likelihoods of the reference networks (M, n): what "typical" means
        #: for each neuron, so a report can show which of a candidate's vectors are unusual.
        self.reference_vector_scores_ = per_vector.reshape(M, n)
        self.reference_scores_ = self.reference_vector_scores_.sum(axis=1)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _project(self, X: np.ndarray) -> np.ndarray:
        return (X - self.pca_mean_) @ self.pca_components_.T

    def score_vectors(self, matrix: np.ndarray) -> np.ndarray:
        """Log-likelihood of each of the network's vectors (index = neuron / input feature)."""
        check_fitted(self, "mixture_")
        return self.mixture_.score_samples(self._project(view_vectors(np.asarray(matrix, np.float64), self.view)))

    def score(self, matrix: np.ndarray) -> float:
        """The network's score: the sum of its vectors' log-likelihoods."""
        return float(self.score_vectors(matrix).sum())

    def leave_one_out_vector_scores(
        self, matrices: Sequence[np.ndarray], progress: Callable | None = None
    ) -> np.ndarray:
        """(M, n): each network's vectors scored by a reference fitted on the others (same N_G)."""
        check_fitted(self, "mixture_")
        return leave_one_out(
            matrices, lambda rest: clone(self).set_params(n_components=self.n_components_).fit(rest), progress
        )

    # -- the artifact ----------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        m: Mixture = self.mixture_
        return {
            "pca_mean": self.pca_mean_,
            "pca_components": self.pca_components_,
            "gmm_weights": m.weights,
            "gmm_means": m.means,
            "gmm_precisions_cholesky": m.precisions_cholesky,
            "reference_vector_scores": np.asarray(self.reference_vector_scores_),
        }

    def info(self) -> dict[str, Any]:
        return {
            "n_vectors": self.n_vectors_,
            "vector_dim": int(self.pca_mean_.shape[0]),
            "pca_dims": self.n_pca_,
            "explained_variance": self.explained_variance_,
            "n_components": self.n_components_,
            "covariance": self.mixture_.covariance,
            "reg_covar_absolute": self.reg_,
            "em_iterations": self.mixture_.n_iter,
            "em_converged": self.mixture_.converged,
            "selection": self.selection_,
            "fit_seconds": self.fit_seconds_,
        }

    @classmethod
    def restore(cls, info: Mapping[str, Any], arrays: Mapping[str, np.ndarray], view: str) -> ViewReference:
        """``view``: the artifact names it (the key of ``info``), the estimator does not repeat it."""
        est = cls(view=view, covariance_type=info["covariance"])
        est.pca_mean_ = arrays["pca_mean"]
        est.pca_components_ = arrays["pca_components"]
        est.mixture_ = Mixture(
            weights=arrays["gmm_weights"],
            means=arrays["gmm_means"],
            precisions_cholesky=arrays["gmm_precisions_cholesky"],
            covariance=info["covariance"],
            n_iter=int(info["em_iterations"]),
            converged=bool(info["em_converged"]),
        )
        est.reference_vector_scores_ = arrays["reference_vector_scores"]
        est.reference_scores_ = est.reference_vector_scores_.sum(axis=1)
        est.explained_variance_ = float(info["explained_variance"])
        est.n_components_, est.n_pca_ = int(info["n_components"]), int(info["pca_dims"])
        est.n_vectors_, est.reg_ = int(info["n_vectors"]), float(info["reg_covar_absolute"])
        est.selection_, est.fit_seconds_ = info["selection"], float(info["fit_seconds"])
        # the layer's shape and the reference networks, as fit saw them: (n_networks, n_vectors) scores
        # of vectors of length vector_dim, the columns (forward) or the rows (backward) of the layer
        est.n_networks_ = int(est.reference_vector_scores_.shape[0])
        d = int(est.pca_mean_.shape[0])
        est.shape_ = (d, est.n_vectors_) if view == "forward" else (est.n_vectors_, d)
        return est
