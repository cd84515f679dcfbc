# syntax=docker/dockerfile:1
# Gate image: CPU only, no CUDA, no torchvision/facenet-pytorch. The gate never builds the
# network: it reads tensors (safetensors / torch.load(weights_only=True)) and scores them.
# TORCH_INDEX_URL: an index serving the CPU-only torch 2.14.1 wheel (the +cpu build is fine here:
# the gate never imports torchvision). Unverified on this project's machines (no image engine).
FROM python:3.11.9-slim-bookworm AS build
ARG TORCH_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY images/gate-requirements.txt pyproject.toml README.md ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-deps --index-url "${TORCH_INDEX_URL}" torch==2.14.1+cpu \
 && /opt/venv/bin/pip install -r gate-requirements.txt
COPY detector ./detector
COPY components ./components
COPY pipelines ./pipelines
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation .

FROM python:3.11.9-slim-bookworm
LABEL org.opencontainers.image.title="backdoor-gate gate" \
      org.opencontainers.image.source="https://github.com/backdoor-gate/backdoor-gate" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 app && useradd --uid 10001 --gid app --create-home app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true
USER 10001
WORKDIR /home/app
HEALTHCHECK NONE
ENTRYPOINT ["backdoor-gate"]
