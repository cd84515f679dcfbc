"""The reference: what clean networks' weights look like, per view, and where to cut.

:class:`Reference` holds one estimator per view of one layer (the paper's: PCA + GMM,
:class:`detector.gmm_view.ViewReference`), plus the thresholds calibrated at a target FRR. Scores follow
:mod:`detector.decision`: log-likelihood, higher = more typical of clean networks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detector.artifact import save_reference
from detector.config import ReferenceConfig
from detector.decision import PASSED, Decision, decide
from detector.errors import InvalidCheckpoint, NotFittedError
from detector.evidence import Evidence
from detector.gmm_view import ViewReference
from detector.protocol import check_fitted
from detector.threshold import frr_upper_bound, rejection_rate, threshold_at_frr
from detector.trunk import SharedTrunk, TrunkCheck, check_trunk, trunk_digests
from detector.weights import LayerWeights, StateDict, check_every_tensor, layer_of, load_layer, read_tensors

#: Below this many calibration networks a 5 % FRR target cannot be told from 0 %: warn.
MIN_CALIBRATION = 20


def network_score(est: Any, vector_scores: np.ndarray) -> float:
    """A network's score from its per-unit scores: the estimator's own rule, else the sum (the paper's)."""
    agg = getattr(est, "aggregate", None)
    return float(agg(vector_scores)) if agg is not None else float(np.sum(vector_scores))


def network_scores(est: Any, per_network: np.ndarray) -> np.ndarray:
    return np.array([network_score(est, row) for row in per_network], dtype=np.float64)


@dataclass(frozen=True)
class Assessment:
    """Everything the reference says about one candidate network."""

    source: str
    sha256: str | None
    scores: dict[str, float]
    vector_scores: dict[str, np.ndarray]
    thresholds: dict[str, float]
    trunk: TrunkCheck
    decision: Decision
    #: the suspect (detectors that name the likely victim) and the non-deciding parts' scores
    evidence: Evidence = dataclasses.field(default_factory=Evidence)


class Reference:
    """All views of one layer, their thresholds, and where the reference came from."""

    #: which detector this is (see :mod:`detector.baselines`); recorded in the artifact
    detector = "gmm"
    #: the view a composite names by the member's name alone when the member has several (None:
    #: every view is named ``member.view``)
    primary_view: str | None = None

    # Fitted state (scikit-learn's rule: set by fit/calibrate/load, absent before; declared for readers
    # and the type checker)
    views_: dict[str, Any]
    thresholds_: dict[str, float]
    classes_: list[str] | None
    frr_upper_95_: float | None
    artifact_sha256_: str
    metadata_: dict[str, Any]

    def __init__(self, config: ReferenceConfig | None = None):
        self.config = config or ReferenceConfig()

    # -- building -----------------------------------------------------------------------
    def _view_estimator(self, view: str) -> ViewReference:
        c = self.config
        return ViewReference(
            view=view,
            variance=c.variance,
            n_components=c.components,
            grid=c.grid,
            criterion=c.criterion,
            covariance_type=c.covariance,
            reg_covar=c.reg_covar,
            max_iter=c.max_iter,
            tol=c.tol,
            random_state=c.seed,
        )

    def _load(
        self, networks: Sequence[Any], progress: Callable | None = None, trunk: SharedTrunk | None = None
    ) -> list[LayerWeights]:
        """Each network's matrix, reading each file once; ``trunk`` also learns their shared frozen trunk."""
        out = []
        for n in networks:
            out.append(self._input_of(n, trunk))
            if progress is not None:
                progress(out[-1])
        return out

    def _input_of(self, network: Any, trunk: SharedTrunk | None = None) -> LayerWeights:
        """The matrix this detector reads from a network (path, module, state dict or matrix)."""
        if isinstance(network, LayerWeights):
            return network
        tensors, digest, source = self._tensors(network)
        if trunk is not None:
            trunk.add(tensors, source)
        if tensors is None:  # a bare matrix: taken as the layer itself
            return load_layer(network, self.config.layer, max_bytes=self.config.max_checkpoint_bytes)
        return self.network_matrix(tensors, source, digest)

    def network_matrix(self, tensors: Mapping[str, Any], source: str, sha256: str | None) -> LayerWeights:
        """What the views read: here the configured layer; other detectors derive a matrix."""
        return layer_of(tensors, self.config.layer, source=source, sha256=sha256)

    def fit(self, networks: Sequence[Any], progress: Callable | None = None, base: Any = None) -> Reference:
        """Fit every view on clean networks (paths, modules, state dicts or matrices).

        The frozen-trunk check records a digest of each frozen tensor: of ``base`` (the network
        fine-tuning started from: a path, module or state dict) when given, else of the trunk the
        networks share (refused, naming the tensors, when they do not share one). Networks given
        as bare matrices record none, and such a reference passes no candidate.
        """
        base_tensors = self._tensors(base)[0] if base is not None else None
        shared = SharedTrunk()
        self._prepare(base_tensors)
        layers = self._load(networks, progress, shared if base_tensors is None else None)
        self.trunk_digests_ = trunk_digests(base_tensors) if base_tensors is not None else shared.digests()
        if len(layers) < 1:
            raise ValueError("a reference needs clean networks to fit on")
        self._fitted_on(layers)
        self._reference_matrices = [lw.matrix for lw in layers]
        self.views_ = self._fit_views(self._reference_matrices, base_tensors)
        self.shape_ = tuple(int(s) for s in np.shape(self._reference_matrices[0]))
        self.n_reference_ = len(layers)
        self.reference_checkpoints_ = [{"source": lw.source, "sha256": lw.sha256} for lw in layers]
        return self

    def _fitted_on(self, layers: Sequence[LayerWeights]) -> None:
        """What a detector learns from the reference networks' files beyond their matrices (none here)."""

    def calibrate(self, clean: Sequence[Any] | None = None, progress: Callable | None = None) -> Reference:
        """Set each view's threshold at ``config.frr`` on held-out clean networks.

        With none given, the reference networks' leave-one-network-out scores stand in (an
        in-sample score would be optimistic); the artifact records which was used.
        """
        check_fitted(self, "views_")
        if clean:
            layers = self._load(clean, progress)
            per_net = [self._score_views(self._checked(lw).matrix) for lw in layers]
            self.calibration_vector_scores_ = {v: np.stack([s[v] for s in per_net]) for v in self.views_}
            self.threshold_source_ = "held-out"
            self.calibration_checkpoints_ = [{"source": lw.source, "sha256": lw.sha256} for lw in layers]
        else:
            mats = getattr(self, "_reference_matrices", None)
            if mats is None:
                raise NotFittedError(
                    "leave-one-out calibration needs the reference networks: fit() in this process first"
                )
            self.calibration_vector_scores_ = {
                v: est.leave_one_out_vector_scores(mats) for v, est in self.views_.items()
            }
            self.threshold_source_ = "leave-one-out"
            self.calibration_checkpoints_ = []
        #: per-vector scores of clean networks the reference did not see: the honest yardstick
        #: for "is this neuron unusual" (in-sample scores are optimistic, badly so for full GMMs)
        self.calibration_scores_ = {
            v: network_scores(self.views_[v], s) for v, s in self.calibration_vector_scores_.items()
        }
        self.thresholds_ = {v: threshold_at_frr(s, self.config.frr) for v, s in self.calibration_scores_.items()}
        self._record_frr()
        return self

    def _record_frr(self) -> None:
        """Observed FRR per view and combined, with a one-sided 95 % Clopper–Pearson upper bound."""
        self.frr_empirical_ = {v: rejection_rate(s, self.thresholds_[v]) for v, s in self.calibration_scores_.items()}
        n = len(next(iter(self.calibration_scores_.values())))
        blocked = [
            decide({v: float(s[i]) for v, s in self.calibration_scores_.items()}, self.thresholds_).verdict != PASSED
            for i in range(n)
        ]
        self.frr_empirical_["combined"] = float(np.mean(blocked))
        self.frr_upper_95_ = frr_upper_bound(int(np.sum(blocked)), n)
        self.n_calibration_ = n
        self.calibration_warning_ = (
            f"only {n} calibration networks: the threshold is "
            f"{'the lowest clean score' if (n + 1) * self.config.frr < 2 else 'set by a handful of networks'}"
            f" and the true FRR could be up to {self.frr_upper_95_:.0%} (95 % bound); calibrate on >= {MIN_CALIBRATION}"
            if n < MIN_CALIBRATION
            else None
        )

    def _prepare(self, base_tensors: Mapping[str, Any] | None) -> None:
        """Anything :meth:`network_matrix` needs from the base before networks are read (nothing here)."""

    def _fit_views(self, matrices: list[np.ndarray], base_tensors: Mapping[str, Any] | None) -> dict[str, Any]:
        """One fitted estimator per view (the baselines override this)."""
        return {v: self._view_estimator(v).fit(matrices) for v in self.config.views}

    # -- using --------------------------------------------------------------------------
    def _tensors(self, network: Any) -> tuple[Mapping[str, Any] | None, str | None, str]:
        """All tensors of a network when they can be had (for the trunk check), its digest, a label."""
        import torch

        if isinstance(network, (str, os.PathLike)):
            tensors, digest = read_tensors(network, max_bytes=self.config.max_checkpoint_bytes)
            return tensors, digest, str(network)
        if isinstance(network, StateDict):  # parsed from bytes: every tensor already checked
            return network, network.sha256, network.source
        if isinstance(network, torch.nn.Module):
            network, label = network.state_dict(), f"<{type(network).__name__}>"
            check_every_tensor(network, label)
            return network, None, label
        if isinstance(network, Mapping):
            check_every_tensor(network, "<state dict>")
            return network, None, "<state dict>"
        return None, None, f"<{type(network).__name__}>"

    def assess(self, network: Any, trunk: TrunkCheck | None = None) -> Assessment:
        """Load, check the trunk (unless ``trunk`` is the check already made on these tensors),
        score every view and decide. Raises InvalidCheckpoint."""
        check_fitted(self, "thresholds_")
        tensors, digest, source = self._tensors(network)
        weights = self._checked(
            self.network_matrix(tensors, source, digest) if tensors is not None else self._input_of(network)
        )
        if trunk is None:
            trunk = check_trunk(tensors, getattr(self, "trunk_digests_", {}))
        vector_scores = self._score_views(weights.matrix)
        scores = {v: network_score(self.views_[v], s) for v, s in vector_scores.items()}
        return Assessment(
            source=weights.source,
            sha256=weights.sha256,
            scores=scores,
            vector_scores=vector_scores,
            thresholds=dict(self.thresholds_),
            trunk=trunk,
            decision=decide(scores, self.thresholds_, trunk),
            evidence=self.evidence(vector_scores, weights.matrix),
        )

    def evidence(self, vector_scores: Mapping[str, np.ndarray], matrix: np.ndarray | None = None) -> Evidence:
        """Detector-specific extras for a verdict (none for the GMM)."""
        return Evidence()

    def layer_weights(self, network: Any) -> LayerWeights:
        """Load the reference's layer from ``network`` and check it has the reference's shape."""
        check_fitted(self, "views_")
        return self._checked(self._input_of(network))

    def _checked(self, lw: LayerWeights) -> LayerWeights:
        if tuple(lw.matrix.shape) != tuple(self.shape_):
            raise InvalidCheckpoint(
                lw.source,
                f"layer '{lw.layer}' has shape {tuple(lw.matrix.shape)}; the reference expects {tuple(self.shape_)}",
            )
        return lw

    def score_vectors(self, network: Any) -> dict[str, np.ndarray]:
        return self._score_views(self.layer_weights(network).matrix)

    def _score_views(self, matrix: np.ndarray) -> dict[str, np.ndarray]:
        """Every view's per-unit scores of one matrix (a detector whose views share work overrides it)."""
        return {v: est.score_vectors(matrix) for v, est in self.views_.items()}

    def score(self, network: Any) -> dict[str, float]:
        return {v: network_score(self.views_[v], s) for v, s in self.score_vectors(network).items()}

    def held_detectors(self) -> dict[str, Reference]:
        """This reference and any it holds, by name: what ``evaluate --detector`` may pick from an artifact."""
        return {self.detector: self}

    def decide(self, scores: dict[str, float]) -> Decision:
        check_fitted(self, "thresholds_")
        return decide(scores, self.thresholds_)

    def parts(self) -> dict[str, dict[str, Any]]:
        """What a report shows per scored part: the clean networks' scores, the threshold, and
        whether the part decides (a composite's evidence parts do not)."""
        check_fitted(self, "thresholds_")
        return {
            v: {
                "threshold": self.thresholds_[v],
                "deciding": True,
                "calibration_scores": np.asarray(self.calibration_scores_[v]),
                "calibration_vector_scores": np.asarray(self.calibration_vector_scores_[v]),
                "reference_scores": getattr(est, "reference_scores_", None),
                "unit": getattr(est, "unit", "vector"),
                #: what a per-unit entry is, when it is not a deviation z (a report's axis)
                "label": getattr(est, "label", None),
                "classes": getattr(self, "classes_", None),
            }
            for v, est in self.views_.items()
        }

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False, extra: dict | None = None) -> str:
        """Write the artifact (:mod:`detector.artifact`); load it with :func:`detector.detectors.load_reference`."""
        return save_reference(self, path, overwrite=overwrite, extra=extra)

    def _scores_are(self) -> str:
        """What a score is, for the artifact's ``score_convention``."""
        return "log-likelihood"

    def info(self) -> dict[str, Any]:
        """The artifact's metadata (:mod:`detector.artifact` adds format, version, time and digests)."""
        check_fitted(self, "thresholds_")
        return {
            "detector": self.detector,
            "layer": self.config.layer,
            "layer_shape": list(self.shape_),
            "views": {
                v: {**est.info(), "threshold": self.thresholds_[v], "frr_empirical": self.frr_empirical_[v]}
                for v, est in self.views_.items()
            },
            "score_convention": self._scores_are()
            + "; higher = more typical of clean networks; blocked if any view < threshold",
            "config": self.config.to_dict(),
            "frr_target": self.config.frr,
            "frr_empirical_combined": self.frr_empirical_["combined"],
            "frr_upper_95_combined": getattr(self, "frr_upper_95_", None),
            "calibration_warning": getattr(self, "calibration_warning_", None),
            "classes": getattr(self, "classes_", None),
            "threshold_source": self.threshold_source_,
            "n_reference": self.n_reference_,
            "n_calibration": int(len(next(iter(self.calibration_scores_.values())))),
            "reference_checkpoints": self.reference_checkpoints_,
            "calibration_checkpoints": self.calibration_checkpoints_,
            "trunk_digests": getattr(self, "trunk_digests_", {}),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """Per view, the clean calibration networks' per-unit scores and the estimator's own arrays."""
        check_fitted(self, "thresholds_")
        out: dict[str, np.ndarray] = {}
        for v, est in self.views_.items():
            out[f"{v}.calibration_vector_scores"] = np.asarray(self.calibration_vector_scores_[v])
            out.update({f"{v}.{k}": a for k, a in est.arrays().items()})
        return out

    def nested_references(self) -> dict[str, Reference]:
        """References saved whole inside this one's artifact (a composite's members; none here)."""
        return {}

    @classmethod
    def restore(
        cls, info: Mapping[str, Any], arrays: Mapping[str, np.ndarray], members: Mapping[str, Reference] | None = None
    ) -> Reference:
        """The calibrated reference an artifact holds (its metadata ``info`` already verified)."""
        ref = cls._from_info(info, ReferenceConfig.from_dict(info["config"]))
        ref.views_, ref.calibration_vector_scores_ = {}, {}
        for v in ref._saved_views(info):
            prefix = f"{v}."
            own = {k[len(prefix) :]: a for k, a in arrays.items() if k.startswith(prefix)}
            ref.views_[v] = ref._restore_view(v, info["views"][v], own)
            ref.calibration_vector_scores_[v] = arrays[f"{v}.calibration_vector_scores"]
        ref.calibration_scores_ = {
            v: network_scores(est, ref.calibration_vector_scores_[v]) for v, est in ref.views_.items()
        }
        ref.thresholds_ = {v: float(info["views"][v]["threshold"]) for v in ref.views_}
        ref.frr_empirical_ = {v: float(info["views"][v]["frr_empirical"]) for v in ref.views_}
        ref.frr_empirical_["combined"] = float(info["frr_empirical_combined"])
        ref.frr_upper_95_ = info.get("frr_upper_95_combined")
        ref.calibration_warning_ = info.get("calibration_warning")
        ref.n_calibration_ = int(info["n_calibration"])
        ref.classes_ = info.get("classes")
        ref.shape_ = tuple(info["layer_shape"])
        ref.n_reference_ = int(info["n_reference"])
        ref.reference_checkpoints_ = info["reference_checkpoints"]
        ref.calibration_checkpoints_ = info["calibration_checkpoints"]
        ref.threshold_source_ = info["threshold_source"]
        ref.trunk_digests_ = dict(info.get("trunk_digests") or {})
        return ref

    @classmethod
    def _from_info(cls, info: Mapping[str, Any], config: ReferenceConfig) -> Reference:
        """The unfitted reference the artifact's metadata describes (its own parameters)."""
        return cls(config)

    def _saved_views(self, info: Mapping[str, Any]) -> list[str]:
        """The views to restore, in the order fit made them (the metadata's keys are sorted)."""
        return list(self.config.views)

    def _restore_view(self, view: str, info: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Any:
        return ViewReference.restore(info, arrays, view=view)


class GaussianReference(Reference):
    """``gaussian``: the paper's GMM with one Gaussian per view (N_G = 1; built with ``components=1``
    by :func:`detector.detectors.make_reference`): does the mixture add anything?"""

    detector = "gaussian"
