"""How often each gate rejects a clean network of the recipe it never saw, on more networks than
the suite's fresh 10 and the attacker's 36: the 60 calibration networks of calibration_size.py
(the run's 20 and 40 trained since, one seed scheme). Each disjoint draw of 20 calibrates both
gates (the default and the gate with margins, fitted on the run's reference networks as the
product fits them); the other 40 are fresh to that gate and are scored. Prints, per draw, the
blocked counts and the networks the two gates disagree on; writes OUT/fresh_frr.json.

    python fresh_frr.py OUT    # OUT: a finished adaptive run with extra_calibration.safetensors
"""

import json
import sys
from pathlib import Path

from lab.adaptive import AdaptiveConfig, fit_reference, load_nets
from lab.adaptive_input import stored_run
from lab.adaptive_margins import gate_with_margins
from lab.paper import run_config

out = Path(sys.argv[1])
c = run_config(out, AdaptiveConfig)
ws, nets, _, _ = stored_run(out, c, print, None)
pool = [n for n in nets if n.group == "calibration"] + load_nets(out / "extra_calibration.safetensors")
assert len(pool) == 60, len(pool)
ref = [n for n in nets if n.group == "reference"]
draws = {"the run's 20": range(20), "new 20 (a)": range(20, 40), "new 20 (b)": range(40, 60)}
result: dict = {}
for name, idx in draws.items():
    cal = [pool[i] for i in idx]
    fresh = [n for i, n in enumerate(pool) if i not in idx]
    gates = {
        "head+output-spectrum": fit_reference("head+output-spectrum", ref, cal, ws.base),
        "head+output-spectrum+margins": gate_with_margins(ws, nets, c, groups=(ref, cal)),
    }
    verdicts = {g: [gate.decide(gate.score(n.tensors)) for n in fresh] for g, gate in gates.items()}
    blocked = {g: [n.seed for n, d in zip(fresh, v) if d.verdict != "passed"] for g, v in verdicts.items()}
    below = {
        n.seed: d.below
        for n, d in zip(fresh, verdicts["head+output-spectrum+margins"])
        if d.verdict != "passed"
    }
    result[name] = {"fresh": len(fresh), "blocked": blocked, "margins_gate_below": below}
    a, b = (set(blocked[g]) for g in gates)
    print(
        f"{name:14s} fresh {len(fresh)}: default blocked {len(a)}, with margins {len(b)}; "
        f"only default {sorted(a - b)}, only margins {sorted(b - a)}; parts {below}",
        flush=True,
    )
(out / "fresh_frr.json").write_text(json.dumps(result, indent=1))
