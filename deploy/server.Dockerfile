# syntax=docker/dockerfile:1
# The inference server, two targets:
#   gpu (default): NVIDIA's TensorRT image (TensorRT 10.7, CUDA 12.6) + cuda-python + NVML bindings,
#                  serving TensorRT engines built by the export service for the GPU it runs on.
#   cpu:           slim Python, ONNX Runtime's CPU provider and OpenVINO (the project's default).
# Build from the repository root:  docker build -f deploy/server.Dockerfile --target gpu .
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:24.12-py3
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/cnnserve
COPY pyproject.toml README.md ./
# The serving half only: the shared core, the protocol and the server (no models/, export/, torch);
# tests/test_serving_without_torch.py serves from exactly these packages in a venv with only these deps.
COPY cnncore ./cnncore
COPY protos ./protos
COPY server ./server
RUN pip install --no-cache-dir "./[cpu]" \
    && useradd --system --uid 10001 --home-dir /opt/cnnserve cnnserve
COPY --chmod=755 deploy/scripts/grpc_health.py /usr/local/bin/grpc-health
USER 10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
  CMD ["grpc-health", "--port", "8001"]
ENTRYPOINT ["python", "-m", "server"]
CMD ["--model-repository", "/models", "--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002"]

FROM ${TENSORRT_IMAGE} AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/cnnserve
# A venv that still sees the base image's TensorRT Python bindings.
RUN python3 -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
# The serving half only: the shared core, the protocol and the server (no models/, export/, torch);
# tests/test_serving_without_torch.py serves from exactly these packages in a venv with only these deps.
COPY cnncore ./cnncore
COPY protos ./protos
COPY server ./server
# `gpu` brings onnxruntime-gpu (CUDA and TensorRT providers) and no CPU onnxruntime beside it.
RUN pip install --no-cache-dir "./[gpu]" cuda-bindings==12.9.4 nvidia-ml-py==12.570.172 \
    && useradd --system --uid 10001 --home-dir /opt/cnnserve cnnserve
COPY --chmod=755 deploy/scripts/grpc_health.py /usr/local/bin/grpc-health
USER 10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=5 \
  CMD ["grpc-health", "--port", "8001"]
ENTRYPOINT ["python", "-m", "server"]
CMD ["--model-repository", "/models", "--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002"]
