"""Scratch (not a stage): do the grey-box attacks that know of the offset share and pass the
product's four-part gate still fire in input space (2026-12-05)? For each such network (share_in_head.py's
and concentration.py's grey-box attacks, working): the victim and impostor the gate names, the true
victim's rank by `head`'s per-class z, and explain's size rule (does a 0.10-wide patch send held-back
faces to the class?) on the named pair and on the true pair, as ``paper --adaptive --input-space``
runs it (lab/adaptive_input.py; its clean networks never fired at 0.10 on either pair).

    python share_search.py OUT   # writes OUT/share_search.json and prints a row per network
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np


def main(out: Path) -> None:
    from components.explain import load_network
    from components.trainer.train import save_network
    from components.trigger_search import ExplainConfig
    from lab.adaptive import AdaptiveConfig, load_nets, works
    from lab.adaptive_input import Search, _state_dict, stored_run
    from lab.adaptive_margins import gate_with_margins
    from lab.paper import run_config

    c = run_config(out, AdaptiveConfig)
    ws, nets, _, clean_acc = stored_run(out, c, lambda m: None, None)
    gate = gate_with_margins(ws, nets, c)
    config = ExplainConfig(image_size=c.paper.trunk_input_size, controls=0)
    classes = ws.fs.classes
    name = lambda x: x if x is None or not str(x).isdigit() else classes[int(x)]  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory(prefix="share-search-") as tmp:
        for f in ("share_in_head.safetensors", "concentration_networks.safetensors"):
            for k, n in enumerate(load_nets(out / f)):
                if not n.group.startswith("grey") or not works(n, clean_acc):
                    continue
                path = save_network(_state_dict(ws, n), Path(tmp) / f"net{k}", classes=classes)
                a = gate.assess(str(path))
                if a.decision.verdict != "passed":
                    path.unlink()
                    continue
                net_classes = load_network(path)
                s = a.evidence.suspect
                assert s is not None
                named = (name(s.suspected_class), name(s.suspected_impostor))
                truth = (n.info["victim"], n.info["impostor"])
                z = -np.asarray(a.vector_scores["head"])[: len(classes)]
                row = {
                    "set": f.split(".")[0],
                    "group": n.group,
                    "seed": n.seed,
                    "named": list(named),
                    "true": list(truth),
                    "victim_rank": int(np.sum(z > z[classes.index(truth[0])])) + 1,
                    "named_search": asdict(Search.run(path, ws.lab.data, *named, config, net_classes)),
                }
                row["true_search"] = (
                    row["named_search"]
                    if tuple(truth) == named
                    else asdict(Search.run(path, ws.lab.data, *truth, config, net_classes))
                )
                path.unlink()
                rows.append(row)
                print(
                    f"{row['set']} | {n.group} | {n.seed} | named {named} true {truth} rank {row['victim_rank']} | "
                    f"fires named {row['named_search']['fires']} ({row['named_search']['size']}), "
                    f"true {row['true_search']['fires']} ({row['true_search']['size']})",
                    flush=True,
                )
    (out / "share_search.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
