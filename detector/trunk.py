"""Frozen-trunk check: every tensor fine-tuning does not touch must equal the base network's.

Fine-tuning changes only ``last_linear``, ``last_bn`` and ``logits``. A backdoor planted in
any other (frozen) tensor would pass a last-layer detector untouched, so the reference
records a digest of each frozen tensor (of the base network, or else the trunk every reference
network shares, :class:`SharedTrunk`) and a candidate whose frozen tensors differ is blocked
with reason ``trunk-modified``. A reference that recorded no trunk passes nothing
(:mod:`detector.decision`): a check that is skipped is a check that can be walked around.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Prefixes of the tensors that fine-tuning is allowed to change (FaceNet's head).
FINETUNED_PREFIXES: tuple[str, ...] = ("last_linear.", "last_bn.", "logits.")

OK, MODIFIED, NOT_CHECKED, MISSING = "ok", "modified", "not-checked", "missing"


def tensor_digest(t: Any) -> str:
    """sha256 over dtype, shape and the raw values, so a reshaped or recast tensor differs too."""
    import torch

    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().contiguous()
        dtype, shape = str(t.dtype).replace("torch.", ""), tuple(t.shape)
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    else:
        a = np.ascontiguousarray(t)
        dtype, shape, raw = str(a.dtype), a.shape, a.tobytes()
    h = hashlib.sha256(f"{dtype}|{list(shape)}|".encode())
    h.update(raw)
    return h.hexdigest()


def is_finetuned(name: str, prefixes: tuple[str, ...] = FINETUNED_PREFIXES) -> bool:
    return name.startswith(prefixes)


def trunk_digests(state_dict: Mapping[str, Any], prefixes: tuple[str, ...] = FINETUNED_PREFIXES) -> dict[str, str]:
    """Digest of every frozen tensor of a (base) network."""
    return {k: tensor_digest(v) for k, v in state_dict.items() if not is_finetuned(k, prefixes) and hasattr(v, "shape")}


@dataclass(frozen=True)
class TrunkCheck:
    status: str  # ok | modified | not-checked | missing
    modified: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    n_checked: int = 0

    @property
    def reason(self) -> str:
        if self.status == OK:
            return f"trunk identical to the base ({self.n_checked} frozen tensors checked)"
        if self.status == MISSING:
            return (
                f"trunk missing: the reference recorded {self.n_checked} frozen tensors and the file holds only"
                " fine-tuned layers; register the whole network"
            )
        if self.status == NOT_CHECKED:
            return (
                "trunk not checked: the reference records no frozen trunk, so it can pass no candidate;"
                " refit it on whole networks (or with --base)"
            )
        parts = []
        for label, names in (("changed", self.modified), ("missing", self.missing), ("unexpected", self.unexpected)):
            if names:
                shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
                parts.append(f"{label}: {shown}")
        return "trunk-modified: " + "; ".join(parts)


def check_trunk(
    tensors: Mapping[str, Any] | None,
    expected: Mapping[str, str] | None,
    prefixes: tuple[str, ...] = FINETUNED_PREFIXES,
) -> TrunkCheck:
    """Compare a candidate's frozen tensors with the base's digests.

    When the reference recorded a trunk, a candidate holding no frozen tensor at all (a
    head-only file) is ``missing`` (invalid: the trunk it will run with was never judged); one
    holding some must hold all of them, unchanged, and nothing else outside the head. Without
    recorded digests the check is ``not-checked``.
    """
    if not expected:
        return TrunkCheck(NOT_CHECKED)
    frozen = {k: v for k, v in (tensors or {}).items() if not is_finetuned(k, prefixes)}
    if not frozen:
        return TrunkCheck(MISSING, n_checked=len(expected))
    modified = tuple(sorted(k for k, d in expected.items() if k in frozen and tensor_digest(frozen[k]) != d))
    missing = tuple(sorted(k for k in expected if k not in frozen))
    unexpected = tuple(sorted(k for k in frozen if k not in expected))
    if modified or missing or unexpected:
        return TrunkCheck(MODIFIED, modified, missing, unexpected)
    return TrunkCheck(OK, n_checked=len(expected))


class SharedTrunk:
    """The frozen trunk every reference network holds, learned one network at a time.

    Without ``--base`` the reference still records a trunk: the frozen tensors its networks
    share. Networks fine-tuned from different bases (or one with an edited trunk) are refused,
    naming the tensors that differ, instead of recording a trunk no candidate could match.
    Tensors are compared with the first network's by value (cheap); only those are hashed.
    """

    def __init__(self, prefixes: tuple[str, ...] = FINETUNED_PREFIXES):
        self.prefixes = prefixes
        self._first: dict[str, Any] | None = None
        self._first_source = ""

    def add(self, tensors: Mapping[str, Any] | None, source: str) -> None:
        if tensors is None:  # a bare matrix has no trunk to compare
            return
        frozen = {k: v for k, v in tensors.items() if not is_finetuned(k, self.prefixes) and hasattr(v, "shape")}
        if self._first is None:
            self._first, self._first_source = frozen, source
            return
        first = self._first
        changed = sorted(k for k in first.keys() & frozen.keys() if not _same(first[k], frozen[k]))
        missing = sorted(set(first) - set(frozen))
        extra = sorted(set(frozen) - set(first))
        if changed or missing or extra:
            parts = [
                f"{label}: {', '.join(names[:5])}" + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
                for label, names in (("differ", changed), ("missing", missing), ("extra", extra))
                if names
            ]
            raise ValueError(
                f"reference networks do not share one frozen trunk: {source} against {self._first_source} "
                f"({'; '.join(parts)}); fine-tune every reference network from one base, or give --base"
            )

    def digests(self) -> dict[str, str]:
        return trunk_digests(self._first, self.prefixes) if self._first else {}


def _same(a: Any, b: Any) -> bool:
    """Same dtype, shape and values (NaN never equals itself, so a broken trunk never matches)."""
    import torch

    ta, tb = torch.as_tensor(a), torch.as_tensor(b)
    return ta.dtype == tb.dtype and ta.shape == tb.shape and bool(torch.equal(ta, tb))
