"""Scratch (not a stage): two marks of a one-to-one backdoor that `head`'s largest z alone misses,
read on a stored adaptive run (2026-12-05): where the victim and the impostor sit among `head`'s
per-class z's (both rows move), and whether the change of a top class's row points at another
class's clean row (the victim learns to fire on the impostor's features: the classifier's suspect
rule, as a network statistic: max over the 5 most deviant classes a and every b of cos(d_a, c_b)).
Clean networks (the 60 of the calibration scheme) against every attack group.

    python pair_z.py OUT   # prints; writes OUT/pair_z.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main(out: Path) -> None:
    from lab.adaptive import AdaptiveConfig, load_nets, works
    from lab.adaptive_input import stored_run
    from lab.adaptive_margins import gate_with_margins, scored
    from lab.paper import run_config

    c = run_config(out, AdaptiveConfig)
    ws, nets, _, clean_acc = stored_run(out, c, lambda m: None, None)
    gate = gate_with_margins(ws, nets, c)
    head = gate.members_["head"]
    view = head.views_["classes"]
    classes = ws.fs.classes
    n_cls = len(classes)
    C = view.center_[:, :-1].astype(np.float64)
    Cn = C / np.linalg.norm(C, axis=1, keepdims=True)

    def marks(n) -> dict:
        H = head._head_matrix(n.tensors, n.group)
        z = -np.asarray(head.score_vectors(n.tensors)["classes"])[:n_cls]
        order = np.argsort(z)[::-1]
        D = H[order[:5], :-1].astype(np.float64) - C[order[:5]]
        cos = (D / np.linalg.norm(D, axis=1, keepdims=True)) @ Cn.T
        cos[np.arange(5), order[:5]] = -np.inf
        out = {"z1": z[order[0]], "z2": z[order[1]], "toward": float(cos.max()), "verdict": None}
        if n.info.get("victim"):
            rank = {int(k): r + 1 for r, k in enumerate(order)}
            v, i = classes.index(n.info["victim"]), classes.index(n.info["impostor"])
            out.update(victim=(round(float(z[v]), 2), rank[v]), impostor=(round(float(z[i]), 2), rank[i]))
        return out

    pool = [n for n in nets if n.group == "calibration"] + load_nets(out / "extra_calibration.safetensors")
    groups: dict[str, list[dict]] = {"clean (60)": [marks(n) for n in pool]}
    extra = ("excess_networks", "share_in_head", "concentration_networks")
    for n in scored(nets) + [n for f in extra for n in load_nets(out / f"{f}.safetensors")]:
        if "attack_success_rate" in n.info and works(n, clean_acc):
            m = marks(n)
            m["verdict"] = gate.decide(gate.score(n.tensors)).verdict
            groups.setdefault(n.group, []).append(m)
    q = lambda v: f"{np.median(v):.2f} ({np.min(v):.2f}–{np.max(v):.2f})"  # noqa: E731
    cl = groups["clean (60)"]
    lines = [
        f"clean 90th / 95th percentile: top-2 z {np.quantile([m['z2'] for m in cl], 0.9):.2f} / "
        f"{np.quantile([m['z2'] for m in cl], 0.95):.2f}; toward {np.quantile([m['toward'] for m in cl], 0.9):.3f} / "
        f"{np.quantile([m['toward'] for m in cl], 0.95):.3f}",
        "",
        "| group | n | passed the gate | top-1 z | top-2 z | toward (max cos) | victim rank | impostor rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g, ms in groups.items():
        vr = [m["victim"][1] for m in ms if "victim" in m]
        ir = [m["impostor"][1] for m in ms if "impostor" in m]
        passed = sum(m["verdict"] == "passed" for m in ms) if ms[0]["verdict"] else "—"
        lines.append(
            f"| {g} | {len(ms)} | {passed} | {q([m['z1'] for m in ms])} | {q([m['z2'] for m in ms])} | "
            f"{q([m['toward'] for m in ms])} | {np.median(vr) if vr else '—'} | {np.median(ir) if ir else '—'} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "pair_z.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
