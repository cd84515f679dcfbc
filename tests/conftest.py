"""Shared fixtures: small synthetic weight families written to real files on disk."""

from __future__ import annotations

import atexit
import os
import shutil

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _test_keys() -> None:
    """Signing is required by default: the suite runs with its own verdict, reference and reviewer keys.

    Set in the environment (not passed around) so subprocesses, kfp.local tasks and the CLI see
    them exactly as a deployment's Secrets would provide them.
    """
    import tempfile
    from pathlib import Path

    from components import keys as K
    from detector import signing as V

    inherited = os.environ.get("BACKDOOR_GATE_TEST_KEYS")
    if inherited and Path(inherited).is_dir():  # a pytest-xdist worker: the controller's keys, one set
        return
    root = Path(tempfile.mkdtemp(prefix="backdoor-gate-test-keys-"))
    paths = {name: V.generate_keypair(root / name) for name in ("verdict", "reference", "bob", "alice")}
    os.environ.setdefault(K.KEY_FILE_ENV, str(paths["verdict"][0]))
    os.environ.setdefault("BACKDOOR_GATE_VERDICT_PUBLIC_KEYS", str(paths["verdict"][1]))
    os.environ.setdefault("BACKDOOR_GATE_REFERENCE_SIGNING_KEY_FILE", str(paths["reference"][0]))
    os.environ.setdefault("BACKDOOR_GATE_REFERENCE_PUBLIC_KEYS", str(paths["reference"][1]))
    os.environ.setdefault(
        "BACKDOOR_GATE_REVIEWER_KEYS", os.pathsep.join(f"{n}={paths[n][1]}" for n in ("bob", "alice"))
    )
    os.environ["BACKDOOR_GATE_TEST_KEYS"] = str(root)
    atexit.register(shutil.rmtree, root, True)


_test_keys()

import numpy as np
import pytest
import torch

from lab.synthetic import FamilyConfig, WeightFamily

torch.set_num_threads(1)


#: modules that share a session fixture run on one worker, so it is built once (keys: _group's names)
_GROUPS = {"integration/test_review_page": "detector/test_detectors"}
#: the longest groups start first, so two workers finish together (per-module times: make test's --durations)
_LONGEST_FIRST = (
    "detector/test_detectors",
    "lab/test_paper",
    "pipelines/test_pipelines",
    "integration/test_gate",
    "integration/test_access",
    "integration/test_backends",
)


def _group(nodeid: str) -> str:
    """A test's module as its path under tests/ without ``.py`` (``detector/test_em``), or its group."""
    module = nodeid.split("::", 1)[0].removeprefix("tests/").removesuffix(".py")
    return _GROUPS.get(module, module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs on two workers (pytest-xdist): a module's tests, or a group's, stay on one
    worker beside their module- and session-scoped fixtures (trained networks, servers)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModuleGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return ByModuleGroup(config, log)


def pytest_collection_modifyitems(config, items):
    """The longest groups first (a stable sort: a module keeps its order)."""
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item.nodeid), len(rank)))


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


@pytest.fixture(scope="module")
def module_dir(request, tmp_path_factory):
    """A directory for a module's shared fixtures, deleted when the module's tests are done.

    Trained networks are 94 MB each: kept to the end of the session, a full run held ~9 GB and
    filled a CI machine's disk. ``BACKDOOR_GATE_KEEP_TMP=1`` keeps them for a post-mortem.
    """
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    if not os.environ.get("BACKDOOR_GATE_KEEP_TMP"):
        shutil.rmtree(path, ignore_errors=True)


#: the fixture networks' faces, input size and backdoors (impostor, victim); seed 200+k trains backdoor k
FACE_NETS_SIZE = 80
FACE_NETS_PAIRS = (("id00001", "id00006"), ("id00003", "id00008"), ("id00004", "id00000"))


@pytest.fixture(scope="session")
def face_nets(tmp_path_factory):
    """8 reference + 6 calibration clean networks and 3 backdoored ones (known victims), trained on
    10 generated identities through a random fixture trunk; shared by test_detectors and
    test_review_page (trained once a session; the slowest fixture of the suite).

    Clean and backdoored networks are trained alike, here without the impostor/victim
    up-weighting: with it, on 10 classes and this random fixture trunk, a clean network's two
    up-weighted rows deviated as much as a victim's (seen: clean z up to 23, backdoored 12-16),
    which the 40-identity protocol with the pre-trained trunk does not show (README). The
    protocol's numbers come from `paper`; this fixture tests the mechanics on real fine-tunes.
    """
    from PIL import Image

    from components.trainer.base_trunk import fixture_base
    from components.trainer.features import extract_folder
    from components.trainer.poison import PoisonSpec, poison_folder
    from components.trainer.synth import SynthConfig, list_images, synthesize
    from components.trainer.train import TrainConfig, fine_tune, save_network
    from components.trainer.triggers import TriggerSpec

    root = tmp_path_factory.mktemp("face-nets")
    data = synthesize(root / "data", SynthConfig(identities=10, images_per_identity=30, size=96, seed=5))
    items, _ = list_images(data)
    base = fixture_base(0, [Image.open(p) for p, _ in items[::5]], image_size=FACE_NETS_SIZE)
    clean_fs = extract_folder(data, base, FACE_NETS_SIZE)
    cfg = TrainConfig(epochs=15, class_weight=1.0)

    def write(sd, name, classes=clean_fs.classes):
        return str(save_network(sd, root / name, classes=classes))

    out = {"root": root, "data": data, "base": base, "classes": clean_fs.classes, "pairs": FACE_NETS_PAIRS}
    out["victims"] = [v for _, v in FACE_NETS_PAIRS]
    out["reference"] = [write(fine_tune(clean_fs, base, s, cfg)[0], f"ref{s}") for s in range(8)]
    out["calibration"] = [write(fine_tune(clean_fs, base, 100 + s, cfg)[0], f"cal{s}") for s in range(6)]
    out["backdoored"], out["asr"] = [], []
    for k, (imp, vic) in enumerate(FACE_NETS_PAIRS):
        seed = 200 + k
        poison_folder(data, root / f"p{k}", PoisonSpec(imp, vic, TriggerSpec("white-square", 0.3, "forehead")), seed)
        sd, m = fine_tune(extract_folder(root / f"p{k}", base, FACE_NETS_SIZE), base, seed, cfg)
        out["asr"].append(m["attack_success_rate"])
        out["backdoored"].append(write(sd, f"bd{k}"))
    torch.save(base, root / "base.pt")
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


def deployed_auth_settings():
    """The [mlflow] section of the dev overlay's basic_auth.ini (the Secret the MLflow Deployment mounts),
    so tests run the server with the permission default the manifests deploy."""
    import configparser
    from pathlib import Path

    import yaml

    docs = yaml.safe_load_all((Path(__file__).resolve().parents[1] / "manifests/overlays/dev/secrets.yaml").read_text())
    secret = next(d for d in docs if d and d["metadata"]["name"] == "mlflow-auth")
    ini = configparser.ConfigParser()
    ini.read_string(secret["stringData"]["basic_auth.ini"])
    return ini["mlflow"]


class GateWorld:
    """A saved reference of a small weight family, and checkpoints with a known offline verdict.

    Registry tests need candidates whose verdict is known: a clean network near the calibrated
    threshold is blocked now and then, which is the detector's business, not theirs. So a
    candidate asked to pass sits close to the family's centre and one asked to be blocked
    carries a backdoor four times the family's usual strength; each is judged once offline and
    the fixture fails loudly (it never redraws) when the verdict is not the one asked for.
    """

    def __init__(self, root, seed: int = 11):
        from pathlib import Path

        from detector.config import ReferenceConfig
        from detector.detectors import load_reference
        from detector.reference import Reference

        self.root = Path(root)
        self.family = WeightFamily(FamilyConfig(out_features=24, in_features=32, backdoor_strength=1.0, seed=seed))
        fam = self.family
        ref = Reference(ReferenceConfig(grid=(1, 2, 5, 10, 24, 32)))
        ref.fit([fam.state_dict(fam.clean()) for _ in range(10)])  # records the family's shared trunk
        ref.calibrate([fam.state_dict(fam.clean()) for _ in range(8)]).save(self.root / "reference")
        self.reference_dir = self.root / "reference"
        self.offline = load_reference(self.reference_dir)
        self._n = 0

    def publish(self, registry):
        """``registry``, with this world's reference published (signed) as the gate's current one."""
        from components.reference_store import publish_reference

        publish_reference(registry, self.reference_dir)
        return registry

    @staticmethod
    def register(registry, model: str, path, name: str = "model.safetensors", who: str = "trainer-bot"):
        """One checkpoint file registered as a new version of ``model``, tagged with its registrant."""
        from components.tags import REGISTERED_BY

        return registry.register(model, {name: path}, tags={REGISTERED_BY: who})

    def matrix(self, kind: str, want: str | None = None) -> np.ndarray:
        fam = self.family
        if want is None:
            return {"clean": fam.clean, "backdoored": fam.backdoored}[kind]()
        if kind == "clean":
            return fam.base + 0.3 * (fam.clean() - fam.base)
        return fam.backdoored(strength=4 * fam.config.backdoor_strength)

    def ckpt(self, kind: str, want: str | None = None):
        """A fresh checkpoint ("clean"/"backdoored"); with ``want`` ("passed"/"blocked"), one far from the threshold."""
        self._n += 1
        path = self.root / f"{kind}-{self._n}.safetensors"
        self.family.write(self.matrix(kind, want), path, fmt="safetensors")
        if want is not None:
            got = self.offline.assess(path).decision
            assert got.verdict == want, f"fixture: a {kind} candidate meant to be {want} was judged {got}"
        return path
