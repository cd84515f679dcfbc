# Gate image: no torchvision/facenet-pytorch. The gate never builds the network: it reads tensors
# (safetensors / torch.load(weights_only=True)) and scores them; fitting the reference needs torch
# (detector/em.py). Also runs the webhook receiver and `backdoor-gate pipelines submit`.
# Build context: the repository root; build with images/build.sh (make images), which passes:
#   BASE_IMAGE       python:3.11.9-slim-bookworm, or the debootstrap base (make base-image)
#   TORCH_VERSION    the torch release (the lock's), e.g. 2.14.1 or 2.14.1+cpu from a CPU index
#   TORCH_INDEX_URL  an extra index serving that torch build (empty: the package index's wheel)
#   PIP_INDEX_URL    the package index the host's pip uses (empty: pip's default)
#   secret pip_cert  the CA bundle pip needs to reach the index; mounted for the RUN, never a layer
# Only the final stage ships; build arguments of the build stage are not in its history.
ARG BASE_IMAGE=python:3.11.9-slim-bookworm
FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.14.1
ARG TORCH_INDEX_URL=""
ARG PIP_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
WORKDIR /src
# only the pins come before the dependency install: a code or README change keeps that layer
COPY requirements.lock images/gate-requirements.txt ./
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
      -c requirements.lock "torch==${TORCH_VERSION}" -r gate-requirements.txt
COPY pyproject.toml README.md ./
COPY detector ./detector
COPY components ./components
COPY pipelines ./pipelines
COPY lab ./lab
COPY backdoor_gate ./backdoor_gate
# triton only serves torch.compile on GPUs, which the gate never uses: out of the CPU image.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
 && /opt/venv/bin/pip uninstall -y triton \
 && rm -rf /opt/venv/bin/pip* /opt/venv/lib/python3.11/site-packages/pip

ARG BASE_IMAGE=python:3.11.9-slim-bookworm
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="backdoor-gate gate" \
      org.opencontainers.image.description="Promotion gate, webhook receiver and pipeline submitter for backdoored FaceNet models" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/backdoor-gate/backdoor-gate" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 app && useradd --uid 10001 --gid app --create-home app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 \
    MLFLOW_DISABLE_TELEMETRY=true
USER 10001
WORKDIR /home/app
# Batch jobs (KFP task, CronJob) need no health check; the webhook Deployment probes /healthz itself.
HEALTHCHECK NONE
ENTRYPOINT ["backdoor-gate"]
