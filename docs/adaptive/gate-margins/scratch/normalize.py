"""The margins part with and without ``normalize="network"`` (every margin divided by the
network's own median), deciding with head+output-spectrum as the gate does, on the stored
networks of a paper-protocol run or an adaptive run (chosen on development, then confirmation).

    python normalize.py paper OUT   # OUT: `backdoor-gate paper --no-curves --out OUT`
    python normalize.py adv OUT     # OUT: a finished adaptive run

Each run's protocol (development or confirmation) is read from its summary.json. Paper rows: blocked/networks and how many of those the margins part blocked ("m");
adaptive rows: clean groups blocked, attack groups passed (working attacks only).
"""

import collections
import json
import sys
from pathlib import Path

import numpy as np

from detector.composite import CompositeReference
from detector.detectors import make_reference
from detector.margins import DEFAULT_FACES, MarginsReference
from lab.margins import lab_gallery

kind, out = sys.argv[1], Path(sys.argv[2])
MODES = ("none", "network")
ATTACK_WORDS = ("penalty", "trigger", "plain", "dilution", "swap x", "recipe")


def gate_for(gallery, fit, cal, base, normalize):
    members = {
        "head": make_reference("head"),
        "output-spectrum": make_reference("output-spectrum"),
        "margins": MarginsReference(gallery=gallery, normalize=normalize),
    }
    gate = CompositeReference(("head", "output-spectrum", "margins"), members=members)
    return gate.fit(fit, base=base).calibrate(cal)


def paper() -> None:
    from lab.paper import PaperConfig, _Lab, backdoor_status, detection_groups, load_networks, run_config

    lab = _Lab(run_config(out, PaperConfig), None, lambda m: None)
    nets, W = load_networks(out / "networks.safetensors")
    clean_acc = float(np.mean([n["clean_accuracy"] for n in nets if n["group"] in ("reference", "held-out")]))
    groups = detection_groups(nets)
    gallery = lab_gallery(lab.fs, DEFAULT_FACES, seed=0)
    for mode in MODES:
        gate = gate_for(
            gallery, [W[i] for i in groups["reference"]], [W[i] for i in groups["held-out"]], lab.base, mode
        )
        row = {}
        for name, idx in groups.items():
            if name == "reference":
                continue
            if name in ("triggers", "locations", "strength"):
                idx = [i for i in idx if backdoor_status(nets[i], clean_acc) == "counts"]
            v = [gate.decide(gate.score(W[i])) for i in idx]
            blocked = sum(d.verdict != "passed" for d in v)
            row[name] = f"{blocked}/{len(idx)} m{sum('margins' in d.below for d in v)}"
        print(mode, json.dumps(row), flush=True)


def adaptive() -> None:
    from lab.adaptive import AdaptiveConfig, works
    from lab.adaptive_input import stored_run
    from lab.paper import run_config

    c = run_config(out, AdaptiveConfig)
    ws, nets, _, clean_acc = stored_run(out, c, lambda m: None, None)
    gallery = lab_gallery(ws.fs, c.margins.faces, c.margins.seed)
    by = lambda g: [n.tensors for n in nets if n.group == g]  # noqa: E731
    for mode in MODES:
        gate = gate_for(gallery, by("reference"), by("calibration"), ws.base, mode)
        row: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        passed = working = 0
        for n in nets:
            if n.group in ("reference", "calibration"):
                continue
            d = gate.decide(gate.score(n.tensors))
            if "attack_success_rate" in n.info:
                if not works(n, clean_acc):
                    continue
                working += 1
                passed += d.verdict == "passed"
                row[n.group][0] += d.verdict == "passed"
            else:
                row[n.group][0] += d.verdict != "passed"
            row[n.group][1] += 1
        print(mode, f"working attacks passed {passed}/{working}", flush=True)
        for k, (hit, total) in row.items():
            what = "(passed)" if any(w in k for w in ATTACK_WORDS) else "(blocked)"
            print("   ", k.ljust(70), f"{hit}/{total}", what)


paper() if kind == "paper" else adaptive()
