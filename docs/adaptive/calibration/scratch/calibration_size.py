"""How much of the gate's verdicts is the draw of its 20 calibration networks, and what more
of them buys: 40 more clean networks of the reference's recipe (new seeds, saved beside the
run as extra_calibration.safetensors), then the default gate and the gate with margins
calibrated on three disjoint sets of 20, on 40 (two sets) and on all 60, every stored
network of an adaptive run scored by each.

    python calibration_size.py OUT    # OUT: a finished adaptive run (its protocol: its summary.json)

White-box attacks aimed at the cut of the run's own 20 calibration networks; under another cut
a white-box attacker would aim at that one, so they are counted apart ("white-box").
Writes OUT/calibration_size.json and prints one line per calibration set.
"""

import json
import sys
from pathlib import Path

from lab.adaptive import AdaptiveConfig, _train, fit_reference, load_nets, save_nets, works
from lab.adaptive_input import stored_run
from lab.adaptive_margins import gate_with_margins, scored
from lab.paper import run_config

out = Path(sys.argv[1])
c = run_config(out, AdaptiveConfig)
ws, nets, _, clean_acc = stored_run(out, c, print, None)
o = c.seed_offset
extra_path = out / "extra_calibration.safetensors"
if extra_path.is_file():
    extra = load_nets(extra_path)
else:  # the calibration seeds' scheme, continued: o + 1000 + 20 … o + 1000 + 59
    extra = [_train(ws, "calibration", o + 1000 + s) for s in range(c.n_calibration, c.n_calibration + 40)]
    save_nets(extra_path, extra)
first = [n for n in nets if n.group == "calibration"]
pool = first + extra
sets = {
    "20 (the run's)": pool[:20],
    "20 (new, a)": pool[20:40],
    "20 (new, b)": pool[40:60],
    "40 (the run's + a)": pool[:40],
    "40 (a + b)": pool[20:60],
    "60": pool,
}
ref = [n for n in nets if n.group == "reference"]
rows = scored(nets)


def tally(gate) -> dict:
    t = {
        "no knowledge / grey-box": [0, 0],
        "white-box": [0, 0],
        "clean (fresh)": [0, 0],
        "attacker's own": [0, 0],
        "drift: lr x2": [0, 0],
        "drift: epochs x2": [0, 0],
    }
    for n in rows:
        passed = gate.decide(gate.score(n.tensors)).verdict == "passed"
        if "attack_success_rate" in n.info:
            if not works(n, clean_acc):
                continue
            k = "white-box" if n.group.startswith("penalty") else "no knowledge / grey-box"
            t[k][0] += passed
        else:
            k = {"clean": "clean (fresh)", "grey-box attacker's own": "attacker's own"}.get(n.group, n.group)
            if k not in t:
                continue
            t[k][0] += not passed
        t[k][1] += 1
    return {k: f"{a}/{b}" for k, (a, b) in t.items()}


result = {}
for name, cal in sets.items():
    gates = {
        "head+output-spectrum": fit_reference("head+output-spectrum", ref, cal, ws.base),
        "head+output-spectrum+margins": gate_with_margins(ws, nets, c, groups=(ref, cal)),
    }
    result[name] = {}
    for label, gate in gates.items():
        result[name][label] = {"thresholds": {k: round(v, 2) for k, v in gate.thresholds_.items()}, **tally(gate)}
        print(name.ljust(20), label.ljust(30), json.dumps(result[name][label]), flush=True)
(out / "calibration_size.json").write_text(json.dumps(result, indent=1))
