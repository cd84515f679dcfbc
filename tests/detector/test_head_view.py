"""`head`'s per-class view on small synthetic heads (no training): the std floor (a lab lead,
off by default) and that an artifact keeps it."""

from __future__ import annotations

import numpy as np
import pytest

from detector.head import DEFAULT_STD_FLOOR, HeadDeviationView, head_matrix


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


def test_the_share_entry_flags_a_deviation_carried_by_one_direction(checkpoints):
    refs, fresh, shifted = checkpoints
    H = [head_matrix(t) for t in refs]
    plain = HeadDeviationView(rank=16).fit(H)
    share = HeadDeviationView(rank=16, share=True).fit(H)
    for t in [*fresh, shifted]:
        a, b = plain.score_vectors(head_matrix(t)), share.score_vectors(head_matrix(t))
        # off, the vector is what it was (classes, then the shape); on, the share comes last
        assert a.size == 11 and b.size == 12 and np.array_equal(a, b[:11])
    # the moved offset carries its class's deviation: a lower share score than any fresh clean head's
    shares = [share.score_vectors(head_matrix(t))[-1] for t in fresh]
    assert share.score_vectors(head_matrix(shifted))[-1] < min(shares) - 1.0, shares
    assert share.reference_vector_scores_.shape == (16, 12)
    assert share.leave_one_out_vector_scores(H).shape == (16, 12)


def test_the_share_round_trips_and_its_torch_mirror_is_the_numpy_score(checkpoints):
    import torch

    refs, fresh, shifted = checkpoints
    view = HeadDeviationView(rank=16, share=True).fit([head_matrix(t) for t in refs])
    back = HeadDeviationView.restore(view.info(), view.arrays())
    assert back.share and "share" not in HeadDeviationView(rank=16).fit([head_matrix(t) for t in refs]).info()
    for t in [fresh[0], shifted]:
        v = view.score_vectors(head_matrix(t))
        assert np.array_equal(back.score_vectors(head_matrix(t)), v)
        zc, zn = view.torch_z({k: torch.as_tensor(x, dtype=torch.float64) for k, x in t.items()})
        assert np.allclose(-np.concatenate([zc.numpy(), zn.numpy()]), v, atol=1e-4)
