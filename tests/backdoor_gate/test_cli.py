"""The CLI contract, run as users run it: a real process, real files, exit codes and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

GRID = "1,2,5,10,24,32"


def run(*args, check=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "-m", "backdoor_gate.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    if check is not None:
        assert p.returncode == check, p.stderr + p.stdout
    return p


@pytest.fixture
def artifact(tmp_path, family_files):
    out = tmp_path / "artifact"
    p = run(
        "reference",
        "fit",
        "--detector",
        "gmm",
        "--out",
        str(out),
        "--grid",
        GRID,
        "--json",
        *family_files["reference"],
        "--calibrate",
        *family_files["heldout"],
        check=0,
    )
    summary = json.loads(p.stdout)
    assert summary["threshold_source"] == "held-out" and set(summary["views"]) == {"forward", "backward"}
    # --json: no progress bars; the one human line is the warning that 6 calibration networks cannot back a 5 % FRR
    assert p.stderr.splitlines() == [
        line for line in p.stderr.splitlines() if line.startswith("backdoor-gate: warning: only 6 calibration networks")
    ]
    assert p.stderr and summary["calibration_warning"] and summary["n_calibration"] == 6
    assert summary["frr_upper_95"] > 0.3  # 0 of 6 blocked still allows a true FRR of 39 %
    return out


def test_score_exit_codes_and_json_lines(tmp_path, artifact, family_files):
    held = family_files["heldout"]
    p = run("score", "--reference", str(artifact), "--json", *held[:2])
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert [r["checkpoint"] for r in lines] == held[:2]
    for r in lines:
        assert set(r) == {"checkpoint", "sha256", "scores", "thresholds", "verdict", "reason", "trunk"}
        assert r["trunk"] == "ok"  # no --base: `reference fit` recorded the trunk its networks share
        assert set(r["scores"]) == set(r["thresholds"]) == {"forward", "backward"}
    # calibration networks sit at or above the thresholds by construction (frr 5%, n=6)
    assert p.returncode == 0 and all(r["verdict"] == "passed" for r in lines)

    p = run("score", "--reference", str(artifact), "--json", held[0], *family_files["backdoored"])
    verdicts = [json.loads(x)["verdict"] for x in p.stdout.splitlines()]
    assert p.returncode == 1 and verdicts[0] == "passed" and verdicts[1:].count("blocked") >= 5

    bad = tmp_path / "nan.pt"
    torch.save({"last_linear.weight": torch.full((24, 32), float("nan"))}, bad)
    p = run("score", "--reference", str(artifact), "--json", family_files["backdoored"][0], str(bad))
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    assert p.returncode == 2 and rows[1]["verdict"] == "invalid" and "NaN" in rows[1]["reason"]
    assert rows[1]["scores"] == {}


def test_human_output_and_evaluate(artifact, family_files):
    p = run("score", "--reference", str(artifact), family_files["backdoored"][0])
    assert p.returncode == 1 and "blocked" in p.stdout and "thresholds:" in p.stdout
    p = run(
        "evaluate",
        "--reference",
        str(artifact),
        "--clean",
        *family_files["heldout"],
        "--backdoored",
        *family_files["backdoored"],
        "--json",
        check=0,
    )
    res = json.loads(p.stdout)
    assert res["n_clean"] == 6 and res["n_backdoored"] == 6
    assert res["auc"]["forward"] > 0.9 and res["auc"]["backward"] > 0.9
    # the held-out networks calibrated the thresholds (at or above them by construction): none blocked
    assert res["false_rejection_rate"]["combined"] == 0.0 and res["detection_rate"]["combined"] >= 5 / 6


def test_bad_reference_inputs_write_nothing(tmp_path, family_files):
    out = tmp_path / "never"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    p = run(
        "reference",
        "fit",
        "--detector",
        "gmm",
        "--out",
        str(out),
        "--grid",
        GRID,
        *family_files["reference"][:3],
        str(junk),
    )
    assert p.returncode == 2 and "junk.pt" in p.stderr and "unknown format" in p.stderr
    assert not out.exists() and not list(tmp_path.glob(".never*"))
    p = run(
        "reference",
        "fit",
        "--detector",
        "gmm",
        "--out",
        str(out),
        "--covariance",
        "full",
        "--variance",
        "2",
        *family_files["reference"],
    )
    assert p.returncode == 2 and "variance" in p.stderr and not out.exists()
    p = run("score", "--reference", str(tmp_path / "missing"), family_files["heldout"][0])
    assert p.returncode == 2 and "not a directory" in p.stderr


def test_existing_out_is_not_overwritten_without_flag(artifact, family_files):
    before = (artifact / "reference.json").read_bytes()
    p = run("reference", "fit", "--detector", "gmm", "--out", str(artifact), "--grid", GRID, *family_files["reference"])
    assert p.returncode == 2 and "exists" in p.stderr
    assert (artifact / "reference.json").read_bytes() == before


def test_evaluate_refuses_unscorable_checkpoints(tmp_path, artifact, family_files):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"")
    p = run("evaluate", "--reference", str(artifact), "--clean", str(junk), "--backdoored", *family_files["backdoored"])
    assert p.returncode == 2 and "empty file" in p.stderr


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "backdoor-gate")
    p = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "reference" in p.stdout and "score" in p.stdout
