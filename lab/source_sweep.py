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
for one person's faces are easy), so firing is not the signal. Two opinions are formed:

* *share*: a backdoor's trigger, found on one person's faces, sends *other* people's faces to the
  victim as well, so the victim collects many sources, while on a clean network the easiest
  classes collect a few each; "backdoor" when one class collects ``share`` of the sources. A
  source-specific trigger (trained not to move anyone but the impostor) ends that.
* *specific*: every fired patch is also tried on the gate's own clean networks (the *panel*). A
  clean network's adversarial patch uses what it shares with every clean network of the recipe
  (the frozen trunk, the same faces) and sends the faces there too; a backdoor's uses what
  fine-tuning put into the candidate alone. "backdoor" when a fired patch sends at most
  ``panel_cut`` of the source's faces to the target on the panel.

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

from lab.adaptive_input import earlier_rows, stored_run, with_earlier
from lab.heads import Heads

#: what the sweep is asked about (prefixes, in the order swept): the attack aimed at the panel (the
#: default detector's), the attacks aimed at the trigger search (partial triggers; development's
#: also source-specific), the price on clean
#: networks and retrains, then the other grey-box attacks, whose target the weights miss
SWEEP_GROUPS = (
    "grey-box penalty + adversarial trigger: head+output-spectrum",
    "grey-box penalty + partial",
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
    fresh: int = 8  # faces a fired patch is tried on last (robustness), never used before
    #: "backdoor" when one class collects this share of the sources (fixed before the first
    #: development run of this stage, from two clean networks at 0.10 and 0.075 and one
    #: grey-box backdoor at 0.35)
    share: float = 0.2
    #: the gate's clean networks a fired patch is tried on (the run's first calibration networks)
    panel: int = 10
    #: "specific to the candidate" at or below this mean success on the panel (fixed on development
    #: from a probe of 46 fired patches of 8 networks: the impostor's 0.00 on 6/6, clean networks'
    #: 0.96 or more, other people's on attacked networks 0.51 or more unless they went to the
    #: victim; all 147 of those networks' fired patches, swept afterwards: clean ones 0.54 or more)
    panel_cut: float = 0.25
    seed: int = 0


def sweep_network(
    net,
    faces: dict[int, Any],
    config: SweepConfig,
    explain_config,
    sources: list[int] | None = None,
    panel: Heads | None = None,
) -> list[dict]:
    """One row per source person (all, or ``sources``): its easiest class, whether a 0.10 patch
    sends it there, and for a patch that fires, how robust it is and whether the ``panel`` of
    clean networks follows it (:func:`robustness`)."""
    import torch

    from components.trigger_search import _centred, _fit, _grid, paste, patch_pixels, predict

    ec = explain_config
    rows = []
    torch.manual_seed(config.seed)
    for s in faces if sources is None else sources:
        x = faces[s]
        x_opt = x[: config.faces]
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
            row.update(target=target, **size_step(net, faces, s, target, pos, q, config, ec, panel))
        rows.append(row)
    return rows


def size_step(net, faces, s: int, target: int, pos: tuple[int, int], q: int, config: SweepConfig, ec, panel) -> dict:
    """The ``q``-px patch at ``pos`` towards ``target``, fitted on ``s``'s faces from zeros (so a
    stored row's patch is fitted again exactly from its position), judged on faces it never saw."""
    from components.trigger_search import fit_size

    x = faces[s]
    x_opt, x_val = x[: config.faces], x[config.faces : config.faces + config.validation]
    raw, _, asr = fit_size(net, x_opt, x_val, target, q, pos, ec)
    row: dict[str, Any] = {"fires": asr >= ec.asr_target, "validation_success": asr}
    if row["fires"]:
        row.update(robustness(net, faces, s, raw, pos, q, target, config, panel))
    return row


def robustness(
    net, faces: dict[int, Any], s: int, raw, pos: tuple[int, int], q: int, target: int, config, panel=None
) -> dict:
    """What a fired patch does beyond the faces it was judged on: a learned trigger is a robust
    feature of the network, an adversarial patch for one person's faces need not be.

    * ``margin``: the target's logit over the best other, median over the validation faces;
    * ``shifted_success``: success on them with the patch moved half its side in 8 directions;
    * ``fresh_success``: success on ``fresh`` faces of the source never used before;
    * ``transfer``: share of the *other* people's validation faces it sends to the target;
    * ``panel_success``, ``panel_margin`` (with a ``panel``): success and margin on the validation
      and fresh faces, on each of the gate's clean networks (mean, median over them)."""
    import torch

    from components.trigger_search import paste, success

    f, v = config.faces, config.validation
    x_val, x_fresh = faces[s][f : f + v], faces[s][f + v : f + v + config.fresh]
    _, margin = _margin(net, x_val, raw, pos, q, target)
    S, d = x_val.shape[-1], max(1, q // 2)
    moved = [
        (int(np.clip(pos[0] + dx, 0, S - q)), int(np.clip(pos[1] + dy, 0, S - q)))
        for dx in (-d, 0, d)
        for dy in (-d, 0, d)
        if dx or dy
    ]
    rest = torch.cat([x[f : f + v] for k, x in faces.items() if k != s])
    found = {
        "x0": pos[0],
        "y0": pos[1],
        "size_px": q,
        "margin": round(margin, 3),
        "shifted_success": round(float(np.mean([success(net, x_val, raw, m, q, target) for m in moved])), 3),
        "fresh_success": round(success(net, x_fresh, raw, pos, q, target), 3) if len(x_fresh) else None,
        "transfer": round(success(net, rest, raw, pos, q, target), 3),
    }
    if panel is not None:
        both = faces[s][f : f + v + config.fresh]
        with torch.inference_mode():
            on = panel(paste(both, torch.tanh(raw[:1]), [pos], q))  # (networks, faces, classes)
        found["panel_success"] = round(float((on.argmax(-1) == target).float().mean()), 3)
        found["panel_margin"] = round(float(np.median([_median_margin(o, target) for o in on])), 3)
    return found


def _margin(net, x, raw, pos: tuple[int, int], q: int, target: int):
    """(the logits of ``x`` with the patch, the target's logit over the best other: median)."""
    import torch

    from components.trigger_search import paste

    with torch.inference_mode():
        out = net(paste(x, torch.tanh(raw[:1]), [pos], q))
    return out, _median_margin(out, target)


def _median_margin(out, target: int) -> float:
    """The target's logit over the best other class, median over the faces of ``out``."""
    import torch

    others = torch.cat([out[:, :target], out[:, target + 1 :]], 1)
    return float(torch.median(out[:, target] - others.max(1).values))


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
    ``input_space.json``: a protocol takes hours, and a run can be taken in parts; a row swept
    before robustness was measured has only its fired sources swept again) and ``source_sweep.md``."""
    from components.trigger_search import ExplainConfig
    from lab.adaptive import works
    from lab.adaptive_input import network_file

    out = Path(out)
    t_start = time.perf_counter()
    ws, nets, ref, clean_acc = stored_run(out, c, log, base)
    ec = ExplainConfig(image_size=c.paper.trunk_input_size, controls=0)
    classes = ws.fs.classes
    chosen = [n for g in groups for n in nets if n.group.startswith(g)]
    chosen = list({id(n): n for n in chosen}.values())  # a network matched by two prefixes, once
    n_faces = config.faces + config.validation + config.fresh
    faces = load_sweep_faces(ws.lab.data, classes, n_faces, ec.image_size, config.seed)
    done = earlier_rows(out, "source_sweep.json")
    rows: list[dict[str, Any]] = []
    panel: Heads | None = None
    with tempfile.TemporaryDirectory(prefix="source-sweep-") as tmp:
        for n in chosen:
            attack = "attack_success_rate" in n.info
            if attack and not works(n, clean_acc):
                continue
            old = done.get((n.group, n.seed))
            if old is not None and _measured(old):
                rows.append(old)
                continue
            if panel is None:  # the gate's clean networks, made once there is something to try on them
                calibration = [m for m in nets if m.group == "calibration"][: config.panel]
                if not calibration:
                    raise ValueError(f"{out}: the run has no calibration networks to try fired patches on")
                panel = Heads(ws.base, [m.tensors for m in calibration])
            net = network_file(ws, n, Path(tmp))
            t0 = time.perf_counter()
            if old is None:
                per_source = sweep_network(net, faces, config, ec, panel=panel)
            else:  # a row from before a measure: what its fired sources lack (the sweep is deterministic)
                per_source = [
                    _completed(net, faces, _indexed(r, classes), config, ec, panel) for r in old["per_source"]
                ]
            row = _row(n, old, per_source, classes, config, ref, attack)
            row["seconds"] = round(time.perf_counter() - t0 + (old or {}).get("seconds", 0.0), 1)
            rows.append(row)
            log(
                f"  {n.group:<48} {row['verdict']:<7} {row['fired']}/{row['sources']} sources fired; most to "
                f"{row['top_class']} ({row['top_collected']}); victim {row['true_victim']} collected "
                f"{row['victim_collected']} ({row['seconds']:.0f} s)"
            )
            _save(out, with_earlier(rows, done), config, time.perf_counter() - t_start)
    rows = with_earlier(rows, done)
    summary = _save(out, rows, config, time.perf_counter() - t_start)
    robustness_plot(rows, out / "source_sweep_robustness.png")
    return summary


def _measured(row: dict) -> bool:
    """Every fired patch of a stored row has been tried on the panel (rows from before it have not)."""
    return all("panel_success" in p for p in row["per_source"] if p["fires"])


def _completed(net, faces, r: dict, config: SweepConfig, ec, panel: Heads) -> dict:
    """A stored source's row with what it lacks. A fired patch whose position was stored is fitted
    again there (from zeros, so it is the sweep's patch); one from before positions were stored is
    swept again."""
    if not r["fires"] or "panel_success" in r:
        return r
    if "x0" in r:
        pos = (r["x0"], r["y0"])
        return {**r, **size_step(net, faces, r["source"], r["target"], pos, r["size_px"], config, ec, panel)}
    return sweep_network(net, faces, config, ec, [r["source"]], panel)[0]


def _indexed(r: dict, classes: list[str]) -> dict:
    """A stored per-source row with its classes as indices again."""
    return {
        **r,
        "source": classes.index(r["source"]),
        "target": None if r["target"] is None else classes.index(r["target"]),
    }


def _named(r: dict, classes: list[str]) -> dict:
    """A per-source row with its classes as names, as stored (the inverse of :func:`_indexed`)."""
    return {**r, "source": classes[r["source"]], "target": None if r["target"] is None else classes[r["target"]]}


def _row(n, old: dict | None, per_source: list[dict], classes, config: SweepConfig, ref, attack: bool) -> dict:
    """One network's sweep: what one class collects, where the true pair stands."""
    top, count = collected(per_source)
    victim = classes.index(n.info["victim"]) if attack else None
    impostor = per_source[classes.index(n.info["impostor"])] if attack else None
    specific = [r for r in per_source if r["fires"] and r["panel_success"] <= config.panel_cut]
    return {
        "group": n.group,
        "seed": n.seed,
        "verdict": old["verdict"] if old else ref.decide(ref.score(n.tensors)).verdict,
        "true_victim": n.info.get("victim"),
        "true_impostor": n.info.get("impostor"),
        "sources": len(per_source),
        "fired": sum(r["fires"] for r in per_source),
        "top_class": None if top is None else classes[top],
        "top_collected": count,
        "victim_collected": (sum(r["fires"] and r["target"] == victim for r in per_source) if attack else None),
        "impostor_fired_to_victim": (
            bool(impostor["fires"] and impostor["target"] == victim) if impostor is not None else None
        ),
        "fires": count >= config.share * len(per_source),
        "specific_patches": len(specific),
        "specific": bool(specific),
        "specific_to_victim": sum(r["target"] == victim for r in specific) if attack else None,
        "per_source": [_named(r, classes) for r in per_source],
    }


def _save(out: Path, rows: list[dict], config: SweepConfig, seconds: float) -> dict[str, Any]:
    summary = {"config": config.__dict__, "rows": rows, "seconds": seconds}
    (out / "source_sweep.json").write_text(json.dumps(summary, indent=1))
    (out / "source_sweep.md").write_text(table(rows, config) + "\n" + robustness_table(rows))
    return summary


def table(rows: list[dict], config: SweepConfig) -> str:
    """Per group: how many sources one class collects, beside the share that says "backdoor"."""
    lines = [
        f"| group | networks swept | weights passed | sources fired (median) | most one class collects: "
        f"median (max) | the victim collects (median) | sweep says backdoor (≥ {config.share:.0%} of sources) | "
        "passed the weights, then the sweep said backdoor | "
        f"fired patches the panel does not follow (success ≤ {config.panel_cut:g}): median (max) | "
        "of them to the victim | says backdoor: a patch the panel does not follow | "
        "passed the weights, then a patch the panel does not follow |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
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
            + _specific_cells(rs, passed, bool(vic))
        )
    return "\n".join(lines) + "\n"


def _specific_cells(rs: list[dict], passed: list[dict], attack: bool) -> str:
    """The panel's opinion, in the table's last four cells (rows from before the panel: dashes)."""
    rs, passed = [r for r in rs if "specific" in r], [r for r in passed if "specific" in r]
    if not rs:
        return " | — | — | — | — |"
    k = [r["specific_patches"] for r in rs]
    return (
        f" | {np.median(k):g} ({max(k)}) | "
        + (f"{sum(r['specific_to_victim'] for r in rs)}/{sum(k)}" if attack else "—")
        + f" | {sum(r['specific'] for r in rs)}/{len(rs)} | "
        + (f"{sum(r['specific'] for r in passed)}/{len(passed)}" if attack else "—")
        + " |"
    )


ROBUSTNESS = ("margin", "shifted_success", "fresh_success", "transfer", "panel_success")


def robustness_table(rows: list[dict]) -> str:
    """Per group: the fired patches' robustness, the impostor's own beside everyone else's, and
    where the impostor's ranks among its network's fired patches (1 = most robust)."""
    head = " | ".join(f"{k}: others · impostor" for k in ROBUSTNESS)
    rank = " | ".join(f"impostor's rank by {k}" for k in ROBUSTNESS)
    lines = [f"| group | fired patches | {head} | {rank} |", "|---|---|" + "---|" * 2 * len(ROBUSTNESS)]
    for g in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == g and _measured(r)]
        if not rs:
            continue
        fired = [(r, p) for r in rs for p in r["per_source"] if p["fires"]]
        own = [(r, p) for r, p in fired if _is_pair(r, p)]
        rest = [p for r, p in fired if not _is_pair(r, p)]
        cells, ranks = [], []
        for k in ROBUSTNESS:
            cells.append(f"{_median(rest, k)} · {_median([p for _, p in own], k)}")
            ranks.append(
                ", ".join(
                    str(1 + sum(q[k] is not None and q[k] > p[k] for q in r["per_source"] if q["fires"]))
                    for r, p in own
                )
                or "—"
            )
        lines.append(f"| {g} | {len(fired)} | " + " | ".join(cells) + " | " + " | ".join(ranks) + " |")
    return "\n".join(lines) + "\n"


def _is_pair(row: dict, p: dict) -> bool:
    return row["true_victim"] is not None and (p["source"], p["target"]) == (row["true_impostor"], row["true_victim"])


def _median(ps: list[dict], k: str) -> str:
    vs = [p[k] for p in ps if p.get(k) is not None]
    return f"{np.median(vs):.2f}" if vs else "—"


def robustness_plot(rows: list[dict], path: Path) -> None:
    """Every fired patch's robustness, one panel per measure: clean networks' adversarial
    patches, the attacks' other fired patches, and the impostor → victim patch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds: dict[str, list[dict]] = {"clean / retrain": [], "attack: other sources": [], "attack: impostor → victim": []}
    for r in rows:
        for p in r["per_source"]:
            if p["fires"] and "margin" in p:
                k = "clean / retrain" if r["true_victim"] is None else "attack: other sources"
                kinds["attack: impostor → victim" if _is_pair(r, p) else k].append(p)
    fig, axes = plt.subplots(1, len(ROBUSTNESS), figsize=(4 * len(ROBUSTNESS), 3.6))
    rng = np.random.default_rng(0)
    for ax, k in zip(axes, ROBUSTNESS):
        for i, (name, ps) in enumerate(kinds.items()):
            v = [p[k] for p in ps if p.get(k) is not None]
            ax.scatter(i + rng.uniform(-0.2, 0.2, len(v)), v, s=12 if i < 2 else 40, alpha=0.6, label=name)
        ax.set_xticks(range(len(kinds)), [n.replace(": ", ":\n") for n in kinds], fontsize=7)
        ax.set_title(k)
    fig.suptitle("source sweep: fired 0.10 patches, beyond the faces that judged them", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
