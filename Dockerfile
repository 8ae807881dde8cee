# syntax=docker/dockerfile:1
# The lmserve daemon's image: lmserve:0.1.0, as deploy/kubernetes/deployment.yaml runs it.
#
#   docker build -t lmserve:0.1.0 .                       # CUDA 12.8 base, CUDA torch
#   docker build -t lmserve:0.1.0-cpu \
#       --build-arg BASE_IMAGE=ubuntu:24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   docker run --gpus all -p 50051:50051 -v hf-cache:/cache/huggingface lmserve:0.1.0
#
# Any Debian or Ubuntu base works (Python 3.10 or newer comes from its packages). The torch
# wheel comes from TORCH_INDEX_URL, pinned to the version pyproject.toml's [server] extra
# pins, before the package itself, so pip never swaps in another build of torch; everything
# else at the versions requirements.lock names (CI's), as constraints: the image installs
# only what the server extra needs of them.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/lmserve/.venv
ENV PATH=/opt/lmserve/.venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
WORKDIR /src
# Only what the wheel is built from (see .dockerignore): a code change rebuilds from here,
# the torch layer above stays cached.
COPY pyproject.toml README.md requirements.lock ./
COPY client/ client/
COPY server/ server/
RUN pip install -c requirements.lock '.[server]'

FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric user, so Kubernetes can check runAsNonRoot and the Deployment's
# runAsUser/runAsGroup name the same one.
RUN groupadd --gid 10001 lmserve \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin lmserve \
    && install -d -o 10001 -g 10001 /cache/huggingface
COPY --from=build /opt/lmserve/.venv /opt/lmserve/.venv
# The root filesystem may be read-only (the Deployment mounts it so): no bytecode files,
# caches under /tmp, the Hugging Face cache on its own volume.
ENV PATH=/opt/lmserve/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/cache/huggingface \
    LMSERVE_HOST=0.0.0.0 \
    LMSERVE_PORT=50051
USER 10001:10001
WORKDIR /tmp
# gRPC, and Prometheus /metrics when LMSERVE_METRICS_PORT=9400 is set.
EXPOSE 50051 9400
VOLUME ["/cache/huggingface"]
# SERVING only once the model is loaded and warm, so give a large model time to load (as
# the Deployment's startupProbe does); exit 1 for anything else, as Docker expects.
HEALTHCHECK --interval=15s --timeout=10s --start-period=300s --retries=3 \
    CMD lmserve-client health --target "127.0.0.1:${LMSERVE_PORT}" --timeout 5 || exit 1
ENTRYPOINT ["lmserve"]
CMD ["serve"]
