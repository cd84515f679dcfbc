"""Naive baselines: their arithmetic on known inputs, and that they are full references."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from detector.baselines import trojan_signature_z
from detector.config import DETECTORS, ReferenceConfig
from detector.detectors import load_reference, make_reference
from detector.evaluation import roc_auc


def test_distance_mean_is_minus_squared_frobenius_distance_to_the_reference_mean():
    refs = [np.zeros((3, 4)), 2 * np.ones((3, 4))]  # mean = all ones
    ref = make_reference("distance-mean").fit(refs).calibrate(refs)
    W = np.ones((3, 4))
    W[1, 2] = 4.0  # one entry 3 away from the mean
    assert ref.score(W) == {"matrix": pytest.approx(-9.0)}
    np.testing.assert_allclose(ref.score_vectors(W)["matrix"], [0.0, -9.0, 0.0])


def test_distance_base_measures_from_the_base_network_and_needs_it():
    base = {"last_linear.weight": torch.full((2, 2), 5.0)}
    ref = make_reference("distance-base").fit([np.zeros((2, 2))], base=base)
    assert ref.views_["matrix"].score(np.full((2, 2), 3.0)) == pytest.approx(-16.0)  # 4 entries, each 2 away
    with pytest.raises(ValueError, match="base network"):
        make_reference("distance-base").fit([np.zeros((2, 2))])


def test_trojan_signature_z_is_a_robust_z_score_of_row_means():
    W = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0], [40.0, 40.0]])  # row means 1,2,3,4,40
    z = trojan_signature_z(W)
    # median 3, |s - 3| = 2,1,0,1,37 -> MAD 1 -> scale 1.4826
    np.testing.assert_allclose(z, np.array([2, 1, 0, 1, 37]) / 1.4826)
    ref = make_reference("trojan-signature")
    assert ref.config.layer == "logits.weight"  # the classifier, by default
    ref.fit([W]).calibrate([W])
    assert ref.score(W)["matrix"] == pytest.approx(-37 / 1.4826)


def test_gaussian_is_the_gmm_with_one_component():
    rng = np.random.default_rng(0)
    mats = [rng.normal(size=(6, 5)) for _ in range(5)]
    ref = make_reference("gaussian").fit(mats)
    assert ref.detector == "gaussian"
    assert all(est.n_components_ == 1 for est in ref.views_.values())


@pytest.mark.parametrize(
    "name",
    # these read a whole head (logits, BatchNorm), not a bare matrix; tested on trained networks in test_detectors
    [
        d
        for d in DETECTORS
        if d not in ("trojan-signature", "classifier", "head", "fusion") and "output-spectrum" not in d
    ],
)
def test_every_detector_separates_a_shifted_family_and_round_trips_its_artifact(name, tmp_path):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(8, 6))
    clean = [base + 0.1 * rng.normal(size=base.shape) for _ in range(12)]
    bad = [base + 0.1 * rng.normal(size=base.shape) + 0.6 * np.outer(rng.normal(size=8), np.ones(6)) for _ in range(4)]
    config = ReferenceConfig(grid=(1, 2, 8))
    ref = (
        make_reference(name, config)
        .fit(clean[:8], base={"last_linear.weight": torch.from_numpy(base)})
        .calibrate(clean[8:])
    )
    auc = {v: roc_auc([ref.score(w)[v] for w in clean[8:]], [ref.score(w)[v] for w in bad]) for v in ref.thresholds_}
    assert min(auc.values()) > 0.9, auc
    ref.save(tmp_path / "ref")
    meta = json.loads((tmp_path / "ref" / "reference.json").read_text())
    assert meta["detector"] == name
    loaded = load_reference(tmp_path / "ref")
    assert loaded.detector == name
    for w in bad:
        assert loaded.score(w) == pytest.approx(ref.score(w))
        assert loaded.assess(w).decision.verdict == ref.assess(w).decision.verdict


def test_evaluate_cli_fits_a_named_baseline_on_the_spot(tmp_path):
    rng = np.random.default_rng(2)
    base = rng.normal(size=(8, 6)).astype(np.float32)
    paths = {}
    for kind, n, shift in (("ref", 6, 0.0), ("clean", 4, 0.0), ("bad", 4, 1.0)):
        paths[kind] = []
        for i in range(n):
            W = base + 0.05 * rng.normal(size=base.shape).astype(np.float32) + shift * np.float32(1 + rng.random())
            p = tmp_path / f"{kind}{i}.pt"
            torch.save({"last_linear.weight": torch.from_numpy(W)}, p)
            paths[kind].append(str(p))
    cmd = [
        sys.executable,
        "-m",
        "backdoor_gate.cli",
        "evaluate",
        "--detector",
        "distance-mean",
        "--fit",
        *paths["ref"],
        "--clean",
        *paths["clean"],
        "--backdoored",
        *paths["bad"],
        "--json",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["detector"] == "distance-mean" and set(out["auc"]) == {"matrix"}
    assert out["auc"]["matrix"] == 1.0
    p = subprocess.run([*cmd[:5], "distance-base", *cmd[6:]], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "base network" in p.stderr


@pytest.mark.parametrize("name", DETECTORS)
def test_every_named_detector_implements_the_one_interface(name):
    from detector.protocol import Detector

    ref = make_reference(name)
    # isinstance() with a runtime-checkable Protocol only sees that the names exist: compare the
    # signatures (named parameters in order; the protocol's **kwargs admits any keywords)
    positional = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    for member in ("fit", "calibrate", "assess", "score", "score_vectors", "decide", "parts", "save"):
        want = [
            q for q, v in inspect.signature(getattr(Detector, member)).parameters.items() if v.kind not in positional
        ]
        got = list(inspect.signature(getattr(type(ref), member)).parameters)
        assert got[: len(want)] == want, (member, want, got)
    assert getattr(ref, "name", ref.detector) == name  # the name its artifact records, for load_reference
    assert make_reference(name, evidence=("gmm",)).__class__.__name__ == (
        "Reference" if name == "gmm" else "CompositeReference"
    )


def test_output_basis_spans_the_class_centred_rows_the_logits_can_see():
    """Three classes reading features 1-3: their class-centred rows span the two directions
    orthogonal to (1,1,1,0)/√3 (a shift common to all classes) and to feature 4 (read by none)."""
    from detector.classifier import output_basis

    t = {
        "logits.weight": torch.eye(3, 4),
        "last_bn.weight": torch.ones(4),
        "last_bn.running_var": torch.full((4,), 1.0 - 1e-3),  # γ/√(σ²+ε) = 1
    }
    Q = output_basis(t)
    u = np.array([1.0, 1.0, 1.0, 0.0]) / np.sqrt(3)
    e4 = np.array([0.0, 0.0, 0.0, 1.0])
    assert Q.shape == (4, 2)
    np.testing.assert_allclose(Q @ Q.T, np.eye(4) - np.outer(u, u) - np.outer(e4, e4), atol=1e-12)
    # a zeroed BN scale hides feature 3 too: the centred rows (2,-1)/3, (-1,2)/3, (-1,-1)/3 on
    # features 1-2 span that plane and nothing else
    t["last_bn.weight"] = torch.tensor([1.0, 1.0, 0.0, 1.0])
    Q = output_basis(t)
    np.testing.assert_allclose(Q @ Q.T, np.diag([1.0, 1.0, 0.0, 0.0]), atol=1e-12)


def test_output_basis_refuses_weights_too_large_to_score():
    """A float64 checkpoint can hold finite weights whose products overflow the Gram matrix: the
    value check refuses them first, with a reason, so no eigensolver fails on the promotion path."""
    from detector.classifier import output_basis
    from detector.errors import InvalidCheckpoint

    t = {
        "logits.weight": torch.full((3, 4), 1e200, dtype=torch.float64),
        "last_bn.weight": torch.ones(4, dtype=torch.float64),
        "last_bn.running_var": torch.ones(4, dtype=torch.float64),
    }
    with pytest.raises(InvalidCheckpoint, match="cannot be scored"):
        output_basis(t)
