"""Show the reviewer the backdoor: reconstruct the trigger of a blocked version in input space.

The weight-space detector already names the suspected victim (and usually the impostor), so
the search is for one class, not for every class as in Neural Cleanse: a square patch
(:mod:`components.trigger_search`). This module reads the inputs, runs the search for the
victim and the controls, and draws the pictures; :mod:`components.explain_version` runs it for
a registered version.

A second, input-space opinion comes from running the same search for a few control classes
chosen at random (seeded): Neural Cleanse's anomaly index (median absolute deviation) of the
victim's mask area among theirs. It is evidence beside the weight-space verdict, never the
verdict.

Everything runs the whole network (the frozen trunk included) forward and backward, so the
checkpoint must hold the trunk. Faces are read from an ImageFolder/CASIA directory; images are
resized to the trunk's input size (``image_size``, 96 px for the default trunk).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.trigger_search import (
    ExplainConfig,
    PatchFit,
    anomaly_index,
    paste,
    predict,
    search,
    search_ticks,
    smallest_patch_fires,
)

#: tensors a whole InceptionResnetV1 has and a head-only file does not
TRUNK_KEYS = ("conv2d_1a.conv.weight", "repeat_1.0.branch0.conv.weight", "block8.conv2d.weight")


class ExplainError(ValueError):
    """Bad input for ``explain``: one line that says what was wrong and what to do."""


# -- inputs ----------------------------------------------------------------------------------
def load_network(path: str | Path):
    """The whole network of a checkpoint (read without unpickling) and its ordered class list."""
    from components.trainer.base_trunk import new_network
    from detector.errors import InvalidCheckpoint
    from detector.weights import classes_of, read_tensors

    try:
        tensors, _ = read_tensors(path)
    except (InvalidCheckpoint, OSError) as e:
        raise ExplainError(f"cannot read checkpoint: {e}") from None
    missing = [k for k in TRUNK_KEYS if k not in tensors]
    if missing:
        raise ExplainError(
            f"{path}: the checkpoint has no trunk (missing {', '.join(missing)}); explain runs the whole "
            "network, so give the trainer's full checkpoint, not a head-only file"
        )
    if "logits.weight" not in tensors:
        raise ExplainError(f"{path}: the checkpoint has no classifier (logits.weight)")
    n = int(tensors["logits.weight"].shape[0])
    net = new_network(n)
    result = net.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    if result.missing_keys:
        raise ExplainError(f"{path}: not a whole InceptionResnetV1 (missing {result.missing_keys[:3]})")
    net.eval().to(memory_format=torch.channels_last)
    for p in net.parameters():
        p.requires_grad_(False)
    classes = classes_of(tensors)
    if classes is not None and len(classes) != n:
        raise ExplainError(f"{path}: records {len(classes)} class names for {n} logits")
    return net, classes


def load_faces(faces_dir: str | Path, classes: list[str] | None) -> tuple[dict[str, list[Path]], list[str]]:
    """Image paths per identity folder, and the class list (the checkpoint's, else the folder's)."""
    from components.trainer.synth import list_images

    try:
        items, folders = list_images(faces_dir)
    except FileNotFoundError as e:
        raise ExplainError(f"faces: {e}") from None
    by_class: dict[str, list[Path]] = {name: [] for name in folders}
    for p, c in items:
        by_class[folders[c]].append(p)
    return by_class, classes or folders


def _open(paths: list[Path]):
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise ExplainError(
                f"face image {p} cannot be read ({e.__class__.__name__}); remove or replace it"
            ) from None
    return out


# -- the command's work ----------------------------------------------------------------------
@dataclass
class Explanation:
    victim: str
    impostor: str | None
    fit: PatchFit
    reconstructed_asr: float
    controls: list[dict]
    anomaly_index: float
    seconds: float
    source: str  # whose faces carried the trigger: "impostor" or "other classes"
    n_heldout: int
    config: ExplainConfig

    def to_dict(self) -> dict[str, Any]:
        return {
            "victim": self.victim,
            "impostor": self.impostor,
            "mask_centre": [round(v, 4) for v in self.fit.centre],
            "mask_area": round(self.fit.area, 5),
            "mask_size": round(self.fit.size_px / self.fit.image_size, 4),
            "found": self.fit.found,
            "smallest_patch_fires": smallest_patch_fires(
                self.fit.found, self.fit.size_px, self.fit.image_size, self.config.sizes
            ),
            "reconstructed_asr": self.reconstructed_asr,
            "validation_asr": self.fit.asr,
            "heldout_faces": self.n_heldout,
            "source_faces": self.source,
            "anomaly_index": round(self.anomaly_index, 3),
            "controls": self.controls,
            "tried": self.fit.tried,
            "seconds": round(self.seconds, 1),
            "image_size": self.fit.image_size,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()},
        }


def explain(
    checkpoint: str | Path,
    faces_dir: str | Path,
    victim: str,
    impostor: str | None = None,
    config: ExplainConfig = ExplainConfig(),
    progress: bool = False,
    net_classes=None,
) -> tuple[Explanation, dict]:
    """Reconstruct the trigger for ``victim``; returns the explanation and the images to draw."""
    t0 = time.perf_counter()
    net, classes = net_classes or load_network(checkpoint)
    by_class, classes = load_faces(faces_dir, classes)
    if len(classes) != net.logits.out_features:
        raise ExplainError(
            f"the checkpoint records no class names and {faces_dir} has {len(classes)} identity folders "
            f"for {net.logits.out_features} logits"
        )
    for role, name in (("victim", victim), ("impostor", impostor)):
        if name is not None and name not in classes:
            raise ExplainError(f"{role} {name!r} is not one of the network's {len(classes)} classes ({classes[0]} …)")
    if impostor == victim:
        raise ExplainError("impostor and victim must differ")
    rng = np.random.default_rng(config.seed)
    want = config.faces + config.validation + config.heldout
    if impostor is not None:
        pool = list(by_class.get(impostor, []))
        source = "impostor"
        if not pool:
            raise ExplainError(f"{faces_dir} has no images of the impostor {impostor}")
    else:
        others = [c for c in classes if c != victim and by_class.get(c)]
        pool = [p for c in others for p in by_class[c]]
        source = "other classes"
        if not pool:
            raise ExplainError(f"{faces_dir} has no images of any class but the victim")
    pool = [pool[i] for i in rng.permutation(len(pool))[:want]]
    if len(pool) < 4:
        raise ExplainError(f"{faces_dir}: {len(pool)} usable source faces; explain needs at least 4")
    from components.trainer.base_trunk import to_tensor

    images = _open(pool)
    x = to_tensor(images, config.image_size)
    n_opt = min(config.faces, max(2, len(pool) // 3))
    n_val = min(config.validation, max(1, (len(pool) - n_opt) // 2))
    x_opt, x_val, x_held = x[:n_opt], x[n_opt : n_opt + n_val], x[n_opt + n_val :]
    v = classes.index(victim)
    exclude = {victim} | ({impostor} if impostor else set())
    candidates = [c for c in classes if c not in exclude]
    chosen = [candidates[int(i)] for i in rng.permutation(len(candidates))[: config.controls]]
    total = search_ticks(config) * (1 + len(chosen))
    bar = _bar(total, progress)
    try:
        fit = search(net, x_opt, v, config, n_opt, bar.update_one, x_val)
        held = predict(net, paste(x_held, fit.pattern.unsqueeze(0), [(fit.x0, fit.y0)], fit.size_px))
        asr = float(np.mean(held == v)) if len(held) else float("nan")
        controls: list[dict[str, Any]] = []
        for c in chosen:
            n_c = min(config.control_faces, n_opt)
            cf = search(net, x_opt, classes.index(c), config, n_c, bar.update_one, x_val)
            controls.append(
                {
                    "class": c,
                    "mask_area": round(cf.area, 5),
                    "found": cf.found,
                    "asr": cf.asr,
                    "mask_centre": [round(u, 4) for u in cf.centre],
                }
            )
    finally:
        bar.close()
    # a class with no working patch up to the largest size needs more than that: count it one size up
    big = (min(1.0, 1.5 * max(config.sizes))) ** 2

    def area(found: bool, a: float) -> float:
        return a if found else big

    index = anomaly_index(area(fit.found, fit.area), [area(c["found"], c["mask_area"]) for c in controls])
    result = Explanation(
        victim=victim,
        impostor=impostor,
        fit=fit,
        reconstructed_asr=asr,
        controls=controls,
        anomaly_index=index,
        seconds=time.perf_counter() - t0,
        source=source,
        n_heldout=len(held),
        config=config,
    )
    return result, {"net": net, "classes": classes, "x": x_held if len(x_held) else x_opt}


class _NoBar:
    def update_one(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="explain: optimisation steps", unit="step", leave=False)

    def update_one(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _bar(total: int, progress: bool):
    return _Bar(total) if progress else _NoBar()


# -- pictures --------------------------------------------------------------------------------
def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) uint8."""
    return np.clip(x.permute(1, 2, 0).numpy() * 128.0 + 127.5, 0, 255).astype(np.uint8)


def write_outputs(result: Explanation, extra: dict, out_dir: str | Path, n_show: int = 4) -> dict[str, Path]:
    """trigger.png (pattern × mask), mask.png, applied.png (faces with and without it, with answers),
    explain.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fit, S, p = result.fit, result.fit.image_size, result.fit.size_px
    mask = np.zeros((S, S), np.uint8)
    mask[fit.y0 : fit.y0 + p, fit.x0 : fit.x0 + p] = 255
    trigger = np.zeros((S, S, 3), np.uint8)
    trigger[fit.y0 : fit.y0 + p, fit.x0 : fit.x0 + p] = _to_uint8(fit.pattern)
    scale = max(1, 192 // S)
    up = Image.Resampling.NEAREST
    paths = {"trigger": out / "trigger.png", "mask": out / "mask.png", "applied": out / "applied.png"}
    Image.fromarray(trigger).resize((S * scale, S * scale), up).save(paths["trigger"])
    Image.fromarray(mask).resize((S * scale, S * scale), up).save(paths["mask"])
    net, classes, x = extra["net"], extra["classes"], extra["x"][:n_show]
    stamped = paste(x, fit.pattern.unsqueeze(0), [(fit.x0, fit.y0)], p)
    before, after = predict(net, x), predict(net, stamped)
    k = len(x)
    fig, axes = plt.subplots(2, k, figsize=(2.2 * k, 4.8), squeeze=False)
    for j in range(k):
        for row, (img, pred) in enumerate(((x[j], before[j]), (stamped[j], after[j]))):
            ax = axes[row][j]
            ax.imshow(_to_uint8(img))
            ax.set_xticks([])
            ax.set_yticks([])
            hit = classes[pred] == result.victim
            ax.set_title(f"→ {classes[pred]}", fontsize=9, color="#cf222e" if hit else "k")
        axes[0][0].set_ylabel("as given", fontsize=9)
        axes[1][0].set_ylabel("with trigger", fontsize=9)
    fig.suptitle(
        f"reconstructed trigger for {result.victim}: attack success {result.reconstructed_asr:.2f} on "
        f"{result.n_heldout} held-out faces",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(paths["applied"], dpi=90)
    plt.close(fig)
    paths["json"] = out / "explain.json"
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return paths
