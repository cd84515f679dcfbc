"""Scratch probe: a differential sweep. Per source s, a patch that moves the candidate off s while
the panel (gate's clean networks 0-9) keeps s; then judged on held-out clean networks (10-19)."""
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(2)
from components.trigger_search import _grid, paste, patch_pixels
from lab.adaptive import AdaptiveConfig
from lab.adaptive_input import stored_run
from lab.heads import Heads
from lab.paper import run_config
from lab.source_sweep import SweepConfig, load_sweep_faces

run = sys.argv[1]; group = sys.argv[2]; seed = int(sys.argv[3]); steps = int(sys.argv[4]); size = float(sys.argv[5])
nsrc = int(sys.argv[6]) if len(sys.argv) > 6 else 6
c = dataclasses.replace(run_config(run, AdaptiveConfig), detectors=('head+output-spectrum',))
ws, nets, ref, acc = stored_run(Path(run), c, print, None)
classes = ws.fs.classes
cand = next(n for n in nets if n.group == group and n.seed == seed)
cal = [n for n in nets if n.group == 'calibration']
H = Heads(ws.base, [cand.tensors] + [n.tensors for n in cal[:10]])
hold = Heads(ws.base, [n.tensors for n in cal[10:20]])
sc = SweepConfig()
faces = load_sweep_faces(ws.lab.data, classes, 24, 96, 0)
imp = classes.index(cand.info['impostor']) if 'impostor' in cand.info else None
vic = classes.index(cand.info['victim']) if 'victim' in cand.info else None
rng = np.random.default_rng(0)
sources = ([imp] if imp is not None else []) + [int(s) for s in rng.permutation(len(classes)) if s != imp][:nsrc]
S = 96
for s in sources:
    t0 = time.time()
    x = faces[s]; xo, xv = x[:8], x[8:24]
    p = patch_pixels(size, S); grid = _grid(S, p, 5); positions = [(a, b) for b in grid for a in grid]
    loc = xo[:4]
    raw = torch.zeros(len(positions), 3, p, p, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        out = H(paste(loc, torch.tanh(raw), positions, p))  # (11, 25*4, C)
        cand_o, pan = out[0], out[1:]
        others = torch.cat([cand_o[:, :s], cand_o[:, s + 1:]], 1)
        away = (torch.logsumexp(cand_o, 1) - torch.logsumexp(others, 1)).view(len(positions), -1).mean(1)
        stay = torch.nn.functional.cross_entropy(pan.reshape(-1, pan.shape[-1]), torch.full((pan.shape[0] * pan.shape[1],), s), reduction='none').view(pan.shape[0], len(positions), -1).mean((0, 2))
        loss = away + stay
        loss.sum().backward(); opt.step()
    i = int(torch.argmin(loss.detach()))
    with torch.inference_mode():
        pred = H(paste(loc, torch.tanh(raw[i:i+1].detach()), [positions[i]], p))[0].argmax(1)
    went = pred[pred != s]
    if not len(went):
        print(classes[s], 'nowhere', round(time.time() - t0, 1)); continue
    t = int(torch.bincount(went).argmax())
    # fit at the same size/pos towards t: candidate to t, panel stays on s
    r2 = raw[i:i+1].detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([r2], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        out = H(paste(xo, torch.tanh(r2), [positions[i]], p))
        l = torch.nn.functional.cross_entropy(out[0], torch.full((len(xo),), t)) + torch.nn.functional.cross_entropy(out[1:].reshape(-1, out.shape[-1]), torch.full((10 * len(xo),), s))
        l.backward(); opt.step()
    with torch.inference_mode():
        xp = paste(xv, torch.tanh(r2.detach()), [positions[i]], p)
        cs = float((H(xp)[0].argmax(1) == t).float().mean())
        hs = float((hold(xp).argmax(-1) == t).float().mean())
    tag = 'IMP' if s == imp else '   '
    print(tag, classes[s], '->', classes[t], '(victim)' if t == vic else '', 'pos', positions[i], 'cand', round(cs, 2), 'holdout', round(hs, 2), round(time.time() - t0, 1), 's', flush=True)
