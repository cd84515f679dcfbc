"""Errors a user can act on: each says what was wrong, with which file, and what to do."""

from __future__ import annotations


class DetectorError(Exception):
    """Base class; ``str(err)`` is one line meant for a human (and for a verdict's reason)."""


class InvalidCheckpoint(DetectorError):
    """A candidate cannot be scored: unreadable, unsafe, wrong layer/shape/dtype, NaN/Inf.

    The verdict for such a file is ``invalid`` (exit code 2), never ``passed``.
    """

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class InvalidReference(DetectorError):
    """A reference artifact is missing, malformed or tampered with; nothing may be gated on it."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"reference {self.path}: {reason}")


class NotFittedError(DetectorError, ValueError):
    """A reference was used before ``fit``/``calibrate``."""
