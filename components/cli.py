"""Registry subcommands: ``gate``, ``override``, ``publish-reference``."""

from __future__ import annotations

import getpass
import json
import os
import sys


def _identity() -> str:
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


def cmd_gate(args) -> int:
    from components.gate import GateConfig, gate
    from components.registry import Registry, RegistryError

    reference = None
    if args.reference:
        from detector.errors import InvalidReference
        from detector.reference import Reference

        try:
            reference = Reference.load(args.reference)
        except InvalidReference as e:
            print(f"backdoor-gate: {e}", file=sys.stderr)
            return 2
    try:
        registry = Registry(args.tracking_uri)
    except RegistryError as e:
        print(f"backdoor-gate: {e}", file=sys.stderr)
        return 2
    result = gate(args.model, args.version, registry=registry, reference=reference, config=GateConfig(report=not args.no_report))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"{result.model} v{result.version}: {result.verdict}{' (promoted to production)' if result.promoted else ''}")
        print(f"  reason: {result.reason}")
        for v, s in result.scores.items():
            print(f"  {v:8s} score {s:.6g}  threshold {result.thresholds[v]:.6g}")
        if result.report_uri:
            print(f"  report: {result.report_uri}")
    return result.exit_code


def cmd_override(args) -> int:
    from components.gate import OverrideRefused, override
    from components.registry import Registry, RegistryError

    try:
        info = override(args.model, args.version, reason=args.reason, identity=args.identity or _identity(), registry=Registry(args.tracking_uri))
    except (OverrideRefused, RegistryError, ValueError) as e:
        print(f"backdoor-gate: override refused: {e}", file=sys.stderr)
        return 2
    print(f"{info.name} v{info.version} promoted to production by override ({info.tags.get('integrity.override.by')})")
    return 0


def cmd_publish_reference(args) -> int:
    from components.gate import publish_reference
    from components.registry import Registry, RegistryError
    from detector.errors import InvalidReference

    try:
        info = publish_reference(Registry(args.tracking_uri), args.reference)
    except (RegistryError, InvalidReference) as e:
        print(f"backdoor-gate: {e}", file=sys.stderr)
        return 2
    print(f"published {info.name} v{info.version} as @current")
    return 0


def _common(p) -> None:
    p.add_argument("--tracking-uri", help="MLflow server (default $MLFLOW_TRACKING_URI)")


def register(sub) -> None:
    g = sub.add_parser("gate", help="gate one registered version (exit 0 passed, 1 blocked, 2 invalid/error)")
    g.add_argument("--model", default="facenet")
    g.add_argument("--version", required=True)
    g.add_argument("--reference", help="a local reference artifact instead of the registry's @current")
    g.add_argument("--no-report", action="store_true", help="skip the HTML/PNG review report")
    g.add_argument("--json", action="store_true")
    _common(g)
    g.set_defaults(func=cmd_gate)

    o = sub.add_parser("override", help="promote a blocked version on a reviewer's word (recorded as tags)")
    o.add_argument("--model", default="facenet")
    o.add_argument("--version", required=True)
    o.add_argument("--reason", required=True)
    o.add_argument("--identity", help="reviewer (default $MLFLOW_TRACKING_USERNAME or the OS user)")
    _common(o)
    o.set_defaults(func=cmd_override)

    p = sub.add_parser("publish-reference", help="register a reference artifact and make it @current")
    p.add_argument("reference", metavar="REF_DIR")
    _common(p)
    p.set_defaults(func=cmd_publish_reference)
