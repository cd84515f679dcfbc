"""The reference estimator, thresholds at a target FRR, AUC, and the artifact on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from detector.artifact import ARRAYS_FILE, META_FILE
from detector.config import ReferenceConfig
from detector.decision import decide
from detector.detectors import load_reference
from detector.errors import InvalidCheckpoint, InvalidReference, NotFittedError
from detector.evaluation import roc_auc
from detector.gmm_view import ViewReference
from detector.reference import Reference
from detector.threshold import median_mad, rejection_rate, threshold_at_frr
from lab.synthetic import FamilyConfig, WeightFamily

SMALL_GRID = (1, 2, 5, 10, 24, 32)


def _config(**kw):
    return ReferenceConfig(grid=SMALL_GRID, **kw)


def test_view_reference_is_an_sklearn_estimator(family):
    mats = [family.clean() for _ in range(6)]
    est = ViewReference(view="backward", n_components="auto", grid=SMALL_GRID)
    assert est.fit(mats) is est
    assert est.get_params()["view"] == "backward"
    assert est.n_vectors_ == 24 and est.n_networks_ == 6
    assert 1 <= est.n_pca_ <= 32 and est.explained_variance_ >= 0.95
    assert [r["n_components"] for r in est.selection_] == [1, 2, 5, 10, 24, 32]
    assert est.n_components_ == min(est.selection_, key=lambda r: r["aic"])["n_components"]
    per_vector = est.score_vectors(mats[0])
    assert per_vector.shape == (24,) and np.isclose(per_vector.sum(), est.score(mats[0]))
    with pytest.raises(NotFittedError):
        ViewReference().score(mats[0])


def test_grid_is_capped_at_the_number_of_reference_vectors(family):
    est = ViewReference(view="backward", n_components="auto", grid=(1, 2, 500, 3000))
    est.fit([family.clean() for _ in range(3)])
    assert [r["n_components"] for r in est.selection_] == [1, 2]  # 3 x 24 = 72 vectors


@pytest.mark.parametrize("view", ["forward", "backward"])
def test_one_gaussian_per_neuron_is_the_mixture_the_aic_sweep_picks(family, view):
    """The default skips the sweep: where AIC picks N_G = vectors per network (as on this
    family), ``neurons`` must give that very mixture, bit for bit."""
    mats = [family.clean() for _ in range(8)]
    swept = ViewReference(view=view, n_components="auto", grid=SMALL_GRID).fit(mats)
    direct = ViewReference(view=view).fit(mats)
    assert swept.n_components_ == swept.n_vectors_  # the premise: AIC chose one per neuron
    assert direct.n_components_ == direct.n_vectors_ and len(direct.selection_) == 1
    assert direct.selection_[0]["init"] == "neuron"
    for key, a in swept.arrays().items():
        np.testing.assert_array_equal(direct.arrays()[key], a, err_msg=key)


@pytest.mark.parametrize("value, expected", [("neurons", "neurons"), ("auto", "auto"), ("7", 7), (3, 3)])
def test_components_accepts_a_rule_or_a_size(value, expected):
    assert ReferenceConfig(components=value).components == expected


@pytest.mark.parametrize("value", ["many", "0", -2])
def test_components_refuses_anything_else_clearly(value):
    with pytest.raises(ValueError, match="'neurons', 'auto' or a positive int"):
        ReferenceConfig(components=value)


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_backdoored_networks_score_lower_in_both_views(cov):
    # a clear rank-1 change (as large as one run's noise) must be caught by every model
    family = WeightFamily(FamilyConfig(out_features=24, in_features=32, backdoor_strength=1.0, seed=3))
    ref = Reference(_config(covariance=cov)).fit([family.clean() for _ in range(10)])
    clean = [ref.score(family.clean()) for _ in range(8)]
    bad = [ref.score(family.backdoored()) for _ in range(8)]
    for v in ("forward", "backward"):
        auc = roc_auc([s[v] for s in clean], [s[v] for s in bad])
        assert auc >= 0.95, (v, cov, auc)


def test_threshold_arithmetic():
    s = np.arange(20.0)  # 0..19
    assert threshold_at_frr(s, 0.05) == 0.0  # (k+1)/21 <= 0.05 only for k = 0: the lowest score
    assert rejection_rate(s, threshold_at_frr(s, 0.05)) == 0.0
    assert threshold_at_frr(s, 0.0) == 0.0
    assert threshold_at_frr(s, 0.25) == 4.0 and rejection_rate(s, 4.0) == 0.2  # (4+1)/21 <= 0.25 < 6/21
    assert threshold_at_frr(np.arange(41.0), 0.05) == 1.0  # 2/42 <= 0.05: one of 41 may fall below
    assert threshold_at_frr(np.arange(12.0), 0.05) == 0.0  # n < 1/frr - 1: the lowest clean score
    for frr in (0.01, 0.05, 0.1, 0.3):
        assert rejection_rate(s, threshold_at_frr(s, frr)) <= frr
    with pytest.raises(ValueError):
        threshold_at_frr([], 0.05)


def test_a_new_clean_network_is_rejected_at_most_at_the_target_frr():
    """What the threshold promises is about networks it has not seen: over many draws of 20
    calibration scores, a fresh clean score falls below it at most 5 % of the time (the old
    rule, k = floor(0.05·20) = 1, gave 2/21 = 9.5 %)."""
    rng = np.random.default_rng(0)
    trials, n = 20000, 20
    cal = rng.standard_normal((trials, n))
    fresh = rng.standard_normal(trials)
    rejected = np.mean([f < threshold_at_frr(c, 0.05) for c, f in zip(cal, fresh)])
    assert abs(rejected - 1 / 21) < 0.006 and rejected <= 0.05 + 0.003, rejected


def test_a_new_clean_network_is_rejected_at_most_at_the_target_frr_by_the_fused_cut():
    """The same promise for the composite's cut over five parts, each standardised by the
    calibration networks' median and lower semi-deviation: a fresh network is standardised by
    networks it is not among, so each calibration network must be too (standardised in-sample, the
    lowest of 20 sat too high: 6.2 % of fresh networks fell below it here with the MAD)."""
    from detector.composite import fused_cut

    rng = np.random.default_rng(1)
    trials, n, parts = 3000, 20, 5
    cal, fresh = rng.standard_normal((trials, n, parts)), rng.standard_normal((trials, parts))
    rejected = []
    for c, f in zip(cal, fresh):
        st, cut, thresholds = fused_cut({j: c[:, j] for j in range(parts)}, 0.05)
        z = min((f[j] - st[j][0]) / st[j][1] for j in range(parts))
        assert (z < cut) == any(f[j] < thresholds[j] for j in range(parts))  # the cut in each part's units
        rejected.append(z < cut)
    assert np.mean(rejected) <= 0.05, np.mean(rejected)
    # by hand, on four networks of one part: each standardised by the other three's median and
    # lower semi-deviation (of three, one is below their median: its distance)
    s = np.array([0.0, 1.0, 2.0, 10.0])
    loo = [(0.0 - 2.0) / 1.0, (1.0 - 2.0) / 2.0, (2.0 - 1.0) / 1.0, (10.0 - 1.0) / 1.0]
    st, cut, thresholds = fused_cut({"a": s}, 0.25)  # (k+1)/5 <= 0.25: the lowest of the four
    spread = np.sqrt((1.5**2 + 0.5**2) / 2)  # all four: median 1.5, below it 0 and 1
    assert st["a"] == pytest.approx((1.5, spread)) and cut == pytest.approx(min(loo)) == -2.0
    assert thresholds["a"] == pytest.approx(1.5 - 2.0 * spread)


def test_a_light_tailed_part_keeps_its_threshold_in_its_own_tail_beside_a_heavy_tailed_one():
    """Why each part is standardised by its lower tail: one cut in standardised units serves every
    part. With one heavy-tailed part (Student t, 2 degrees of freedom) and four normal ones, 40
    calibration networks, a network 4 sigma low on one normal part only (no clean network goes
    there: P < 4e-5 a draw) is blocked in 95 % of draws; in MAD units the heavy part's lows set the
    cut near -3.4 and it was blocked in 70 %. Fresh clean networks stay near the target."""
    from detector.composite import fused_cut

    rng = np.random.default_rng(2)
    blocked, rejected = [], []
    for _ in range(400):
        c = np.column_stack([rng.standard_t(2, 40), rng.standard_normal((40, 4))])
        _, _, thresholds = fused_cut({j: c[:, j] for j in range(5)}, 0.05)
        fresh = np.concatenate([rng.standard_t(2, 1), rng.standard_normal(4)])
        low = np.array([0.0, -4.0, 0.0, 0.0, 0.0])
        blocked.append(any(low[j] < thresholds[j] for j in range(5)))
        rejected.append(any(fresh[j] < thresholds[j] for j in range(5)))
    assert np.mean(blocked) >= 0.9, np.mean(blocked)
    assert np.mean(rejected) <= 0.07, np.mean(rejected)


def test_median_mad_is_the_scaled_median_absolute_deviation():
    # by hand: median 3; |x - 3| = 2, 1, 0, 1, 97 -> median 1; times 1.4826
    med, mad = median_mad(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert med == 3.0 and mad == pytest.approx(1.4826)
    med, mad = median_mad(np.array([[1.0, 10.0], [2.0, 10.0], [4.0, 13.0]]), axis=0)
    assert med.tolist() == [2.0, 10.0] and mad == pytest.approx([1.4826, 0.0])


def test_decision_rule_blocks_if_any_view_is_below():
    t = {"forward": -10.0, "backward": 5.0}
    assert decide({"forward": -10.0, "backward": 5.0}, t).verdict == "passed"  # at threshold passes
    d = decide({"forward": -9.0, "backward": 4.9}, t)
    assert d.verdict == "blocked" and d.below == ("backward",) and "backward score" in d.reason
    assert decide({"forward": -11.0, "backward": 4.0}, t).below == ("forward", "backward")
    assert decide({"forward": 0.0}, t).verdict == "invalid"


def test_auc_matches_sklearn_with_lower_meaning_backdoored(rng):
    c, b = rng.normal(1, 1, 30), rng.normal(0, 1, 20)
    b[:3] = c[:3]  # ties count one half
    y = np.r_[np.zeros(30), np.ones(20)]
    assert np.isclose(roc_auc(c, b), roc_auc_score(y, -np.r_[c, b]))
    assert roc_auc([1, 2], [0]) == 1.0 and roc_auc([0], [1, 2]) == 0.0


def test_calibration_held_out_and_leave_one_out(family):
    mats = [family.clean() for _ in range(8)]
    held = [family.clean() for _ in range(20)]
    ref = Reference(_config(frr=0.1)).fit(mats).calibrate(held)
    assert ref.threshold_source_ == "held-out"
    for v, t in ref.thresholds_.items():
        assert ref.frr_empirical_[v] <= 0.1
        assert t == threshold_at_frr([ref.score(h)[v] for h in held], 0.1)
    loo = Reference(_config(frr=0.1)).fit(mats).calibrate()
    assert loo.threshold_source_ == "leave-one-out"
    for v, est in loo.views_.items():
        # a held-out score is lower than the in-sample one: LOO is the honest stand-in
        assert np.all(loo.calibration_scores_[v] < est.reference_scores_)
    assert 0.0 <= loo.frr_empirical_["combined"] <= 0.2


def test_artifact_round_trip_gives_identical_scores(tmp_path, family_files):
    ref = Reference(_config()).fit(family_files["reference"]).calibrate(family_files["heldout"])
    digest = ref.save(tmp_path / "artifact")
    loaded = load_reference(tmp_path / "artifact")
    assert loaded.artifact_sha256_ == digest
    for p in family_files["backdoored"][:2] + family_files["heldout"][:2]:
        assert loaded.score(p) == pytest.approx(ref.score(p), rel=1e-12)
        assert loaded.decide(loaded.score(p)) == ref.decide(ref.score(p))
    meta = json.loads((tmp_path / "artifact" / META_FILE).read_text())
    assert meta["layer"] == "last_linear.weight" and meta["n_reference"] == 10
    assert meta["threshold_source"] == "held-out" and meta["n_calibration"] == 6
    assert {c["sha256"] for c in meta["reference_checkpoints"]} == {
        __import__("detector.weights", fromlist=["sha256_file"]).sha256_file(p) for p in family_files["reference"]
    }
    for v in ("forward", "backward"):
        assert meta["views"][v]["pca_dims"] >= 1 and meta["views"][v]["selection"]
    with np.load(tmp_path / "artifact" / ARRAYS_FILE, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    with pytest.raises(FileExistsError):
        ref.save(tmp_path / "artifact")


def test_tampered_artifacts_are_refused(tmp_path, family_files):
    ref = Reference(_config()).fit(family_files["reference"]).calibrate()
    ref.save(tmp_path / "ok")
    import shutil

    # 1. a threshold lowered in the metadata
    shutil.copytree(tmp_path / "ok", tmp_path / "t1")
    meta = json.loads((tmp_path / "t1" / META_FILE).read_text())
    meta["views"]["forward"]["threshold"] -= 1e6
    (tmp_path / "t1" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(InvalidReference, match="tampered"):
        load_reference(tmp_path / "t1")
    # 2. GMM arrays swapped, metadata untouched
    shutil.copytree(tmp_path / "ok", tmp_path / "t2")
    with np.load(tmp_path / "t2" / ARRAYS_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["forward.gmm_means"] = arrays["forward.gmm_means"] * 0
    np.savez(tmp_path / "t2" / ARRAYS_FILE, **arrays)
    with pytest.raises(InvalidReference, match="tampered: arrays.npz"):
        load_reference(tmp_path / "t2")
    # 3. missing pieces
    with pytest.raises(InvalidReference, match="not a directory"):
        load_reference(tmp_path / "nope")
    (tmp_path / "t3").mkdir()
    with pytest.raises(InvalidReference, match="reference.json missing"):
        load_reference(tmp_path / "t3")


def test_candidate_with_another_shape_is_invalid(family, family_files):
    ref = Reference(_config()).fit(family_files["reference"]).calibrate()
    with pytest.raises(InvalidCheckpoint, match="reference expects"):
        ref.score(np.zeros((24, 31)))


def test_reference_needs_two_networks_of_one_shape(family):
    with pytest.raises(ValueError, match="at least 2"):
        Reference(_config()).fit([family.clean()])
    with pytest.raises(ValueError, match="disagree"):
        Reference(_config()).fit([family.clean(), np.zeros((24, 31))])
