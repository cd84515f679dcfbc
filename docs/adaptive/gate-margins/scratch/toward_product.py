"""Scratch (not a stage): the product's toward view (``head.toward``, the default's fifth part since
2026-12-05) on the paper's three protocols' stored networks. The default fitted and calibrated as
``paper --rescore`` fits it, beside the same gate without toward (the four parts); checks the
product's toward score is toward.py's lab rule on every network, and counts what each blocks.

    python toward_product.py RUN   # RUN: a finished paper run; writes RUN/toward_product.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

from concentration_paper import blocked_table, stored_paper_run
from toward import toward_score

from detector.config import DEFAULT_DETECTOR
from detector.detectors import make_reference
from detector.head import HeadReference


def main(out: Path) -> None:
    lab, W, groups, gallery, rc = stored_paper_run(out)
    gates = {}
    for name, toward in (("four parts", False), ("five parts (default)", True)):
        g = make_reference(DEFAULT_DETECTOR, rc, gallery=gallery)
        g.members["head"] = HeadReference(rc, share=True, toward=toward)
        g.fit([W[i] for i in groups["reference"]], base=lab.base).calibrate([W[i] for i in groups["held-out"]])
        gates[name] = g
    five = gates["five parts (default)"]
    head = five.members_["head"]
    diff, rows, flips = 0.0, [], []
    group_of = {i: grp for grp, idx in groups.items() for i in idx}
    for i, w in enumerate(W):
        s = {k: g.score(w) for k, g in gates.items()}
        diff = max(diff, abs(s["five parts (default)"]["head.toward"] - toward_score(head, w)))
        rows.append({k: g.decide(s[k]).verdict != "passed" for k, g in gates.items()})
        if len(set(rows[-1].values())) > 1:  # the two gates disagree: each part in calibration MADs
            z = {
                p: (v - five.standardisation_[p][0]) / five.standardisation_[p][1]
                for p, v in s["five parts (default)"].items()
            }
            flips.append(
                f"- network {i} ({group_of.get(i, '?')}): blocked by the four {rows[-1]['four parts']}, by the five "
                f"{rows[-1]['five parts (default)']}; five-part z " + ", ".join(f"{p} {v:.2f}" for p, v in z.items())
            )
    lines = [
        f"{out.name}: blocked by the four parts · the five (cuts {five.thresholds_}); product toward score "
        f"against toward.py's lab rule, largest difference over {len(W)} networks: {diff:.2e}",
        "",
        *blocked_table(groups, rows, ("four parts", "five parts (default)"), tuple(gates)),
    ]
    lines += ["", f"where they disagree (the five's fused cut {five.fused_threshold_:.2f}):", "", *flips]
    text = "\n".join(lines) + "\n"
    (out / "toward_product.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
