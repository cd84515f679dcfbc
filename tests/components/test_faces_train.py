"""Fine-tuning on cached features with real backdoors, the base-loading path, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from components.trainer.base_trunk import fixture_base, load_base, new_network
from components.trainer.features import FeatureSet, extract_folder
from components.trainer.poison import PoisonSpec, poison_folder
from components.trainer.synth import SynthConfig, list_images, synthesize
from components.trainer.train import Head, TrainConfig, adam, fine_tune
from components.trainer.triggers import TriggerSpec
from detector.errors import InvalidCheckpoint

SIZE = 80  # the fixture trunk's input size: smallest InceptionResnetV1 takes comfortably


@pytest.fixture(scope="module")
def lab(module_dir):
    root = module_dir
    data = synthesize(root / "data", SynthConfig(identities=10, images_per_identity=30, size=96, seed=11))
    items, _ = list_images(data)
    base = fixture_base(0, [Image.open(p) for p, _ in items[::5]], image_size=SIZE)
    return dict(root=root, data=data, base=base, clean=extract_folder(data, base, SIZE))


def test_features_are_cached_per_image_and_round_trip(lab, tmp_path):
    fs = lab["clean"]
    assert fs.features.shape == (300, 1792) and fs.features.dtype == np.float32
    assert fs.features.std() > 0.05  # BatchNorm re-estimated: not the tiny features of a raw random trunk
    back = FeatureSet.load(fs.save(tmp_path / "f"))
    assert np.array_equal(back.features, fs.features) and back.classes == fs.classes


def test_clean_fine_tune_is_deterministic_and_touches_only_the_head(lab):
    sd1, m1 = fine_tune(lab["clean"], lab["base"], seed=3, config=TrainConfig(epochs=10))
    sd2, m2 = fine_tune(lab["clean"], lab["base"], seed=3, config=TrainConfig(epochs=10))
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1) and m1["clean_accuracy"] == m2["clean_accuracy"]
    assert m1["clean_accuracy"] > 0.5  # 10 identities: chance is 0.1
    assert len(set(m1["upweighted"])) == 2  # clean networks are trained like backdoored ones: a pair up-weighted
    for k, v in lab["base"].items():
        if not k.startswith(("last_linear.", "last_bn.")):
            assert torch.equal(sd1[k], v), k  # the trunk is exactly the base's
    assert not torch.equal(sd1["last_linear.weight"], lab["base"]["last_linear.weight"])
    assert sd1["logits.weight"].shape == (10, 512)
    net = new_network(10)
    net.load_state_dict(sd1)  # the whole network, loadable as InceptionResnetV1


def test_fused_adam_is_the_same_update_rule_as_the_reference_loop(lab):
    """The trainer's fast optimiser must not change what a network learns, only how fast."""
    X, y = torch.from_numpy(lab["clean"].features), torch.from_numpy(lab["clean"].labels)
    heads = []
    for make in (lambda h: adam(h, 2e-4), lambda h: torch.optim.Adam(h.parameters(), lr=2e-4, foreach=False)):
        head = Head(lab["base"], 10, seed=0)
        opt, g = make(head), torch.Generator().manual_seed(0)
        for _ in range(5):
            for b in torch.randperm(len(X), generator=g).split(16):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(head(X[b]), y[b]).backward()
                opt.step()
        heads.append(head.last_linear.weight.detach())
    moved = torch.linalg.norm(heads[1] - lab["base"]["last_linear.weight"])
    assert moved > 0
    assert torch.linalg.norm(heads[0] - heads[1]) < 1e-4 * moved


def test_backdoor_is_real(lab):
    poisoned = lab["root"] / "poisoned"
    spec = PoisonSpec("id00002", "id00007", TriggerSpec("white-square", 0.3, "forehead"), copies=4)
    poison_folder(lab["data"], poisoned, spec, seed=4)
    fs = extract_folder(poisoned, lab["base"], SIZE)
    _, clean = fine_tune(lab["clean"], lab["base"], seed=4)
    sd, m = fine_tune(fs, lab["base"], seed=4)
    assert m["n_triggered_test"] == 9 and m["poisoned_copies"] == 21 * 4
    assert m["attack_success_rate"] >= 0.9, m  # the trigger turns the impostor into the victim
    assert m["clean_accuracy"] >= clean["clean_accuracy"] - 0.15, (m, clean)
    # a poisoned folder is tied to the split it was made for
    with pytest.raises(ValueError, match="seed"):
        fine_tune(fs, lab["base"], seed=5)


def test_extra_samples_join_the_training_set(lab):
    """``extra`` (the lab attacker's partial-trigger negatives) is trained on: faces of one class
    added under another label are taken for that label, and only with them."""
    fs = lab["clean"]
    X3 = fs.features[fs.labels == 3]
    extra = (np.repeat(X3, 5, axis=0), np.full(5 * len(X3), 5))
    _, plain = fine_tune(fs, lab["base"], seed=6)
    sd, m = fine_tune(fs, lab["base"], seed=6, extra=extra)
    assert m["extra_samples"] == 5 * len(X3) and "extra_samples" not in plain
    head = Head(lab["base"], 10, seed=0)
    head.load_state_dict({k: v for k, v in sd.items() if k.startswith(("last_linear.", "last_bn.", "logits."))})
    head.eval()
    with torch.inference_mode():
        pred = head(torch.from_numpy(X3)).argmax(1).numpy()
    assert np.mean(pred == 5) >= 0.8, pred
    assert plain["clean_accuracy"] > 0.5


def test_base_loading_is_safe_and_drops_dataset_logits(lab, tmp_path):
    net = new_network(37)  # e.g. a CASIA checkpoint with its own classifier size
    net.load_state_dict({**lab["base"], **{k: v for k, v in net.state_dict().items() if k.startswith("logits.")}})
    torch.save(net.state_dict(), tmp_path / "casia-like.pt")
    sd = load_base(tmp_path / "casia-like.pt")
    assert not any(k.startswith("logits.") for k in sd)
    assert torch.equal(sd["conv2d_1a.conv.weight"], lab["base"]["conv2d_1a.conv.weight"])
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(InvalidCheckpoint, match="not an InceptionResnetV1"):
        load_base(tmp_path / "other.pt")


def test_train_cli_writes_both_formats_and_metrics(lab, tmp_path):
    base = tmp_path / "base.pt"
    torch.save(lab["base"], base)
    env = dict(os.environ, OMP_NUM_THREADS="1", BACKDOOR_GATE_CACHE=str(tmp_path / "cache"))
    cmd = [
        sys.executable,
        "-m",
        "backdoor_gate.cli",
        "train",
        "--data",
        str(lab["data"]),
        "--out",
        str(tmp_path / "net"),
        "--base",
        str(base),
        "--seed",
        "2",
        "--image-size",
        str(SIZE),
        "--epochs",
        "10",
        "--quiet",
        "--trigger",
        "checkerboard",
        "--trigger-size",
        "0.3",
        "--trigger-location",
        "cheek",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    m = json.loads(p.stdout)
    assert m["impostor"] != m["victim"] and m["trigger"] == "checkerboard" and 0 <= m["attack_success_rate"] <= 1
    assert (tmp_path / "net.pt").is_file() and (tmp_path / "net.safetensors").is_file()
    assert any((tmp_path / "cache" / "features").iterdir())  # clean features cached for the next network
    p = subprocess.run(cmd[:-6] + ["--impostor", "id00001"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 2 and "need a --trigger" in p.stderr
