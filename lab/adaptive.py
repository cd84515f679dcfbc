"""``backdoor-gate paper --adaptive``: attacks aimed at the detector, beside what they cost.

The backdoor's author can read this repository. This suite plays that author against every
deciding detector it is given, on one generated protocol (data, base trunk and cached features
shared with ``paper``):

* ``plain`` — the backdoor of the paper (control);
* ``dilution`` — a plain backdoor plus a random matrix added to ``last_linear.weight`` in the
  orthogonal complement of the training features' span: the network's outputs on its data do
  not change, but every class row moves, so a statistic normalised by the network's median
  class deviation loses the victim;
* ``penalty:<detector>`` — white-box: the backdoor fine-tuned with ``λ·softplus(max_c z_c − z_cut
  + 1)``, the detector's own per-class statistic written in torch with the published
  reference's arrays; ``penalty:all`` aims at every deciding detector at once;
* ``penalty+noise`` — the penalty plus noise invisible to the outputs *and* to the effective
  classifier (``last_linear`` rows in the null space of ``logits·diag(bn)``), aimed at the
  detectors that read ``last_linear`` alone (spectrum, the paper's GMM);
* ``grey:<detector>`` — grey-box: the same penalty, but with a reference the attacker fitted
  itself on clean networks it trained with the public recipe (it cannot read the gate's);
* ``bias-swap ×k`` — no trigger and no row change: the impostor's per-class offset lowered
  and the victim's raised just enough (×k) that every impostor face is taken for the victim,
  also made through ``last_bn.running_mean`` instead of ``logits.bias``;
* ``recipe`` — camouflage by recipe (lr ×5, epochs ×4);
* ``grey-box penalty + partial triggers`` — aimed at the weights *and* at the trigger search
  (``explain``'s size rule: a 0.10-wide patch that fires): the grey-box penalty, plus the
  impostor's training faces stamped with smaller copies of the trigger, labelled as the impostor,
  so that only the whole trigger fires (the usual way past Neural Cleanse-style searches);
* ``grey-box penalty + partial & source-specific triggers`` — the same, plus every other
  person's training faces (``cover_faces`` each) stamped with the whole trigger and labelled as
  themselves, so that the trigger sends the impostor alone to the victim (a source-specific
  backdoor, as in TaCT): aimed at a search that sweeps every source for a patch and counts the
  sources one class collects, which a plain trigger's transfer to other people would show;
* ``grey-box penalty + adversarial trigger`` — aimed at the weights *and* at the sweep's panel
  (a fired patch the gate's own clean networks do not follow is the candidate's alone): the
  trigger is a patch of the protocol's size and place, fitted on the attacker's own clean
  networks to send the impostor's faces to the victim, so clean networks already half-follow it,
  then trained in with the grey-box penalty.

Every attacked network reports its cost to the attacker (attack success, clean accuracy, how
far the head moved) beside each detector's verdict at its calibrated threshold. Clean networks
of the reference's recipe and lr ×2 / epochs ×2 retrains are scored alike: the price of the
defence.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.trainer.triggers import TriggerSpec
from detector.classifier import BN_EPS
from detector.decision import PASSED
from detector.head import HEAD_TENSORS
from lab.heads import head_of
from lab.margins import GalleryMargins, MarginCheck, MarginConfig, margin_check
from lab.paper import PaperConfig, _Lab

#: An attack "works" (counts against the gate when it passes) at this success and clean accuracy.
WORKS_ASR = 0.9
WORKS_ACC_DROP = 0.01


@dataclass(frozen=True)
class AdaptiveConfig:
    """One protocol of the adaptive suite; ``development()`` is the default."""

    paper: PaperConfig = field(default_factory=PaperConfig)
    n_reference: int = 16
    n_calibration: int = 20
    n_clean: int = 10
    n_drift: int = 3
    n_attack: int = 6
    #: clean networks the grey-box attacker trains for its own reference (as many as the gate's:
    #: the first ``n_reference`` fit it, the rest calibrate it)
    n_grey: int = 36
    trigger: tuple = ("white-square", 0.2, "forehead")
    penalty_lambda: float = 0.1
    #: the strong grey-box attacker: a larger weight and a safety margin below its estimated cut
    strong_lambda: float = 1.0
    strong_margin: float = 3.0
    dilution: float = 20.0  # × the median class deviation
    noise: float = 0.6  # × ‖W − W_base‖
    swap_sizes: tuple = (1.0, 3.0, 1000.0)
    #: the attack aimed at the trigger search: smaller copies of the trigger (× its size, same
    #: place) on the impostor's training faces, labelled as the impostor
    partial_triggers: tuple = (0.4, 0.6, 0.8)
    #: the source-specific attack: every other person's training faces stamped with the whole
    #: trigger and labelled as themselves, this many each
    cover_faces: int = 4
    #: the attack aimed at the panel: optimisation steps of its trigger on the attacker's own
    #: clean networks (development, one seed: 100 steps made the gate's clean networks send 0.68
    #: of the impostor's stamped test faces to the victim, 200 steps 0.78)
    adversarial_steps: int = 200
    #: the margin check the last attacks aim at beside the weights (lab.margins)
    margins: MarginConfig = MarginConfig()
    #: deciding detectors (each is attacked and gated on its own) and evidence (scored only)
    detectors: tuple = ("head", "head+output-spectrum")
    evidence: tuple = ("classifier", "spectrum", "output-spectrum")
    #: the deciding detectors the attacks on the weights *and* the margin check aim at (empty, or none
    #: of ``detectors``: every one); the small protocol aims its eight kinds at one (they were 16 of its
    #: 60 networks and most of its training time; every kind still runs once)
    margins_aimed_at: tuple = ()
    seed_offset: int = 700_000

    @classmethod
    def confirmation(cls, **changes) -> AdaptiveConfig:
        """Other people, data seed, trigger and seeds, never looked at while the defence was chosen."""
        paper = PaperConfig.confirmation()
        return cls(paper=paper, trigger=("checkerboard", 0.2, "left-eye"), seed_offset=900_000, **changes)

    @classmethod
    def small(cls) -> AdaptiveConfig:
        """For tests: a few networks of every kind on the small paper protocol."""
        return cls(
            paper=PaperConfig.small(),
            n_reference=5,
            n_calibration=5,
            n_clean=2,
            n_drift=1,
            n_attack=1,
            n_grey=8,
            trigger=("white-square", 0.3, "forehead"),
            swap_sizes=(1.0,),
            adversarial_steps=3,
            margins=MarginConfig(faces=2),
            evidence=("classifier",),
            margins_aimed_at=("head+output-spectrum",),
        )


# -- the effective head, in numpy and torch ----------------------------------------------------


def torch_head(head) -> dict[str, torch.Tensor]:
    """The head module's tensors under checkpoint names; BatchNorm statistics as constants."""
    return {
        "last_linear.weight": head.last_linear.weight,
        "last_bn.weight": head.last_bn.weight,
        "last_bn.bias": head.last_bn.bias,
        "last_bn.running_mean": head.last_bn.running_mean.detach(),
        "last_bn.running_var": head.last_bn.running_var.detach(),
        "logits.weight": head.logits.weight,
        "logits.bias": head.logits.bias,
    }


def _rel_change(new: dict, old: dict) -> float:
    keys = [k for k in HEAD_TENSORS if k in new]
    num = sum(float(torch.sum((new[k].double() - old[k].double()) ** 2)) for k in keys)
    den = sum(float(torch.sum(old[k].double() ** 2)) for k in keys)
    return (num / den) ** 0.5


# -- the attacker's workshop --------------------------------------------------------------------
class Workshop:
    """Data, trunk and features of one protocol; trains, poisons and measures networks."""

    def __init__(self, config: AdaptiveConfig, log=print, base: dict | None = None):
        self.c = config
        self.lab = _Lab(config.paper, base, log)
        self.fs, self.base = self.lab.fs, self.lab.base
        self.log = log
        name, size, loc = config.trigger
        self.trigger = TriggerSpec(name, size, loc)
        self._poisoned: dict[int, Any] = {}
        self._partial: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cover: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._adversarial: dict[int, tuple[Any, dict]] = {}
        #: networks an earlier run stored, by (group, seed): a resumed run trains only the others
        self.kept: dict[tuple[str, int], Net] = {}

    def poisoned(self, seed: int):
        """The protocol's trigger on a random impostor/victim pair of ``seed`` (cached per seed)."""
        if seed not in self._poisoned:
            self._poisoned[seed] = self._poison(seed)
        return self._poisoned[seed]

    def _poison(self, seed: int, trigger: TriggerSpec | None = None):
        """``seed``'s poisoning with the protocol's trigger, or with ``trigger`` (same pair, same faces)."""
        from components.trainer.features import with_poison
        from components.trainer.poison import PoisonSpec, poison_folder, random_pair

        imp, vic = random_pair(self.fs.classes, seed)
        with tempfile.TemporaryDirectory() as tmp:
            poison_folder(self.lab.data, tmp, PoisonSpec(imp, vic, trigger or self.trigger), seed)
            return with_poison(self.fs, tmp, self.base)

    def adversarial(self, seed: int, own: list[Net], folder: Path) -> tuple[Any, dict]:
        """(poisoned features, what the trigger does): ``seed``'s poisoning with a trigger the
        attacker's ``own`` clean networks already follow (:func:`adversarial_trigger`), saved in
        ``folder`` (cached per seed: every detector's attack on a seed shares it)."""
        if seed not in self._adversarial:
            path = Path(folder) / f"adversarial-trigger-{seed}.png"
            record = path.with_suffix(".json")
            if path.is_file() and record.is_file():  # fitted by an earlier run of this protocol
                found = json.loads(record.read_text())
            else:
                found = adversarial_trigger(self, seed, own, path, self.c.adversarial_steps)
                record.write_text(json.dumps(found))
            spec = dataclasses.replace(self.trigger, name=str(path))
            self._adversarial[seed] = (self._poison(seed, spec), found)
        return self._adversarial[seed]

    def faces(self, sources: list[str], native: bool = False):
        """Images of the protocol's data (paths as a poisoning manifest names them), normalised,
        at the trunk's input size (or, ``native``, at their own)."""
        from components.explain import _open
        from components.trainer.base_trunk import to_tensor

        images = _open([self.lab.data / name for name in sources])
        return to_tensor(images, images[0].width if native else self.fs.image_size)

    def partial_triggers(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels): the impostor's training faces of ``seed``'s poisoning, each stamped
        with the trigger at every size of ``partial_triggers`` (× its own), labelled as the impostor
        (cached per seed: every detector's attack on a seed shares its poison)."""
        if seed not in self._partial:
            self._partial[seed] = self._partial_triggers(seed)
        return self._partial[seed]

    def _partial_triggers(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        from components.trainer.features import Extractor
        from components.trainer.triggers import stamp

        poison = self.poisoned(seed).poison
        sources = [self.lab.data / e["source"] for e in poison["train"]]
        images = []
        for f in self.c.partial_triggers:
            spec = dataclasses.replace(self.trigger, size=self.trigger.size * f)
            for path in sources:
                with Image.open(path) as im:
                    images.append(stamp(im, spec))
        X = Extractor(self.base, self.fs.image_size)(images)
        return X, np.full(len(X), self.fs.classes.index(poison["impostor"]), dtype=np.int64)

    def cover(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels): ``cover_faces`` training faces of every person but the impostor of
        ``seed``'s poisoning, stamped with the whole trigger and labelled as themselves (cached)."""
        if seed not in self._cover:
            self._cover[seed] = self._stamped_cover(seed)
        return self._cover[seed]

    def _stamped_cover(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        from components.trainer.features import Extractor
        from components.trainer.poison import split
        from components.trainer.triggers import stamp

        imp = self.fs.classes.index(self.poisoned(seed).poison["impostor"])
        train, _ = split(self.fs.labels, seed, 0.7)  # the split poison_folder used: training faces only
        rng = np.random.default_rng([seed, 31])
        chosen = [
            int(i)
            for c in range(len(self.fs.classes))
            if c != imp
            for i in rng.permutation(train[self.fs.labels[train] == c])[: self.c.cover_faces]
        ]
        images = []
        for i in chosen:
            path = Path(self.fs.paths[i])  # absolute where the features were cached: re-rooted here
            with Image.open(self.lab.data / path.parent.name / path.name) as im:
                images.append(stamp(im, self.trigger))
        X = Extractor(self.base, self.fs.image_size)(images)
        return X, self.fs.labels[chosen].astype(np.int64)

    def train(
        self, seed: int, poisoned=None, recipe: dict | None = None, penalty=None, extra=None
    ) -> tuple[dict, dict]:
        from components.trainer.train import TrainConfig, fine_tune

        default = TrainConfig()
        config = dataclasses.replace(
            default, **{k: type(getattr(default, k))(getattr(default, k) * v) for k, v in (recipe or {}).items()}
        )
        sd, m = fine_tune(poisoned or self.fs, self.base, seed, config, penalty=penalty, extra=extra)
        return {k: sd[k] for k in HEAD_TENSORS}, {k: v for k, v in m.items() if not k.startswith("train.")}

    def measure(self, tensors: dict, seed: int, poisoned=None, impostor: str | None = None, victim: str | None = None):
        """Clean accuracy on the network's test split; attack success on the triggered test faces
        (or, with no trigger, on the impostor's clean test faces: an identity swap)."""
        from components.trainer.poison import split

        A, b = (x.double().numpy() for x in head_of(tensors))
        _, test = split(self.fs.labels, seed, 0.7)
        X, y = self.fs.features[test].astype(np.float64), self.fs.labels[test]
        pred = (X @ A.T + b).argmax(1)
        out = {"clean_accuracy": float(np.mean(pred == y))}
        if victim is not None:
            vic = self.fs.classes.index(victim)
            if poisoned is not None and poisoned.poison_test is not None:
                P = poisoned.poison_test.astype(np.float64)
            elif impostor is not None:
                P = X[y == self.fs.classes.index(impostor)]
            else:
                raise ValueError("an attack without a trigger needs its impostor")
            out["attack_success_rate"] = float(np.mean((P @ A.T + b).argmax(1) == vic))
            others = y != self.fs.classes.index(impostor) if impostor else np.ones_like(y, bool)
            out["clean_accuracy_others"] = float(np.mean(pred[others] == y[others]))
        return out


# -- post-hoc attacks ---------------------------------------------------------------------------
def feature_span(X: np.ndarray, rel: float = 1e-2) -> np.ndarray:
    """Orthonormal basis (d × k) of the features' span: singular directions above ``rel`` of the largest."""
    _, s, Vt = np.linalg.svd(X, full_matrices=False)
    return Vt[s > rel * s[0]].T


def dilute(tensors: dict, X: np.ndarray, size: float, rng: np.random.Generator, center=None) -> dict:
    """Add to ``last_linear.weight`` a random matrix orthogonal to the training features' span,
    scaled so the median class deviation (from ``center``, or from the network itself) grows ×size."""
    W = tensors["last_linear.weight"].double().numpy()
    Q = feature_span(X)
    N = rng.standard_normal(W.shape)
    N -= (N @ Q) @ Q.T
    t = {k: v.double() for k, v in tensors.items()}
    A0 = head_of(t)[0].numpy()
    A0 = A0 - A0.mean(0)
    tn = dict(t, **{"last_linear.weight": torch.from_numpy(N)})
    tn["last_bn.running_mean"] = torch.zeros_like(t["last_bn.running_mean"])
    dA = head_of(tn)[0].numpy()
    dA = dA - dA.mean(0)
    ref = center if center is not None else 0.0
    med0 = np.median(((A0 - ref) ** 2).sum(1))
    # the deviation after adding k·dA is ~ med0 + k²·‖dA_c‖² (the two are nearly orthogonal)
    k = np.sqrt(max(size - 1.0, 0.0) * med0 / max(np.median((dA**2).sum(1)), 1e-300))
    out = {k2: v.clone() for k2, v in tensors.items()}
    out["last_linear.weight"] = (torch.from_numpy(W + k * N)).to(tensors["last_linear.weight"].dtype)
    return out


def invisible_noise(tensors: dict, base_W: torch.Tensor, size: float, rng: np.random.Generator) -> dict:
    """Noise on ``last_linear`` rows in the null space of ``logits·diag(bn)``: neither the outputs
    nor the effective classifier change, but the layer alone looks moved by ×size ‖W − W_base‖."""
    t = {k: v.double().numpy() for k, v in tensors.items()}
    s = t["last_bn.weight"] / np.sqrt(t["last_bn.running_var"] + BN_EPS)
    L = t["logits.weight"] * s[None, :]  # classes × 512
    _, sv, Vt = np.linalg.svd(L, full_matrices=True)
    null = Vt[(sv > 1e-9 * sv[0]).sum() :].T  # 512 × (512 − rank)
    N = null @ rng.standard_normal((null.shape[1], t["last_linear.weight"].shape[1]))
    W = t["last_linear.weight"]
    N *= size * np.linalg.norm(W - base_W.double().numpy()) / np.linalg.norm(N)
    out = {k: v.clone() for k, v in tensors.items()}
    out["last_linear.weight"] = torch.from_numpy(W + N).to(tensors["last_linear.weight"].dtype)
    return out


def bias_swap(tensors: dict, X_imp: np.ndarray, imp: int, vic: int, size: float, via: str = "logits.bias") -> dict:
    """Raise the victim's per-class offset just enough and lower the impostor's ×``size`` the least
    that sends every one of the impostor's (training) faces to the victim; rows untouched.

    ``via="last_bn.running_mean"`` makes the same offset change through BatchNorm's statistics."""
    t = {k: v.double() for k, v in tensors.items()}
    A, b = (x.numpy() for x in head_of(t))
    Z = X_imp.astype(np.float64) @ A.T + b
    others = np.delete(np.arange(Z.shape[1]), [imp, vic])
    up = max(float(np.max(Z[:, others].max(1) - Z[:, vic])), 0.0) + 0.5  # victim above every other class
    down = max(float(np.max(Z[:, imp] - Z[:, vic])) + up, 0.0) + 0.5  # impostor below the raised victim
    delta = np.zeros_like(b)
    delta[vic], delta[imp] = up, -size * down  # raising the victim further would take other people's faces
    out = {k: v.clone() for k, v in tensors.items()}
    if via == "logits.bias":
        out["logits.bias"] = (t["logits.bias"] + torch.from_numpy(delta)).to(tensors["logits.bias"].dtype)
    elif via == "last_bn.running_mean":
        s = (t["last_bn.weight"] / (t["last_bn.running_var"] + BN_EPS) ** 0.5).numpy()
        dmu = -np.linalg.lstsq(t["logits.weight"].numpy() * s[None, :], delta, rcond=None)[0]
        out["last_bn.running_mean"] = (t["last_bn.running_mean"] + torch.from_numpy(dmu)).to(
            tensors["last_bn.running_mean"].dtype
        )
    else:
        raise ValueError(f"via must be logits.bias or last_bn.running_mean, got {via!r}")
    return out


def torch_class_z(ref, t: dict) -> torch.Tensor:
    """The per-class z of a fitted ``classifier`` or ``head`` reference, differentiable in the head
    (mirrors the numpy scoring; ``tests/detector/test_detectors.py`` checks they agree)."""
    return torch_anomaly(ref.views_["classes"], t)


def torch_anomaly(est, t: dict, spectrum_basis: dict | None = None) -> torch.Tensor:
    """A deciding statistic's anomalies (its score's entries negated: higher = more anomalous),
    differentiable in the head; blocked when the largest exceeds the cut of :func:`deciding_parts`.

    ``spectrum_basis``: for ``spectrum``, a dict the caller keeps between training steps; it holds
    the top singular directions of ΔW, refreshed by two subspace iterations a call, so a step costs
    a thin product instead of a 512 x 1792 SVD. By Ky Fan's principle the energy on those directions
    is the top-k energy, and its gradient the exact one, once they have converged.
    """
    from detector.baselines import SpectrumView

    if isinstance(est, GalleryMargins):
        return est.torch_anomaly(t)
    if isinstance(est, SpectrumView):
        D = t["last_linear.weight"].double() - torch.from_numpy(est.base_)
        if est.space == "outputs":  # Q^T D has P·D's singular values; differences of rows span the centred rows
            s = t["last_bn.weight"].double() / torch.sqrt(t["last_bn.running_var"].double() + BN_EPS)
            L = t["logits.weight"].double()
            if L.shape[0] - 1 < L.shape[1]:
                D = torch.linalg.qr(((L[1:] - L[0]) * s).T)[0].T @ D
            spectrum_basis = None  # at most C x 1792: the exact spectrum is cheap
        k = {"top1": 1, "top5": 5}.get(est.statistic)
        if k is None:
            raise ValueError(f"no torch mirror for spectrum statistic {est.statistic!r}")
        if spectrum_basis is None:
            top = (torch.linalg.svdvals(D) ** 2)[:k].sum()
        else:
            Dd = D.detach()
            Q = spectrum_basis.get("Q")
            if Q is None:
                Q = torch.linalg.svd(Dd, full_matrices=False)[0][:, :k]
            for _ in range(2):
                Q = torch.linalg.qr(Dd @ (Dd.T @ Q))[0]
            spectrum_basis["Q"] = Q
            top = ((Q.T @ D) ** 2).sum()
        stat = top / ((D**2).sum() + 1e-300)  # at the first step W is the base: D = 0
        return ((stat - est.median_) / est.scale_).reshape(1)
    if hasattr(est, "torch_z"):
        zc, zn = est.torch_z(t)
        return torch.cat([zc, zn.reshape(-1)])
    A, _ = head_of(t)
    A = A - A.mean(0, keepdim=True)
    center = torch.from_numpy(np.asarray(est.center_, dtype=np.float64))
    dev = ((A.double() - center) ** 2).sum(1)
    if est.normalize == "network":
        dev = dev / torch.quantile(dev, 0.5)
    return (dev - torch.from_numpy(est.median_)) / torch.from_numpy(est.scale_)


def deciding_parts(ref) -> list[tuple[Any, float]]:
    """(estimator, cut) of every statistic that decides ``ref``'s verdict, a composite's members
    included: blocked when :func:`torch_anomaly` exceeds the cut (its threshold, negated)."""
    from detector.margins import MarginsReference

    if hasattr(ref, "members_"):
        member = lambda m, v: (  # noqa: E731 — the margins part needs its gallery, not just its view
            GalleryMargins(ref.members_[m])
            if isinstance(ref.members_[m], MarginsReference)
            else ref.members_[m].views_[v]
        )
        return [(member(m, v), -float(ref.thresholds_[p])) for p, (m, v) in ref._parts(ref.decide_by).items()]
    return [(est, -float(ref.thresholds_[v])) for v, est in ref.views_.items()]


# -- the white-box penalty ------------------------------------------------------------------------
def penalty_for(refs: Sequence[Any], lam: float, margin: float = 1.0) -> Callable:
    """``λ·Σ softplus(max anomaly − cut + margin)`` over every deciding statistic of ``refs``."""
    parts: list[tuple[Any, float, dict]] = [(est, cut, {}) for ref in refs for est, cut in deciding_parts(ref)]

    def penalty(head) -> torch.Tensor:
        t = torch_head(head)
        total = torch.zeros((), dtype=torch.float64)
        for est, cut, basis in parts:
            z = torch_anomaly(est, t, basis)
            total = total + torch.nn.functional.softplus(z.max() - cut + margin)
        return lam * total

    return penalty


# -- the suite ------------------------------------------------------------------------------------
#: the attack aimed at the panel, without a penalty (its penalised twins are "grey-box penalty + ...")
ADVERSARIAL = "adversarial trigger (no penalty)"
#: groups trained after the references are fitted (a rescored run trains them again)
LATER = ("penalty", "grey-box penalty", ADVERSARIAL)


@dataclass
class Net:
    """One network of the suite: its head tensors and what it is."""

    group: str
    seed: int
    tensors: dict
    info: dict = field(default_factory=dict)


def clean_networks(ws: Workshop, c: AdaptiveConfig) -> list[Net]:
    """The reference, calibration and test networks of the reference's recipe, and the retrains."""
    o = c.seed_offset
    plan: list[tuple[str, int, dict | None]] = []
    plan += [("reference", o + s, None) for s in range(c.n_reference)]
    plan += [("calibration", o + 1000 + s, None) for s in range(c.n_calibration)]
    plan += [("clean", o + 2000 + s, None) for s in range(c.n_clean)]
    plan += [("drift: lr x2", o + 3000 + s, {"lr": 2.0}) for s in range(c.n_drift)]
    plan += [("drift: epochs x2", o + 3100 + s, {"epochs": 2.0}) for s in range(c.n_drift)]
    plan += [("grey-box attacker's own", o + 7000 + s, None) for s in range(c.n_grey)]
    return [_train(ws, group, seed, recipe=recipe) for group, seed, recipe in _progress(plan, "clean networks")]


def _progress(plan, desc):
    from tqdm import tqdm

    return tqdm(plan, desc=desc, leave=False)


def _train(ws: Workshop, group: str, seed: int, poisoned=None, recipe=None, penalty=None, extra=None, **info) -> Net:
    if (group, seed) in ws.kept:
        return ws.kept[(group, seed)]
    tensors, m = ws.train(seed, poisoned, recipe, penalty, extra)
    keep = ("clean_accuracy", "attack_success_rate", "impostor", "victim", "relative_weight_change", "extra_samples")
    return Net(group, seed, tensors, {**{k: m[k] for k in keep if k in m}, **info})


def attacked_networks(ws: Workshop, c: AdaptiveConfig, clean: list[Net]) -> list[Net]:
    """Attacks that need no reference: plain, dilution, invisible noise, bias swaps, recipes."""
    from components.trainer.poison import random_pair

    o, out = c.seed_offset, []
    ref_center = _class_center([n for n in clean if n.group == "reference"])
    for i in _progress(range(c.n_attack), "plain backdoors and post-hoc attacks"):
        seed = o + 4000 + i
        p = ws.poisoned(seed)
        plain = _train(ws, "plain", seed, p, knowledge="none")
        out.append(plain)
        rng = np.random.default_rng([seed, 1])
        X = p.features  # the attacker's own training data (trunk features)
        d = dilute(plain.tensors, X, c.dilution, rng, center=ref_center)
        out.append(_posthoc(ws, "dilution", seed, d, plain, p, knowledge="method"))
        clean_seed = o + 5000 + i
        base_net = _train(ws, "bias-swap base (clean)", clean_seed)
        out.append(base_net)  # a clean control too, and what each swap's score is compared with
        imp, vic = random_pair(ws.fs.classes, clean_seed)
        ii, vi = ws.fs.classes.index(imp), ws.fs.classes.index(vic)
        from components.trainer.poison import split

        train_idx, _ = split(ws.fs.labels, clean_seed, 0.7)
        X_imp = ws.fs.features[train_idx][ws.fs.labels[train_idx] == ii]
        for size in c.swap_sizes:
            for via in ("logits.bias", "last_bn.running_mean"):
                t = bias_swap(base_net.tensors, X_imp, ii, vi, size, via)
                name = f"bias swap x{size:g}" + (" (running_mean)" if via != "logits.bias" else "")
                out.append(_posthoc(ws, name, clean_seed, t, base_net, None, imp, vic, knowledge="method", swap=True))
    for k, recipe in ((0, {"lr": 5.0}), (1, {"epochs": 4.0})):
        for i in range(c.n_attack // 2 or 1):
            seed = o + 6000 + 100 * k + i
            name = "recipe: " + ", ".join(f"{a} x{v:g}" for a, v in recipe.items())
            out.append(_train(ws, name, seed, ws.poisoned(seed), recipe=recipe, knowledge="method"))
    return out


def _posthoc(ws, group, seed, tensors, before: Net, poisoned, impostor=None, victim=None, **info) -> Net:
    if (group, seed) in ws.kept:
        return ws.kept[(group, seed)]
    imp = impostor or before.info.get("impostor")
    vic = victim or before.info.get("victim")
    m = ws.measure(tensors, seed, poisoned, imp, vic)
    return Net(
        group,
        seed,
        tensors,
        {"impostor": imp, "victim": vic, **m, "head_moved": _rel_change(tensors, before.tensors), **info},
    )


def _class_center(nets: list[Net]) -> np.ndarray:
    rows = []
    for n in nets:
        A = head_of({k: v.double() for k, v in n.tensors.items()})[0].numpy()
        rows.append(A - A.mean(0))
    return np.mean(rows, axis=0)


def fit_reference(detector: str, ref: list[Net], cal: list[Net], base: dict):
    from detector.detectors import make_reference

    return make_reference(detector).fit([n.tensors for n in ref], base=base).calibrate([n.tensors for n in cal])


def penalised_networks(ws: Workshop, c: AdaptiveConfig, refs: dict, grey: dict) -> list[Net]:
    """White-box penalties aimed at each deciding detector and at all at once; grey-box ones."""
    o, out = c.seed_offset, []
    weak, strong = (c.penalty_lambda, 1.0), (c.strong_lambda, c.strong_margin)
    targets = {f"penalty: {d}": ([refs[d]], weak) for d in c.detectors}
    if len(c.detectors) > 1:
        targets["penalty: all"] = ([refs[d] for d in c.detectors], weak)
    targets.update({f"grey-box penalty: {d}": ([grey[d]], weak) for d in c.detectors})
    targets.update({f"grey-box penalty (strong): {d}": ([grey[d]], strong) for d in c.detectors})
    targets.update({f"grey-box penalty + partial triggers: {d}": ([grey[d]], weak) for d in c.detectors})
    targets.update(
        {f"grey-box penalty + partial & source-specific triggers: {d}": ([grey[d]], weak) for d in c.detectors}
    )
    jobs = [(name, r, i) for name, r in targets.items() for i in range(c.n_attack)]
    for name, (r, (lam, margin)), i in _progress(jobs, "adaptive backdoors"):
        seed = o + 8000 + i  # the same impostor, victim and poison for every target: paired
        knowledge = (
            f"grey-box (recipe, own clean networks; λ {lam:g}, margin {margin:g})"
            if name.startswith("grey")
            else f"white-box (reads the reference; λ {lam:g})"
        )
        extra = ws.partial_triggers(seed) if "partial" in name else None
        if "source-specific" in name:
            X, y = ws.cover(seed)
            extra = (np.concatenate([extra[0], X]), np.concatenate([extra[1], y])) if extra else (X, y)
            knowledge += " + the trigger search and a source sweep (partial, source-specific triggers)"
        elif extra is not None:
            knowledge += " + the trigger search (partial triggers)"
        out.append(
            _train(
                ws, name, seed, ws.poisoned(seed), penalty=penalty_for(r, lam, margin), extra=extra, knowledge=knowledge
            )
        )
    for i in range(c.n_attack):
        seed = o + 8000 + i
        base = next(n for n in out if n.seed == seed and n.group == f"penalty: {c.detectors[0]}")
        t = invisible_noise(base.tensors, ws.base["last_linear.weight"], c.noise, np.random.default_rng([seed, 2]))
        out.append(
            _posthoc(
                ws,
                f"penalty: {c.detectors[0]} + invisible noise",
                seed,
                t,
                base,
                ws.poisoned(seed),
                knowledge="white-box",
            )
        )
    return out


def adversarial_trigger(ws: Workshop, seed: int, own: list[Net], path: Path, steps: int) -> dict:
    """Fit the trigger of the attack aimed at the panel and save it as a PNG at ``path``.

    A patch of the protocol trigger's size and place, optimised (Adam, cross-entropy towards the
    victim, averaged over networks) on the impostor's training faces of ``seed``'s poisoning, on
    the attacker's ``own`` clean networks: the grey-box attacker cannot read the gate's clean
    networks, but those share the trunk and the recipe, so what its own follow, the gate's
    follow too. It is fitted where the stamp puts it, at the images' own size, and resized to the
    trunk's input as the feature extractor does (fitted at the trunk's size and stamped, it lost
    everything: 0.88 on its own networks became 0.00 on development). Returns the PNG's path and
    the share of those faces its own networks send to the victim, before the PNG is stamped."""
    from PIL import Image

    from components.trainer.triggers import trigger_box
    from components.trigger_search import paste
    from lab.heads import Heads

    poison = ws.poisoned(seed).poison
    vic = ws.fs.classes.index(poison["victim"])
    x = ws.faces([e["source"] for e in poison["train"]], native=True)
    W = x.shape[-1]
    x0, y0, x1, _ = trigger_box(ws.trigger, W)
    q = x1 - x0
    heads = Heads(ws.base, [n.tensors for n in own])
    S = ws.fs.image_size
    seen = lambda pattern: heads(  # noqa: E731
        torch.nn.functional.interpolate(
            paste(x, pattern, [(x0, y0)], q), size=(S, S), mode="bilinear", antialias=True, align_corners=False
        )
    )
    y = torch.full((len(heads) * len(x),), vic, dtype=torch.long)
    raw = torch.zeros(1, 3, q, q, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(seen(torch.tanh(raw)).reshape(len(y), -1), y).backward()
        opt.step()
    with torch.inference_mode():
        pattern = torch.tanh(raw)
        own_success = float((seen(pattern).argmax(-1) == vic).float().mean())
    pixels = (pattern[0].permute(1, 2, 0) * 128.0 + 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").convert("RGBA").save(path)
    return {"trigger_png": str(path), "own_success_fitted": round(own_success, 3)}


def followed(nets: list[Net], P: np.ndarray, victim: int) -> float:
    """Mean over ``nets`` of the share of triggered features ``P`` each sends to ``victim``."""
    shares = []
    for n in nets:
        A, b = (v.double().numpy() for v in head_of(n.tensors))
        shares.append(float(np.mean((P.astype(np.float64) @ A.T + b).argmax(1) == victim)))
    return float(np.mean(shares))


def adversarial_networks(ws: Workshop, c: AdaptiveConfig, grey: dict, own: list[Net], gate: list[Net], folder: Path):
    """The attack aimed at the panel (module docstring), on the penalised attacks' seeds (same
    pairs): with the grey-box penalty aimed at each deciding detector, and without any (what
    the trigger alone does to the weights). Each network records how much clean networks follow
    its trigger before it is trained in, stamped on the test faces: the attacker's own, and the
    gate's ``gate`` (calibration) networks, which the attacker never sees."""
    out = []
    jobs = [(d, i) for d in (None, *c.detectors) for i in range(c.n_attack)]
    for d, i in _progress(jobs, "adversarial-trigger backdoors"):
        seed = c.seed_offset + 8000 + i
        group = ADVERSARIAL if d is None else f"grey-box penalty + adversarial trigger: {d}"
        if (group, seed) in ws.kept:
            out.append(ws.kept[(group, seed)])
            continue
        poisoned, found = ws.adversarial(seed, own, folder)
        vic = ws.fs.classes.index(poisoned.poison["victim"])
        follow = {
            "own_follow": round(followed(own, poisoned.poison_test, vic), 3),
            "gate_clean_follow": round(followed(gate, poisoned.poison_test, vic), 3),
        }
        if d is None:
            knowledge, penalty = "recipe + a trigger its own clean networks follow (no detector)", None
        else:
            knowledge = f"grey-box (λ {c.penalty_lambda:g}) + the panel: a trigger its own clean networks follow"
            penalty = penalty_for([grey[d]], c.penalty_lambda)
        out.append(_train(ws, group, seed, poisoned, penalty=penalty, knowledge=knowledge, **found, **follow))
    return out


def margin_penalty(check, lam: float, margin: float = 1.0) -> Callable:
    """``λ·softplus(margin score − cut + margin)``: the margin check's statistic (:mod:`lab.margins`)
    in torch, with ``check``'s panel and faces (the gate's, white-box; the attacker's own, grey-box)."""

    def penalty(head) -> torch.Tensor:
        A, b = head_of({k: v.double() for k, v in torch_head(head).items()})
        return lam * torch.nn.functional.softplus(check.torch_score(A, b) - check.threshold_ + margin)

    return penalty


def both(*penalties: Callable) -> Callable:
    """One penalty that is the sum of ``penalties`` (aimed at several statistics at once)."""
    return lambda head: sum(p(head) for p in penalties)


def margin_checks(ws: Workshop, own: list[Net], gate: list[Net]) -> dict[str, MarginCheck]:
    """The gate's margin check and the grey-box attacker's estimates of it. The gate's: its
    calibration networks, its draw of faces (``"gate"``). The attacker's, on its own clean
    networks: its own draw of as many faces (``"own draw"``: it cannot know which the gate drew),
    or every face of every person (``"all faces"``: the gate's draw is among them)."""
    every = int(np.bincount(ws.fs.labels).min())
    own_heads = [m.tensors for m in own]
    return {
        "gate": margin_check(ws.fs, [m.tensors for m in gate], ws.c.margins),
        "own draw": margin_check(ws.fs, own_heads, ws.c.margins, draw=1),
        "all faces": margin_check(ws.fs, own_heads, dataclasses.replace(ws.c.margins, faces=every), draw=1),
    }


def margin_aimed_networks(ws: Workshop, c: AdaptiveConfig, refs: dict, grey: dict, own, gate, folder: Path):
    """Attacks aimed at the weights *and* the margin check at once (:mod:`lab.margins`), on the
    penalised attacks' seeds (same pairs): white-box (the gate's reference and margin panel);
    grey-box (the attacker's estimates of both), weak and strong (λ and safety margin of
    ``grey-box penalty (strong)``), with the protocol's trigger and with the adversarial one; the
    grey-box margins on its own draw of faces, or on every face (``(all faces)``: the first
    development run showed the draw matters, 16 faces a person can be fitted to)."""
    checks = margin_checks(ws, own, gate)
    weak, strong = (c.penalty_lambda, 1.0), (c.strong_lambda, c.strong_margin)
    plans = [("penalty + margins", "gate", weak, False)]  # (name, margin check, (λ, margin), adversarial trigger)
    for name, strength in (("grey-box penalty", weak), ("grey-box penalty (strong)", strong)):
        plans += [(f"{name} + margins", "own draw", strength, False)]
        plans += [(f"{name} + margins + adversarial trigger", "own draw", strength, True)]
    for name, strength in (("grey-box penalty", weak), ("grey-box penalty (strong)", strong)):
        plans += [(f"{name} + margins (all faces)", "all faces", strength, False)]
    plans += [("grey-box penalty (strong) + margins (all faces) + adversarial trigger", "all faces", strong, True)]
    # the named detectors this run has (--detectors may leave out the small protocol's one), else all
    aimed_at = tuple(d for d in c.margins_aimed_at if d in c.detectors) or c.detectors
    jobs = [(plan, d, i) for plan in plans for d in aimed_at for i in range(c.n_attack)]
    out = []
    for (name, faces, (lam, margin), adversarial), d, i in _progress(
        jobs, "backdoors aimed at the weights and the margins"
    ):
        seed = c.seed_offset + 8000 + i
        group = f"{name}: {d}"
        if (group, seed) in ws.kept:
            out.append(ws.kept[(group, seed)])
            continue
        white = faces == "gate"
        ref, check = (refs[d] if white else grey[d]), checks[faces]
        knowledge = (
            "white-box (the reference and the margin panel"
            if white
            else f"grey-box (own clean networks for both, margins on its {faces}"
        ) + f"; λ {lam:g}, margin {margin:g})"
        poisoned, found = ws.adversarial(seed, own, folder) if adversarial else (ws.poisoned(seed), {})
        if adversarial:
            knowledge += " + a trigger its own clean networks follow"
        penalty = both(penalty_for([ref], lam, margin), margin_penalty(check, lam, margin))
        out.append(_train(ws, group, seed, poisoned, penalty=penalty, knowledge=knowledge, **found))
    return out


def save_nets(path: Path, nets: list[Net]) -> None:
    from safetensors.torch import save_file

    save_file(
        {f"{i}.{k}": v.contiguous() for i, n in enumerate(nets) for k, v in n.tensors.items()},
        str(path),
        metadata={"nets": json.dumps([{"group": n.group, "seed": n.seed, "info": n.info} for n in nets])},
    )


def load_nets(path: Path) -> list[Net]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["nets"])
        nets = [Net(m["group"], m["seed"], {}, m["info"]) for m in meta]
        for key in f.keys():
            i, name = key.split(".", 1)
            nets[int(i)].tensors[name] = f.get_tensor(key)
    return nets


def attacker_split(own: list[Net], c: AdaptiveConfig) -> tuple[list[Net], list[Net]]:
    """How the grey-box attacker uses its own clean networks: two thirds (at most as many as the
    gate's reference) to fit its estimate of the reference, the rest to calibrate it."""
    k = min(c.n_reference, max(4, (2 * len(own)) // 3))
    return own[:k], own[k:]


def attacker_reference(detector: str, own: list[Net], c: AdaptiveConfig, base: dict):
    """The grey-box attacker's estimate of the gate's reference (:func:`attacker_split`)."""
    return fit_reference(detector, *attacker_split(own, c), base)


def works(n: Net, clean_accuracy: float) -> bool:
    """Attack success ≥ 0.9 with clean accuracy within a point of clean networks'."""
    asr = n.info.get("attack_success_rate")
    # an identity swap misclassifies the impostor's clean faces by design: judge the others
    acc = (
        n.info.get("clean_accuracy_others", n.info["clean_accuracy"])
        if n.info.get("swap")
        else n.info["clean_accuracy"]
    )
    return asr is not None and asr >= WORKS_ASR and acc >= clean_accuracy - WORKS_ACC_DROP


def run_adaptive(
    out: str | Path,
    c: AdaptiveConfig = AdaptiveConfig(),
    log=print,
    rescore: bool = False,
    base: dict | None = None,
    resume: bool = False,
) -> dict:
    """Train (or reload) the suite's networks, attack each deciding detector, gate everything.

    ``rescore``: keep the networks an earlier run saved in ``out`` that do not depend on a
    detector; the penalised ones are always trained again against the detectors given.
    ``resume``: keep every network saved in ``out`` and train only those it lacks (an attack
    added since, or a run stopped while training the penalised ones)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ws = Workshop(c, log, base)
    stored = out / "networks.safetensors"
    if (rescore or resume) and stored.is_file():
        kept = load_nets(stored)
        fixed = [n for n in kept if not n.group.startswith(LATER)]
        if resume:
            ws.kept = {(n.group, n.seed): n for n in kept if n.group.startswith(LATER)}
            log(f"resume: {len(kept)} networks kept from {stored}; only networks it lacks are trained")
    else:
        fixed = clean_networks(ws, c)
        fixed += attacked_networks(ws, c, fixed)
        save_nets(stored, fixed)  # a detector that fails below keeps these
    by = lambda g: [n for n in fixed if n.group == g]  # noqa: E731
    detectors = (*c.detectors, *c.evidence)
    refs = {d: fit_reference(d, by("reference"), by("calibration"), ws.base) for d in detectors}
    own = by("grey-box attacker's own")
    grey = {d: attacker_reference(d, own, c, ws.base) for d in c.detectors}
    nets = fixed + penalised_networks(ws, c, refs, grey)
    save_nets(stored, nets)
    nets += adversarial_networks(ws, c, grey, own, by("calibration"), out / "triggers")
    save_nets(stored, nets)
    nets += margin_aimed_networks(ws, c, refs, grey, own, by("calibration"), out / "triggers")
    save_nets(stored, nets)
    clean_acc = float(np.mean([n.info["clean_accuracy"] for n in by("reference") + by("calibration")]))
    scores = {d: [refs[d].score(n.tensors) for n in nets] for d in detectors}
    verdicts = {d: [refs[d].decide(s).verdict for s in scores[d]] for d in detectors}
    rows = []
    for g in dict.fromkeys(
        n.group for n in nets if n.group not in ("reference", "calibration", "grey-box attacker's own")
    ):
        idx = [i for i, n in enumerate(nets) if n.group == g]
        attack = "attack_success_rate" in nets[idx[0]].info
        ok = [i for i in idx if works(nets[i], clean_acc)] if attack else idx
        row = {
            "group": g,
            "knowledge": nets[idx[0]].info.get("knowledge", ""),
            "n": len(idx),
            "works": len(ok) if attack else None,
            "attack_success": _mean([nets[i].info.get("attack_success_rate") for i in idx]),
            "clean_accuracy": _mean([nets[i].info["clean_accuracy"] for i in idx]),
            "weights_moved": _mean([_moved(nets[i], ws.base) for i in idx]),
            "posthoc_change": _mean([nets[i].info.get("head_moved") for i in idx]),
            "passed": {d: sum(verdicts[d][i] == PASSED for i in ok) for d in detectors},
            "blocked_all": {d: sum(verdicts[d][i] != PASSED for i in idx) for d in detectors},
        }
        rows.append(row)
    summary = {
        "config": dataclasses.asdict(c),
        "clean_accuracy": clean_acc,
        "thresholds": {d: refs[d].thresholds_ for d in detectors},
        "rows": rows,
        "networks": [
            {
                "group": n.group,
                "seed": n.seed,
                **n.info,
                "verdicts": {d: verdicts[d][i] for d in detectors},
                "scores": {d: min(scores[d][i].values()) for d in detectors},
            }
            for i, n in enumerate(nets)
        ],
        "seconds": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
    (out / "table.md").write_text(table(summary, detectors))
    return summary


def _moved(n: Net, base: dict) -> float:
    """‖last_linear − base‖ / ‖base‖: how far the fine-tuned layer left the pretrained one."""
    W0 = base["last_linear.weight"].double()
    return float(torch.linalg.norm(n.tensors["last_linear.weight"].double() - W0) / torch.linalg.norm(W0))


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    return str(x)


def table(s: dict, detectors: Sequence[str]) -> str:
    """Markdown: per attack, its cost and how many *working* attacks each detector passed."""
    head = (
        "| attack | knowledge | n | works | attack success | clean acc. | last_linear moved | post-hoc change | "
        + " | ".join(f"{d}: passed (of working) / blocked (of all)" for d in detectors)
    )
    lines = [head + " |", "|" + "---|" * (8 + len(detectors))]
    for r in s["rows"]:
        f = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
        works = "—" if r["works"] is None else str(r["works"])
        cells = [
            f"{r['passed'][d]}/{r['works']} · {r['blocked_all'][d]}/{r['n']}"
            if r["works"] is not None
            else f"blocked {r['blocked_all'][d]}/{r['n']}"
            for d in detectors
        ]
        lines.append(
            f"| {r['group']} | {r['knowledge']} | {r['n']} | {works} | {f(r['attack_success'])} | "
            f"{f(r['clean_accuracy'])} | {f(r['weights_moved'])} | {f(r['posthoc_change'])} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + f"\n\nclean accuracy of the reference's recipe: {s['clean_accuracy']:.3f}\n"
