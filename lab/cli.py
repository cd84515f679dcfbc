"""``backdoor-gate paper`` and ``backdoor-gate bench``: the lab's commands (never the product's)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from lab import bench


def cmd_paper(args) -> int:
    from components.trainer.base_trunk import load_base
    from lab.paper import PaperConfig, run_paper

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
    if args.no_curves:
        changes.update(curves=False, tsne=False)
    if args.detectors:
        changes.update(detectors=tuple(args.detectors.split(",")))
    config = dataclasses.replace(config, **changes)
    base = load_base(args.base) if args.base else None
    summary = run_paper(args.out, config, base=base, log=lambda m: print(m, file=sys.stderr), rescore=args.rescore)
    print((Path(args.out) / "table.md").read_text())
    print(f"summary: {Path(args.out) / 'summary.json'} ({summary['timings']['total_s']:.0f} s)")
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
    pp.set_defaults(func=cmd_paper)
    bench.register(sub)
