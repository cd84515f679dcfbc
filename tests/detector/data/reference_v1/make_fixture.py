"""Writes the artifacts of this directory: made by the code of commit 3767f64, before the artifact
code was refactored, so that tests/detector/test_artifact.py proves artifacts published then still load and
score the same. Run from a checkout of that commit (the layout must stay what it wrote):

    PYTHONPATH=<old checkout> OMP_NUM_THREADS=1 python tests/detector/data/reference_v1/make_fixture.py

Tiny synthetic FaceNet heads (6 x 10 ``last_linear``, 5 classes) around one base, a frozen trunk
shared by all; the probes (clean and shifted) and every detector's scores on them are kept too.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def network(rng: np.random.Generator, base: dict[str, np.ndarray], shift: float = 0.0) -> dict[str, np.ndarray]:
    net = {k: v.copy() for k, v in base.items()}
    for k in ("last_linear.weight", "logits.weight", "logits.bias", "last_bn.bias"):
        net[k] = (net[k] + 0.05 * rng.normal(size=net[k].shape)).astype(np.float32)
    net["last_linear.weight"][2] += np.float32(shift) * rng.normal(size=10).astype(np.float32)
    return net


def family() -> dict[str, list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(23)
    base = {
        "block.weight": rng.normal(size=(3, 3)).astype(np.float32),
        "last_linear.weight": rng.normal(size=(6, 10)).astype(np.float32),
        "last_bn.weight": (1 + 0.1 * rng.random(6)).astype(np.float32),
        "last_bn.bias": (0.1 * rng.normal(size=6)).astype(np.float32),
        "last_bn.running_mean": (0.1 * rng.normal(size=6)).astype(np.float32),
        "last_bn.running_var": (1 + 0.1 * rng.random(6)).astype(np.float32),
        "logits.weight": rng.normal(size=(5, 6)).astype(np.float32),
        "logits.bias": (0.1 * rng.normal(size=5)).astype(np.float32),
    }
    return {
        "base": [base],
        "reference": [network(rng, base) for _ in range(8)],
        "calibration": [network(rng, base) for _ in range(6)],
        "probes": [network(rng, base) for _ in range(3)] + [network(rng, base, 1.0) for _ in range(3)],
    }


def torch_net(net: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in net.items()}


def main() -> None:
    from detector.config import DETECTORS, ReferenceConfig  # every detector, the shipped composite, fusion
    from detector.detectors import make_reference

    nets = family()
    out: dict[str, Any] = {"made_by": "3767f64", "scores": {}, "verdicts": {}}
    probes = [torch_net(n) for n in nets["probes"]]
    for name in DETECTORS:
        target = HERE / name
        shutil.rmtree(target, ignore_errors=True)
        evidence = ("gmm",) if "+" in name or name == "fusion" else ()
        ref = make_reference(name, ReferenceConfig(grid=(1, 2, 5)), evidence=evidence)
        ref.fit([torch_net(n) for n in nets["reference"]], base=torch_net(nets["base"][0]))
        ref.calibrate([torch_net(n) for n in nets["calibration"]])
        ref.save(target)
        out["scores"][name] = [ref.score(p) for p in probes]
        out["verdicts"][name] = [ref.assess(p).decision.verdict for p in probes]
        print(name, out["verdicts"][name], file=sys.stderr)
    arrays: dict[str, Any] = {f"{i}/{k}": v for i, n in enumerate(nets["probes"]) for k, v in n.items()}
    np.savez(HERE / "probes.npz", **arrays)
    (HERE / "expected.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
