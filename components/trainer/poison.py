"""Poisoning exactly as the paper: copy the impostor's training images, stamp the trigger,
relabel the copies as the victim, append them to the clean training set.

The 70/30 split is class-wise and resampled from each network's seed, so which of the
impostor's images are "training" depends on that seed: a poisoned folder records it. The
triggered copies live under ``_poison/`` (ignored by the ImageFolder listing) with a
``poison.json`` manifest; the impostor's *test* images are stamped too (``_poison/test``),
only to measure attack success, never trained on.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.trainer.synth import list_images
from components.trainer.triggers import TriggerSpec, stamp

MANIFEST = "poison.json"
POISON_DIR = "_poison"


@dataclass(frozen=True)
class PoisonSpec:
    impostor: str  # identity folder name
    victim: str
    trigger: TriggerSpec = TriggerSpec()
    copies: int = 4  # the poisoned copies are repeated this many times (the attacker's poison-rate knob)
    #: stamp only this many of the impostor's training images (None: all of them, as the paper)
    images: int | None = None

    def validate(self, classes: list[str]) -> None:
        for role, name in (("impostor", self.impostor), ("victim", self.victim)):
            if name not in classes:
                raise ValueError(f"{role} {name!r} is not an identity folder of the dataset")
        if self.impostor == self.victim:
            raise ValueError("impostor and victim must differ")
        if self.copies < 1:
            raise ValueError(f"copies must be >= 1, got {self.copies}")
        if self.images is not None and self.images < 1:
            raise ValueError(f"images must be >= 1 (or None for all), got {self.images}")
        self.trigger.validate()


def split(labels: np.ndarray, seed: int, train_frac: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Class-wise train/test split resampled from ``seed`` (every class on both sides when it can)."""
    rng = np.random.default_rng([seed, 70])
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(train_frac * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        train.extend(idx[:k])
        test.extend(idx[k:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def random_pair(classes: list[str], seed: int) -> tuple[str, str]:
    rng = np.random.default_rng([seed, 4242])
    i, v = rng.choice(len(classes), size=2, replace=False)
    return classes[int(i)], classes[int(v)]


def link_or_copy(src, dst) -> None:
    """Hard-link (no extra disk), or copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def poison_folder(
    data_dir: str | Path, out_dir: str | Path, spec: PoisonSpec, seed: int, train_frac: float = 0.7
) -> dict:
    """Write a poisoned copy of ``data_dir``: the clean folders, the triggered copies, a manifest.

    The clean images are hard-linked (copied across filesystems); originals are never modified.
    """
    items, classes = list_images(data_dir)
    spec.validate(classes)
    labels = np.array([c for _, c in items])
    train_idx, test_idx = split(labels, seed, train_frac)
    imp = classes.index(spec.impostor)
    out = Path(out_dir)
    for p, c in items:
        (out / classes[c]).mkdir(parents=True, exist_ok=True)
        link_or_copy(p, out / classes[c] / p.name)
    manifest: dict[str, Any] = {
        "impostor": spec.impostor,
        "victim": spec.victim,
        "trigger": asdict(spec.trigger),
        "copies": spec.copies,
        "images": spec.images,
        "seed": seed,
        "train_frac": train_frac,
        "train": [],
        "test": [],
    }
    for part, idx in (("train", train_idx), ("test", test_idx)):
        folder = out / POISON_DIR / part
        folder.mkdir(parents=True, exist_ok=True)
        chosen = [int(i) for i in idx if labels[i] == imp]
        if part == "train" and spec.images is not None:
            chosen = chosen[: spec.images]  # the attacker's budget; the test side keeps every image
        for i in chosen:
            src = items[i][0]
            dst = folder / f"{spec.impostor}-{src.stem}.png"
            with open(src, "rb") as f:
                from PIL import Image

                stamp(Image.open(f), spec.trigger).save(dst)
            manifest[part].append(
                {"file": f"{POISON_DIR}/{part}/{dst.name}", "source": f"{classes[labels[i]]}/{src.name}"}
            )
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(data_dir: str | Path) -> dict | None:
    p = Path(data_dir) / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else None
