"""``classifier``: does one identity's decision rule deviate from clean networks'?

The trunk is frozen, so a fine-tuned FaceNet maps trunk features to class scores by a linear
map, the *effective classifier*

    A = logits.weight · diag(γ / √(running_var + ε)) · last_linear.weight      (classes × 1792)

(``γ``, ``running_var``: ``last_bn``; the BatchNorm shift and the logits bias only add a
constant per class). A one-to-one backdoor must teach the victim's row to fire on the
trigger's feature direction, so the victim's row moves where no clean network's row for that
class goes. Rows are centred over classes (a softmax ignores a shift common to all classes),
and class rows are comparable across networks trained on the same ordered class list — which
is why the trainer records that list in the checkpoint and a candidate with another list is
``invalid``.

Per class c the statistic is the squared distance of row c to the mean of the reference
networks' rows c, divided by the network's median over classes (so a retrain that moves every
class further — twice the learning rate — is not an outlier), turned into a robust z-score
against the same statistic of the reference networks, each scored leave-one-out (median and
1.4826·MAD per class). The network's score is −max_c z_c: *higher = more typical*, like every
detector here; the arg-max names the suspected victim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone

from detector.baselines import OneViewReference, SpectrumView
from detector.config import ReferenceConfig
from detector.errors import InvalidCheckpoint
from detector.evidence import Evidence, Suspect
from detector.protocol import check_fitted, leave_one_out
from detector.threshold import median_mad
from detector.weights import CLASSES_KEY, LayerWeights, StateDict, _check_values, _to_numpy, classes_of, layer_of

#: The detector's one pseudo-view: one "vector" per class.
CLASSES = "classes"
#: FaceNet's ``last_bn`` epsilon (BatchNorm1d(512, eps=0.001)).
BN_EPS = 1e-3
_HEAD = ("last_linear.weight", "last_bn.weight", "last_bn.running_var", "logits.weight")


def _tensor(tensors: Mapping[str, Any], name: str, source: str) -> Any:
    if name not in tensors:
        raise InvalidCheckpoint(source, f"tensor '{name}' not found; the classifier detector reads {', '.join(_HEAD)}")
    return tensors[name]


def _vector(tensors: Mapping[str, Any], name: str, source: str) -> np.ndarray:
    return _check_values(np.asarray(_to_numpy(_tensor(tensors, name, source), name, source)).reshape(-1), name, source)


def row_blocks(t: Any, name: str, source: str, rows: int = 1024) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float64 block) over a (classes × k) tensor, each block checked finite and
    bounded: no float64 copy of the whole of ``logits.weight`` at CASIA's 10,575 classes."""
    for i in range(0, int(np.shape(t)[0]), rows):
        yield i, _check_values(np.asarray(_to_numpy(t[i : i + rows], name, source)), name, source)


def effective_classifier(
    tensors: Mapping[str, Any], source: str = "<memory>", rows: int = 1024, out: np.ndarray | None = None
) -> np.ndarray:
    """A (classes × in_features), rows centred over classes; raises InvalidCheckpoint.

    Computed a block of classes at a time, so that at CASIA's 10,575 classes no float64 copy of
    ``logits.weight`` sits beside A (the gate's memory target); ``out`` (a float64 or float32
    array of A's shape, e.g. a view into a wider matrix) receives A without a copy. In float32
    the products are float32 (the checkpoint's own precision) and the class mean float64: half
    the memory and time of the gate's largest array, a relative error near 1e-6."""
    W = layer_of(tensors, "last_linear.weight", source=source).matrix
    logits = _tensor(tensors, "logits.weight", source)
    gamma, var = _vector(tensors, "last_bn.weight", source), _vector(tensors, "last_bn.running_var", source)
    shape = tuple(int(x) for x in np.shape(logits))
    if len(shape) != 2 or not (shape[1] == W.shape[0] == gamma.size == var.size) or shape[0] < 2:
        raise InvalidCheckpoint(
            source, f"head shapes disagree: logits {shape}, last_bn {gamma.size}/{var.size}, last_linear {W.shape}"
        )
    if np.any(var < 0):
        raise InvalidCheckpoint(source, "last_bn.running_var holds negative values")
    M = (gamma / np.sqrt(var + BN_EPS))[:, None] * W
    A = np.empty((shape[0], W.shape[1])) if out is None else out
    if A.shape != (shape[0], W.shape[1]) or A.dtype not in (np.float64, np.float32):
        raise ValueError(f"out must be float64 or float32 of shape {(shape[0], W.shape[1])}, got {A.dtype} {A.shape}")
    M = M.astype(A.dtype, copy=False)
    for i, block in row_blocks(logits, "logits.weight", source, rows):
        np.matmul(block.astype(A.dtype, copy=False), M, out=A[i : i + rows])
    A -= A.mean(axis=0, dtype=np.float64, keepdims=True).astype(A.dtype)
    if not np.isfinite(A.sum()):  # any NaN/inf makes the sum non-finite (no full-size mask)
        raise InvalidCheckpoint(source, "the effective classifier overflows (weights too large to score)")
    return A


def _robust(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Median and 1.4826·MAD along ``axis``, the MAD floored so a constant class cannot divide by 0."""
    med, mad = median_mad(x, axis=axis)
    floor = 1e-6 * np.maximum(np.abs(med), np.median(np.abs(med)) + 1e-300)
    return med, np.maximum(mad, floor)


def relative_deviation(dev: np.ndarray, normalize: str) -> np.ndarray:
    """Per-class deviations divided by the network's median (``"network"``) or kept (``"none"``)."""
    if normalize == "network":
        return dev / np.maximum(np.median(dev, axis=-1, keepdims=True), 1e-300)
    if normalize == "none":
        return dev
    raise ValueError(f"normalize must be 'network' or 'none', got {normalize!r}")


class ClassRows:
    """What every per-class view shares: its fitted state, saved and restored one way (the clean
    networks' mean row per class, float32 as the artifact keeps it: half the bytes at CASIA's class
    count; the median and scale of each class's statistic), and its rule that one deviant entry
    is enough (a backdoor has one victim)."""

    center_: np.ndarray
    median_: np.ndarray
    scale_: np.ndarray
    n_networks_: int
    shape_: tuple[int, ...]

    def score_vectors(self, matrix: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def aggregate(vector_scores: np.ndarray) -> float:
        """−max z: the entry that moved most unlike the clean networks decides."""
        return float(np.min(vector_scores))

    def score(self, matrix: np.ndarray) -> float:
        return self.aggregate(self.score_vectors(matrix))

    def _rows_arrays(self) -> dict[str, np.ndarray]:
        return {"center": self.center_, "median": self.median_, "scale": self.scale_}

    def _rows_info(self) -> dict[str, Any]:
        return {"n_networks": self.n_networks_, "n_classes": int(self.center_.shape[0])}

    def _restore_rows(self, info: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        self.center_ = np.asarray(arrays["center"], dtype=np.float32)
        self.median_, self.scale_ = arrays["median"], arrays["scale"]
        self.n_networks_, self.shape_ = int(info["n_networks"]), tuple(self.center_.shape)


class ClassDeviationView(ClassRows, BaseEstimator):
    """Per-class robust z of the effective classifier's deviation from the reference rows.

    ``normalize="network"`` divides each class's deviation by the network's median class
    deviation (insensitive to how far training moved *everything*); ``"none"`` keeps raw
    squared distances. ``scale``: the per-class spread of the reference networks' statistic —
    ``"mad"`` (robust), ``"std"`` (counts the occasional class a clean recipe up-weights as
    normal), or ``"pooled"`` (one MAD for all classes: the median of the per-class MADs).
    """

    view = CLASSES
    unit = "class"

    def __init__(self, normalize: str = "network", scale: str = "std"):
        self.normalize = normalize
        self.scale = scale

    def _relative(self, dev: np.ndarray) -> np.ndarray:
        return relative_deviation(dev, self.normalize)

    def fit(self, matrices: Sequence[np.ndarray], base_matrix: np.ndarray | None = None) -> ClassDeviationView:
        S = np.stack([np.asarray(A, dtype=np.float64) for A in matrices])
        M = S.shape[0]
        if M < 3:
            raise ValueError(f"the classifier detector needs at least 3 reference networks, got {M}")
        mean = S.mean(axis=0)
        loo_centres = (M * mean[None] - S) / (M - 1)
        # kept in float32, as the artifact keeps it, so a loaded reference scores exactly alike
        # (and a CASIA-sized reference holds half the bytes of float64 centres)
        self.center_ = mean.astype(np.float32)
        # a new network's distance to the M-network mean is (1 + 1/M) σ², a left-out one's to
        # the other M-1's mean (1 + 1/(M-1)) σ²: rescale so both are on the same footing
        dev = np.einsum("mcd,mcd->mc", S - loo_centres, S - loo_centres) * ((1 + 1 / M) / (1 + 1 / (M - 1)))
        rel = self._relative(dev)
        self.median_, mad = _robust(rel, axis=0)
        if self.scale == "mad":
            self.scale_ = mad
        elif self.scale == "std":
            self.scale_ = np.maximum(rel.std(axis=0, ddof=1), mad * 1e-3)
        elif self.scale == "pooled":
            self.scale_ = np.full_like(mad, np.median(mad))
        else:
            raise ValueError(f"scale must be mad, std or pooled, got {self.scale!r}")
        self.reference_vector_scores_ = -(rel - self.median_) / self.scale_
        self.n_networks_, self.shape_ = M, tuple(self.center_.shape)
        return self

    def deviation(self, matrix: np.ndarray, rows: int = 1024) -> np.ndarray:
        """Squared distance of each class row to the reference mean row of that class (in float64,
        a block of rows at a time: at 10,575 classes a whole difference matrix is 152 MB)."""
        A = np.asarray(matrix, dtype=np.float64)
        out = np.empty(A.shape[0])
        for i in range(0, A.shape[0], rows):
            D = A[i : i + rows] - self.center_[i : i + rows]
            out[i : i + rows] = np.einsum("cd,cd->c", D, D)
        return out

    def score_vectors(self, matrix: np.ndarray) -> np.ndarray:
        """−z per class: the lowest is the class that moved most unlike the clean networks."""
        check_fitted(self, "center_")
        return -(self._relative(self.deviation(matrix)) - self.median_) / self.scale_

    def leave_one_out_vector_scores(
        self, matrices: Sequence[np.ndarray], progress: Callable | None = None
    ) -> np.ndarray:
        return leave_one_out(matrices, lambda rest: clone(self).fit(rest), progress)

    def arrays(self) -> dict[str, np.ndarray]:
        return self._rows_arrays()

    def info(self) -> dict[str, Any]:
        return {"normalize": self.normalize, "scale": self.scale, **self._rows_info()}

    @classmethod
    def restore(cls, info: dict, arrays: dict[str, np.ndarray]) -> ClassDeviationView:
        est = cls(normalize=info["normalize"], scale=info["scale"])
        est._restore_rows(info, arrays)
        return est


class ClassifierReference(OneViewReference):
    """The ``classifier`` detector: reads the effective classifier instead of one layer."""

    detector = "classifier"
    primary_view = CLASSES
    #: what a report calls the matrix it reads
    layer_label = "effective classifier"

    def __init__(
        self,
        config: ReferenceConfig | None = None,
        normalize: str = "network",
        scale: str = "std",
        victim_rule: str = "toward-impostor",
    ):
        super().__init__(config)
        self.normalize = normalize
        self.scale = scale
        #: how the suspected victim is picked: "toward-impostor" (see evidence) or "max" (the most deviant class)
        self.victim_rule = victim_rule

    def _view_estimator_for(self) -> BaseEstimator:
        return ClassDeviationView(normalize=self.normalize, scale=self.scale)

    @classmethod
    def _from_info(cls, info: Mapping[str, Any], config: ReferenceConfig) -> ClassifierReference:
        return cls(config, normalize=info["views"][CLASSES]["normalize"], scale=info["views"][CLASSES]["scale"])

    def network_matrix(self, tensors: Mapping[str, Any], source: str, sha256: str | None) -> LayerWeights:
        classes = classes_of(tensors)
        expected = getattr(self, "classes_", None)
        if expected is not None and isinstance(tensors, StateDict):
            if classes is None:
                raise InvalidCheckpoint(
                    source,
                    f"records no class list (safetensors metadata '{CLASSES_KEY}'); the reference was fitted on "
                    f"{len(expected)} named classes",
                )
            if classes != expected:
                diff = next(
                    (i for i, (a, b) in enumerate(zip(classes, expected)) if a != b), min(len(classes), len(expected))
                )
                raise InvalidCheckpoint(
                    source,
                    f"class list differs from the reference's ({len(classes)} vs {len(expected)} classes, first "
                    f"difference at index {diff})",
                )
        A = self._head_matrix(tensors, source)
        if expected is not None and A.shape[0] != len(expected):
            raise InvalidCheckpoint(source, f"logits has {A.shape[0]} classes; the reference expects {len(expected)}")
        return LayerWeights(
            matrix=A,
            layer=self.layer_label,
            source=source,
            sha256=sha256,
            original_shape=tuple(A.shape),
            classes=classes,
        )

    def _head_matrix(self, tensors: Mapping[str, Any], source: str) -> np.ndarray:
        return effective_classifier(tensors, source)

    @staticmethod
    def _row(v: np.ndarray) -> np.ndarray:
        """The part of a class's vector that is its row of A (where "points at" is measured)."""
        return v

    def _fitted_on(self, layers: Sequence[LayerWeights]) -> None:
        """The reference networks' class list, which every candidate must then share."""
        named = [lw for lw in layers if lw.classes is not None]
        if len({tuple(lw.classes or ()) for lw in named}) > 1:
            raise ValueError(
                "reference networks disagree on the class list: "
                + "; ".join(f"{lw.source}: {len(lw.classes or ())} classes" for lw in named[:4])
            )
        self.classes_ = list(named[0].classes or ()) if named else None

    def evidence(self, vector_scores: Mapping[str, np.ndarray], matrix: np.ndarray | None = None) -> Evidence:
        """The suspected victim, with its z and the other most deviant class's (``runner_up_z``).

        A one-to-one backdoor moves two rows: the victim's learns to fire on the impostor's
        (triggered) features, the impostor's learns not to. So when the two most deviant classes
        are *both* anomalous on their own (each beyond the z the threshold allows), the victim is
        the one whose deviation points toward the *other's* clean row, and the other is named the
        suspected impostor. When only one class is anomalous, it is the suspect and no impostor is
        named: the second class is then just the largest of the clean rows' noise.
        """
        z = -np.asarray(vector_scores[CLASSES])
        order = np.argsort(z)[::-1]
        names = getattr(self, "classes_", None) or [str(i) for i in range(z.size)]
        i = int(order[0])
        other = int(order[1]) if len(order) > 1 else None
        impostor = None
        #: the z a single class may reach in a network that passes (score = -max z >= threshold)
        z_cut = -self.thresholds_[CLASSES] if hasattr(self, "thresholds_") else -np.inf
        if matrix is not None and other is not None and self.victim_rule == "toward-impostor" and z[other] > z_cut:
            a, b = i, other
            est = self.views_[CLASSES]
            d = {c: self._row(np.asarray(matrix[c], dtype=np.float64) - est.center_[c]) for c in (a, b)}

            def toward(x: int, y: int) -> float:  # does row x's change point at class y's clean row?
                cy = self._row(est.center_[y].astype(np.float64))
                return float(d[x] @ cy / max(np.linalg.norm(d[x]) * np.linalg.norm(cy), 1e-300))

            if toward(b, a) > toward(a, b):
                i, other = b, a
            impostor = names[other]
        suspect = Suspect(
            suspected_class=names[i],
            suspected_index=i,
            suspected_z=float(z[i]),
            median_z=float(np.median(z)),
            runner_up_z=float(z[other]) if other is not None else None,
            suspected_impostor=impostor,
        )
        return Evidence(suspect=suspect)


def output_basis(tensors: Mapping[str, Any], source: str = "<memory>", rel_tol: float = 1e-8) -> np.ndarray:
    """Orthonormal basis (512 x r) of the directions of ``last_linear``'s output the logits can see.

    The row space of centred ``logits.weight`` · diag(γ/√(σ²+ε)): an update of ``last_linear``
    outside it changes no class score (a softmax ignores a shift common to all classes), so noise
    placed there reshapes the update's spectrum for free. Directions whose Gram eigenvalue is below
    ``rel_tol`` of the largest count as invisible. Built from the 512 x 512 Gram matrix a block of
    classes at a time, so it costs little at CASIA's 10,575 classes (where r is the full 512).
    """
    logits = _tensor(tensors, "logits.weight", source)
    gamma, var = _vector(tensors, "last_bn.weight", source), _vector(tensors, "last_bn.running_var", source)
    shape = tuple(int(x) for x in np.shape(logits))
    if len(shape) != 2 or shape[1] != gamma.size or gamma.size != var.size or shape[0] < 2:
        raise InvalidCheckpoint(source, f"head shapes disagree: logits {shape}, last_bn {gamma.size}/{var.size}")
    if np.any(var < 0):
        raise InvalidCheckpoint(source, "last_bn.running_var holds negative values")
    G, total = np.zeros((shape[1], shape[1])), np.zeros(shape[1])
    for _, block in row_blocks(logits, "logits.weight", source):
        G += block.T @ block
        total += block.sum(axis=0)
    mean = total / shape[0]
    G -= shape[0] * np.outer(mean, mean)  # the Gram of the class-centred rows
    s = gamma / np.sqrt(var + BN_EPS)
    G *= np.outer(s, s)
    lam, V = np.linalg.eigh(G)
    if not np.all(np.isfinite(lam)):
        raise InvalidCheckpoint(source, "the logits overflow (weights too large to score)")
    return V[:, lam > rel_tol * max(float(lam[-1]), 1e-300)]


class OutputSpectrumReference(OneViewReference):
    """``output-spectrum``: ``spectrum`` on the update the logits can see, P·(W − W_base), P the
    projector onto :func:`output_basis`. A backdoor must change the outputs, so its low-rank update
    survives the projection; noise an attacker adds where the logits are blind (the lab's
    ``invisible noise`` flattened the plain spectrum: 6 of 6 passed) does not. With as many classes
    as features (CASIA) P is the identity and this is ``spectrum``."""

    detector = "output-spectrum"

    def _view_estimator_for(self) -> SpectrumView:
        return SpectrumView(space="outputs")

    def _prepare(self, base_tensors: Mapping[str, Any] | None) -> None:
        self._base_W = self._base_matrix(base_tensors)

    def network_matrix(self, tensors: Mapping[str, Any], source: str, sha256: str | None) -> LayerWeights:
        lw = layer_of(tensors, self.config.layer, source=source, sha256=sha256)
        views = getattr(self, "views_", None)
        base = views["spectrum"].base_ if views else self._base_W
        if lw.matrix.shape != base.shape:
            raise InvalidCheckpoint(source, f"'{lw.layer}' has shape {lw.matrix.shape}; the base's is {base.shape}")
        Q = output_basis(tensors, source)
        D = lw.matrix - base
        if Q.shape[1] < Q.shape[0]:
            D = Q @ (Q.T @ D)
        return LayerWeights(matrix=D, layer=lw.layer, source=source, sha256=sha256, original_shape=lw.original_shape)

    def _fit_views(self, matrices: list[np.ndarray], base_tensors: Mapping[str, Any] | None) -> dict[str, Any]:
        return {"spectrum": self._view_estimator_for().fit(matrices, base_matrix=self._base_W)}
