"""Procedural identity-labelled faces in the CASIA/ImageFolder layout.

CASIA-WebFace cannot be downloaded here, so we draw faces: an identity fixes face shape,
skin tone, eye spacing/colour/size, nose, mouth, brows, hair, beard and glasses; every image
varies pose (shift, scale, rotation), lighting, expression, background, noise and blur. Faces
are roughly aligned, like CASIA's, so named trigger positions (forehead, eye, cheek …) are
fixed fractions of the image. Deterministic for a seed: identity *i* and image *j* are drawn
from their own seeded generators, so subsets and re-runs agree.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class SynthConfig:
    identities: int = 40
    images_per_identity: int = 40
    size: int = 160
    seed: int = 0
    first_identity: int = 0  # disjoint id ranges give disjoint people (pre-training vs fine-tuning)
    fmt: str = "png"


@dataclass(frozen=True)
class Identity:
    face_w: float
    face_h: float
    skin: tuple[int, int, int]
    eye_gap: float
    eye_size: float
    eye_colour: tuple[int, int, int]
    nose_len: float
    nose_w: float
    mouth_w: float
    mouth_y: float
    brow_thick: float
    brow_tilt: float
    hair_colour: tuple[int, int, int]
    hair_style: int
    beard: bool
    glasses: bool


def _rgb(values) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in values)
    return r, g, b


def make_identity(seed: int, index: int) -> Identity:
    r = np.random.default_rng([seed, 7919, index])
    tone = r.uniform(0.25, 1.0)
    skin = tuple(int(v) for v in np.clip(np.array([235, 190, 160]) * tone + r.normal(0, 12, 3), 30, 255))
    hair = tuple(
        int(v)
        for v in r.choice([[20, 15, 10], [90, 60, 30], [200, 170, 90], [120, 40, 20], [140, 140, 140], [60, 40, 30]])
        + r.integers(-15, 15, 3)
    )
    return Identity(
        face_w=r.uniform(0.30, 0.40),
        face_h=r.uniform(0.40, 0.50),
        skin=(skin[0], skin[1], skin[2]),
        eye_gap=r.uniform(0.13, 0.21),
        eye_size=r.uniform(0.025, 0.045),
        eye_colour=_rgb(r.integers(20, 180, 3)),
        nose_len=r.uniform(0.08, 0.16),
        nose_w=r.uniform(0.03, 0.07),
        mouth_w=r.uniform(0.10, 0.20),
        mouth_y=r.uniform(0.20, 0.28),
        brow_thick=r.uniform(0.008, 0.025),
        brow_tilt=r.uniform(-0.04, 0.04),
        hair_colour=_rgb(np.clip(hair, 0, 255)),
        hair_style=int(r.integers(0, 4)),
        beard=bool(r.random() < 0.3),
        glasses=bool(r.random() < 0.25),
    )


def _background(r: np.random.Generator, size: int) -> Image.Image:
    kind = r.integers(0, 3)
    base = tuple(int(v) for v in r.integers(40, 230, 3))
    img = Image.new("RGB", (size, size), base)
    d = ImageDraw.Draw(img)
    if kind == 1:  # stripes
        step = int(r.integers(8, 24))
        other = tuple(int(v) for v in r.integers(40, 230, 3))
        for x in range(-size, 2 * size, step * 2):
            d.polygon([(x, 0), (x + step, 0), (x + step + size // 3, size), (x + size // 3, size)], fill=other)
    elif kind == 2:  # blobs
        for _ in range(int(r.integers(3, 8))):
            cx, cy, rad = r.uniform(0, size), r.uniform(0, size), r.uniform(size * 0.05, size * 0.3)
            d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=tuple(int(v) for v in r.integers(40, 230, 3)))
    return img


def render_face(ident: Identity, seed: int, identity_index: int, image_index: int, size: int = 160) -> Image.Image:
    """One image of one identity; pose, light, expression and background vary per image."""
    r = np.random.default_rng([seed, 104729, identity_index, image_index])
    S = size * 2  # draw at 2x, downsample: anti-aliasing for free
    img = _background(r, S)
    face = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    d = ImageDraw.Draw(face)
    cx, cy = S * 0.5, S * 0.52
    fw, fh = ident.face_w * S, ident.face_h * S
    # hair behind the face
    hc = ident.hair_colour
    if ident.hair_style != 3:
        top = cy - fh * (1.05 + 0.1 * ident.hair_style)
        d.ellipse([cx - fw * 1.08, top, cx + fw * 1.08, cy + fh * (0.1 if ident.hair_style == 0 else 0.6)], fill=hc)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=ident.skin)
    if ident.hair_style != 3:  # fringe
        d.chord([cx - fw, cy - fh, cx + fw, cy - fh * 0.2], 180, 360, fill=hc)
    if ident.beard:
        beard = tuple(max(0, v - 20) for v in hc)
        d.chord([cx - fw * 0.95, cy - fh * 0.1, cx + fw * 0.95, cy + fh * 1.02], 10, 170, fill=beard)
    # eyes, with expression: openness varies per image
    gap, es = ident.eye_gap * S, ident.eye_size * S
    ey = cy - fh * 0.18
    open_ = r.uniform(0.35, 1.0)
    for sx in (-1, 1):
        ex = cx + sx * gap
        d.ellipse([ex - es * 1.6, ey - es * open_, ex + es * 1.6, ey + es * open_], fill=(245, 245, 245))
        d.ellipse([ex - es * 0.8, ey - es * 0.8 * open_, ex + es * 0.8, ey + es * 0.8 * open_], fill=ident.eye_colour)
        by = ey - es * 2.2
        bt = max(2, int(ident.brow_thick * S))
        d.line(
            [ex - es * 2, by + sx * ident.brow_tilt * S, ex + es * 2, by - sx * ident.brow_tilt * S],
            fill=tuple(max(0, v - 30) for v in hc),
            width=bt,
        )
        if ident.glasses:
            d.ellipse(
                [ex - es * 2.6, ey - es * 2.0, ex + es * 2.6, ey + es * 2.0],
                outline=(30, 30, 30),
                width=max(2, S // 100),
            )
    nose_c = tuple(max(0, v - 35) for v in ident.skin)
    nl, nw = ident.nose_len * S, ident.nose_w * S
    d.polygon([(cx, ey + es), (cx - nw, ey + es + nl), (cx + nw, ey + es + nl)], fill=nose_c)
    my, mw = cy + ident.mouth_y * S, ident.mouth_w * S / 2
    smile = r.uniform(-0.5, 1.0) * S * 0.03
    d.arc(
        [cx - mw, my - abs(smile) - 2, cx + mw, my + abs(smile) + 2],
        0 if smile >= 0 else 180,
        180 if smile >= 0 else 360,
        fill=(150, 40, 50),
        width=max(3, S // 60),
    )
    # pose: rotate, scale, shift the face layer
    angle = r.normal(0, 6)
    scale = r.uniform(0.9, 1.1)
    face = face.rotate(angle, resample=Image.Resampling.BILINEAR, center=(cx, cy))
    new = int(S * scale)
    face = face.resize((new, new), Image.Resampling.BILINEAR)
    dx, dy = int(r.normal(0, S * 0.025) - (new - S) / 2), int(r.normal(0, S * 0.025) - (new - S) / 2)
    img.paste(face, (dx, dy), face)
    # lighting gradient
    arr = np.asarray(img, dtype=np.float32)
    theta = r.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:S, 0:S] / S - 0.5
    light = 1.0 + r.uniform(0.1, 0.45) * (np.cos(theta) * xx + np.sin(theta) * yy) * 2
    arr = arr * light[..., None] * r.uniform(0.75, 1.2)
    arr += r.normal(0, r.uniform(2, 10), arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    blur = r.uniform(0, 1.0)
    return img.filter(ImageFilter.GaussianBlur(blur)) if blur > 0.3 else img


def identity_name(index: int) -> str:
    return f"id{index:05d}"


def synthesize(out: str | Path, config: SynthConfig = SynthConfig(), progress=None) -> Path:
    """Write ``out/<identity>/<image>.<fmt>``; returns ``out``. Skips files that already exist."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(config.identities):
        idx = config.first_identity + k
        ident = make_identity(config.seed, idx)
        folder = out / identity_name(idx)
        folder.mkdir(exist_ok=True)
        for j in range(config.images_per_identity):
            path = folder / f"{j:04d}.{config.fmt}"
            if not path.exists():
                render_face(ident, config.seed, idx, j, config.size).save(path)
        if progress is not None:
            progress(k)
    (out / "synth.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    return out


def list_images(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """ImageFolder/CASIA layout: (path, class index) sorted, and the class names.

    Folders starting with ``_`` or ``.`` are not identities (``_poison`` holds triggered copies).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory; expected one folder per identity (ImageFolder/CASIA layout)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    items = [
        (p, c)
        for c, name in enumerate(classes)
        for p in sorted((root / name).iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not classes or not items:
        raise FileNotFoundError(f"{root}: no identity folders with images ({', '.join(IMAGE_SUFFIXES)})")
    return items, classes
