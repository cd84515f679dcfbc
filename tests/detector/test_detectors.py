"""The new detectors (classifier, spectrum, fusion) and the composite reference, on networks our
own trainer made: a small face set, a fixture trunk, real poisoned fine-tunes. Seeds are fixed;
nothing is redrawn until a detector agrees."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from components.trainer.synth import list_images
from detector.classifier import effective_classifier
from detector.config import ReferenceConfig
from detector.detectors import load_reference, make_reference
from detector.errors import InvalidCheckpoint, InvalidReference
from detector.head import HeadReference
from detector.weights import CLASSES_KEY, read_tensors
from tests.conftest import FACE_NETS_PAIRS as PAIRS
from tests.conftest import FACE_NETS_SIZE as SIZE

#: the default gate's deciding parts: head, its offset share and toward beside the margins, output-spectrum, margins
GATE_PARTS = ("head", "head.offset-share", "head.toward", "output-spectrum", "margins")

# every test here uses networks the module's fixture trains
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nets(face_nets):
    """8 reference + 6 calibration clean networks, 3 backdoored (known victims), all on disk (conftest)."""
    return face_nets


@pytest.fixture(scope="module")
def fitted(nets):
    """``fitted(name)``: a reference fitted on the module's networks and calibrated, once per
    detector (tests only read it; refitting ``head`` in every test was half the torch-mirror
    test's 54 s)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            base = {"base": nets["base"]} if "spectrum" in name else {}
            cache[name] = make_reference(name).fit(nets["reference"], **base).calibrate(nets["calibration"])
        return cache[name]

    return get


def test_backdoors_took(nets):
    assert min(nets["asr"]) >= 0.8, nets[
        "asr"
    ]  # the backdoors work (9 triggered test images each); else the tests below prove nothing


def test_trainer_records_the_class_list(nets):
    tensors, _ = read_tensors(nets["reference"][0])
    assert json.loads(tensors.metadata[CLASSES_KEY]) == nets["classes"]


def test_effective_classifier_is_the_linear_map_from_features_to_centred_logits(nets):
    tensors, _ = read_tensors(nets["reference"][0])
    from components.trainer.train import Head

    head = Head(nets["base"], len(nets["classes"]), seed=0)
    head.load_state_dict({k: v for k, v in tensors.items() if k.startswith(("last_linear.", "last_bn.", "logits."))})
    head.eval()
    x = torch.randn(5, 1792)
    with torch.no_grad():
        logits = head(x).double().numpy()
    A = effective_classifier(tensors)
    lin = x.double().numpy() @ A.T
    # equal up to a per-sample constant (the softmax's shift) and the per-class BN shift + bias
    d = (logits - logits.mean(1, keepdims=True)) - lin
    assert np.allclose(d - d[0], 0, atol=1e-4)


def test_the_head_matrix_is_float32_and_matches_float64(nets):
    """The gate's largest array at CASIA size is [A | b]: float32 halves its memory and the first
    touches that are most of a fresh gate's time (README, cost); in float64 it is the same map."""
    from detector.head import effective_offsets, head_matrix

    tensors, _ = read_tensors(nets["reference"][0])
    H = head_matrix(tensors)
    assert H.dtype == np.float32
    exact = np.column_stack([effective_classifier(tensors), effective_offsets(tensors)])
    assert exact.dtype == np.float64 and np.allclose(H, exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())


def test_classifier_blocks_backdoors_and_names_their_victims(nets, fitted):
    ref = fitted("classifier")
    assert ref.classes_ == nets["classes"]
    bad = [ref.assess(p) for p in nets["backdoored"]]
    assert all(a.decision.verdict == "blocked" for a in bad), [a.scores for a in bad]
    # the evidence points at the attack's pair (victim or impostor); which of the two is the
    # victim is measured by `paper` (on this random fixture trunk it is often the impostor)
    named = [(a.evidence.suspect.suspected_class, a.evidence.suspect.suspected_impostor) for a in bad]
    assert sum(set(n) & set(pair) != set() for n, pair in zip(named, PAIRS)) >= 2, (named, PAIRS)
    # the suspect and the runner-up are the two most deviant classes of the network
    for a in bad:
        z = sorted(-np.asarray(a.vector_scores["classes"]))[::-1]
        assert sorted([a.evidence.suspect.suspected_z, a.evidence.suspect.runner_up_z], reverse=True) == [z[0], z[1]]


def test_a_lone_anomalous_class_is_the_suspect_not_the_noise_beside_it(nets, fitted):
    """When only one class is beyond what the threshold lets a class reach, it is the suspect and
    no impostor is named (the "points at the other's row" rule once swapped a victim at 9.7 sigma
    for a class at 0.3 sigma)."""
    ref = fitted("classifier")
    z_cut = -ref.thresholds_["classes"]
    lone = 0
    for path, victim in zip(nets["backdoored"], nets["victims"]):
        a = ref.assess(path)
        if a.evidence.suspect.runner_up_z <= z_cut:
            lone += 1
            assert a.evidence.suspect.suspected_class == victim and a.evidence.suspect.suspected_impostor is None, (
                a.evidence
            )
    assert lone >= 1  # the fixture has such a backdoor (victim id00000), else this proves nothing


def test_reference_networks_with_different_class_lists_are_refused(nets, tmp_path):
    other = list(reversed(nets["classes"]))
    relabelled = []
    for i, path in enumerate(nets["reference"][:3]):
        tensors, _ = read_tensors(path)
        relabelled.append(str(tmp_path / f"relabelled{i}.safetensors"))
        save_file(dict(tensors), relabelled[-1], metadata={CLASSES_KEY: json.dumps(other)})
    with pytest.raises(ValueError, match="disagree on the class list"):
        make_reference("classifier").fit([*nets["reference"][:3], relabelled[0]])
    assert make_reference("classifier").fit(relabelled).classes_ == other


def test_spectrum_sees_a_low_rank_update(nets, fitted):
    ref = fitted("spectrum")
    clean = [ref.score(p)["spectrum"] for p in nets["calibration"]]
    bad = [ref.score(p)["spectrum"] for p in nets["backdoored"]]
    # higher = more typical: backdoored networks score lower; scikit-learn's AUC with backdoored = 1
    assert roc_auc_score([0] * len(clean) + [1] * len(bad), -np.array(clean + bad)) >= 0.9


def test_classifier_refuses_another_class_list_or_size(nets, fitted, tmp_path):
    ref = fitted("classifier")
    tensors, _ = read_tensors(nets["backdoored"][0])
    sd = {k: v.contiguous() for k, v in tensors.items()}
    swapped = list(reversed(nets["classes"]))
    save_file(sd, str(tmp_path / "order.safetensors"), metadata={CLASSES_KEY: json.dumps(swapped)})
    save_file(sd, str(tmp_path / "none.safetensors"))
    bigger = dict(
        sd,
        **{
            "logits.weight": torch.cat([sd["logits.weight"], sd["logits.weight"][:1]]),
            "logits.bias": torch.cat([sd["logits.bias"], sd["logits.bias"][:1]]),
        },
    )
    save_file(
        bigger, str(tmp_path / "size.safetensors"), metadata={CLASSES_KEY: json.dumps(nets["classes"] + ["id99999"])}
    )
    for name, msg in (
        ("order", "class list differs"),
        ("none", "records no class list"),
        ("size", "class list differs"),
    ):
        with pytest.raises(InvalidCheckpoint, match=msg):
            ref.assess(str(tmp_path / f"{name}.safetensors"))


def test_composite_artifact_round_trips_and_refuses_an_edited_member(nets, tmp_path):
    ref = (
        make_reference("fusion", ReferenceConfig(grid=(1, 2, 5)), evidence=("gmm",))  # a short AIC sweep
        .fit(nets["reference"], base=nets["base"])
        .calibrate(nets["calibration"])
    )
    ref.save(tmp_path / "ref")
    back = load_reference(tmp_path / "ref")
    for p in nets["backdoored"] + nets["calibration"][:2]:
        a, b = ref.assess(p), back.assess(p)
        assert a.scores == b.scores and a.decision == b.decision
        assert set(a.evidence.scores) == {"gmm.forward", "gmm.backward"}
    assert back.detector == "fusion" and set(back.thresholds_) == {"classifier", "spectrum"}

    # the fused rule is "any part below its threshold" with thresholds from one cut on the fused score,
    # each calibration network standardised by the others' median and lower semi-deviation (with 6:
    # the lowest of those)
    def lower(x):
        med = np.median(x)
        return med, np.sqrt(np.mean((med - x[x < med]) ** 2))

    cal = {p: np.asarray(s) for p, s in back.calibration_scores_.items()}
    n = len(nets["calibration"])
    assert all(s.size == n for s in cal.values())
    loo = [min((s[i] - (o := lower(np.delete(s, i)))[0]) / o[1] for s in cal.values()) for i in range(n)]
    assert back.fused_threshold_ == pytest.approx(min(loo))
    for p, (m, s) in back.standardisation_.items():
        assert (m, s) == pytest.approx(lower(cal[p]))
        assert back.thresholds_[p] == pytest.approx(m + min(loo) * s)
    # an edit of a member (its thresholds), re-hashed by the editor, is still refused by the composite's record
    member = tmp_path / "ref" / "members" / "classifier" / "reference.json"
    meta = json.loads(member.read_text())
    meta["views"]["classes"]["threshold"] = -1e300
    from detector.artifact import _digest

    meta["artifact_sha256"] = _digest(meta)
    member.write_text(json.dumps(meta))
    with pytest.raises(InvalidReference, match="member classifier"):
        load_reference(tmp_path / "ref")


def test_score_cli_names_the_suspected_class_of_a_blocked_model(nets, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "backdoor_gate.cli", *a], capture_output=True, text=True, env=env, timeout=600
        )

    fit = ["reference", "fit", "--out", str(tmp_path / "ref"), "--base", str(nets["root"] / "base.pt")]
    fit += ["--grid", "1,2,5", "--json", *nets["reference"], "--calibrate", *nets["calibration"]]
    # the default judges on a face gallery: without one, refused before a network is read
    p = run(*fit)
    assert p.returncode == 2 and "--gallery FACE_DIR" in p.stderr and "--detector head+output-spectrum" in p.stderr
    assert not (tmp_path / "ref").exists()
    p = run(*fit, "--gallery", str(nets["data"]), "--gallery-image-size", str(SIZE))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["detector"] == "head+output-spectrum+margins" and out["evidence"] == ["gmm"]  # the default
    assert out["n_calibration"] == 6
    # a clean network the cut leaves room for: the calibration network the fitted reference scores
    # highest (the gallery is a fresh random draw, so which one falls nearest the cut varies: with 6
    # networks the cut is the lowest leave-one-out z, and one may sit just below it in-sample)
    fitted = load_reference(tmp_path / "ref")
    cal = fitted.calibration_scores_
    fused = [fitted.fused({p: s[i] for p, s in cal.items()}) for i in range(len(nets["calibration"]))]
    clean = nets["calibration"][int(np.argmax(fused))]
    p = run("score", "--reference", str(tmp_path / "ref"), "--json", nets["backdoored"][0], clean)
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert p.returncode == 1 and [r["verdict"] for r in lines] == ["blocked", "passed"]
    assert lines[0]["suspected_class"] in nets["classes"] and "suspected_class" not in lines[1]
    assert set(lines[0]["scores"]) == set(lines[0]["thresholds"]) == set(GATE_PARTS)
    assert set(lines[0]["evidence_scores"]) == {"gmm.forward", "gmm.backward"}


def test_reference_fit_keeps_a_secret_gallery_and_the_margins_decide(nets, tmp_path):
    """``reference fit --gallery``: the margins part decides beside the default's, a fresh random
    draw of the gallery each fit (kept in the artifact), and galleries of other people refused."""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def fit(out, gallery, *extra):
        return subprocess.run(
            [sys.executable, "-m", "backdoor_gate.cli", "reference", "fit", "--out", str(out), "--json"]
            + ["--detector", "head+output-spectrum+margins", "--evidence", "", "--base", str(nets["root"] / "base.pt")]
            + ["--gallery", str(gallery), "--gallery-image-size", str(SIZE), "--gallery-people", "4"]
            + ["--gallery-faces", "8", *extra, *nets["reference"], "--calibrate", *nets["calibration"]],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )

    p = fit(tmp_path / "a", nets["data"])
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["detector"] == "head+output-spectrum+margins"
    ref = load_reference(tmp_path / "a")
    assert set(ref.thresholds_) == set(GATE_PARTS)
    kept = ref.members_["margins"].gallery_
    assert kept.features.shape == (4, 8, 1792) and kept.classes == tuple(nets["classes"])
    scores = [ref.score(n) for n in nets["backdoored"]]
    assert all(set(s) == set(GATE_PARTS) for s in scores)
    assert fit(tmp_path / "b", nets["data"]).returncode == 0
    again = load_reference(tmp_path / "b").members_["margins"].gallery_
    assert not np.array_equal(again.features, kept.features)  # no fixed seed: each fit draws anew
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, c in enumerate(nets["classes"]):
        (renamed / f"person{i:02d}").symlink_to(nets["data"] / c)
    p = fit(tmp_path / "c", renamed)
    assert p.returncode == 2 and "not the networks' class list" in p.stderr, p.stderr
    p = fit(tmp_path / "d", tmp_path / "missing")
    assert p.returncode == 2 and "not a directory" in p.stderr, p.stderr
    p = fit(tmp_path / "e", nets["data"], "--detector", "head")  # the last --detector wins
    assert p.returncode == 2 and "head reads none" in p.stderr, p.stderr
    assert not any((tmp_path / d).exists() for d in "cde")


def test_the_gallery_says_how_many_faces_it_drew_when_the_folder_has_fewer_people(nets):
    """A progress bar sized by ``--gallery-people`` would never finish on a smaller folder."""
    from components.trainer.features import gallery_of

    told, done = [], []
    g = gallery_of(
        nets["data"],
        nets["root"] / "base.pt",
        people=1000,
        faces=2,
        image_size=SIZE,
        progress=done.append,
        total=told.append,
    )
    assert told == [2 * len(nets["classes"])] == [sum(done)] and g.features.shape[:2] == (len(nets["classes"]), 2)


def test_a_folder_whose_people_have_uneven_faces_gives_a_gallery_of_those_with_enough(nets, tmp_path):
    """CASIA-WebFace has identities of two images: the default's gallery (16 faces a person) is drawn
    among the people with enough faces, over the networks' whole class list."""
    from components.trainer.features import gallery_of

    short = set(nets["classes"][:3])
    for person in sorted(p for p in Path(nets["data"]).iterdir() if p.is_dir()):
        (tmp_path / person.name).mkdir()
        for face in sorted(person.iterdir())[: 2 if person.name in short else None]:
            (tmp_path / person.name / face.name).symlink_to(face)
    g = gallery_of(tmp_path, nets["root"] / "base.pt", people=1000, faces=4, image_size=SIZE)
    assert g.classes == tuple(nets["classes"]) and g.features.shape[:2] == (len(nets["classes"]) - 3, 4)
    assert not short & {g.classes[s] for s in g.sources}


def test_the_reference_pipelines_steps_build_and_read_the_gallery(nets, tmp_path):
    """make_gallery (trainer image) writes the draw for a detector with margins (the default: the
    pipeline's empty parameter) and nothing for a weights-only one; fit_reference (gate image) reads
    it and refuses to fit such a detector without one."""
    from safetensors.torch import save_file

    from components import tasks
    from detector.margins import load_gallery

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file({k: v.contiguous() for k, v in nets["base"].items()}, str(base_dir / tasks.BASE_FILE))
    kw = dict(people=4, faces=8, image_size=SIZE)
    margins = "head+output-spectrum+margins"
    none = tasks.make_gallery(
        str(nets["data"]), str(base_dir), str(tmp_path / "none"), detector="head+output-spectrum", **kw
    )
    assert none == {"gallery": False} and not any((tmp_path / "none").iterdir())
    made = tasks.make_gallery(str(nets["data"]), str(base_dir), str(tmp_path / "g"), detector="", **kw)
    assert made == {"gallery": True, "people": 4, "faces": 8}
    fit = lambda out, gallery: tasks.fit_reference(  # noqa: E731
        nets["reference"],
        nets["calibration"],
        str(out),
        base=str(base_dir),
        detector=margins,
        evidence=(),
        gallery_dir=gallery,
    )
    with pytest.raises(ValueError, match="no gallery"):
        fit(tmp_path / "r0", str(tmp_path / "none"))
    out = fit(tmp_path / "ref", str(tmp_path / "g"))
    assert set(out["parts"]) == set(GATE_PARTS) and out["detector"] == margins
    kept = load_reference(tmp_path / "ref").members_["margins"].gallery_
    assert np.array_equal(kept.features, load_gallery(tmp_path / "g").features) and kept.classes == tuple(
        nets["classes"]
    )


def test_gate_tags_the_suspected_victim_and_the_gmm_evidence(nets, mlflow_server, tmp_path):
    """A reviewer in the MLflow UI sees which identity a blocked model would let an impostor into."""
    from components import gate as G
    from components import tags as T
    from components.config import GateConfig
    from components.reference_store import publish_reference
    from components.registry import MlflowRegistry

    reg = MlflowRegistry(mlflow_server.uri)
    ref = make_reference("fusion", ReferenceConfig(grid=(1, 2, 5)), evidence=("gmm",))
    ref.fit(nets["reference"], base=nets["base"]).calibrate(nets["calibration"]).save(tmp_path / "ref")
    cfg = GateConfig(reference_model="facenet-integrity-reference-fusion")
    publish_reference(reg, tmp_path / "ref", cfg)
    offline = load_reference(tmp_path / "ref").assess(nets["backdoored"][1])
    v = reg.register("facenet-victim", {"model.safetensors": nets["backdoored"][1]}, tags={T.REGISTERED_BY: "bot"})
    r = G.gate("facenet-victim", v.version, registry=reg, config=cfg)
    assert r.verdict == "blocked" and not r.promoted, r.reason
    tags = reg.version("facenet-victim", v.version).tags
    assert tags[T.DETECTOR] == "fusion"
    assert tags[T.SUSPECTED_CLASS] == offline.evidence.suspect.suspected_class == r.suspected_class
    for part in ("gmm.forward", "gmm.backward"):
        assert float(tags[T.evidence_tag(part)]) == offline.evidence.scores[part]
        assert T.evidence_threshold_tag(part) in tags
    assert set(r.scores) == {"classifier", "spectrum"}
    page = reg.download(tags[T.REPORT], tmp_path / "report").read_text()
    assert "Suspected victim identity" in page and tags[T.SUSPECTED_CLASS] in page


# -- head: the whole affine head --------------------------------------------------------------------
def _offsets(tensors) -> np.ndarray:
    """b of ``logits = A·x + b``, written out from the layers (not the detector's own code)."""
    t = {k: v.double().numpy() for k, v in tensors.items()}
    s = t["last_bn.weight"] / np.sqrt(t["last_bn.running_var"] + 1e-3)
    return t["logits.weight"] @ (t["last_bn.bias"] - s * t["last_bn.running_mean"]) + t["logits.bias"]


def test_head_scores_the_offsets_a_bias_only_swap_changes_and_classifier_is_blind_to(nets, fitted, tmp_path):
    """The issue's swap: the impostor's offset lowered, the victim's raised (here through
    ``last_bn.running_mean`` as well as ``logits.bias``): ``classifier`` gives the clean
    network's score exactly, ``head`` blocks it."""
    from lab.adaptive import bias_swap

    clf = fitted("classifier")
    head = fitted("head")
    tensors, _ = read_tensors(nets["calibration"][0])
    clean = {k: v.clone() for k, v in tensors.items()}
    from components.trainer.features import Extractor

    imp, vic = nets["classes"].index("id00002"), nets["classes"].index("id00007")
    items, _ = list_images(nets["root"] / "data")
    X = Extractor(nets["base"], SIZE)([p for p, c in items if c == imp])  # the impostor's faces
    blocked = 0
    for via in ("logits.bias", "last_bn.running_mean"):
        swapped = bias_swap(clean, X, imp, vic, 1.0, via)
        A, b = effective_classifier(swapped), _offsets(swapped)
        assert np.mean((X.astype(np.float64) @ A.T + b).argmax(1) == vic) == 1.0  # the swap works
        assert not torch.equal(swapped[via], clean[via])
        path = tmp_path / f"swap-{via}.safetensors"
        save_file(swapped, str(path), metadata={CLASSES_KEY: json.dumps(nets["classes"])})
        assert clf.score(str(path)) == clf.score(nets["calibration"][0])
        blocked += head.assess(str(path)).decision.verdict == "blocked"
    assert blocked == 2
    assert head.assess(nets["calibration"][0]).decision.verdict == "passed"


def test_head_blocks_backdoors_round_trips_and_needs_every_head_tensor(nets, fitted, tmp_path):
    ref = fitted("head")
    assert all(ref.assess(p).decision.verdict == "blocked" for p in nets["backdoored"])
    ref.save(tmp_path / "ref")
    back = load_reference(tmp_path / "ref")
    for p in nets["backdoored"][:1] + nets["calibration"][:2]:
        a, b = ref.assess(p), back.assess(p)
        assert a.scores == b.scores and a.decision == b.decision
    tensors, _ = read_tensors(nets["calibration"][0])
    save_file(
        {k: v for k, v in tensors.items() if k != "last_bn.running_mean"},
        str(tmp_path / "partial.safetensors"),
        metadata={CLASSES_KEY: json.dumps(nets["classes"])},
    )
    with pytest.raises(InvalidCheckpoint, match="last_bn.running_mean"):
        back.assess(str(tmp_path / "partial.safetensors"))


def test_head_torch_mirror_equals_the_numpy_score(nets, fitted):
    """The lab's white-box attacker differentiates through ``torch_z``: it must be the statistic
    the gate computes, or the attack suite would attack something else. ``head`` builds its
    matrix and projects it in float32 (the checkpoint's precision; the mirror runs in float64): z
    agree to ~1e-5 there (5e-5 seen on a z of 20), to 1e-9 elsewhere (a missing tensor or a wrong
    sign moves z by units)."""
    from lab.adaptive import deciding_parts, torch_anomaly, torch_class_z

    tol = {"head": 2e-4, "classifier": 1e-9, "spectrum": 1e-9, "output-spectrum": 1e-9}
    for name in ("head", "classifier"):
        ref = fitted(name)
        for p in nets["backdoored"][:2] + nets["calibration"][:2]:
            tensors, _ = read_tensors(p)
            t = {k: v.double() for k, v in tensors.items()}
            z = torch_class_z(ref, t).detach().numpy()
            assert np.allclose(-z, ref.score_vectors(p)["classes"], rtol=1e-9, atol=tol[name]), name
    # a composite's every deciding part, spectrum's thin-basis training mode included, and head's
    # second and third views as the default fits them beside the margins
    views = make_reference("head+output-spectrum")
    views.members["head"] = HeadReference(share=True, toward=True)
    views.fit(nets["reference"], base=nets["base"]).calibrate(nets["calibration"])
    tol["head.offset-share"] = tol["head.toward"] = 2e-4
    for name, ref in (
        ("head+spectrum", fitted("head+spectrum")),
        ("head+output-spectrum", fitted("head+output-spectrum")),
        ("head+head.offset-share+head.toward+output-spectrum", views),
    ):
        names = name.split("+")
        parts = deciding_parts(ref)
        assert [-cut for _, cut in parts] == [ref.thresholds_[n] for n in names]
        for p in nets["backdoored"][:2] + nets["calibration"][:2]:
            tensors, _ = read_tensors(p)
            t = {k: v.double() for k, v in tensors.items()}
            scores = ref.score(p)
            for (est, _), part in zip(parts, names):
                for basis in (None, {}):
                    z = torch_anomaly(est, t, basis).detach().numpy()
                    assert np.isclose(-z.max(), scores[part], rtol=1e-9, atol=tol[part]), (part, basis)


def test_output_spectrum_ignores_noise_the_logits_cannot_see(nets, fitted, tmp_path):
    """The lab's invisible noise (``last_linear`` moved where ``logits·diag(bn)`` is blind) flattens
    the plain spectrum of a backdoored network until it passes; ``output-spectrum`` scores the
    same network exactly as before, also after a save and load."""
    from lab.adaptive import invisible_noise

    refs = {d: fitted(d) for d in ("spectrum", "output-spectrum")}
    refs["output-spectrum"].save(tmp_path / "os")
    loaded = load_reference(tmp_path / "os")
    for p in nets["backdoored"]:
        t = {k: v.double() for k, v in read_tensors(p)[0].items()}
        noisy = invisible_noise(t, nets["base"]["last_linear.weight"], 0.6, np.random.default_rng(0))
        before, after = (refs["spectrum"].score(x)["spectrum"] for x in (t, noisy))
        assert after > before + 1.0 and after > refs["spectrum"].thresholds_["spectrum"], (before, after)
        os_before, os_after = (refs["output-spectrum"].score(x)["spectrum"] for x in (t, noisy))
        assert os_after == pytest.approx(os_before, abs=1e-6)
        assert loaded.score(noisy)["spectrum"] == pytest.approx(os_after, abs=1e-9)


def test_head_report_plots_the_classes_and_names_the_network_shape(nets, fitted, tmp_path):
    """head's vector scores end with the network's shape z: the report must not take it for a
    class (it once indexed the class list with it)."""
    from components.gate import GateResult
    from components.report import write_report

    ref = fitted("head")
    a = ref.assess(nets["backdoored"][0])
    assert a.vector_scores["classes"].size == len(nets["classes"]) + 1
    result = GateResult(
        model="facenet", version="1", verdict=a.decision.verdict, reason=a.decision.reason, scores=a.scores
    )
    # a diluted network's shape is its least typical entry: listed by name, not as a class
    diluted = {"classes": a.vector_scores["classes"].copy()}
    diluted["classes"][-1] = diluted["classes"].min() - 50.0
    _, page = write_report(tmp_path, ref, diluted, result, a.evidence)
    assert "the network's shape" in page.read_text()
    # a suspect with no runner-up (a one-class head, or the only anomalous class) is still named
    assert result.verdict == "blocked"
    lone = dataclasses.replace(a.evidence, suspect=dataclasses.replace(a.evidence.suspect, runner_up_z=None))
    _, page = write_report(tmp_path / "lone", ref, diluted, result, lone)
    text = page.read_text()
    assert (
        "Suspected victim identity" in text and a.evidence.suspect.suspected_class in text and "runner-up" not in text
    )


def test_head_leave_one_out_threshold_without_held_out_networks(nets):
    """`reference fit` without --calibrate: each reference network scored in the others' metric."""
    ref = make_reference("head").fit(nets["reference"]).calibrate()
    assert ref.threshold_source_ == "leave-one-out" and np.isfinite(ref.thresholds_["classes"])
    assert ref.calibration_vector_scores_["classes"].shape == (len(nets["reference"]), len(nets["classes"]) + 1)
    est = ref.views_["classes"]
    with pytest.raises(ValueError, match="fitted on"):
        est.leave_one_out_vector_scores(ref._reference_matrices[::-1])
