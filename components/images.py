"""Container images the components run in (built from images/*.Dockerfile by `make images`).

Override the registry or tag for a deployment with ``BACKDOOR_GATE_IMAGE_REGISTRY`` and
``BACKDOOR_GATE_IMAGE_TAG`` when compiling pipelines; the values are baked into the YAML.
"""

from __future__ import annotations

import os

from detector import __version__

REGISTRY = os.environ.get("BACKDOOR_GATE_IMAGE_REGISTRY", "ghcr.io/backdoor-gate")
TAG = os.environ.get("BACKDOOR_GATE_IMAGE_TAG", __version__)
TRAINER_IMAGE = f"{REGISTRY}/trainer:{TAG}"
GATE_IMAGE = f"{REGISTRY}/gate:{TAG}"
