"""The library's subcommands: ``reference fit``, ``score``, ``evaluate`` (``bench``: :mod:`lab.bench`).

Exit codes (``score``): 0 every checkpoint passed, 1 some were blocked, 2 some were invalid
or the reference itself could not be used. Machine output (``--json``) goes to stdout,
progress and human messages to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from detector.config import (
    DEFAULT_DETECTOR,
    DEFAULT_EVIDENCE,
    DETECTORS,
    GALLERY_DETECTORS,
    PAPER_GRID,
    WEIGHTS_ONLY_DETECTOR,
    ReferenceConfig,
)
from detector.decision import BLOCKED, EXIT_CODES, PASSED, judge
from detector.errors import DetectorError
from detector.margins import DEFAULT_FACES, DEFAULT_SOURCES


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=True if quiet else None, leave=False)


def _err(msg: str) -> None:
    print(f"backdoor-gate: {msg}", file=sys.stderr)


def _csv(kind):
    return lambda s: tuple(kind(x) for x in s.split(",") if x.strip())


def _config_from_args(args) -> ReferenceConfig:
    base = ReferenceConfig.from_yaml(args.config) if args.config else ReferenceConfig()
    return base.replace(
        layer=args.layer,
        views=args.views,
        components=args.components,
        covariance=args.covariance,
        criterion=args.criterion,
        variance=args.variance,
        grid=args.grid,
        frr=args.frr,
        seed=args.seed,
        reg_covar=args.reg_covar,
        max_iter=args.max_iter,
    )


# -- reference fit -------------------------------------------------------------------------
def cmd_reference_fit(args) -> int:
    from detector.detectors import make_reference, reads_gallery

    try:
        config = _config_from_args(args)
    except (ValueError, OSError) as e:
        _err(f"bad reference settings: {e}")
        return 2
    if Path(args.out).exists() and not args.overwrite:
        _err(f"{args.out} exists; choose a new --out or add --overwrite")
        return 2
    quiet = args.json
    if args.gallery and not reads_gallery(args.detector, args.evidence):
        _err(
            f"--gallery is for a detector that reads margins (e.g. {GALLERY_DETECTORS[-1]}); {args.detector} reads none"
        )
        return 2
    if reads_gallery(args.detector, args.evidence) and not args.gallery:
        _err(
            f"{args.detector} judges the networks on a secret face gallery: give --gallery FACE_DIR (a folder "
            f"of the networks' identities, one subfolder each), or --detector {WEIGHTS_ONLY_DETECTOR} for the "
            "weights-only gate (weaker against an informed attacker: see the README)"
        )
        return 2
    try:
        gallery = _gallery(args, quiet) if args.gallery else None
        ref = make_reference(args.detector, config, evidence=args.evidence, gallery=gallery)
        with _progress(len(args.checkpoints), "loading reference networks", quiet) as bar:
            ref.fit(args.checkpoints, progress=lambda _: bar.update(), base=args.base)
        with _progress(len(args.calibrate or []) or ref.n_reference_, "calibrating threshold", quiet) as bar:
            ref.calibrate(args.calibrate or None, progress=lambda _: bar.update())
        digest = ref.save(args.out, overwrite=args.overwrite)
        if not ref.trunk_digests_:
            _err(
                "warning: the reference networks hold no frozen trunk and no --base was given: this reference "
                "passes no candidate (every verdict is 'error'); fit it on whole networks"
            )
    except DetectorError as e:
        _err(str(e))
        return 2
    except (ValueError, OSError) as e:
        _err(f"cannot fit the reference: {e}")
        return 2
    summary: dict[str, Any] = {
        "artifact": str(args.out),
        "artifact_sha256": digest,
        "detector": ref.detector,
        "evidence": list(getattr(ref, "evidence_members", ())),
        "layer": ref.config.layer,
        "n_reference": ref.n_reference_,
        "threshold_source": ref.threshold_source_,
        "trunk_tensors_recorded": len(ref.trunk_digests_),
        "frr_target": config.frr,
        "frr_empirical": ref.frr_empirical_,
        "frr_upper_95": ref.frr_upper_95_,
        "n_calibration": ref.n_calibration_,
        "calibration_warning": ref.calibration_warning_,
        "views": {
            v: {
                "pca_dims": getattr(est, "n_pca_", None),
                "n_components": getattr(est, "n_components_", None),
                "threshold": ref.thresholds_[v],
                "fit_seconds": round(getattr(est, "fit_seconds_", 0.0), 3),
            }
            for v, est in ref.views_.items()
        },
    }
    if ref.calibration_warning_:
        _err(f"warning: {ref.calibration_warning_}")
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{summary['detector']} reference written to {args.out} (sha256 {digest[:16]}…), {ref.n_reference_} "
            "clean networks"
        )
        for v, s in summary["views"].items():
            shape = f"PCA dims {s['pca_dims']:4d}  N_G {s['n_components']:5d}  " if s["pca_dims"] is not None else ""
            print(
                f"  {v:8s} {shape}threshold {s['threshold']:.6g}"
                f"  ({ref.threshold_source_}, FRR {ref.frr_empirical_[v]:.3f} at target {config.frr})"
            )
        print(
            f"  combined FRR {ref.frr_empirical_['combined']:.3f} on {ref.n_calibration_} calibration networks"
            f" (95 % upper bound {ref.frr_upper_95_:.3f})"
            + (f"; evidence: {', '.join(summary['evidence'])}" if summary["evidence"] else "")
        )
    return 0


def _gallery(args, quiet: bool):
    """The margins detector's secret gallery (:func:`components.trainer.features.gallery_of`),
    through the frozen trunk of ``--base`` or else of the first reference network."""
    from components.trainer.features import gallery_of

    with _progress(args.gallery_people * args.gallery_faces, "gallery faces through the trunk", quiet) as bar:

        def total(n: int) -> None:  # a folder of fewer people than --gallery-people
            bar.total = n
            bar.refresh()

        return gallery_of(
            args.gallery,
            args.base or args.checkpoints[0],
            people=args.gallery_people,
            faces=args.gallery_faces,
            image_size=args.gallery_image_size,
            progress=bar.update,
            total=total,
        )


# -- score ---------------------------------------------------------------------------------
def _load_reference(path):
    from detector.detectors import load_reference

    return load_reference(path)


def score_checkpoint(ref, path: str) -> dict[str, Any]:
    """The contract of one ``score`` line: :func:`detector.decision.judge`, never raises for a bad candidate."""
    record: dict[str, Any] = {
        "checkpoint": str(path),
        "sha256": None,
        "scores": {},
        "thresholds": dict(ref.thresholds_),
        "trunk": None,
    }
    j = judge(ref, lambda: path)
    record.update(verdict=j.decision.verdict, reason=j.decision.reason)
    a = j.assessment
    if a is not None:
        record.update(sha256=a.sha256, scores=a.scores, trunk=a.trunk.status)
        if a.evidence.scores:
            record["evidence_scores"] = dict(a.evidence.scores)
        suspect = a.evidence.suspect
        if a.decision.verdict == BLOCKED and suspect is not None:
            record["suspected_class"] = suspect.suspected_class
            record["suspected_class_evidence"] = {
                k: getattr(suspect, k) for k in ("suspected_index", "suspected_z", "runner_up_z", "median_z")
            }
    return record


def cmd_score(args) -> int:
    try:
        ref = _load_reference(args.reference)
    except DetectorError as e:
        _err(str(e))
        return 2
    worst = PASSED
    records = []
    with _progress(len(args.checkpoints), "scoring", args.json) as bar:
        for path in args.checkpoints:
            rec = score_checkpoint(ref, path)
            records.append(rec)
            if EXIT_CODES[rec["verdict"]] > EXIT_CODES[worst]:
                worst = rec["verdict"]
            if args.json:
                print(json.dumps(rec), flush=True)
            bar.update()
    if not args.json:
        views = list(ref.thresholds_)
        print("verdict  " + "  ".join(f"{v + ' score':>16s}" for v in views) + "  checkpoint / reason")
        for r in records:
            cells = "  ".join(f"{r['scores'][v]:16.6g}" if v in r["scores"] else f"{'-':>16s}" for v in views)
            print(f"{r['verdict']:7s}  {cells}  {r['checkpoint']}: {r['reason']}")
        print(
            "thresholds: "
            + ", ".join(f"{v} {t:.6g}" for v, t in ref.thresholds_.items())
            + " (blocked if any view is below)"
        )
    return EXIT_CODES[worst]


# -- evaluate ------------------------------------------------------------------------------
def _evaluation_reference(args):
    """A saved artifact (``--reference``; with ``--detector``, the artifact's deciding rule or one of
    its members by name), or the named detector fitted here (``--fit``)."""
    from detector.detectors import make_reference

    if args.reference:
        ref = _load_reference(args.reference)
        held = ref.held_detectors()
        if args.detector and args.detector not in held:
            raise ValueError(
                f"{args.reference} holds a {ref.detector} reference; --detector may name "
                f"{', '.join(sorted(held))}, not {args.detector}"
            )
        return held[args.detector] if args.detector else ref
    ref = make_reference(args.detector or "gmm", _config_from_args(args))
    ref.fit(args.fit, base=args.base)
    return ref.calibrate(args.calibrate or None)


def cmd_evaluate(args) -> int:
    from detector.evaluation import roc_auc
    from detector.threshold import rejection_rate

    try:
        ref = _evaluation_reference(args)
        groups: dict[str, list[dict[str, float]]] = {}
        with _progress(len(args.clean) + len(args.backdoored), "scoring", args.json) as bar:
            for name, paths in (("clean", args.clean), ("backdoored", args.backdoored)):
                groups[name] = []
                for p in paths:
                    groups[name].append(ref.score(p))
                    bar.update()
    except DetectorError as e:
        _err(f"{e} (evaluate needs every checkpoint to be scorable)")
        return 2
    except ValueError as e:
        _err(f"cannot evaluate: {e}" if args.reference else f"cannot build the {args.detector or 'gmm'} reference: {e}")
        return 2
    result: dict[str, Any] = {"detector": ref.detector, "auc": {}, "detection_rate": {}, "false_rejection_rate": {}}
    for v, t in ref.thresholds_.items():
        c = [s[v] for s in groups["clean"]]
        b = [s[v] for s in groups["backdoored"]]
        result["auc"][v] = roc_auc(c, b)
        result["detection_rate"][v] = rejection_rate(b, t)
        result["false_rejection_rate"][v] = rejection_rate(c, t)
    blocked = {k: [ref.decide(s).verdict == BLOCKED for s in g] for k, g in groups.items()}
    result["detection_rate"]["combined"] = sum(blocked["backdoored"]) / len(blocked["backdoored"])
    result["false_rejection_rate"]["combined"] = sum(blocked["clean"]) / len(blocked["clean"])
    result["n_clean"], result["n_backdoored"] = len(args.clean), len(args.backdoored)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{ref.detector}: {result['n_clean']} clean vs {result['n_backdoored']} backdoored networks")
        for v in ref.thresholds_:
            print(
                f"  {v:8s} AUC {result['auc'][v]:.3f}   at threshold: detected {result['detection_rate'][v]:.2f},"
                f" clean blocked {result['false_rejection_rate'][v]:.2f}"
            )
        print(
            f"  combined (any view below): detected {result['detection_rate']['combined']:.2f},"
            f" clean blocked {result['false_rejection_rate']['combined']:.2f}"
        )
    return 0


def _reference_flags(p) -> None:
    """The settings of :class:`ReferenceConfig`, for every command that fits a reference."""
    p.add_argument("--config", help="YAML file of reference settings (flags override it)")
    p.add_argument("--layer", help="tensor name (default last_linear.weight; logits.weight for trojan-signature)")
    p.add_argument("--views", type=_csv(str), help="comma list: forward,backward")
    p.add_argument(
        "--components",
        help="GMM size N_G: 'neurons' (default: one per neuron, the paper's and AIC's choice), "
        "'auto' (choose by AIC over --grid: minutes) or a number",
    )
    p.add_argument(
        "--grid", type=_csv(int), help=f"N_G grid for auto (default the paper's {','.join(map(str, PAPER_GRID))})"
    )
    p.add_argument("--criterion", choices=["aic", "bic"])
    p.add_argument("--covariance", choices=["full", "diag"])
    p.add_argument("--variance", type=float, help="PCA variance to keep (default 0.95)")
    p.add_argument("--reg-covar", type=float, help="covariance regularisation, relative to the data variance")
    p.add_argument("--max-iter", type=int, help="EM iterations at most")
    p.add_argument("--frr", type=float, help="target false-rejection rate (default 0.05)")
    p.add_argument("--seed", type=int)


def register(sub) -> None:
    ref = sub.add_parser("reference", help="build the reference of clean networks")
    ref_sub = ref.add_subparsers(dest="reference_command", metavar="ACTION", required=True)
    fit = ref_sub.add_parser(
        "fit",
        help="fit the reference (default detector and evidence) on clean networks and calibrate thresholds",
        description="Fit the reference on clean CKPTs. Put the CKPTs before --calibrate, "
        "e.g. `reference fit --out REF ref/*.pt --calibrate heldout/*.pt`.",
    )
    fit.add_argument("checkpoints", nargs="+", metavar="CKPT", help="clean reference networks")
    fit.add_argument("--out", required=True, help="artifact directory to create")
    fit.add_argument(
        "--detector",
        choices=DETECTORS + GALLERY_DETECTORS,
        default=DEFAULT_DETECTOR,
        help=f"deciding detector (default {DEFAULT_DETECTOR}, chosen on held-out evidence; gmm = the paper's mode)",
    )
    fit.add_argument(
        "--evidence",
        type=_csv(str),
        default=DEFAULT_EVIDENCE,
        help="comma list of detectors scored beside it as evidence, never deciding (default "
        f"{','.join(DEFAULT_EVIDENCE)}; '' for none)",
    )
    _reference_flags(fit)
    fit.add_argument("--calibrate", nargs="+", metavar="CLEAN_CKPT", help="held-out clean networks for the threshold")
    fit.add_argument(
        "--base", metavar="BASE_CKPT", help="the network fine-tuning started from: enables the frozen-trunk check"
    )
    fit.add_argument(
        "--gallery",
        metavar="FACE_DIR",
        help="a face folder of the networks' identities (required by the default detector, which reads margins); "
        "a random draw of it is kept, secret, in the artifact",
    )
    fit.add_argument("--gallery-people", type=int, default=DEFAULT_SOURCES, help="people kept (default %(default)s)")
    fit.add_argument("--gallery-faces", type=int, default=DEFAULT_FACES, help="faces per person (default %(default)s)")
    fit.add_argument("--gallery-image-size", type=int, default=96, help="pixels the trunk sees (default %(default)s)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    fit.add_argument("--json", action="store_true", help="one JSON summary on stdout, no progress")
    fit.set_defaults(func=cmd_reference_fit)

    sc = sub.add_parser("score", help="score checkpoints against a reference (exit 0 pass, 1 block, 2 invalid)")
    sc.add_argument("checkpoints", nargs="+", metavar="CKPT")
    sc.add_argument("--reference", required=True, metavar="REF_DIR")
    sc.add_argument("--json", action="store_true", help="one JSON line per checkpoint")
    sc.set_defaults(func=cmd_score)

    ev = sub.add_parser(
        "evaluate",
        help="ROC AUC per view of clean vs backdoored networks",
        description="Score clean and backdoored networks with a saved reference (--reference) or with a "
        "detector fitted here on clean networks (--detector NAME --fit CKPT...), e.g. to compare a baseline.",
    )
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--reference", metavar="REF_DIR", help="a reference artifact made by `reference fit`")
    src.add_argument("--fit", nargs="+", metavar="CKPT", help="clean reference networks to fit --detector on")
    ev.add_argument(
        "--detector",
        choices=DETECTORS,
        help=f"with --fit: gmm (default), or any of {', '.join(DETECTORS[1:])}; with --reference: the artifact's "
        "detector (default) or a member of it (e.g. gmm, the evidence of the default artifact)",
    )
    ev.add_argument(
        "--calibrate", nargs="+", metavar="CLEAN_CKPT", help="with --fit: held-out clean networks for the threshold"
    )
    ev.add_argument("--base", metavar="BASE_CKPT", help="with --fit: the base network (needed by distance-base)")
    _reference_flags(ev)
    ev.add_argument("--clean", nargs="+", required=True, metavar="CKPT")
    ev.add_argument("--backdoored", nargs="+", required=True, metavar="CKPT")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)
