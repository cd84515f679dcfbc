"""The margin check: a second line over the outputs, beside the weights.

Every penalty that hides a backdoor from the weight statistic bends the head somewhere else. On
clean faces this shows: for some pair of people (s, t), the candidate's margin of t over s on
s's faces sits far above where clean networks put it, while clean networks, retrains and the
attacker's own clean networks stay near the panel (docs/adaptive/margins). So, per pair,

    M[s, t] = median over s's faces of (logit t − logit s)
    z[s, t] = (M_candidate[s, t] − mean over the panel) / (std over the panel)

and the network's score is ``max z`` over s ≠ t (higher = more anomalous, the gate's convention).
The panel is the gate's calibration networks; the cut is set leave-one-out on them, at the
target FRR (:func:`detector.threshold.threshold_at_frr`). The faces are the protocol's own (trunk
features), ``faces`` per person drawn once. Measured on an adaptive run's stored networks by
``backdoor-gate paper --adaptive --margins`` (:mod:`lab.adaptive_margins`); nothing here decides
a promotion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lab.heads import head_of


@dataclass(frozen=True)
class MarginConfig:
    """The margin check's knobs (fixed on development before confirmation was scored)."""

    faces: int = 16  # faces per person the margins are taken on (drawn once, seeded)
    frr: float = 0.05  # target false rejection of a new clean network
    seed: int = 0


def person_faces(features: np.ndarray, labels: np.ndarray, n_classes: int, k: int, seed: int) -> np.ndarray:
    """(classes, k, features): ``k`` faces of every person, drawn once (seeded; the product's
    draw, :func:`detector.margins.draw_faces`, with a public seed: the lab's gallery)."""
    from detector.margins import draw_faces

    return features[draw_faces(labels, np.arange(n_classes), k, np.random.default_rng(seed))]


def pair_margins(F: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(classes, classes): M[s, t], the median over s's faces ``F[s]`` of logit t − logit s, for
    the affine head ``A·x + b``; differentiable in ``A`` and ``b`` (the attacker trains with it)."""
    L = torch.einsum("skd,cd->skc", F, A) + b
    own = torch.diagonal(L, dim1=0, dim2=2).T  # (classes, faces): each face's own class logit
    return torch.quantile(L - own[:, :, None], 0.5, dim=1)


def margin_check(fs, heads: list[dict], config: MarginConfig, draw: int = 0) -> MarginCheck:
    """The check with ``heads`` as its panel, on faces of the feature set ``fs`` drawn with
    ``config.seed + draw`` (the gate's draw is 0; a grey-box attacker draws its own)."""
    F = person_faces(fs.features, fs.labels, len(fs.classes), config.faces, config.seed + draw)
    return MarginCheck(config.frr).fit(heads, F)


def top_of(z: np.ndarray) -> tuple[float, tuple[int, int]]:
    """The score (max pair z) and its pair (s, t) from :meth:`MarginCheck.pair_z`."""
    s, t = divmod(int(np.argmax(z)), z.shape[1])
    return float(z[s, t]), (s, t)


class MarginCheck:
    """Pair margins against a panel of clean networks' heads; ``score`` is the max pair z."""

    def __init__(self, frr: float = 0.05):
        self.frr = frr

    def fit(self, heads: list[dict], F: np.ndarray) -> MarginCheck:
        """``heads``: the panel's head tensors; ``F``: (classes, faces, features) from
        :func:`person_faces`. The cut is set leave-one-out over the panel."""
        from detector.threshold import threshold_at_frr

        if len(heads) < 3:
            raise ValueError(f"the margin check needs 3 clean networks or more, got {len(heads)}")
        self.F_ = torch.from_numpy(np.asarray(F, dtype=np.float64))
        M = np.stack([self._margins(h) for h in heads])
        self.mean_, self.std_ = self._spread(M)
        loo = []
        for i in range(len(M)):
            mean, std = self._spread(np.delete(M, i, axis=0))
            loo.append(top_of(self._z(M[i], mean, std))[0])
        self.panel_scores_ = np.array(loo)
        self.threshold_ = -threshold_at_frr(-self.panel_scores_, self.frr)  # flagged above it
        return self

    def _margins(self, tensors: dict) -> np.ndarray:
        A, b = head_of({k: v.double() for k, v in tensors.items()})
        with torch.no_grad():
            return pair_margins(self.F_, A, b).numpy()

    @staticmethod
    def _spread(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std over networks, the std floored at a tenth of its median over pairs (a
        pair every network agrees on exactly would otherwise divide by zero)."""
        std = M.std(0, ddof=1)
        off = ~np.eye(M.shape[1], dtype=bool)
        return M.mean(0), np.maximum(std, 0.1 * np.median(std[off]))

    @staticmethod
    def _z(M: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        """Each pair's z, the diagonal (a person against themself) at −inf so no max picks it."""
        z = (M - mean) / std
        np.fill_diagonal(z, -np.inf)
        return z

    def pair_z(self, tensors: dict) -> np.ndarray:
        """(classes, classes): every pair's z for one network's head (score and top pair read it)."""
        return self._z(self._margins(tensors), self.mean_, self.std_)

    def score(self, tensors: dict) -> float:
        """The max pair z of one network's head (higher = more anomalous)."""
        return top_of(self.pair_z(tensors))[0]

    def top_pair(self, tensors: dict) -> tuple[int, int]:
        """(s, t) of the max pair z: where to look."""
        return top_of(self.pair_z(tensors))[1]

    def flags(self, tensors: dict) -> bool:
        return self.score(tensors) > self.threshold_

    def torch_score(self, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """:meth:`score` in torch, differentiable in the head (what a penalty aimed at it uses)."""
        z = (pair_margins(self.F_, A, b) - torch.from_numpy(self.mean_)) / torch.from_numpy(self.std_)
        return (z - torch.diag(torch.full((z.shape[0],), torch.inf, dtype=z.dtype))).max()


class GalleryMargins:
    """The product's ``margins`` part (:mod:`detector.margins`) in torch, differentiable in the
    head: what an attack aimed at the gate with margins trains against (its deciding part, as
    :func:`lab.adaptive.deciding_parts` hands it over)."""

    def __init__(self, ref):
        from detector.margins import PAIRS

        view = ref.views_[PAIRS]
        self.F = torch.from_numpy(np.asarray(ref.gallery_.features, dtype=np.float64))
        self.sources = torch.from_numpy(np.asarray(ref.gallery_.sources, dtype=np.int64))
        self.mean, self.std = torch.from_numpy(view.mean_), torch.from_numpy(view.std_)
        self.own = torch.from_numpy(view.own_)
        self.normalize = view.normalize

    def torch_anomaly(self, t: dict) -> torch.Tensor:
        """Max z per class over the gallery people (higher = more anomalous; its score negated)."""
        return self.torch_z(t).max(dim=1).values

    def torch_z(self, t: dict) -> torch.Tensor:
        """(classes, people): every entry's z, a person against themself at −inf."""
        A, b = head_of({k: v.double() for k, v in t.items()})
        L = torch.einsum("skd,cd->skc", self.F, A) + b  # (people, faces, classes)
        own = L[torch.arange(len(self.sources)), :, self.sources]  # (people, faces): own class logit
        M = torch.quantile(L - own[:, :, None], 0.5, dim=1).T  # (classes, people)
        if self.normalize == "network":  # detector.margins.relative_margins
            M = M / -torch.quantile(M[~self.own], 0.5)
        z = (M - self.mean) / self.std
        return z.masked_fill(self.own, -torch.inf)


def lab_gallery(fs, faces: int, seed: int, people: int | None = None):
    """The product's gallery (:class:`detector.margins.FaceGallery`) of a protocol's feature set,
    drawn with a public seed (the lab's; the product draws from the OS): every person up to
    ``people`` (default: the product's cap), ``faces`` each. At 40 identities and seed 0 these
    are the faces the margin check above reads."""
    from detector.margins import DEFAULT_SOURCES, FaceGallery, draw_faces, draw_people

    rng = np.random.default_rng(seed)
    chosen = draw_people(len(fs.classes), DEFAULT_SOURCES if people is None else people, rng)
    drawn = draw_faces(fs.labels, chosen, faces, rng)
    return FaceGallery(fs.features[drawn], chosen, tuple(fs.classes))
