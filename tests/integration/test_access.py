"""Access with MLflow basic auth on, as deployed: who may move `production`, who may read the reference.

One real ``mlflow server --app-name basic-auth`` for the module, configured with the
``default_permission`` and auth cache of the dev overlay's ``basic_auth.ini`` (so the manifests'
setting is the one tested), users created by the admin and their permissions applied by the
deployment's one command, ``backdoor-gate access grant`` (:mod:`components.access`). The
reference is published by its own identity into its own registered model and experiment.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

import pytest

from components import access as A
from components import gate as G
from components import policy
from components import tags as T
from components.config import GateConfig
from components.mlflow_server import MlflowServer
from components.reference_store import publish_reference
from components.registry import CANDIDATE_EXPERIMENT, REFERENCE_DIR, MlflowRegistry, RegistryError
from tests.conftest import GateWorld, deployed_auth_settings

PASSWORDS = {
    "admin": "admin-Pa55-word-1",
    "trainer": "trainer-Pa55-2",  # a registrant: EDIT on facenet and its experiment
    "gate": "gate-Pa55-word-3",
    "reviewer": "reviewer-Pa55-4",
    "viewer": "viewer-Pa55-5",  # a reader: deployers, auditors
    "publisher": "publisher-Pa55-6",  # publishes the reference, and only that
}
OUTSIDERS = ("trainer", "reviewer", "viewer")  # identities that must never read the reference
DENIED = "403|PERMISSION_DENIED"


@contextlib.contextmanager
def as_user(user: str):
    """MLflow's client reads basic-auth credentials from the environment on every request."""
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user, PASSWORDS[user]
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def http_get(url: str, user: str) -> tuple[int, bytes]:
    """A raw GET with basic auth, as any HTTP client would send it (no MLflow client in the way)."""
    token = base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("access")
    world = GateWorld(tmp, seed=7)
    deployed = deployed_auth_settings()
    ini = tmp / "auth.ini"
    ini.write_text(
        f"[mlflow]\ndefault_permission = {deployed['default_permission']}\n"
        f"database_uri = sqlite:///{tmp / 'auth.db'}\n"
        f"admin_username = admin\nadmin_password = {PASSWORDS['admin']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {deployed.get('auth_cache_ttl_seconds', '0')}\n"
    )
    server = MlflowServer(
        tmp / "mlflow",
        env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-csrf-key"},
        args=("--app-name", "basic-auth"),
    ).start()
    try:
        from mlflow.server import get_app_client

        from backdoor_gate.cli import main

        with as_user("admin"):
            admin = get_app_client("basic-auth", tracking_uri=server.uri)
            for user in PASSWORDS.keys() - {"admin"}:
                admin.create_user(user, PASSWORDS[user])
            # the deployment's one command: experiments, models and every identity's grants
            roles = ["--gate", "gate", "--publisher", "publisher", "--registrant", "trainer"]
            roles += ["--reviewer", "reviewer", "--reader", "viewer", "--tracking-uri", server.uri]
            assert main(["access", "grant", *roles]) == 0
            table = A.AccessPolicy("gate", "publisher", ("trainer",), ("reviewer",), ("viewer",))
            assert A.apply(table, server.uri) == ([], [])  # idempotent: nothing left to change, nobody can read it
        with as_user("publisher"):
            published = publish_reference(MlflowRegistry(server.uri), world.reference_dir)
        yield type("Deployment", (), dict(server=server, world=world, reference=published, tmp=tmp))
    finally:
        server.stop()


def _gate_cli(uri: str, version: str, user: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    if user:
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=PASSWORDS[user])
    return subprocess.run(
        [sys.executable, "-m", "backdoor_gate.cli", "gate", "--version", version, "--no-report", "--tracking-uri", uri],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_basic_auth_roles_and_no_credential_leaks(deployment):
    server, world = deployment.server, deployment.world
    files = {"good": world.ckpt("clean", "passed"), "bad": world.ckpt("backdoored", "blocked")}
    with as_user("trainer"):
        good = MlflowRegistry(server.uri).register(
            "facenet", {"model.safetensors": files["good"]}, tags={T.REGISTERED_BY: "trainer"}
        )
        bad = MlflowRegistry(server.uri).register(
            "facenet", {"model.safetensors": files["bad"]}, tags={T.REGISTERED_BY: "trainer"}
        )
    # read-only identities cannot move the alias; no credentials: refused outright
    with as_user("viewer"), pytest.raises(RegistryError, match="403|PERMISSION_DENIED|permission"):
        MlflowRegistry(server.uri).set_alias("facenet", "production", good.version)
    p = _gate_cli(server.uri, good.version, None)
    assert p.returncode == 2 and "gate error" in p.stdout + p.stderr
    # the gate identity, credentials from the environment (a Secret in the cluster), reads the
    # reference it may only read and judges: exit 0 passed, 1 blocked
    outputs = []
    for v, want in ((good.version, 0), (bad.version, 1)):
        p = _gate_cli(server.uri, v, "gate")
        assert p.returncode == want, p.stdout + p.stderr
        outputs.append(p.stdout + p.stderr)
    with as_user("viewer"):
        assert MlflowRegistry(server.uri).version_by_alias("facenet", "production").version == good.version
    # the registrant cannot override its own blocked version; another reviewer can
    from detector import signing as V

    keys = {n: V.generate_keypair(deployment.tmp / n) for n in ("trainer", "reviewer")}
    reviewers = GateConfig(reviewer_keys=tuple((n, V.load_public_key(pub)) for n, (_, pub) in keys.items()))
    sk = {n: V.load_private_key(priv.read_bytes()) for n, (priv, _) in keys.items()}
    with as_user("trainer"), pytest.raises(policy.OverrideRefused, match="different reviewer"):
        policy.override(
            "facenet",
            bad.version,
            reason="mine is fine",
            key=sk["trainer"],
            registry=MlflowRegistry(server.uri),
            config=reviewers,
        )
    with as_user("reviewer"):
        info = policy.override(
            "facenet",
            bad.version,
            reason="false positive, checked by hand",
            key=sk["reviewer"],
            registry=MlflowRegistry(server.uri),
            config=reviewers,
        )
    assert info.tags[T.OVERRIDE_BY] == "reviewer"
    # no password appears in any tag or in what the gate printed
    with as_user("viewer"):
        tags = [
            t
            for v in (good.version, bad.version)
            for t in MlflowRegistry(server.uri).version("facenet", v).tags.values()
        ]
    for secret in PASSWORDS.values():
        assert not any(secret in t for t in tags) and not any(secret in o for o in outputs)


def _reference_run(deployment) -> dict:
    """Where the published reference lives, as the gate sees it (it may read it)."""
    with as_user("gate"):
        reg = MlflowRegistry(deployment.server.uri)
        info = reg.version_by_alias(GateConfig().reference_model, "current")
        assert info is not None and info.run_id, "no published reference"
        run = reg.client.get_run(info.run_id)
        candidates = reg.client.get_experiment_by_name(CANDIDATE_EXPERIMENT)
        assert candidates is not None
    return dict(
        info=info,
        run_id=info.run_id,
        artifact_uri=run.info.artifact_uri,
        experiment=run.info.experiment_id,
        candidate_experiment=candidates.experiment_id,
    )


@pytest.mark.slow
def test_registrants_cannot_read_the_reference(deployment):
    """A registrant (EDIT on the candidate model and its experiment), a reviewer and a reader get 403 on
    every way to the reference's arrays; the gate still reads them. The public face is the digest."""
    server, world = deployment.server, deployment.world
    uri, config = server.uri, GateConfig()
    ref = _reference_run(deployment)
    assert ref["experiment"] != ref["candidate_experiment"], "the reference's run shares the candidates' experiment"
    # the artifact proxy's path is <experiment id>/<run id>/artifacts/...: the server judges it by the experiment
    proxied = ref["artifact_uri"].removeprefix("mlflow-artifacts:/").lstrip("/") + f"/{REFERENCE_DIR}"
    assert proxied.startswith(f"{ref['experiment']}/{ref['run_id']}/"), ref["artifact_uri"]
    arrays = (world.reference_dir / "arrays.npz").read_bytes()
    q = urllib.parse.urlencode
    urls = {
        "proxy download": f"{uri}/api/2.0/mlflow-artifacts/artifacts/{proxied}/arrays.npz",
        "proxy download (ajax)": f"{uri}/ajax-api/2.0/mlflow-artifacts/artifacts/{proxied}/arrays.npz",
        "proxy list": f"{uri}/api/2.0/mlflow-artifacts/artifacts?{q({'path': proxied})}",
        "run artifact": f"{uri}/get-artifact?{q({'run_uuid': ref['run_id'], 'path': f'{REFERENCE_DIR}/arrays.npz'})}",
        "version artifact": f"{uri}/model-versions/get-artifact?"
        + q({"name": config.reference_model, "version": ref["info"].version, "path": "arrays.npz"}),
    }
    # the gate reads them (so a 403 below is the permission, not a wrong address); the UI's version route
    # passes the permission check but cannot resolve a proxied source server-side (MLflow 3.17.2: 500)
    for what, url in urls.items():
        status, body = http_get(url, "gate")
        if what == "version artifact":
            assert status not in (401, 403), (what, status, body[:300])
            continue
        assert status == 200, (what, status, body[:300])
        assert what == "proxy list" or body == arrays, what
    with as_user("gate"), tempfile.TemporaryDirectory() as tmp:
        got = MlflowRegistry(uri).download(f"models:/{config.reference_model}@{config.reference_alias}", tmp)
        assert (got / "arrays.npz").read_bytes() == arrays
    for user in OUTSIDERS:
        for what, url in urls.items():
            status, body = http_get(url, user)
            assert status == 403, f"{user} read the reference through {what}: HTTP {status} {body[:200]!r}"
        with as_user(user):
            reg = MlflowRegistry(uri)
            with pytest.raises(RegistryError, match=DENIED):
                reg.version_by_alias(config.reference_model, config.reference_alias)
            with pytest.raises(RegistryError, match=DENIED):
                reg.version(config.reference_model, ref["info"].version)
            for source in (
                f"models:/{config.reference_model}@{config.reference_alias}",  # the path the gate downloads
                f"{ref['artifact_uri']}/{REFERENCE_DIR}",  # the run's artifact URI, through the proxy
                f"runs:/{ref['run_id']}/{REFERENCE_DIR}",
            ):
                with tempfile.TemporaryDirectory() as tmp, pytest.raises(RegistryError, match=DENIED):
                    reg.download(source, tmp)
            with pytest.raises(RegistryError, match=DENIED):
                reg._call("listing", reg.client.list_artifacts, ref["run_id"], REFERENCE_DIR)
            with pytest.raises(RegistryError, match=DENIED):
                reg._call("reading the run", reg.client.get_run, ref["run_id"])
            # searches do not show it either
            assert reg.client.search_model_versions(f"name='{config.reference_model}'") == []
            assert config.reference_experiment not in [e.name for e in reg.client.search_experiments()]
    with as_user("trainer"):
        reg = MlflowRegistry(uri)
        # nor can the registrant make the server copy it into a version it can read
        for source, run_id in (
            (f"runs:/{ref['run_id']}/{REFERENCE_DIR}", ref["run_id"]),
            (f"models:/{config.reference_model}/{ref['info'].version}", None),
        ):
            with pytest.raises(RegistryError, match=DENIED):
                reg._call("registering", reg.client.create_model_version, "facenet", source=source, run_id=run_id)
        # what the registrant sees of the reference through its own candidate's verdict: its digest and version
        v = reg.register("facenet", {"model.safetensors": world.ckpt("backdoored", "blocked")})
    with as_user("gate"):
        result = G.gate("facenet", v.version, registry=MlflowRegistry(uri))
    assert (result.verdict, result.exit_code) == ("blocked", 1), result.reason
    with as_user("trainer"):
        reg = MlflowRegistry(uri)
        info = reg.version("facenet", v.version)
        assert info.tags[T.REFERENCE_SHA] == world.offline.artifact_sha256_
        assert info.tags[T.REFERENCE_VERSION] == ref["info"].version
        _, doc = policy.signed_verdict(reg, info, config)
        assert doc["reference_sha256"] == world.offline.artifact_sha256_
        # numbers in the signed verdict: the per-part scores and thresholds (the oracle reviewers need), nothing else
        numbers = {k for k, val in doc.items() if isinstance(val, (int, float)) and not isinstance(val, bool)}
        numeric_maps = {
            k
            for k, val in doc.items()
            if isinstance(val, dict) and any(isinstance(x, (int, float, list)) for x in val.values())
        }
        assert numbers <= {"format_version"} and numeric_maps <= {"scores", "thresholds", "evidence_scores"}, doc
        assert not any(isinstance(val, list) for val in doc.values()), doc
        # the candidate's run holds no file of the reference
        reference_files = {
            hashlib.sha256(p.read_bytes()).hexdigest() for p in world.reference_dir.rglob("*") if p.is_file()
        }
        with tempfile.TemporaryDirectory() as tmp:
            root = reg.download(f"runs:/{info.run_id}/", tmp)
            seen = {
                p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in root.rglob("*")
                if p.is_file()
            }
            assert f"integrity/v{v.version}/report.html" in seen, sorted(seen)
            assert not reference_files & set(seen.values()), sorted(seen)
            page = (root / f"integrity/v{v.version}/report.html").read_text()
        assert world.offline.artifact_sha256_ in page
    # `access grant` notices a grant made by hand that lets an outsider read the reference, and unknown users
    table = A.AccessPolicy("gate", "publisher", ("trainer",), ("reviewer",), ("viewer",))
    with as_user("admin"):
        auth = A._Server(uri).auth
        auth.grant_user_permission("viewer", A.MODEL, config.reference_model, "READ")
        try:
            changes, problems = A.apply(table, uri)
        finally:
            auth.revoke_user_permission("viewer", A.MODEL, config.reference_model)
        assert changes == [] and len(problems) == 1 and problems[0].startswith("viewer has READ"), problems
        assert A.apply(table, uri) == ([], [])
        with pytest.raises(A.AccessError, match="no such MLflow user: nobody"):
            A.apply(A.AccessPolicy("gate", "publisher", readers=("nobody",)), uri)


def test_access_policy_keeps_the_reference_to_the_gate_and_its_publisher():
    """The table, without a server: who gets what, and the policies refused before anything is touched."""
    table = A.AccessPolicy(gate="g", publisher="p", registrants=("alice",), reviewers=("bob",), readers=("eve",))
    grants = {(x.user, x.kind, x.name): x.permission for x in table.grants()}
    ref_model, ref_exp = table.reference_model, table.reference_experiment
    on_reference = {(u, k, n): p for (u, k, n), p in grants.items() if n in (ref_model, ref_exp)}
    assert on_reference == {
        ("g", A.MODEL, ref_model): "READ",
        ("g", A.EXPERIMENT, ref_exp): "READ",
        ("p", A.MODEL, ref_model): "EDIT",
        ("p", A.EXPERIMENT, ref_exp): "EDIT",
    }
    assert grants[("g", A.MODEL, "facenet")] == "MANAGE"  # deleting `production` needs it
    assert grants[("alice", A.MODEL, "facenet")] == grants[("bob", A.MODEL, "facenet")] == "EDIT"
    assert grants[("eve", A.MODEL, "facenet")] == grants[("eve", A.EXPERIMENT, CANDIDATE_EXPERIMENT)] == "READ"
    assert ref_exp != CANDIDATE_EXPERIMENT and ref_exp == GateConfig().reference_experiment
    for bad in (
        A.AccessPolicy(gate="g", publisher="p", registrants=("g",)),  # the gate's identity used to register
        A.AccessPolicy(gate="g", publisher="p", readers=("p",)),
        A.AccessPolicy(reference_experiment=CANDIDATE_EXPERIMENT),
    ):
        with pytest.raises(ValueError, match="reference"):
            bad.grants()
