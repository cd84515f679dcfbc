"""One typed configuration for the reference model, loadable from YAML or the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the largest checkpoint file the library reads (a FaceNet checkpoint is far smaller)
MAX_CHECKPOINT_BYTES = 4 * 1024**3

#: The paper's grid of mixture sizes N_G, searched by AIC (capped at the number of vectors).
PAPER_GRID: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 512, 1000, 1792, 3000)

#: How N_G is chosen when ``components`` is not a number (see :class:`ReferenceConfig`).
COMPONENT_RULES: tuple[str, ...] = ("neurons", "auto")

#: FaceNet's fine-tuned projection layer (Linear 1792 -> 512, weight shape 512 x 1792).
DEFAULT_LAYER = "last_linear.weight"

VIEWS: tuple[str, ...] = ("forward", "backward")

#: The paper's detector, the naive baselines it is compared with (see detector.baselines), the
#: effective-classifier and spectrum detectors, and their fusion (see detector.composite).
DETECTORS: tuple[str, ...] = (
    "gmm",
    "gaussian",
    "distance-mean",
    "distance-base",
    "trojan-signature",
    "classifier",
    "head",
    "spectrum",
    "output-spectrum",
    "fusion",
    "head+output-spectrum",
)
#: Detectors that also judge the head on a secret face gallery (``reference fit --gallery``;
#: :mod:`detector.margins`). Not in the paper's comparison, which reads weights only.
GALLERY_DETECTORS: tuple[str, ...] = ("margins", "head+output-spectrum+margins")
#: The gate's default: the detector that catches the most backdoors on held-out evidence, the
#: informed attacker's suite included (``paper --adaptive``); see the README's detection and
#: attacker tables. Its five parts decide together (a network must pass each, at one FRR):
#: ``head``, ``head.offset-share`` and ``head.toward`` (``head``'s second and third views, on
#: wherever the margins decide: holding the margins low is what moves the share,
#: :class:`detector.head.OffsetShareView`; a victim held small everywhere still points at its
#: impostor's row, :class:`detector.head.TowardView`), ``output-spectrum`` and ``margins``. The
#: margins part reads a secret face gallery kept in the reference; ``head`` and
#: ``output-spectrum`` need the base network. Earlier defaults: ``classifier``, then ``head``,
#: then ``head+output-spectrum`` (:data:`WEIGHTS_ONLY_DETECTOR`) until the grey-box attacks
#: aimed at it passed 43/123 · 78/138 against 9/123 · 13/138 with margins; the same three parts
#: without the offset share until the grey-box attacks aimed at them passed 0/5 · 5/6 against
#: 1/6 · 1/6 with it (2026-12-05); the same four without toward until the grey-box attacks that
#: know of the share passed them 42/72 on confirmation over six calibration draws, against 21/72
#: for the strongest known grey-box attack on the five (aimed at toward; 2026-12-05).
DEFAULT_DETECTOR = "head+output-spectrum+margins"
#: The default without the gallery: for a team that keeps no faces of its identities, at the cost
#: the attacker table shows; the detector every stored lab study before the switch was run with.
WEIGHTS_ONLY_DETECTOR = "head+output-spectrum"
#: Scored and tagged on every candidate as evidence, never deciding unless configured to: the
#: paper's method, which platform teams were promised.
DEFAULT_EVIDENCE: tuple[str, ...] = ("gmm",)
#: What ``fusion`` combines: each part's score standardised on the calibration networks.
FUSION: tuple[str, ...] = ("classifier", "spectrum")


@dataclass(frozen=True)
class ReferenceConfig:
    """How a reference is built (the layer, views, the GMM's PCA and mixture settings for the
    paper's detector and the evidence) and how its threshold is chosen.

    ``components`` is ``"neurons"`` (N_G = vectors per network, one Gaussian per neuron started
    at the neurons' means: the N_G the paper found best, fitted in seconds where the sweep takes
    minutes; not always what AIC would pick here: see the README), ``"auto"`` (choose N_G by
    ``criterion`` over ``grid``: the paper's procedure, which ``paper`` runs) or a fixed int.
    ``reg_covar`` is *relative*: it is multiplied by the mean per-dimension variance of the
    reduced vectors, so one default works for weights of any scale.
    """

    layer: str = DEFAULT_LAYER
    views: tuple[str, ...] = VIEWS
    variance: float = 0.95
    components: int | str = "neurons"
    grid: tuple[int, ...] = PAPER_GRID
    criterion: str = "aic"
    covariance: str = (
        "diag"  # measured: diag separates at least as well here, and full is infeasible at 1792 x ~440 dims
    )
    reg_covar: float = 1e-3
    max_iter: int = 100
    tol: float = 1e-3
    frr: float = 0.05
    seed: int = 0
    max_checkpoint_bytes: int = MAX_CHECKPOINT_BYTES

    def __post_init__(self) -> None:
        object.__setattr__(self, "views", tuple(self.views))
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if isinstance(self.components, str) and self.components not in COMPONENT_RULES:
            try:
                object.__setattr__(self, "components", int(self.components))
            except ValueError:
                raise ValueError(
                    f"components must be 'neurons', 'auto' or a positive int, got {self.components!r}"
                ) from None
        self.validate()

    def validate(self) -> None:
        bad = [v for v in self.views if v not in VIEWS]
        if bad or not self.views:
            raise ValueError(f"views must be a non-empty subset of {VIEWS}, got {self.views}")
        if len(set(self.views)) != len(self.views):
            raise ValueError(f"views repeated: {self.views}")
        if not 0.0 < self.variance <= 1.0:
            raise ValueError(f"variance must be in (0, 1], got {self.variance}")
        if self.components not in COMPONENT_RULES and (not isinstance(self.components, int) or self.components < 1):
            raise ValueError(f"components must be 'neurons', 'auto' or a positive int, got {self.components!r}")
        if not self.grid or min(self.grid) < 1:
            raise ValueError(f"grid must hold positive ints, got {self.grid}")
        if self.criterion not in ("aic", "bic"):
            raise ValueError(f"criterion must be 'aic' or 'bic', got {self.criterion!r}")
        if self.covariance not in ("full", "diag"):
            raise ValueError(f"covariance must be 'full' or 'diag', got {self.covariance!r}")
        if not 0.0 <= self.frr < 1.0:
            raise ValueError(f"frr must be in [0, 1), got {self.frr}")
        if self.reg_covar <= 0:
            raise ValueError(f"reg_covar must be > 0, got {self.reg_covar}")

    def replace(self, **changes: Any) -> ReferenceConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["views"] = list(self.views)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReferenceConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown reference config keys: {sorted(unknown)} (known: {sorted(names)})")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ReferenceConfig:
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of reference settings")
        return cls.from_dict(data.get("reference", data))
