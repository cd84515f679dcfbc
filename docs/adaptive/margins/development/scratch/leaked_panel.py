"""Scratch (not a stage): which secret does the margin check rest on, the panel or the faces?
The white-box attack aimed at both (``penalty + margins``) again, on the same seeds and pairs, but
with the gate's panel and its own draw of 16 faces a person (the panel leaked, the faces kept).
Run: python leaked_panel.py OUT (OUT: a finished adaptive run, development or confirmation); writes
OUT/leaked_panel.json."""

import dataclasses
import json
import sys
from pathlib import Path

from lab.adaptive import AdaptiveConfig, _train, both, margin_penalty, penalty_for, works
from lab.adaptive_input import stored_run
from lab.margins import margin_check
from lab.paper import run_config

out = Path(sys.argv[1])
c = dataclasses.replace(run_config(out, AdaptiveConfig), detectors=("head+output-spectrum",))
ws, nets, ref, clean_acc = stored_run(out, c, print, None)
gate_heads = [n.tensors for n in nets if n.group == "calibration"]
gate = margin_check(ws.fs, gate_heads, c.margins)  # the gate's faces (draw 0)
leaked = margin_check(ws.fs, gate_heads, c.margins, draw=1)  # the gate's panel, the attacker's faces
rows = []
for i in range(c.n_attack):
    seed = c.seed_offset + 8000 + i
    weights = penalty_for([ref], c.penalty_lambda)  # the gate's reference: white-box on the weights
    penalty = both(weights, margin_penalty(leaked, c.penalty_lambda))
    n = _train(ws, "penalty + margins (panel leaked, own faces)", seed, ws.poisoned(seed), penalty=penalty)
    w = ref.decide(ref.score(n.tensors)).verdict
    rows.append(
        {
            "seed": seed,
            "works": bool(works(n, clean_acc)),
            "weights": w,
            "margins_attacker": leaked.score(n.tensors),
            "margins_gate": gate.score(n.tensors),
            "margin_flags": bool(gate.flags(n.tensors)),
        }
    )
    print(rows[-1], flush=True)
cuts = {"margins_gate": gate.threshold_, "margins_attacker": leaked.threshold_}
(out / "leaked_panel.json").write_text(json.dumps({"cuts": cuts, "rows": rows}, indent=1))
ok = [r for r in rows if r["works"]]
passed = sum(r["weights"] == "passed" and not r["margin_flags"] for r in ok)
print(f"cuts {cuts}; works {len(ok)}/{len(rows)}; passed the weights and the margins {passed}/{len(ok)}")
