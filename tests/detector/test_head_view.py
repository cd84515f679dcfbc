"""`head`'s per-class view on small synthetic heads (no training): the std floor (a lab lead,
off by default) and that an artifact keeps it."""

from __future__ import annotations

import numpy as np
import pytest

from detector.head import DEFAULT_STD_FLOOR, HeadDeviationView


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
