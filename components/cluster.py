"""Where the tasks run on Kubernetes: one source of truth for the compiled pipelines and the manifests.

Training tasks (feature extraction, fine-tuning) go to the GPU node pool; the gate and the
reference fit run on CPU. ``manifests/`` uses the same labels and taints.
"""

from __future__ import annotations

#: Extended resource requested by GPU tasks, and how many.
GPU_ACCELERATOR_TYPE = "nvidia.com/gpu"
GPU_LIMIT = 1
#: Label of the GPU node pool (GKE's accelerator label; any labelled pool works).
GPU_NODE_SELECTOR = ("cloud.google.com/gke-accelerator", "nvidia-tesla-t4")
#: The taint GPU pools carry so that only GPU work lands there.
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

#: Fine-tunes running at once (a compile-time constant in KFP: at most this many GPUs busy).
TRAIN_PARALLELISM = 4

TRAIN_CPU, TRAIN_MEMORY = "4", "16G"
GATE_CPU, GATE_MEMORY = "1", "2G"

#: The gate's Ed25519 signing key (detector.signing) and the public key of the references it trusts,
#: from a Secret. Signatures are required: without them the gate refuses to judge (exit 2, a gate
#: error); the Secret is optional to Kubernetes only so that the task starts and says so.
SIGNING_SECRET = "backdoor-gate-signing-key"
SIGNING_SECRET_ENV = {
    "signing-key.pem": "BACKDOOR_GATE_SIGNING_KEY",
    "reference-verify-key.pem": "BACKDOOR_GATE_REFERENCE_PUBLIC_KEYS",
}
#: The reference pipeline's signing key: publish_reference signs the artifact with it.
REFERENCE_SIGNING_SECRET = "backdoor-gate-reference-key"
REFERENCE_SIGNING_SECRET_ENV = {"signing-key.pem": "BACKDOOR_GATE_REFERENCE_SIGNING_KEY"}

#: The gate identity's MLflow credentials (basic auth on, see manifests/): every task that talks to
#: the registry gets them as the env vars MLflow's client reads. Optional: servers without auth.
MLFLOW_CREDENTIALS_SECRET = "mlflow-gate-credentials"
MLFLOW_CREDENTIALS_ENV = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}
#: The reference publisher's MLflow credentials (same keys), for publish_reference only: the gate
#: identity may read the reference but not write it, and registrants may not read it (components/access.py).
MLFLOW_PUBLISHER_SECRET = "mlflow-reference-credentials"
