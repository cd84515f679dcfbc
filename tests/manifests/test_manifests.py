"""Kubernetes manifests, checked offline (no API server can run here).

What is checked:
- every manifest file under ``manifests/`` (resources, not kustomize patches) validates against
  the Kubernetes OpenAPI schemas in strict mode (unknown fields fail) with ``kubernetes-validate``,
  for the oldest and a recent supported Kubernetes version;
- each overlay (``base``, ``overlays/dev``, ``overlays/prod``) is rendered by the real kustomize
  built into ``kubectl`` (or a ``kustomize`` binary), and every rendered object validates the
  same way, so the patches are checked in their merged form;
- the rendered objects refer to each other consistently (Secrets, ConfigMaps, ServiceAccounts,
  Roles, Service and NetworkPolicy selectors), and every workload has requests, limits, probes
  where they apply, and a non-root security context;
- the GPU node-pool example, the compiled candidate pipeline and ``components/cluster.py`` agree
  on node selector, toleration and GPU request; the images match ``components/images.py``.

What is not checked: admission on a real cluster (PodSecurity, quotas, CRDs of KFP/Argo),
whether the images exist, and any behaviour at run time.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from components import cluster

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
VERSIONS = ("1.29.0", "1.35.0")
OVERLAYS = ("base", "overlays/dev", "overlays/prod")
WORKLOADS = {"Deployment", "StatefulSet", "Job", "CronJob", "DaemonSet"}


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def _kustomizations() -> list[Path]:
    return sorted(MANIFESTS.rglob("kustomization.yaml"))


def _patch_files() -> set[Path]:
    out = set()
    for k in _kustomizations():
        for p in yaml.safe_load(k.read_text()).get("patches", []):
            out.add((k.parent / p["path"]).resolve())
    return out


def _resource_files() -> list[Path]:
    patches = _patch_files()
    return sorted(p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml" and p.resolve() not in patches)


def _validate(doc: dict, version: str) -> None:
    """Strict schema validation; a kind without a schema (a CRD) is an error here, not a skip."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {e.message}") from None


def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _render(overlay: str) -> list[dict]:
    cmd = _kustomize()
    if cmd is None:
        pytest.skip("no kustomize or kubectl binary: overlays not rendered (the files are still validated one by one)")
    p = subprocess.run([*cmd, str(MANIFESTS / overlay)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return _docs(p.stdout)


def _pod_spec(obj: dict) -> dict | None:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] in WORKLOADS:
        return obj["spec"]["template"]["spec"]
    return None


def _pod_labels(obj: dict) -> dict:
    tpl = obj["spec"]["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob" else obj["spec"]["template"]
    return tpl.get("metadata", {}).get("labels", {})


# -- schema validation --------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", _resource_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_every_manifest_file_validates_strictly(path, version):
    docs = _docs(path.read_text())
    assert docs, f"{path} has no objects"
    for doc in docs:
        _validate(doc, version)


def test_strict_validation_catches_a_misspelt_field():
    """The check above can fail: an unknown field (a typo kubectl would reject) does not pass."""
    deployment = _docs((MANIFESTS / "base/mlflow/deployment.yaml").read_text())[0]
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 10
    with pytest.raises(AssertionError, match="periodSecond"):
        _validate(bad, VERSIONS[-1])
    bad = copy.deepcopy(deployment)
    bad["spec"]["replicas"] = "two"
    with pytest.raises(AssertionError, match="replicas"):
        _validate(bad, VERSIONS[-1])


def test_every_resource_file_is_used_by_a_kustomization_or_is_an_example():
    listed = set()
    for k in _kustomizations():
        for r in yaml.safe_load(k.read_text()).get("resources", []):
            target = (k.parent / r).resolve()
            if target.is_file():
                listed.add(target)
    orphans = [p for p in _resource_files() if p.resolve() not in listed and "examples" not in p.parts]
    assert not orphans, f"manifest files no kustomization includes: {orphans}"


# -- rendered overlays ------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    objs = _render(overlay)
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for o in objs:
        _validate(o, VERSIONS[-1])
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") in {"mlflow", "kubeflow"}, o["metadata"]


def _refs(objs: list[dict]):
    """(kind, namespace, name, optional) of every Secret/ConfigMap/ServiceAccount a workload uses."""
    for o in objs:
        spec = _pod_spec(o)
        if spec is None:
            continue
        ns = o["metadata"]["namespace"]
        yield "ServiceAccount", ns, spec.get("serviceAccountName", "default"), False
        for v in spec.get("volumes", []):
            if "secret" in v:
                yield "Secret", ns, v["secret"]["secretName"], v["secret"].get("optional", False)
            if "configMap" in v:
                yield "ConfigMap", ns, v["configMap"]["name"], v["configMap"].get("optional", False)
        for c in spec["containers"]:
            yield from _container_refs(c, ns)


def _container_refs(c: dict, ns: str):
    """The Secrets and ConfigMaps one container's environment reads."""
    for e in c.get("env", []):
        ref = e.get("valueFrom", {})
        if "secretKeyRef" in ref:
            yield "Secret", ns, ref["secretKeyRef"]["name"], ref["secretKeyRef"].get("optional", False)
        if "configMapKeyRef" in ref:
            yield "ConfigMap", ns, ref["configMapKeyRef"]["name"], ref["configMapKeyRef"].get("optional", False)
    for e in c.get("envFrom", []):
        if "configMapRef" in e:
            yield "ConfigMap", ns, e["configMapRef"]["name"], e["configMapRef"].get("optional", False)
        if "secretRef" in e:
            yield "Secret", ns, e["secretRef"]["name"], e["secretRef"].get("optional", False)


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_references_resolve(overlay):
    objs = _render(overlay)
    have = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs}
    missing_secrets = set()
    for kind, ns, name, optional in _refs(objs):
        if kind == "Secret" and overlay == "overlays/prod":
            missing_secrets.add((ns, name))  # prod Secrets are created out of band: they must be documented
            continue
        if kind == "ServiceAccount" and name == "default":
            continue
        assert optional or (kind, ns, name) in have, f"{overlay}: {kind} {ns}/{name} is used but not defined"
    if missing_secrets:
        doc = (ROOT / "docs/deploying.md").read_text()
        undocumented = [
            s
            for s in sorted(missing_secrets)
            if f"{s[0]} {s[1]}" not in doc and f"-n {s[0]} create secret generic {s[1]}" not in doc
        ]
        assert not undocumented, f"Secrets prod needs that docs/deploying.md does not say how to create: {undocumented}"
    for o in objs:
        ns = o["metadata"].get("namespace")
        if o["kind"] == "RoleBinding":
            assert ("Role", ns, o["roleRef"]["name"]) in have
            for s in o["subjects"]:
                assert ("ServiceAccount", s.get("namespace", ns), s["name"]) in have
        if o["kind"] in {"Service", "NetworkPolicy", "PodDisruptionBudget"}:
            sel = (
                o["spec"].get("selector")
                if o["kind"] == "Service"
                else (o["spec"]["podSelector"] if o["kind"] == "NetworkPolicy" else o["spec"]["selector"])
            )
            sel = sel.get("matchLabels", sel) if o["kind"] != "Service" else sel
            if not sel:
                continue  # podSelector {}: every pod of the namespace
            pods = [w for w in objs if _pod_spec(w) is not None and w["metadata"]["namespace"] == ns]
            matched = [w for w in pods if sel.items() <= _pod_labels(w).items()]
            ext = o["kind"] == "NetworkPolicy" and ns == "kubeflow" and sel.get("app") == "ml-pipeline"
            assert matched or ext, f"{o['kind']} {ns}/{o['metadata']['name']} selects no pod: {sel}"


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_workloads_have_resources_probes_and_run_as_non_root(overlay):
    for o in _render(overlay):
        spec = _pod_spec(o)
        if spec is None:
            continue
        name = f"{o['kind']}/{o['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in spec["containers"]:
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"], name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            if o["kind"] in {"Deployment", "StatefulSet"}:  # long-running: probes; batch jobs have none
                assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c), name


# -- what the manifests promise ----------------------------------------------------------------------
def _find(objs, kind, name):
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def test_mlflow_server_uses_postgres_s3_and_basic_auth():
    dev = _render("overlays/dev")
    c = _pod_spec(_find(dev, "Deployment", "mlflow"))["containers"][0]
    assert {
        "server",
        "--serve-artifacts",
        "--app-name=basic-auth",
        "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)",
    } <= set(c["args"])
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-backend", "key": "uri"}
    assert "secretKeyRef" in env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]
    assert _find(dev, "ConfigMap", "mlflow-config")["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    secrets = {o["metadata"]["name"]: o for o in dev if o["kind"] == "Secret"}
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the image ships psycopg2 (images/mlflow-requirements.txt)
    assert secrets["mlflow-backend"]["stringData"]["uri"].startswith("postgresql+psycopg2://")
    ini = secrets["mlflow-auth"]["stringData"]["basic_auth.ini"]
    # nobody reads anything without a grant, so the reference stays the gate's
    # (tests/integration/test_access.py runs this setting)
    assert re.search(r"^default_permission = NO_PERMISSIONS$", ini, re.M) and "postgresql+psycopg2://" in ini
    assert "psycopg2-binary==" in (ROOT / "images/mlflow-requirements.txt").read_text()
    sts = _find(dev, "StatefulSet", "mlflow-postgres")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    prod = _render("overlays/prod")
    assert not [o for o in prod if o["kind"] == "StatefulSet"], "prod uses an external database"
    assert not [o for o in prod if o["kind"] == "Secret"], "no Secret is committed for prod"


def test_cronjob_submits_the_candidate_pipeline():
    cron = _find(_render("base"), "CronJob", "backdoor-gate-candidate")
    c = _pod_spec(cron)["containers"][0]
    assert c["args"][:3] == ["pipelines", "submit", "candidate"]
    params = dict(a.removeprefix("--param=").split("=", 1) for a in c["args"] if a.startswith("--param="))
    from pipelines.facenet import candidate_pipeline

    declared = set(candidate_pipeline.component_spec.inputs)
    assert set(params) <= declared and params["tracking_uri"] == "http://mlflow.mlflow:5000"
    token = next(v for v in _pod_spec(cron)["volumes"] if v["name"] == "kfp-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"


def test_images_match_components_images():
    if os.environ.get("BACKDOOR_GATE_IMAGE_REGISTRY") or os.environ.get("BACKDOOR_GATE_IMAGE_TAG"):
        pytest.skip("image override set in the environment")
    from components import images

    base = _render("base")
    gpu = _docs((MANIFESTS / "examples/gpu-node-pool.yaml").read_text())[0]
    assert _pod_spec(_find(base, "CronJob", "backdoor-gate-candidate"))["containers"][0]["image"] == images.GATE_IMAGE
    assert _pod_spec(gpu)["containers"][0]["image"] == images.TRAINER_IMAGE
    assert (
        _pod_spec(_find(base, "Deployment", "mlflow"))["containers"][0]["image"]
        == f"{images.REGISTRY}/mlflow:{images.TAG}"
    )
    prod = [c["image"] for o in _render("overlays/prod") if _pod_spec(o) for c in _pod_spec(o)["containers"]]
    assert prod and all(i.startswith("registry.example.com/backdoor-gate/") for i in prod), prod


def test_gpu_pool_example_matches_cluster_constants_and_compiled_pipeline(tmp_path):
    job = _docs((MANIFESTS / "examples/gpu-node-pool.yaml").read_text())[0]
    spec = _pod_spec(job)
    key, value = cluster.GPU_NODE_SELECTOR
    assert spec["nodeSelector"] == {key: value}
    assert spec["tolerations"] == [cluster.GPU_TOLERATION]
    assert spec["containers"][0]["resources"]["limits"][cluster.GPU_ACCELERATOR_TYPE] == cluster.GPU_LIMIT

    from pipelines.compile import compile_all

    compile_all(str(tmp_path))
    docs = _docs((tmp_path / "candidate.yaml").read_text())
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpu_tasks = [e for e in executors.values() if "nodeSelector" in e]
    assert gpu_tasks, "the compiled pipeline sends no task to the GPU pool"
    for e in gpu_tasks:
        assert e["nodeSelector"]["labels"] == spec["nodeSelector"]
        assert e["tolerations"] == spec["tolerations"]


def test_cronjob_command_line_submits_with_its_service_account():
    """The CronJob's args and env, run here against the KFP API stand-in (no cluster can run here)."""
    import subprocess
    import sys

    from tests.pipelines.kfp_api_mock import KfpApiMock

    c = _pod_spec(_find(_render("base"), "CronJob", "backdoor-gate-candidate"))["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    with KfpApiMock("SUCCEEDED") as api:
        args = [a.replace("$(KF_PIPELINES_ENDPOINT)", api.url) for a in c["args"]]
        run_env = dict(os.environ, KFP_SERVICE_ACCOUNT=env["KFP_SERVICE_ACCOUNT"])
        run_env.pop("KFP_TOKEN", None)
        p = subprocess.run(
            [sys.executable, "-m", "backdoor_gate.cli", *args], capture_output=True, text=True, env=run_env, timeout=300
        )
        assert p.returncode == 0, p.stderr
        runs = [r for r in api.requests if r["method"] == "POST" and r["path"].startswith("/apis/v2beta1/runs")]
    assert len(runs) == 1
    body = runs[0]["body"]
    assert body["service_account"] == "backdoor-gate-pipeline-runner"
    rbac = _render("base")
    assert _find(rbac, "ServiceAccount", body["service_account"])["metadata"]["namespace"] == "kubeflow"
    assert body["runtime_config"]["parameters"]["fail_on_block"] is True


# -- the CI trigger (.github/workflows/gate.yml) --------------------------------------------------------
def _workflow_commands() -> list[str]:
    wf = yaml.safe_load((ROOT / ".github/workflows/gate.yml").read_text())
    assert "push" in wf[True]  # YAML 1.1 reads the key `on` as True
    steps = wf["jobs"]["candidate"]["steps"]
    return [s["run"] for s in steps if "run" in s]


def test_ci_workflow_installs_locked_versions():
    lock = {
        ln.split("==")[0].lower(): ln.strip()
        for ln in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in ln
    }
    install = next(c for c in _workflow_commands() if "pip install -c requirements.lock" in c)
    pins = re.findall(r"([A-Za-z0-9_.-]+)==([\w.]+)", install)
    assert pins and all(lock.get(n.lower()) == f"{n}=={v}" for n, v in pins), pins


def test_ci_workflow_fails_the_job_when_the_gate_blocks():
    """The workflow's own submit command, run against the KFP API stand-in with a run that FAILED."""
    import shlex
    import subprocess
    import sys

    from backdoor_gate.cli import build_parser
    from tests.pipelines.kfp_api_mock import KfpApiMock

    commands = [c for c in _workflow_commands() if c.lstrip().startswith("backdoor-gate")]
    assert any("pipelines compile" in c for c in commands)
    submit = next(c for c in commands if "pipelines submit" in c)
    env = {"KFP_NAMESPACE": "kubeflow", "MLFLOW_TRACKING_URI": "http://mlflow.mlflow:5000"}
    argv = [os.path.expandvars(a) for a in shlex.split(submit)[1:]]
    for k, v in env.items():
        argv = [a.replace(f"${k}", v) for a in argv]
    args = build_parser().parse_args(argv)  # every flag exists
    assert args.wait and dict(args.param)["fail_on_block"] is True
    with KfpApiMock("FAILED") as api:
        run_env = dict(os.environ, KF_PIPELINES_ENDPOINT=api.url, KFP_TOKEN="ci-token", **env)
        p = subprocess.run(
            [sys.executable, "-m", "backdoor_gate.cli", *argv], capture_output=True, text=True, env=run_env, timeout=300
        )
    assert p.returncode == 1 and "FAILED" in p.stdout, p.stdout + p.stderr
    body = next(r["body"] for r in api.requests if r["method"] == "POST" and r["path"].startswith("/apis/v2beta1/runs"))
    assert body["runtime_config"]["parameters"]["tracking_uri"] == "http://mlflow.mlflow:5000"


def test_webhook_receiver_runs_a_real_command_with_its_secrets():
    from backdoor_gate.cli import build_parser
    from components.cluster import MLFLOW_CREDENTIALS_SECRET, SIGNING_SECRET
    from components.keys import KEY_ENV
    from components.webhook import SECRET_ENV

    objs = _render("overlays/prod")
    (c,) = _find(objs, "Deployment", "backdoor-gate-webhook")["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(c["args"])
    assert (args.command, args.webhook_command, args.models, args.port) == ("webhook", "serve", ["facenet"], 8080)
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert env[SECRET_ENV]["name"] == "backdoor-gate-webhook" and not env[SECRET_ENV].get("optional")
    assert env["MLFLOW_TRACKING_USERNAME"]["name"] == MLFLOW_CREDENTIALS_SECRET
    assert env[KEY_ENV]["name"] == SIGNING_SECRET and env[KEY_ENV]["optional"] is True
    mlflow_env = {
        e["name"]: e.get("value")
        for c in _find(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
        for e in c["env"]
    }
    assert (
        "http" in mlflow_env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"].split(",")
        and mlflow_env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true"
    )
