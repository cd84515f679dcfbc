"""Development only: the product margins detector's std floor, and how the gate's three parts
share the 5 % budget, on a finished development adaptive run (the one knob chosen here).

    python docs/adaptive/gate-margins/scratch/floor_sweep.py OUT
"""

import json
import sys
from pathlib import Path

import numpy as np

from detector.composite import CompositeReference
from detector.detectors import make_reference
from detector.margins import FaceGallery, MarginsReference, draw_faces
from lab.adaptive import AdaptiveConfig, works
from lab.adaptive_input import stored_run

out = Path(sys.argv[1])
c = AdaptiveConfig()
ws, nets, default, clean_acc = stored_run(out, c, lambda m: None, None)
fs = ws.fs
people = np.arange(len(fs.classes))
gallery = FaceGallery(
    fs.features[draw_faces(fs.labels, people, 16, np.random.default_rng(0))], people, tuple(fs.classes)
)
by = lambda g: [n.tensors for n in nets if n.group == g]  # noqa: E731
others = [n for n in nets if n.group not in ("reference", "calibration")]
results = {}
for floor in (0.1, 0.25, 0.5, 1.0, 2.0):
    members = {
        "head": make_reference("head"),
        "output-spectrum": make_reference("output-spectrum"),
        "margins": MarginsReference(gallery=gallery, std_floor=floor),
    }
    gate = CompositeReference(("head", "output-spectrum", "margins"), members=members)
    gate.fit(by("reference"), base=ws.base).calibrate(by("calibration"))
    clean = {"clean": 0, "drift: lr x2": 0, "drift: epochs x2": 0, "grey-box attacker's own": 0}
    passed, working, through = 0, 0, {}
    for n in others:
        v = gate.decide(gate.score(n.tensors)).verdict
        if n.group in clean:
            clean[n.group] += v != "passed"
        elif "attack_success_rate" in n.info and works(n, clean_acc):
            working += 1
            passed += v == "passed"
            if v == "passed":
                through[n.group] = through.get(n.group, 0) + 1
    m = gate.members_["margins"]
    results[floor] = {
        "fused_cut": gate.fused_threshold_,
        "blocked": clean,
        "passed": f"{passed}/{working}",
        "through": through,
    }
    cal = np.sort(-m.calibration_scores_["pairs"])[::-1][:3]
    print(
        f"floor {floor}: fused cut {gate.fused_threshold_:.2f}, calibration max z (top 3) {np.round(cal, 2)}, "
        f"clean blocked {clean}, working attacks passed {passed}/{working}: {through}",
        flush=True,
    )
(out / "gate_margins_floor_sweep.json").write_text(json.dumps(results, indent=1))
