"""Where the paper protocols' clean retrains sit against the gate with margins: the gate fitted
and calibrated as `paper` fits it (reference and held-out networks, the lab's gallery), then every
fresh clean, drift and sham network's part scores and the parts below their cuts.

    python drift_margins.py OUT   # OUT: `backdoor-gate paper --out OUT` (its protocol: summary.json)
"""
import sys
from pathlib import Path

import numpy as np

from detector.config import ReferenceConfig
from detector.detectors import make_reference
from detector.margins import DEFAULT_FACES
from lab.margins import lab_gallery
from lab.paper import PaperConfig, _Lab, detection_groups, load_networks, run_config

out = Path(sys.argv[1])
c = run_config(out, PaperConfig)
lab = _Lab(c, None, lambda m: None)
nets, W = load_networks(out / "networks.safetensors")
g = detection_groups(nets)
gallery = lab_gallery(lab.fs, DEFAULT_FACES, seed=0)
ref = make_reference("head+output-spectrum+margins", ReferenceConfig.from_dict(c.reference), gallery=gallery)
ref.fit([W[i] for i in g["reference"]], base=lab.base).calibrate([W[i] for i in g["held-out"]])
print("cuts", {k: round(v, 2) for k, v in ref.thresholds_.items()})
cal = ref.calibration_scores_["margins"]
print(f"calibration margins scores: min {cal.min():.2f} median {np.median(cal):.2f}")
for grp in ("weighting", "drift:lr x0.5", "drift:lr x2", "drift:epochs x2", "drift:drop 10%", "sham"):
    for i in g.get(grp, []):
        s = ref.score(W[i])
        d = ref.decide(s)
        print(f"{grp:16s} {nets[i]['seed']:>7} " + " ".join(f"{k} {v:7.2f}" for k, v in s.items()) + f"  below {d.below}")
