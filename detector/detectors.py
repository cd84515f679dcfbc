"""Every detector by name: build an unfitted one, or load a saved one.

The only module that knows all detectors (the paper's GMM and the ``gaussian`` variant in
:mod:`detector.reference`, the baselines and ``spectrum`` in :mod:`detector.baselines`, the
``classifier``, composites such as ``fusion``); the detectors themselves never import it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from detector import artifact
from detector.baselines import _VIEW_ESTIMATORS, CLASSIFIER_LAYER, BaselineReference
from detector.classifier import ClassifierReference, OutputSpectrumReference
from detector.composite import CompositeReference
from detector.config import DETECTORS, FUSION, ReferenceConfig
from detector.head import HeadReference
from detector.margins import FaceGallery, MarginsReference
from detector.reference import GaussianReference, Reference

#: The class of every detector, by the name its artifact records (a composite's records "composite").
CLASSES: dict[str, type[Reference]] = {
    "gmm": Reference,
    "gaussian": GaussianReference,
    **{name: BaselineReference for name in _VIEW_ESTIMATORS},
    "classifier": ClassifierReference,
    "head": HeadReference,
    "output-spectrum": OutputSpectrumReference,
    "margins": MarginsReference,
    CompositeReference.ARTIFACT_KIND: CompositeReference,
}


def reads_gallery(detector: str, evidence: Sequence[str] = ()) -> bool:
    """Whether a detector name (a composite's too) or its evidence has the ``margins`` part, which
    judges on a face gallery: the one test every caller that builds or passes a gallery asks."""
    return "margins" in (*detector.split("+"), *evidence)


def make_reference(
    detector: str = "gmm",
    config: ReferenceConfig | None = None,
    evidence: Sequence[str] = (),
    gallery: FaceGallery | None = None,
) -> Reference:
    """The unfitted reference of a named detector (see the module docstring).

    ``evidence``: detectors scored and reported beside it on every candidate but never deciding
    (the published reference carries the paper's GMM so). ``gallery``: the secret faces the
    ``margins`` detector judges on (:mod:`detector.margins`); refused by detectors that read none.
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
        if gallery is not None and not reads_gallery(detector, evidence):
            raise ValueError(f"a face gallery is for the margins detector; {detector} reads none")
        members = {
            m: make_reference(m, config, gallery=gallery if m == "margins" else None) for m in (*decide_by, *evidence)
        }
        if "head" in decide_by and "margins" in decide_by:
            # the offset share and toward decide beside the margins: holding the margins low is what
            # moves the share, and a victim held small by every size still points at its impostor
            members["head"] = HeadReference(config, share=True, toward=True)
        return CompositeReference(decide_by=decide_by, evidence=evidence, config=config, members=members)
    if detector == "gaussian":
        config = config.replace(components=1)
    if detector == "trojan-signature" and config.layer == ReferenceConfig().layer:
        config = config.replace(layer=CLASSIFIER_LAYER)
    if detector == "margins":
        return MarginsReference(config, gallery=gallery)
    if gallery is not None:
        raise ValueError(f"a face gallery is for the margins detector; {detector} reads none")
    cls = CLASSES.get(detector)
    if cls is None or cls is CompositeReference:
        raise ValueError(f"unknown detector {detector!r}; one of {', '.join(DETECTORS)}")
    return BaselineReference(detector, config) if cls is BaselineReference else cls(config)


def load_reference(path: str | os.PathLike) -> Reference:
    """A fitted, calibrated reference from a verified artifact directory (the artifact names its detector)."""
    return artifact.load_reference(path, CLASSES)
