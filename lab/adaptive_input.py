"""``backdoor-gate paper --adaptive --input-space``: would the trigger search catch what the weights let through?

The weight gate's attackers change weights, not the trigger: a backdoor fine-tuned against the
gate's statistic still has to fire. ``explain`` (``components.trigger_search``) looks for that in
input space, and its size rule says "backdoor" when a patch of the search's smallest size (0.10
of the width) sends held-back faces to the class (``lab.explain.size_opinion``; clean networks
needed 0.30 or more on every explain-eval run). This stage reads a finished adaptive run's
networks and asks, for every clean network of the reference's recipe, every retrain and every
*working* attack of the groups that reach the weight gate's pass side (the plain backdoor as the
control, and every penalty):

* the weights-only gate's verdict, and the victim / impostor it names (``explain`` searches that pair);
* where the true victim ranks among the classes by the ``head`` statistic (what a search over
  the top-k suspects would need);
* the size rule for the *named* pair (what ``explain`` does today), and for the *true* pair (what
  a search that found the pair would see; an upper bound on any search);
* for every clean network and retrain, the size rule for a penalised attack's true pair (cycled
  over them): the true-pair column's false alarms. Without it "the trigger fires on the true
  pair" could be any network's adversarial patch for that pair.

A run is resumed: rows already in ``input_space.json`` for the same network (group and seed) are
kept and only what they lack is searched (a search is ~14 s; a protocol is ~20 min). Delete
``input_space.json`` to search afresh after changing the search.

Nothing here decides a promotion: it measures whether an input-space second stage is worth
building, beside the attack aimed at it (``grey-box penalty + partial triggers``).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: the groups this stage searches (prefixes): clean networks of the recipe, retrains, the plain
#: backdoor and every penalty (the attacks that can pass the weights; the others never did)
GROUPS = ("clean", "drift", "plain", "penalty", "grey-box penalty")


@dataclass
class Search:
    """One size-rule search: the patch side it stopped at, whether it fired at the smallest."""

    found: bool
    size: float
    heldout_success: float
    fires: bool
    seconds: float

    @classmethod
    def run(cls, path: Path, data: Path, victim: str, impostor: str | None, config, net_classes) -> Search:
        import torch

        from components.explain import explain

        torch.manual_seed(0)
        res, _ = explain(path, data, victim, impostor, config, net_classes=net_classes)
        d = res.to_dict()  # the size rule as explain itself reports it
        return cls(
            found=d["found"],
            size=d["mask_size"],
            heldout_success=round(float(d["reconstructed_asr"]), 3),
            fires=d["smallest_patch_fires"],
            seconds=round(res.seconds, 1),
        )


def run_input_space(
    out: str | Path,
    c,
    log=print,
    base: dict | None = None,
    groups: tuple[str, ...] = GROUPS,
    explain_config=None,
) -> dict[str, Any]:
    """Search every network of ``groups`` (prefixes) in the adaptive run stored in ``out``; writes
    ``input_space.json`` (a row per network, appended as it goes) and ``input_space.md``.
    ``explain_config``: the search's (``explain``'s defaults at the protocol's image size)."""
    from components.explain import load_network
    from components.trainer.train import save_network
    from components.trigger_search import ExplainConfig
    from lab.adaptive import works

    out = Path(out)
    t_start = time.perf_counter()
    ws, nets, ref, clean_acc = stored_run(out, c, log, base)
    config = explain_config or ExplainConfig(image_size=c.paper.trunk_input_size, controls=0)
    classes = ws.fs.classes
    name = lambda x: x if x is None or not str(x).isdigit() else classes[int(x)]  # noqa: E731
    chosen = [
        n for n in nets if n.group.startswith(groups) and ("attack_success_rate" not in n.info or works(n, clean_acc))
    ]
    pairs = control_pairs(nets)
    done = earlier_rows(out)
    rows: list[dict[str, Any]] = []
    n_control = 0
    with tempfile.TemporaryDirectory(prefix="input-space-") as tmp:
        for k, n in enumerate(chosen):
            truth = (n.info.get("victim"), n.info.get("impostor"))
            pair = pairs[n_control % len(pairs)] if truth[0] is None and pairs else None
            n_control += pair is not None
            old = done.get((n.group, n.seed))
            if old is not None and (pair is None or old.get("attack_pair", {}).get("pair") == list(pair)):
                rows.append(old)
                log(f"  {n.group:<48} kept from the earlier run")
                continue
            path = save_network(_state_dict(ws, n), Path(tmp) / f"net{k}", classes=classes)
            net_classes = load_network(path)
            if old is not None:  # an earlier run's row without this control
                row = old
            else:
                a = ref.assess(str(path))
                s = a.evidence.suspect
                assert s is not None  # the default names its most deviant class
                named = (name(s.suspected_class), name(s.suspected_impostor))
                z = -np.asarray(a.vector_scores["head"])[:-1]  # the default's head part: −z per class
                row = {
                    "group": n.group,
                    "seed": n.seed,
                    "verdict": a.decision.verdict,
                    "named_victim": named[0],
                    "named_impostor": named[1],
                    "true_victim": truth[0],
                    "true_impostor": truth[1],
                    "victim_rank": (int(np.sum(z > z[classes.index(truth[0])])) + 1 if truth[0] is not None else None),
                }
                row["named"] = asdict(Search.run(path, ws.lab.data, *named, config, net_classes))
                if truth[0] is not None:
                    row["true"] = (
                        row["named"]
                        if truth == named
                        else asdict(Search.run(path, ws.lab.data, truth[0], truth[1], config, net_classes))
                    )
            if pair is not None:
                row["attack_pair"] = {
                    "pair": list(pair),
                    **asdict(Search.run(path, ws.lab.data, *pair, config, net_classes)),
                }
            path.unlink()
            rows.append(row)
            log(
                f"  {n.group:<48} {row['verdict']:<7} named {row['named_victim']}/{row['named_impostor']} "
                f"true {truth[0]}/{truth[1]}: fires named {row['named']['fires']}, true "
                f"{row.get('true', {}).get('fires')}, an attack's pair {row.get('attack_pair', {}).get('fires')}"
            )
            _save(out, with_earlier(rows, done), time.perf_counter() - t_start)
    return _save(out, with_earlier(rows, done), time.perf_counter() - t_start)


def stored_run(out: Path, c, log, base: dict | None):
    """(workshop, networks, the weights-only gate's reference, the recipe's clean accuracy) of the
    adaptive run stored in ``out``: what every stage that reads a finished run starts from (the
    weights-only gate was the default when these runs were made)."""
    from detector.config import WEIGHTS_ONLY_DETECTOR
    from lab.adaptive import Workshop, fit_reference, load_nets

    stored = out / "networks.safetensors"
    if not stored.is_file():
        raise FileNotFoundError(f"{stored}: run `backdoor-gate paper --adaptive --out {out}` first")
    ws = Workshop(c, log, base)
    nets = load_nets(stored)
    by = lambda g: [n for n in nets if n.group == g]  # noqa: E731
    ref = fit_reference(WEIGHTS_ONLY_DETECTOR, by("reference"), by("calibration"), ws.base)
    clean_acc = float(np.mean([n.info["clean_accuracy"] for n in by("reference") + by("calibration")]))
    return ws, nets, ref, clean_acc


def _state_dict(ws, n) -> dict:
    """The whole network of a stored head: the run's base trunk with the head's tensors."""
    sd = dict(ws.base)
    sd.update({key: v.float() for key, v in n.tensors.items()})
    return sd


def network_file(ws, n, tmp: Path):
    """A stored network loaded the way the product loads a candidate (saved, then read back)."""
    from components.explain import load_network
    from components.trainer.train import save_network

    path = save_network(_state_dict(ws, n), Path(tempfile.mkdtemp(dir=tmp)) / "net", classes=ws.fs.classes)
    net, _ = load_network(path)
    path.unlink()
    return net


def control_pairs(nets) -> list[tuple[str, str]]:
    """The (victim, impostor) pairs of the penalised attacks, in order, each once: what the clean
    networks and retrains are searched with, so the true-pair column has its false alarms beside it."""
    found = [(n.info["victim"], n.info["impostor"]) for n in nets if "penalty" in n.group and n.info.get("victim")]
    return list(dict.fromkeys(found))


def earlier_rows(out: Path, name: str = "input_space.json") -> dict[tuple[str, int], dict]:
    """Rows of an earlier (perhaps interrupted) run in ``out``, by network (group and seed)."""
    path = out / name
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text())["rows"]
    except (ValueError, KeyError, TypeError):
        return {}  # unreadable: searched again, and overwritten
    return {(r["group"], r["seed"]): r for r in rows if isinstance(r, dict) and "group" in r and "seed" in r}


def with_earlier(rows: list[dict], done: dict[tuple[str, int], dict]) -> list[dict]:
    """This run's rows, then every earlier row (:func:`earlier_rows`) of a network it did not
    reach (other ``groups``, or not reached yet): a run asked about some groups keeps what was
    measured on the others."""
    here = {(r["group"], r["seed"]) for r in rows}
    return rows + [r for key, r in done.items() if key not in here]


def _save(out: Path, rows: list[dict], seconds: float) -> dict[str, Any]:
    summary = {"rows": rows, "seconds": seconds}
    (out / "input_space.json").write_text(json.dumps(summary, indent=1))
    (out / "input_space.md").write_text(table(rows))
    return summary


def table(rows: list[dict]) -> str:
    """Per group: the weights' verdicts beside the size rule on the named and on the true pair."""
    lines = [
        "| group | networks | weights passed | victim named | victim's rank (head z), median | "
        "size rule fires: named pair | size rule fires: true pair (clean: a penalised attack's pair) | "
        "passed the weights, then fired: named pair · true pair |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == g]
        n = len(rs)
        passed = [r for r in rs if r["verdict"] == "passed"]
        attack = rs[0]["true_victim"] is not None
        cell = lambda sel, key: f"{sum(r[key]['fires'] for r in sel)}/{len(sel)}"  # noqa: E731
        lines.append(
            f"| {g} | {n} | {len(passed)}/{n} | "
            + (f"{sum(r['named_victim'] == r['true_victim'] for r in rs)}/{n}" if attack else "—")
            + " | "
            + (f"{np.median([r['victim_rank'] for r in rs]):g}" if attack else "—")
            + f" | {cell(rs, 'named')} | "
            + (cell(rs, "true") if attack else _control_cell(rs))
            + " | "
            + (f"{cell(passed, 'named')} · {cell(passed, 'true')}" if attack else "—")
            + " |"
        )
    return "\n".join(lines) + "\n"


def _control_cell(rs: list[dict]) -> str:
    searched = [r for r in rs if "attack_pair" in r]
    return f"{sum(r['attack_pair']['fires'] for r in searched)}/{len(searched)}" if searched else "—"
