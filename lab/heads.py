"""Many networks of one run, as one frozen trunk and their affine heads.

Every network of a protocol fine-tunes only the head over the same frozen trunk, so a face
batch needs one trunk pass for all of them: an ensemble (the attacker's own clean networks) or
a panel (the gate's) costs about what one network does.
"""

from __future__ import annotations

from typing import Any

import torch

from detector.classifier import BN_EPS


def head_of(t: dict) -> tuple[Any, Any]:
    """(A, b): the network's logits are ``A·x + b`` on trunk features x (eval mode)."""
    s = t["last_bn.weight"] / (t["last_bn.running_var"] + BN_EPS) ** 0.5
    A = t["logits.weight"] @ (s[:, None] * t["last_linear.weight"])
    b = t["logits.weight"] @ (t["last_bn.bias"] - s * t["last_bn.running_mean"]) + t["logits.bias"]
    return A, b


class Heads:
    """``heads(x)`` is the (networks, faces, classes) logits of every head on images ``x``."""

    def __init__(self, base: dict, heads: list[dict]):
        from components.trainer.base_trunk import new_network

        if not heads:
            raise ValueError("Heads needs at least one network's head")
        net = new_network()
        net.load_state_dict({k: v for k, v in base.items() if not k.startswith("logits.")}, strict=False)
        for name in ("last_linear", "last_bn", "logits"):  # the forward then ends at the trunk's features
            setattr(net, name, torch.nn.Identity())
        net.eval().to(memory_format=torch.channels_last)
        for p in net.parameters():
            p.requires_grad_(False)
        self.trunk = net
        A, b = zip(*(head_of({k: v.double() for k, v in h.items()}) for h in heads))
        self.A = torch.stack(A).float()  # (networks, classes, features)
        self.b = torch.stack(b).float()  # (networks, classes)

    def __len__(self) -> int:
        return len(self.A)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)
        return torch.einsum("nd,pcd->pnc", f, self.A) + self.b[:, None]
