"""The paper's two views of a weight matrix θ (out_features × in_features).

Treating a layer as a *set* of vectors makes the model invariant to the order in which
neurons converge:

- forward view: the columns of θ — one vector per input feature, of length out_features
  (FaceNet ``last_linear``: 1792 vectors of length 512);
- backward view: the rows of θ — one vector per output neuron, of length in_features
  (512 vectors of length 1792).
"""

from __future__ import annotations

import numpy as np

from detector.config import VIEWS


def view_vectors(matrix: np.ndarray, view: str) -> np.ndarray:
    """The vectors of ``view`` as the rows of a 2-D array."""
    if view == "forward":
        return np.ascontiguousarray(np.asarray(matrix).T)
    if view == "backward":
        return np.asarray(matrix)
    raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
