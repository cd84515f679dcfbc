"""Registry subcommands: ``gate``, ``override``, ``publish-reference``, ``keygen``, ``verify``, ``webhook``,
``explain``, ``access``.

Signatures are required by default everywhere: verdicts need the gate's key, references a
trusted reference key, overrides a reviewer's key. ``--allow-unsigned`` is the explicit opt-out
(for a laptop), and every verdict written under it says ``signature_policy: opted-out``.
"""

from __future__ import annotations

import json
import os
import sys


def _config(args, **kw):
    from components.config import GateConfig

    unsigned = getattr(args, "allow_unsigned", False)
    return GateConfig(require_signature=not unsigned, require_signed_reference=not unsigned, **kw)


def cmd_gate(args) -> int:
    from components.gate import gate
    from components.registry import MlflowRegistry, RegistryError

    reference = None
    if args.reference:
        from components.reference_store import load_trusted_reference
        from detector.errors import InvalidReference

        try:
            reference = load_trusted_reference(args.reference, _config(args))
        except InvalidReference as e:
            print(f"backdoor-gate: {e}", file=sys.stderr)
            return 2
    try:
        registry = MlflowRegistry(args.tracking_uri)
    except RegistryError as e:
        print(f"backdoor-gate: {e}", file=sys.stderr)
        return 2
    config = _config(args, report=not args.no_report)
    result = gate(args.model, args.version, registry=registry, reference=reference, config=config)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(
            f"{result.model} v{result.version}: "
            f"{result.verdict}{' (promoted to production)' if result.promoted else ''}"
        )
        print(f"  reason: {result.reason}")
        for v, s in result.scores.items():
            print(f"  {v:8s} score {s:.6g}  threshold {result.thresholds[v]:.6g}")
        if result.report_uri:
            print(f"  report: {result.report_uri}")
        if result.verdict_sha256:
            print(f"  verdict document sha256 {result.verdict_sha256[:16]}…, signed by {result.signed_by}")
    return result.exit_code


def cmd_override(args) -> int:
    from components.policy import OverrideRefused, override
    from components.registry import MlflowRegistry, RegistryError
    from components.tags import OVERRIDE_BY
    from detector.signing import VerdictError, load_private_key

    try:
        with open(args.key, "rb") as f:
            key = load_private_key(f.read())
        info = override(
            args.model, args.version, reason=args.reason, key=key, registry=MlflowRegistry(args.tracking_uri)
        )
    except (OverrideRefused, RegistryError, ValueError, VerdictError, OSError) as e:
        print(f"backdoor-gate: override refused: {e}", file=sys.stderr)
        return 2
    print(f"{info.name} v{info.version} promoted to production by override ({info.tags.get(OVERRIDE_BY)})")
    return 0


def cmd_publish_reference(args) -> int:
    from components.reference_store import publish_reference
    from components.registry import MlflowRegistry, RegistryError
    from detector.errors import InvalidReference

    try:
        info = publish_reference(MlflowRegistry(args.tracking_uri), args.reference, _config(args))
    except (RegistryError, InvalidReference) as e:
        print(f"backdoor-gate: {e}", file=sys.stderr)
        return 2
    print(f"published {info.name} v{info.version} as @current")
    return 0


def cmd_access_grant(args) -> int:
    """Apply the deployment's MLflow permissions (components/access.py); exit 0 applied and the
    reference is hidden from every named registrant, reviewer and reader, 1 someone of them can
    still read it, 2 could not apply."""
    from components.access import AccessError, AccessPolicy, apply, table

    policy = AccessPolicy(
        gate=args.gate,
        publisher=args.publisher,
        registrants=tuple(args.registrant),
        reviewers=tuple(args.reviewer),
        readers=tuple(args.reader),
        models=tuple(args.model or ("facenet",)),
    )
    try:
        grants = policy.grants()
        if args.dry_run:
            print(table(grants))
            return 0
        changes, problems = apply(policy, args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
    except (AccessError, ValueError) as e:
        print(f"backdoor-gate: {e}", file=sys.stderr)
        return 2
    for line in changes or ["no change: every grant was already in place"]:
        print(line)
    for line in problems:
        print(f"backdoor-gate: {line}", file=sys.stderr)
    return 1 if problems else 0


def cmd_keygen(args) -> int:
    from detector.signing import generate_keypair

    try:
        priv, pub = generate_keypair(args.out)
    except (FileExistsError, OSError) as e:
        print(f"backdoor-gate: {e}", file=sys.stderr)
        return 2
    print(f"signing key (put it in a Secret, mode 0600): {priv}\nverify key (publish it): {pub}")
    return 0


def cmd_verify(args) -> int:
    """May this be deployed? Exit 0 yes (a signed pass, or a signed override, for these exact bytes);
    1 no (a validly signed blocked / invalid verdict: the reason is printed); 2 anything forged,
    tampered, unsigned, malformed or uncheckable."""
    from components.policy import NotDeployable
    from detector.decision import PASSED
    from detector.signing import VerdictError, load_public_key, read_envelope, verify

    try:
        key = load_public_key(args.public_key)
    except (VerdictError, OSError) as e:
        print(f"backdoor-gate: {e}", file=sys.stderr)
        return 2
    try:
        if args.attestation:
            return _verify_attestation(args, key)
        if args.verdict:
            doc = verify(read_envelope(args.verdict), key)
            if not args.checkpoint:
                raise VerdictError("give --checkpoint: a verdict allows nothing until it is checked against the bytes")
            with open(args.checkpoint, "rb") as f:
                verify(read_envelope(args.verdict), key, model_bytes=f.read())
            if doc.get("verdict") != PASSED:
                raise NotDeployable(doc)
        else:
            from components.policy import verify_version
            from components.registry import MlflowRegistry

            doc = verify_version(args.model, args.version, key, registry=MlflowRegistry(args.tracking_uri))
    except NotDeployable as e:
        print(json.dumps({**e.doc, "deployable": False}) if args.json else f"not deployable: {e}")
        print(f"REFUSED: {e}", file=sys.stderr)
        return 1
    except VerdictError as e:
        print(f"INVALID: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 — RegistryError, OSError, anything unexpected: could not check (2)
        print(f"backdoor-gate: cannot verify: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 2
    how = f", override by {doc['override']['reviewer']}" if doc.get("override") else ""
    print(
        json.dumps({**doc, "deployable": True})
        if args.json
        else f"valid: {doc['model']} v{doc['version']} {doc['verdict']}{how} "
        f"(model sha256 {str(doc['model_sha256'])[:12]}…, reference {str(doc['reference_sha256'])[:12]}…, "
        f"{doc['checked_at']})"
    )
    return 0


def _verify_attestation(args, key) -> int:
    """Admission check of an in-toto/DSSE attestation: exit 0 only for a signed pass of these bytes."""
    import hashlib

    from detector.signing import NotAdmitted, VerdictError, admitted, dsse_verify, read_envelope

    if not args.checkpoint:
        print(
            "REFUSED: give --checkpoint: an attestation admits nothing until checked against the bytes", file=sys.stderr
        )
        return 2
    try:
        statement = dsse_verify(read_envelope(args.attestation), [key])
        with open(args.checkpoint, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
    except (VerdictError, OSError, ValueError) as e:
        print(f"INVALID: {e}", file=sys.stderr)
        return 2
    try:
        doc = admitted(statement, sha)
    except VerdictError as e:  # NotAdmitted: a signed refusal (1); anything else, e.g. other bytes (2)
        print(f"REFUSED: {e}", file=sys.stderr)
        return 1 if isinstance(e, NotAdmitted) else 2
    print(json.dumps({**doc, "admitted": True}) if args.json else f"admitted: {doc['model']} v{doc['version']} passed")
    return 0


def cmd_pull(args) -> int:
    """Deploy step: write the weights of MODEL@ALIAS (or a version) to --out only after checking
    those very bytes against the signed records. Exit 0 written; 1 a validly signed refusal;
    2 forged, swapped, unsigned or unreadable (nothing written)."""
    from components.policy import NotDeployable, fetch_deployable
    from components.registry import MlflowRegistry
    from detector.signing import load_public_key

    try:
        key = load_public_key(args.public_key)
        doc = fetch_deployable(args.model, args.ref, args.out, key, registry=MlflowRegistry(args.tracking_uri))
    except NotDeployable as e:
        print(f"REFUSED: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 — forged, swapped, unreadable or unexpected: nothing written (2)
        print(f"REFUSED: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: doc[k] for k in ("model", "version", "verdict", "path", "sha256")}))
    return 0


def cmd_webhook_serve(args) -> int:
    import logging

    from components.gate import gate
    from components.reconciler import Reconciler
    from components.registry import MlflowRegistry
    from components.webhook import SECRET_ENV, Receiver

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        print(f"backdoor-gate: set {SECRET_ENV} (the secret MLflow signs deliveries with)", file=sys.stderr)
        return 2
    config = _config(args)
    registry = MlflowRegistry(args.tracking_uri)
    reconciler = Reconciler(registry, models=tuple(args.models), config=config, interval=args.resync)

    def on_event(model: str) -> str | None:
        return "; ".join(reconciler.reconcile(model)) or None

    receiver = Receiver(
        secret,
        lambda m, v: gate(m, v, registry=registry, config=config),
        models=tuple(args.models),
        host=args.host,
        port=args.port,
        guard_fn=on_event,
        production_alias=config.production_alias,
    )
    print(
        f"listening on {args.host}:{receiver.port}/mlflow-webhook for {', '.join(args.models)}; "
        f"resync every {args.resync:g} s",
        file=sys.stderr,
    )
    reconciler.start()
    try:
        receiver.serve_forever()  # uvicorn: returns on SIGTERM / SIGINT
    finally:
        reconciler.stop()
        receiver.close()
    return 0


def cmd_webhook_register(args) -> int:
    from components.webhook import SECRET_ENV, register_webhook

    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        print(
            f"backdoor-gate: set {SECRET_ENV}; a webhook without a secret would be trusted by no one", file=sys.stderr
        )
        return 2
    try:
        hook = register_webhook(args.tracking_uri, args.url, secret)
    except Exception as e:  # noqa: BLE001 — MLflow raises several types; report one line
        print(f"backdoor-gate: cannot create the webhook: {e}", file=sys.stderr)
        return 2
    print(f"webhook {hook.name} -> {hook.url} (version, alias and tag events)")
    return 0


def cmd_explain(args) -> int:
    """Reconstruct the trigger of a (blocked) version: images in --out, one JSON line with --json."""
    from components.explain import ExplainError, explain, write_outputs
    from components.explain_version import explain_version, suspects_from_file
    from components.registry import MlflowRegistry, RegistryError
    from components.trigger_search import ExplainConfig

    config = ExplainConfig(image_size=args.image_size, controls=args.controls, seed=args.seed)
    progress = not args.json and sys.stderr.isatty()
    victim, impostor = args.victim, args.impostor
    try:
        if args.verdict:
            v, i = suspects_from_file(args.verdict)
            victim, impostor = victim or v, impostor or i
        if args.checkpoint:
            if not victim:
                raise ExplainError("name the suspected victim: --victim NAME or --verdict VERDICT_JSON")
            if not args.faces:
                raise ExplainError("give --faces DIR (the identity folders the network was trained on)")
            result, extra = explain(args.checkpoint, args.faces, victim, impostor, config, progress)
            write_outputs(result, extra, args.out)
            out = result.to_dict()
        elif args.version:
            if not args.faces:
                raise ExplainError("give --faces DIR: the version's run does not record where its training faces are")
            out = explain_version(
                args.model,
                args.version,
                MlflowRegistry(args.tracking_uri),
                args.faces,
                args.out,
                victim=victim,
                impostor=impostor,
                config=config,
                progress=progress,
                log_to_run=not args.no_log,
            )
        else:
            raise ExplainError("give a CHECKPOINT file or --version N (a registered version)")
    except (ExplainError, RegistryError) as e:
        print(f"backdoor-gate explain: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        found = "found" if out["found"] else "NOT found (no patch up to the largest size works)"
        print(
            f"trigger for victim {out['victim']} (impostor {out['impostor'] or 'not named'}): {found}; "
            f"mask {out['mask_size']:.0%} of the width at ({out['mask_centre'][0]:.2f}, {out['mask_centre'][1]:.2f}), "
            f"area {out['mask_area']:.4f}; attack success {out['reconstructed_asr']:.2f} on {out['heldout_faces']} "
            f"held-out faces; smallest patch fires: {'yes' if out['smallest_patch_fires'] else 'no'}; "
            f"anomaly index {out['anomaly_index']:.2f}; {out['seconds']:.0f} s"
        )
        print(f"  images: {args.out}/trigger.png, mask.png, applied.png")
    return 0


def _unsigned_flag(p) -> None:
    p.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="explicit opt-out: gate without a verdict signing key and trust unsigned references "
        "(every verdict records it; never in production)",
    )


def _common(p) -> None:
    p.add_argument("--tracking-uri", help="MLflow server (default $MLFLOW_TRACKING_URI)")


def register(sub) -> None:
    g = sub.add_parser("gate", help="gate one registered version (exit 0 passed, 1 blocked, 2 invalid/error)")
    g.add_argument("--model", default="facenet")
    g.add_argument("--version", required=True)
    g.add_argument("--reference", help="a local reference artifact instead of the registry's @current")
    g.add_argument("--no-report", action="store_true", help="skip the HTML/PNG review report")
    _unsigned_flag(g)
    g.add_argument("--json", action="store_true")
    _common(g)
    g.set_defaults(func=cmd_gate)

    o = sub.add_parser("override", help="promote a blocked version on a reviewer's word (recorded as tags)")
    o.add_argument("--model", default="facenet")
    o.add_argument("--version", required=True)
    o.add_argument("--reason", required=True)
    o.add_argument(
        "--key",
        required=True,
        metavar="PEM",
        help="the reviewer's own Ed25519 signing key; the reviewer's name is the one "
        "$BACKDOOR_GATE_REVIEWER_KEYS gives it",
    )
    _common(o)
    o.set_defaults(func=cmd_override)

    p = sub.add_parser(
        "publish-reference",
        help="sign (reference key from $BACKDOOR_GATE_REFERENCE_SIGNING_KEY[_FILE]), "
        "register a reference artifact and make it @current",
    )
    p.add_argument("reference", metavar="REF_DIR")
    _unsigned_flag(p)
    _common(p)
    p.set_defaults(func=cmd_publish_reference)

    k = sub.add_parser("keygen", help="make the Ed25519 key pair that signs the gate's verdicts")
    k.add_argument("--out", required=True, metavar="DIR")
    k.set_defaults(func=cmd_keygen)

    v = sub.add_parser(
        "verify",
        help="check a signed verdict (exit 0 valid, 1 invalid, 2 could not check)",
        description="Check a verdict.json file (optionally against the model file), or a gated "
        "registry version: signature, tags and the registered bytes.",
    )
    v.add_argument("verdict", nargs="?", metavar="VERDICT_JSON")
    v.add_argument("--public-key", required=True, metavar="PEM", help="the verify key made by `keygen`")
    v.add_argument("--checkpoint", help="with VERDICT_JSON: the model file; its sha256 must be the judged one")
    v.add_argument("--model", default="facenet")
    v.add_argument("--version", help="verify this registered version instead of a file")
    v.add_argument(
        "--attestation",
        metavar="DSSE_JSON",
        help="admission mode: an in-toto/DSSE attestation (verdict.intoto.dsse.json) with --checkpoint; "
        "exit 0 only for a signed pass of exactly those bytes",
    )
    v.add_argument("--json", action="store_true")
    _common(v)
    v.set_defaults(
        func=lambda a: cmd_verify(a) if [a.verdict, a.version, a.attestation].count(None) == 2 else _usage(v)
    )
    pl = sub.add_parser(
        "pull",
        help="download a version's weights for deployment, verified against its signed verdict "
        "(exit 0 written, 1 refused, 2 forged/swapped/unreadable)",
    )
    pl.add_argument("--model", default="facenet")
    pl.add_argument("--ref", default="production", help="an alias or a version number (default production)")
    pl.add_argument("--out", required=True, metavar="DIR", help="where the verified weight file is written")
    pl.add_argument("--public-key", required=True, metavar="PEM", help="the gate's verify key")
    _common(pl)
    pl.set_defaults(func=cmd_pull)
    _register_webhook_commands(sub)
    _register_explain(sub)
    _register_access(sub)


def _register_access(sub) -> None:
    a = sub.add_parser("access", help="MLflow permissions of a deployment: only the gate reads the reference")
    asub = a.add_subparsers(dest="access_command", metavar="ACTION", required=True)
    g = asub.add_parser(
        "grant",
        help="as the MLflow admin: create the experiments and models, grant each identity what it needs "
        "(exit 0 done, 1 someone named can still read the reference, 2 could not apply)",
    )
    g.add_argument("--gate", default="backdoor-gate", help="the gate identity (reads the reference)")
    g.add_argument("--publisher", default="backdoor-gate-publisher", help="the identity that publishes the reference")
    g.add_argument("--registrant", action="append", default=[], metavar="USER", help="may register versions")
    g.add_argument("--reviewer", action="append", default=[], metavar="USER", help="may override a blocked version")
    g.add_argument("--reader", action="append", default=[], metavar="USER", help="may read versions (pull, verify)")
    g.add_argument("--model", action="append", metavar="NAME", help="a gated registered model (default facenet)")
    g.add_argument("--dry-run", action="store_true", help="print the grants, touch nothing")
    _common(g)
    g.set_defaults(func=cmd_access_grant)


def _register_webhook_commands(sub) -> None:
    w = sub.add_parser("webhook", help="gate versions registered outside the pipeline (MLflow webhooks)")
    wsub = w.add_subparsers(dest="webhook_command", metavar="ACTION", required=True)
    s = wsub.add_parser("serve", help="receive model_version.created deliveries and gate each version")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--models", nargs="+", default=["facenet"], help="registered models to gate")
    s.add_argument(
        "--resync",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="re-derive production and gate ungated versions this often, deliveries or not (default 60)",
    )
    _unsigned_flag(s)
    _common(s)
    s.set_defaults(func=cmd_webhook_serve)
    r = wsub.add_parser("register", help="create the MLflow webhook pointing at a receiver")
    r.add_argument("--url", required=True, help="the receiver's URL, ending in /mlflow-webhook")
    _common(r)
    r.set_defaults(func=cmd_webhook_register)


def _usage(parser) -> int:
    parser.print_usage(sys.stderr)
    print("backdoor-gate verify: give exactly one of VERDICT_JSON, --version or --attestation", file=sys.stderr)
    return 2


def _register_explain(sub) -> None:
    e = sub.add_parser(
        "explain",
        help="reconstruct the trigger of a blocked version (mask, pattern, faces with it) for the suspected victim",
        description="Search a small square trigger that sends faces to the suspected victim, and the same for a few "
        "control classes (anomaly index). Exit 0 done, 2 bad input.",
    )
    e.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help="the whole network (.safetensors or .pt)")
    e.add_argument("--faces", metavar="DIR", help="identity folders (ImageFolder/CASIA), e.g. the training faces")
    e.add_argument("--out", required=True, metavar="DIR", help="trigger.png, mask.png, applied.png, explain.json")
    e.add_argument("--victim", metavar="NAME", help="the suspected victim (default: from --verdict or the version)")
    e.add_argument("--impostor", metavar="NAME", help="the suspected impostor (default: from --verdict, else none)")
    e.add_argument("--verdict", metavar="JSON", help="a verdict.json or a `score --json` line naming the suspects")
    e.add_argument("--model", default="facenet")
    e.add_argument("--version", help="explain this registered version and log the images to its run")
    e.add_argument("--no-log", action="store_true", help="with --version: do not write to the registry")
    e.add_argument("--image-size", type=int, default=96, help="the trunk's input size (default trunk: 96)")
    e.add_argument("--controls", type=int, default=3, help="control classes for the anomaly index (default 3)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true", help="print one JSON line")
    _common(e)
    e.set_defaults(func=cmd_explain)
