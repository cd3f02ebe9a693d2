# The radiodiff-vae HTTP server (`python -m server`), a CPU and a GPU image from this one file;
# see docs/deploy.md. Needs BuildKit (the default builder since Docker 23; DOCKER_BUILDKIT=1 on
# Docker 20.10): only the stages of the chosen VARIANT are built.
#
#   docker build -t radiodiff-vae:cpu .                              # CPU: python:3.11-slim
#   docker build --build-arg VARIANT=gpu -t radiodiff-vae:gpu .      # GPU: the CUDA 13 runtime
#   docker run -p 8000:8000 -v radiodiff-cache:/var/cache/radiodiff-vae radiodiff-vae:cpu
#
# The image serves the bundled `reference` model. Another model: mount it and set
# RADIODIFF_MODEL=/models, or bake it in with --build-arg MODEL_DIR=<folder in the build
# context> --build-arg MODEL=/models. Where no image registry is reachable, build on local
# stand-ins of the base images: scripts/docker-build.sh.
ARG VARIANT=cpu
ARG CPU_BASE=python:3.11-slim-bookworm
# CUDA 13.0: torch 2.13.0's Linux wheel on PyPI and onnxruntime-gpu 1.31 are CUDA 13 builds, so
# the host needs an NVIDIA driver of the 580 series or newer and the NVIDIA Container Toolkit.
ARG GPU_BASE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- the Python each variant runs on
FROM ${CPU_BASE} AS python-cpu
ENV RADIODIFF_DEVICE=cpu

FROM ${GPU_BASE} AS python-gpu
# Ubuntu 24.04 gives Python 3.12 (onnxruntime-gpu 1.31 needs >= 3.11); a base that already
# has a python3 keeps it.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends \
            "python3.12=3.12.3-1ubuntu0.*" "python3.12-venv=3.12.3-1ubuntu0.*" \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
        && ln -s /usr/bin/python3.12 /usr/local/bin/python3; \
    fi
# What the NVIDIA Container Toolkit reads (the CUDA base sets them too; a stand-in may not).
ENV RADIODIFF_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---- common to both: tini as PID 1, the unprivileged user, the decision cache's mount point
# hadolint ignore=DL3006
FROM python-${VARIANT} AS base
ARG TINI_VERSION=0.19.0-*
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends "tini=${TINI_VERSION}" \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/radiodiff radiodiff \
    && install -d -o 10001 -g 10001 /var/cache/radiodiff-vae

# ---- builder: a venv with torch, onnxruntime and the project; pip and sources stay here
FROM base AS builder
ARG VARIANT
ARG TORCH_VERSION=2.13.0
# The CPU image takes torch's CPU build (about 0.2 GB, where PyPI's Linux wheel is the CUDA
# build and brings 2.5 GB of nvidia packages) from PyTorch's CPU index, or, where that index is
# out of reach, from a wheel put in deploy/wheels/ (scripts/docker-build.sh does both).
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# A network that re-signs TLS (a proxy with its own CA): pass the CA bundle pip trusts as the
# build secret `pip_cert` (scripts/docker-build.sh does); it is never stored in the image.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_FIND_LINKS=/wheels
RUN python3 -m venv /opt/venv \
    && if [ "$VARIANT" = cpu ] && [ -n "$TORCH_CPU_INDEX" ]; then \
        printf '[global]\nextra-index-url = %s\n' "$TORCH_CPU_INDEX" >/opt/venv/pip.conf; \
    fi
# torch first, in its own layer: it is most of the image and changes least often. The build
# stops if it got the wrong flavour (a CUDA torch in the CPU image, or the reverse).
RUN --mount=type=bind,source=deploy/wheels,target=/wheels --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && /opt/venv/bin/python -c "import sys, torch; cuda = torch.version.cuda; \
print('torch', torch.__version__, 'CUDA', cuda); \
sys.exit(None if bool(cuda) == (sys.argv[1] == 'gpu') else \
f'torch {torch.__version__} is the wrong build for the {sys.argv[1]} image: the CPU image needs \
the CPU build (reachable TORCH_CPU_INDEX, or its wheel in deploy/wheels/), the GPU image the CUDA one')" \
        "$VARIANT"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY runtime/ runtime/
COPY radiomaps/ radiomaps/
COPY train/ train/
COPY export/ export/
COPY server/ server/
COPY configs/ configs/
RUN --mount=type=bind,source=deploy/wheels,target=/wheels --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/venv/bin/pip install --no-cache-dir ".[${VARIANT}]" \
    && /opt/venv/bin/pip check
# Out of the image: what serving never loads. torch's C++ headers (extensions and inductor's
# CPU code generation, which would need a compiler the image does not have either), its C++
# test programs and protoc, and the packages' test suites: about 0.35 GB.
RUN site=$(echo /opt/venv/lib/python3*/site-packages) \
    && rm -rf "$site/torch/include" "$site/torch/test" "$site/onnx/backend/test" \
    && find "$site/torch/bin" -type f ! -name torch_shm_manager -delete \
    && find "$site" -type d -name tests -prune -exec rm -rf {} +

# ---- runtime: the base, the venv; non-root
FROM base AS runtime
ARG MODEL_DIR=deploy/model
ARG MODEL=reference
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY deploy/healthcheck.py /app/healthcheck.py
# The default MODEL_DIR holds only a README; the bundled `reference` model is in the venv.
COPY ${MODEL_DIR} /models
# Every server option is an environment variable (RADIODIFF_<OPTION>); see `python -m server -h`.
# RADIODIFF_CACHE_DIR holds the measured inference-path decision: mount a volume there so that
# a new or restarted container reads it instead of measuring again (docs/deploy.md).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RADIODIFF_MODEL=${MODEL} \
    RADIODIFF_HOST=0.0.0.0 \
    RADIODIFF_PORT=8000 \
    RADIODIFF_CACHE_DIR=/var/cache/radiodiff-vae
USER 10001:10001
EXPOSE 8000
# The server drains in-flight requests on SIGTERM (what `docker stop` sends) and ends its
# worker processes; tini, PID 1, forwards the signal and reaps what is left.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]
ENTRYPOINT ["tini", "--", "python", "-m", "server"]
