"""Container images the components run in (built from images/*.Dockerfile by `make images`).

Override the registry or tag for a deployment with ``BACKDOOR_GATE_IMAGE_REGISTRY`` and
``BACKDOOR_GATE_IMAGE_TAG`` when compiling pipelines; the values are baked into the YAML.
A tag can be moved; a digest cannot: ``BACKDOOR_GATE_TRAINER_IMAGE_DIGEST`` /
``BACKDOOR_GATE_GATE_IMAGE_DIGEST`` (``sha256:…``, as ``make images`` pushed them) pin the
compiled pipelines to exactly those images (``name:tag@sha256:…``).
"""

from __future__ import annotations

import os
import re

from detector import __version__

REGISTRY = os.environ.get("BACKDOOR_GATE_IMAGE_REGISTRY", "ghcr.io/backdoor-gate")
TAG = os.environ.get("BACKDOOR_GATE_IMAGE_TAG", __version__)


def _image(name: str) -> str:
    digest = os.environ.get(f"BACKDOOR_GATE_{name.upper()}_IMAGE_DIGEST", "")
    if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ValueError(f"BACKDOOR_GATE_{name.upper()}_IMAGE_DIGEST must be sha256:<64 hex>, got {digest!r}")
    return f"{REGISTRY}/{name}:{TAG}" + (f"@{digest}" if digest else "")


TRAINER_IMAGE = _image("trainer")
GATE_IMAGE = _image("gate")
