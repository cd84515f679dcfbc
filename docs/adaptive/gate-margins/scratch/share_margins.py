"""Scratch (not a stage): how close the grey-box attacks that know of the offset share come to each
part of the product's four-part gate (2026-12-05): per network, each part's standardised score
((score − median) / MAD of the calibration networks, the fused cut's units) against the fused cut.

    python share_margins.py OUT   # writes OUT/share_margins.txt
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: Path) -> None:
    from lab.adaptive import AdaptiveConfig, load_nets, works
    from lab.adaptive_input import stored_run
    from lab.adaptive_margins import gate_with_margins
    from lab.paper import run_config

    c = run_config(out, AdaptiveConfig)
    ws, nets, _, clean_acc = stored_run(out, c, lambda m: None, None)
    gate = gate_with_margins(ws, nets, c)
    st = gate.standardisation_
    lines = [f"fused cut {gate.fused_threshold_:.2f}; parts in units of the calibration networks' MAD", ""]
    lines += ["| set | group | seed | " + " | ".join(st) + " | verdict |", "|---|---|---|" + "---|" * (len(st) + 1)]
    for f in ("share_in_head.safetensors", "concentration_networks.safetensors"):
        for n in load_nets(out / f):
            if not n.group.startswith("grey") or not works(n, clean_acc):
                continue
            s = gate.score(n.tensors)
            z = [(s[p] - m) / d for p, (m, d) in st.items()]
            cells = " | ".join(f"{v:.2f}" for v in z)
            lines.append(f"| {f.split('.')[0]} | {n.group} | {n.seed} | {cells} | {gate.decide(s).verdict} |")
    text = "\n".join(lines) + "\n"
    (out / "share_margins.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
