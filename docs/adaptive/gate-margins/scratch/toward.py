"""Scratch (not a stage): a fifth part, whether a deviant class's row change points at another
class's clean row (2026-12-05). Rule fixed on development (pair_z.py's table) before confirmation was
read: the network scores −max over the 5 classes `head` finds most deviant (a) and every other class
(b) of cos(d_a, c_b), d_a the change of a's row of A (no offset) from the reference mean row, c_b
b's reference mean row. Why: a one-to-one backdoor teaches the victim to fire on the impostor's
features, so the victim's change leans toward the impostor's clean row; the penalised attacks held
the size of that change down, not its direction (development: clean 0.15, 95th percentile 0.18;
penalised attack groups' medians 0.17–0.32). Standardised and cut with the four parts by the gate's
fused cut, under the six calibration draws of concentration.py.

    python toward.py OUT          # writes OUT/toward.txt
    python toward.py OUT attack   # attacks aimed at the five-part gate: OUT/toward.json
                                  # (networks kept in OUT/toward_networks.safetensors)

The attack stage trains, on the seeds and pairs of ``penalty + margins``, as concentration.py did for
the share: a white-box penalty aimed at the five-part gate and a grey-box one aimed at the attacker's
own (its own clean networks and draw of faces), the margins part read as the gate reads it and as
excess.py's Σ (z − 2)₊; the toward part in torch (its top 5 classes chosen by `head`'s z, detached).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from concentration import (
    DRAWS_20,
    DRAWS_40,
    draw_row,
    penalty_over,
    stored_sets,
    summarise_aimed,
    train_aimed,
    working,
)

from detector.composite import fused_cut
from detector.decision import decide

TOWARD = "toward"

PARTS = ("head", "output-spectrum", "margins", "head.offset-share")
TOP = 5


def toward_score(head, tensors: dict) -> float:
    """−max_{a in the TOP most deviant classes, b ≠ a} cos(d_a, c_b) (higher = more typical)."""
    view = head.views_["classes"]
    C = view.center_[:, :-1].astype(np.float64)
    H = head._head_matrix(tensors, "<candidate>")
    z = -np.asarray(head.score_vectors(tensors)["classes"])[: C.shape[0]]
    top = np.argsort(z)[::-1][:TOP]
    D = H[top, :-1].astype(np.float64) - C[top]
    cos = (D / np.linalg.norm(D, axis=1, keepdims=True)) @ (C / np.linalg.norm(C, axis=1, keepdims=True)).T
    cos[np.arange(TOP), top] = -np.inf
    return -float(cos.max())


def main(out: Path) -> None:
    from lab.adaptive import AdaptiveConfig
    from lab.adaptive_input import stored_run
    from lab.adaptive_margins import gate_with_margins
    from lab.paper import run_config

    c = run_config(out, AdaptiveConfig)
    ws, nets, _, clean_acc = stored_run(out, c, lambda m: None, None)
    gate = gate_with_margins(ws, nets, c)
    head = gate.members_["head"]
    extra = (("aimed", "concentration_networks.safetensors"), ("sih", "share_in_head.safetensors"))
    if (out / "toward_networks.safetensors").is_file():  # this script's attack stage, once it has run
        extra += (("taimed", "toward_networks.safetensors"),)
    sets = stored_sets(out, nets, extra)
    X = {
        k: np.array([[*(gate.score(n.tensors)[p] for p in PARTS), toward_score(head, n.tensors)] for n in v])
        for k, v in sets.items()
    }
    ok = working(sets, clean_acc)
    grey = ("excess", "floor", "aimed", "sih", *(("taimed",) if "taimed" in sets else ()))
    lines = [
        "per calibration draw: fresh clean blocked, stored suite working attacks passed (not white-box · "
        "white-box), grey-box attacks passed of " + " · ".join(grey) + ", lr x2 blocked",
        "",
        "| gate | draws | draw 1 | draw 2 | draw 3 |",
        "|---|---|---|---|---|",
    ]
    for label, cols in (("four parts", [0, 1, 2, 3]), ("+ toward (5 parts)", [0, 1, 2, 3, 4])):
        for name, draws in (("20", DRAWS_20), ("40", DRAWS_40)):
            lines.append(f"| {label} | {name} | " + draw_row(X, ok, sets, cols, grey, draws) + " |")
    lines += ["", "white-box attacks of the extra sets passed (working), per draw of 20, four · five parts:", ""]
    for k in grey:
        white = ok[k] & np.array([n.group.startswith("white") for n in sets[k]])
        cells = []
        for idx in DRAWS_20:
            counts = []
            for cols in ([0, 1, 2, 3], [0, 1, 2, 3, 4]):
                cal = X["pool"][idx]
                st, cut, _ = fused_cut({j: cal[:, j] for j in cols}, 0.05)
                passes = np.min([(X[k][:, j] - st[j][0]) / st[j][1] for j in cols], axis=0) >= cut
                counts.append(int((white & passes).sum()))
            cells.append(f"{counts[0]} · {counts[1]} of {int(white.sum())}")
        lines.append(f"- {k}: " + "; ".join(cells))
    tw = {k: -X[k][:, 4] for k in X}
    lines += [
        "",
        f"toward, clean pool of 60: median {np.median(tw['pool']):.3f}, 95th pct {np.quantile(tw['pool'], 0.95):.3f}",
    ]
    text = "\n".join(lines) + "\n"
    (out / "toward.txt").write_text(text)
    print(text)


class TowardGate:
    """``gate`` (the product's four parts, fitted and calibrated) with the toward part added, the five
    standardised and cut once on the same calibration networks."""

    def __init__(self, gate, calibration: list[dict], frr: float = 0.05):
        self.gate, self.head = gate, gate.members_["head"]
        cal = [self.score(t) for t in calibration]
        self.standardisation_, self.fused_threshold_, self.thresholds_ = fused_cut(
            {p: np.array([s[p] for s in cal]) for p in cal[0]}, frr
        )

    def score(self, tensors: dict, gate_scores: dict[str, float] | None = None) -> dict[str, float]:
        return {**(gate_scores or self.gate.score(tensors)), TOWARD: toward_score(self.head, tensors)}

    def decide(self, scores: dict[str, float]):
        return decide(scores, self.thresholds_)


class TorchToward:
    """The toward part in torch (its score negated: the largest cosine), differentiable in the head;
    the 5 classes chosen by `head`'s z without a gradient (as the numpy rule chooses them)."""

    def __init__(self, head):
        self.view = head.views_["classes"]
        C = torch.from_numpy(self.view.center_[:, :-1].astype(np.float64))
        self.C, self.Cn = C, C / C.norm(dim=1, keepdim=True)

    def torch_anomaly(self, t: dict) -> torch.Tensor:
        from detector.classifier import BN_EPS

        zc, _ = self.view.torch_z(t)
        top = torch.argsort(zc.detach(), descending=True)[:TOP]
        s = t["last_bn.weight"] / torch.sqrt(t["last_bn.running_var"] + BN_EPS)
        A = t["logits.weight"].double() @ (s[:, None] * t["last_linear.weight"]).double()
        A = A - A.mean(0, keepdim=True)
        D = A[top] - self.C[top]
        cos = (D / D.norm(dim=1, keepdim=True)) @ self.Cn.T
        cos = cos.masked_fill(torch.nn.functional.one_hot(top, self.C.shape[0]).bool(), -2.0)
        return cos.max().reshape(1)


def penalty_aimed_at(tgate: TowardGate, lam: float, margins: str, margin: float = 1.0):
    """concentration.py's penalty over the five parts of ``tgate`` (its four and toward)."""
    return penalty_over(tgate.gate, tgate.thresholds_, lam, margins, [(TorchToward(tgate.head), TOWARD)], margin)


def attack(out: Path) -> None:
    from lab.adaptive import AdaptiveConfig, attacker_split
    from lab.adaptive_input import stored_run
    from lab.adaptive_margins import gate_with_margins
    from lab.paper import run_config

    c = run_config(out, AdaptiveConfig)
    ws, nets, _, clean_acc = stored_run(out, c, print, None)
    cal = [n.tensors for n in nets if n.group == "calibration"]
    gate = gate_with_margins(ws, nets, c)
    tgate = TowardGate(gate, cal)
    print("five-part cuts", tgate.thresholds_, "fused", tgate.fused_threshold_, flush=True)
    probe = next(n for n in nets if n.group == "clean")
    mirror = -float(
        TorchToward(gate.members_["head"]).torch_anomaly({k: torch.as_tensor(v) for k, v in probe.tensors.items()})
    )
    print(f"torch mirror {mirror:.6f} numpy {tgate.score(probe.tensors)[TOWARD]:.6f}", flush=True)
    own = [n for n in nets if n.group == "grey-box attacker's own"]
    afit, acal = attacker_split(own, c)
    attacker = TowardGate(gate_with_margins(ws, nets, c, draw=1, groups=(afit, acal)), [n.tensors for n in acal])
    aims = [
        (
            margins,
            name,
            target,
            penalty_aimed_at(target, c.penalty_lambda, margins),
            f"{name} penalty: gate with margins ({margins}) + share + toward",
        )
        for margins in ("max", "excess")
        for name, target in (("white-box", tgate), ("grey-box", attacker))
    ]

    def judge(tensors: dict):
        scores = tgate.score(tensors, gate.score(tensors))
        return scores, tgate.decide(scores)

    rows = train_aimed(ws, c, clean_acc, out / "toward_networks.safetensors", aims, judge, gate)
    (out / "toward.json").write_text(
        json.dumps({"thresholds": tgate.thresholds_, "gate_thresholds": gate.thresholds_, "rows": rows}, indent=1)
    )
    summarise_aimed(rows, c, "the five-part gate")


if __name__ == "__main__":
    (attack if sys.argv[2:] == ["attack"] else main)(Path(sys.argv[1]))
