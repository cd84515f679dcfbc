# MLflow tracking server for manifests/base/mlflow/deployment.yaml: PostgreSQL backend store
# (psycopg2; use postgresql+psycopg2:// URIs), S3 artifacts (boto3), basic auth (Flask-WTF).
# Configured entirely by arguments and environment from the Deployment; no secret is baked in.
# Build context: the repository root; build with images/build.sh (make images); build arguments
# and the pip_cert secret as in images/gate.Dockerfile.
ARG BASE_IMAGE=python:3.11.9-slim-bookworm
FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
WORKDIR /src
COPY requirements.lock images/mlflow-requirements.txt ./
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -c requirements.lock -r mlflow-requirements.txt \
 && rm -rf /opt/venv/bin/pip* /opt/venv/lib/python3.11/site-packages/pip

ARG BASE_IMAGE=python:3.11.9-slim-bookworm
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="backdoor-gate mlflow" \
      org.opencontainers.image.description="MLflow 3.17.2 tracking server with PostgreSQL, S3 and basic-auth support" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/backdoor-gate/backdoor-gate" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 app && useradd --uid 10001 --gid app --create-home app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
USER 10001
WORKDIR /home/app
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["mlflow"]
CMD ["server", "--host=0.0.0.0", "--port=5000"]
