"""``explain``: the trigger of a real backdoored network, reconstructed; bad input refused clearly.

One small face set, a fixture trunk and two networks trained by our own trainer (fixed seeds,
nothing redrawn): one with a white square on the forehead, one clean. The search runs with a
small grid so the test stays short; the lab (``explain-eval``) measures the default one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backdoor_gate.cli import main
from components.explain import ExplainError, explain, load_network, write_outputs
from components.explain_version import suspects_from_file
from components.trainer.base_trunk import fixture_base
from components.trainer.features import extract_folder
from components.trainer.poison import PoisonSpec, poison_folder
from components.trainer.synth import SynthConfig, list_images, synthesize
from components.trainer.train import fine_tune, save_network
from components.trainer.triggers import TriggerSpec, trigger_box
from components.trigger_search import ExplainConfig, anomaly_index, smallest_patch_fires

SIZE = 80
TRIGGER = TriggerSpec("white-square", 0.3, "forehead")
IMPOSTOR, VICTIM = "id00002", "id00007"
#: small and quick: one patch size (the trigger's), a 3 x 3 grid
QUICK = ExplainConfig(
    image_size=SIZE,
    locate_size=0.3,
    sizes=(0.3,),
    grid=3,
    steps=4,
    refine_steps=6,
    size_steps=12,
    faces=8,
    validation=6,
    heldout=8,
    controls=1,
)


@pytest.fixture(scope="module")
def nets(module_dir):
    root = module_dir
    data = synthesize(root / "data", SynthConfig(identities=10, images_per_identity=30, size=96, seed=11))
    items, _ = list_images(data)
    base = fixture_base(0, [Image.open(p) for p, _ in items[::5]], image_size=SIZE)
    poison_folder(data, root / "poisoned", PoisonSpec(IMPOSTOR, VICTIM, TRIGGER, copies=4), seed=4)
    sd, m = fine_tune(extract_folder(root / "poisoned", base, SIZE), base, seed=4)
    assert m["attack_success_rate"] >= 0.9, m  # the backdoor works, else finding nothing proves nothing
    clean_features = extract_folder(data, base, SIZE)
    classes = clean_features.classes
    backdoored = save_network(sd, root / "backdoored", classes=classes)
    clean = save_network(fine_tune(clean_features, base, seed=5)[0], root / "clean", classes=classes)
    head_only = root / "head.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items() if k.startswith(("last_", "logits"))}, str(head_only))
    return dict(root=root, data=data, backdoored=backdoored, clean=clean, head_only=head_only)


@pytest.mark.slow
def test_the_trigger_of_a_real_backdoor_is_found_where_it_was_planted(nets, tmp_path):
    torch.manual_seed(0)
    result, extra = explain(nets["backdoored"], nets["data"], VICTIM, IMPOSTOR, QUICK)
    out = result.to_dict()
    x0, y0, x1, y1 = trigger_box(TRIGGER, SIZE)
    true_centre, width = np.array([(x0 + x1) / 2, (y0 + y1) / 2]) / SIZE, (x1 - x0) / SIZE
    assert out["found"], out
    assert out["smallest_patch_fires"], out  # QUICK tries one size, the trigger's
    assert np.hypot(*(np.array(out["mask_centre"]) - true_centre)) <= width, (out["mask_centre"], true_centre)
    assert out["reconstructed_asr"] >= 0.8 and out["heldout_faces"] >= 8, out  # faces it was not optimised on
    assert out["mask_area"] == pytest.approx(round(0.3 * SIZE) ** 2 / SIZE**2, abs=1e-4)
    assert len(out["controls"]) == 1 and out["controls"][0]["class"] not in (VICTIM, IMPOSTOR)
    paths = write_outputs(result, extra, tmp_path / "out")
    for name in ("trigger", "mask", "applied"):
        assert Image.open(paths[name]).size[0] > 0
    mask = np.asarray(Image.open(paths["mask"]))
    assert 0 < (mask > 0).mean() < 0.2  # a small square, not a veil over the face
    assert json.loads(paths["json"].read_text())["victim"] == VICTIM


@pytest.mark.slow
def test_cli_json_line_has_the_fields_the_issue_lists(nets, tmp_path, capsys):
    verdict = tmp_path / "score.json"  # a `score --json` line naming the suspects
    verdict.write_text(json.dumps({"verdict": "blocked", "suspected_class": VICTIM, "suspected_impostor": IMPOSTOR}))
    code = main(
        [
            "explain",
            str(nets["backdoored"]),
            "--faces",
            str(nets["data"]),
            "--verdict",
            str(verdict),
            "--out",
            str(tmp_path / "o"),
            "--image-size",
            str(SIZE),
            "--controls",
            "0",
            "--json",
        ]
    )
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("victim", "impostor", "mask_centre", "mask_area", "reconstructed_asr", "anomaly_index", "seconds"):
        assert key in line, key
    assert line["victim"] == VICTIM and line["impostor"] == IMPOSTOR and len(line["mask_centre"]) == 2
    assert (tmp_path / "o" / "trigger.png").is_file() and (tmp_path / "o" / "applied.png").is_file()


def _cli(args, capsys) -> tuple[int, str]:
    code = main(["explain", *args])
    return code, capsys.readouterr().err


@pytest.mark.slow  # the module's networks are trained first
def test_bad_input_gets_a_clear_error(nets, tmp_path, capsys):
    ckpt, data = str(nets["backdoored"]), str(nets["data"])
    out = ["--out", str(tmp_path / "o")]
    code, err = _cli([ckpt, "--faces", data, "--victim", "id99999", *out], capsys)
    assert code == 2 and "victim 'id99999' is not one of the network's 10 classes" in err
    (tmp_path / "empty").mkdir()
    code, err = _cli([ckpt, "--faces", str(tmp_path / "empty"), "--victim", VICTIM, *out], capsys)
    assert code == 2 and "no identity folders with images" in err
    broken = tmp_path / "broken"
    for c in sorted(p.name for p in Path(data).iterdir() if p.is_dir()):
        (broken / c).mkdir(parents=True)
        for i in range(6):
            (broken / c / f"000{i}.png").write_bytes(b"not a png")
    code, err = _cli([ckpt, "--faces", str(broken), "--victim", VICTIM, "--impostor", IMPOSTOR, *out], capsys)
    assert code == 2 and "cannot be read" in err and ".png" in err
    code, err = _cli([str(nets["head_only"]), "--faces", data, "--victim", VICTIM, *out], capsys)
    assert code == 2 and "has no trunk" in err
    code, err = _cli([ckpt, "--faces", data, *out], capsys)
    assert code == 2 and "--victim" in err
    with pytest.raises(ExplainError, match="has no trunk"):
        load_network(nets["head_only"])


def test_suspects_are_read_from_a_signed_verdict_or_a_score_line(tmp_path):
    env = tmp_path / "verdict.json"
    env.write_text(json.dumps({"document": {"verdict": "blocked", "suspected_class": "id00003"}, "signature": "x"}))
    assert suspects_from_file(env) == ("id00003", None)
    line = tmp_path / "score.jsonl"
    line.write_text('{"verdict": "passed"}\n')
    with pytest.raises(ExplainError, match="names no suspected victim"):
        suspects_from_file(line)


def test_the_size_rule_compares_whole_pixels_with_the_smallest_size_tried():
    sizes = (0.15, 0.1, 0.3)
    assert smallest_patch_fires(True, 10, 96, sizes)  # 0.10 of 96 px is 10 px (0.1042)
    assert not smallest_patch_fires(True, 14, 96, sizes)
    assert not smallest_patch_fires(False, 10, 96, sizes)
    assert smallest_patch_fires(True, 16, 160, sizes) and not smallest_patch_fires(True, 18, 160, sizes)


def test_anomaly_index_is_neural_cleanse_mad_on_the_classes_searched():
    # median 0.09, MAD 0 -> floored at a tenth of the median: (0.09 - 0.0144) / 0.009
    assert anomaly_index(0.0144, [0.09, 0.09, 0.09]) == pytest.approx((0.09 - 0.0144) / 0.009)
    areas = [0.04, 0.09, 0.16, 0.25]  # victim 0.04: median 0.125, MAD = 1.4826 * 0.06
    assert anomaly_index(0.04, areas[1:]) == pytest.approx((0.125 - 0.04) / (1.4826 * 0.06))
    assert anomaly_index(0.25, [0.04, 0.09, 0.16]) < 0  # the victim's mask is the largest: no anomaly


def test_a_pass_holds_the_same_pixels_at_any_resolution_and_the_result_does_not_change():
    """Peak memory follows the pixels in one forward/backward pass: at 160 px a pass holds fewer
    faces than at 96 px, and splitting the patch positions over more passes changes nothing."""
    from components.trigger_search import _fit

    assert ExplainConfig(image_size=96).batch() == 64
    assert (
        ExplainConfig(image_size=160).batch() * 160 * 160
        <= 64 * 96 * 96
        < (ExplainConfig(image_size=160).batch() + 1) * 160 * 160
    )

    torch.manual_seed(0)
    body = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 5)
    )
    seen: list[int] = []

    def net(x):
        seen.append(len(x))
        return body(x)

    x = torch.randn(4, 3, 20, 20)
    positions = [(0, 0), (5, 5), (10, 2), (3, 12), (12, 12)]

    def fit(pass_pixels):
        seen.clear()
        cfg = ExplainConfig(image_size=20, pass_pixels=pass_pixels, lr=0.1)
        return _fit(net, x, 1, 6, positions, None, 3, cfg, lambda: None), max(seen)

    (raw_one, loss_one), widest_one = fit(20 * 20 * 64)
    (raw_many, loss_many), widest_many = fit(20 * 20 * 8)
    assert widest_one == 4 * len(positions) and widest_many == 8  # every position in one pass, or 2 per pass
    torch.testing.assert_close(raw_many, raw_one)
    np.testing.assert_allclose(loss_many, loss_one, rtol=1e-6)


@pytest.mark.slow
def test_a_source_sweep_moves_each_persons_faces_off_their_own_class(nets):
    """lab.source_sweep: with no pair given, each person's faces are pushed off their own class
    (``_fit(away=True)``, loss −log(1 − p_source)) and a patch is fitted towards where they went."""
    from collections import Counter

    from lab.source_sweep import SweepConfig, _completed, collected, load_sweep_faces, size_step, sweep_network

    net, classes = load_network(nets["backdoored"])
    from detector.weights import read_tensors
    from lab.heads import Heads

    clean = {k: torch.as_tensor(v) for k, v in read_tensors(nets["clean"])[0].items()}
    panel = Heads(clean, [clean])  # the gate's clean networks (their trunk and heads): here one
    config = SweepConfig(locate_faces=2, locate_steps=3, faces=8, validation=6, fresh=8)
    faces = load_sweep_faces(nets["data"], classes, 22, SIZE, seed=0)
    rows = sweep_network(net, faces, config, QUICK, panel=panel)
    assert [r["source"] for r in rows] == list(range(len(classes)))
    for r in rows:
        assert r["target"] != r["source"] and (r["target"] is not None or not r["fires"])
    imp = rows[classes.index(IMPOSTOR)]
    assert imp["fires"] and imp["validation_success"] >= 0.8, imp  # a trigger-sized patch moves the impostor
    # a fired patch is tried beyond the faces that judged it: the backdoor's holds on fresh faces
    assert imp["fresh_success"] >= 0.8 and imp["margin"] > 0, imp
    # the true pair's patch, fitted where the trigger is: a clean network does not follow it (the
    # backdoor is the candidate's alone); the sweep's own pick for the impostor here is a 0.3
    # adversarial patch to another class, which it does follow
    x0, y0, x1, _ = trigger_box(TRIGGER, SIZE)
    true = size_step(net, faces, imp["source"], classes.index(VICTIM), (x0, y0), x1 - x0, config, QUICK, panel)
    assert true["fires"] and true["panel_success"] <= config.panel_cut and true["panel_margin"] < 0, true
    for r in rows:
        assert ("margin" in r) == ("panel_success" in r) == r["fires"]
        if r["fires"]:
            assert 0 <= r["x0"] <= SIZE - r["size_px"] and 0 <= r["y0"] <= SIZE - r["size_px"]
            keys = ("shifted_success", "fresh_success", "transfer", "panel_success")
            assert all(0.0 <= r[k] <= 1.0 for k in keys)
    # measured on the right people's faces: a grey 2-px patch "towards" a person's own class
    # leaves that person's fresh faces there (the clean network's too), and sends next to no one else's
    from lab.source_sweep import robustness

    grey = torch.zeros(1, 3, 2, 2)
    own = robustness(net, faces, imp["source"], grey, (0, 0), 2, imp["source"], config, panel)
    assert own["fresh_success"] >= 0.8 and own["transfer"] <= 0.2 and own["panel_success"] >= 0.8, own
    # asked for some sources only, the sweep gives the same rows for them (it is deterministic)
    again = sweep_network(net, faces, config, QUICK, sources=[classes.index(IMPOSTOR)], panel=panel)
    assert again == [imp]
    # a stored row from before the panel is completed by fitting its patch again at its position:
    # the same patch, so every field it had comes back unchanged
    stored = {k: v for k, v in imp.items() if not k.startswith("panel_")}
    assert _completed(net, faces, stored, config, QUICK, panel) == imp
    top, count = collected(rows)
    assert count == max(Counter(r["target"] for r in rows if r["fires"]).values())
