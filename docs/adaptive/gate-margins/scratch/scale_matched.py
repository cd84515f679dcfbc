"""Scratch (not a stage): a grey-box attack aimed at what the margins part mostly catches.

Development and confirmation said (docs/adaptive/README.md, "what drift costs") that most of what `margins`
catches in a penalised backdoor is that the penalty holds the whole head back: every margin on
clean faces less negative, a gentler recipe's signature. A network-wide level is the easiest
thing for a grey-box attacker to estimate: the median margin of its own clean networks on its
own draw of faces. So on the seeds and pairs of ``penalty + margins`` this trains, beside the
grey-box penalty, a hinge that keeps the network's median margin at least as negative as its
own clean networks' median (λ_scale · relu((median − target) / |target|)², λ_scale 10; in
linear units: a fresh head's margins start near 0, where a log is undefined):

* ``grey-box penalty + scale``: the penalty against the attacker's own ``head+output-spectrum``;
* ``grey-box penalty (gate with margins) + scale``: against its own gate with margins (as
  aimed_at_gate.py's grey-box attack), plus the hinge.

Run: python scale_matched.py OUT (OUT: a finished adaptive run, development or confirmation); writes
OUT/scale_matched.json.
"""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from detector.margins import own_entries, pair_margins
from lab.adaptive import AdaptiveConfig, _train, attacker_reference, attacker_split, penalty_for, torch_head, works
from lab.adaptive_input import stored_run
from lab.adaptive_margins import gate_verdicts, gate_with_margins
from lab.heads import head_of
from lab.margins import lab_gallery
from lab.paper import run_config

LAMBDA_SCALE = 10.0

out = Path(sys.argv[1])
c = dataclasses.replace(run_config(out, AdaptiveConfig), detectors=("head+output-spectrum",))
ws, nets, default, clean_acc = stored_run(out, c, print, None)
gate = gate_with_margins(ws, nets, c)
own = [n for n in nets if n.group == "grey-box attacker's own"]
own_gate = gate_with_margins(ws, nets, c, draw=1, groups=attacker_split(own, c))
own_default = attacker_reference("head+output-spectrum", own, c, ws.base)
faces = lab_gallery(ws.fs, c.margins.faces, c.margins.seed + 1)  # the attacker's own draw
mask = ~own_entries(faces.sources, (len(faces.classes), len(faces.sources)))


def median_margin(M: np.ndarray) -> float:
    return float(np.median(M[mask]))


target = float(np.median([median_margin(pair_margins(n.tensors, faces)) for n in own]))
print(f"the attacker's own clean networks' median margin: {target:.3f}")
F = torch.from_numpy(np.asarray(faces.features, dtype=np.float64))
src = torch.from_numpy(np.asarray(faces.sources, dtype=np.int64))
keep = torch.from_numpy(mask)


def scale_hinge(head) -> torch.Tensor:
    A, b = head_of({k: v.double() for k, v in torch_head(head).items()})
    L = torch.einsum("skd,cd->skc", F, A) + b
    M = torch.quantile(L - L[torch.arange(len(src)), :, src][:, :, None], 0.5, dim=1).T
    med = torch.quantile(M[keep], 0.5)
    return LAMBDA_SCALE * torch.relu((med - target) / abs(target)) ** 2


def plus_hinge(penalty):
    return lambda head: penalty(head) + scale_hinge(head)


rows = []
for name, ref in (("grey-box penalty + scale", own_default), ("grey-box penalty (gate with margins) + scale", own_gate)):
    for i in range(c.n_attack):
        seed = c.seed_offset + 8000 + i
        n = _train(ws, name, seed, ws.poisoned(seed), penalty=plus_hinge(penalty_for([ref], c.penalty_lambda)))
        rows.append(
            {
                "attack": name,
                "seed": seed,
                "works": bool(works(n, clean_acc)),
                "attack_success_rate": n.info["attack_success_rate"],
                "clean_accuracy": n.info["clean_accuracy"],
                "median_margin": median_margin(pair_margins(n.tensors, faces)),
                **gate_verdicts(n, gate, default),
                "own_estimate": ref.decide(ref.score(n.tensors)).verdict,
            }
        )
        print(rows[-1], flush=True)
summary = {"thresholds": gate.thresholds_, "target_median_margin": target, "lambda_scale": LAMBDA_SCALE, "rows": rows}
(out / "scale_matched.json").write_text(json.dumps(summary, indent=1))
for name in dict.fromkeys(r["attack"] for r in rows):
    rs = [r for r in rows if r["attack"] == name]
    ok = [r for r in rs if r["works"]]
    print(
        f"{name}: works {len(ok)}/{len(rs)}; passed the gate with margins {sum(r['gate'] == 'passed' for r in ok)}"
        f"/{len(ok)}; passed the default {sum(r['default'] == 'passed' for r in ok)}/{len(ok)}"
    )
