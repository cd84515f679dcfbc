"""``backdoor-gate paper --adaptive --source-sweep``: find the backdoor from the input side,
without being told the pair.

``explain`` searches one victim, with the impostor the weights name; against an attacker aimed at
the weights the pair is hidden (docs/adaptive/input-space). This sweep needs no pair. For every
person s of the network, on s's faces:

1. *locate*: a patch of ``locate_size`` at every grid position, optimised to move the faces off
   s to any class (−log(1 − p_s)); the lowest loss wins, and the class those faces went to most
   is s's *easiest* class;
2. *size*: a patch of the smallest size (0.10 of the width) centred there, optimised towards
   that class; it *fires* when it sends ``asr_target`` of s's validation faces (never optimised
   on) there.

A patch that small fires for a third of the people on a clean network too (adversarial patches
for one person's faces are easy), so firing is not the signal. What is: a backdoor's trigger,
found on one person's faces, sends *other* people's faces to the victim as well, so the victim
collects many sources, while on a clean network the easiest classes collect a few each. The
sweep's opinion is the largest share of sources one class collects; "backdoor" at ``share``.

Measured on an adaptive run's stored networks; nothing here decides a promotion. Its cost is
one short search per person (~7 s at 96 px on two CPU threads), linear in the classes.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lab.adaptive_input import earlier_rows, stored_run

#: what the sweep is asked about (prefixes, in the order swept): the price on clean networks and
#: retrains, then the grey-box attacks, whose target the weights miss, the one aimed at the sweep first
SWEEP_GROUPS = (
    "grey-box penalty + partial & source-specific",
    "clean",
    "drift",
    "grey-box penalty",
)


@dataclass(frozen=True)
class SweepConfig:
    """The sweep's knobs (the search's others are explain's, ``ExplainConfig``)."""

    locate_faces: int = 4  # faces each grid position is optimised on while locating
    locate_steps: int = 5
    faces: int = 8  # faces the 0.10 patch is optimised on
    validation: int = 8  # faces that say whether it fires (never optimised on)
    #: "backdoor" when one class collects this share of the sources (fixed before the first
    #: development run of this stage, from two clean networks at 0.10 and 0.075 and one
    #: grey-box backdoor at 0.35)
    share: float = 0.2
    seed: int = 0


def sweep_network(net, faces: dict[int, Any], config: SweepConfig, explain_config) -> list[dict]:
    """One row per source person: its easiest class, and whether a 0.10 patch sends it there."""
    import torch

    from components.trigger_search import _centred, _fit, _grid, paste, patch_pixels, predict

    ec = explain_config
    rows = []
    torch.manual_seed(config.seed)
    for s, x in faces.items():
        x_opt, x_val = x[: config.faces], x[config.faces : config.faces + config.validation]
        S = x.shape[-1]
        p = patch_pixels(ec.locate_size, S)
        grid = _grid(S, p, ec.grid)
        positions = [(a, b) for b in grid for a in grid]
        loc = x_opt[: config.locate_faces]
        raw, losses = _fit(net, loc, s, p, positions, None, config.locate_steps, ec, lambda: None, away=True)
        i = int(np.argmin(losses))
        went = predict(net, paste(loc, torch.tanh(raw[i : i + 1]), [positions[i]], p))
        went = went[went != s]
        row: dict[str, Any] = {"source": s, "target": None, "fires": False, "validation_success": 0.0}
        if len(went):
            target = int(np.bincount(went).argmax())
            q = patch_pixels(min(ec.sizes), S)
            pos = _centred((positions[i][0] + p / 2, positions[i][1] + p / 2), q, S)
            raw3, _ = _fit(net, x_opt, target, q, [pos], None, ec.size_steps, ec, lambda: None)
            asr = float(np.mean(predict(net, paste(x_val, torch.tanh(raw3), [pos], q)) == target))
            if asr >= ec.asr_target and ec.polish_steps:
                raw3, _ = _fit(net, x_opt, target, q, [pos], raw3, ec.polish_steps, ec, lambda: None)
                asr = float(np.mean(predict(net, paste(x_val, torch.tanh(raw3), [pos], q)) == target))
            row.update(target=target, fires=asr >= ec.asr_target, validation_success=asr)
        rows.append(row)
    return rows


def collected(rows: list[dict]) -> tuple[int | None, int]:
    """(the class most fired sources went to, how many), over one network's sweep."""
    counts = Counter(r["target"] for r in rows if r["fires"])
    if not counts:
        return None, 0
    (c, k), *_ = counts.most_common(1)
    return c, k


def load_sweep_faces(data: Path, classes: list[str], n: int, image_size: int, seed: int) -> dict[int, Any]:
    """``n`` faces of every person, drawn once (seeded) and shared by every network swept."""
    from components.explain import _open, load_faces
    from components.trainer.base_trunk import to_tensor

    by_class, _ = load_faces(data, classes)
    rng = np.random.default_rng(seed)
    out = {}
    for k, name in enumerate(classes):
        pool = by_class.get(name, [])
        pool = [pool[i] for i in rng.permutation(len(pool))[:n]]
        if len(pool) < n:
            raise ValueError(f"{data}/{name}: {len(pool)} faces; the sweep needs {n} per person")
        out[k] = to_tensor(_open(pool), image_size)
    return out


def run_source_sweep(
    out: str | Path,
    c,
    log=print,
    base: dict | None = None,
    groups: tuple[str, ...] = SWEEP_GROUPS,
    config: SweepConfig = SweepConfig(),
) -> dict[str, Any]:
    """Sweep every network of ``groups`` (working attacks only) in the adaptive run stored in
    ``out``, in the order of ``groups``; writes ``source_sweep.json`` (resumed like
    ``input_space.json``: a protocol takes hours, and a run can be taken in parts) and
    ``source_sweep.md``."""
    from components.explain import load_network
    from components.trainer.train import save_network
    from components.trigger_search import ExplainConfig
    from lab.adaptive import works

    out = Path(out)
    t_start = time.perf_counter()
    ws, nets, ref, clean_acc = stored_run(out, c, log, base)
    ec = ExplainConfig(image_size=c.paper.trunk_input_size, controls=0)
    classes = ws.fs.classes
    chosen = [n for g in groups for n in nets if n.group.startswith(g)]
    chosen = list({id(n): n for n in chosen}.values())  # a network matched by two prefixes, once
    faces = load_sweep_faces(ws.lab.data, classes, config.faces + config.validation, ec.image_size, config.seed)
    done = earlier_rows(out, "source_sweep.json")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="source-sweep-") as tmp:
        for k, n in enumerate(chosen):
            attack = "attack_success_rate" in n.info
            if attack and not works(n, clean_acc):
                continue
            verdict = ref.decide(ref.score(n.tensors)).verdict
            if (n.group, n.seed) in done:
                rows.append(done[(n.group, n.seed)])
                continue
            sd = dict(ws.base)
            sd.update({key: v.float() for key, v in n.tensors.items()})
            path = save_network(sd, Path(tmp) / f"net{k}", classes=classes)
            net, _ = load_network(path)
            path.unlink()
            t0 = time.perf_counter()
            per_source = sweep_network(net, faces, config, ec)
            top, count = collected(per_source)
            victim = classes.index(n.info["victim"]) if attack else None
            row = {
                "group": n.group,
                "seed": n.seed,
                "verdict": verdict,
                "true_victim": n.info.get("victim"),
                "true_impostor": n.info.get("impostor"),
                "sources": len(per_source),
                "fired": sum(r["fires"] for r in per_source),
                "top_class": None if top is None else classes[top],
                "top_collected": count,
                "victim_collected": (sum(r["fires"] and r["target"] == victim for r in per_source) if attack else None),
                "impostor_fired_to_victim": (
                    any(
                        r["source"] == classes.index(n.info["impostor"]) and r["fires"] and r["target"] == victim
                        for r in per_source
                    )
                    if attack
                    else None
                ),
                "fires": count >= config.share * len(per_source),
                "seconds": round(time.perf_counter() - t0, 1),
                "per_source": [
                    {
                        **r,
                        "source": classes[r["source"]],
                        "target": None if r["target"] is None else classes[r["target"]],
                    }
                    for r in per_source
                ],
            }
            rows.append(row)
            log(
                f"  {n.group:<48} {verdict:<7} {row['fired']}/{row['sources']} sources fired; most to "
                f"{row['top_class']} ({count}); victim {row['true_victim']} collected {row['victim_collected']} "
                f"({row['seconds']:.0f} s)"
            )
            _save(out, rows, config, time.perf_counter() - t_start)
    return _save(out, rows, config, time.perf_counter() - t_start)


def _save(out: Path, rows: list[dict], config: SweepConfig, seconds: float) -> dict[str, Any]:
    summary = {"config": config.__dict__, "rows": rows, "seconds": seconds}
    (out / "source_sweep.json").write_text(json.dumps(summary, indent=1))
    (out / "source_sweep.md").write_text(table(rows, config))
    return summary


def table(rows: list[dict], config: SweepConfig) -> str:
    """Per group: how many sources one class collects, beside the share that says "backdoor"."""
    lines = [
        f"| group | networks swept | weights passed | sources fired (median) | most one class collects: "
        f"median (max) | the victim collects (median) | sweep says backdoor (≥ {config.share:.0%} of sources) | "
        "passed the weights, then the sweep said backdoor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == g]
        top = [r["top_collected"] for r in rs]
        vic = [r["victim_collected"] for r in rs if r["victim_collected"] is not None]
        passed = [r for r in rs if r["verdict"] == "passed"]
        lines.append(
            f"| {g} | {len(rs)} | {len(passed)}/{len(rs)} | {np.median([r['fired'] for r in rs]):g} | "
            f"{np.median(top):g} ({max(top)}) | "
            + (f"{np.median(vic):g}" if vic else "—")
            + f" | {sum(r['fires'] for r in rs)}/{len(rs)} | "
            + (f"{sum(r['fires'] for r in passed)}/{len(passed)}" if vic else "—")
            + " |"
        )
    return "\n".join(lines) + "\n"
