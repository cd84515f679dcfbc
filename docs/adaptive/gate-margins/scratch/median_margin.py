import collections
import sys
from pathlib import Path

import numpy as np

from detector.margins import own_entries, pair_margins
from lab.adaptive import AdaptiveConfig, Workshop, load_nets
from lab.margins import lab_gallery
from lab.paper import run_config

out = Path(sys.argv[1])
c = run_config(out, AdaptiveConfig)
ws = Workshop(c, lambda m: None, None)
nets = load_nets(out / "networks.safetensors")
g = lab_gallery(ws.fs, c.margins.faces, c.margins.seed)
mask = ~own_entries(g.sources, (len(g.classes), len(g.sources)))
by = collections.defaultdict(list)
for n in nets:
    if n.group.startswith(("reference", "calibration", "clean", "drift", "grey-box penalty: ", "penalty: head+output-spectrum", "plain", "grey-box penalty + margins: ")):
        by[n.group].append(float(np.median(pair_margins(n.tensors, g)[mask])))
for k, v in by.items(): print(k[:40].ljust(40), np.round(np.median(v), 2), np.round(min(v), 2), np.round(max(v), 2))
