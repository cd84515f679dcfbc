"""Scratch (not a stage): attacks aimed at the product gate with margins itself
(``head+output-spectrum+margins``, :mod:`detector.margins`), on the seeds and pairs of
``penalty + margins``. White-box: the gate's reference, gallery and cuts, every deciding part in
the penalty (λ 0.1). Grey-box: the same penalty against the attacker's own gate with margins, fitted
on its own clean networks (two thirds fit, the rest calibrate) and its own draw of 16 faces a person.
Run: python aimed_at_gate.py OUT (OUT: a finished adaptive run, development or confirmation); writes
OUT/aimed_at_gate.json."""

import dataclasses
import json
import sys
from pathlib import Path

from lab.adaptive import AdaptiveConfig, _train, attacker_split, penalty_for, works
from lab.adaptive_input import stored_run
from lab.adaptive_margins import gate_verdicts, gate_with_margins
from lab.paper import run_config

out = Path(sys.argv[1])
c = dataclasses.replace(run_config(out, AdaptiveConfig), detectors=("head+output-spectrum",))
ws, nets, default, clean_acc = stored_run(out, c, print, None)
gate = gate_with_margins(ws, nets, c)
own = [n for n in nets if n.group == "grey-box attacker's own"]
attacker = gate_with_margins(ws, nets, c, draw=1, groups=attacker_split(own, c))
rows = []
for name, ref in (("white-box", gate), ("grey-box", attacker)):
    for i in range(c.n_attack):
        seed = c.seed_offset + 8000 + i
        n = _train(
            ws,
            f"{name} penalty: gate with margins",
            seed,
            ws.poisoned(seed),
            penalty=penalty_for([ref], c.penalty_lambda),
        )
        rows.append(
            {
                "attack": name,
                "seed": seed,
                "works": bool(works(n, clean_acc)),
                "attack_success_rate": n.info["attack_success_rate"],
                "clean_accuracy": n.info["clean_accuracy"],
                **gate_verdicts(n, gate, default),
                "own_estimate": ref.decide(ref.score(n.tensors)).verdict,
            }
        )
        print(rows[-1], flush=True)
(out / "aimed_at_gate.json").write_text(json.dumps({"thresholds": gate.thresholds_, "rows": rows}, indent=1))
for name in ("white-box", "grey-box"):
    rs = [r for r in rows if r["attack"] == name]
    ok = [r for r in rs if r["works"]]
    gate_passed = sum(r["gate"] == "passed" for r in ok)
    print(
        f"{name}: works {len(ok)}/{len(rs)}; passed the gate with margins {gate_passed}/{len(ok)}; "
        f"passed the default {sum(r['default'] == 'passed' for r in ok)}/{len(ok)}; its own estimate said passed "
        f"{sum(r['own_estimate'] == 'passed' for r in ok)}/{len(ok)}"
    )
