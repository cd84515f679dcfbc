# syntax=docker/dockerfile:1
# Gate image: CPU only, no CUDA, no torchvision/facenet-pytorch. The gate never builds the
# network: it reads tensors (safetensors / torch.load(weights_only=True)) and scores them.
# Also runs `backdoor-gate pipelines submit` (manifests/base/pipelines/cronjob.yaml).
# TORCH_INDEX_URL: an index serving the CPU-only torch 2.14.1 wheel (the +cpu build is fine here:
# the gate never imports torchvision). Build context: the repository root (make images).
FROM python:3.11.9-slim-bookworm AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock images/gate-requirements.txt pyproject.toml README.md ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" -c requirements.lock \
      "torch==2.14.1+cpu" -r gate-requirements.txt
COPY detector ./detector
COPY components ./components
COPY pipelines ./pipelines
COPY lab ./lab
COPY backdoor_gate ./backdoor_gate
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation .

FROM python:3.11.9-slim-bookworm
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="backdoor-gate gate" \
      org.opencontainers.image.description="CPU-only promotion gate and pipeline submitter for backdoored FaceNet models" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/backdoor-gate/backdoor-gate" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 app && useradd --uid 10001 --gid app --create-home app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true
USER 10001
WORKDIR /home/app
# A batch job (KFP task, CronJob), not a server: nothing to health-check.
HEALTHCHECK NONE
ENTRYPOINT ["backdoor-gate"]
