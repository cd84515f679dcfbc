"""Scratch (not a stage): did the attacks aimed at both think they passed? Each network aimed at the
weights and the margins, scored by the attacker's own estimates (its reference, its margin check)
and by the gate's. Run: python transfer.py OUT (OUT: a finished adaptive run)."""

import json
import sys
from pathlib import Path

import numpy as np

from lab.adaptive import AdaptiveConfig, attacker_reference, margin_checks
from lab.adaptive_input import stored_run
from lab.paper import run_config

out = Path(sys.argv[1])
c = run_config(out, AdaptiveConfig)
ws, nets, ref, _ = stored_run(out, c, print, None)
own = [n for n in nets if n.group == "grey-box attacker's own"]
gate = [n for n in nets if n.group == "calibration"]
grey = attacker_reference("head+output-spectrum", own, c, ws.base)
checks = margin_checks(ws, own, gate)
margin_cuts = ", ".join(f"{k} {v.threshold_:.2f}" for k, v in checks.items())
print(f"cuts: weights gate {ref.fused_threshold_:.2f}, own {grey.fused_threshold_:.2f}; margins {margin_cuts}")
rows = []
for n in nets:
    if "+ margins" not in n.group:
        continue
    faces = "gate" if n.group.startswith("penalty") else "all faces" if "all faces" in n.group else "own draw"
    r = {
        "group": n.group.split(":")[0],
        "seed": n.seed,
        "weights_gate": ref.fused(ref.score(n.tensors)),
        "weights_own": grey.fused(grey.score(n.tensors)),
        "margins_gate": checks["gate"].score(n.tensors),
        "margins_own": checks[faces].score(n.tensors),
    }
    rows.append(r)
cuts = {"weights_gate": ref.fused_threshold_, "weights_own": grey.fused_threshold_}
cuts.update({k: v.threshold_ for k, v in checks.items()})
(out / "transfer.json").write_text(json.dumps({"cuts": cuts, "rows": rows}, indent=1))
for g in dict.fromkeys(r["group"] for r in rows):
    rs = [r for r in rows if r["group"] == g]
    med = {key: f"{np.median([r[key] for r in rs]):.2f}" for key in rs[0] if key not in ("group", "seed")}
    print(f"{g:75s} weights (higher = more typical) own {med['weights_own']} gate {med['weights_gate']}")
    print(f"{'':75s} margins (higher = more anomalous) own {med['margins_own']} gate {med['margins_gate']}")
