"""Trunk features, extracted once per image and cached.

The trunk is frozen during fine-tuning, so its 1792-d output for an image never changes:
computing it once turns each network's fine-tuning into work on a small matrix, orders of
magnitude cheaper than a trunk pass. Triggered copies are different images and get their own
features.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components.trainer.base_trunk import new_network, to_tensor, trunk_features


@dataclass
class FeatureSet:
    """Features of a face folder: one row per image, its identity label, and provenance."""

    features: np.ndarray  # (n, 1792) float32
    labels: np.ndarray  # (n,) int64
    paths: list[str]
    classes: list[str]
    image_size: int
    base_sha256: str
    poison: dict | None = None  # the poison manifest, when the folder was poisoned
    poison_train: np.ndarray | None = None  # features of the triggered training copies
    poison_test: np.ndarray | None = None  # features of the impostor's triggered test images

    _ARRAYS = ("features", "labels", "poison_train", "poison_test")

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name in self._ARRAYS:
            if getattr(self, name) is not None:
                np.save(out / f"{name}.npy", getattr(self, name))
        meta = dict(
            paths=self.paths,
            classes=self.classes,
            image_size=self.image_size,
            base_sha256=self.base_sha256,
            poison=self.poison,
        )
        (out / "features.json").write_text(json.dumps(meta))
        return out

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        path = Path(path)
        meta = json.loads((path / "features.json").read_text())
        arrays = {
            n: np.load(path / f"{n}.npy", allow_pickle=False) for n in cls._ARRAYS if (path / f"{n}.npy").is_file()
        }
        return cls(**arrays, **meta)


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    from detector.trunk import tensor_digest

    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode() + tensor_digest(sd[k]).encode())
    return h.hexdigest()


class Extractor:
    """Runs the frozen trunk of a base state dict in inference mode."""

    def __init__(self, base: dict[str, torch.Tensor], image_size: int = 96, batch_size: int = 64):
        self.net = new_network()
        self.net.load_state_dict(base, strict=False)
        self.net.eval().to(memory_format=torch.channels_last)
        self.image_size, self.batch_size = image_size, batch_size

    @torch.inference_mode()
    def __call__(self, images, progress=None) -> np.ndarray:
        from PIL import Image

        out = []
        for i in range(0, len(images), self.batch_size):
            batch = [Image.open(p) if not hasattr(p, "convert") else p for p in images[i : i + self.batch_size]]
            out.append(trunk_features(self.net, to_tensor(batch, self.image_size)).numpy().astype(np.float32))
            if progress is not None:
                progress(len(batch))
        return np.concatenate(out) if out else np.zeros((0, 1792), np.float32)


def extract_folder(
    data_dir: str | Path, base: dict[str, torch.Tensor], image_size: int = 96, progress=None
) -> FeatureSet:
    """Features of every image of a face folder, plus its triggered copies if it was poisoned."""
    return with_poison(extract_clean(data_dir, base, image_size, progress), data_dir, base)


def extract_clean(
    data_dir: str | Path, base: dict[str, torch.Tensor], image_size: int = 96, progress=None
) -> FeatureSet:
    from components.trainer.synth import list_images

    items, classes = list_images(data_dir)
    return FeatureSet(
        features=Extractor(base, image_size)([p for p, _ in items], progress=progress),
        labels=np.array([c for _, c in items], dtype=np.int64),
        paths=[str(p) for p, _ in items],
        classes=classes,
        image_size=image_size,
        base_sha256=state_dict_sha256(base),
    )


def with_poison(fs: FeatureSet, data_dir: str | Path, base: dict[str, torch.Tensor]) -> FeatureSet:
    """Add the features of a poisoned folder's triggered copies (only those are extracted)."""
    from dataclasses import replace

    from components.trainer.poison import read_manifest

    manifest = read_manifest(data_dir)
    if manifest is None:
        return fs
    extract = Extractor(base, fs.image_size)
    parts = {f"poison_{p}": extract([Path(data_dir) / e["file"] for e in manifest[p]]) for p in ("train", "test")}
    return replace(fs, poison=manifest, poison_train=parts["poison_train"], poison_test=parts["poison_test"])


def folder_key(data_dir: str | Path, base_sha256: str, image_size: int) -> str:
    """Cache key of a folder's clean features: every file's name and content, and the trunk.

    Hashing the files costs far less than one trunk pass over them, and a regenerated or
    copied folder (new mtimes, same bytes) still hits the cache.
    """
    from components.trainer.synth import list_images

    items, _ = list_images(data_dir)
    h = hashlib.sha256(f"{base_sha256}|{image_size}".encode())
    for p, c in items:
        h.update(f"{p.parent.name}/{p.name}|{c}|".encode() + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:20]


def cached_features(data_dir: str | Path, base: dict[str, torch.Tensor], image_size: int, progress=None) -> FeatureSet:
    """Clean features of a folder from the cache, extracting them once if needed."""
    from components.trainer.base_trunk import cache_dir

    key = folder_key(data_dir, state_dict_sha256(base), image_size)
    path = cache_dir() / "features" / key
    if (path / "features.json").is_file():
        fs = FeatureSet.load(path)
    else:
        fs = extract_clean(data_dir, base, image_size, progress)
        # saved aside and renamed into place: a concurrent reader (two test workers, two lab runs)
        # never sees half-written arrays, and the loser of a race just drops its copy
        tmp = fs.save(path.with_name(f"{path.name}.tmp-{os.getpid()}"))
        try:
            os.replace(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return with_poison(fs, data_dir, base)


def gallery_of(
    face_dir: str | Path, trunk: str | Path, *, people: int, faces: int, image_size: int, progress=None, total=None
):
    """The ``margins`` detector's secret gallery (:class:`detector.margins.FaceGallery`) from a
    face folder (one sub-folder per identity, the networks' class list): ``people`` of those with
    ``faces`` faces or more (all of them, when there are no more) and ``faces`` faces each, drawn
    from the operating system's randomness, never a seed (the draw is the secret; the artifact
    keeps it), through the frozen trunk of the state dict at ``trunk``. Only the drawn faces go
    through the trunk: ``total(n)`` is told how many once they are drawn, ``progress(k)`` each
    batch."""
    from components.trainer.base_trunk import load_base
    from components.trainer.synth import list_images
    from detector.margins import FaceGallery, draw_faces, gallery_people

    items, classes = list_images(face_dir)
    if not items:
        raise ValueError(f"{face_dir}: no face images found (expected one sub-folder per identity)")
    labels = np.array([c for _, c in items])
    rng = np.random.default_rng()
    chosen = gallery_people(labels, len(classes), people, faces, rng)
    drawn = draw_faces(labels, chosen, faces, rng)
    if total is not None:
        total(drawn.size)
    features = Extractor(load_base(trunk), image_size)([items[i][0] for i in drawn.reshape(-1)], progress=progress)
    return FaceGallery(features.reshape(*drawn.shape, -1), chosen, tuple(classes))
