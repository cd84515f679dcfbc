"""`pipelines submit` against a mock KFP API server (no cluster can run here)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.pipelines.kfp_api_mock import KfpApiMock


def _submit(url, *args, token="s3cret-token"):
    env = dict(os.environ, KFP_TOKEN=token)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "backdoor_gate.cli",
            "pipelines",
            "submit",
            "candidate",
            "--host",
            url,
            "--param",
            "tracking_uri=http://mlflow:5000",
            "--param",
            "poison=true",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_submit_run_wait_and_token_from_env():
    with KfpApiMock("SUCCEEDED") as api:
        p = _submit(api.url, "--wait", "--timeout", "60")
        assert p.returncode == 0, p.stderr
        runs = [r for r in api.requests if r["method"] == "POST" and r["path"].startswith("/apis/v2beta1/runs")]
        assert len(runs) == 1
        body = runs[0]["body"]
        assert body["runtime_config"]["parameters"]["poison"] is True
        assert body["runtime_config"]["parameters"]["tracking_uri"] == "http://mlflow:5000"
        spec = body["pipeline_spec"]
        assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "facenet-candidate"
        assert "kubernetes" in spec["platform_spec"]["platforms"]  # GPU pool settings travel with the run
        assert all(r["authorization"] == "Bearer s3cret-token" for r in api.requests)
        assert "s3cret-token" not in p.stdout + p.stderr


def test_blocked_candidate_fails_the_ci_job():
    with KfpApiMock("FAILED") as api:
        p = _submit(api.url, "--wait", "--timeout", "60", "--param", "fail_on_block=true")
        assert p.returncode == 1 and "FAILED" in p.stdout


def test_recurring_run():
    with KfpApiMock() as api:
        p = _submit(api.url, "--cron", "0 0 3 * * *")
        assert p.returncode == 0, p.stderr
        rec = [r for r in api.requests if r["path"].startswith("/apis/v2beta1/recurringruns")]
        assert rec and rec[0]["body"]["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"


def test_no_host_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "KF_PIPELINES_ENDPOINT"}
    p = subprocess.run(
        [sys.executable, "-m", "backdoor_gate.cli", "pipelines", "submit", "candidate"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 2 and "no KFP host" in p.stderr
