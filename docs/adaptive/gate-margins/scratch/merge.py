"""The table of docs/adaptive/README.md, "The margin check in the product": development · confirmation cells
from two runs' gate_margins.json, aimed_at_gate.json and excess.json (its attacks only), and a plot of the attack
groups' pass rates beside it.
Run: python merge.py DEV_OUT CONF_OUT PLOT.png > table.md"""

import json
import sys
from pathlib import Path

runs = [Path(a) for a in sys.argv[1:3]]
rows = [json.loads((r / "gate_margins.json").read_text())["rows"] for r in runs]
aimed = [json.loads((r / "aimed_at_gate.json").read_text())["rows"] for r in runs]
for draw in aimed:  # the attacks aimed at the gate with margins itself, as groups of their own
    for r in draw:
        r["group"], r["attack"] = f"{r['attack']} penalty aimed at the gate with margins", True
for a, r in zip(aimed, runs):  # excess.py's: aimed at it with every margin held low (2026-12-05)
    for x in json.loads((r / "excess.json").read_text())["aimed"] if (r / "excess.json").is_file() else []:
        x["group"], x["attack"] = f"{x['attack']} penalty aimed at it, every margin held under z 2", True
        a.append(x)
groups = list(dict.fromkeys(r["group"] for rs in rows for r in rs)) + list(dict.fromkeys(r["group"] for r in aimed[0]))


def cell(rs, key):
    if not rs:
        return "–"
    if rs[0]["attack"]:
        ok = [r for r in rs if r["works"]]
        return f"{sum(r[key] == 'passed' for r in ok)}/{len(ok)}"
    return f"blocked {sum(r[key] != 'passed' for r in rs)}/{len(rs)}"


bars = []  # (group, [(default, gate) pass rate per draw])
print("| group | works | passed `head+output-spectrum` (weights only) | **passed `head+output-spectrum+margins` (default)** |")
print("|---|---|---|---|")
for g in groups:
    per = [[r for r in rs + a if r["group"] == g] for rs, a in zip(rows, aimed)]
    attack = any(r["attack"] for p in per for r in p)
    works = " · ".join(f"{sum(r['works'] for r in p)}/{len(p)}" if p else "–" for p in per) if attack else "—"
    cells = [" · ".join(cell(p, k) for p in per) for k in ("default", "gate")]
    name = g.replace(": head+output-spectrum", "")
    print(f"| {name} | {works} | {cells[0]} | **{cells[1]}** |")
    if attack:
        rates = []
        for p in per:
            ok = [r for r in p if r["works"]]
            rates.append(tuple(sum(r[k] == "passed" for r in ok) / max(len(ok), 1) for k in ("default", "gate")))
        bars.append((name, rates))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(bars) + 1.5), sharey=True)
y = range(len(bars))
for d, (ax, title) in enumerate(zip(axes, ("development", "confirmation"))):
    ax.barh([i - 0.2 for i in y], [r[d][0] for _, r in bars], 0.4, color="tab:gray", label="head+output-spectrum")
    ax.barh([i + 0.2 for i in y], [r[d][1] for _, r in bars], 0.4, color="tab:red", label="+ margins")
    ax.set_title(title)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of working attacks that pass the gate")
axes[0].set_yticks(list(y), [b[0] for b in bars], fontsize=7)
axes[0].invert_yaxis()
axes[1].legend(loc="upper right", fontsize=8)  # the last rows reach 1.0 at the bottom
fig.savefig(sys.argv[3], dpi=110, bbox_inches="tight")
