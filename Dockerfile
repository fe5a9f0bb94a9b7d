# syntax=docker/dockerfile:1
# genserve GPU server image: `docker build -t genserve:0.1.0 .` (see docs/deploy.md).
#
# CUDA version: CUDA 13, not 12. The onnxruntime-gpu 1.31.1 wheel pinned in
# requirements/constraints.txt is built against CUDA 13.0 and cuDNN 9: its
# onnxruntime/capi/build_and_package_info.py says cuda_version = '13.0', its CUDA provider links
# libcudart.so.13, libcublas.so.13, libcublasLt.so.13 and libcurand.so.10, its TensorRT provider
# libcudnn.so.9, and its `cuda`/`cudnn` extras ask for nvidia-cuda-runtime~=13.0 and
# nvidia-cudnn-cu13 (checked by tests/ecosystem/test_dockerfile.py against the installed wheel).
# ONNX Runtime's install page still says "CUDA 12.x is the default since 1.19"; the wheel wins.
# So the runtime stage is NVIDIA's CUDA 13.0 runtime image with cuDNN 9 (needs an NVIDIA
# driver >= 580 on the node). TensorRT is not in the image: the TensorRT provider fails to load
# and ONNX Runtime falls back to the CUDA provider, which the server reports per model.
#
# Python: Ubuntu 24.04's python3.12 in both stages (the venv built in `build` is copied whole,
# so both stages must have the same interpreter at the same path). The tests here run 3.11; the
# same pins resolve to cp312 wheels (checked with `pip install --dry-run --python-version 3.12`).
#
# No torch anywhere: the server needs only requirements/server.txt (onnxruntime-gpu, grpcio, ...).

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- build: a virtual environment with the server, its API stubs and their pinned dependencies.
FROM ubuntu:24.04 AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# DL3008: Ubuntu's archive drops superseded versions, so a pinned apt version breaks the build at
# the next security update; the distribution release (24.04) is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/genserve/venv
ENV PATH=/opt/genserve/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from the one list the Makefile and the tests use, pinned by the one
# constraints file: this layer is rebuilt only when those two files change.
COPY requirements/constraints.txt requirements/server.txt requirements/
RUN pip install -c requirements/constraints.txt -r requirements/server.txt
COPY api/ api/
COPY server/ server/
# genserve-client too, so that the same image runs the server and batch jobs against it (the Indexed
# Job of deploy/k8s/bulk/): pure Python, and every dependency of it (grpcio, protobuf, numpy,
# pillow) is one of the server's already (tests/ecosystem/test_dockerfile.py checks it).
COPY clients/ clients/
# Non-editable installs of our three packages; every dependency is already there (pip check).
RUN pip install -c requirements/constraints.txt ./api ./server ./clients \
    && pip check \
    && python -c "import genserve_server, genserve.v1.genserve_pb2, genserve.kserve.grpc_service_pb2" \
    && genserve-client --help >/dev/null \
    && if pip show torch >/dev/null 2>&1; then echo "torch must not be in the image" >&2; exit 1; fi

# ---- runtime: CUDA 13 + cuDNN 9 libraries, the venv, the default models, a non-root user.
FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 genserve \
    && useradd --system --uid 10001 --gid genserve --home-dir /opt/genserve --shell /usr/sbin/nologin genserve
COPY --from=build /opt/genserve/venv /opt/genserve/venv
COPY --chown=10001:10001 models/ /opt/genserve/models/
ENV PATH=/opt/genserve/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/genserve
USER 10001:10001
# 50051: gRPC (genserve.v1, inference.GRPCInferenceService, grpc.health.v1, reflection).
# 50052: Prometheus /metrics and HTTP /healthz.
EXPOSE 50051 50052
# grpc.health.v1 Check of the whole server (""): the probe module alone imports grpc and its health
# stubs, not onnxruntime, numpy or cv2 as `genserve-server health` would (0.7 CPU-s, ~100 MB each 15 s).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "genserve_server.probe", "--host", "127.0.0.1", "--port", "50051", "--timeout-s", "3"]
ENTRYPOINT ["genserve-server"]
# Both ports listen on all interfaces, IPv4 and IPv6 (gRPC's 0.0.0.0 covers both; /metrics needs
# `::`): the container's network namespace is the boundary. Where the kernel has IPv6 off, run
# with `--metrics-host 0.0.0.0` (the server stops naming the flag otherwise).
CMD ["serve", "--models", "/opt/genserve/models", "--host", "0.0.0.0", "--port", "50051", \
     "--metrics-host", "::", "--metrics-port", "50052"]
