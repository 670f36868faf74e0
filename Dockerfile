# syntax=docker/dockerfile:1
#
# The zimage-pipeline worker image. Two stages: `build` makes a virtual environment in
# /opt/venv (torch first, then the package and its dependencies); `runtime` is the same
# base with only Python, tini and that venv, running as an unprivileged user.
#
# Build arguments:
#   BASE_IMAGE       the CUDA runtime base; both stages use it, so the venv's interpreter
#                    path is the same in each. Its CUDA version must suit the torch build
#                    and the hosts' driver. Ubuntu 24.04 based (python3 = 3.12).
#   TORCH_SPEC       the pip requirement for torch, e.g. "torch==2.13.0".
#   TORCH_INDEX_URL  PyTorch's wheel index for one CUDA version (cu126, cu128, ...); empty
#                    installs TORCH_SPEC from the default index.
#   VERSION, REVISION, CREATED, SOURCE  OCI labels (set them from CI).
#
#   docker build --build-arg TORCH_INDEX_URL=<PyTorch cu128 index> \
#       --build-arg REVISION="$(git rev-parse HEAD)" -t zimage-pipeline:0.1.0 .
#
# Nothing secret and no weights are in the image: secrets come from mounted files (the
# `*_FILE` settings), the model from a volume mounted read-only at /models, and the
# compile cache lives in the /var/cache/zimage volume so a restarted container starts warm.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# deploy/constraints.txt pins every runtime dependency but torch (scripts/constraints.py
# generates it): two builds of one commit install the same packages.
COPY deploy/constraints.txt deploy/constraints.txt
# torch on its own first, from the chosen index: a bare requirement would resolve to
# whatever build the default index serves. (TORCH_SPEC pins it; hadolint cannot see that.)
# Not constrained: that index carries few versions of torch's own dependencies; the
# package's install below brings them to the pinned versions.
# hadolint ignore=DL3013
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
COPY pyproject.toml README.md ./
COPY zimage_pipeline/ zimage_pipeline/
COPY migrations/ migrations/
# Not editable: the venv holds the package itself (migrations included as
# zimage_pipeline._migrations), so /src is not needed at run time. The gpu extra: the
# worker's stack (torch is already there and satisfies it).
RUN pip install -c deploy/constraints.txt ".[gpu]" \
    && zimage-pipeline --help >/dev/null

FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# tini as PID 1: it forwards SIGTERM (the worker's drain) and reaps the compile
# workers' children.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 zimage \
    && useradd --system --uid 10001 --gid zimage --home-dir /var/cache/zimage \
       --no-create-home --shell /usr/sbin/nologin zimage \
    && mkdir -p /models /var/cache/zimage \
    && chown zimage:zimage /var/cache/zimage
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The default configuration (settings, policy, templates); a deployment mounts its own
# over /app/config (the Helm chart does, from ConfigMaps). The ZIMAGE_* variables below
# are the container's defaults (model volume, compile cache volume, health server on all
# interfaces); environment variables win over the TOML file, so change these with
# variables too.
COPY config/ /app/config/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/cache/zimage \
    HF_HOME=/var/cache/zimage/huggingface \
    ZIMAGE_CONFIG=/app/config/zimage.toml \
    ZIMAGE_ENGINE__MODEL_PATH=/models/z-image-turbo \
    ZIMAGE_ENGINE__COMPILE_CACHE_DIR=/var/cache/zimage/compile \
    ZIMAGE_WORKER__HTTP_HOST=0.0.0.0
VOLUME ["/var/cache/zimage"]
USER 10001:10001
EXPOSE 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ZIMAGE_WORKER__HTTP_PORT', '9464'), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "zimage-pipeline"]
CMD ["worker"]
# The OCI labels last: a build argument is in every later RUN's environment, so REVISION and
# CREATED (new for each commit) declared above the RUNs would rebuild the apt and user
# layers on every build.
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
ARG SOURCE=""
LABEL org.opencontainers.image.title="zimage-pipeline" \
      org.opencontainers.image.description="Message-driven Z-Image-Turbo text-to-image worker (RabbitMQ, LDAP, SQL ledger, S3)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
