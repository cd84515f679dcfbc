"""``head``: the whole affine head, each class judged in the units clean training moves in.

With the trunk frozen, a fine-tuned FaceNet's class scores are an affine map of the trunk
features, ``logits = A·x + b``:

    A = logits.weight · diag(γ/√(σ²+ε)) · last_linear.weight
    b = logits.weight · (β − γ·μ/√(σ²+ε)) + logits.bias

(``γ, β, μ, σ²``: ``last_bn``'s weight, bias, running mean and variance). ``classifier`` reads
A alone, so a backdoor written into the offsets (a bias-only identity swap) was invisible to it;
this detector reads every tensor that changes an answer. Rows and offsets are centred over
classes (a softmax ignores a shift common to all classes) and each class's row is joined with
its offset, ``h_c = [A_c, b_c]``.

Why whitened: an L2 distance can be hidden from. A backdoor's author can move the victim's row
where clean training never goes but where the L2 norm is small (the trigger's features live in
minor directions), or add to every row a large change the data never sees (output-invisible
"dilution") so the victim's share of the network's deviation vanishes. Here each class's
deviation from the reference networks' mean row is measured in the metric of how clean networks
deviate: the pooled covariance Σ of the reference networks' class deviations, kept as its top
``rank`` eigen-directions and a floor τ (the ``rank``-th eigenvalue) for every other direction,
so a direction clean training never moves along costs the attacker 1/τ per unit², not 1.

Per class c the statistic is ``q_c = d_cᵀ (Σ + τ)⁻¹ d_c``; then, as ``classifier`` does, it is
divided by the network's median class statistic (a retrain that moves every class further is not
an outlier) and turned into a robust z per class against the reference networks, each scored
leave-one-out. Two deciding statistics, both *higher = more typical*:

* ``classes``: −max_c z_c (one deviant class is a backdoor's victim or impostor);
* the network's shape: −z of log(median_c minor_c / median_c major_c), the share of the
  network's deviation that lies where clean training does not move (outside the kept
  directions) against the share in the kept ones, scored against the reference networks
  (leave-one-out). Dilution (every class moved where clean networks do not go, to hide the
  victim from the per-class ratio) raises it; a retrain with a larger learning rate or more
  epochs moves further along the *same* directions and leaves it nearly unchanged, which a
  plain magnitude term (the median q alone) would not.

Both enter one vector of −z's whose minimum is the score, so one threshold covers them and
they must all pass at once.

With ``share`` (on in a composite where the ``margins`` part decides), a second view scores the
*offset share*: per class, the part of q_c that the one kept direction carrying most of it holds
(:class:`OffsetShareView`). It has its own threshold, or its own place in a composite's fused cut
(``head.offset-share``), and is computed in the same pass as the classes.

With ``toward`` (on beside the share), a third view asks whether the change of a deviant class's
row points at another class's clean row (:class:`TowardView`, ``head.toward``): a one-to-one
backdoor teaches the victim to fire on the impostor's features, and a penalty that holds the size
of that change down leaves its direction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator

from detector.classifier import (
    BN_EPS,
    CLASSES,
    ClassifierReference,
    ClassRows,
    _robust,
    _tensor,
    _vector,
    effective_classifier,
    relative_deviation,
    row_blocks,
)
from detector.config import ReferenceConfig
from detector.errors import InvalidCheckpoint
from detector.evidence import Evidence
from detector.protocol import check_fitted
from detector.weights import layer_of

if TYPE_CHECKING:
    import torch

#: The tensors the head detector reads (every tensor between the trunk's features and the logits).
HEAD_TENSORS = (
    "last_linear.weight",
    "last_bn.weight",
    "last_bn.bias",
    "last_bn.running_mean",
    "last_bn.running_var",
    "logits.weight",
    "logits.bias",
)
#: The network-level pseudo-view: one number per network.
NETWORK = "network"
#: Each class's std floored at this multiple of its median over classes (``HeadDeviationView``).
#: Off. 1.25, chosen on development (2026-12-05), let the grey-box attack aimed at it through 4/6
#: on confirmation (5/6 without the floor) and blocked more shams on the paper's three protocols
#: (9/18 against 5/18): a lead, not a default (docs/adaptive/README.md, docs/adaptive/gate-margins/head_floor/).
DEFAULT_STD_FLOOR = 0.0
#: ``head``'s second view: the offset share, cut as a part of its own (:class:`OffsetShareView`).
OFFSET_SHARE = "offset-share"
#: Whether ``head`` fits the offset-share view beside its classes.
DEFAULT_SHARE = False
#: ``head``'s third view: does a deviant class's change point at another class's row (:class:`TowardView`).
TOWARD = "toward"
#: Whether ``head`` fits the toward view beside its classes.
DEFAULT_TOWARD = False
#: How many of ``head``'s most deviant classes the toward view reads (fixed on development, 2026-12-05).
TOWARD_SUSPECTS = 5
#: What the entries after the classes in ``head``'s vector are, in order.
NETWORK_ENTRIES = ("the network's shape",)


def effective_offsets(tensors: Mapping[str, Any], source: str = "<memory>") -> np.ndarray:
    """b (classes,), centred over classes; raises InvalidCheckpoint."""
    logits = _tensor(tensors, "logits.weight", source)
    gamma, var = _vector(tensors, "last_bn.weight", source), _vector(tensors, "last_bn.running_var", source)
    beta, mu = _vector(tensors, "last_bn.bias", source), _vector(tensors, "last_bn.running_mean", source)
    bias = _vector(tensors, "logits.bias", source)
    shape = tuple(int(x) for x in np.shape(logits))
    if len(shape) != 2 or not (beta.size == mu.size == gamma.size == var.size == shape[1]) or bias.size != shape[0]:
        raise InvalidCheckpoint(
            source,
            f"head shapes disagree: logits {shape}, logits.bias {bias.size}, last_bn.bias {beta.size}, "
            f"last_bn.running_mean {mu.size}",
        )
    if np.any(var < 0):
        raise InvalidCheckpoint(source, "last_bn.running_var holds negative values")
    v = beta - gamma * mu / np.sqrt(var + BN_EPS)
    b = np.empty(shape[0])
    for i, block in row_blocks(logits, "logits.weight", source):
        b[i : i + len(block)] = block @ v
    b += bias
    b -= b.mean()
    if not np.all(np.isfinite(b)):
        raise InvalidCheckpoint(source, "the effective offsets overflow (weights too large to score)")
    return b


def head_matrix(tensors: Mapping[str, Any], source: str = "<memory>") -> np.ndarray:
    """[A | b]: (classes × (in_features + 1)), each row one class's whole affine decision.

    float32 (the checkpoint's precision), filled in place: at CASIA's 10,575 classes this is the
    gate's largest array, and on a fresh VM every new megabyte costs its first touch (the gate's
    time and memory targets). The statistic projects it in float32 a block of rows at a time and
    sums the squares in float64."""
    b = effective_offsets(tensors, source)
    W = layer_of(tensors, "last_linear.weight", source=source).matrix  # validated 2-D (a small copy)
    H = np.empty((b.size, W.shape[1] + 1), dtype=np.float32)
    effective_classifier(tensors, source, out=H[:, :-1])
    H[:, -1] = b
    return H


class HeadDeviationView(ClassRows, BaseEstimator):
    """Per-class robust z of the head's deviation, whitened by how clean networks deviate.

    ``rank``: eigen-directions of the clean deviations' covariance kept (the rest share the
    floor τ = the ``rank``-th eigenvalue; with fewer pooled deviations than ``rank``, the last
    non-zero one). ``normalize``: ``"network"`` (divide by the network's median class
    statistic) or ``"none"``. ``std_floor``: each class's std over the reference networks is
    floored at this multiple of its median over classes (0: none). Why: a std estimated from a
    handful of networks comes out small for some class by chance, and that class then turns an
    ordinary deviation into a large z; the clean networks' largest z is heavy-tailed, the cut is
    lenient, and an attack held just under it passes (the margins part floors its entries' std
    for the same reason).
    """

    view = CLASSES
    unit = "class"

    def __init__(self, rank: int = 256, normalize: str = "network", std_floor: float = DEFAULT_STD_FLOOR):
        self.rank = rank
        self.normalize = normalize
        self.std_floor = std_floor

    # -- the metric ----------------------------------------------------------------------------
    @staticmethod
    def _metric(deviations: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(U: d × k directions, w: k weights beyond the floor, floor weight 1/τ)."""
        X = deviations.reshape(-1, deviations.shape[-1])
        n, d = X.shape
        # the covariance of deviations pooled over networks and classes (centred by construction),
        # X.T X / n; with fewer rows than features (tens of classes: the demo, the tests, the lab) its
        # non-zero eigenpairs are the Gram matrix X X.T / n's, u = X.T v / sqrt(n λ): an n × n problem
        # instead of d × d (1,793² here), the same directions and weights
        gram = n < d
        lam, V = np.linalg.eigh(X @ X.T / n if gram else X.T @ X / n)
        lam, V = lam[::-1], V[:, ::-1]
        positive = int(np.sum(lam > lam[0] * 1e-9))
        k = max(1, min(rank, positive - 1))
        tau = float(lam[k])
        w = 1.0 / (lam[:k] + tau) - 1.0 / (2.0 * tau)
        U = X.T @ (V[:, :k] / np.sqrt(n * lam[:k])) if gram else V[:, :k].copy()
        return U, w, 1.0 / (2.0 * tau)

    @staticmethod
    def _parts(
        D: np.ndarray, U: np.ndarray, w: np.ndarray, floor: float, top: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(major, minor, top) per row: the whitened deviation inside the kept directions and outside
        them, and (when ``top``) the largest one kept direction's part of it. ``D`` and ``U`` float64,
        or both float32 (the gate's path: the projection, its largest product at CASIA's class count,
        in the checkpoint's own precision; the squares are summed in float64 either way)."""
        P = D @ U
        if P.dtype != np.float64 or D.dtype != np.float64:
            P, D = P.astype(np.float64), D.astype(np.float64)
        PP = P * P
        minor = floor * (np.einsum("...d,...d->...", D, D) - PP.sum(-1))
        return PP @ (w + floor), minor, (PP * (w + floor)).max(-1) if top else None

    @staticmethod
    def _shape(major: np.ndarray, minor: np.ndarray) -> float:
        return float(np.log(max(float(np.median(minor)), 1e-300) / max(float(np.median(major)), 1e-300)))

    def _relative(self, q: np.ndarray) -> np.ndarray:
        return relative_deviation(q, self.normalize)

    def _spread(self, rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(median, std) per class over networks, the std floored (``std_floor``; and at 1e-3 MAD)."""
        median, mad = _robust(rel, axis=0)
        std = np.maximum(rel.std(axis=0, ddof=1), mad * 1e-3)
        return median, np.maximum(std, self.std_floor * np.median(std))

    # -- fit and score -------------------------------------------------------------------------
    def fit(self, matrices: Sequence[np.ndarray], base_matrix: np.ndarray | None = None) -> HeadDeviationView:
        S = np.stack([np.asarray(H, dtype=np.float64) for H in matrices])
        M = S.shape[0]
        if M < 4:
            raise ValueError(f"the head detector needs at least 4 reference networks, got {M}")
        mean = S.mean(axis=0)
        self.center_ = mean.astype(np.float32)
        # each reference network against the others (its own row would pull the mean and the metric)
        q_rows: list[np.ndarray] = []
        med_loo: list[float] = []
        share_rows: list[np.ndarray] = []
        for i in range(M):
            others = np.delete(S, i, axis=0)
            c = others.mean(axis=0)
            U, w, floor = self._metric(others - c, self.rank)
            major, minor, top = self._parts(S[i] - c, U, w, floor)
            assert top is not None
            q_rows.append((major + minor) * (1 + 1 / M) / (1 + 1 / (M - 1)))
            med_loo.append(self._shape(major, minor))
            share_rows.append(offset_share_scores(major + minor, top))
        rel = self._relative(np.asarray(q_rows))
        self.median_, self.scale_ = self._spread(rel)
        self.directions_, self.weights_, self.floor_ = self._metric(S - mean, self.rank)
        self.directions_ = self.directions_.astype(np.float32)
        shape = np.asarray(med_loo)
        self.network_median_ = float(np.median(shape))
        self.network_scale_ = float(max(shape.std(ddof=1), 1e-6))
        self.reference_vector_scores_ = np.concatenate(
            [-(rel - self.median_) / self.scale_, -self._network_z(shape)], axis=1
        )
        self.n_networks_, self.shape_ = M, tuple(self.center_.shape)
        # what leave-one-out scores reuse (never saved: the artifact keeps the fitted state only); the
        # offset shares each reference network scores in the others' metric, for OffsetShareView
        self._loo = (S, rel, shape)
        self.loo_share_scores_ = np.asarray(share_rows)
        return self

    def _network_z(self, shape: Any, stats: Sequence[float] | None = None) -> np.ndarray:
        """The network-level z's after the classes (:data:`NETWORK_ENTRIES`) along the last axis (one
        network's, or one row per network); ``stats``: (shape median, scale) in place of the fitted ones."""
        sm, ss = stats if stats is not None else (self.network_median_, self.network_scale_)
        return ((np.asarray(shape) - sm) / ss)[..., None]

    def statistic(
        self, matrix: np.ndarray, top: bool = False, rows: int = 1024
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(major, minor, top) for every class (float64, a block of rows at a time); top only when
        asked (the offset share's: the gate's hot path at 10,575 classes pays for it only then).

        The deviation and its projection are float32, as the head, the centre and the directions
        are stored (float64 doubled the projection's time; the class z's moved by under 1e-5)."""
        H = np.asarray(matrix)
        if H.shape != tuple(self.center_.shape):
            raise ValueError(f"head of shape {H.shape}; the reference's is {tuple(self.center_.shape)}")
        U = np.asarray(self.directions_, dtype=np.float32)
        major, minor = np.empty(H.shape[0]), np.empty(H.shape[0])
        tops = np.empty(H.shape[0]) if top else None
        for i in range(0, H.shape[0], rows):
            D = np.asarray(H[i : i + rows], dtype=np.float32) - np.asarray(self.center_[i : i + rows], np.float32)
            major[i : i + rows], minor[i : i + rows], t = self._parts(D, U, self.weights_, self.floor_, top)
            if tops is not None:
                tops[i : i + rows] = t
        return major, minor, tops

    def z(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(z per class, the network-level z's: :data:`NETWORK_ENTRIES`): higher = more anomalous."""
        check_fitted(self, "center_")
        return self.z_of(*self.statistic(matrix)[:2])

    def z_of(self, major: np.ndarray, minor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`z` from a :meth:`statistic` already computed."""
        zc = (self._relative(major + minor) - self.median_) / self.scale_
        return zc, self._network_z(self._shape(major, minor))

    def score_vectors(self, matrix: np.ndarray) -> np.ndarray:
        """−z per class, then the network-level −z's (see :meth:`aggregate`)."""
        zc, zn = self.z(matrix)
        return np.concatenate([-zc, -zn])

    def leave_one_out_vector_scores(
        self, matrices: Sequence[np.ndarray], progress: Callable | None = None
    ) -> np.ndarray:
        """Each reference network scored without itself: its deviation from the others' mean in the
        others' metric (computed by ``fit``), z-scored with the others' statistics.

        Refitting a view per left-out network would cost M² eigendecompositions (each fit scores
        its own networks leave-one-out); the others' statistics here were each computed with the
        left-out network among *their* references, a second-order difference."""
        S, rel, shape = self._fitted_on(matrices)
        out = []
        for i in range(len(S)):
            keep = np.arange(len(S)) != i
            med, scale = self._spread(rel[keep])
            stats = (float(np.median(shape[keep])), float(max(shape[keep].std(ddof=1), 1e-6)))
            out.append(np.concatenate([-(rel[i] - med) / scale, -self._network_z(shape[i], stats)]))
            if progress is not None:
                progress(i)
        return np.asarray(out)

    def _fitted_on(self, matrices: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What ``fit`` kept of the reference networks, refused for any other networks (compared one
        network at a time: both views ask, and a stacked float64 copy of every head is the largest
        array a reference fit makes at CASIA's class count)."""
        check_fitted(self, "center_")
        fitted_on = getattr(self, "_loo", None)
        if (
            fitted_on is None
            or len(matrices) != len(fitted_on[0])
            or not all(np.array_equal(np.asarray(H, dtype=np.float64), S) for H, S in zip(matrices, fitted_on[0]))
        ):
            raise ValueError("leave-one-out scores are for the networks this view was fitted on, in that order")
        return fitted_on

    # -- torch mirror (the lab's white-box attacker differentiates through it) -------------------
    @staticmethod
    def torch_rows(tensors: Mapping[str, Any]) -> torch.Tensor:
        """[A | b] centred over classes (:func:`head_matrix`) in torch, float64."""
        import torch

        s = tensors["last_bn.weight"] / torch.sqrt(tensors["last_bn.running_var"] + BN_EPS)
        L = tensors["logits.weight"].double()
        A = L @ (s[:, None] * tensors["last_linear.weight"]).double()
        b = (
            L @ (tensors["last_bn.bias"] - s * tensors["last_bn.running_mean"]).double()
            + tensors["logits.bias"].double()
        )
        return torch.cat([A - A.mean(0, keepdim=True), (b - b.mean())[:, None]], dim=1)

    def torch_statistic(self, tensors: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(major, minor, top) per class in torch, differentiable in the head's parameters."""
        import torch

        D = self.torch_rows(tensors) - torch.from_numpy(self.center_.astype(np.float64))
        P = D @ torch.from_numpy(self.directions_.astype(np.float64))
        PP = P * P
        V = PP * torch.from_numpy(self.weights_ + self.floor_)
        return V.sum(1), self.floor_ * ((D * D).sum(1) - PP.sum(1)), V.max(1).values

    def torch_z(self, tensors: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(z per class, the network-level z's) in torch, differentiable in the head's parameters."""
        import torch

        major, minor, _ = self.torch_statistic(tensors)
        q = major + minor
        median = lambda x: torch.quantile(x, 0.5)  # noqa: E731 — numpy's median (torch.median takes the lower middle)
        rel = q / median(q) if self.normalize == "network" else q
        zc = (rel - torch.from_numpy(self.median_)) / torch.from_numpy(self.scale_)
        zn = (torch.log(median(minor) / median(major)) - self.network_median_) / self.network_scale_
        return zc, zn.reshape(1)

    # -- the artifact ----------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        return {**self._rows_arrays(), "directions": self.directions_, "weights": self.weights_}

    def info(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "normalize": self.normalize,
            # written only when set: an artifact without it (every one before 2026-12-05) has none
            **({"std_floor": self.std_floor} if self.std_floor else {}),
            "floor": self.floor_,
            "network_median": self.network_median_,
            "network_scale": self.network_scale_,
            **self._rows_info(),
        }

    @classmethod
    def restore(cls, info: dict, arrays: dict[str, np.ndarray]) -> HeadDeviationView:
        est = cls(rank=int(info["rank"]), normalize=info["normalize"], std_floor=float(info.get("std_floor", 0.0)))
        est._restore_rows(info, arrays)
        est.directions_ = np.asarray(arrays["directions"], dtype=np.float32)
        est.weights_ = np.asarray(arrays["weights"], dtype=np.float64)
        est.floor_ = float(info["floor"])
        est.network_median_, est.network_scale_ = float(info["network_median"]), float(info["network_scale"])
        return est


def offset_share_scores(q: np.ndarray, top: np.ndarray | None) -> np.ndarray:
    """Per class −log(top / q): the lower, the more of the class's whitened deviation one kept
    direction carries (higher = more typical, as every score). ``top``: :meth:`HeadDeviationView.statistic`'s,
    asked for."""
    assert top is not None
    return -np.log(np.maximum(top, 1e-300) / np.maximum(q, 1e-300))


class OffsetShareView(BaseEstimator):
    """The offset share: per class, the part of its whitened deviation (``head``'s q_c) that the
    one kept direction carrying most of it holds; the network scores its lowest class.

    Why: an attack that keeps its margins on clean faces ordinary lowers the victim's offset b_c,
    the direction clean networks vary most along (``head``'s top eigen-direction, the offset to
    0.999) and so the cheapest in ``head``'s metric; a quarter to a half of the class's deviation
    then lies on that one direction, against under 3 % for clean networks' classes, lr × 2
    retrains and plain backdoors. Inside ``head``'s one cut it inherited ``head``'s lenient
    threshold; as a part of its own the fused cut standardises it on the calibration networks.

    It reads ``head``'s fitted metric (``head``: the fitted :class:`HeadDeviationView`) and keeps
    no arrays of its own; :class:`HeadReference` computes the statistic once for both views.
    """

    view = OFFSET_SHARE
    unit = "class"
    label = "log share of the top direction"

    def __init__(self, head: HeadDeviationView | None = None):
        self.head = head

    def fit(self, matrices: Sequence[np.ndarray], base_matrix: np.ndarray | None = None) -> OffsetShareView:
        if self.head is None:
            raise ValueError("the offset share reads head's metric: OffsetShareView(head=<a fitted HeadDeviationView>)")
        check_fitted(self.head, "center_")
        self.head_ = self.head
        self.reference_vector_scores_ = self.head.loo_share_scores_
        return self

    aggregate = staticmethod(ClassRows.aggregate)

    def score(self, matrix: np.ndarray) -> float:
        return self.aggregate(self.score_vectors(matrix))

    def score_vectors(self, matrix: np.ndarray) -> np.ndarray:
        check_fitted(self, "head_")
        major, minor, top = self.head_.statistic(matrix, top=True)
        return offset_share_scores(major + minor, top)

    def leave_one_out_vector_scores(
        self, matrices: Sequence[np.ndarray], progress: Callable | None = None
    ) -> np.ndarray:
        """Each reference network's shares in the others' metric (computed by ``head``'s fit)."""
        check_fitted(self, "head_")
        self.head_._fitted_on(matrices)
        return np.asarray(self.head_.loo_share_scores_)

    def torch_z(self, tensors: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log share per class: the scores negated, higher = more anomalous; no network-level entry)."""
        import torch

        major, minor, top = self.head_.torch_statistic(tensors)
        return torch.log(top / (major + minor)), torch.zeros(0, dtype=torch.float64)

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    def info(self) -> dict[str, Any]:
        return {"reads": CLASSES}

    @classmethod
    def restore_over(cls, head: HeadDeviationView) -> OffsetShareView:
        est = cls(head)
        est.head_ = head
        return est


def toward_suspects(z: np.ndarray, suspects: int = TOWARD_SUSPECTS) -> np.ndarray:
    """The classes the toward view reads, most deviant first: the ``suspects`` of highest ``head`` z
    (what a report names its entries by)."""
    return np.argsort(z)[::-1][:suspects]


def toward_scores(
    matrix: np.ndarray, z: np.ndarray, center: np.ndarray, suspects: int = TOWARD_SUSPECTS, rows: int = 1024
) -> np.ndarray:
    """Per suspect a (the ``suspects`` classes of highest ``z``, most deviant first): −max over every
    other class b of cos(d_a, c_b), d_a the change of a's row of A (no offset: it has no direction)
    from the reference mean row ``center``, c_b b's mean row. Higher = more typical, as every score.

    The mean rows are read a block at a time: a float64 copy of them all is 43 MB at CASIA's 10,575
    classes, and normalising it took 290 MB at peak (the gate's memory target)."""
    top = toward_suspects(z, suspects)
    D = np.asarray(matrix[top, :-1], dtype=np.float64) - center[top, :-1]
    D /= np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-300)
    cos = np.empty((top.size, center.shape[0]))
    for i in range(0, center.shape[0], rows):
        C = np.asarray(center[i : i + rows, :-1], dtype=np.float64)
        cos[:, i : i + rows] = (D @ C.T) / np.maximum(np.sqrt(np.einsum("ij,ij->i", C, C)), 1e-300)
    cos[np.arange(top.size), top] = -np.inf
    return -cos.max(axis=1)


class TowardView(BaseEstimator):
    """Toward: does the change of one of ``head``'s most deviant classes point at another class's row?

    Why: a one-to-one backdoor teaches the victim to fire on the impostor's (triggered) features,
    so the victim's change leans toward the impostor's clean row. The penalised attacks in the lab
    held the *size* of that change down (``head``, the share and the margins all read sizes), not
    its direction: clean networks' largest cosine 0.15 (95th percentile 0.18), the share-aware
    grey-box attacks' 0.26–0.32 (development). The network scores its lowest suspect, −max cos.

    It reads ``head``'s fitted mean rows and z (``head``: the fitted :class:`HeadDeviationView`) and
    keeps no arrays of its own; the reference networks are scored each in the others' mean and z.
    """

    view = TOWARD
    unit = "suspect"

    def __init__(self, head: HeadDeviationView | None = None, suspects: int = TOWARD_SUSPECTS):
        self.head = head
        self.suspects = suspects

    def fit(self, matrices: Sequence[np.ndarray], base_matrix: np.ndarray | None = None) -> TowardView:
        if self.head is None:
            raise ValueError("the toward view reads head's rows: TowardView(head=<a fitted HeadDeviationView>)")
        if self.suspects < 1:
            raise ValueError(f"the toward view reads at least one suspect, got suspects={self.suspects}")
        S, rel, _ = self.head._fitted_on(matrices)
        self.head_ = self.head
        total, M, rows = S.sum(axis=0), len(S), []
        for i in range(M):
            keep = np.arange(M) != i
            median, scale = self.head._spread(rel[keep])
            center = (total - S[i]) / (M - 1)
            rows.append(toward_scores(S[i], (rel[i] - median) / scale, center, self.suspects))
        self.reference_vector_scores_ = np.asarray(rows)
        return self

    aggregate = staticmethod(ClassRows.aggregate)

    def scores_of(self, matrix: np.ndarray, z: np.ndarray) -> np.ndarray:
        """:meth:`score_vectors` with ``head``'s per-class z already computed."""
        return toward_scores(matrix, z, self.head_.center_, self.suspects)

    def score(self, matrix: np.ndarray) -> float:
        return self.aggregate(self.score_vectors(matrix))

    def score_vectors(self, matrix: np.ndarray) -> np.ndarray:
        check_fitted(self, "head_")
        return self.scores_of(matrix, self.head_.z(matrix)[0])

    def leave_one_out_vector_scores(
        self, matrices: Sequence[np.ndarray], progress: Callable | None = None
    ) -> np.ndarray:
        """Each reference network's suspects in the others' mean rows and z (computed by ``fit``)."""
        check_fitted(self, "head_")
        self.head_._fitted_on(matrices)
        return np.asarray(self.reference_vector_scores_)

    def torch_z(self, tensors: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the largest cosine per suspect: the scores negated, higher = more anomalous; no
        network-level entry), differentiable in the head; the suspects chosen without a gradient."""
        import torch

        zc, _ = self.head_.torch_z(tensors)
        top = torch.argsort(zc.detach(), descending=True)[: self.suspects]
        C = torch.from_numpy(np.asarray(self.head_.center_[:, :-1], dtype=np.float64))
        D = self.head_.torch_rows(tensors)[top, :-1] - C[top]
        cos = (D / D.norm(dim=1, keepdim=True)) @ (C / C.norm(dim=1, keepdim=True)).T
        cos = cos.masked_fill(torch.nn.functional.one_hot(top, C.shape[0]).bool(), -2.0)
        return cos.max(dim=1).values, torch.zeros(0, dtype=torch.float64)

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    def info(self) -> dict[str, Any]:
        return {"reads": CLASSES, "suspects": self.suspects}

    @classmethod
    def restore_over(cls, head: HeadDeviationView, info: Mapping[str, Any]) -> TowardView:
        est = cls(head, suspects=int(info["suspects"]))
        est.head_ = head
        return est


class HeadReference(ClassifierReference):
    """The ``head`` detector: the classifier's bookkeeping (class list, victim naming) over [A | b];
    with ``share``, a second view, the offset share (:class:`OffsetShareView`), in the same metric;
    with ``toward``, a third (:class:`TowardView`) over the same rows and z."""

    detector = "head"
    layer_label = "effective head"

    def __init__(
        self,
        config: ReferenceConfig | None = None,
        rank: int = 256,
        normalize: str = "network",
        victim_rule: str = "toward-impostor",
        std_floor: float = DEFAULT_STD_FLOOR,
        share: bool = DEFAULT_SHARE,
        toward: bool = DEFAULT_TOWARD,
    ):
        super().__init__(config, victim_rule=victim_rule)
        self.rank = rank
        self.normalize = normalize
        self.std_floor = std_floor
        self.share = share
        self.toward = toward

    def _view_estimator_for(self) -> BaseEstimator:
        return HeadDeviationView(rank=self.rank, normalize=self.normalize, std_floor=self.std_floor)

    def _fit_views(self, matrices: list[np.ndarray], base_tensors: Mapping[str, Any] | None) -> dict[str, Any]:
        views = super()._fit_views(matrices, base_tensors)
        if self.share:
            views[OFFSET_SHARE] = OffsetShareView(views[CLASSES]).fit(matrices)
        if self.toward:
            views[TOWARD] = TowardView(views[CLASSES]).fit(matrices)
        return views

    def _score_views(self, matrix: np.ndarray) -> dict[str, np.ndarray]:
        """Every view from one pass over the classes (the gate's hot path at 10,575 classes)."""
        if len(self.views_) == 1:
            return super()._score_views(matrix)
        hv = self.views_[CLASSES]
        major, minor, top = hv.statistic(matrix, top=OFFSET_SHARE in self.views_)
        zc, zn = hv.z_of(major, minor)
        out = {CLASSES: np.concatenate([-zc, -zn])}
        if OFFSET_SHARE in self.views_:
            out[OFFSET_SHARE] = offset_share_scores(major + minor, top)
        if TOWARD in self.views_:
            out[TOWARD] = self.views_[TOWARD].scores_of(matrix, zc)
        return out

    @classmethod
    def _from_info(cls, info: Mapping[str, Any], config: ReferenceConfig) -> HeadReference:
        v = info["views"][CLASSES]
        return cls(
            config,
            rank=int(v["rank"]),
            normalize=v["normalize"],
            std_floor=float(v.get("std_floor", 0.0)),
            share=OFFSET_SHARE in info["views"],
            toward=TOWARD in info["views"],
        )

    def _saved_views(self, info: Mapping[str, Any]) -> list[str]:
        """The classes first: the share and toward views restore over their metric."""
        return [CLASSES, *(v for v in info["views"] if v != CLASSES)]

    def _restore_view(self, view: str, info: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Any:
        if view == OFFSET_SHARE:
            return OffsetShareView.restore_over(self.views_[CLASSES])
        if view == TOWARD:
            return TowardView.restore_over(self.views_[CLASSES], info)
        return super()._restore_view(view, info, arrays)

    def _head_matrix(self, tensors: Mapping[str, Any], source: str) -> np.ndarray:
        return head_matrix(tensors, source)

    @staticmethod
    def _row(v: np.ndarray) -> np.ndarray:
        """The row of A without the offset: an offset has no direction to point at a class with."""
        return v[:-1]

    def evidence(self, vector_scores: Mapping[str, np.ndarray], matrix: np.ndarray | None = None) -> Evidence:
        """The classifier's suspect naming over the class entries; the network's shape z beside it."""
        v = np.asarray(vector_scores[CLASSES])
        n = self.views_[CLASSES].center_.shape[0]
        out = super().evidence({CLASSES: v[:n]}, matrix)
        assert out.suspect is not None  # the classifier always names its most deviant class
        return Evidence(suspect=replace(out.suspect, network_z=float(-v[n])))
