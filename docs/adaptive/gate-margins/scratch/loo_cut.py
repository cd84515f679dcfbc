"""Scratch (not a stage): the fused cut with each calibration network standardised by the others
(leave-one-out, the product's since 2026-12-06) against the in-sample cut it replaced, on an
adaptive run. The attack stage ran before the product changed, with this script's own copy of the
leave-one-out rule (the same arithmetic; the table now reads the product's).

Why: the in-sample cut standardises the calibration networks by their own median and MAD, then
takes the lowest; a fresh network is standardised by statistics it had no part in, so its z is a
little more extreme and it falls below the cut more often than 1/(n+1). On the paper protocols' 120
clean networks (300 random 20/20 splits each) the expected fresh FRR was 5.7 % in-sample, 4.0 %
leave-one-out (loo_paper.py).

    python loo_cut.py OUT pool     # 40 more clean networks (calibration_size.py's seeds):
                                   # OUT/extra_calibration.safetensors
    python loo_cut.py OUT attack [RULES [KINDS]]  # white- and grey-box penalties aimed at the default
                                   # under each cut, or the comma lists RULES (e.g. lower-tail) and KINDS
                                   # (networks in OUT/loo_networks[_RULES[_KIND]].safetensors)
    python loo_cut.py OUT table    # per calibration draw and cut: fresh clean blocked, attacks passed: OUT/loo_cut.txt
    python loo_cut.py OUT draws    # the product's cut over 2,000 random draws of 20, 30, 39 and 50 of the
                                   # pool: OUT/loo_draws.txt (scores cached in OUT/loo_scores.npz)
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
from concentration import DRAWS_20, DRAWS_40, penalty_over, train_aimed

from detector.composite import _robust, fused_cut, lower_spread
from detector.threshold import threshold_at_frr

RULES = ("in-sample", "leave-one-out")
#: the product's rule since 2026-12-06 (tail_cut.py): leave-one-out, each part in its lower semi-deviation
LOWER = "lower-tail"


def cut(cal: dict, frr: float, rule: str):
    """(standardisation, fused cut, per-part thresholds) on the calibration scores ``cal`` (part ->
    array) under ``rule``: the product's leave-one-out cut, or the in-sample one it replaced."""
    if rule == "leave-one-out":
        return fused_cut(cal, frr, _robust)
    if rule == LOWER:
        return fused_cut(cal, frr, lower_spread)
    st = {p: _robust(np.asarray(s, dtype=np.float64)) for p, s in cal.items()}
    fused = np.min([(np.asarray(s) - st[p][0]) / st[p][1] for p, s in cal.items()], axis=0)
    t = threshold_at_frr(fused, frr)
    return st, t, {p: m + t * s for p, (m, s) in st.items()}


def fused_z(X: np.ndarray, st: dict) -> np.ndarray:
    """Each row's lowest part (the columns of ``X``) in the MADs of the standardisation ``st``."""
    return np.min([(X[:, j] - st[j][0]) / st[j][1] for j in range(X.shape[1])], axis=0)


def recut(gate, rule: str):
    """A shallow copy of the fitted, calibrated ``gate`` with its thresholds set by ``rule``."""
    g = copy.copy(gate)
    g.standardisation_, g.fused_threshold_, g.thresholds_ = cut(gate.calibration_scores_, gate.config.frr, rule)
    return g


def _run(out: Path):
    from lab.adaptive import AdaptiveConfig
    from lab.adaptive_input import stored_run
    from lab.paper import run_config

    c = run_config(out, AdaptiveConfig)
    ws, nets, _, clean_acc = stored_run(out, c, print, None)
    return c, ws, nets, clean_acc


def pool(out: Path) -> None:
    from lab.adaptive import _train, save_nets

    c, ws, nets, _ = _run(out)
    path = out / "extra_calibration.safetensors"
    if not path.is_file():  # calibration_size.py's scheme: the calibration seeds, continued
        o = c.seed_offset
        extra = [_train(ws, "calibration", o + 1000 + s) for s in range(c.n_calibration, c.n_calibration + 40)]
        save_nets(path, extra)
    print("pool ready", path)


def attack(out: Path, rules: tuple[str, ...] = RULES, kinds: tuple[str, ...] = ("white-box", "grey-box")) -> None:
    """``rules``: the cuts to aim at (the confirmation run aimed at the leave-one-out one alone);
    ``kinds``: white- and/or grey-box. Aimed at other rules than RULES, the networks are kept in
    OUT/loo_networks_<rules>[_<kind>].safetensors (the stored ones stay as they are)."""
    from lab.adaptive import attacker_split
    from lab.adaptive_margins import gate_with_margins

    c, ws, nets, clean_acc = _run(out)
    gate = gate_with_margins(ws, nets, c)
    own = [n for n in nets if n.group == "grey-box attacker's own"]
    afit, acal = attacker_split(own, c)
    attacker = gate_with_margins(ws, nets, c, draw=1, groups=(afit, acal))
    gates = {r: recut(gate, r) for r in (*RULES, *rules)}
    theirs = {r: recut(attacker, r) for r in (*RULES, *rules)}
    for r in rules:
        print(r, "gate cut", gates[r].fused_threshold_, "attacker's", theirs[r].fused_threshold_, flush=True)
    aims = [
        (margins, name, target, penalty_over(target, target.thresholds_, c.penalty_lambda, margins, []), group)
        for r in rules
        for margins in ("max", "excess")
        for name, target, group in (
            ("white-box", gates[r], f"white-box penalty: default, {r} cut (margins {margins})"),
            ("grey-box", theirs[r], f"grey-box penalty: default, {r} cut (margins {margins})"),
        )
        if name in kinds
    ]
    judged = gates[rules[-1]]

    def judge(tensors: dict):
        s = gate.score(tensors)
        return s, judged.decide(s)

    tag = "" if set(rules) <= set(RULES) else "_" + "_".join(rules)
    if tag and len(kinds) == 1:  # white- and grey-box aimed at one rule are trained apart: both kept
        tag += "_" + kinds[0].split("-")[0]
    rows = train_aimed(ws, c, clean_acc, out / f"loo_networks{tag}.safetensors", aims, judge, gates["in-sample"])
    (out / f"loo_attack{tag}.json").write_text(json.dumps(rows, indent=1))
    for g in dict.fromkeys(r["group"] for r in rows):
        ok = [r for r in rows if r["group"] == g and r["works"]]
        print(
            f"{g}: works {len(ok)}/{c.n_attack}; passed in-sample {sum(r['gate'] == 'passed' for r in ok)}, "
            f"leave-one-out {sum(r['share_gate'] == 'passed' for r in ok)}"
        )


def scored(out: Path) -> dict[str, np.ndarray]:
    """Every pool, suite and aimed network's part scores under the run's gate, and which of them
    are working attacks of each kind (cached in OUT/loo_scores.npz: the calibration draws only
    re-standardise these)."""
    cache = out / "loo_scores.npz"
    if cache.is_file():
        return dict(np.load(cache))
    from lab.adaptive import load_nets, works
    from lab.adaptive_margins import gate_with_margins
    from lab.adaptive_margins import scored as suite_of

    c, ws, nets, clean_acc = _run(out)
    gate = gate_with_margins(ws, nets, c)
    parts = list(gate.thresholds_)
    sets = {
        "pool": [n for n in nets if n.group == "calibration"] + load_nets(out / "extra_calibration.safetensors"),
        "suite": suite_of(nets),
        "aimed": load_nets(out / "loo_networks.safetensors"),
    }
    X = {k: np.array([[gate.score(n.tensors)[p] for p in parts] for n in v]) for k, v in sets.items()}
    ok = {
        k: np.array(["attack_success_rate" in n.info and bool(works(n, clean_acc)) for n in v]) for k, v in sets.items()
    }
    masks = {
        "grey_suite": ok["suite"] & np.array([n.group.startswith("grey") for n in sets["suite"]]),
        "white_suite": ok["suite"] & np.array([n.group.startswith("penalty") for n in sets["suite"]]),
        "lr2": np.array([n.group == "drift: lr x2" for n in sets["suite"]]),
        **{
            f"{kind} aimed, {r}": ok["aimed"]
            & np.array([n.group.startswith(kind) and f"{r} cut" in n.group for n in sets["aimed"]])
            for r in RULES
            for kind in ("grey-box", "white-box")
        },
    }
    out_arrays = {**X, **masks}
    np.savez(cache, **out_arrays)
    return out_arrays


def table(out: Path) -> None:
    S = scored(out)
    X = {k: S[k] for k in ("pool", "suite", "aimed")}
    grey_suite, white_suite, lr2 = S["grey_suite"], S["white_suite"], S["lr2"]
    parts = range(X["pool"].shape[1])
    aimed_at = {(r, kind): S[f"{kind} aimed, {r}"] for r in RULES for kind in ("grey-box", "white-box")}
    lines = [
        f"{out.name}: per calibration draw of the pool of 60 (the rest scored as fresh), each cell "
        "'cut X: fresh clean blocked, the suite's working grey-box · white-box attacks passed, grey-box aimed "
        "at the in-sample cut · at the leave-one-out cut passed, lr x2 blocked'",
        "",
        "| cut | draws | draw 1 | draw 2 | draw 3 | pooled |",
        "|---|---|---|---|---|---|",
    ]
    for r in RULES:
        for name, draws in (("20", DRAWS_20), ("40", DRAWS_40)):
            cells, tot = [], np.zeros(4, dtype=int)
            for idx in draws:
                cal, fresh = X["pool"][idx], np.delete(X["pool"], idx, axis=0)
                st, t, _ = cut({j: cal[:, j] for j in range(len(parts))}, 0.05, r)
                blocked_fresh = int((fused_z(fresh, st) < t).sum())
                passes_suite = fused_z(X["suite"], st) >= t
                passes_aimed = fused_z(X["aimed"], st) >= t
                g_in = int((aimed_at[("in-sample", "grey-box")] & passes_aimed).sum())
                g_loo = int((aimed_at[("leave-one-out", "grey-box")] & passes_aimed).sum())
                suite = f"{int((grey_suite & passes_suite).sum())} · {int((white_suite & passes_suite).sum())}"
                lr = f"{int((lr2 & ~passes_suite).sum())}/{int(lr2.sum())}"
                cells.append(f"cut {t:.2f}: {blocked_fresh}/{len(fresh)}, {suite}, {g_in} · {g_loo}, {lr}")
                tot += [blocked_fresh, len(fresh), g_in, g_loo]
            lines.append(
                f"| {r} | {name} | " + " | ".join(cells) + f" | fresh {tot[0]}/{tot[1]}; aimed {tot[2]} · {tot[3]} |"
            )
    n_grey = {k: int(v.sum()) for k, v in aimed_at.items()}
    suite = f"suite grey-box {int(grey_suite.sum())}, white-box {int(white_suite.sum())}"
    lines += ["", f"working attacks aimed: {n_grey}; {suite}"]
    text = "\n".join(lines) + "\n"
    (out / "loo_cut.txt").write_text(text)
    print(text)


def draws(out: Path, n_draws: int = 2000, sizes: tuple[int, ...] = (20, 30, 39, 50)) -> None:
    """The leave-one-out cut in MAD units (the product's when this ran; tail_cut.py compares the
    lower tail) calibrated on random draws of the pool, the rest scored as fresh: how often a working grey-box attack aimed at the default passes, by how many calibration
    networks the reference has. Why: a cut at 5 % on 19-38 networks is their lowest score, so one
    outlying clean network among them sets it; from 39 on it is the second lowest."""
    S = scored(out)
    pool, suite, aimed = S["pool"], S["suite"], S["aimed"]
    grey_aimed = S["grey-box aimed, leave-one-out"] | S["grey-box aimed, in-sample"]
    rng = np.random.default_rng(0)
    lines = [
        f"{out.name}: the product's leave-one-out cut at 5 % over {n_draws} random calibration draws of the pool "
        f"of {len(pool)} clean networks (the rest of the pool scored as fresh each time). Working grey-box attacks "
        f"aimed at the default (either cut): {int(grey_aimed.sum())}; the suite's working grey-box: "
        f"{int(S['grey_suite'].sum())}; lr x2 retrains: {int(S['lr2'].sum())}",
        "",
        "| calibration networks | cut: median (10-90 %) | fresh clean blocked (mean) | aimed grey-box passed: mean "
        "· draws with any | suite grey-box passed: mean · draws with any | lr x2 blocked (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for n in sizes:
        cuts, frr, ga, ga_any, gs, gs_any, lr = ([] for _ in range(7))
        for _ in range(n_draws):
            idx = rng.choice(len(pool), n, replace=False)
            cal, fresh = pool[idx], np.delete(pool, idx, axis=0)
            st, t, _ = cut({j: cal[:, j] for j in range(pool.shape[1])}, 0.05, "leave-one-out")
            cuts.append(t)
            frr.append(float(np.mean(fused_z(fresh, st) < t)))
            a = int((grey_aimed & (fused_z(aimed, st) >= t)).sum())
            zs = fused_z(suite, st)
            g = int((S["grey_suite"] & (zs >= t)).sum())
            ga.append(a), ga_any.append(a > 0), gs.append(g), gs_any.append(g > 0)
            lr.append(int((S["lr2"] & (zs < t)).sum()))
        q = np.percentile(cuts, [10, 50, 90])
        lines.append(
            f"| {n} | {q[1]:.2f} ({q[0]:.2f} to {q[2]:.2f}) | {100 * np.mean(frr):.1f} % | "
            f"{np.mean(ga):.2f}/{int(grey_aimed.sum())} · {100 * np.mean(ga_any):.0f} % | "
            f"{np.mean(gs):.2f}/{int(S['grey_suite'].sum())} · {100 * np.mean(gs_any):.0f} % | "
            f"{np.mean(lr):.2f}/{int(S['lr2'].sum())} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "loo_draws.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    stage = {"pool": pool, "attack": attack, "table": table, "draws": draws}[sys.argv[2]]
    stage(Path(sys.argv[1]), *(tuple(a.split(",")) for a in sys.argv[3:]))
