"""Scratch (not a stage): a fourth part, how much of a class's whitened deviation lies on a single
kept direction of `head`'s metric (2026-12-05).

Why: the attacks that hold the margins low move the victim's *offset* (``b_c``, the last
coordinate of ``h_c = [A_c, b_c]``): clean networks' offsets vary more than anything else, so the
offset is `head`'s cheapest direction (its top eigen-direction is the offset to 0.999) and the
penalty spends the class's deviation there. On development the flagged class of those attacks put
25–53 % of its whitened deviation on that one direction; clean networks' classes 1.6 % (90th
percentile 2.3 %), lr × 2 retrains 1.2 %, plain backdoors 1.3 %. So, per class,
``share_c = max_j (u_jᵀ d_c)² (w_j + 1/2τ) / q_c`` (``q_c``: `head`'s whitened statistic), and the
part scores a network ``−max_c log share_c`` (higher = more typical), standardised and cut with
the other three as the gate cuts (:func:`detector.composite.fused_cut`).

    python concentration.py OUT suite    # three calibration draws, every stored network: OUT/concentration_suite.txt
    python concentration.py OUT attack   # attacks aimed at it: OUT/concentration.json
                                         # (networks kept in OUT/concentration_networks.safetensors)

The suite stage needs calibration_size.py's extra clean networks, excess.py's and head_floor.py's
attacks. The attack stage trains, on the seeds and pairs of ``penalty + margins``, a white-box
penalty aimed at the four-part gate and a grey-box one aimed at the attacker's own (its own clean
networks and draw of faces), each with the margins part read as the gate reads it (its largest
entry) and as excess.py's Σ (z − 2)₊ (the aim that passes today's default on confirmation).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from detector.composite import fused_cut
from detector.decision import decide

SHARE = "share"


def whitened(view, D):
    """(per-direction contributions V (classes × kept directions), q per class) of deviations D;
    numpy or torch, as :meth:`detector.head.HeadDeviationView._parts`."""
    lib = torch if isinstance(D, torch.Tensor) else np
    U = view.directions_.astype(np.float64)
    wf = view.weights_ + view.floor_
    if lib is torch:
        U, wf = torch.from_numpy(U), torch.from_numpy(wf)
    P = D @ U
    V = P * P * wf
    q = V.sum(1) + view.floor_ * ((D * D).sum(1) - (P * P).sum(1))
    return V, q


def share_score(view, H: np.ndarray) -> float:
    """−max over classes of log(the top direction's share of the class's whitened deviation)."""
    V, q = whitened(view, H.astype(np.float64) - view.center_)
    return -float(np.max(np.log(V.max(1) / q)))


class TorchShare:
    """The share part in torch (its score negated), differentiable in the head."""

    def __init__(self, view):
        self.view = view

    def torch_anomaly(self, t: dict) -> torch.Tensor:
        from detector.classifier import BN_EPS

        s = t["last_bn.weight"] / torch.sqrt(t["last_bn.running_var"] + BN_EPS)
        L = t["logits.weight"].double()
        A = L @ (s[:, None] * t["last_linear.weight"]).double()
        b = L @ (t["last_bn.bias"] - s * t["last_bn.running_mean"]).double() + t["logits.bias"].double()
        H = torch.cat([A - A.mean(0, keepdim=True), (b - b.mean())[:, None]], dim=1)
        V, q = whitened(self.view, H - torch.from_numpy(self.view.center_.astype(np.float64)))
        return torch.log(V.max(1).values / q).max().reshape(1)


class ShareGate:
    """``gate`` (a fitted, calibrated head+output-spectrum+margins) with the share part added, the
    four parts standardised and cut once on the same calibration networks."""

    def __init__(self, gate, calibration: list[dict], frr: float = 0.05):
        self.gate, self.head = gate, gate.members_["head"]
        self.view = self.head.views_["classes"]
        cal = [self.score(t) for t in calibration]
        self.standardisation_, self.fused_threshold_, self.thresholds_ = fused_cut(
            {p: np.array([s[p] for s in cal]) for p in cal[0]}, frr
        )

    def score(self, tensors: dict, gate_scores: dict[str, float] | None = None) -> dict[str, float]:
        share = share_score(self.view, self.head._head_matrix(tensors, "<candidate>"))
        return {**(gate_scores or self.gate.score(tensors)), SHARE: share}

    def decide(self, scores: dict[str, float]):
        return decide(scores, self.thresholds_)


def penalty_aimed_at(sgate: ShareGate, lam: float, margins: str, margin: float = 1.0):
    """``λ·Σ softplus(anomaly − cut + margin)`` over the four parts of ``sgate``, the margins part
    read as its largest entry (``"max"``) or as excess.py's Σ (z − 2)₊ (``"excess"``)."""
    return penalty_over(sgate.gate, sgate.thresholds_, lam, margins, [(TorchShare(sgate.view), SHARE)], margin)


def penalty_over(g, thresholds: dict, lam: float, margins: str, extra: list, margin: float = 1.0):
    """``λ·Σ softplus(anomaly − cut + margin)`` over the deciding parts of the gate ``g`` and the lab
    parts ``extra`` ((a torch estimator with ``torch_anomaly``, its part name)), each cut at
    ``thresholds``; the margins part read as its largest entry (``"max"``) or as excess.py's
    Σ (z − 2)₊ (``"excess"``). The form toward.py's attack shares."""
    from excess import TorchExcess

    from lab.adaptive import torch_anomaly, torch_head
    from lab.margins import GalleryMargins

    parts = []
    for p, (m, v) in g._parts(g.decide_by).items():
        est = g.members_[m].views_[v]
        if p == "margins":
            est = (TorchExcess if margins == "excess" else GalleryMargins)(g.members_[m])
        parts.append((lambda t, est=est: torch_anomaly(est, t, {}), -thresholds[p]))
    parts += [(est.torch_anomaly, -thresholds[p]) for est, p in extra]

    def penalty(head) -> torch.Tensor:
        t = torch_head(head)
        total = torch.zeros((), dtype=torch.float64)
        for anomaly, cut in parts:
            total = total + torch.nn.functional.softplus(anomaly(t).max() - cut + margin)
        return lam * total

    return penalty


def stored_sets(out: Path, nets, extra: tuple[tuple[str, str], ...] = ()) -> dict[str, list]:
    """The 60 clean networks of the calibration scheme and every stored network the tables score."""
    from lab.adaptive import load_nets
    from lab.adaptive_margins import scored

    return {
        "pool": [n for n in nets if n.group == "calibration"] + load_nets(out / "extra_calibration.safetensors"),
        "suite": scored(nets),
        "excess": load_nets(out / "excess_networks.safetensors"),
        "floor": load_nets(out / "head_floor_1.25.safetensors"),
        **{k: load_nets(out / f) for k, f in extra},
    }


def working(sets: dict[str, list], clean_acc: float) -> dict[str, np.ndarray]:
    from lab.adaptive import works

    return {
        k: np.array(["attack_success_rate" in n.info and bool(works(n, clean_acc)) for n in v]) for k, v in sets.items()
    }


#: calibration draws from the pool of 60: three disjoint 20s (the run's first); and three 40s, as
#: the reference pipeline calibrates (the run's 20 + 20 new, the two new 20s, the run's + the last 20)
DRAWS_20 = tuple(np.arange(20 * d, 20 * d + 20) for d in range(3))
DRAWS_40 = (np.arange(0, 40), np.arange(20, 60), np.r_[0:20, 40:60])


def draw_row(
    X: dict, ok: dict, sets: dict, cols: list[int], grey_sets: tuple[str, ...], draws: tuple = DRAWS_20
) -> str:
    """Per calibration draw of ``draws`` (the rest of the pool scored as fresh), the gate cut on the
    part columns ``cols`` of X: fresh clean blocked, working attacks of the stored suite passed (not
    white-box · white-box), grey-box attacks of ``grey_sets`` passed, lr x2 retrains blocked."""
    white = np.array([n.group.startswith("penalty") for n in sets["suite"]])
    lr2 = np.array([n.group == "drift: lr x2" for n in sets["suite"]])
    grey = {k: ok[k] & np.array([n.group.startswith("grey") for n in sets[k]]) for k in grey_sets}
    cells = []
    for idx in draws:
        cal, fresh = X["pool"][idx], np.delete(X["pool"], idx, axis=0)
        st, cut, _ = fused_cut({j: cal[:, j] for j in cols}, 0.05)

        def passes(Y, st=st, cut=cut):
            return np.min([(Y[:, j] - st[j][0]) / st[j][1] for j in cols], axis=0) >= cut

        s = passes(X["suite"])
        g = " · ".join(f"{int((grey[k] & passes(X[k])).sum())}/{int(grey[k].sum())}" for k in grey_sets)
        cells.append(
            f"{int((~passes(fresh)).sum())}/{len(fresh)}, {int((ok['suite'] & ~white & s).sum())} · "
            f"{int((ok['suite'] & white & s).sum())}, {g}, {int((lr2 & ~s).sum())}/3"
        )
    return " | ".join(cells)


def suite(out: Path) -> None:
    from lab.adaptive import AdaptiveConfig
    from lab.adaptive_input import stored_run
    from lab.adaptive_margins import gate_with_margins
    from lab.paper import run_config

    c = run_config(out, AdaptiveConfig)
    ws, nets, _, clean_acc = stored_run(out, c, lambda m: None, None)
    gate = gate_with_margins(ws, nets, c)
    head = gate.members_["head"]
    view = head.views_["classes"]
    aimed = out / "concentration_networks.safetensors"  # this script's attack stage, once it has run
    sets = stored_sets(out, nets, (("aimed", aimed.name),) if aimed.is_file() else ())
    grey_sets = ("excess", "floor", "aimed") if aimed.is_file() else ("excess", "floor")
    parts = ("head", "output-spectrum", "margins")
    X = {
        k: np.array(
            [
                [*(gate.score(n.tensors)[p] for p in parts), share_score(view, head._head_matrix(n.tensors, n.group))]
                for n in v
            ]
        )
        for k, v in sets.items()
    }
    ok = working(sets, clean_acc)
    lines = [
        "per calibration draw (the run's 20 | 20 new | 20 new; the other 40 clean networks scored as fresh): "
        "fresh clean blocked, working attacks of the stored suite passed (not white-box · white-box), "
        "grey-box attacks of " + " · ".join(grey_sets) + " passed (aimed: this script's, at the four-part gate), "
        "lr x2 retrains blocked",
        "",
        "| gate | draw 1 | draw 2 | draw 3 |",
        "|---|---|---|---|",
    ]
    gates = (("today's (3 parts)", [0, 1, 2]), ("+ share (4 parts)", [0, 1, 2, 3]))
    for label, cols in gates:
        lines.append(f"| {label} | " + draw_row(X, ok, sets, cols, grey_sets) + " |")
    lines += [
        "",
        "calibrated on 40 (as the reference pipeline calibrates; the other 20 scored as fresh; grey-box attacks of "
        + " · ".join(grey_sets)
        + ")",
        "",
        "| gate | run's 20 + 20 new | 20 new + 20 new | run's 20 + the last 20 |",
        "|---|---|---|---|",
    ]
    for label, cols in gates:
        lines.append(f"| {label} | " + draw_row(X, ok, sets, cols, grey_sets, DRAWS_40) + " |")
    lines += ["", "share part score (−max_c log share_c), median (min) per group:", ""]
    by = {"clean (pool of 60)": X["pool"][:, 3]}
    for g in dict.fromkeys(n.group for n in sets["suite"]):
        idx = [
            i
            for i, n in enumerate(sets["suite"])
            if n.group == g and (ok["suite"][i] or "attack_success_rate" not in n.info)
        ]
        if idx:
            by[g] = X["suite"][idx, 3]
    for k in ("excess", "floor"):
        for kind in ("white", "grey"):
            idx = [i for i, n in enumerate(sets[k]) if n.group.startswith(kind) and ok[k][i]]
            by[f"{sets[k][idx[0]].group}"] = X[k][idx, 3]
    lines += [f"- {g}: {np.median(v):.2f} ({v.min():.2f})" for g, v in by.items()]
    text = "\n".join(lines) + "\n"
    (out / "concentration_suite.txt").write_text(text)
    print(text)


def attack(out: Path) -> None:
    from lab.adaptive import AdaptiveConfig, attacker_split
    from lab.adaptive_input import stored_run
    from lab.adaptive_margins import gate_with_margins
    from lab.paper import run_config

    c = dataclasses.replace(run_config(out, AdaptiveConfig), detectors=("head+output-spectrum",))
    ws, nets, _, clean_acc = stored_run(out, c, print, None)
    cal = [n.tensors for n in nets if n.group == "calibration"]
    gate = gate_with_margins(ws, nets, c)
    sgate = ShareGate(gate, cal)
    print("four-part cuts", sgate.thresholds_, "fused", sgate.fused_threshold_, flush=True)
    probe = next(n for n in nets if n.group == "clean")
    mirror = -float(TorchShare(sgate.view).torch_anomaly({k: torch.as_tensor(v) for k, v in probe.tensors.items()}))
    print(f"torch mirror {mirror:.6f} numpy {sgate.score(probe.tensors)[SHARE]:.6f}", flush=True)
    own = [n for n in nets if n.group == "grey-box attacker's own"]
    afit, acal = attacker_split(own, c)
    attacker = ShareGate(gate_with_margins(ws, nets, c, draw=1, groups=(afit, acal)), [n.tensors for n in acal])
    aims = [
        (
            margins,
            name,
            target,
            penalty_aimed_at(target, c.penalty_lambda, margins),
            f"{name} penalty: gate with margins ({margins}) + share",
        )
        for margins in ("max", "excess")
        for name, target in (("white-box", sgate), ("grey-box", attacker))
    ]

    def judge(tensors: dict):
        scores = sgate.score(tensors, gate.score(tensors))
        return scores, sgate.decide(scores)

    rows = train_aimed(ws, c, clean_acc, out / "concentration_networks.safetensors", aims, judge, gate)
    (out / "concentration.json").write_text(
        json.dumps({"thresholds": sgate.thresholds_, "gate_thresholds": gate.thresholds_, "rows": rows}, indent=1)
    )
    summarise_aimed(rows, c, "the four-part gate")


def train_aimed(ws, c, clean_acc: float, stored: Path, aims: list, judge, today) -> list[dict]:
    """Each aim's ``c.n_attack`` networks on the seeds and pairs of ``penalty + margins``, trained (or
    read back from ``stored``, where they are kept) and judged: ``aims`` holds (margins reading,
    white-box or grey-box, the gate it aims at, its penalty, its group); ``judge(tensors)``: the gate
    under test's (scores, decision); ``today``: today's gate, whose verdict is kept beside it."""
    from lab.adaptive import _train, load_nets, save_nets
    from lab.adaptive_margins import row_of

    kept = {(n.group, n.seed): n for n in load_nets(stored)} if stored.is_file() else {}
    rows, trained = [], []
    for margins, name, target, penalty, group in aims:
        for i in range(c.n_attack):
            seed = c.seed_offset + 8000 + i
            n = kept.get((group, seed)) or _train(ws, group, seed, ws.poisoned(seed), penalty=penalty)
            trained.append(n)
            scores, d = judge(n.tensors)
            rows.append(
                {
                    **row_of(n, clean_acc),
                    "attack": name,
                    "margins_read_as": margins,
                    **{k: n.info[k] for k in ("attack_success_rate", "clean_accuracy")},
                    "share_gate": d.verdict,
                    "share_gate_below": list(d.below),
                    "scores": scores,
                    "gate": today.decide(today.score(n.tensors)).verdict,
                    "own_estimate": target.decide(target.score(n.tensors)).verdict,
                }
            )
            print(rows[-1], flush=True)
    save_nets(stored, trained)
    return rows


def summarise_aimed(rows: list[dict], c, label: str) -> None:
    for margins in dict.fromkeys(r["margins_read_as"] for r in rows):
        for name in ("white-box", "grey-box"):
            ok = [r for r in rows if r["attack"] == name and r["margins_read_as"] == margins and r["works"]]
            print(
                f"{name}, margins as {margins}: works {len(ok)}/{c.n_attack}; passed {label} "
                f"{sum(r['share_gate'] == 'passed' for r in ok)}/{len(ok)}; today's gate "
                f"{sum(r['gate'] == 'passed' for r in ok)}/{len(ok)}; its own estimate "
                f"{sum(r['own_estimate'] == 'passed' for r in ok)}/{len(ok)}"
            )


if __name__ == "__main__":
    {"suite": suite, "attack": attack}[sys.argv[2]](Path(sys.argv[1]))
