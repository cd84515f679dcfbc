"""The paper protocol's report: the markdown table, the plots (per-view scores, the GMM's
curves, attack strength, t-SNE of the weights) from a run's summary (:mod:`lab.paper`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: the sets of backdoored networks the protocol trains and the report tabulates
BACKDOOR_SETS = ("triggers", "locations")


def tsne_plot(
    path: Path, W: list[dict], groups: dict, n_networks: int = 10, per_network: int = 300, seed: int = 0
) -> None:
    """The paper's fig. 3b: t-SNE of ``last_linear`` forward vectors of 10 clean (held-out) and
    10 backdoored networks; a random subset of each network's 1792 vectors keeps it to a minute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    clean = groups.get("held-out", [])[:n_networks]
    bad = [i for s_ in BACKDOOR_SETS for i in groups.get(s_, [])][:n_networks]
    cols = rng.choice(W[0]["last_linear.weight"].shape[1], size=per_network, replace=False)
    X: list[np.ndarray] = []
    labels: list[int] = []
    for label, idx in ((0, clean), (1, bad)):
        for i in idx:
            X.append(W[i]["last_linear.weight"].double().numpy()[:, cols].T)
            labels += [label] * per_network
    Z = TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(np.concatenate(X))
    lab = np.asarray(labels)
    unit = np.tile(np.arange(per_network), len(clean) + len(bad))  # which input feature a vector is
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    # right: the clusters of 4 input features up close (each cluster = one feature across 20 networks)
    near = np.argsort(np.linalg.norm(Z - np.median(Z, axis=0), axis=1))
    show = list(dict.fromkeys(unit[near]))[:4]
    for ax, mask, title in (
        (axes[0], np.ones(len(Z), bool), f"all ({per_network} input features per network)"),
        (axes[1], np.isin(unit, show), "4 input features up close"),
    ):
        for label, name, c, m in (
            (1, f"backdoored ({len(bad)} networks)", "tab:red", "x"),
            (0, f"clean ({len(clean)})", "tab:blue", "o"),
        ):
            sel = mask & (lab == label)
            ax.scatter(Z[sel, 0], Z[sel, 1], s=4 if ax is axes[0] else 30, alpha=0.6, c=c, marker=m, label=name)
        ax.set_title(f"t-SNE of last_linear forward vectors: {title}", fontsize=10)
        ax.legend(markerscale=2 if ax is axes[1] else 4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _f(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def table(s: dict) -> str:
    """Markdown: detection per working group and detector, victim naming, the GMM's settings,
    per-view AUCs, controls, strength."""
    dets = list(s["baselines"])
    lines_top: list[str] = []
    if "detection" in s:
        d = s["detection"]
        cols = d["columns"]
        lines_top += [
            "| backdoor group | n | attack success | " + " | ".join(cols) + " |",
            "|---|---|---|" + "---|" * len(cols),
        ]
        for name, r in d["rows"].items():
            mark = "" if name in d["working"] else " (not working)"
            lines_top.append(
                f"| {name}{mark} | {r['n']} | {r['attack_success']:.2f} | "
                + " | ".join(_f(r["auc"].get(c)) for c in cols)
                + " |"
            )
        for k in ("mean", "min"):
            lines_top.append(
                f"| **{k} over working groups** | | | " + " | ".join(_f(d["summary"][c][k]) for c in cols) + " |"
            )
        lines_top += [
            "",
            f"AUC: backdoored networks of the group vs {d['n_clean']} clean networks of the reference's recipe "
            "never fitted on "
            "(calibration + fresh test networks); working = mean attack success >= 0.9; failed backdoors left out.",
            "",
        ]
        if s.get("victim_naming"):
            lines_top += [
                "| detector | backdoors | suspected class = true victim | blocked | … of those blocked |",
                "|---|---|---|---|---|",
            ]
            for det, v in s["victim_naming"].items():
                lines_top.append(
                    f"| {det} | {v['n']} | {v['correct']:.2f} | {v['n_blocked']} | {_f(v['correct_when_blocked'])} |"
                )
            lines_top.append("")
    lines = lines_top
    cols = [(d, k) for d in dets for k in (next(iter(s["baselines"][d].values())) or {})]
    lines += [
        "| set | "
        + " | ".join(f"{d} {k}" for d, k in cols)
        + " | attack success (mean) | backdoors: counts / weak / failed |",
        "|---|" + "---|" * (len(cols) + 2),
    ]
    for name in BACKDOOR_SETS:
        nets = [n for n in s["networks"] if n["group"] == name]
        if not nets:
            continue
        st = s["backdoor_status"][name]
        lines.append(
            f"| {name} | "
            + " | ".join(_f((s["baselines"][d].get(name) or {}).get(k)) for d, k in cols)
            + f" | {np.mean([n['attack_success_rate'] for n in nets]):.2f} | {st['counts']} / {st['weak']} / "
            f"{st['failed']} |"
        )
    lines += [
        "",
        "AUC per view/part: clean networks never fitted on vs backdoored networks of the set (failed backdoors "
        "left out).",
        "",
    ]
    lines += ["| view | N_G (AIC) | PCA dims | threshold (FRR 5 % on held-out) |", "|---|---|---|---|"]
    for v, info in s["views"].items():
        lines.append(f"| {v} | {info['n_components']} | {info['pca_dims']} | {s['thresholds'][v]:.6g} |")
    # without the GMM among the detectors, s["controls"] is the first detector's: no column of its own
    gmm = "gmm" in dets
    others = [d for d in dets if d != "gmm"]
    lines += [
        "",
        "| group | networks | " + ("blocked by the GMM gate | " if gmm else "") + " | ".join(others) + " |",
        "|---|---|" + "---|" * (len(others) + gmm),
    ]
    for name, c in s["controls"].items():
        cells = ([f"{c['blocked']:.2f}"] if gmm else []) + [_f(s["controls_by_detector"][d].get(name)) for d in others]
        lines.append(f"| {name} | {c['n']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Held-out is the calibration set itself (in-sample); weighting (fresh seeds), sham and drift are clean "
        "networks the gate never saw.",
        "",
    ]
    lines += [
        "| attack strength | attack success | failed | " + " | ".join(f"{d} {k}" for d, k in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for p in s["strength"]:
        val = "all" if p["param"] == "poison_images" and p["value"] == 0 else p["value"]
        lines.append(
            f"| {p['param']} = {val} | {p['attack_success']:.2f} | {p['n_failed']}/{p['n']} | "
            + " | ".join(_f((p["auc"][d] or {}).get(k)) for d, k in cols)
            + " |"
        )
    rw = s["relative_weight_change"]
    lines += [
        "",
        f"Mean clean accuracy {s['mean_clean_accuracy']:.3f}; relative weight change ‖W − W_base‖/‖W_base‖ "
        f"clean {rw['clean']:.3f}, backdoored {rw['backdoored']:.3f}; {len(s['networks'])} networks; "
        f"total {s['timings']['total_s']:.0f} s.",
    ]
    if "provenance" in s:  # summaries written before it was recorded have none
        pv = s["provenance"]
        lines += [
            "",
            f"Base trunk sha256 {pv['base_sha256'][:16]}…; run on {pv['cpu']} (torch {pv['torch']}, "
            f"commit {pv['git_commit']}, {pv['date']}).",
        ]
    return "\n".join(lines) + "\n"


def _plots(out: Path, s: dict, gmm, scores: dict, W: list[dict], groups: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = list(gmm.views_)
    held = groups["held-out"]
    # score histograms with the threshold
    fig, axes = plt.subplots(1, len(views), figsize=(6 * len(views), 4), squeeze=False)
    for ax, v in zip(axes[0], views):
        for label in ("held-out", "weighting", *BACKDOOR_SETS, "failed-backdoor"):
            if groups.get(label):
                ax.hist(scores[gmm.detector][v][groups[label]], bins=12, alpha=0.5, label=label)
        ax.axvline(gmm.thresholds_[v], color="k", ls="--", label="threshold")
        ax.set_title(f"GMM {v} view: network scores (higher = more typical)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=90)
    plt.close(fig)
    # forward vectors in the reference's first two PCA axes (paper fig. 3b)
    est = gmm.views_.get("forward") or gmm.views_[views[0]]
    fig, ax = plt.subplots(figsize=(6, 5))
    bad = [i for s_ in BACKDOOR_SETS for i in groups.get(s_, [])]
    for label, idx, c in (("held-out clean", held, "tab:blue"), ("backdoored", bad, "tab:red")):
        mats = [W[i]["last_linear.weight"].double().numpy() for i in idx]
        Z = np.concatenate([est._project(m.T if est.view == "forward" else m) for m in mats])
        ax.scatter(Z[:, 0], Z[:, 1], s=1, alpha=0.3, c=c, label=label)
    ax.set_title(f"{est.view} vectors, first two PCA axes of the reference")
    ax.legend(markerscale=8)
    fig.tight_layout()
    fig.savefig(out / "vectors_pca.png", dpi=90)
    plt.close(fig)
    # AUC vs N_G (fig. 4) and vs M
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, xlabel in ((axes[0], "n_components", "N_G (fixed)"), (axes[1], "m", "M, clean reference networks")):
        rows = s["auc_vs_n_components" if key == "n_components" else "auc_vs_m"]
        for v in views:
            for name in BACKDOOR_SETS:
                pts = [(r[key], r["auc"][name]) for r in rows if r["view"] == v and name in r["auc"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{v}, {name}")
        ax.set_xscale("log" if key == "n_components" else "linear")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("AUC")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    axes[0].set_title("GMM AUC vs N_G (paper fig. 4)")
    axes[1].set_title("GMM AUC vs number of reference networks")
    fig.tight_layout()
    fig.savefig(out / "auc_curves.png", dpi=90)
    plt.close(fig)
    strength_plot(out / "strength.png", s)


def strength_plot(path: Path, s: dict) -> None:
    """Per strength axis: AUC against mean attack success (top) and against the knob (bottom).

    Can be redrawn from a saved ``summary.json``. Points where every backdoor failed have no AUC.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_params = [p for p, _values in s["config"]["strength"]]
    fig, axes = plt.subplots(2, len(axes_params), figsize=(5 * len(axes_params), 8), squeeze=False)
    for col, param in enumerate(axes_params):
        pts = [p for p in s["strength"] if p["param"] == param]
        for row, xkey in enumerate(("attack_success", "value")):
            ax = axes[row][col]
            order = sorted(
                pts,
                key=lambda p: (
                    p[xkey] if not (param == "poison_images" and xkey == "value" and p["value"] == 0) else 1e9
                ),
            )
            for det in s["baselines"]:
                keys = sorted({k for p in order if p["auc"][det] for k in p["auc"][det]})
                for k in keys:
                    xy = [
                        (i if xkey == "value" else p[xkey], p["auc"][det][k])
                        for i, p in enumerate(order)
                        if p["auc"][det]
                    ]
                    ax.plot(*zip(*xy), marker="o", lw=2.5 if det == "gmm" else 1, label=f"{det} {k}")
            if xkey == "value":
                ax.set_xticks(range(len(order)))
                ax.set_xticklabels(
                    [
                        ("all" if param == "poison_images" and p["value"] == 0 else str(p["value"]))
                        + f"\nASR {p['attack_success']:.2f}"
                        for p in order
                    ],
                    fontsize=7,
                )
                ax.set_xlabel(param)
            else:
                ax.set_xlabel("mean attack success")
                ax.set_title(f"varying {param}")
            ax.set_ylabel("AUC vs held-out clean")
            ax.set_ylim(-0.02, 1.02)
            ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
