"""Shared fixtures: small synthetic weight families written to real files on disk."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from detector.synthetic import FamilyConfig, WeightFamily

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
