"""Access with MLflow basic auth on: who may move `production`, and credentials never leak."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from components import gate as G
from components.mlflow_server import MlflowServer
from components.registry import Registry, RegistryError
from tests.conftest import GateWorld

PASSWORDS = {
    "admin": "admin-Pa55-word-1",
    "trainer": "trainer-Pa55-2",
    "gate": "gate-Pa55-word-3",
    "reviewer": "reviewer-Pa55-4",
    "viewer": "viewer-Pa55-5",
}


@pytest.fixture
def as_user(monkeypatch):
    def switch(user: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS[user])

    return switch


@pytest.mark.slow
def test_basic_auth_roles_and_no_credential_leaks(tmp_path, as_user):
    world = GateWorld(tmp_path, seed=7)
    files = {"good": world.ckpt("clean", "passed"), "bad": world.ckpt("backdoored", "blocked")}
    ini = tmp_path / "auth.ini"
    ini.write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        f"admin_username = admin\nadmin_password = {PASSWORDS['admin']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    server = MlflowServer(
        tmp_path / "mlflow",
        env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-csrf-key"},
        args=("--app-name", "basic-auth"),
    ).start()
    try:
        from mlflow.server import get_app_client

        as_user("admin")
        admin = get_app_client("basic-auth", tracking_uri=server.uri)
        for user in ("trainer", "gate", "reviewer", "viewer"):
            admin.create_user(user, PASSWORDS[user])
        reg = Registry(server.uri)
        exp_id = reg.client.create_experiment("backdoor-gate")
        for name in ("facenet", G.GateConfig().reference_model):
            reg.client.create_registered_model(name)
        G.publish_reference(reg, world.reference_dir)  # the admin publishes the reference
        # the reviewer writes a signed override document into the version's run: EDIT on the experiment too
        grants = [
            ("trainer", "experiment", exp_id, "EDIT"),
            ("trainer", "registered_model", "facenet", "EDIT"),
            ("gate", "experiment", exp_id, "EDIT"),
            ("gate", "registered_model", "facenet", "EDIT"),
            ("reviewer", "registered_model", "facenet", "EDIT"),
            ("reviewer", "experiment", exp_id, "EDIT"),
        ]
        for user, kind, resource, permission in grants:
            admin.grant_user_permission(user, kind, resource, permission)

        as_user("trainer")
        good = Registry(server.uri).register(
            "facenet", {"model.safetensors": files["good"]}, tags={G.REGISTERED_BY: "trainer"}
        )
        bad = Registry(server.uri).register(
            "facenet", {"model.safetensors": files["bad"]}, tags={G.REGISTERED_BY: "trainer"}
        )
        # no credentials: refused outright; read-only identities cannot move the alias
        as_user("viewer")
        with pytest.raises(RegistryError, match="403|PERMISSION_DENIED|permission"):
            Registry(server.uri).set_alias("facenet", "production", good.version)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "backdoor_gate.cli",
                "gate",
                "--version",
                good.version,
                "--no-report",
                "--tracking-uri",
                server.uri,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert p.returncode == 2 and "gate error" in p.stdout + p.stderr
        # the gate identity, credentials from the environment (a Secret in the cluster)
        outputs = []
        for v, want in ((good.version, 0), (bad.version, 1)):
            p = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "backdoor_gate.cli",
                    "gate",
                    "--version",
                    v,
                    "--no-report",
                    "--tracking-uri",
                    server.uri,
                ],
                capture_output=True,
                text=True,
                timeout=300,
                env=dict(env, MLFLOW_TRACKING_USERNAME="gate", MLFLOW_TRACKING_PASSWORD=PASSWORDS["gate"]),
            )
            assert p.returncode == want, p.stdout + p.stderr
            outputs.append(p.stdout + p.stderr)
        as_user("viewer")
        reg = Registry(server.uri)
        assert reg.version_by_alias("facenet", "production").version == good.version
        # the registrant cannot override its own blocked version; another reviewer can
        from detector import verdict as V

        keys = {n: V.generate_keypair(tmp_path / n) for n in ("trainer", "reviewer")}
        reviewers = G.GateConfig(reviewer_keys=tuple((n, V.load_public_key(pub)) for n, (_, pub) in keys.items()))
        sk = {n: V.load_private_key(priv.read_bytes()) for n, (priv, _) in keys.items()}
        as_user("trainer")
        with pytest.raises(G.OverrideRefused, match="different reviewer"):
            G.override(
                "facenet",
                bad.version,
                reason="mine is fine",
                key=sk["trainer"],
                registry=Registry(server.uri),
                config=reviewers,
            )
        as_user("reviewer")
        info = G.override(
            "facenet",
            bad.version,
            reason="false positive, checked by hand",
            key=sk["reviewer"],
            registry=Registry(server.uri),
            config=reviewers,
        )
        assert info.tags[G.OVERRIDE_BY] == "reviewer"
        # no password appears in any tag or in what the gate printed
        as_user("viewer")
        tags = [
            t for v in (good.version, bad.version) for t in Registry(server.uri).version("facenet", v).tags.values()
        ]
        for secret in PASSWORDS.values():
            assert not any(secret in t for t in tags) and not any(secret in o for o in outputs)
    finally:
        server.stop()
