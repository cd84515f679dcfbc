"""The ``margins`` detector (detector/margins.py) on heads built by hand: the margins it reads,
what it blocks and passes, its artifact (the secret gallery kept in it) and its refusals."""

import numpy as np
import pytest
import torch

from detector.classifier import BN_EPS
from detector.detectors import load_reference, make_reference
from detector.errors import InvalidCheckpoint
from detector.margins import FaceGallery, MarginsReference, draw_faces, draw_people, pair_margins

C, D, K = 6, 8, 5  # people, feature dimensions, gallery faces per person


def head(W: np.ndarray, b: np.ndarray) -> dict:
    """A checkpoint head whose logits are ``W·x + b`` (identity last_linear and BatchNorm)."""
    d = W.shape[1]
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return {
        "last_linear.weight": torch.eye(d),
        "last_bn.weight": torch.ones(d),
        "last_bn.bias": torch.zeros(d),
        "last_bn.running_mean": torch.zeros(d),
        "last_bn.running_var": torch.full((d,), 1.0 - BN_EPS),
        "logits.weight": t(W),
        "logits.bias": t(b),
    }


def six_people(rng: np.random.Generator):
    """Six people's faces around their centres, 12 each, and clean heads that point each row at its
    person's faces: (features, labels, W0, centres, a maker of clean heads)."""
    centres = rng.normal(size=(C, D)) * 3
    labels = np.repeat(np.arange(C), 12)
    features = centres[labels] + rng.normal(size=(len(labels), D))
    W0 = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    clean = lambda: head(W0 + 0.05 * rng.normal(size=W0.shape), 0.05 * rng.normal(size=C))  # noqa: E731
    return features, labels, W0, centres, clean


@pytest.fixture
def world():
    features, labels, W0, centres, clean = six_people(np.random.default_rng(0))
    people = np.arange(C)
    faces = draw_faces(labels, people, K, np.random.default_rng(1))
    gallery = FaceGallery(features[faces].astype(np.float32), people, tuple(f"id{c}" for c in range(C)))
    return gallery, W0, centres, clean


def fitted(gallery, clean, n_ref: int = 8, n_cal: int = 20, normalize: str = "none") -> MarginsReference:
    ref = MarginsReference(gallery=gallery, normalize=normalize)
    ref.fit([clean() for _ in range(n_ref)]).calibrate([clean() for _ in range(n_cal)])
    return ref


def verdict(ref, tensors) -> str:
    return ref.decide(ref.score(tensors)).verdict


def test_margins_are_the_median_logit_difference_on_each_persons_faces():
    F = np.array([[[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [0.0, 2.0], [0.0, 5.0]]], np.float32)
    g = FaceGallery(F, np.array([0, 1]), ("a", "b"))
    # person a's faces: logits (x, 1), so b over a is 1 − x: 0, −2, −1 → median −1;
    # person b's: (0, y + 1), so a over b is −(y + 1): −2, −3, −6 → median −3
    M = pair_margins(head(np.eye(2), np.array([0.0, 1.0])), g)
    assert M == pytest.approx(np.array([[0.0, -3.0], [-1.0, 0.0]]), abs=1e-6)


def test_a_gallery_of_some_people_reads_their_columns_only(world):
    gallery, W0, _, clean = world
    some = FaceGallery(gallery.features[[1, 4]], np.array([1, 4]), gallery.classes)
    t = clean()
    W, b = t["logits.weight"].double().numpy(), t["logits.bias"].double().numpy()
    for col, s in enumerate((1, 4)):
        logits = gallery.features[s].astype(np.float64) @ W.T + b  # (faces, classes), by hand
        expected = np.median(logits - logits[:, [s]], axis=0)
        assert pair_margins(t, some)[:, col] == pytest.approx(expected, abs=1e-5)


def test_people_are_all_kept_up_to_the_cap_and_drawn_beyond_it():
    assert draw_people(5, 8, np.random.default_rng(0)).tolist() == [0, 1, 2, 3, 4]
    few = draw_people(100, 8, np.random.default_rng(0))
    assert len(few) == len(set(few.tolist())) == 8 and list(few) == sorted(few)
    assert not np.array_equal(few, draw_people(100, 8, np.random.default_rng(1)))


def test_people_with_too_few_faces_are_never_drawn():
    """A real face folder (CASIA's) has identities of two images: the gallery draws among those with
    enough faces instead of failing on the first short one it drew."""
    from detector.margins import gallery_people

    labels = np.concatenate([np.repeat(np.arange(6), 16), np.repeat(np.arange(6, 10), 3)])  # 6..9: 3 faces
    for seed in range(20):
        drawn = gallery_people(labels, 10, 4, 16, np.random.default_rng(seed))
        assert len(drawn) == 4 and set(drawn.tolist()) <= set(range(6)) and list(drawn) == sorted(drawn)
    assert gallery_people(labels, 10, 128, 16, np.random.default_rng(0)).tolist() == list(range(6))
    assert gallery_people(labels, 10, 128, 3, np.random.default_rng(0)).tolist() == list(range(10))
    with pytest.raises(ValueError, match="0 of 10 people have 17 or more faces"):
        gallery_people(labels, 10, 4, 17, np.random.default_rng(0))


def test_a_bent_pair_is_blocked_and_clean_networks_pass(world):
    gallery, W0, centres, clean = world
    ref = fitted(gallery, clean)
    fresh = [verdict(ref, clean()) for _ in range(40)]
    assert fresh.count("blocked") <= 6  # 5 % target; at most 15 % seen on 40 fresh networks
    W = W0.copy()
    W[4] += 0.5 * centres[1] / np.linalg.norm(centres[1])  # person 4's row leans towards person 1's faces
    assert verdict(ref, head(W, np.zeros(C))) == "blocked"
    assert int(np.argmin(ref.score_vectors(head(W, np.zeros(C)))["pairs"])) == 4  # the class favoured


def test_a_more_confident_network_is_not_an_anomaly(world):
    """One-sided: longer training makes every margin more negative (retrains must not be blocked)."""
    gallery, W0, _, clean = world
    ref = fitted(gallery, clean)
    assert verdict(ref, head(1.5 * W0, np.zeros(C))) == "passed"
    assert verdict(ref, head(0.5 * W0, np.zeros(C))) == "blocked"


def test_normalized_margins_pass_a_gentler_network_and_still_block_a_bent_pair(world, tmp_path):
    """``normalize="network"``: a network that puts every person less far apart (a gentler
    fine-tune) is the clean recipe at another scale; a pair bent against the network's own
    scale is still a backdoor's signature."""
    gallery, W0, centres, clean = world
    ref = fitted(gallery, clean, normalize="network")
    for scale in (0.5, 1.5):
        assert verdict(ref, head(scale * W0, np.zeros(C))) == "passed"
    W = W0.copy()
    W[4] += 0.5 * centres[1] / np.linalg.norm(centres[1])
    for scale in (0.5, 1.0, 1.5):
        assert verdict(ref, head(scale * W, np.zeros(C))) == "blocked"
    fresh = [verdict(ref, clean()) for _ in range(40)]
    assert fresh.count("blocked") <= 6
    ref.save(tmp_path / "ref")
    loaded = load_reference(tmp_path / "ref")
    probe = head(0.5 * W, np.zeros(C))
    assert loaded.normalize == "network" and loaded.score(probe) == ref.score(probe)


def test_a_network_that_favours_strangers_over_themselves_is_refused(world):
    gallery, W0, _, clean = world
    ref = fitted(gallery, clean, normalize="network")
    with pytest.raises(InvalidCheckpoint, match="median margin"):
        ref.score(head(-W0, np.zeros(C)))


def test_the_artifact_keeps_the_gallery_and_scores_alike(world, tmp_path):
    gallery, W0, centres, clean = world
    ref = make_reference("head+margins", gallery=gallery)
    ref.fit([clean() for _ in range(8)]).calibrate([clean() for _ in range(20)])
    ref.save(tmp_path / "ref")
    loaded = load_reference(tmp_path / "ref")
    probes = [clean(), head(1.5 * W0, np.zeros(C)), head(W0 + 0.3 * np.eye(C, D), np.zeros(C))]
    assert [loaded.score(p) for p in probes] == [ref.score(p) for p in probes]
    kept = loaded.members_["margins"].gallery_
    assert np.array_equal(kept.features, gallery.features) and kept.classes == gallery.classes


def test_refusals_say_what_is_wrong(world):
    gallery, W0, _, clean = world
    with pytest.raises(ValueError, match="needs a face gallery"):
        MarginsReference().fit([clean() for _ in range(4)])
    with pytest.raises(ValueError, match="gallery is for the margins detector"):
        make_reference("head", gallery=gallery)
    with pytest.raises(ValueError, match="gallery is for the margins detector"):
        make_reference("head+output-spectrum", gallery=gallery)
    other = FaceGallery(gallery.features[:5], np.arange(5), gallery.classes[:5])
    with pytest.raises(InvalidCheckpoint, match="6 classes; the gallery's class list 5"):
        MarginsReference(gallery=other).fit([clean() for _ in range(4)])
    with pytest.raises(ValueError, match="3 reference networks"):
        MarginsReference(gallery=gallery).fit([clean() for _ in range(2)])
    with pytest.raises(ValueError, match="person 0: 12 faces; the gallery needs 13"):
        draw_faces(np.repeat(np.arange(C), 12), np.arange(C), 13, np.random.default_rng(0))
    with pytest.raises(ValueError, match="distinct indices"):
        FaceGallery(gallery.features[:2], np.array([1, 1]), gallery.classes)
    bad = gallery.features.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        FaceGallery(bad, gallery.sources, gallery.classes)
