"""The gate against a production-shaped MLflow: PostgreSQL backend store, S3 artifact store, basic auth.

Everything here is a real process on loopback, started and stopped by this module:

- PostgreSQL (Debian's server binaries: ``initdb`` + ``pg_ctl`` into a temporary directory, on a
  free port, as the ``postgres`` user when the tests run as root, since postgres refuses root);
- an S3 server (moto's server mode, ``moto_server``; it speaks the S3 protocol over HTTP but does
  not check credentials), with the bucket created through boto3;
- ``mlflow server`` with the arguments of ``manifests/base/mlflow/deployment.yaml`` (read from it:
  ``--app-name=basic-auth --serve-artifacts --artifacts-destination=s3://…``), the backend store
  ``postgresql+psycopg2://…`` and the credentials in the environment variables that Deployment sets.

The gate code is the project's own, unchanged (:mod:`components.gate`); only the tracking URI
and the credentials in the environment differ from the sqlite tests in ``test_gate.py``.
What is proved: versions registered and gated through that stack, the weight files and reports
really in the bucket (listed with boto3, bytes compared), the alias and tags really in
PostgreSQL (read with psycopg2), ``production`` set only on a pass, and, with the manifests'
``default_permission`` and the grants of ``backdoor-gate access grant``, that an identity granted
READ can neither move ``production`` nor register a version, nor read the reference.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from components import gate as G
from components import tags as T
from components.config import GateConfig
from components.reference_store import publish_reference
from components.registry import MlflowRegistry, RegistryError
from tests.polling import wait_for

BUCKET = "mlflow-artifacts"
PREFIX = "mlartifacts"
GATE_USER = "backdoor-gate"  # the gate identity: MANAGE on facenet, READ on the reference
PUBLISHER_USER = "backdoor-gate-publisher"  # publishes the reference, and only that
TRAINER_USER = "data-scientist"  # a reader: READ on facenet and its experiment, nothing on the reference
ADMIN_USER = "admin"
STARTUP_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _venv_bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _running(what: str, proc: subprocess.Popen | None, log: Path):
    """A wait_for check: waiting is over when the process has exited."""

    def check() -> None:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")

    return check


def _stop_group(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)  # throw-away servers: no need for a long graceful shutdown
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


# -- PostgreSQL ---------------------------------------------------------------------------------
def _pg_bindir() -> Path | None:
    candidates = [shutil.which("pg_ctl")] + sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    for c in candidates:
        if c and os.access(c, os.X_OK) and (Path(c).resolve().parent / "initdb").exists():
            return Path(c).resolve().parent
    return None


class Postgres:
    """A throw-away cluster: initdb into a temp dir, pg_ctl start on a free port, pg_ctl stop, rm."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = _free_port()
        self.user, self.password = "mlflow", secrets.token_hex(12)
        # Not under pytest's tmp dir: that one is private to root (0700) and postgres may run as another user.
        self.root = Path(tempfile.mkdtemp(prefix="backdoor-gate-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.run_as: dict = {}
        if os.geteuid() == 0:  # postgres refuses to run as root: run it as the distribution's user
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL server as")
            self.run_as = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.started = False

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            check=True,
            cwd=self.root,
            timeout=timeout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            **self.run_as,
        )

    def start(self) -> Postgres:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.run_as:
            os.chown(pwfile, self.run_as["user"], self.run_as["group"])
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                self.user,
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--locale=C",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            )
            self.started = True
            self._run(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} -c fsync=off",
                "start",
                timeout=90,
            )
        except subprocess.CalledProcessError as e:
            detail = (e.stdout or b"").decode(errors="replace")[-1500:]
            if self.log.exists():
                detail += self.log.read_text(errors="replace")[-1500:]
            self.stop()
            raise RuntimeError(f"PostgreSQL did not start: {detail}") from e
        for db in ("mlflow", "mlflow_auth"):
            with contextlib.closing(self.connect("postgres")) as conn:
                conn.autocommit = True
                conn.cursor().execute(f"CREATE DATABASE {db}")
        return self

    def uri(self, db: str) -> str:
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"

    def connect(self, db: str):
        import psycopg2  # password over TCP (scram-sha-256), as the MLflow server connects

        return psycopg2.connect(
            host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname=db, connect_timeout=10
        )

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(Exception):
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)


# -- S3 -------------------------------------------------------------------------------------------
class S3Server:
    def __init__(self, root: Path):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = root / "s3.log"
        self.creds = {
            "AWS_ACCESS_KEY_ID": "backdoor-gate-test",
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [_venv_bin("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> bool:
            try:
                self.client().list_buckets()
                return True
            except Exception:
                return False

        wait_for(
            ready,
            STARTUP_TIMEOUT,
            what="moto S3 server ready",
            interval=0.3,
            check=_running("moto S3 server", self.proc, self.log),
            detail=lambda: self.log.read_text(errors="replace")[-2000:],
        )
        return self

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.creds["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.creds["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.creds["AWS_SECRET_ACCESS_KEY"],
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def objects(self, prefix: str = "") -> dict[str, int]:
        out, pages = {}, self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for page in pages:
            out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return out

    def stop(self) -> None:
        _stop_group(self.proc)


# -- MLflow -----------------------------------------------------------------------------------------
def _deployment_command() -> tuple[list[str], set[str]]:
    """The tracking server's args and environment names, read from the manifest that deploys it."""
    import yaml

    path = Path(__file__).resolve().parents[2] / "manifests/base/mlflow/deployment.yaml"
    container = yaml.safe_load(path.read_text())["spec"]["template"]["spec"]["containers"][0]
    names = {e["name"] for e in container["env"]}  # the Secret-fed ones and the auth config path
    assert {"--serve-artifacts", "--app-name=basic-auth"} <= set(container["args"])
    return container["args"], names


class ProductionMlflow:
    """``mlflow server`` with the production flags (see manifests/base/mlflow/deployment.yaml)."""

    def __init__(self, root: Path, pg: Postgres, s3: S3Server):
        self.root, self.pg, self.s3 = root, pg, s3
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow.log"
        self.admin_password = secrets.token_hex(12)
        self.proc: subprocess.Popen | None = None

    def start(self) -> ProductionMlflow:
        ini = self.root / "basic_auth.ini"
        from tests.conftest import deployed_auth_settings

        ini.write_text(
            f"[mlflow]\ndefault_permission = {deployed_auth_settings()['default_permission']}\n"
            f"database_uri = {self.pg.uri('mlflow_auth')}\n"
            f"admin_username = {ADMIN_USER}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 60\n"  # else every request pays a PBKDF2 check (as in the manifests)
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "AWS_"))}
        env.update(
            self.s3.creds,
            MLFLOW_S3_ENDPOINT_URL=self.s3.endpoint,
            MLFLOW_DISABLE_TELEMETRY="true",
            MLFLOW_AUTH_CONFIG_PATH=str(ini),
            MLFLOW_AUTH_ADMIN_PASSWORD=self.admin_password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
            MLFLOW_BACKEND_STORE_URI=self.pg.uri("mlflow"),
            MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",
            MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true",
        )
        args, env_names = _deployment_command()
        missing = env_names - set(env) - {"HOME"}
        assert not missing, f"the Deployment sets {missing}, which this test does not: keep them in step"
        args = [
            a.replace("$(MLFLOW_ARTIFACTS_DESTINATION)", f"s3://{BUCKET}/{PREFIX}")
            for a in args
            if not a.startswith(("--host", "--port", "--workers"))
        ]
        cwd = self.root / "cwd"  # a local ./mlartifacts here would mean the S3 store was not used
        cwd.mkdir()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [_venv_bin("mlflow"), *args, "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    return r.status == 200
            except (OSError, urllib.error.HTTPError):
                return False

        wait_for(
            ready,
            90,
            what="mlflow server ready",
            interval=0.3,
            check=_running("mlflow server", self.proc, self.log),
            detail=lambda: self.log.read_text(errors="replace")[-2000:],
        )
        return self

    def stop(self) -> None:
        _stop_group(self.proc)


@contextlib.contextmanager
def as_user(username: str, password: str):
    """MLflow's client reads basic-auth credentials from the environment on every request."""
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = username, password
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- the stack, once for the module -------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    root = tmp_path_factory.mktemp("backends")
    pg, s3, mlflow = Postgres(bindir), S3Server(root), None
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # a refused request fails at once, no backoff
    try:
        pg.start()
        s3.start()
        s3.client().create_bucket(Bucket=BUCKET)
        mlflow = ProductionMlflow(root, pg, s3).start()
        from mlflow.server.auth.client import AuthServiceClient

        from components.access import AccessPolicy, apply

        users = (GATE_USER, PUBLISHER_USER, TRAINER_USER)
        passwords = {name: secrets.token_hex(12) for name in users}
        with as_user(ADMIN_USER, mlflow.admin_password):
            auth = AuthServiceClient(mlflow.uri)
            for name, password in passwords.items():
                auth.create_user(name, password)
            policy = AccessPolicy(gate=GATE_USER, publisher=PUBLISHER_USER, readers=(TRAINER_USER,))
            _, problems = apply(policy, mlflow.uri)
            assert not problems, problems
        yield type("Stack", (), dict(pg=pg, s3=s3, mlflow=mlflow, passwords=passwords, root=root))
    finally:
        if retries is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = retries
        if mlflow is not None:
            mlflow.stop()
        s3.stop()
        pg.stop()


_names = itertools.count()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small calibrated reference and candidates with a known offline verdict (as in test_gate.py)."""
    from tests.conftest import GateWorld

    return GateWorld(tmp_path_factory.mktemp("backends-world"), seed=23)


@pytest.fixture(scope="module")
def published(stack, world):
    """The reference, published once by its publisher (the gate may only read it)."""
    with as_user(PUBLISHER_USER, stack.passwords[PUBLISHER_USER]):
        return publish_reference(MlflowRegistry(stack.mlflow.uri), world.reference_dir)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_gate_through_postgres_s3_and_basic_auth(stack, world, published):
    model = "facenet"
    reg = MlflowRegistry(stack.mlflow.uri)
    clean, backdoored = world.ckpt("clean", "passed"), world.ckpt("backdoored", "blocked")

    with as_user(GATE_USER, stack.passwords[GATE_USER]):
        good = reg.register(model, {"model.safetensors": clean}, tags={T.REGISTERED_BY: "trainer-bot"})
        r = G.gate(model, good.version, registry=reg)
        assert (r.verdict, r.exit_code, r.promoted) == ("passed", 0, True), r.reason
        assert reg.version_by_alias(model, "production").version == good.version

        bad = reg.register(model, {"model.safetensors": backdoored}, tags={T.REGISTERED_BY: "trainer-bot"})
        r = G.gate(model, bad.version, registry=reg)
        assert (r.verdict, r.exit_code, r.promoted) == ("blocked", 1, False), r.reason
        assert reg.version_by_alias(model, "production").version == good.version  # alias only on a pass
        assert reg.version(model, bad.version).tags[T.VERDICT] == "blocked"
        good_info, bad_info = reg.version(model, good.version), reg.version(model, bad.version)

    # The artifacts are in the bucket, byte for byte, under the run that each version points at.
    objects = stack.s3.objects(PREFIX + "/")
    s3 = stack.s3.client()
    for info, path in ((good_info, clean), (bad_info, backdoored)):
        key = next((k for k in objects if f"/{info.run_id}/" in k and k.endswith("weights/model.safetensors")), None)
        assert key is not None, f"v{info.version}'s weights not in s3://{BUCKET}: {sorted(objects)}"
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert _sha(body) == _sha(path.read_bytes()) == info.tags[T.MODEL_SHA]
    assert any(k.endswith("reference/arrays.npz") for k in objects) and any(
        k.endswith("reference/reference.json") for k in objects
    )
    report_keys = [k for k in objects if f"/{bad_info.run_id}/" in k and k.endswith("report.html")]
    assert report_keys, "the blocked version's review report is not in the bucket"
    assert b"blocked" in s3.get_object(Bucket=BUCKET, Key=report_keys[0])["Body"].read()
    assert not (stack.mlflow.root / "cwd" / "mlartifacts").exists(), "the server wrote artifacts to local disk"

    # The registry state is in PostgreSQL (read with psycopg2, not through MLflow).
    with contextlib.closing(stack.pg.connect("mlflow")) as conn, conn.cursor() as cur:
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (model,))
        assert cur.fetchall() == [("production", int(good.version))]
        cur.execute(
            "SELECT version, value FROM model_version_tags WHERE name = %s AND key = %s ORDER BY version",
            (model, T.VERDICT),
        )
        assert cur.fetchall() == [(int(good.version), "passed"), (int(bad.version), "blocked")]


def test_only_the_gate_identity_can_move_production(stack, world, published):
    """A reader (READ granted) can read, but not move aliases nor add versions, nor read the reference."""
    model = "facenet"
    reg = MlflowRegistry(stack.mlflow.uri)
    before = None
    with as_user(GATE_USER, stack.passwords[GATE_USER]):
        try:
            promoted = reg.version_by_alias(model, "production")
        except RegistryError:  # with basic auth, asking about a model that does not exist yet is a 403
            promoted = None
        if promoted is None:  # this test alone: make a promoted version
            v = reg.register(model, {"model.safetensors": world.ckpt("clean", "passed")})
            assert G.gate(model, v.version, registry=reg).promoted
        before = reg.version_by_alias(model, "production").version
        blocked = [v.version for v in reg.search(f"name='{model}' and tags.`integrity.verdict`='blocked'")]
        target = blocked[0] if blocked else before

    with as_user(TRAINER_USER, stack.passwords[TRAINER_USER]):
        assert reg.version_by_alias(model, "production").version == before  # READ works
        with pytest.raises(RegistryError, match="PERMISSION_DENIED|403|ermission"):
            reg.set_alias(model, "production", target)
        source = reg.version(model, target)
        with pytest.raises(RegistryError, match="PERMISSION_DENIED|403|ermission"):  # no new versions either
            reg._call("registering", reg.client.create_model_version, model, source=source.source, run_id=source.run_id)
        with pytest.raises(RegistryError, match="PERMISSION_DENIED|403"):  # the reference is the gate's to read
            reg.version_by_alias(published.name, "current")
        with tempfile.TemporaryDirectory() as tmp, pytest.raises(RegistryError, match="PERMISSION_DENIED|403"):
            reg.download(published.source, tmp)  # its run's artifacts, proxied from the bucket
    from mlflow.server.auth.client import AuthServiceClient

    with as_user(ADMIN_USER, stack.mlflow.admin_password):
        auth = AuthServiceClient(stack.mlflow.uri)
        # what `access grant` gave: the gate MANAGE on facenet (it deletes `production` when no version may
        # hold it) and READ on the reference, which only its publisher writes; the reader READ on facenet only
        assert auth.get_user_permission(GATE_USER, "registered_model", model).permission == "MANAGE"
        assert auth.get_user_permission(GATE_USER, "registered_model", published.name).permission == "READ"
        assert auth.get_user_permission(PUBLISHER_USER, "registered_model", published.name).permission == "EDIT"
        assert auth.get_user_permission(TRAINER_USER, "registered_model", model).permission == "READ"
        assert auth.get_user_permission(TRAINER_USER, "registered_model", published.name).permission == "NO_PERMISSIONS"
        # a reviewer is granted EDIT explicitly (docs/deploying.md, step 5): that is alias power
        auth.create_user("reviewer", stack.passwords[TRAINER_USER])
        auth.grant_user_permission("reviewer", "registered_model", model, "EDIT")
    with as_user("reviewer", stack.passwords[TRAINER_USER]):
        reg.set_alias(model, "reviewed", target)
        assert reg.version_by_alias(model, "reviewed").version == target
    with as_user(TRAINER_USER, "wrong-password"):
        with pytest.raises(RegistryError, match="401|nauthorized|UNAUTHENTICATED|credentials"):
            reg.version_by_alias(model, "production")
    with as_user(GATE_USER, stack.passwords[GATE_USER]):
        assert reg.version_by_alias(model, "production").version == before


def test_s3_outage_fails_closed_and_a_rerun_converges(stack, world, published, monkeypatch):
    """The artifact store stops answering (process frozen) mid-life: no verdict, alias untouched."""
    import signal

    model = "facenet-s3-outage"
    reg = MlflowRegistry(stack.mlflow.uri)
    with as_user(GATE_USER, stack.passwords[GATE_USER]):
        v = reg.register(
            model, {"model.safetensors": world.ckpt("clean", "passed")}, tags={T.REGISTERED_BY: "trainer-bot"}
        )
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        os.killpg(stack.s3.proc.pid, signal.SIGSTOP)
        try:
            r = G.gate(model, v.version, registry=reg, config=GateConfig(report=False))
        finally:
            os.killpg(stack.s3.proc.pid, signal.SIGCONT)
        assert r.exit_code == 2 and r.verdict != "passed" and not r.promoted and "gate error" in r.reason, r.reason
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        assert reg.version(model, v.version).tags.get(T.VERDICT) in ("pending", "error")
        assert reg.version_by_alias(model, "production") is None
        r = G.gate(model, v.version, registry=reg, config=GateConfig(report=False))
        assert (r.verdict, r.promoted) == ("passed", True), r.reason
