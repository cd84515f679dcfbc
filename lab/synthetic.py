"""Synthetic weight families where the right answer is known, for tests and the demo.

Clean networks share an initialisation and differ by per-run noise, as networks fine-tuned
from one pretrained base do. A backdoored network additionally carries a structured change:
a rank-1 update u vᵀ along one input direction v (the trigger's feature direction), which is
what poisoned samples add to a linear layer (see shared findings). Nothing here is face data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FamilyConfig:
    out_features: int = 64
    in_features: int = 96
    init_scale: float = 0.05
    noise: float = 0.01
    backdoor_strength: float = 0.6
    layer: str = "last_linear.weight"
    seed: int = 0


class WeightFamily:
    """Draws clean and backdoored weight matrices around one shared base."""

    def __init__(self, config: FamilyConfig | None = None):
        self.config = config or FamilyConfig()
        c = self.config
        rng = np.random.default_rng(c.seed)
        self.base = rng.normal(0.0, c.init_scale, (c.out_features, c.in_features))
        #: a small frozen "trunk" every network of the family shares, as fine-tuned networks share
        #: their base's; written with each network so the gate's trunk check has something to judge
        self.trunk = {"conv2d_1a.conv.weight": rng.normal(0.0, 0.1, (4, 3, 3, 3)).astype(np.float32)}
        self._rng = rng

    def clean(self) -> np.ndarray:
        c = self.config
        return self.base + self._rng.normal(0.0, c.noise, self.base.shape)

    def backdoored(self, strength: float | None = None) -> np.ndarray:
        c = self.config
        v = self._rng.normal(size=c.in_features)
        v /= np.linalg.norm(v)
        u = self._rng.normal(size=c.out_features)
        # ||u v^T||_F = strength x the expected Frobenius norm of one run's noise.
        s = c.backdoor_strength if strength is None else strength
        u *= s * c.noise * np.sqrt(c.in_features * c.out_features) / np.linalg.norm(u)
        return self.clean() + np.outer(u, v)

    def state_dict(self, matrix: np.ndarray) -> dict:
        """A whole network as a trainer saves it: the family's trunk, the layer, a batch-norm scale."""
        import torch

        t = torch.from_numpy(np.asarray(matrix, dtype=np.float32))
        trunk = {k: torch.from_numpy(v.copy()) for k, v in self.trunk.items()}
        return {**trunk, self.config.layer: t, "last_bn.weight": torch.ones(t.shape[0])}

    def write(self, matrix: np.ndarray, path: str | Path, fmt: str = "pt") -> Path:
        """Save as a plain state dict (``.pt``) or safetensors, as a trainer would."""
        import torch

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        sd = self.state_dict(matrix)
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(p))
        else:
            torch.save(sd, p)
        return p
