"""Scratch (not a stage): a reference fitted on a *range* of recipes, against the drift target.

Why: lr x 2 and epochs x 2 retrains of a clean network are blocked more often than the issue's
1/3 (development adaptive run: lr x 2 3/3 under every draw), because every reference and
calibration network is trained with exactly one recipe, so a legitimate change of recipe moves
the head where no clean network went. If the public recipe is a range (lr x 2^u, u uniform in
[-1, 1], epochs x 1 or x 2, drawn per seed) and the reference and calibration networks are drawn
from it, such retrains are inside what "clean" means. The question is what it costs: every
stored attack is scored, and a grey-box attacker who knows the range (its own clean networks
drawn from it) aims the penalty at the five-part default fitted on it.

    python recipe_range.py OUT train    # clean networks of the range: reference, pool, the
                                        # attacker's own, fresh lr x 2 / epochs x 2 retrains
                                        # (OUT/recipe_range.safetensors)
    python recipe_range.py OUT attack   # grey-box penalties aimed at the range's gate
                                        # (OUT/recipe_range_aimed.safetensors)
    python recipe_range.py OUT table    # both gates over random calibration draws: OUT/recipe_range.txt

On the development adaptive run (2026-12-06) ``train`` (412 s) and ``table`` (753 s) ran; the
table was decisive before any attack aimed at the range's gate (the range's gate blocked 31 % of
the grey-box attacks aimed at the fixed one, against 99 %), so ``attack`` was not run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from loo_cut import _run, fused_z

from detector.composite import _robust, fused_cut

#: networks per group of the range (the pool is drawn from for calibration, the rest is fresh)
SIZES = {"range: reference": 16, "range: pool": 60, "range: attacker's own": 36}
#: fresh retrains of the fixed recipe, beside the run's three of each
DRIFT = {"drift: lr x2": {"lr": 2.0}, "drift: epochs x2": {"epochs": 2.0}}
N_DRIFT = 6
#: the target false rejection rate (the product default)
FRR = 0.05


def recipe_of(seed: int) -> dict:
    """The range's recipe for ``seed``: lr x 2^u (u uniform in [-1, 1]), epochs x 1 or x 2."""
    rng = np.random.default_rng([seed, 77])
    return {"lr": float(2.0 ** rng.uniform(-1.0, 1.0)), "epochs": float(rng.choice([1.0, 2.0]))}


def train(out: Path) -> None:
    from lab.adaptive import _progress, _train, save_nets

    c, ws, _, _ = _run(out)
    o = c.seed_offset + 20_000
    plan = [
        (g, o + 1000 * k + s, recipe_of(o + 1000 * k + s)) for k, (g, n) in enumerate(SIZES.items()) for s in range(n)
    ]
    plan += [(g, o + 5000 + 100 * k + s, r) for k, (g, r) in enumerate(DRIFT.items()) for s in range(N_DRIFT)]
    nets = []
    for g, seed, recipe in _progress(plan, "recipe range"):
        n = _train(ws, g, seed, recipe=recipe)
        n.info["recipe"] = recipe
        nets.append(n)
    save_nets(out / "recipe_range.safetensors", nets)
    print("trained", len(nets))


def _groups(out: Path):
    from lab.adaptive import load_nets

    c, ws, nets, clean_acc = _run(out)
    rr = load_nets(out / "recipe_range.safetensors")
    by = lambda g: [n for n in rr if n.group == g]  # noqa: E731
    return c, ws, nets, clean_acc, rr, by


def range_gate(ws, nets, c, by, draw: int = 0, groups=None):
    """The five-part default fitted on the range's reference networks (calibrated on the pool's
    first 40; the table re-calibrates on random draws)."""
    from lab.adaptive_margins import gate_with_margins

    return gate_with_margins(ws, nets, c, draw, groups or (by("range: reference"), by("range: pool")[:40]))


def attack(out: Path) -> None:
    from concentration import penalty_over, train_aimed

    from lab.adaptive import attacker_split

    c, ws, nets, clean_acc, rr, by = _groups(out)
    gate = range_gate(ws, nets, c, by)
    attacker = range_gate(ws, nets, c, by, draw=1, groups=attacker_split(by("range: attacker's own"), c))
    print("gate cut", gate.fused_threshold_, "attacker's", attacker.fused_threshold_, flush=True)
    aims = [
        (
            margins,
            "grey-box",
            attacker,
            penalty_over(attacker, attacker.thresholds_, c.penalty_lambda, margins, []),
            f"grey-box penalty: default fitted on the recipe range (margins {margins})",
        )
        for margins in ("max", "excess")
    ]

    def judge(tensors: dict):
        s = gate.score(tensors)
        return s, gate.decide(s)

    rows = train_aimed(ws, c, clean_acc, out / "recipe_range_aimed.safetensors", aims, judge, gate)
    (out / "recipe_range_attack.json").write_text(json.dumps(rows, indent=1))
    ok = [r for r in rows if r["works"]]
    print(f"works {len(ok)}/{len(rows)}; passed the range's gate {sum(r['share_gate'] == 'passed' for r in ok)}")


def _scores(gate, nets) -> np.ndarray:
    parts = list(gate.thresholds_)
    return np.array([[gate.score(n.tensors)[p] for p in parts] for n in nets])


def table(out: Path, n_draws: int = 1000, n_cal: int = 40) -> None:
    """Each gate calibrated on ``n_draws`` random draws of ``n_cal`` of its own pool (the rest of
    the pool fresh); every other set scored as fresh."""
    from lab.adaptive import load_nets, works
    from lab.adaptive_margins import gate_with_margins, scored

    c, ws, nets, clean_acc, rr, by = _groups(out)
    aimed_path = out / "recipe_range_aimed.safetensors"
    suite = scored(nets)
    sets = {
        "fixed pool": [n for n in nets if n.group == "calibration"] + load_nets(out / "extra_calibration.safetensors"),
        "range pool": by("range: pool"),
        "fixed clean": [n for n in suite if n.group == "clean"],
        "lr x2": [n for n in suite if n.group == "drift: lr x2"] + by("drift: lr x2"),
        "epochs x2": [n for n in suite if n.group == "drift: epochs x2"] + by("drift: epochs x2"),
        "plain": [n for n in suite if n.group == "plain" and works(n, clean_acc)],
        "suite grey-box": [n for n in suite if n.group.startswith("grey") and works(n, clean_acc)],
        "suite white-box": [n for n in suite if n.group.startswith("penalty") and works(n, clean_acc)],
        "other working attacks": [
            n
            for n in suite
            if "attack_success_rate" in n.info
            and works(n, clean_acc)
            and n.group != "plain"
            and not n.group.startswith(("grey", "penalty"))
        ],
        "grey-box aimed at the fixed gate": [
            n for n in load_nets(out / "loo_networks.safetensors") if n.group.startswith("grey") and works(n, clean_acc)
        ],
        "grey-box aimed at the range's gate": [n for n in load_nets(aimed_path) if works(n, clean_acc)]
        if aimed_path.is_file()
        else [],
    }
    gates = {
        "fixed recipe": gate_with_margins(ws, nets, c),
        "recipe range": range_gate(ws, nets, c, by),
    }
    pools = {"fixed recipe": "fixed pool", "recipe range": "range pool"}
    rng = np.random.default_rng(0)
    header = ["set (networks)"] + list(gates)
    rows = {k: [f"{k} ({len(v)})"] for k, v in sets.items()}
    cuts = ["cut: median (10-90 %)"]
    for name, gate in gates.items():
        X = {k: _scores(gate, v) if v else np.zeros((0, len(gate.thresholds_))) for k, v in sets.items()}
        pool = X[pools[name]]
        blocked = {k: [] for k in sets}
        tcut = []
        for _ in range(n_draws):
            idx = rng.choice(len(pool), n_cal, replace=False)
            st, t, _ = fused_cut({j: pool[idx, j] for j in range(pool.shape[1])}, FRR, _robust)  # MAD, as it ran
            tcut.append(t)
            for k, x in X.items():
                if k == pools[name]:
                    x = np.delete(pool, idx, axis=0)
                blocked[k].append(float(np.mean(fused_z(x, st) < t)) if len(x) else float("nan"))
        q = np.percentile(tcut, [10, 50, 90])
        cuts.append(f"{q[1]:.2f} ({q[0]:.2f} to {q[2]:.2f})")
        for k in sets:
            rows[k].append(f"{100 * np.mean(blocked[k]):.1f} %" if sets[k] else "—")
    lines = [
        f"{out.name}: share blocked (mean over {n_draws} random calibration draws of {n_cal} from each gate's own "
        "pool; the rest of that pool fresh) by the five-part default fitted on the fixed recipe (the run's reference) "
        "and on the recipe range (lr x 2^u, u in [-1, 1], epochs x 1 or 2)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        "| " + " | ".join(cuts) + " |",
        *("| " + " | ".join(r) + " |" for r in rows.values()),
    ]
    text = "\n".join(lines) + "\n"
    (out / "recipe_range.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    {"train": train, "attack": attack, "table": table}[sys.argv[2]](Path(sys.argv[1]))
