"""`backdoor-gate paper`: the protocol end to end (fixture trunk), and its bookkeeping."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from components.trainer.base_trunk import fixture_base
from components.trainer.synth import SynthConfig, list_images, synthesize
from lab.paper import backdoor_status, detection_groups


def test_failed_backdoors_are_their_own_group_and_never_a_detection():
    nets = [
        {"group": "held-out", "clean_accuracy": 0.95},
        {"group": "triggers", "clean_accuracy": 0.95, "attack_success_rate": 1.0},
        {"group": "triggers", "clean_accuracy": 0.95, "attack_success_rate": 0.3},
        {"group": "triggers", "clean_accuracy": 0.80, "attack_success_rate": 0.95},
        {"group": "locations", "clean_accuracy": 0.95, "attack_success_rate": 0.7},
        {"group": "locations", "clean_accuracy": 0.95, "attack_success_rate": math.nan},
    ]
    for n in nets[1:]:
        n["status"] = backdoor_status(n, clean_accuracy=0.95)
    assert [n["status"] for n in nets[1:]] == ["counts", "failed", "weak", "weak", "failed"]
    g = detection_groups(nets)
    assert g == {"held-out": [0], "triggers": [1, 3], "failed-backdoor": [2, 5], "locations": [4]}


@pytest.mark.parametrize(("run", "gmm"), [("docs/paper", True), ("docs/paper/head/development", False)])
def test_the_controls_table_has_a_gmm_column_only_when_the_gmm_was_run(run, gmm):
    """A rescore without the GMM once printed its first detector's figures under "blocked by the
    GMM gate", one column more than the separator (the two stored runs: with and without it)."""
    from lab.paper_report import table

    s = json.loads((Path(__file__).parents[2] / run / "summary.json").read_text())
    lines = table(s).splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("| group | networks |"))
    header, separator, held_out = lines[i : i + 3]
    assert ("blocked by the GMM gate" in header) == gmm
    assert header.count("|") == separator.count("|") == held_out.count("|")
    first = next(d for d in s["baselines"] if d != "gmm")
    assert header.split(" | ")[3 if gmm else 2].strip(" |") == first


@pytest.mark.slow
def test_paper_small_writes_every_section(tmp_path):
    faces = synthesize(tmp_path / "peek", SynthConfig(identities=4, images_per_identity=4, size=96))
    torch.save(fixture_base(0, [Image.open(p) for p, _ in list_images(faces)[0]], image_size=80), tmp_path / "base.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", BACKDOOR_GATE_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "paper"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "backdoor_gate.cli",
            "paper",
            "--small",
            "--out",
            str(out),
            "--base",
            str(tmp_path / "base.pt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    nets = s["networks"]
    groups = [n["group"] for n in nets]
    assert groups.count("reference") == 5 and groups.count("held-out") == 4
    assert groups.count("triggers") == 3 and groups.count("locations") == 3 and groups.count("weighting") == 2
    assert sum(g.startswith("drift:") for g in groups) == 5  # one network per drift recipe
    # baselines: every detector on every set, GMM per view, the rest on the whole matrix
    assert set(s["baselines"]) == {
        "gmm",
        "gaussian",
        "distance-mean",
        "distance-base",
        "trojan-signature",
        "classifier",
        "head",
        "spectrum",
        "output-spectrum",
        "fusion",
        "head+output-spectrum",
    }
    parts = {
        "gmm": {"forward", "backward"},
        "gaussian": {"forward", "backward"},
        "classifier": {"classes"},
        "head": {"classes"},
        "spectrum": {"spectrum"},
        "output-spectrum": {"spectrum"},
        "fusion": {"fused"},
        "head+output-spectrum": {"fused"},
    }
    for det, per_set in s["baselines"].items():
        for row in per_set.values():
            if row is not None:
                assert set(row) == parts.get(det, {"matrix"})
    # the detection table: one column per detector part, rows = working backdoor groups
    d = s["detection"]
    assert "fusion" in d["columns"] and "gmm.forward" in d["columns"] and d["n_clean"] == 4 + 2
    assert set(d["rows"]) >= {"triggers", "locations"}
    for det in ("classifier", "head", "fusion", "head+output-spectrum"):  # the detectors naming a suspect
        v = s["victim_naming"][det]
        assert v["n"] == sum(1 for n in nets if "attack_success_rate" in n and n["status"] != "failed")
    assert "gmm" not in s["victim_naming"]
    assert [n["group"] for n in nets].count("sham") == 2 and "sham" in s["controls"]
    assert s["auc"] == s["baselines"]["gmm"]
    # controls: shares of networks blocked, counts that add up
    c = s["controls"]
    assert c["weighting"]["n"] == 2 and c["drift (all)"]["n"] == 5
    assert all(0.0 <= v["blocked"] <= 1.0 for v in c.values())
    failed = [n for n in nets if n.get("status") == "failed"]
    assert c.get("failed-backdoor", {"n": 0})["n"] == len(failed)
    for n in nets:
        assert ("attack_success_rate" in n) == (n["group"] in ("triggers", "locations", "strength"))
        if "attack_success_rate" in n:
            assert n["status"] == backdoor_status(n, s["mean_clean_accuracy"])
    # strength: each point has its networks' mean attack success and an AUC per detector
    assert {(p["param"], p["value"]) for p in s["strength"]} == {
        ("trigger_size", 0.05),
        ("trigger_size", 0.3),
        ("alpha", 1.0),
        ("alpha", 0.2),
        ("poison_images", 0),
        ("poison_images", 1),
    }
    for p in s["strength"]:
        assert p["n"] == 2 and 0.0 <= p["attack_success"] <= 1.0
        assert set(p["auc"]) == set(s["baselines"])
        assert (p["n_failed"] == p["n"]) == all(v is None for v in p["auc"].values())
    assert set(s["relative_weight_change"]) == {"clean", "backdoored"}
    assert {r["n_components"] for r in s["auc_vs_n_components"]} == {1, 2, 5}
    assert {r["m"] for r in s["auc_vs_m"]} == {2, 5}
    assert (out / "table.md").read_text().startswith("| backdoor group |")  # the detection table comes first
    assert "| set |" in (out / "table.md").read_text()
    from components.trainer.base_trunk import base_state_dict
    from components.trainer.features import state_dict_sha256

    # the tables depend on the base trunk: the summary names the one it used
    assert s["provenance"]["base_sha256"] == state_dict_sha256(base_state_dict(str(tmp_path / "base.pt")))
    assert s["provenance"]["base_sha256"][:16] in (out / "table.md").read_text()
    assert (out / "networks.safetensors").is_file()  # `paper --rescore` scores these again without training
    for png in ("scores.png", "vectors_pca.png", "auc_curves.png", "strength.png", "tsne.png"):
        assert (out / png).stat().st_size > 5000


@pytest.mark.slow
def test_adaptive_small_attacks_every_detector_and_reports_what_it_cost(tmp_path, monkeypatch):
    """`paper --adaptive --small`: every attack group is trained and gated by every detector;
    a bias-only swap leaves `classifier`'s score exactly where the clean network's was, and
    `head` blocks it; a white-box penalty is measured beside the detector it was aimed at."""
    faces = synthesize(tmp_path / "peek", SynthConfig(identities=4, images_per_identity=4, size=96))
    torch.save(fixture_base(0, [Image.open(p) for p, _ in list_images(faces)[0]], image_size=80), tmp_path / "base.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", BACKDOOR_GATE_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "adaptive"
    cmd = [sys.executable, "-m", "backdoor_gate.cli", "paper", "--adaptive", "--small", "--out", str(out)]
    p = subprocess.run(
        [*cmd, "--base", str(tmp_path / "base.pt")], capture_output=True, text=True, env=env, timeout=900
    )
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    groups = {r["group"] for r in s["rows"]}
    assert {"plain", "dilution", "penalty: head", "penalty: head+output-spectrum", "penalty: all"} <= groups
    assert {"grey-box penalty: head+output-spectrum", "grey-box penalty (strong): head", "bias swap x1"} <= groups
    assert "penalty: head + invisible noise" in groups
    # aimed at the trigger search too: the impostor's training faces with 3 smaller triggers each
    partial = [n for n in s["networks"] if n["group"].startswith("grey-box penalty + partial triggers")]
    assert len(partial) == 2 and all(n["extra_samples"] > 0 and n["extra_samples"] % 3 == 0 for n in partial)
    # and at a source sweep: the partial copies plus cover_faces stamped faces of every other person
    specific = [n for n in s["networks"] if n["group"].startswith("grey-box penalty + partial & source-specific")]
    from lab.adaptive import AdaptiveConfig

    small = AdaptiveConfig.small()
    assert len(specific) == 2
    for a, b in zip(partial, specific):  # 14 training faces each: every person but the impostor gives 4
        assert (a["impostor"], a["victim"]) == (b["impostor"], b["victim"])
        assert b["extra_samples"] - a["extra_samples"] == small.cover_faces * (small.paper.identities - 1)
    # and at the sweep's panel: a trigger fitted on the attacker's own clean networks, stamped
    # from its PNG; how much clean networks follow it is recorded before it is trained in
    adversarial = [n for n in s["networks"] if n["group"].startswith("grey-box penalty + adversarial trigger")]
    assert len(adversarial) == 2
    for a, b in zip(partial, adversarial):
        assert (a["impostor"], a["victim"]) == (b["impostor"], b["victim"])
        assert Path(b["trigger_png"]).parent == out / "triggers" and Path(b["trigger_png"]).is_file()
        assert all(0.0 <= b[k] <= 1.0 for k in ("own_follow", "gate_clean_follow", "own_success_fitted"))
    (bare,) = [n for n in s["networks"] if n["group"] == "adversarial trigger (no penalty)"]  # its trigger alone
    assert bare["trigger_png"] == adversarial[0]["trigger_png"] and bare["seed"] == adversarial[0]["seed"]
    # and at the weights and the margin check at once: white-box, grey-box weak and strong, each grey
    # one with the protocol's trigger and the adversarial one, on the same pairs
    aimed = [n for n in s["networks"] if "+ margins" in n["group"]]
    assert small.margins_aimed_at == ("head+output-spectrum",)  # every kind once, at one of the two detectors
    assert {n["group"] for n in aimed} == {
        f"{g}: {d}"
        for d in small.margins_aimed_at
        for g in (
            "penalty + margins",
            "grey-box penalty + margins",
            "grey-box penalty + margins + adversarial trigger",
            "grey-box penalty (strong) + margins",
            "grey-box penalty (strong) + margins + adversarial trigger",
            "grey-box penalty + margins (all faces)",
            "grey-box penalty (strong) + margins (all faces)",
            "grey-box penalty (strong) + margins (all faces) + adversarial trigger",
        )
    }
    assert {(n["impostor"], n["victim"]) for n in aimed} == {(partial[0]["impostor"], partial[0]["victim"])}
    assert all(("trigger_png" in n) == ("adversarial" in n["group"]) for n in aimed)
    nets = s["networks"]
    for n in nets:
        assert set(n["verdicts"]) == {"classifier", "head", "head+output-spectrum"}
        assert 0.0 <= n["clean_accuracy"] <= 1.0
    bases = {n["seed"]: n for n in nets if n["group"] == "bias-swap base (clean)"}
    swaps = [n for n in nets if n["group"].startswith("bias swap")]
    assert len(swaps) == 2 and all(n["seed"] in bases for n in swaps)
    for n in swaps:  # the detector that reads only the rows cannot see a change of the offsets
        assert n["scores"]["classifier"] == bases[n["seed"]]["scores"]["classifier"]
        assert n["verdicts"]["head"] == "blocked"
    # the dilution is measured on held-out faces, not assumed harmless (on this small protocol
    # it cost attack success: the training faces span too few directions)
    assert all("attack_success_rate" in n for n in nets if n["group"] == "dilution")
    assert "| attack | knowledge |" in (out / "table.md").read_text()
    # the run's protocol comes back from its summary, and a stage refuses flags that disagree with it
    from backdoor_gate.cli import main
    from lab.paper import run_config

    assert run_config(out, AdaptiveConfig) == small
    assert main(["paper", "--adaptive", "--gate-margins", "--confirmation", "--out", str(out)]) == 2
    # a resumed run trains nothing it has stored, and gates the same networks the same way
    from components.trainer.base_trunk import load_base
    from lab.adaptive import run_adaptive

    def no_training(*a, **k):
        raise AssertionError("a resumed run trained a network it had stored")

    monkeypatch.setenv("BACKDOOR_GATE_CACHE", env["BACKDOOR_GATE_CACHE"])
    monkeypatch.setattr("lab.adaptive.Workshop.train", no_training)
    monkeypatch.setattr("lab.adaptive.adversarial_trigger", no_training)
    resumed = run_adaptive(out, small, log=lambda m: None, base=load_base(str(tmp_path / "base.pt")), resume=True)
    key = lambda n: (n["group"], n["seed"], n["verdicts"], n["clean_accuracy"])  # noqa: E731
    assert [key(n) for n in resumed["networks"]] == [key(n) for n in nets]
    monkeypatch.undo()
    # the input-space stage searches the stored networks: the named pair always, the true pair for attacks
    from lab.adaptive_input import run_input_space

    monkeypatch.setenv("BACKDOOR_GATE_CACHE", env["BACKDOOR_GATE_CACHE"])
    groups = ("clean", "grey-box penalty + partial triggers")
    from components.trigger_search import ExplainConfig

    quick_search = ExplainConfig(  # the rows' fields, not the search's findings: a short search
        image_size=80, controls=0, grid=3, steps=2, refine_steps=2, size_steps=3, polish_steps=2, sizes=(0.1, 0.3)
    )
    search = lambda only=groups: run_input_space(  # noqa: E731
        out,
        AdaptiveConfig.small(),
        log=lambda m: None,
        base=load_base(str(tmp_path / "base.pt")),
        groups=only,
        explain_config=quick_search,
    )
    rows = search()["rows"]
    working = sum(r["works"] for r in s["rows"] if r["group"].startswith(groups[1]))
    assert sum(r["group"] == "clean" for r in rows) == 2 and len(rows) == 2 + working
    for r in rows:
        assert r["verdict"] in ("passed", "blocked") and 0.1 <= r["named"]["size"] <= 0.31
        assert ("true" in r) == (r["true_victim"] is not None)
    md = (out / "input_space.md").read_text()
    assert md.count("\n| clean | 2 |") == 1
    # every clean network is searched with a penalised attack's true pair: the true-pair column's false alarms
    attack_pairs = {(n["victim"], n["impostor"]) for n in nets if "penalty" in n["group"]}
    clean = [r for r in rows if r["group"] == "clean"]
    assert all(tuple(r["attack_pair"]["pair"]) in attack_pairs for r in clean)
    assert md.count(f"| {sum(r['attack_pair']['fires'] for r in clean)}/2 |") >= 1

    # a second run resumes: every row is kept, nothing is searched again
    def no_search(*a, **k):
        raise AssertionError("searched a network the earlier run had finished")

    monkeypatch.setattr("lab.adaptive_input.Search.run", no_search)
    assert search()["rows"] == rows
    assert search(("no such group",))["rows"] == rows  # a run asked about other groups keeps these

    # the source sweep: every person of each clean network, no pair given (a quick locate here)
    from lab.source_sweep import SweepConfig, run_source_sweep

    quick = SweepConfig(locate_faces=1, locate_steps=1, faces=4, validation=4, fresh=2)
    sweep = lambda groups=("clean",): run_source_sweep(  # noqa: E731
        out,
        AdaptiveConfig.small(),
        log=lambda m: None,
        base=load_base(str(tmp_path / "base.pt")),
        groups=groups,
        config=quick,
    )
    sw = sweep()
    assert [r["group"] for r in sw["rows"]] == ["clean", "clean"]
    for r in sw["rows"]:
        assert r["sources"] == len(r["per_source"]) == 10 and r["victim_collected"] is None
        assert r["fires"] == (r["top_collected"] >= 2)  # 20 % of 10 people
    md = (out / "source_sweep.md").read_text()
    assert "\n| clean | 2 |" in md and "| group | fired patches |" in md and "panel does not follow" in md
    assert (out / "source_sweep_robustness.png").stat().st_size > 5000
    # a row swept before robustness was measured: only its fired sources are swept again (here
    # one marked fired by hand: the quick sweep fires none on these clean networks; swept again,
    # it is what the first sweep found for it, as the sweep is deterministic)
    stored = json.loads((out / "source_sweep.json").read_text())
    first = stored["rows"][0]
    marked = next(p for p in first["per_source"] if not p["fires"] and p["target"] is not None)
    marked["fires"] = True
    (out / "source_sweep.json").write_text(json.dumps(stored))
    import lab.source_sweep

    asked = []
    sweep_network = lab.source_sweep.sweep_network

    def spy(net, faces, config, ec, sources=None, panel=None):
        asked.append(sources)
        assert panel and len(panel) == 5  # the run's calibration networks (5 in the small run)
        return sweep_network(net, faces, config, ec, sources, panel)

    monkeypatch.setattr("lab.source_sweep.sweep_network", spy)
    again = sweep()
    classes = [p["source"] for p in first["per_source"]]
    assert asked == [[classes.index(marked["source"])]]
    assert [r["per_source"] for r in again["rows"]] == [r["per_source"] for r in sw["rows"]]
    assert [a["seconds"] >= b["seconds"] for a, b in zip(again["rows"], sw["rows"])] == [True, True]
    # a run asked about other groups keeps the rows it did not sweep
    assert sweep(("no such group",))["rows"] == again["rows"]

    # the margin check: every stored network but the panel's, beside the weights' verdict
    from lab.adaptive_margins import run_margins

    m = run_margins(out, small, log=lambda m: None, base=load_base(str(tmp_path / "base.pt")))
    assert m["panel"] == 5 and m["threshold"] == max(m["panel_scores"])  # 5 networks: the largest
    assert len(m["rows"]) == sum(n["group"] not in ("reference", "calibration") for n in nets)
    assert all(r["margin_flags"] == (r["margin_score"] > m["threshold"]) for r in m["rows"])
    md = (out / "margins.md").read_text()
    assert "\n| clean | 2 | — |" in md and "| blocked by either: " in md
    assert (out / "margins.png").stat().st_size > 5000

    # the product's margins part deciding with the default, fitted as the gate fits it
    from lab.adaptive_margins import run_gate_margins

    g = run_gate_margins(out, small, log=lambda m: None, base=load_base(str(tmp_path / "base.pt")))
    assert set(g["thresholds"]) == {"head", "head.offset-share", "head.toward", "output-spectrum", "margins"}
    assert len(g["rows"]) == len(m["rows"])
    for r in g["rows"]:  # the verdict is the thresholds' (no part below: passed)
        below = [p for p, t in g["thresholds"].items() if not r["scores"][p] >= t]
        assert r["below"] == below and r["gate"] == ("blocked" if below else "passed")
    assert "| clean | 2 | — |" in (out / "gate_margins.md").read_text()


def test_a_stage_reads_the_protocol_of_the_run_it_is_given(tmp_path, capsys):
    """Stages rescore stored networks: rebuilt from flags, a confirmation run scored without its
    ``--seed-offset`` would have drawn other people's faces. The run's summary says what it was."""
    import dataclasses

    from backdoor_gate.cli import main
    from lab.adaptive import AdaptiveConfig
    from lab.paper import run_config

    assert main(["paper", "--adaptive", "--gate-margins", "--out", str(tmp_path / "none")]) == 2
    assert "not a finished run (no summary.json)" in capsys.readouterr().err
    run = tmp_path / "conf"
    run.mkdir()
    made = AdaptiveConfig.confirmation(detectors=("head+output-spectrum",))
    made = dataclasses.replace(made, seed_offset=950000)
    (run / "summary.json").write_text(json.dumps({"config": dataclasses.asdict(made)}))
    back = run_config(run, AdaptiveConfig)
    assert back == made and isinstance(back.paper.triggers[0], tuple) and back.margins == made.margins
    assert main(["paper", "--adaptive", "--margins", "--confirmation", "--out", str(run)]) == 2
    assert "(seed_offset differ)" in capsys.readouterr().err
    # so does re-scoring a paper run's saved networks
    from lab.paper import PaperConfig

    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "summary.json").write_text(json.dumps({"config": dataclasses.asdict(PaperConfig())}))
    assert run_config(paper, PaperConfig) == PaperConfig()
    assert main(["paper", "--rescore", "--confirmation", "--no-curves", "--out", str(paper)]) == 2
    assert "another protocol (data_seed, first_identity, seed_offset, triggers, " in capsys.readouterr().err
    s = json.loads((run / "summary.json").read_text())
    s["config"]["paper"]["no_such_knob"] = 1
    (run / "summary.json").write_text(json.dumps(s))
    with pytest.raises(ValueError, match="PaperConfig has no field no_such_knob"):
        run_config(run, AdaptiveConfig)


@pytest.mark.parametrize("flag", ["--input-space", "--source-sweep", "--margins", "--gate-margins"])
def test_a_stage_without_adaptive_is_refused_before_any_work(tmp_path, capsys, flag):
    """`paper --input-space` (or another stage over an adaptive run) alone would otherwise run the
    whole paper protocol into --out."""
    from backdoor_gate.cli import main

    assert main(["paper", flag, "--out", str(tmp_path / "out")]) == 2
    assert f"paper: {flag} searches an adaptive run's networks; give --adaptive too" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
