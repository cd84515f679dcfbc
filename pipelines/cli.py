"""``backdoor-gate pipelines compile | run-local | submit``."""

from __future__ import annotations

import json
import os

PIPELINES = ("reference", "candidate")


def _param(pair: str) -> tuple[str, object]:
    """``--param key=value``; the value is JSON when it parses (numbers, bools), else a string."""
    import argparse

    if "=" not in pair:
        raise argparse.ArgumentTypeError(f"--param takes key=value, got {pair!r}")
    k, v = pair.split("=", 1)
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v


def cmd_compile(args) -> int:
    from pipelines.compile import compile_all

    for path in compile_all(args.out):
        print(path)
    return 0


def cmd_run_local(args) -> int:
    from pipelines.local import run_local

    outputs = run_local(args.pipeline, dict(args.param or []), workdir=args.workdir, runner=args.runner)
    print(json.dumps(outputs, default=str))
    return 0


def cmd_submit(args) -> int:
    from pipelines.submit import submit

    return submit(
        args.pipeline,
        host=args.host,
        namespace=args.namespace,
        experiment=args.experiment,
        params=dict(args.param or []),
        token=os.environ.get(args.token_env),
        cron=args.cron,
        wait=args.wait,
        timeout=args.timeout,
    )


def cmd_demo(args) -> int:
    from pipelines.demo import run_demo

    return run_demo(args.workdir, keep=args.keep)


def register(sub) -> None:
    d = sub.add_parser("demo", help="what `make demo` runs: MLflow + reference and candidate pipelines, locally")
    d.add_argument("--workdir", default=".cache/demo")
    d.add_argument(
        "--keep", action="store_true", default=os.environ.get("KEEP") == "1", help="leave MLflow running (or KEEP=1)"
    )
    d.set_defaults(func=cmd_demo)

    p = sub.add_parser("pipelines", help="compile, run locally or submit the Kubeflow pipelines")
    s = p.add_subparsers(dest="pipelines_command", metavar="ACTION", required=True)

    c = s.add_parser("compile", help="write the pipelines' YAML")
    c.add_argument("--out", required=True, help="directory for reference.yaml and candidate.yaml")
    c.set_defaults(func=cmd_compile)

    r = s.add_parser("run-local", help="run a pipeline here with kfp.local (subprocesses, no cluster)")
    r.add_argument("pipeline", choices=PIPELINES)
    r.add_argument("--param", action="append", type=_param, metavar="KEY=VALUE", help="pipeline parameter (repeatable)")
    r.add_argument("--workdir", default=".cache/kfp-local", help="kfp.local pipeline root")
    r.add_argument(
        "--runner",
        choices=("subprocess", "docker"),
        default=None,
        help="subprocess (default, or $BACKDOOR_GATE_LOCAL_RUNNER): tasks run here; "
        "docker: each task in its image (make images), host network",
    )
    r.set_defaults(func=cmd_run_local)

    m = s.add_parser("submit", help="submit a run (or a recurring run with --cron) to a KFP API server")
    m.add_argument("pipeline", choices=PIPELINES)
    m.add_argument(
        "--host",
        default=os.environ.get("KF_PIPELINES_ENDPOINT"),
        help="KFP API endpoint (default $KF_PIPELINES_ENDPOINT)",
    )
    m.add_argument("--namespace", default=os.environ.get("KFP_NAMESPACE", "kubeflow"))
    m.add_argument("--experiment", default="backdoor-gate")
    m.add_argument("--param", action="append", type=_param, metavar="KEY=VALUE")
    m.add_argument(
        "--token-env", default="KFP_TOKEN", help="env var holding the bearer token (never passed on the command line)"
    )
    m.add_argument("--cron", help="create a recurring run with this cron expression instead of one run")
    m.add_argument(
        "--wait",
        action="store_true",
        help="wait for the run; exit 1 if it did not succeed (a blocked candidate fails its run)",
    )
    m.add_argument("--timeout", type=int, default=6 * 3600, help="seconds to wait with --wait")
    m.set_defaults(func=cmd_submit)
