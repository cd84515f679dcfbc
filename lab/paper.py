"""``backdoor-gate paper``: the paper's protocol end to end on this machine, with controls.

M clean reference networks, held-out clean networks, a "triggers" set (trigger type and size
vary) and a "locations" set (placement varies), each backdoored network with a fresh random
impostor/victim pair; the reference is fitted with AIC; AUC per view per set. Beyond the paper,
every detector of :mod:`detector.baselines` is scored on exactly the same networks, and
controls answer what a platform team asks before trusting the gate:

* ``weighting`` — clean networks trained like the reference (fresh seeds, never calibrated
  on): the real FRR;
* ``sham`` — clean networks given the impostor's *clean* training images again under their own
  label (same extra samples, steps and weighting as a backdoor; no trigger, no relabel): tells
  "detects backdoors" from "detects a data change";
* ``drift:*`` — clean networks with a changed recipe (lr ×0.5 / ×2, twice the epochs, a
  different 70/30 resample, 10 % of the training images dropped): will legitimate retrains
  be blocked?
* ``failed-backdoor`` — poisoned networks whose attack success is < 0.5: reported on their
  own, never counted as detected (nor as missed) backdoors;
* attack-strength curves (trigger size, blend alpha, poisoned images) — AUC of every detector
  against attack success: where "every backdoor that works is caught" stops being true.

Also AUC vs N_G (the paper's fig. 4), AUC vs M (how many clean networks are enough), the t-SNE
of fig. 3b, how often the suspected class is the true victim, and one detection table (AUC per
working backdoor group and detector part) from which the gate's default was chosen. The
development protocol is the default; ``PaperConfig.confirmation()`` is the held-back one (other
data seed, other people, other trigger settings and network seeds). All networks share one
feature cache, so each costs seconds; their head tensors are saved (``networks.safetensors``) so
``--rescore`` can score them again without training.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from components.trainer.triggers import TriggerSpec
from detector.config import DETECTORS, ReferenceConfig
from detector.decision import PASSED
from detector.head import HEAD_TENSORS
from lab.paper_report import BACKDOOR_SETS, _plots, table, tsne_plot

C = TypeVar("C")

TRIGGERS_SET = (
    ("white-square", 0.15),
    ("white-square", 0.25),
    ("checkerboard", 0.15),
    ("checkerboard", 0.25),
    ("flower", 0.2),
    ("flower", 0.3),
    ("eyebrow", 0.25),
    ("eyebrow", 0.35),
    ("white-square", 0.2),
    ("checkerboard", 0.2),
    ("flower", 0.25),
)
LOCATIONS_SET = (
    "forehead",
    "left-eye",
    "right-eye",
    "cheek",
    "nose",
    "mouth",
    "chin",
    "centre",
    "top-left",
    "top-right",
    "bottom-left",
)
#: Attack-strength axes, each varied alone from the point (white-square, 0.2, alpha 1, all images).
STRENGTH = (
    ("trigger_size", (0.02, 0.05, 0.1, 0.2, 0.3)),
    ("alpha", (1.0, 0.6, 0.4, 0.2, 0.1, 0.05)),
    ("poison_images", (0, 8, 4, 2, 1)),  # 0 = all of the impostor's training images
)
#: Clean recipes a legitimate retrain might use (TrainConfig changes).
DRIFT = (
    ("lr x0.5", {"lr": 0.5}),
    ("lr x2", {"lr": 2.0}),
    ("epochs x2", {"epochs": 2.0}),
    ("resample", {"split_salt": 7919}),
    ("drop 10%", {"drop_frac": 0.1}),
)
#: Attack success below this: the backdoor failed (own group, never a detection).
FAILED_BELOW = 0.5
#: A backdoor "counts" (paper's bar): attack success >= 0.9, clean accuracy within 2 points.
COUNTS_ASR, COUNTS_ACC_DROP = 0.9, 0.02
#: Variants measured beside the detectors, to choose their settings on the development protocol.
VARIANTS = (
    "classifier:mad",
    "classifier:max",
    "classifier:none",
    "classifier:pooled",
    "spectrum:top1",
    "spectrum:ratio",
    "head+spectrum",
)


@dataclass(frozen=True)
class PaperConfig:
    identities: int = 40
    images_per_identity: int = 40
    image_size: int = 160
    data_seed: int = 0
    #: identities are numbered from here (the confirmation protocol uses people never seen)
    first_identity: int = 0
    #: added to every network's seed (the confirmation protocol trains fresh networks)
    seed_offset: int = 0
    n_reference: int = 18
    #: clean networks the thresholds are calibrated on ("held-out" group)
    n_heldout: int = 20
    triggers: tuple = TRIGGERS_SET
    trigger_location: str = "forehead"
    locations: tuple = LOCATIONS_SET
    location_trigger: tuple = ("white-square", 0.2)
    trunk_input_size: int = 96
    #: clean networks of the reference's recipe never used for fitting or calibration: the real FRR
    n_weighting: int = 20
    #: sham control: impostor's clean images appended under their own label (no trigger, no relabel)
    n_sham: int = 6
    n_drift: int = 3  # networks per drift recipe
    strength: tuple = STRENGTH
    n_strength: int = 4  # networks per strength point
    m_grid: tuple = (2, 4, 8, 12, 18)
    detectors: tuple = DETECTORS + VARIANTS
    #: the paper's procedure: N_G chosen by AIC (the product's default fits one Gaussian per neuron)
    reference: dict = field(
        default_factory=lambda: {"components": "auto", "grid": [1, 2, 5, 10, 20, 50, 100, 200, 512, 1000, 1792]}
    )
    curves: bool = True  # AUC vs N_G and vs M (the GMM refitted ~15 times: minutes)
    tsne: bool = True  # the paper's fig. 3b
    tsne_per_network: int = 300  # input features per network in the t-SNE (its cost grows with their count)

    @classmethod
    def confirmation(cls, **changes) -> PaperConfig:
        """The held-back protocol: another data seed, other people, trigger settings and seeds
        never looked at while the default detector was chosen."""
        base = dict(
            data_seed=1,
            first_identity=5000,
            seed_offset=500_000,
            triggers=(
                ("white-square", 0.12),
                ("checkerboard", 0.18),
                ("flower", 0.22),
                ("eyebrow", 0.3),
                ("white-square", 0.3),
                ("checkerboard", 0.3),
                ("flower", 0.15),
                ("eyebrow", 0.2),
                ("white-square", 0.18),
                ("checkerboard", 0.22),
                ("flower", 0.35),
            ),
            trigger_location="left-eye",
            locations=(
                "forehead",
                "right-eye",
                "cheek",
                "nose",
                "mouth",
                "chin",
                "centre",
                "top-left",
                "bottom-right",
                "left-eye",
                "top-right",
            ),
            location_trigger=("checkerboard", 0.2),
            strength=(
                ("trigger_size", (0.02, 0.04, 0.08)),
                ("alpha", (0.05, 0.08, 0.15)),
                ("poison_images", (2, 3, 4, 6, 8)),
            ),
            curves=False,
            tsne=False,
        )
        return cls(**{**base, **changes})

    @classmethod
    def small(cls) -> PaperConfig:
        """For tests: a few networks, a small grid."""
        return cls(
            identities=10,
            images_per_identity=20,
            image_size=96,
            n_reference=5,
            n_heldout=4,
            triggers=(("white-square", 0.3), ("checkerboard", 0.3), ("flower", 0.3)),
            locations=("forehead", "centre", "cheek"),
            location_trigger=("white-square", 0.3),
            trunk_input_size=80,
            n_weighting=2,
            n_sham=2,
            n_drift=1,
            n_strength=2,
            strength=(("trigger_size", (0.05, 0.3)), ("alpha", (1.0, 0.2)), ("poison_images", (0, 1))),
            m_grid=(2, 5),
            tsne_per_network=60,
            reference={"components": "auto", "grid": [1, 2, 5]},
            detectors=DETECTORS,
        )


# -- bookkeeping (pure, tested) ---------------------------------------------------------------
def backdoor_status(network: dict, clean_accuracy: float) -> str:
    """``counts`` (the paper's bar), ``weak`` (works partly) or ``failed`` (attack success < 0.5)."""
    asr = network["attack_success_rate"]
    if not asr >= FAILED_BELOW:  # NaN (no triggered test image) is a failure too
        return "failed"
    if asr >= COUNTS_ASR and network["clean_accuracy"] >= clean_accuracy - COUNTS_ACC_DROP:
        return "counts"
    return "weak"


def detection_groups(networks: list[dict]) -> dict[str, list[int]]:
    """Indices per group; failed backdoors are their own group and in no backdoored set."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(networks):
        key = "failed-backdoor" if n.get("status") == "failed" else n["group"]
        groups.setdefault(key, []).append(i)
    return groups


def _auc(scores: dict[str, np.ndarray], clean: list[int], bad: list[int]) -> dict[str, float] | None:
    from detector.evaluation import roc_auc

    if not bad or not clean:
        return None
    return {k: roc_auc(s[clean], s[bad]) for k, s in scores.items()}


# -- the run --------------------------------------------------------------------------------
def run_config(out: str | Path, cls: type[C]) -> C:
    """The protocol a finished run was made with (``cls``: :class:`PaperConfig` or the adaptive
    suite's config), from its ``summary.json``: a stage or a study over stored networks reads it
    instead of rebuilding it from flags (a confirmation run rescored without its ``--seed-offset``
    would draw other people's faces and other seeds). Fields added since the run take their
    defaults; a field this code does not know is an error."""
    path = Path(out) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a finished run (no summary.json)")
    return _dataclass_from(cls, json.loads(path.read_text())["config"])


def _dataclass_from(cls: Any, data: dict) -> Any:
    """``cls`` from ``asdict`` output read back from JSON: nested dataclasses rebuilt, lists turned
    back into (nested) tuples where the field is declared a tuple."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(unknown)} (a run of other code?)")
    return cls(**{k: _restored(hints[k], v) for k, v in data.items()})


def _restored(hint: Any, value: Any) -> Any:
    if is_dataclass(hint):
        return _dataclass_from(hint, value)
    if hint is tuple or typing.get_origin(hint) is tuple:
        return _deep_tuple(value)
    return value


def _deep_tuple(v: Any) -> Any:
    return tuple(_deep_tuple(x) for x in v) if isinstance(v, list) else v


class _Lab:
    """Data, base trunk and cached features; trains one network per call."""

    def __init__(self, config: PaperConfig, base: dict | None, log):
        from components.trainer.base_trunk import base_state_dict, cache_dir
        from components.trainer.features import cached_features
        from components.trainer.synth import SynthConfig, synthesize

        synth = SynthConfig(
            identities=config.identities,
            images_per_identity=config.images_per_identity,
            size=config.image_size,
            seed=config.data_seed,
            first_identity=config.first_identity,
        )
        first = f"-from{config.first_identity}" if config.first_identity else ""
        self.data = (
            cache_dir()
            / "data"
            / f"paper-{config.identities}x{config.images_per_identity}-{config.image_size}-{config.data_seed}{first}"
        )
        synthesize(self.data, synth)
        self.base = base if base is not None else base_state_dict(None, log=log)
        self.fs = cached_features(self.data, self.base, config.trunk_input_size)
        self.networks: list[dict] = []
        self.weights: list[dict] = []

    def train(
        self,
        group: str,
        seed: int,
        trigger: TriggerSpec | None = None,
        images: int = 0,
        recipe: dict | None = None,
        **tags,
    ):
        from components.trainer.features import with_poison
        from components.trainer.poison import PoisonSpec, poison_folder, random_pair
        from components.trainer.train import TrainConfig, fine_tune

        feats = self.fs
        if trigger is not None:
            imp, vic = random_pair(self.fs.classes, seed)
            with tempfile.TemporaryDirectory() as tmp:
                poison_folder(self.data, tmp, PoisonSpec(imp, vic, trigger, images=images or None), seed)
                feats = with_poison(self.fs, tmp, self.base)
        default = TrainConfig()
        changes = {
            k: (
                v
                if k in ("split_salt", "drop_frac", "sham_copies")
                else type(getattr(default, k))(getattr(default, k) * v)
            )
            for k, v in (recipe or {}).items()
        }
        sd, m = fine_tune(feats, self.base, seed, dataclasses.replace(default, **changes))
        self.networks.append({"group": group, **tags, **{k: v for k, v in m.items() if not k.startswith("train.")}})
        self.weights.append({k: sd[k] for k in HEAD_TENSORS})


def _train_all(lab: _Lab, c: PaperConfig, log) -> None:
    from tqdm import tqdm

    from components.trainer.poison import PoisonSpec

    plan: list[tuple[Any, ...]] = []
    plan += [("reference", s, None, 0, None, {}) for s in range(c.n_reference)]
    plan += [("held-out", 10_000 + s, None, 0, None, {}) for s in range(c.n_heldout)]
    plan += [
        ("triggers", 20_000 + i, TriggerSpec(n, sz, c.trigger_location), 0, None, {})
        for i, (n, sz) in enumerate(c.triggers)
    ]
    plan += [
        ("locations", 30_000 + i, TriggerSpec(c.location_trigger[0], c.location_trigger[1], loc), 0, None, {})
        for i, loc in enumerate(c.locations)
    ]
    plan += [("weighting", 40_000 + s, None, 0, None, {}) for s in range(c.n_weighting)]
    plan += [("sham", 45_000 + s, None, 0, {"sham_copies": PoisonSpec.copies}, {}) for s in range(c.n_sham)]
    for k, (name, recipe) in enumerate(DRIFT):
        plan += [(f"drift:{name}", 50_000 + 100 * k + s, None, 0, recipe, {}) for s in range(c.n_drift)]
    base_point = {"trigger_size": 0.2, "alpha": 1.0, "poison_images": 0}
    points = {tuple(sorted({**base_point, p: v}.items())) for p, values in c.strength for v in values}
    for j, point in enumerate(sorted(points, key=str)):
        d = dict(point)
        trig = TriggerSpec("white-square", d["trigger_size"], c.trigger_location, d["alpha"])
        plan += [
            ("strength", 60_000 + 100 * j + s, trig, d["poison_images"], None, {"strength": d})
            for s in range(c.n_strength)
        ]
    for group, seed, trig, images, recipe, tags in tqdm(plan, desc="training networks", leave=False):
        lab.train(group, c.seed_offset + seed, trig, images, recipe, **tags)
    log(f"trained {len(plan)} networks")


NETWORKS_FILE = "networks.safetensors"


def save_networks(path: Path, nets: list[dict], W: list[dict]) -> None:
    """Every trained network's head tensors and metrics, so detectors can be re-scored without retraining."""
    from safetensors.torch import save_file

    save_file(
        {f"{i}.{k}": v.contiguous() for i, w in enumerate(W) for k, v in w.items()},
        str(path),
        metadata={"networks": json.dumps(nets, default=_jsonable)},
    )


def load_networks(path: Path) -> tuple[list[dict], list[dict]]:
    from detector.weights import read_tensors

    tensors, _ = read_tensors(path)
    nets = json.loads(tensors.metadata["networks"])
    W: list[dict] = [{} for _ in nets]
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        W[int(i)][name] = v
    return nets, W


def _fit_and_score(
    config: PaperConfig, lab: _Lab, ref_idx: list[int], held: list[int], timings: dict[str, float], log
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Every detector fitted on the reference networks, calibrated on the held-out ones, and its
    scores of every network (a fusion's one score under "fused": its parts are not thresholded alone)."""
    from detector.detectors import make_reference, reads_gallery
    from detector.margins import DEFAULT_FACES
    from lab.margins import lab_gallery

    W = lab.weights
    scores: dict[str, dict[str, np.ndarray]] = {}
    refs: dict[str, Any] = {}
    for det in config.detectors:
        t = time.perf_counter()
        # a detector with margins reads the lab's gallery of this protocol's faces (seed 0)
        gallery = lab_gallery(lab.fs, DEFAULT_FACES, seed=0) if reads_gallery(det) else None
        ref = make_reference(det, ReferenceConfig.from_dict(config.reference), gallery=gallery)
        ref.fit([W[i] for i in ref_idx], base=lab.base).calibrate([W[i] for i in held])
        per_net = [ref.score(w) for w in W]
        scores[det] = {k: np.array([s[k] for s in per_net]) for k in ref.thresholds_}
        if hasattr(ref, "fused") and len(ref.thresholds_) > 1:
            scores[det] = {"fused": np.array([ref.fused(s) for s in per_net]), **scores[det]}
        refs[det] = ref
        timings[f"fit_and_score_{det}_s"] = time.perf_counter() - t
        log(f"{det}: fitted and scored in {timings[f'fit_and_score_{det}_s']:.0f} s")
    return refs, scores


def run_paper(
    out: str | Path, config: PaperConfig = PaperConfig(), base: dict | None = None, log=print, rescore: bool = False
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    lab = _Lab(config, base, log)
    timings["data_and_features_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    if rescore:  # the networks of an earlier run of the same protocol: only the detectors run again
        lab.networks, lab.weights = load_networks(out / NETWORKS_FILE)
        log(f"re-scoring {len(lab.networks)} networks from {out / NETWORKS_FILE}")
    else:
        _train_all(lab, config, log)
        save_networks(out / NETWORKS_FILE, lab.networks, lab.weights)
    timings["training_s"] = time.perf_counter() - t
    nets, W = lab.networks, lab.weights
    clean_acc = float(np.mean([n["clean_accuracy"] for n in nets if n["group"] in ("reference", "held-out")]))
    for n in nets:
        if "attack_success_rate" in n:
            n["status"] = backdoor_status(n, clean_acc)
    groups = detection_groups(nets)
    ref_idx, held = groups["reference"], groups["held-out"]

    refs, scores = _fit_and_score(config, lab, ref_idx, held, timings, log)
    gmm = refs["gmm"] if "gmm" in refs else next(iter(refs.values()))

    def is_blocked(det: str, i: int) -> bool:
        return refs[det].decide({k: float(s[i]) for k, s in scores[det].items()}).verdict != PASSED

    def blocked(det: str, idx: list[int]) -> float:
        return float(np.mean([is_blocked(det, i) for i in idx]))

    # AUC against every clean network of the reference's recipe that was not fitted on
    # (calibration + fresh test networks): threshold-free, so using the calibration ones is fair
    clean_eval = held + groups.get("weighting", [])

    def auc_scores(det: str) -> dict[str, np.ndarray]:
        return {"fused": scores[det]["fused"]} if "fused" in scores[det] else scores[det]

    baselines = {
        det: {s: _auc(auc_scores(det), clean_eval, groups.get(s, [])) for s in BACKDOOR_SETS if groups.get(s)}
        for det in config.detectors
    }
    counted = {s: [i for i in groups.get(s, []) if nets[i]["status"] == "counts"] for s in BACKDOOR_SETS}
    control_names = (
        ["held-out", "weighting", "sham"]
        + [g for g in groups if g.startswith("drift:")]
        + ["failed-backdoor", *BACKDOOR_SETS, "strength"]
    )
    drift_all = [i for g, idx in groups.items() if g.startswith("drift:") for i in idx]
    controls = {
        name: {"n": len(groups[name]), "blocked": blocked(gmm.detector, groups[name])}
        for name in control_names
        if groups.get(name)
    }
    if drift_all:
        controls["drift (all)"] = {"n": len(drift_all), "blocked": blocked(gmm.detector, drift_all)}
    controls_by_detector = {
        det: {
            **{name: blocked(det, groups[name]) for name in control_names if groups.get(name)},
            **({"drift (all)": blocked(det, drift_all)} if drift_all else {}),
        }
        for det in config.detectors
    }

    strength = []
    for param, values in config.strength:
        for v in values:
            at = [
                i
                for i, n in enumerate(nets)
                if n["group"] == "strength"
                and n["strength"][param] == v
                and all(
                    nets[i]["strength"][p] == d
                    for p, d in (("trigger_size", 0.2), ("alpha", 1.0), ("poison_images", 0))
                    if p != param
                )
            ]
            ok = [i for i in at if nets[i]["status"] != "failed"]
            strength.append(
                {
                    "param": param,
                    "value": v,
                    "n": len(at),
                    "n_failed": len(at) - len(ok),
                    "attack_success": float(np.mean([nets[i]["attack_success_rate"] for i in at])),
                    "auc": {det: _auc(auc_scores(det), clean_eval, ok) for det in config.detectors},
                    "blocked": {det: blocked(det, ok) if ok else None for det in config.detectors},
                }
            )
    victims = _victim_naming(refs, W, nets, lab.fs.classes, is_blocked)
    detection = detection_table(config.detectors, baselines, strength, scores, clean_eval, groups, nets)
    t = time.perf_counter()
    curves = (
        _gmm_curves(gmm, config, W, ref_idx, held, {s: groups.get(s, []) for s in BACKDOOR_SETS})
        if config.curves and gmm.detector == "gmm"
        else {"n_components": [], "m": []}
    )
    timings["curves_s"] = time.perf_counter() - t
    summary = {
        "config": asdict(config),
        "provenance": _provenance(lab.fs.base_sha256),  # the features' own key: hashed once
        "auc": baselines.get("gmm"),
        "auc_counted_backdoors_only": {s: _auc(scores["gmm"], held, idx) for s, idx in counted.items() if idx}
        if "gmm" in scores
        else None,
        "baselines": baselines,
        "controls": controls,
        "controls_by_detector": controls_by_detector,
        "strength": strength,
        "detection": detection,
        "victim_naming": victims,
        "frr_upper_95": {det: getattr(r, "frr_upper_95_", None) for det, r in refs.items()},
        "auc_vs_n_components": curves["n_components"],
        "auc_vs_m": curves["m"],
        "views": {
            v: {"n_components": est.n_components_, "pca_dims": est.n_pca_, "selection": est.selection_}
            for v, est in gmm.views_.items()
        }
        if gmm.detector == "gmm"
        else {},
        "thresholds": gmm.thresholds_,
        "mean_clean_accuracy": clean_acc,
        "backdoor_status": {
            s: {
                k: sum(
                    nets[i]["status"] == k
                    for i in groups.get(s, []) + [j for j in groups.get("failed-backdoor", []) if nets[j]["group"] == s]
                )
                for k in ("counts", "weak", "failed")
            }
            for s in (*BACKDOOR_SETS, "strength")
        },
        "relative_weight_change": {
            "clean": float(np.mean([n["relative_weight_change"] for n in nets if "attack_success_rate" not in n])),
            "backdoored": float(np.mean([n["relative_weight_change"] for n in nets if "attack_success_rate" in n])),
        },
        "networks": nets,
        "timings": {**timings, "total_s": time.perf_counter() - t0},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable) + "\n")
    (out / "table.md").write_text(table(summary))
    if gmm.detector == "gmm":
        _plots(out, summary, gmm, scores, W, groups)
    if config.tsne:
        t = time.perf_counter()
        tsne_plot(out / "tsne.png", W, groups, per_network=config.tsne_per_network)
        summary["timings"]["tsne_s"] = time.perf_counter() - t
    return summary


def _columns(row: dict[str, dict | None]) -> dict[str, float | None]:
    """{detector: {part: auc}} → {column: auc}; a detector with one part is one column."""
    out: dict[str, float | None] = {}
    for det, maybe_parts in row.items():
        parts = maybe_parts or {}
        for part, auc in parts.items():
            out[det if len(parts) == 1 else f"{det}.{part}"] = auc
    return out


def detection_table(detectors, baselines, strength, scores, clean_eval, groups, nets) -> dict:
    """AUC per working backdoor group (sets and strength points) and per detector part."""
    rows: dict[str, dict] = {}
    for name in BACKDOOR_SETS:
        ok = [i for i in groups.get(name, []) if nets[i]["status"] != "failed"]
        if ok:
            rows[name] = {
                "n": len(ok),
                "attack_success": float(np.mean([nets[i]["attack_success_rate"] for i in ok])),
                "auc": _columns({d: baselines[d].get(name) for d in detectors}),
            }
    for p in strength:
        base_point = {"trigger_size": 0.2, "alpha": 1.0, "poison_images": 0}[p["param"]] == p["value"]
        if base_point or p["n"] == p["n_failed"]:
            continue  # the base point (white square 0.2, alpha 1, all images) is the sets' attack
        rows[f"{p['param']} = {p['value']}"] = {
            "n": p["n"] - p["n_failed"],
            "attack_success": p["attack_success"],
            "auc": _columns(p["auc"]),
        }
    working = {k: r for k, r in rows.items() if r["attack_success"] >= COUNTS_ASR}
    columns = sorted(
        {c for r in rows.values() for c in r["auc"]},
        key=lambda c: [c.split(".")[0] in detectors and detectors.index(c.split(".")[0]), c],
    )
    summary = {
        c: {
            "mean": float(np.mean([r["auc"][c] for r in working.values()])) if working else None,
            "min": float(np.min([r["auc"][c] for r in working.values()])) if working else None,
        }
        for c in columns
    }
    return {
        "rows": rows,
        "working": sorted(working),
        "columns": columns,
        "summary": summary,
        "n_clean": len(clean_eval),
    }


def _victim_naming(refs: dict, W: list[dict], nets: list[dict], classes: list[str], is_blocked) -> dict:
    """For detectors that name a suspected class: how often it is the true victim (all backdoors
    that work, and those the detector blocks)."""
    out = {}
    for det, ref in refs.items():
        bad = [i for i, n in enumerate(nets) if "attack_success_rate" in n and n.get("status") != "failed"]
        if not bad:
            continue
        rows = []
        for i in bad:
            suspect = ref.assess(W[i]).evidence.suspect
            if suspect is None:
                break
            rows.append((classes[suspect.suspected_index] == nets[i]["victim"], is_blocked(det, i)))
        else:
            hit = [h for h, _ in rows]
            hit_blocked = [h for h, b in rows if b]
            out[det] = {
                "n": len(rows),
                "correct": float(np.mean(hit)),
                "n_blocked": len(hit_blocked),
                "correct_when_blocked": float(np.mean(hit_blocked)) if hit_blocked else None,
            }
    return out


def _provenance(base_sha256: str) -> dict:
    """What a rerun must match to reproduce the tables: the base trunk is pre-trained on the
    machine (no downloads) and is not bit-identical across CPU types, so record which one it was."""
    from lab.bench import machine

    m = machine()
    return {"base_sha256": base_sha256, **{k: m[k] for k in ("cpu", "torch", "git_commit", "date")}}


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.bool_):
        return bool(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _gmm_curves(
    gmm, config: PaperConfig, W: list[dict], ref_idx: list[int], held: list[int], sets: dict[str, list[int]]
) -> dict:
    """AUC per view vs N_G (fixed, paper fig. 4) and vs M (N_G as chosen by AIC at full M)."""
    from sklearn.base import clone

    from detector.evaluation import roc_auc

    mats = [w["last_linear.weight"].double().numpy() for w in W]
    bad = {s: idx for s, idx in sets.items() if idx}
    res: dict[str, list] = {"n_components": [], "m": []}

    def aucs(est) -> dict:
        sc = np.array([est.score(m) for m in mats])
        return {s: roc_auc(sc[held], sc[idx]) for s, idx in bad.items()}

    for v, est in gmm.views_.items():
        n_vec = est.n_networks_ * est.n_vectors_
        for g in [g for g in gmm.config.grid if g <= n_vec]:
            if g == est.n_components_:
                e = est
            else:
                e = clone(est).set_params(n_components=g).fit([mats[i] for i in ref_idx])
            res["n_components"].append({"view": v, "n_components": g, "auc": aucs(e)})
        for m in [m for m in config.m_grid if 2 <= m <= len(ref_idx)]:
            e = (
                est
                if m == len(ref_idx)
                else clone(est).set_params(n_components=est.n_components_).fit([mats[i] for i in ref_idx[:m]])
            )
            res["m"].append({"view": v, "m": m, "n_components": e.n_components_, "auc": aucs(e)})
    return res
