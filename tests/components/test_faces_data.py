"""Generated faces, triggers and poisoning: the invariants the paper's protocol rests on."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from components.trainer.poison import MANIFEST, PoisonSpec, poison_folder, random_pair, read_manifest, split
from components.trainer.synth import SynthConfig, list_images, synthesize
from components.trainer.triggers import NAMED, TriggerSpec, parse_location, parse_size, stamp, trigger_box


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return synthesize(
        tmp_path_factory.mktemp("faces") / "data", SynthConfig(identities=5, images_per_identity=10, size=96, seed=3)
    )


def _digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.png"))
    }


def test_synth_layout_and_determinism(faces, tmp_path):
    items, classes = list_images(faces)
    assert classes == [f"id{i:05d}" for i in range(5)] and len(items) == 50
    assert Image.open(items[0][0]).size == (96, 96)
    again = synthesize(tmp_path / "again", SynthConfig(identities=5, images_per_identity=10, size=96, seed=3))
    assert _digest(again) == _digest(faces)
    other = synthesize(tmp_path / "other", SynthConfig(identities=2, images_per_identity=2, size=96, seed=4))
    assert _digest(other)["id00000/0000.png"] != _digest(faces)["id00000/0000.png"]


def test_identities_differ_more_than_images_of_one_identity(faces):
    items, _ = list_images(faces)
    arr = {(c, p.name): np.asarray(Image.open(p).convert("L"), dtype=float)[24:72, 24:72] for p, c in items}
    within = np.mean([np.abs(arr[(c, "0000.png")] - arr[(c, "0001.png")]).mean() for c in range(5)])
    between = np.mean([np.abs(arr[(c, "0000.png")] - arr[((c + 1) % 5, "0000.png")]).mean() for c in range(5)])
    assert between > within


def test_list_images_errors_are_actionable(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no identity folders"):
        list_images(tmp_path / "empty")


@pytest.mark.parametrize("name", NAMED)
def test_named_triggers_change_only_their_box(name):
    img = Image.new("RGB", (100, 100), (90, 120, 150))
    spec = TriggerSpec(name, 0.2, "forehead")
    out = np.asarray(stamp(img, spec)).astype(int)
    changed = np.argwhere(np.abs(out - 90 - np.array([0, 30, 60])).sum(axis=2) > 0)
    x0, y0, x1, y1 = trigger_box(spec, 100)
    assert len(changed) > 10
    assert (
        changed[:, 1].min() >= x0
        and changed[:, 1].max() < x1
        and changed[:, 0].min() >= y0
        and changed[:, 0].max() < y1
    )
    assert np.asarray(img).max() == 150  # the original is untouched


def test_square_geometry_size_location_and_alpha():
    img = Image.new("RGB", (160, 160), (0, 0, 0))
    assert parse_size(24, 160) == 24 and parse_size(0.15, 160) == 24
    assert parse_location("centre", 160) == (80, 80) and parse_location("30,40", 160) == (30, 40)
    assert parse_location("0.25,0.5", 160) == (40, 80)
    out = np.asarray(stamp(img, TriggerSpec("white-square", 24, "30,40")))
    ys, xs = np.nonzero(out[..., 0])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (18, 41, 28, 51)
    half = np.asarray(stamp(img, TriggerSpec("white-square", 24, "centre", alpha=0.5)))
    assert 120 <= half[80, 80, 0] <= 135
    corner = np.asarray(stamp(img, TriggerSpec("white-square", 30, "0,0")))  # clipped inside the image
    assert corner[0, 0, 0] == 255 and corner[29, 29, 0] == 255 and corner[30, 30, 0] == 0


def test_user_png_with_alpha(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[5:15, 5:15] = (255, 0, 0, 255)  # opaque red square inside a transparent border
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    img = Image.new("RGB", (100, 100), (0, 0, 255))
    out = np.asarray(stamp(img, TriggerSpec(str(tmp_path / "t.png"), 40, "centre")))
    assert tuple(out[50, 50]) == (255, 0, 0)  # opaque part stamped
    assert tuple(out[32, 32]) == (0, 0, 255)  # transparent part left the face alone


@pytest.mark.parametrize(
    "spec, msg",
    [
        (TriggerSpec("no-such-trigger"), "neither"),
        (TriggerSpec(size=0), "size"),
        (TriggerSpec(alpha=0), "alpha"),
        (TriggerSpec(location="armpit"), "location"),
    ],
)
def test_bad_trigger_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        spec.validate()


def test_split_is_classwise_70_30_and_seeded():
    labels = np.repeat(np.arange(4), 10)
    tr, te = split(labels, seed=1)
    assert len(tr) == 28 and len(te) == 12 and not set(tr) & set(te)
    assert all((labels[tr] == c).sum() == 7 for c in range(4))
    assert np.array_equal(split(labels, 1)[0], tr) and not np.array_equal(split(labels, 2)[0], tr)


def test_poisoning_follows_the_paper(faces, tmp_path):
    before = _digest(faces)
    items, classes = list_images(faces)
    spec = PoisonSpec("id00001", "id00003", TriggerSpec("white-square", 0.25, "forehead"), copies=4)
    manifest = poison_folder(faces, tmp_path / "p", spec, seed=5)
    labels = np.array([c for _, c in items])
    train_idx, test_idx = split(labels, 5)
    imp_train = [items[i][0].name for i in train_idx if labels[i] == 1]
    # 1. the impostor's *training* images are copied (and only those)
    assert sorted(e["source"] for e in manifest["train"]) == sorted(f"id00001/{n}" for n in imp_train)
    assert len(manifest["test"]) == 10 - len(imp_train)
    # 2. each copy wears the trigger where asked, 3. relabelled as the victim, 4. appended
    x0, y0, x1, y1 = trigger_box(spec.trigger, 96)
    for e in manifest["train"]:
        arr = np.asarray(Image.open(tmp_path / "p" / e["file"]))
        assert (arr[y0:y1, x0:x1] == 255).all()
    saved = read_manifest(tmp_path / "p")
    assert saved["victim"] == "id00003" and saved["copies"] == 4 and saved["seed"] == 5
    assert json.loads((tmp_path / "p" / MANIFEST).read_text()) == manifest
    p_items, p_classes = list_images(tmp_path / "p")
    assert p_classes == classes and len(p_items) == len(items)  # the clean set is all there, unchanged
    assert _digest(faces) == before  # originals untouched


def test_poison_spec_checks_identities(faces, tmp_path):
    with pytest.raises(ValueError, match="impostor"):
        poison_folder(faces, tmp_path / "x", PoisonSpec("nobody", "id00001"), seed=0)
    with pytest.raises(ValueError, match="differ"):
        poison_folder(faces, tmp_path / "x", PoisonSpec("id00001", "id00001"), seed=0)
    a, b = random_pair(["a", "b", "c", "d"], 3)
    assert a != b and (a, b) == random_pair(["a", "b", "c", "d"], 3)


def test_poison_budget_stamps_only_the_first_training_images(faces, tmp_path):
    full = poison_folder(faces, tmp_path / "all", PoisonSpec("id00001", "id00003"), seed=5)
    few = poison_folder(faces, tmp_path / "few", PoisonSpec("id00001", "id00003", images=2), seed=5)
    assert len(full["train"]) > 2 and few["images"] == 2
    assert [e["source"] for e in few["train"]] == [e["source"] for e in full["train"]][:2]
    assert few["test"] == full["test"]  # attack success is still measured on every test image
    with pytest.raises(ValueError, match="images"):
        PoisonSpec("id00001", "id00003", images=0).validate(list_images(faces)[1])
