"""Shared fixtures: small synthetic weight families written to real files on disk."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _test_keys() -> None:
    """Signing is required by default: the suite runs with its own verdict, reference and reviewer keys.

    Set in the environment (not passed around) so subprocesses, kfp.local tasks and the CLI see
    them exactly as a deployment's Secrets would provide them.
    """
    import tempfile
    from pathlib import Path

    from detector import verdict as V

    root = Path(tempfile.mkdtemp(prefix="backdoor-gate-test-keys-"))
    paths = {name: V.generate_keypair(root / name) for name in ("verdict", "reference", "bob", "alice")}
    os.environ.setdefault(V.KEY_FILE_ENV, str(paths["verdict"][0]))
    os.environ.setdefault("BACKDOOR_GATE_VERDICT_PUBLIC_KEYS", str(paths["verdict"][1]))
    os.environ.setdefault("BACKDOOR_GATE_REFERENCE_SIGNING_KEY_FILE", str(paths["reference"][0]))
    os.environ.setdefault("BACKDOOR_GATE_REFERENCE_PUBLIC_KEYS", str(paths["reference"][1]))
    os.environ.setdefault(
        "BACKDOOR_GATE_REVIEWER_KEYS", os.pathsep.join(f"{n}={paths[n][1]}" for n in ("bob", "alice"))
    )
    os.environ["BACKDOOR_GATE_TEST_KEYS"] = str(root)


_test_keys()

import numpy as np
import pytest
import torch

from lab.synthetic import FamilyConfig, WeightFamily

torch.set_num_threads(1)


@pytest.fixture
def family() -> WeightFamily:
    return WeightFamily(FamilyConfig(out_features=24, in_features=32, seed=7))


@pytest.fixture
def family_files(tmp_path, family):
    """10 reference, 6 held-out clean, 6 backdoored checkpoints (mixed .pt / .safetensors)."""
    out = {"reference": [], "heldout": [], "backdoored": []}
    for i in range(10):
        out["reference"].append(str(family.write(family.clean(), tmp_path / f"ref/c{i}.pt")))
    for i in range(6):
        fmt = "safetensors" if i % 2 else "pt"
        out["heldout"].append(str(family.write(family.clean(), tmp_path / f"held/c{i}.{fmt}", fmt=fmt)))
        out["backdoored"].append(str(family.write(family.backdoored(), tmp_path / f"bd/b{i}.{fmt}", fmt=fmt)))
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real MLflow server for the session (tests use distinct model names)."""
    from components.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


class GateWorld:
    """A saved reference of a small weight family, and checkpoints with a known offline verdict.

    Registry tests need candidates whose verdict is known: a clean network is blocked at the
    calibrated FRR now and then, which is the detector's business, not theirs.
    """

    def __init__(self, root, seed: int = 11):
        from pathlib import Path

        from detector.config import ReferenceConfig
        from detector.detectors import load_reference
        from detector.reference import Reference

        self.root = Path(root)
        self.family = WeightFamily(FamilyConfig(out_features=24, in_features=32, backdoor_strength=1.0, seed=seed))
        fam = self.family
        ref = Reference(ReferenceConfig(grid=(1, 2, 5, 10, 24, 32))).fit([fam.clean() for _ in range(10)])
        ref.calibrate([fam.clean() for _ in range(8)]).save(self.root / "reference")
        self.reference_dir = self.root / "reference"
        self.offline = load_reference(self.reference_dir)
        self._n = 0

    def ckpt(self, kind: str, want: str | None = None):
        """A fresh checkpoint ("clean"/"backdoored"); with ``want`` ("passed"/"blocked"), one judged so offline."""
        for _ in range(50):
            self._n += 1
            path = self.root / f"{kind}-{self._n}.safetensors"
            self.family.write(
                {"clean": self.family.clean, "backdoored": self.family.backdoored}[kind](), path, fmt="safetensors"
            )
            if want is None or self.offline.assess(path).decision.verdict == want:
                return path
        raise AssertionError(f"no {kind} checkpoint with verdict {want} in 50 draws")
