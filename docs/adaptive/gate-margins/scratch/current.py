"""Scratch (not a stage): the default as shipped on 2026-12-06 (five parts, leave-one-out fused cut,
each part in its lower semi-deviation) against every group of an adaptive run, one row per group.

Why: the README's attacker table had grown one column per day's gate, each under the MAD rule of
its day; this is the one table of the gate that ships now. Nothing is retrained or rescored: the
suite's part scores are loo_cut.py's cache (``RUN/loo_scores.npz``, same order as the run's stored
networks), the aimed attacks' are the attack stage's JSON rows.

Each row: working attacks (or networks, for clean and drift groups), how many pass (attacks) or
are blocked (clean, drift) under the run's own calibration draw (its 20 calibration networks) and
on average over 2,000 random draws of 39 of the pool of 60 clean networks (the reference pipeline
calibrates on 40), the rest of the pool scored as fresh clean networks.

    python current.py RUN [RUN ...]    # prints the tables (markdown)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from loo_cut import fused_z

from detector.composite import fused_cut

FRR = 0.05
N_DRAWS = int(__import__("os").environ.get("N_DRAWS", 2000))
N_CAL = 39


def _cost(infos: list[dict]) -> str:
    """What the working attacks of a group cost the attacker: mean attack success, clean accuracy and
    relative change of the head's weights (blank for clean and drift groups)."""
    if not infos or "attack_success_rate" not in infos[0]:
        return "—"
    m = {
        k: np.mean([i[k] for i in infos if k in i] or [np.nan])
        for k in ("attack_success_rate", "clean_accuracy", "relative_weight_change")
    }
    moved = "—" if np.isnan(m["relative_weight_change"]) else f"{m['relative_weight_change']:.2f}"
    return f"{m['attack_success_rate']:.2f} / {m['clean_accuracy']:.3f} / {moved}"


def _groups(out: Path) -> tuple[list[tuple[str, np.ndarray, int, bool]], np.ndarray]:
    """((group, part scores of its working attacks or of all its clean networks, trained, attack?)
    for every group of the suite and of the aimed attacks in the run's order, the clean pool)."""
    from lab.adaptive import load_nets, works
    from lab.adaptive_margins import scored

    S = dict(np.load(out / "loo_scores.npz"))  # loo_cut.py draws wrote it
    nets = load_nets(out / "networks.safetensors")
    clean_acc = float(np.mean([n.info["clean_accuracy"] for n in nets if n.group in ("reference", "calibration")]))
    suite = scored(nets)
    assert len(suite) == len(S["suite"]), "loo_scores.npz is not this run's suite"
    rows = []
    for g in dict.fromkeys(n.group for n in suite):
        idx = [i for i, n in enumerate(suite) if n.group == g]
        attack = "attack_success_rate" in suite[idx[0]].info
        keep = [i for i in idx if works(suite[i], clean_acc)] if attack else idx
        rows.append((g, S["suite"][keep], len(idx), attack, _cost([suite[i].info for i in keep])))
    for name in ("loo_attack.json", "loo_attack_lower-tail_grey.json", "loo_attack_lower-tail_white.json"):
        path = out / name
        if not path.is_file():
            continue
        aimed = json.loads(path.read_text())
        stored = load_nets(path.with_name(name.replace("attack", "networks")).with_suffix(".safetensors"))
        for g in dict.fromkeys(r["group"] for r in aimed):
            mine = [r for r in aimed if r["group"] == g]
            X = np.array([list(r["scores"].values()) for r in mine if r["works"]]).reshape(-1, S["pool"].shape[1])
            name_now = g.replace("leave-one-out cut", "MAD cut").replace("lower-tail cut", "lower-tail cut (today's)")
            infos = [n.info for n in stored if n.group == g]  # the group's networks, in its rows' order
            assert len(infos) == len(mine), f"{path}: the stored networks are not the attack stage's rows"
            rows.append((name_now, X, len(mine), True, _cost([i for i, r in zip(infos, mine) if r["works"]])))
    return rows, S["pool"]


def family(group: str) -> str:
    """The README's row of a group: what the attacker knows and aims at (clean and drift groups as
    themselves)."""
    aimed = "white-box" if group.startswith("white-box") or group.startswith("penalty") else "grey-box"
    if "default, lower-tail cut" in group:
        return f"{aimed} penalty aimed at the default as shipped"
    if "default," in group:
        return f"{aimed} penalty aimed at the default under the MAD cut (before 2026-12-06)"
    if "+ margins" in group:
        return f"{aimed} penalty aimed at the weights and the lab's margin check"
    if group.startswith("grey-box penalty + adversarial"):
        return "grey-box penalty + adversarial trigger"
    if group.startswith(("penalty", "grey-box penalty")):
        return f"{aimed} penalty aimed at the weights (+ partial / source-specific triggers, invisible noise)"
    if group.startswith("bias swap x"):
        return "bias swaps (6 kinds)"
    if group.startswith("recipe"):
        return "recipe camouflage (lr x5, epochs x4)"
    if group in ("clean", "grey-box attacker's own", "bias-swap base (clean)"):
        return "clean (fresh, the attacker's own, the swaps' bases)"
    return group


def table(out: Path) -> list[str]:
    rows, pool = _groups(out)
    rng = np.random.default_rng(0)
    draws = [np.arange(20)] + [rng.choice(len(pool), N_CAL, replace=False) for _ in range(N_DRAWS)]
    count = {r[0]: np.zeros(len(draws)) for r in rows}
    frr = np.zeros(len(draws))
    for k, idx in enumerate(draws):
        st, t, _ = fused_cut({j: pool[idx, j] for j in range(pool.shape[1])}, FRR)
        frr[k] = np.mean(fused_z(np.delete(pool, idx, axis=0), st) < t)
        for g, X, _, attack, _ in rows:
            if len(X):
                z = fused_z(X, st)
                count[g][k] = np.sum(z >= t) if attack else np.sum(z < t)
    lines = [
        f"{out.name}: the default as shipped (lower semi-deviation, leave-one-out); the run's own draw of 20 "
        f"calibration networks · mean over {N_DRAWS} draws of {N_CAL} of the pool of {len(pool)}",
        "",
        "| group | working (of trained) | success / clean acc. / weights moved | passed: the run's draw · over "
        "draws (attacks); blocked (clean, drift) |",
        "|---|---|---|---|",
        f"| fresh clean (the rest of the pool) | {len(pool) - 20} · {len(pool) - N_CAL} | — | blocked "
        f"{100 * frr[0]:.1f} % · {100 * frr[1:].mean():.1f} % |",
    ]
    for g, X, n, attack, cost in rows:
        verb = "passed" if attack else "blocked"
        k = len(X)
        lines.append(f"| {g} | {k} of {n} | {cost} | {verb} {int(count[g][0])}/{k} · {count[g][1:].mean():.2f}/{k} |")
    fams: dict[str, list] = {}
    for g, X, n, attack, _ in rows:
        f = fams.setdefault(family(g), [0, 0, attack, np.zeros(len(draws))])
        f[0], f[1], f[3] = f[0] + len(X), f[1] + n, f[3] + count[g]
    lines += [
        "",
        "By the README's rows:",
        "",
        "| row | working (of trained) | passed (attacks) / blocked: the run's draw · over draws |",
        "|---|---|---|",
    ]
    for f, (k, n, attack, c) in fams.items():
        lines.append(
            f"| {f} | {k} of {n} | {'passed' if attack else 'blocked'} {int(c[0])}/{k} · {c[1:].mean():.2f}/{k} |"
        )
    return lines


if __name__ == "__main__":
    for a in sys.argv[1:]:
        print("\n".join(table(Path(a))) + "\n")
