"""Scratch (not a stage): attacks aimed at the gate with the offset share inside `head`
(``HeadDeviationView(share=True)``, off by default), 2026-12-05. The gate and the grey-box
attacker's own gate are fitted as today's, then the share entry is switched on in their `head` view
(``fit`` computes its reference statistics either way) and each is re-calibrated on its own clean
networks. On the seeds and pairs of ``penalty + margins``: white-box and grey-box penalties against
every deciding part (`head`'s vector now ending in the share), the margins part read as the gate
reads it and as excess.py's Σ (z − 2)₊.

    python share_in_head.py OUT   # writes OUT/share_in_head.json (networks: OUT/share_in_head.safetensors)
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
    from excess import ExcessGate
    from excess import penalty_aimed_at as excess_penalty

    from lab.adaptive import AdaptiveConfig, _train, attacker_split, load_nets, penalty_for, save_nets
    from lab.adaptive_input import stored_run
    from lab.adaptive_margins import gate_with_margins, row_of
    from lab.paper import run_config

    c = dataclasses.replace(run_config(out, AdaptiveConfig), detectors=("head+output-spectrum",))
    ws, nets, _, clean_acc = stored_run(out, c, print, None)
    cal = [n.tensors for n in nets if n.group == "calibration"]
    today = gate_with_margins(ws, nets, c)
    gate = share_on(gate_with_margins(ws, nets, c), cal)
    print("cuts with the share", gate.thresholds_, "today's", today.thresholds_, flush=True)
    own = [n for n in nets if n.group == "grey-box attacker's own"]
    afit, acal = attacker_split(own, c)
    attacker = share_on(gate_with_margins(ws, nets, c, draw=1, groups=(afit, acal)), [n.tensors for n in acal])
    aims = {
        "max": lambda g, _cal: penalty_for([g], c.penalty_lambda),
        "excess": lambda g, gcal: excess_penalty(ExcessGate(g, gcal), c.penalty_lambda),
    }
    stored = out / "share_in_head.safetensors"
    kept = {(n.group, n.seed): n for n in load_nets(stored)} if stored.is_file() else {}
    rows, trained = [], []
    for margins, aim in aims.items():
        for name, target, tcal in (("white-box", gate, cal), ("grey-box", attacker, [n.tensors for n in acal])):
            penalty = aim(target, tcal)
            for i in range(c.n_attack):
                seed = c.seed_offset + 8000 + i
                group = f"{name} penalty: gate with margins ({margins}), share in head"
                n = kept.get((group, seed)) or _train(ws, group, seed, ws.poisoned(seed), penalty=penalty)
                trained.append(n)
                s = gate.score(n.tensors)
                d = gate.decide(s)
                rows.append(
                    {
                        **row_of(n, clean_acc),
                        "attack": name,
                        "margins_read_as": margins,
                        **{k: n.info[k] for k in ("attack_success_rate", "clean_accuracy")},
                        "share_gate": d.verdict,
                        "share_gate_below": list(d.below),
                        "scores": s,
                        "gate": today.decide(today.score(n.tensors)).verdict,
                        "own_estimate": target.decide(target.score(n.tensors)).verdict,
                    }
                )
                print(rows[-1], flush=True)
    save_nets(stored, trained)
    (out / "share_in_head.json").write_text(
        json.dumps({"thresholds": gate.thresholds_, "gate_thresholds": today.thresholds_, "rows": rows}, indent=1)
    )
    for margins in aims:
        for name in ("white-box", "grey-box"):
            ok = [r for r in rows if r["attack"] == name and r["margins_read_as"] == margins and r["works"]]
            print(
                f"{name}, margins as {margins}: works {len(ok)}/{c.n_attack}; passed the gate with the share "
                f"{sum(r['share_gate'] == 'passed' for r in ok)}/{len(ok)}; today's gate "
                f"{sum(r['gate'] == 'passed' for r in ok)}/{len(ok)}; its own estimate "
                f"{sum(r['own_estimate'] == 'passed' for r in ok)}/{len(ok)}"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
