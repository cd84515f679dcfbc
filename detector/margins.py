"""``margins``: how a network ranks people on faces the gate keeps secret, against clean networks.

Every penalty that hides a backdoor from a weight statistic bends the head somewhere else, and
on clean faces that shows (measured in the lab first: docs/adaptive/README.md, "A second line over the
outputs"). The gate keeps a *gallery*: ``faces`` face images of each of ``sources`` people,
drawn at random when the reference is fitted and stored only inside the reference artifact
(which only the gate's identity may read). With the trunk frozen (checked before any part is
scored), their trunk features are fixed, so a candidate's logits on them are its head applied
to stored features: no image is read when the gate runs. For each class t and gallery person s,

    M[t, s] = median over s's gallery faces of (logit t − logit s)

and against the reference networks' mean and std of the same entry (the std floored at
``std_floor`` times its median over entries: an entry a few clean networks happen to agree on
would otherwise make a max over thousands of entries heavy-tailed), ``z[t, s] = (M − mean) /
std``. Class t's score is ``−max_s z[t, s]`` (s ≠ t), the network's the lowest class score:
*higher = more typical*, as every part of the gate. It is one-sided on
purpose: longer training makes every margin more negative, so retrains score as typical. A
gentler fine-tune (lr × 0.5) makes every margin less negative and is blocked; so is a penalty
that holds the whole head back to hide a backdoor. ``normalize="network"`` divides the margins
by the network's own median and passes both, so it is off; an attacker who restores the level
instead is still blocked by the worst entry (docs/adaptive/README.md, "Margins in units of the network's own").

What it costs the attacker is secrecy, not arithmetic: with the gallery and the reference in
hand a penalty fits this statistic and the weights' at once (docs/adaptive/README.md: white-box passes both).
What it costs the gate: ``sources · faces`` rows through the head per candidate (at CASIA's
10,575 classes and the default 128 people 2,048 rows, about 26 GFLOP in float32; ``make bench``
times the whole gate with it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from detector.classifier import BN_EPS, ClassifierReference, _tensor, _vector, row_blocks
from detector.config import ReferenceConfig
from detector.errors import InvalidCheckpoint
from detector.evidence import Evidence
from detector.protocol import check_fitted
from detector.weights import layer_of

#: The detector's one pseudo-view: one entry per class (how far it is favoured over gallery people).
PAIRS = "pairs"
#: gallery people the reference keeps by default (all of them below this many classes)
DEFAULT_SOURCES = 128
#: gallery faces per person (what the lab fixed on development)
DEFAULT_FACES = 16
#: each entry's std is at least this fraction of the median entry's: 1.0, chosen on development
#: (docs/adaptive/gate-margins; docs/adaptive/README.md for what confirmation said). On development the lab's 0.1
#: let one calibration network reach z 7.9 against 16 reference networks and set the shared cut
#: so low that 22 of 123 working attacks passed (9 of 123 at 1.0).
DEFAULT_STD_FLOOR = 1.0
#: ``"network"``: every margin divided by the network's median margin before the z (see
#: :func:`relative_margins`); ``"none"``: as measured.
DEFAULT_NORMALIZE = "none"


def relative_margins(M: np.ndarray, own: np.ndarray, normalize: str) -> np.ndarray:
    """``M`` divided by the network's typical margin, −median of its entries (a person against
    themself left out), for ``"network"``; ``M`` itself for ``"none"``.

    Why it was tried: a gentler fine-tune (lr × 0.5) makes *every* margin less negative and,
    unnormalised, reads as a bent pair everywhere. Why it is off: a penalised backdoor's bent
    pair is ordinary in the network's own units too (measured on both adaptive draws)."""
    if normalize == "none":
        return M
    if normalize != "network":
        raise ValueError(f"normalize must be 'network' or 'none', got {normalize!r}")
    scale = -float(np.median(M[~own]))
    if not scale > 0:
        raise InvalidCheckpoint("<margins>", "the network ranks gallery people above themselves (median margin ≥ 0)")
    return M / np.asarray(scale, dtype=M.dtype)


@dataclass(frozen=True)
class FaceGallery:
    """The gate's secret faces as the frozen trunk sees them.

    ``features``: (people, faces, trunk features) float32; ``sources``: each person's index in
    ``classes`` (the class list of the networks the reference is fitted on, in their order)."""

    features: np.ndarray
    sources: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        f, s = np.asarray(self.features), np.asarray(self.sources)
        if f.ndim != 3 or f.shape[0] != s.size or f.shape[1] < 1:
            raise ValueError(f"gallery features must be (people, faces, features) for {s.size} people, got {f.shape}")
        if s.size < 2 or len(set(s.tolist())) != s.size or s.min() < 0 or s.max() >= len(self.classes):
            raise ValueError(f"gallery people must be 2 or more distinct indices into {len(self.classes)} classes")
        if not np.all(np.isfinite(f)):
            raise ValueError("gallery features hold non-finite values")


#: a gallery between the step that builds it (trainer image: it needs the trunk) and ``reference fit``
GALLERY_FILE = "gallery.npz"


def save_gallery(gallery: FaceGallery, directory: str | Path) -> Path:
    """Write ``gallery`` as ``GALLERY_FILE`` in ``directory`` (plain arrays, no pickle)."""
    out = Path(directory) / GALLERY_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    classes = np.array(gallery.classes, dtype=str)
    np.savez(out, features=gallery.features, sources=np.asarray(gallery.sources, np.int64), classes=classes)
    return out


def load_gallery(directory: str | Path) -> FaceGallery:
    """The gallery :func:`save_gallery` wrote; ValueError (naming the file) when there is none."""
    path = Path(directory) / GALLERY_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no gallery (built only for a detector with margins)")
    with np.load(path, allow_pickle=False) as z:
        return FaceGallery(z["features"], z["sources"], tuple(str(c) for c in z["classes"]))


def draw_faces(labels: np.ndarray, people: np.ndarray, faces: int, rng: np.random.Generator) -> np.ndarray:
    """(people, faces): indices into ``labels`` of ``faces`` distinct images of each person, in
    ascending order per person. The draw is the gallery's secret: pass a fresh generator."""
    out = []
    for c in people:
        idx = np.flatnonzero(labels == c)
        if len(idx) < faces:
            raise ValueError(f"person {c}: {len(idx)} faces; the gallery needs {faces} per person")
        out.append(np.sort(rng.choice(idx, size=faces, replace=False)))
    return np.stack(out)


def draw_people(
    n_classes: int, sources: int, rng: np.random.Generator, eligible: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """Which people the gallery keeps: all of the ``eligible`` classes (default: every class) when
    there are at most ``sources``, else a random ``sources`` of them (ascending). A real face
    folder has people with fewer faces than the gallery keeps per person (CASIA-WebFace has
    identities of two images): :func:`gallery_people` leaves them out."""
    pool = np.arange(n_classes) if eligible is None else np.unique(np.asarray(eligible, dtype=np.int64))
    if len(pool) <= sources:
        return pool
    return np.sort(rng.choice(pool, size=sources, replace=False))


def gallery_people(
    labels: np.ndarray, n_classes: int, sources: int, faces: int, rng: np.random.Generator
) -> np.ndarray:
    """:func:`draw_people` among the people with at least ``faces`` images in ``labels``;
    ValueError when fewer than two have (a margin needs another person)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)
    eligible = np.flatnonzero(counts >= faces)
    if len(eligible) < 2:
        raise ValueError(
            f"{len(eligible)} of {n_classes} people have {faces} or more faces; the gallery needs 2 or more "
            "such people (ask for fewer faces per person)"
        )
    return draw_people(n_classes, sources, rng, eligible=eligible)


def own_entries(sources: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    """(classes, people) mask of each gallery person against their own class: the entries a margin
    statistic leaves out (a person's margin over themself is 0 by construction)."""
    own = np.zeros(shape, dtype=bool)
    own[np.asarray(sources, dtype=np.int64), np.arange(shape[1])] = True
    return own


def pair_margins(
    tensors: Mapping[str, Any], gallery: FaceGallery, source: str = "<memory>", block: int = 8
) -> np.ndarray:
    """(classes, people): M[t, s], the median over person s's gallery faces of logit t − logit s,
    for the head of ``tensors`` in eval mode; raises InvalidCheckpoint.

    Through the head's own factors (features → last_linear → last_bn → logits), ``block`` people
    at a time: at CASIA's 10,575 classes no (faces × classes) array of every person is held."""
    W = layer_of(tensors, "last_linear.weight", source=source).matrix  # (512, features), validated
    gamma, var = _vector(tensors, "last_bn.weight", source), _vector(tensors, "last_bn.running_var", source)
    beta, mu = _vector(tensors, "last_bn.bias", source), _vector(tensors, "last_bn.running_mean", source)
    bias = _vector(tensors, "logits.bias", source)
    logits = _tensor(tensors, "logits.weight", source)
    shape = tuple(int(x) for x in np.shape(logits))
    F = gallery.features
    if W.shape[1] != F.shape[2]:
        raise InvalidCheckpoint(source, f"last_linear reads {W.shape[1]} features; the gallery holds {F.shape[2]}")
    if len(shape) != 2 or not (shape[1] == W.shape[0] == gamma.size == var.size == beta.size == mu.size):
        raise InvalidCheckpoint(
            source, f"head shapes disagree: logits {shape}, last_bn {gamma.size}, last_linear {W.shape}"
        )
    if bias.size != shape[0] or shape[0] != len(gallery.classes):
        raise InvalidCheckpoint(
            source, f"logits has {shape[0]} classes; the gallery's class list {len(gallery.classes)}"
        )
    if np.any(var < 0):
        raise InvalidCheckpoint(source, "last_bn.running_var holds negative values")
    # float32 through the head (as the network itself computes), in place on one reused buffer:
    # in a fresh gate process every new page costs, and the median's copy was half the time
    scale = (gamma / np.sqrt(var + BN_EPS)).astype(np.float32)
    shift = (beta - mu * gamma / np.sqrt(var + BN_EPS)).astype(np.float32)
    W32, bias32 = W.astype(np.float32), bias.astype(np.float32)
    L = np.empty(shape, dtype=np.float32)
    for i, rows in row_blocks(logits, "logits.weight", source):
        L[i : i + len(rows)] = rows
    people, faces = F.shape[:2]
    lo, hi = (faces - 1) // 2, faces // 2  # the median: the middle one, or the mean of the middle two
    M = np.empty((shape[0], people))
    # logits laid out (classes, people, faces): each class's faces of a person are contiguous, so
    # the median is a sort of short rows (a partition across the classes' stride was 4x slower)
    buf = np.empty(shape[0] * block * faces, dtype=np.float32)
    for p in range(0, people, block):
        x = np.asarray(F[p : p + block], dtype=np.float32)
        n = len(x)
        h = (x.reshape(n * faces, -1) @ W32.T) * scale + shift
        flat = buf[: shape[0] * n * faces].reshape(shape[0], n * faces)
        np.matmul(L, h.T, out=flat)
        flat += bias32[:, None]
        logit = flat.reshape(shape[0], n, faces)
        own = logit[gallery.sources[p : p + n, None], np.arange(n)[:, None], np.arange(faces)[None, :]]
        logit -= own[None]
        logit.sort(axis=2)
        M[:, p : p + n] = (logit[:, :, lo].astype(np.float64) + logit[:, :, hi]) / 2
    if not np.isfinite(M.sum()):
        raise InvalidCheckpoint(source, "the gallery's logits overflow (weights too large to score)")
    return M


class PairMarginView(BaseEstimator):
    """Per class, the largest z of its margins over the gallery people against clean networks.

    ``sources``: each gallery person's class index (their own entry, a person against themself,
    is never scored); ``std_floor``: the per-entry std is at least this fraction of its median."""

    view = PAIRS
    unit = "class"

    def __init__(
        self, sources: Sequence[int] = (), std_floor: float = DEFAULT_STD_FLOOR, normalize: str = DEFAULT_NORMALIZE
    ):
        self.sources = sources
        self.std_floor = std_floor
        self.normalize = normalize

    def _own(self, shape: tuple[int, ...]) -> np.ndarray:
        return own_entries(self.sources, shape)

    def _spread(self, S: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        std = S.std(axis=0, ddof=1)
        return S.mean(axis=0), np.maximum(std, self.std_floor * np.median(std[~own]))

    @staticmethod
    def _vector(M: np.ndarray, mean: np.ndarray, std: np.ndarray, own: np.ndarray) -> np.ndarray:
        z = M - mean
        z /= std
        z[own] = -np.inf
        return -z.max(axis=1).astype(np.float64)

    def fit(self, matrices: Sequence[np.ndarray], base_matrix: np.ndarray | None = None) -> PairMarginView:
        S = np.stack([np.asarray(M, dtype=np.float64) for M in matrices])
        if len(S) < 3:
            raise ValueError(f"the margins detector needs at least 3 reference networks, got {len(S)}")
        if S.shape[2] != len(self.sources):
            raise ValueError(f"margins of {S.shape[2]} gallery people; the view was given {len(self.sources)}")
        self.own_ = self._own(S.shape[1:])
        for i in range(len(S)):  # in place: no second stack of every network's margins
            S[i] = relative_margins(S[i], self.own_, self.normalize)
        # kept in float32, as the artifact keeps them (a loaded reference scores exactly alike, and
        # at CASIA's 10,575 classes the gate holds half the bytes)
        self.mean_, self.std_ = (a.astype(np.float32) for a in self._spread(S, self.own_))
        self.n_networks_, self.shape_ = len(S), tuple(S.shape[1:])
        return self

    def score_vectors(self, matrix: np.ndarray) -> np.ndarray:
        """−max z per class (over gallery people other than the class itself)."""
        check_fitted(self, "mean_")
        M = relative_margins(np.asarray(matrix, dtype=np.float32), self.own_, self.normalize)
        return self._vector(M, self.mean_, self.std_, self.own_)

    @staticmethod
    def aggregate(vector_scores: np.ndarray) -> float:
        """The lowest class: one pair bent far from where clean networks put it is enough."""
        return float(np.min(vector_scores))

    def score(self, matrix: np.ndarray) -> float:
        return self.aggregate(self.score_vectors(matrix))

    def leave_one_out_vector_scores(
        self, matrices: Sequence[np.ndarray], progress: Callable | None = None
    ) -> np.ndarray:
        """Each reference network scored against the others' mean and std."""
        check_fitted(self, "mean_")
        S = np.stack([relative_margins(np.asarray(M, dtype=np.float64), self.own_, self.normalize) for M in matrices])
        out = []
        for i in range(len(S)):
            mean, std = self._spread(np.delete(S, i, axis=0), self.own_)
            out.append(self._vector(S[i], mean, std, self.own_))
            if progress is not None:
                progress(i)
        return np.asarray(out)

    # -- the artifact ----------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, "std": self.std_}

    def info(self) -> dict[str, Any]:
        return {
            "sources": [int(s) for s in self.sources],
            "std_floor": self.std_floor,
            "normalize": self.normalize,
            "n_networks": self.n_networks_,
            "n_classes": int(self.shape_[0]),
        }

    @classmethod
    def restore(cls, info: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> PairMarginView:
        est = cls(
            sources=tuple(int(s) for s in info["sources"]),
            std_floor=float(info["std_floor"]),
            normalize=str(info.get("normalize", "none")),  # references fitted before the option: none
        )
        est.mean_, est.std_ = np.asarray(arrays["mean"], np.float32), np.asarray(arrays["std"], np.float32)
        est.shape_, est.n_networks_ = tuple(est.mean_.shape), int(info["n_networks"])
        est.own_ = est._own(est.shape_)
        return est


class MarginsReference(ClassifierReference):
    """The ``margins`` detector: the classifier's class-list bookkeeping over the gallery's margins.

    ``gallery``: the faces to judge on (:class:`FaceGallery`; required to fit, kept in the
    artifact). The gallery's class list must be the networks'."""

    detector = "margins"
    layer_label = "margins on the gallery"

    def __init__(
        self,
        config: ReferenceConfig | None = None,
        gallery: FaceGallery | None = None,
        std_floor: float = DEFAULT_STD_FLOOR,
        normalize: str = DEFAULT_NORMALIZE,
    ):
        super().__init__(config)
        self.gallery = gallery
        self.std_floor = std_floor
        self.normalize = normalize

    def _view_estimator_for(self) -> BaseEstimator:
        sources = () if self.gallery is None else tuple(int(s) for s in self.gallery.sources)
        return PairMarginView(sources=sources, std_floor=self.std_floor, normalize=self.normalize)

    def _prepare(self, base_tensors: Mapping[str, Any] | None) -> None:
        if self.gallery is None:
            raise ValueError("the margins detector needs a face gallery (reference fit --gallery DIR)")
        self.gallery_ = self.gallery

    def _fitted_on(self, layers: Sequence[Any]) -> None:
        super()._fitted_on(layers)
        if self.classes_ is not None and tuple(self.classes_) != tuple(self.gallery_.classes):
            raise ValueError(
                f"the gallery's people ({len(self.gallery_.classes)}) are not the networks' class list "
                f"({len(self.classes_)}): build the gallery from a folder of the same identities"
            )

    def _head_matrix(self, tensors: Mapping[str, Any], source: str) -> np.ndarray:
        check_fitted(self, "gallery_")
        return pair_margins(tensors, self.gallery_, source)

    def evidence(self, vector_scores: Mapping[str, np.ndarray], matrix: np.ndarray | None = None) -> Evidence:
        """No suspect: the class it flags is where the penalty bent the head, seldom the victim (lab)."""
        return Evidence()

    # -- the artifact: the gallery is kept in it (as secret as the reference) --------------------
    def info(self) -> dict[str, Any]:
        g = self.gallery_
        return {
            **super().info(),
            "gallery": {"classes": list(g.classes), "people": len(g.sources), "faces": g.features.shape[1]},
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            **super().arrays(),
            "gallery.features": self.gallery_.features,
            "gallery.sources": np.asarray(self.gallery_.sources, np.int64),
        }

    @classmethod
    def _from_info(cls, info: Mapping[str, Any], config: ReferenceConfig) -> MarginsReference:
        view = info["views"][PAIRS]
        return cls(config, std_floor=float(view["std_floor"]), normalize=str(view.get("normalize", "none")))

    @classmethod
    def restore(
        cls, info: Mapping[str, Any], arrays: Mapping[str, np.ndarray], members: Mapping[str, Any] | None = None
    ) -> MarginsReference:
        ref = super().restore(info, arrays, members)
        assert isinstance(ref, MarginsReference)
        ref.gallery_ = FaceGallery(
            features=np.asarray(arrays["gallery.features"], np.float32),
            sources=np.asarray(arrays["gallery.sources"], np.int64),
            classes=tuple(info["gallery"]["classes"]),
        )
        return ref
