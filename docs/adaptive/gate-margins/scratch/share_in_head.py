"""Scratch (not a stage): attacks aimed at the gate with the offset share inside `head`
(``HeadDeviationView(share=True)``, off by default), 2026-12-05. The gate and the grey-box
attacker's own gate are fitted as today's, then the share entry is switched on in their `head` view
(``fit`` computes its reference statistics either way) and each is re-calibrated on its own clean
networks. On the seeds and pairs of ``penalty + margins``: white-box and grey-box penalties against
every deciding part (`head`'s vector now ending in the share), the margins part read as the gate
reads it and as excess.py's Σ (z − 2)₊.

    python share_in_head.py OUT   # writes OUT/share_in_head.json (networks: OUT/share_in_head.safetensors)

Runs at commit 67345d2: the option inside `head` was removed when the share became `head`'s second
view, cut as a part of its own (product_share.py); its outputs stand as measured then.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path


def share_on(gate, calibration: list[dict]):
    gate.members_["head"].views_["classes"].share = True
    return gate.calibrate(calibration)


def main(out: Path) -> None:
    from concentration import summarise_aimed, train_aimed
    from excess import ExcessGate
    from excess import penalty_aimed_at as excess_penalty

    from lab.adaptive import AdaptiveConfig, attacker_split, penalty_for
    from lab.adaptive_input import stored_run
    from lab.adaptive_margins import gate_with_margins
    from lab.paper import run_config

    c = dataclasses.replace(run_config(out, AdaptiveConfig), detectors=("head+output-spectrum",))
    ws, nets, _, clean_acc = stored_run(out, c, print, None)
    cal = [n.tensors for n in nets if n.group == "calibration"]
    today = gate_with_margins(ws, nets, c)
    gate = share_on(gate_with_margins(ws, nets, c), cal)
    print("cuts with the share", gate.thresholds_, "today's", today.thresholds_, flush=True)
    own = [n for n in nets if n.group == "grey-box attacker's own"]
    afit, acal = attacker_split(own, c)
    acal_t = [n.tensors for n in acal]
    attacker = share_on(gate_with_margins(ws, nets, c, draw=1, groups=(afit, acal)), acal_t)
    penalties = {
        "max": lambda g, _cal: penalty_for([g], c.penalty_lambda),
        "excess": lambda g, gcal: excess_penalty(ExcessGate(g, gcal), c.penalty_lambda),
    }
    aims = [
        (margins, name, target, aim(target, tcal), f"{name} penalty: gate with margins ({margins}), share in head")
        for margins, aim in penalties.items()
        for name, target, tcal in (("white-box", gate, cal), ("grey-box", attacker, acal_t))
    ]

    def judge(tensors: dict):
        scores = gate.score(tensors)
        return scores, gate.decide(scores)

    rows = train_aimed(ws, c, clean_acc, out / "share_in_head.safetensors", aims, judge, today)
    (out / "share_in_head.json").write_text(
        json.dumps({"thresholds": gate.thresholds_, "gate_thresholds": today.thresholds_, "rows": rows}, indent=1)
    )
    summarise_aimed(rows, c, "the gate with the share")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
