"""The margin check (lab/margins.py) on heads built by hand: what it flags and what it must not."""

import numpy as np
import pytest
import torch

from lab.margins import MarginCheck, pair_margins, person_faces
from tests.detector.test_margins import head, six_people  # hand-built heads and faces

C, D, K = 6, 8, 5  # people, feature dimensions, faces per person


@pytest.fixture
def world():
    features, labels, W0, centres, clean = six_people(np.random.default_rng(0))
    F = person_faces(features, labels, C, K, seed=0)
    check = MarginCheck(frr=0.05).fit([clean() for _ in range(20)], F)
    return check, W0, centres, clean


def test_pair_margins_are_the_median_logit_difference_per_source():
    F = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [0.0, 2.0], [0.0, 5.0]]])
    A, b = torch.eye(2), torch.tensor([0.0, 1.0])
    # source 0: logits (x, 1) → t=1 over s=0: 1 − x = 0, −2, −1 → median −1; source 1: (0, y+1) → 0 − (y+1): −3
    assert pair_margins(F, A, b).tolist() == [[0.0, -1.0], [-3.0, 0.0]]


def test_a_raised_pair_is_flagged_and_named_and_clean_networks_are_not(world):
    check, W0, centres, clean = world
    # with 20 panel networks the cut is the largest leave-one-out score (1/21 ≤ 5 %)
    assert check.threshold_ == pytest.approx(max(check.panel_scores_))
    fresh = [check.score(clean()) for _ in range(40)]
    assert np.mean(np.array(fresh) > check.threshold_) <= 0.15
    W = W0.copy()
    W[4] += 0.5 * centres[1] / np.linalg.norm(centres[1])  # person 4's row leans towards person 1's faces
    bent = head(W, np.zeros(C))
    assert check.flags(bent) and check.top_pair(bent) == (1, 4)


def test_a_more_confident_network_is_not_an_anomaly(world):
    """One-sided: longer training makes every margin more negative (retrains must not be flagged)."""
    check, W0, _, _ = world
    assert check.score(head(1.5 * W0, np.zeros(C))) < check.threshold_ < check.score(head(0.7 * W0, np.zeros(C)))


def test_the_torch_score_is_the_score_and_has_a_gradient(world):
    check, W0, _, clean = world
    t = clean()
    from lab.heads import head_of

    A, b = head_of({k: v.double() for k, v in t.items()})
    A.requires_grad_(True)
    s = check.torch_score(A, b)
    assert float(s.detach()) == pytest.approx(check.score(t), abs=1e-9)
    s.backward()
    assert A.grad is not None and float(A.grad.abs().sum()) > 0


def test_bad_input_is_refused_clearly(world):
    check, *_ = world
    with pytest.raises(ValueError, match="3 clean networks or more"):
        MarginCheck().fit([], check.F_.numpy())
    with pytest.raises(ValueError, match="needs 20 per person"):
        person_faces(np.zeros((12, D)), np.repeat(np.arange(2), 6), 2, 20, seed=0)


@pytest.mark.parametrize("normalize", ["none", "network"])
def test_the_torch_mirror_of_the_gates_margins_is_its_statistic(world, normalize):
    """What an attack aimed at the gate with margins trains against is what the gate scores."""
    from detector.margins import FaceGallery, MarginsReference
    from lab.margins import GalleryMargins

    check, W0, centres, clean = world
    F = check.F_.numpy().astype(np.float32)
    gallery = FaceGallery(F[[0, 2, 5]], np.array([0, 2, 5]), tuple(str(c) for c in range(C)))
    ref = MarginsReference(gallery=gallery, normalize=normalize)
    ref.fit([clean() for _ in range(6)]).calibrate([clean() for _ in range(6)])
    W = W0.copy()
    W[3] += 0.4 * centres[2] / np.linalg.norm(centres[2])
    for t in (clean(), head(W, np.zeros(C)), head(1.5 * W0, np.zeros(C))):  # the last: every z below 0
        mirror = GalleryMargins(ref).torch_anomaly({k: v.double() for k, v in t.items()})
        # the gate runs the head in float32, the mirror in float64: equal to a ten-thousandth of a z
        assert (-mirror).numpy() == pytest.approx(ref.score_vectors(t)["pairs"], abs=1e-4)
