"""`head`'s views on small synthetic heads (no training): the std floor (a lab lead, off by
default) and that an artifact keeps it; the offset-share view, its torch mirror, its artifact and
its own place in a composite's cut."""

from __future__ import annotations

import numpy as np
import pytest

from detector.classifier import CLASSES
from detector.detectors import make_reference
from detector.head import DEFAULT_STD_FLOOR, OFFSET_SHARE, TOWARD, HeadDeviationView, HeadReference, head_matrix


@pytest.fixture(scope="module")
def heads():
    """12 clean [A | b] heads of 10 classes; classes 0 and 1 barely move between networks, so
    their std comes out far below the others'."""
    rng = np.random.default_rng(7)
    spread = np.full((10, 1), 0.05)
    spread[:2] = 0.002
    base = rng.normal(0, 0.1, (10, 9))
    return [(base + rng.normal(0, 1, (10, 9)) * spread).astype(np.float32) for _ in range(12)]


def test_the_default_floors_nothing_and_a_floor_raises_only_the_small_stds(heads):
    plain = HeadDeviationView(rank=4).fit(heads)
    floored = HeadDeviationView(rank=4, std_floor=1.25).fit(heads)
    assert DEFAULT_STD_FLOOR == 0.0 and plain.std_floor == 0.0
    floor = 1.25 * np.median(plain.scale_)
    # the networks' own std, untouched where it is above the floor, raised to it where below
    assert np.allclose(floored.scale_, np.maximum(plain.scale_, floor))
    assert (plain.scale_ < floor).any() and (plain.scale_ > floor).any()
    assert np.array_equal(floored.median_, plain.median_)


def test_a_floored_class_scores_an_ordinary_deviation_as_less_anomalous(heads):
    """What the floor is for: a class whose std came out small turns a deviation clean training
    makes elsewhere into a large z."""
    plain = HeadDeviationView(rank=4).fit(heads[:-1])
    floored = HeadDeviationView(rank=4, std_floor=1.25).fit(heads[:-1])
    probe = heads[-1]
    tight = int(np.argmin(plain.scale_))
    assert floored.scale_[tight] > plain.scale_[tight]
    z_plain, z_floored = (-v.score_vectors(probe)[:-1] for v in (plain, floored))
    assert abs(z_floored[tight]) < abs(z_plain[tight])


def test_the_artifact_keeps_the_floor_and_an_older_one_restores_without_it(heads):
    floored = HeadDeviationView(rank=4, std_floor=1.25).fit(heads)
    info, arrays = floored.info(), floored.arrays()
    back = HeadDeviationView.restore(info, arrays)
    assert back.std_floor == 1.25
    assert np.array_equal(back.score_vectors(heads[0]), floored.score_vectors(heads[0]))
    older = {k: v for k, v in info.items() if k != "std_floor"}
    assert HeadDeviationView.restore(older, arrays).std_floor == 0.0


@pytest.mark.parametrize("features", [40, 20])
def test_the_metric_is_the_pooled_covariances_eigenbasis_with_fewer_rows_than_features_or_more(features):
    """With tens of classes the pooled deviations have fewer rows (networks × classes) than
    features, and the metric comes from their n × n Gram matrix (fast); either way it must be the
    d × d covariance's eigenbasis, worked out here with numpy from the definition."""
    rng = np.random.default_rng(3)
    heads = [rng.normal(size=(5, features)) * np.linspace(0.5, 2.0, features) for _ in range(6)]  # 30 rows
    view = HeadDeviationView(rank=8).fit(heads)
    X = (np.stack(heads) - np.mean(heads, axis=0)).reshape(-1, features)
    lam, V = np.linalg.eigh(X.T @ X / len(X))
    lam, V = lam[::-1], V[:, ::-1]
    tau = lam[8]  # the floor: the rank-th eigenvalue
    w = 1.0 / (lam[:8] + tau) - 1.0 / (2.0 * tau)
    U = view.directions_.astype(np.float64)
    assert np.allclose(U.T @ U, np.eye(8), atol=1e-5)  # orthonormal directions
    assert np.allclose((U * view.weights_) @ U.T, (V[:, :8] * w) @ V[:, :8].T, atol=1e-5 * np.abs(w).max())
    assert view.floor_ == pytest.approx(1.0 / (2.0 * tau), rel=1e-9)


def _checkpoint(rng, base: dict, offset_sd: float = 0.5) -> dict:
    """A clean fine-tune of ``base``'s head: offsets vary most between clean networks (as ours do)."""
    t = {k: v.copy() for k, v in base.items()}
    t["logits.weight"] += rng.normal(0, 0.05, t["logits.weight"].shape)
    t["logits.bias"] += rng.normal(0, offset_sd, t["logits.bias"].shape)
    t["last_linear.weight"] += rng.normal(0, 0.01, t["last_linear.weight"].shape)
    return {k: v.astype(np.float32) for k, v in t.items()}


@pytest.fixture(scope="module")
def checkpoints():
    """16 clean heads of 10 classes over 40 features (a 24-wide bottleneck), 4 fresh ones, and a
    fresh one whose class 3 offset moved by 10 clean offset spreads and nothing else."""
    rng = np.random.default_rng(3)
    base = {
        "last_linear.weight": rng.normal(0, 0.2, (24, 40)),
        "last_bn.weight": rng.uniform(0.5, 1.5, 24),
        "last_bn.bias": rng.normal(0, 0.1, 24),
        "last_bn.running_mean": rng.normal(0, 0.1, 24),
        "last_bn.running_var": rng.uniform(0.5, 2.0, 24),
        "logits.weight": rng.normal(0, 0.3, (10, 24)),
        "logits.bias": np.zeros(10),
    }
    nets = [_checkpoint(rng, base) for _ in range(20)]
    shifted = {k: v.copy() for k, v in nets[-1].items()}
    shifted["logits.bias"][3] += 10 * 0.5
    return nets[:16], nets[16:], shifted


def test_the_share_view_flags_a_deviation_carried_by_one_direction_and_leaves_head_as_it_was(checkpoints):
    refs, fresh, shifted = checkpoints
    plain = HeadReference(rank=16).fit(refs).calibrate(fresh)
    share = HeadReference(rank=16, share=True).fit(refs).calibrate(fresh)
    assert list(plain.views_) == [CLASSES] and list(share.views_) == [CLASSES, OFFSET_SHARE]
    for t in [*fresh, shifted]:
        a, b = plain.score_vectors(t), share.score_vectors(t)
        assert np.array_equal(a[CLASSES], b[CLASSES]) and b[OFFSET_SHARE].shape == (10,)
        # the one-pass scores are each view's own
        assert np.array_equal(b[OFFSET_SHARE], share.views_[OFFSET_SHARE].score_vectors(head_matrix(t)))
    # the moved offset carries its class's deviation: a lower share than any fresh clean head's
    lows = [share.score(t)[OFFSET_SHARE] for t in fresh]
    moved = share.score_vectors(shifted)[OFFSET_SHARE]
    assert moved.min() < min(lows) and int(np.argmin(moved)) == 3, (moved, lows)
    # without calibration networks each reference network is scored in the others' metric
    loo = HeadReference(rank=16, share=True).fit(refs).calibrate()
    assert loo.calibration_vector_scores_[OFFSET_SHARE].shape == (16, 10)
    assert np.all(loo.calibration_vector_scores_[OFFSET_SHARE] > 0)


def test_a_composite_names_head_by_its_name_and_cuts_the_share_as_a_part_of_its_own(checkpoints):
    refs, fresh, shifted = checkpoints
    composite = make_reference("head+classifier")
    composite.members["head"] = HeadReference(rank=16, share=True)
    composite.fit(refs).calibrate(fresh)
    assert set(composite.thresholds_) == {"head", "head.offset-share", "classifier"}
    assert set(composite.standardisation_) == set(composite.thresholds_)
    a = composite.assess(shifted)
    assert set(a.scores) == set(composite.thresholds_)
    # the share is standardised on its own calibration scores: the fresh networks' lowest class each
    own = [float(np.min(composite.members_["head"].views_[OFFSET_SHARE].score_vectors(head_matrix(t)))) for t in fresh]
    assert composite.standardisation_["head.offset-share"][0] == pytest.approx(np.median(own))
    assert a.scores["head.offset-share"] < min(own)


def _toward_by_hand(refs: list[dict], t: dict, z: np.ndarray, k: int = 5) -> float:
    """The largest cosine between the change of one of the ``k`` classes of highest ``z`` (rows of A
    only) and another class's mean row over ``refs``, from the tensors (not through the detector)."""

    def rows(x: dict) -> np.ndarray:
        s = x["last_bn.weight"].astype(np.float64) / np.sqrt(x["last_bn.running_var"].astype(np.float64) + 1e-3)
        A = x["logits.weight"].astype(np.float64) @ (s[:, None] * x["last_linear.weight"].astype(np.float64))
        return A - A.mean(axis=0)

    C = np.mean([rows(r) for r in refs], axis=0)
    best = -1.0
    for a in np.argsort(z)[::-1][:k]:
        d = rows(t)[a] - C[a]
        for b in range(len(C)):
            if b != a:
                best = max(best, float(d @ C[b] / (np.linalg.norm(d) * np.linalg.norm(C[b]))))
    return best


@pytest.fixture(scope="module")
def leaning(checkpoints):
    """A fresh head whose class 3's row of A moved a little toward class 7's (a one-to-one backdoor's
    victim learning the impostor's features) and nothing else."""
    refs, fresh, _ = checkpoints
    t = {k: v.copy() for k, v in fresh[-1].items()}
    t["logits.weight"][3] += 0.3 * t["logits.weight"][7]
    return t


def test_the_toward_view_reads_where_a_deviant_class_moved_and_flags_a_change_toward_another_row(checkpoints, leaning):
    refs, fresh, shifted = checkpoints
    plain = HeadReference(rank=16, share=True).fit(refs).calibrate(fresh)
    ref = HeadReference(rank=16, share=True, toward=True).fit(refs).calibrate(fresh)
    assert list(ref.views_) == [CLASSES, OFFSET_SHARE, TOWARD]
    grown = {k: v.copy() for k, v in fresh[0].items()}
    grown["logits.weight"][5] *= 1.5  # a change along the class's own row: not toward another class
    for t in [*fresh, shifted, leaning, grown]:
        a, v = plain.score_vectors(t), ref.score_vectors(t)
        assert all(np.array_equal(a[k], v[k]) for k in a)  # the other views as they were
        assert v[TOWARD].shape == (5,)
        assert np.array_equal(v[TOWARD], ref.views_[TOWARD].score_vectors(head_matrix(t)))  # one pass = its own
        z = -v[CLASSES][:10]
        assert ref.score(t)[TOWARD] == pytest.approx(-_toward_by_hand(refs, t, z), abs=1e-6)
    fresh_scores = [ref.score(t)[TOWARD] for t in fresh]
    assert ref.score(leaning)[TOWARD] < min(fresh_scores) - 0.1, (ref.score(leaning), fresh_scores)
    # without calibration networks each reference network is scored in the others' rows and z
    loo = HeadReference(rank=16, toward=True).fit(refs).calibrate()
    assert loo.calibration_vector_scores_[TOWARD].shape == (16, 5)
    assert np.all(np.abs(loo.calibration_vector_scores_[TOWARD]) <= 1)
    i = 2
    others = refs[:i] + refs[i + 1 :]
    z = -HeadReference(rank=16).fit(others).calibrate().score_vectors(refs[i])[CLASSES][:10]
    # the left-out z comes from the others' spread, with the network's own statistic in the others'
    # metric: the same five suspects, up to order
    got = loo.calibration_vector_scores_[TOWARD][i]
    assert -got.min() == pytest.approx(_toward_by_hand(others, refs[i], z), abs=1e-6)


def test_head_s_views_round_trip_and_their_torch_mirrors_are_the_numpy_scores(checkpoints, leaning, tmp_path):
    import torch

    from detector.detectors import load_reference

    refs, fresh, shifted = checkpoints
    ref = HeadReference(rank=16, share=True, toward=True).fit(refs).calibrate(fresh)
    ref.save(tmp_path / "ref")
    back = load_reference(tmp_path / "ref")
    assert isinstance(back, HeadReference) and back.share and back.toward
    assert list(back.views_) == [CLASSES, OFFSET_SHARE, TOWARD] and back.thresholds_ == ref.thresholds_
    for t in [fresh[0], shifted, leaning]:
        v = ref.score_vectors(t)
        assert all(np.array_equal(back.score_vectors(t)[k], v[k]) for k in v)
        as_torch = {k: torch.as_tensor(x, dtype=torch.float64) for k, x in t.items()}
        for view in (OFFSET_SHARE, TOWARD):
            zc, zn = back.views_[view].torch_z(as_torch)
            # the gate projects in float32, the mirror in float64
            assert zn.numel() == 0 and np.allclose(-zc.numpy(), v[view], atol=1e-4), view
        zc, zn = back.views_[CLASSES].torch_z(as_torch)
        assert np.allclose(-np.concatenate([zc.numpy(), zn.numpy()]), v[CLASSES], atol=1e-4)
    # artifacts fitted with fewer views (the defaults before 2026-12-05) restore with those
    for share in (False, True):
        HeadReference(rank=16, share=share).fit(refs).calibrate(fresh).save(tmp_path / f"older{share}")
        assert list(load_reference(tmp_path / f"older{share}").views_) == [CLASSES, OFFSET_SHARE][: 1 + share]


def test_a_composite_cuts_toward_as_a_part_of_its_own(checkpoints, leaning):
    refs, fresh, _ = checkpoints
    composite = make_reference("head+classifier")
    composite.members["head"] = HeadReference(rank=16, share=True, toward=True)
    composite.fit(refs).calibrate(fresh)
    assert set(composite.thresholds_) == {"head", "head.offset-share", "head.toward", "classifier"}
    own = [float(np.min(composite.members_["head"].views_[TOWARD].score_vectors(head_matrix(t)))) for t in fresh]
    assert composite.standardisation_["head.toward"][0] == pytest.approx(np.median(own))
    assert composite.assess(leaning).scores["head.toward"] < min(own)


def test_the_report_names_toward_s_suspects_by_class(checkpoints, leaning, tmp_path):
    """The reviewer sees which classes toward read (head's most deviant, by its own z) and which
    one's change points at another class: here class 3, moved toward class 7."""
    from components.gate import GateResult
    from components.report import write_report

    refs, fresh, _ = checkpoints
    composite = make_reference("head+classifier")
    composite.members["head"] = HeadReference(rank=16, share=True, toward=True)
    composite.fit(refs).calibrate(fresh)
    a = composite.assess(leaning)
    result = GateResult(
        model="facenet", version="1", verdict=a.decision.verdict, reason=a.decision.reason, scores=a.scores
    )
    png, page = write_report(tmp_path, composite, a.vector_scores, result, a.evidence)
    row = next(r for r in page.read_text().split("<tr>") if r.startswith("<td>head.toward</td>"))
    least = row.split("<td>")[-1]
    assert least.startswith("class 3 ("), row
    z = -a.vector_scores["head"][:10]
    assert [f"class {i}" in row for i in np.argsort(z)[::-1][:5]] == [True] * 5  # the suspects, named
    assert png.stat().st_size > 0
