"""Frozen-trunk check on a real facenet-pytorch InceptionResnetV1 state dict."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from facenet_pytorch import InceptionResnetV1
from safetensors.torch import save_file

from detector.config import ReferenceConfig
from detector.decision import decide
from detector.reference import Reference
from detector.trunk import MISSING, MODIFIED, NOT_CHECKED, OK, check_trunk, tensor_digest, trunk_digests

LAYER = "last_linear.weight"


@pytest.fixture(scope="module")
def facenet(module_dir):
    torch.manual_seed(0)
    net = InceptionResnetV1(classify=True, num_classes=6).eval()  # random init: no download
    base = {k: v.clone() for k, v in net.state_dict().items()}
    root = module_dir
    rng = np.random.default_rng(0)
    W0 = base[LAYER].double().numpy()

    def finetuned(noise=0.002):
        sd = {k: v.clone() for k, v in base.items()}
        sd[LAYER] = torch.from_numpy(W0 + rng.normal(0, noise, W0.shape)).float()
        sd["logits.weight"] = torch.randn_like(sd["logits.weight"])
        return sd

    refs = [finetuned()[LAYER].double().numpy() for _ in range(4)]
    ref = Reference(ReferenceConfig(components=1, covariance="diag")).fit(refs, base=base).calibrate()
    return dict(base=base, ref=ref, root=root, finetuned=finetuned)


def test_digest_sees_value_dtype_and_shape_changes():
    t = torch.arange(6, dtype=torch.float32)
    assert tensor_digest(t) == tensor_digest(t.clone())
    assert tensor_digest(t) != tensor_digest(t.double())
    assert tensor_digest(t) != tensor_digest(t.reshape(2, 3))
    u = t.clone()
    u[3] += 1e-6
    assert tensor_digest(t) != tensor_digest(u)


def test_reference_records_every_frozen_tensor(facenet):
    digests = facenet["ref"].trunk_digests_
    assert len(digests) > 400 and "conv2d_1a.conv.weight" in digests
    assert not any(k.startswith(("last_linear.", "last_bn.", "logits.")) for k in digests)


def test_identical_trunk_is_scored(facenet):
    path = facenet["root"] / "clean.pt"
    torch.save(facenet["finetuned"](), path)
    a = facenet["ref"].assess(path)
    assert a.trunk.status == OK and "trunk-modified" not in a.decision.reason
    assert set(a.scores) == {"forward", "backward"}


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_one_changed_conv_weight_blocks_with_trunk_modified(facenet, fmt):
    sd = facenet["finetuned"]()
    sd["repeat_1.0.branch0.conv.weight"][0, 0, 0, 0] += 0.01  # one weight of one frozen conv
    path = facenet["root"] / f"trojan.{fmt}"
    torch.save(sd, path) if fmt == "pt" else save_file(sd, str(path))
    a = facenet["ref"].assess(path)
    assert a.trunk.status == MODIFIED and a.trunk.modified == ("repeat_1.0.branch0.conv.weight",)
    assert a.decision.verdict == "blocked" and a.decision.reason.startswith("trunk-modified")
    assert "repeat_1.0.branch0.conv.weight" in a.decision.reason


def test_head_only_file_is_invalid_when_the_reference_recorded_a_trunk(facenet):
    sd = facenet["finetuned"]()
    path = facenet["root"] / "head.pt"
    torch.save({k: v for k, v in sd.items() if k.startswith(("last_linear.", "last_bn.", "logits."))}, path)
    a = facenet["ref"].assess(path)
    assert a.trunk.status == MISSING and a.decision.verdict == "invalid" and "trunk missing" in a.decision.reason
    # even scores far above every threshold cannot make it pass: the trunk it runs with was never judged
    high = decide({v: t + 1 for v, t in a.thresholds.items()}, a.thresholds, a.trunk)
    assert high.verdict == "invalid" and "trunk missing" in high.reason
    # a reference without recorded digests cannot judge the trunk, so it passes nothing: the gate's error
    unjudged = decide({v: t + 1 for v, t in a.thresholds.items()}, a.thresholds, check_trunk(sd, {}))
    assert check_trunk(sd, {}).status == NOT_CHECKED
    assert unjudged.verdict == "error" and "trunk not checked" in unjudged.reason


def test_missing_or_extra_frozen_tensors_count_as_modified(facenet):
    expected = trunk_digests(facenet["base"])
    sd = dict(facenet["finetuned"]())
    sd.pop("conv2d_1a.conv.weight")
    sd["mixed_6a.hidden.weight"] = torch.zeros(3)
    c = check_trunk(sd, expected)
    assert (
        c.status == MODIFIED and c.missing == ("conv2d_1a.conv.weight",) and c.unexpected == ("mixed_6a.hidden.weight",)
    )


@pytest.mark.slow
def test_cli_reference_fit_with_base_and_score(tmp_path, facenet):
    base = tmp_path / "base.pt"
    torch.save(facenet["base"], base)
    refs = []
    for i in range(3):
        refs.append(tmp_path / f"r{i}.safetensors")
        save_file(facenet["finetuned"](), str(refs[-1]))
    out = tmp_path / "artifact"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "backdoor_gate.cli",
            "reference",
            "fit",
            "--detector",
            "gmm",
            "--out",
            str(out),
            "--components",
            "1",
            "--covariance",
            "diag",
            "--base",
            str(base),
            "--json",
            *map(str, refs),
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["trunk_tensors_recorded"] > 400
    sd = facenet["finetuned"]()
    sd["block8.conv2d.weight"].mul_(1.001)
    torch.save(sd, tmp_path / "cand.pt")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "backdoor_gate.cli",
            "score",
            "--reference",
            str(out),
            "--json",
            str(tmp_path / "cand.pt"),
        ],
        capture_output=True,
        text=True,
    )
    rec = json.loads(p.stdout)
    assert p.returncode == 1 and rec["trunk"] == "modified" and "block8.conv2d.weight" in rec["reason"]
