# syntax=docker/dockerfile:1
# One-shot export job (deploy/scripts/export-entrypoint.sh): registry models -> ONNX repository, then,
# in the gpu target, TensorRT engines for the GPU the container finds, cached in the repository volume
# by compute capability and TensorRT version (engines.json): later starts on the same GPU build nothing.
#   gpu (default): NVIDIA's TensorRT image (TensorRT 10.7, CUDA 12.6) + torch CPU wheel + cuda-python
#   cpu:           slim Python + torch CPU wheel, ONNX only (EXPORT_TENSORRT=0)
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:24.12-py3
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 EXPORT_TENSORRT=0
WORKDIR /opt/cnnserve
COPY pyproject.toml README.md ./
COPY models ./models
COPY cnncore ./cnncore
COPY protos ./protos
COPY server ./server
COPY export ./export
COPY client ./client
# torch from the CPU wheel index: export needs no CUDA build of torch (and that one is multi-GB).
# ".[export]" is this project: its dependency pins live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir ".[export]"
COPY --chmod=755 deploy/scripts/export-entrypoint.sh /usr/local/bin/export-entrypoint.sh
ENTRYPOINT ["/usr/local/bin/export-entrypoint.sh"]

FROM ${TENSORRT_IMAGE} AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 EXPORT_TENSORRT=1
WORKDIR /opt/cnnserve
# A venv that still sees the base image's TensorRT Python bindings.
RUN python3 -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY models ./models
COPY cnncore ./cnncore
COPY protos ./protos
COPY server ./server
COPY export ./export
COPY client ./client
# hadolint ignore=DL3013
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir ".[export]" cuda-bindings==12.9.4 nvidia-ml-py==12.570.172
COPY --chmod=755 deploy/scripts/export-entrypoint.sh /usr/local/bin/export-entrypoint.sh
ENTRYPOINT ["/usr/local/bin/export-entrypoint.sh"]
