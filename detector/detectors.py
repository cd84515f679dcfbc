"""Every detector by name: build an unfitted one, or load a saved one.

The only module that knows all detectors (the paper's GMM and the ``gaussian`` variant in
:mod:`detector.reference`, the baselines and ``spectrum`` in :mod:`detector.baselines`, the
``classifier``, composites such as ``fusion``); the detectors themselves never import it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from detector.artifact import ARRAYS_FILE, GMM_DETECTORS, read_metadata
from detector.baselines import _VIEW_ESTIMATORS, CLASSIFIER_LAYER, BaselineReference, SpectrumView
from detector.classifier import ClassDeviationView, ClassifierReference, OutputSpectrumReference
from detector.composite import CompositeReference
from detector.config import DETECTORS, FUSION, ReferenceConfig
from detector.errors import InvalidReference
from detector.gmm import Mixture
from detector.head import HeadDeviationView, HeadReference
from detector.reference import Reference, ViewReference, network_scores


def make_reference(
    detector: str = "gmm", config: ReferenceConfig | None = None, evidence: Sequence[str] = ()
) -> Reference:
    """The unfitted reference of a named detector (see the module docstring).

    ``evidence``: detectors scored and reported beside it on every candidate but never deciding
    (the published reference carries the paper's GMM so).
    """
    config = config or ReferenceConfig()
    evidence = tuple(e for e in evidence if e != detector)
    if ":" in detector:  # a variant, e.g. classifier:none, spectrum:top1 (compared in `paper`)
        name, option = detector.split(":", 1)
        if name == "classifier":  # classifier:none, classifier:std, classifier:none+std …
            opts = option.split("+")
            return ClassifierReference(
                config,
                normalize="none" if "none" in opts else "network",
                scale=next((o for o in opts if o in ("mad", "std", "pooled")), "std"),
                victim_rule="max" if "max" in opts else "toward-impostor",
            )
        if name == "spectrum":
            return BaselineReference("spectrum", config, statistic=option)
        raise ValueError(f"detector {name!r} has no variants")
    if evidence or detector == "fusion" or "+" in detector:
        decide_by = FUSION if detector == "fusion" else tuple(detector.split("+"))
        members = {m: make_reference(m, config) for m in (*decide_by, *evidence)}
        return CompositeReference(decide_by=decide_by, evidence=evidence, config=config, members=members)
    if detector == "gmm":
        return Reference(config)
    if detector == "gaussian":
        gaussian = Reference(config.replace(components=1))
        gaussian.detector = "gaussian"
        return gaussian
    if detector == "trojan-signature" and config.layer == ReferenceConfig().layer:
        config = config.replace(layer=CLASSIFIER_LAYER)
    if detector in _VIEW_ESTIMATORS:
        return BaselineReference(detector, config)
    if detector == "classifier":
        return ClassifierReference(config)
    if detector == "head":
        return HeadReference(config)
    if detector == "output-spectrum":
        return OutputSpectrumReference(config)
    raise ValueError(f"unknown detector {detector!r}; one of {', '.join(DETECTORS)}")


def _restore_view(detector: str, info: dict, arrays: dict[str, np.ndarray]):
    if detector == "classifier":
        return ClassDeviationView.restore(info, arrays)
    if detector == "head":
        return HeadDeviationView.restore(info, arrays)
    if detector == "output-spectrum":
        return SpectrumView.restore(info, arrays)
    cls = type(_VIEW_ESTIMATORS[detector]())
    return cls.restore(info, arrays)


def load_reference(path: str | os.PathLike):
    """A fitted, calibrated :class:`Reference` from a verified artifact directory."""
    root = Path(path)
    meta = read_metadata(root)
    if meta.get("detector") == "composite":
        return CompositeReference.restore(root, meta, load_member=load_reference)
    try:
        with np.load(root / ARRAYS_FILE, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        config = ReferenceConfig.from_dict(meta["config"])
        detector = meta.get("detector", "gmm")
        if detector in GMM_DETECTORS:
            ref = Reference(config)
            ref.detector = detector
        elif detector == "classifier":
            ref = ClassifierReference(
                config, normalize=meta["views"]["classes"]["normalize"], scale=meta["views"]["classes"]["scale"]
            )
        elif detector == "head":
            info = meta["views"]["classes"]
            ref = HeadReference(config, rank=int(info["rank"]), normalize=info["normalize"])
        elif detector == "output-spectrum":
            ref = OutputSpectrumReference(config)
        else:
            ref = BaselineReference(detector, config)
        ref.views_ = {}
        ref.calibration_scores_ = {}
        ref.calibration_vector_scores_ = {}
        for v in meta["views"] if detector not in GMM_DETECTORS else ():
            prefix = f"{v}."
            ref.views_[v] = _restore_view(
                detector, meta["views"][v], {k[len(prefix) :]: a for k, a in arrays.items() if k.startswith(prefix)}
            )
            ref.calibration_vector_scores_[v] = arrays[f"{v}.calibration_vector_scores"]
            ref.calibration_scores_[v] = network_scores(ref.views_[v], ref.calibration_vector_scores_[v])
        for v in config.views if detector in GMM_DETECTORS else ():
            info = meta["views"][v]
            est = ViewReference(view=v, covariance_type=info["covariance"])
            est.pca_mean_ = arrays[f"{v}.pca_mean"]
            est.pca_components_ = arrays[f"{v}.pca_components"]
            est.mixture_ = Mixture(
                weights=arrays[f"{v}.gmm_weights"],
                means=arrays[f"{v}.gmm_means"],
                precisions_cholesky=arrays[f"{v}.gmm_precisions_cholesky"],
                covariance=info["covariance"],
                n_iter=int(info["em_iterations"]),
                converged=bool(info["em_converged"]),
            )
            est.reference_vector_scores_ = arrays[f"{v}.reference_vector_scores"]
            est.reference_scores_ = est.reference_vector_scores_.sum(axis=1)
            est.explained_variance_ = float(info["explained_variance"])
            est.n_components_, est.n_pca_ = int(info["n_components"]), int(info["pca_dims"])
            est.n_vectors_, est.reg_ = int(info["n_vectors"]), float(info["reg_covar_absolute"])
            est.selection_, est.fit_seconds_ = info["selection"], float(info["fit_seconds"])
            est.n_networks_, est.shape_ = int(meta["n_reference"]), tuple(meta["layer_shape"])
            ref.views_[v] = est
            ref.calibration_vector_scores_[v] = arrays[f"{v}.calibration_vector_scores"]
            ref.calibration_scores_[v] = ref.calibration_vector_scores_[v].sum(axis=1)
        ref.thresholds_ = {v: float(meta["views"][v]["threshold"]) for v in ref.views_}
        if not ref.thresholds_ or not all(np.isfinite(t) for t in ref.thresholds_.values()):
            raise InvalidReference(root, f"thresholds must be finite numbers, got {ref.thresholds_}")
        ref.frr_empirical_ = {v: float(meta["views"][v]["frr_empirical"]) for v in ref.views_}
        ref.frr_empirical_["combined"] = float(meta["frr_empirical_combined"])
        ref.frr_upper_95_ = meta.get("frr_upper_95_combined")
        ref.calibration_warning_ = meta.get("calibration_warning")
        ref.n_calibration_ = int(meta["n_calibration"])
        ref.classes_ = meta.get("classes")
        ref.shape_ = tuple(meta["layer_shape"])
        ref.n_reference_ = int(meta["n_reference"])
        ref.reference_checkpoints_ = meta["reference_checkpoints"]
        ref.calibration_checkpoints_ = meta["calibration_checkpoints"]
        ref.threshold_source_ = meta["threshold_source"]
        ref.trunk_digests_ = dict(meta.get("trunk_digests") or {})
    except (KeyError, ValueError, TypeError) as e:
        raise InvalidReference(root, f"malformed artifact: {e.__class__.__name__}: {e}") from None
    ref.artifact_sha256_ = meta["artifact_sha256"]
    ref.metadata_ = meta
    return ref
