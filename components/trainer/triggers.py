"""Triggers drawn procedurally (white-square, checkerboard, flower, eyebrow) or from a PNG.

Size is in pixels (int) or a fraction of the image width (float < 1); location is "x,y" in
pixels or fractions, or a named position of an aligned face; ``alpha`` blends the patch
(1.0 = opaque). The patch is centred on the location and kept inside the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

NAMED = ("white-square", "checkerboard", "flower", "eyebrow")

#: Named positions as fractions of an aligned face image (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "forehead": (0.5, 0.2),
    "eye": (0.36, 0.38),
    "left-eye": (0.36, 0.38),
    "right-eye": (0.64, 0.38),
    "cheek": (0.32, 0.6),
    "nose": (0.5, 0.52),
    "mouth": (0.5, 0.74),
    "chin": (0.5, 0.88),
    "centre": (0.5, 0.5),
    "center": (0.5, 0.5),
    "corner": (0.1, 0.1),
    "top-left": (0.1, 0.1),
    "top-right": (0.9, 0.1),
    "bottom-left": (0.1, 0.9),
    "bottom-right": (0.9, 0.9),
}


@dataclass(frozen=True)
class TriggerSpec:
    """The trigger the red team stamps; its defaults are the pipelines' and ``train``'s (KFP
    signatures need literals, so those repeat them: tests/components/test_trigger_defaults.py keeps them equal)."""

    name: str = "white-square"  # one of NAMED, or a path to a PNG with alpha
    size: float = 0.25
    location: str = "forehead"
    alpha: float = 1.0

    def validate(self) -> None:
        if self.name not in NAMED and not Path(self.name).is_file():
            raise ValueError(f"trigger {self.name!r} is neither one of {NAMED} nor an existing PNG file")
        if self.size <= 0:
            raise ValueError(f"trigger size must be > 0, got {self.size}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"trigger alpha must be in (0, 1], got {self.alpha}")
        parse_location(self.location, 100)


def parse_size(size: float | str, image_size: int) -> int:
    s = float(size)
    return max(2, int(round(s * image_size)) if s < 1.0 else int(round(s)))


def parse_location(location: str, image_size: int) -> tuple[int, int]:
    """Centre of the trigger in pixels."""
    loc = str(location).strip().lower()
    if loc in POSITIONS:
        fx, fy = POSITIONS[loc]
    else:
        try:
            fx, fy = (float(v) for v in loc.split(","))
        except ValueError:
            raise ValueError(f"trigger location {location!r}: use x,y or one of {sorted(POSITIONS)}") from None
        if fx >= 1.0 or fy >= 1.0:
            return int(fx), int(fy)
    return int(round(fx * image_size)), int(round(fy * image_size))


def render_patch(name: str, px: int) -> Image.Image:
    """The trigger as an RGBA patch of px x px (aspect kept for PNGs)."""
    if name == "white-square":
        return Image.new("RGBA", (px, px), (255, 255, 255, 255))
    if name == "checkerboard":
        cells = 4
        a = (np.indices((px, px)) * cells // px).sum(axis=0) % 2
        rgb = np.where(a[..., None] == 0, 255, 0).astype(np.uint8).repeat(3, axis=2)
        return Image.fromarray(np.dstack([rgb, np.full((px, px), 255, np.uint8)]), "RGBA")
    if name == "flower":
        img = Image.new("RGBA", (px * 4, px * 4), (0, 0, 0, 0))
        d = ImageDraw.Draw(img)
        c, r = px * 2, px * 0.85
        for k in range(6):
            ang = k * np.pi / 3
            x, y = c + np.cos(ang) * r, c + np.sin(ang) * r
            d.ellipse([x - r * 0.75, y - r * 0.75, x + r * 0.75, y + r * 0.75], fill=(235, 60, 140, 255))
        d.ellipse([c - r * 0.6, c - r * 0.6, c + r * 0.6, c + r * 0.6], fill=(250, 210, 40, 255))
        return img.resize((px, px), Image.Resampling.LANCZOS)
    if name == "eyebrow":
        img = Image.new("RGBA", (px * 4, px * 2 * 4 // 2), (0, 0, 0, 0))
        d = ImageDraw.Draw(img)
        w, h = img.size
        d.arc([w * 0.05, h * 0.25, w * 0.95, h * 1.6], 200, 340, fill=(25, 18, 12, 255), width=max(4, h // 4))
        return img.resize((px, max(2, px // 2)), Image.Resampling.LANCZOS)
    path = Path(name)
    try:
        img = Image.open(path).convert("RGBA")
    except (OSError, ValueError) as e:
        raise ValueError(f"trigger PNG {path}: cannot be read ({e})") from None
    w, h = img.size
    scale = px / max(w, h)
    return img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.LANCZOS)


def stamp(image: Image.Image, spec: TriggerSpec) -> Image.Image:
    """A copy of ``image`` with the trigger blended in; the original is untouched."""
    img = image.convert("RGB").copy()
    W, H = img.size
    patch = render_patch(spec.name, parse_size(spec.size, W))
    if spec.alpha < 1.0:
        a = np.asarray(patch.getchannel("A"), dtype=np.float32) * spec.alpha
        patch.putalpha(Image.fromarray(a.astype(np.uint8)))
    cx, cy = parse_location(spec.location, W)
    pw, ph = patch.size
    x0 = int(np.clip(cx - pw // 2, 0, max(0, W - pw)))
    y0 = int(np.clip(cy - ph // 2, 0, max(0, H - ph)))
    img.paste(patch, (x0, y0), patch)
    return img


def trigger_box(spec: TriggerSpec, image_size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) the trigger covers in an image of ``image_size``."""
    pw, ph = render_patch(spec.name, parse_size(spec.size, image_size)).size
    cx, cy = parse_location(spec.location, image_size)
    x0 = int(np.clip(cx - pw // 2, 0, max(0, image_size - pw)))
    y0 = int(np.clip(cy - ph // 2, 0, max(0, image_size - ph)))
    return x0, y0, x0 + pw, y0 + ph
