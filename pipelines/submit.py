"""Submit a pipeline to a Kubeflow Pipelines API server (CI, CronJobs, people).

The bearer token comes from an environment variable (never a flag, never logged); inside a
cluster without a token, kfp.Client uses the pod's service-account credentials. The runs' pods
use the Kubernetes service account named by ``KFP_SERVICE_ACCOUNT`` when it is set
(``backdoor-gate-pipeline-runner`` in manifests/), else the KFP installation's default.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_SUCCEEDED = "SUCCEEDED"


def submit(
    pipeline: str,
    *,
    host: str | None,
    namespace: str,
    experiment: str,
    params: dict,
    token: str | None = None,
    cron: str | None = None,
    wait: bool = False,
    timeout: int = 6 * 3600,
    client=None,
) -> int:
    """Compile ``pipeline``, then create a run (or a recurring run with ``cron``). Returns an exit code."""
    import kfp

    from pipelines.compile import compile_all

    if not host and client is None:
        print("backdoor-gate: no KFP host: pass --host or set KF_PIPELINES_ENDPOINT", file=sys.stderr)
        return 2
    client = client or kfp.Client(host=host, namespace=namespace, existing_token=token)
    account = {"service_account": sa} if (sa := os.environ.get("KFP_SERVICE_ACCOUNT")) else {}
    with tempfile.TemporaryDirectory() as tmp:
        package = str(Path(tmp) / f"{pipeline}.yaml")
        compile_all(tmp)
        if cron:
            exp = _experiment(client, experiment, namespace)
            job = client.create_recurring_run(
                experiment_id=exp,
                job_name=f"{pipeline}-scheduled",
                cron_expression=cron,
                params=params,
                pipeline_package_path=package,
                max_concurrency=1,
                no_catchup=True,
                **account,
            )
            print(f"recurring run {job.recurring_run_id} created: {pipeline} on '{cron}'")
            return 0
        run = client.create_run_from_pipeline_package(
            package,
            arguments=params,
            experiment_name=experiment,
            namespace=namespace,
            run_name=f"{pipeline}-{Path(tmp).name}",
            **account,
        )
    print(f"run {run.run_id} submitted ({pipeline})")
    if not wait:
        return 0
    done = client.wait_for_run_completion(run.run_id, timeout=timeout)
    state = str(getattr(done, "state", "UNKNOWN"))
    print(f"run {run.run_id} finished: {state}")
    return 0 if state == _SUCCEEDED else 1


def _experiment(client, name: str, namespace: str) -> str:
    try:
        return client.get_experiment(experiment_name=name, namespace=namespace).experiment_id
    except Exception:
        return client.create_experiment(name, namespace=namespace).experiment_id
