"""``backdoor-gate paper``, ``bench`` and ``explain-eval``: the lab's commands (never the product's)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from lab import bench


def cmd_paper(args) -> int:
    from components.trainer.base_trunk import load_base
    from lab.paper import PaperConfig, run_paper

    if args.adaptive:
        return cmd_adaptive(args)
    stem = _asked_stage(args)
    if stem:
        flag = "--" + stem.replace("_", "-")
        print(f"paper: {flag} searches an adaptive run's networks; give --adaptive too", file=sys.stderr)
        return 2
    config = PaperConfig.small() if args.small else PaperConfig.confirmation() if args.confirmation else PaperConfig()
    changes = {
        k: v
        for k, v in (
            ("identities", args.identities),
            ("images_per_identity", args.images_per_identity),
            ("n_strength", args.n_strength),
        )
        if v is not None
    }
    scoring: dict[str, Any] = {}  # what to score and draw, free to differ from an earlier run's
    if args.no_curves:
        scoring.update(curves=False, tsne=False)
    if args.detectors:
        scoring.update(detectors=tuple(args.detectors.split(",")))
    config = dataclasses.replace(config, **changes, **scoring)
    if args.rescore:  # the saved networks were made with the run's protocol, not the flags'
        config = _stored_protocol(args, config, scoring, free=("detectors", "curves", "tsne"))
        if config is None:
            return 2
    base = load_base(args.base) if args.base else None
    summary = run_paper(args.out, config, base=base, log=lambda m: print(m, file=sys.stderr), rescore=args.rescore)
    print((Path(args.out) / "table.md").read_text())
    print(f"summary: {Path(args.out) / 'summary.json'} ({summary['timings']['total_s']:.0f} s)")
    return 0


#: the stages over a finished adaptive run: each is a flag (``--input-space``), an ``args``
#: attribute and the stem of the ``<stem>.md`` / ``<stem>.json`` it writes
STAGES = ("input_space", "source_sweep", "margins", "gate_margins")


def _asked_stage(args) -> str | None:
    return next((stem for stem in STAGES if getattr(args, stem)), None)


def _stage(stem: str):
    """The function of the stage that writes ``<stem>.md`` from a finished adaptive run."""
    if stem == "input_space":
        from lab.adaptive_input import run_input_space

        return run_input_space
    if stem == "source_sweep":
        from lab.source_sweep import run_source_sweep

        return run_source_sweep
    from lab.adaptive_margins import run_gate_margins, run_margins

    return run_gate_margins if stem == "gate_margins" else run_margins


def _stored_protocol(args, asked, changes: dict, free: tuple[str, ...]):
    """The protocol of the finished run in ``args.out`` (its summary.json) with ``changes`` (to
    ``free`` fields only: what to score, not what was trained) applied; None, said on stderr, when
    there is no finished run or a protocol flag given (``asked`` is what the flags build)
    disagrees with it."""
    from lab.paper import run_config

    name = "paper --adaptive" if args.adaptive else "paper --rescore"
    try:
        stored = run_config(args.out, type(asked))
    except (FileNotFoundError, ValueError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return None
    flags = ("small", "confirmation", "identities", "images_per_identity", "n_strength", "seed_offset")
    if any(getattr(args, f, None) not in (None, False) for f in flags):
        a = dataclasses.asdict(dataclasses.replace(asked, **{f: getattr(stored, f) for f in free}))
        b = dataclasses.asdict(stored)
        differ = [k for k in b if a[k] != b[k]]
        if differ:
            print(
                f"{name}: {args.out} was made with another protocol ({', '.join(differ)} differ); "
                "drop the protocol flags: this reads the run's own",
                file=sys.stderr,
            )
            return None
    return dataclasses.replace(stored, **changes)


def cmd_adaptive(args) -> int:
    """``paper --adaptive``: the informed attacker's suite (see :mod:`lab.adaptive`)."""
    from lab.adaptive import AdaptiveConfig, run_adaptive

    config = (
        AdaptiveConfig.small()
        if args.small
        else AdaptiveConfig.confirmation()
        if args.confirmation
        else AdaptiveConfig()
    )
    if args.identities is not None:
        config = dataclasses.replace(config, paper=dataclasses.replace(config.paper, identities=args.identities))
    if args.detectors:
        config = dataclasses.replace(config, detectors=tuple(args.detectors.split(",")))
    if args.seed_offset is not None:
        config = dataclasses.replace(config, seed_offset=args.seed_offset)
    from components.trainer.base_trunk import load_base

    base = load_base(args.base) if args.base else None
    stem = _asked_stage(args)
    if stem:  # a stage over a finished run's stored networks (no training), with the run's protocol
        given = {"detectors": tuple(args.detectors.split(","))} if args.detectors else {}
        config = _stored_protocol(args, config, given, free=("detectors",))
        if config is None:
            return 2
        found = _stage(stem)(args.out, config, log=lambda m: print(m, file=sys.stderr), base=base)
        print((Path(args.out) / f"{stem}.md").read_text())
        print(f"rows: {Path(args.out) / f'{stem}.json'} ({found['seconds']:.0f} s)")
        return 0
    summary = run_adaptive(
        args.out, config, log=lambda m: print(m, file=sys.stderr), rescore=args.rescore, base=base, resume=args.resume
    )
    print((Path(args.out) / "table.md").read_text())
    print(f"summary: {Path(args.out) / 'summary.json'} ({summary['seconds']:.0f} s)")
    return 0


def cmd_explain_eval(args) -> int:
    import json

    from components.trigger_search import ExplainConfig
    from lab.explain import ExplainEvalConfig, run_explain_eval

    config = ExplainEvalConfig.confirmation() if args.confirmation else ExplainEvalConfig()
    changes = {k: v for k, v in (("n_per_kind", args.n_per_kind), ("n_clean", args.n_clean)) if v is not None}
    config = dataclasses.replace(config, **changes)
    explain_config = ExplainConfig(image_size=config.trunk_input_size)
    summary = run_explain_eval(
        args.out,
        config,
        explain_config,
        log=lambda m: print(m, file=sys.stderr),
        use_impostor=not args.no_impostor,
        compare_sources=not args.confirmation,
    )
    print((Path(args.out) / "table.md").read_text())
    if args.cost:
        from lab.explain import cost

        print(json.dumps(cost(*summary["cost_case"]), indent=1))
    return 0


def register(sub) -> None:
    pp = sub.add_parser("paper", help="run the paper's protocol: clean, triggers and locations sets, AUC per view")
    pp.add_argument("--out", required=True)
    pp.add_argument("--small", action="store_true", help="a few networks (tests)")
    pp.add_argument(
        "--confirmation",
        action="store_true",
        help="the held-back protocol: other data seed, people, trigger settings and network seeds",
    )
    pp.add_argument("--identities", type=int, help="identities (default 40; e.g. 200 to scale toward CASIA)")
    pp.add_argument("--images-per-identity", type=int, help="images per identity (default 40)")
    pp.add_argument("--n-strength", type=int, help="networks per attack-strength point (default 4)")
    pp.add_argument("--no-curves", action="store_true", help="skip AUC vs N_G / M and the t-SNE (minutes)")
    pp.add_argument("--detectors", help="comma list of detectors to score (default: all, with their variants)")
    pp.add_argument(
        "--rescore",
        action="store_true",
        help="re-score the networks an earlier run saved in --out (networks.safetensors) instead of training",
    )
    pp.add_argument("--base", help="local InceptionResnetV1 state dict (default: the cached generated-faces base)")
    pp.add_argument(
        "--seed-offset",
        type=int,
        help="--adaptive: train every network from other seeds (a fresh draw of the same protocol, "
        "for a defence chosen after the protocol's networks were looked at)",
    )
    pp.add_argument(
        "--adaptive",
        action="store_true",
        help="the informed attacker's suite instead: attacks aimed at each --detectors "
        "(default head,head+output-spectrum), their cost, and every detector's verdicts",
    )
    pp.add_argument(
        "--resume",
        action="store_true",
        help="with --adaptive: keep every network an earlier run saved in --out and train only the "
        "ones it lacks (an attack added since, or a stopped run)",
    )
    pp.add_argument(
        "--input-space",
        action="store_true",
        help="with --adaptive: run explain's trigger search (size rule) on the networks a finished "
        "adaptive run saved in --out, beside the weight gate's verdicts (no training)",
    )
    pp.add_argument(
        "--source-sweep",
        action="store_true",
        help="with --adaptive: sweep every person of each stored clean network, retrain and attack "
        "that passed the weights for a 0.10 patch, and count the sources one class collects (no training)",
    )
    pp.add_argument(
        "--margins",
        action="store_true",
        help="with --adaptive: score every stored network of a finished adaptive run with the margin "
        "check (each pair's margin on clean faces against the calibration networks) beside the weight "
        "gate's verdicts (no training)",
    )
    pp.add_argument(
        "--gate-margins",
        action="store_true",
        help="with --adaptive: the product's margins detector deciding with the default "
        "(head+output-spectrum+margins, fitted and calibrated as the gate does) on every stored network (no training)",
    )
    pp.set_defaults(func=cmd_paper)
    bench.register(sub)
    ee = sub.add_parser(
        "explain-eval",
        help="lab: does `explain` find known triggers (per kind), and nothing on clean networks?",
    )
    ee.add_argument("--out", required=True)
    ee.add_argument("--confirmation", action="store_true", help="the held-back protocol (run once, after tuning)")
    ee.add_argument("--n-per-kind", type=int, help="backdoored networks per trigger kind")
    ee.add_argument("--n-clean", type=int, help="clean networks")
    ee.add_argument(
        "--no-impostor", action="store_true", help="search on every other class's faces, not the impostor's"
    )
    ee.add_argument("--cost", action="store_true", help="also time one explain at 96 and at 160 px")
    ee.set_defaults(func=cmd_explain_eval)
