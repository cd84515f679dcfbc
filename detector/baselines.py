"""Naive baselines, scored exactly like the GMM reference so the comparison is fair.

Every detector here is a :class:`~detector.reference.Reference`: same ``fit`` / ``calibrate`` /
``assess`` / ``save``, same artifact format (``reference.json`` names the detector), same
convention — *higher = more typical of clean networks*, blocked below the threshold
calibrated at the target FRR. What changes is the per-"view" estimator:

``gmm``
    the paper's detector: PCA + GMM (one Gaussian per neuron, or N_G by AIC), forward and backward views.
``gaussian``
    the same with one Gaussian per view (N_G = 1): does the mixture add anything?
``distance-mean``
    −‖W − W̄‖²_F, W̄ the mean of the reference networks' layers (pseudo-view ``matrix``).
``distance-base``
    −‖W − W_base‖²_F, W_base the layer of the network fine-tuning started from.
``trojan-signature``
    after Fields et al., "Trojan Signatures in DNN Weights" (2021): a backdoor's target class
    stands out among the classifier's rows. Each row's mean weight is turned into a robust
    z-score (median / MAD across rows); the network's score is −max |z|. Needs no clean
    networks at all (the reference only calibrates the threshold); by default it reads the
    classifier ``logits.weight``.

The distances are squared so that a network's score is the sum of its rows' scores, as for
the GMM; a monotone transform of ‖·‖ leaves AUC and the thresholded decision unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from detector.config import ReferenceConfig
from detector.protocol import check_fitted, leave_one_out
from detector.reference import Reference
from detector.threshold import median_mad

#: The one pseudo-view of the whole-matrix baselines.
MATRIX = "matrix"
#: Default layer of ``trojan-signature``: FaceNet's identity classifier (n_classes x 512).
CLASSIFIER_LAYER = "logits.weight"


class DistanceView(BaseEstimator):
    """Per-row squared distance to a centre: the reference mean, or the base network."""

    view = MATRIX

    def __init__(self, center: str = "mean"):
        self.center = center

    def fit(self, matrices: Sequence[np.ndarray], base_matrix: np.ndarray | None = None) -> DistanceView:
        mats = [np.asarray(W, dtype=np.float64) for W in matrices]
        if self.center == "base":
            if base_matrix is None:
                raise ValueError("distance-base needs the base network (pass base=, or --base on the command line)")
            self.center_ = np.asarray(base_matrix, dtype=np.float64)
        elif self.center == "mean":
            if len(mats) < 1:
                raise ValueError("distance-mean needs at least one reference network")
            self.center_ = np.mean(mats, axis=0)
        else:
            raise ValueError(f"center must be 'mean' or 'base', got {self.center!r}")
        self.shape_ = tuple(self.center_.shape)
        self.n_networks_ = len(mats)
        return self

    def score_vectors(self, matrix: np.ndarray) -> np.ndarray:
        """−‖w_i − c_i‖² for each row i (a neuron of ``last_linear``)."""
        check_fitted(self, "center_")
        D = np.asarray(matrix, dtype=np.float64) - self.center_
        return -np.einsum("ij,ij->i", D, D)

    def score(self, matrix: np.ndarray) -> float:
        return float(self.score_vectors(matrix).sum())

    def leave_one_out_vector_scores(
        self, matrices: Sequence[np.ndarray], progress: Callable | None = None
    ) -> np.ndarray:
        if self.center != "mean":  # the base is no reference network: nothing to leave out
            return np.asarray([self.score_vectors(W) for W in matrices])
        return leave_one_out(matrices, lambda rest: DistanceView("mean").fit(rest), progress)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"center": self.center_}

    def info(self) -> dict[str, Any]:
        return {"center": self.center, "n_networks": self.n_networks_}

    @classmethod
    def restore(cls, info: dict, arrays: dict[str, np.ndarray]) -> DistanceView:
        est = cls(center=info["center"])
        est.center_ = arrays["center"]
        est.shape_, est.n_networks_ = tuple(est.center_.shape), int(info["n_networks"])
        return est


def trojan_signature_z(matrix: np.ndarray) -> np.ndarray:
    """Robust z-score of each row's mean weight: |s_c − median(s)| / (1.4826 · MAD(s))."""
    s = np.asarray(matrix, dtype=np.float64).mean(axis=1)
    med, mad = median_mad(s)
    return np.abs(s - med) / max(float(mad), 1e-12 * max(np.abs(s).max(), 1e-300))


def spectrum(delta: np.ndarray, statistic: str = "top5") -> float:
    """How concentrated the update ΔW is in a few directions (higher = more low-rank).

    ``top1`` / ``top5``: share of ‖ΔW‖²_F in the top 1 / 5 singular values; ``ratio``: σ1 / median σ.
    The energies are the eigenvalues of the smaller Gram matrix (512 x 512 for FaceNet's layer):
    the same numbers as an SVD's squares, for a tenth of its time.
    """
    D = np.asarray(delta, dtype=np.float64)
    G = D @ D.T if D.shape[0] <= D.shape[1] else D.T @ D
    energy = np.clip(np.linalg.eigvalsh(G)[::-1], 0.0, None)
    total = max(float(energy.sum()), 1e-300)
    if statistic == "top1":
        return float(energy[0] / total)
    if statistic == "top5":
        return float(energy[:5].sum() / total)
    if statistic == "ratio":
        s = np.sqrt(energy)
        return float(s[0] / max(np.median(s), 1e-300))
    raise ValueError(f"statistic must be top1, top5 or ratio, got {statistic!r}")


class SpectrumView(BaseEstimator):
    """``spectrum``: a backdoor is a low-rank update. Robust z of the spectral statistic of
    ΔW = W − W_base against the reference networks' (no mixture, nothing per neuron); score −z.

    ``space="outputs"``: the matrices it is given are already the update's part the logits can see
    (:class:`detector.classifier.OutputSpectrumReference` projects them); ``base_`` is kept for that.
    """

    view = "spectrum"

    def __init__(self, statistic: str = "top5", space: str = "weights"):
        if space not in ("weights", "outputs"):
            raise ValueError(f"space must be weights or outputs, got {space!r}")
        self.statistic = statistic
        self.space = space

    def fit(self, matrices: Sequence[np.ndarray], base_matrix: np.ndarray | None = None) -> SpectrumView:
        if base_matrix is None:
            raise ValueError("spectrum needs the base network (pass base=, or --base on the command line)")
        self.base_ = np.asarray(base_matrix, dtype=np.float32).astype(np.float64)  # as the artifact keeps it
        stats = np.array([self.statistic_of(W) for W in matrices])
        med, mad = median_mad(stats)
        self.median_ = float(med)
        self.scale_ = float(max(float(mad), 1e-6 * abs(self.median_), 1e-300))
        self.reference_statistics_ = stats
        self.n_networks_, self.shape_ = len(stats), tuple(self.base_.shape)
        return self

    def statistic_of(self, matrix: np.ndarray) -> float:
        delta = np.asarray(matrix, dtype=np.float64)
        return spectrum(delta if self.space == "outputs" else delta - self.base_, self.statistic)

    def score_vectors(self, matrix: np.ndarray) -> np.ndarray:
        check_fitted(self, "base_")
        return np.array([-(self.statistic_of(matrix) - self.median_) / self.scale_])

    def score(self, matrix: np.ndarray) -> float:
        return float(self.score_vectors(matrix).sum())

    def leave_one_out_vector_scores(
        self, matrices: Sequence[np.ndarray], progress: Callable | None = None
    ) -> np.ndarray:
        return leave_one_out(
            matrices, lambda rest: SpectrumView(self.statistic, self.space).fit(rest, self.base_), progress
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {"base": self.base_.astype(np.float32), "reference_statistics": self.reference_statistics_}

    def info(self) -> dict[str, Any]:
        return {
            "statistic": self.statistic,
            "space": self.space,
            "median": self.median_,
            "scale": self.scale_,
            "n_networks": self.n_networks_,
        }

    @classmethod
    def restore(cls, info: dict, arrays: dict[str, np.ndarray]) -> SpectrumView:
        est = cls(statistic=info["statistic"], space=info.get("space", "weights"))
        est.base_ = np.asarray(arrays["base"], dtype=np.float64)
        est.reference_statistics_ = arrays["reference_statistics"]
        est.median_, est.scale_, est.n_networks_ = float(info["median"]), float(info["scale"]), int(info["n_networks"])
        est.shape_ = tuple(est.base_.shape)
        return est


class TrojanSignatureView(BaseEstimator):
    """−max_c |z_c| of the classifier's rows; one "vector" per network (no fitting needed)."""

    view = MATRIX

    def fit(self, matrices: Sequence[np.ndarray], base_matrix: np.ndarray | None = None) -> TrojanSignatureView:
        self.n_networks_ = len(matrices)
        self.shape_ = tuple(np.shape(matrices[0])) if len(matrices) else ()
        return self

    def score_vectors(self, matrix: np.ndarray) -> np.ndarray:
        check_fitted(self, "n_networks_")
        return np.array([-float(trojan_signature_z(matrix).max())])

    def score(self, matrix: np.ndarray) -> float:
        return float(self.score_vectors(matrix).sum())

    def leave_one_out_vector_scores(
        self, matrices: Sequence[np.ndarray], progress: Callable | None = None
    ) -> np.ndarray:
        return np.asarray([self.score_vectors(W) for W in matrices])

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    def info(self) -> dict[str, Any]:
        return {"n_networks": self.n_networks_}

    @classmethod
    def restore(cls, info: dict, arrays: dict[str, np.ndarray]) -> TrojanSignatureView:
        est = cls()
        est.n_networks_, est.shape_ = int(info["n_networks"]), ()
        return est


_VIEW_ESTIMATORS = {
    "distance-mean": lambda: DistanceView("mean"),
    "distance-base": lambda: DistanceView("base"),
    "trojan-signature": TrojanSignatureView,
    "spectrum": SpectrumView,
}
#: Detectors whose estimator reads the base network's layer.
_NEEDS_BASE = ("distance-base", "spectrum")


class OneViewReference(Reference):
    """A :class:`Reference` whose one estimator (a pseudo-view such as ``matrix`` or ``classes``)
    takes the place of the GMM's two views; subclasses say which (``_view_estimator_for``)."""

    def _view_estimator_for(self) -> Any:
        raise NotImplementedError

    def _needs_base(self) -> bool:
        """Whether the estimator reads the layer of the network fine-tuning started from."""
        return False

    def _base_matrix(self, base_tensors: Mapping[str, Any] | None) -> np.ndarray:
        if base_tensors is None:
            raise ValueError(
                f"{self.detector} needs the base network fine-tuning started from (pass base=, or --base on the "
                "command line; `--detector head` needs none)"
            )
        from detector.weights import layer_of

        return layer_of(base_tensors, self.config.layer, source="base").matrix

    def _fit_views(self, matrices: list[np.ndarray], base_tensors: Mapping[str, Any] | None) -> dict[str, Any]:
        base_matrix = self._base_matrix(base_tensors) if self._needs_base() else None
        est = self._view_estimator_for()
        return {getattr(est, "view", MATRIX): est.fit(matrices, base_matrix=base_matrix)}

    # -- the artifact: the estimator keeps its own arrays and fields -------------------------------
    def _scores_are(self) -> str:
        return f"{self.detector} (see {type(self).__module__})"

    def _saved_views(self, info: Mapping[str, Any]) -> list[str]:
        return list(info["views"])

    def _restore_view(self, view: str, info: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Any:
        return type(self._view_estimator_for()).restore(info, arrays)


class BaselineReference(OneViewReference):
    """The naive baselines: one of :data:`_VIEW_ESTIMATORS` over the whole layer."""

    def __init__(self, detector: str, config: ReferenceConfig | None = None, statistic: str | None = None):
        """``statistic``: the ``spectrum`` variant (``top1``, ``ratio``; default ``top5``)."""
        if detector not in _VIEW_ESTIMATORS:
            raise ValueError(f"unknown baseline {detector!r}; one of {sorted(_VIEW_ESTIMATORS)}")
        if statistic is not None and detector != "spectrum":
            raise ValueError(f"only spectrum has a statistic, not {detector!r}")
        super().__init__(config)
        self.detector = detector
        self.statistic = statistic

    def _view_estimator_for(self) -> Any:
        if self.statistic is not None:
            return SpectrumView(statistic=self.statistic)
        return _VIEW_ESTIMATORS[self.detector]()

    def _needs_base(self) -> bool:
        return self.detector in _NEEDS_BASE

    @classmethod
    def _from_info(cls, info: Mapping[str, Any], config: ReferenceConfig) -> BaselineReference:
        return cls(info["detector"], config)
