# syntax=docker/dockerfile:1
# GPU image of the radiodiff-vae HTTP server (`python -m server`); see docs/deploy.md.
#
# CUDA 13.0: torch 2.13.0's Linux wheel on PyPI and onnxruntime-gpu 1.31 (which needs Python
# >= 3.11) are both CUDA 13 builds, so the host needs an NVIDIA driver of the 580 series or
# newer and the NVIDIA Container Toolkit. Ubuntu 24.04 gives Python 3.12 from its own archive.
#
#   docker build -t radiodiff-vae .                                  # model mounted at run time
#   docker run --gpus all -p 8000:8000 -v "$PWD/export:/models:ro" radiodiff-vae
#   docker build --build-arg MODEL_DIR=deploy/model -t radiodiff-vae:baked .   # model baked in
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG PYTHON_VERSION=3.12.3-1ubuntu0.*

# ---- builder: a venv with torch, onnxruntime-gpu and the project; pip and sources stay here
FROM ${CUDA_IMAGE} AS builder
ARG PYTHON_VERSION
ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        "python3.12=${PYTHON_VERSION}" "python3.12-venv=${PYTHON_VERSION}" \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
# torch first, in its own layer: it is most of the image and changes least often.
RUN /opt/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY runtime/ runtime/
COPY train/ train/
COPY export/ export/
COPY server/ server/
COPY configs/ configs/
RUN /opt/venv/bin/pip install --no-cache-dir ".[gpu]"

# ---- runtime: CUDA runtime + cuDNN, Python, the venv; non-root
FROM ${CUDA_IMAGE} AS runtime
ARG PYTHON_VERSION
ARG TINI_VERSION=0.19.0-*
ARG MODEL_DIR=deploy/model
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        "python3.12=${PYTHON_VERSION}" "tini=${TINI_VERSION}" \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/radiodiff radiodiff
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY deploy/healthcheck.py /app/healthcheck.py
# The default MODEL_DIR holds only a README: mount the model at /models, or build with
# --build-arg MODEL_DIR=<an export directory inside the build context> to bake it in.
COPY ${MODEL_DIR} /models
# Every server option is an environment variable (RADIODIFF_<OPTION>); see `python -m server -h`.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RADIODIFF_MODEL=/models \
    RADIODIFF_DEVICE=cuda \
    RADIODIFF_HOST=0.0.0.0 \
    RADIODIFF_PORT=8000
USER 10001:10001
EXPOSE 8000
# The server drains in-flight requests on SIGTERM (what `docker stop` sends) and ends its
# worker processes; tini forwards the signal and reaps what is left.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]
ENTRYPOINT ["tini", "--", "python", "-m", "server"]
