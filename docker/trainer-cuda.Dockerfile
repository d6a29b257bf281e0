# The trainflow CUDA trainer image for GPU nodes: torch==2.13.0 (CUDA build) + trainflow, at the
# versions of constraints.txt, on Python 3.11. Runs one model family's entry point, alone or under
# torchrun (same code path), e.g.
#   docker run --gpus all --ipc=host trainflow-trainer-cuda:0.1.0 \
#       torchrun --standalone --nproc-per-node 8 -m trainflow.trainers.recommendation --manifest-uri s3://... --device cuda
# Multi-node: the same torchrun with --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT per node.
#
# The CUDA libraries (cuDNN, cuBLAS, NCCL, ...) come with the torch wheel from TORCH_INDEX_URL; the
# base image is NVIDIA's CUDA image (CUDA runtime and the NVIDIA container-toolkit settings), and the
# host needs a driver for that CUDA version. Change CUDA_IMAGE and TORCH_INDEX_URL together, to a
# CUDA version PyTorch publishes torch 2.13.0 for (see docs/deployment.md).
#
# Build from the repository root:
#   docker build -f docker/trainer-cuda.Dockerfile -t trainflow-trainer-cuda:0.1.0 .
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
# uv only provides a standalone CPython 3.11 (Ubuntu 24.04 ships 3.12; trainflow needs 3.11).
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE}

# PyTorch wheel index of the CUDA build of torch==2.13.0 (cu130 matches the default CUDA_IMAGE).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG PYTHON_VERSION=3.11

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TRAINFLOW_DATA_DIR=/workspace/data

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY --from=uv /uv /usr/local/bin/uv
RUN uv venv --seed --python "${PYTHON_VERSION}" /opt/venv \
    && python -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version"

WORKDIR /opt/trainflow
COPY constraints.txt ./

# torch==2.13.0 is pinned by constraints.txt; the CUDA build from TORCH_INDEX_URL ("+cuXXX") sorts
# above PyPI's. trainflow is installed by pip from the mounted repository (pyproject.toml names the
# packages); wheels in docker/wheelhouse/ are offered too (offline builds, docs/deployment.md). The
# check fails the build if a CPU-only torch got in.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=.,target=/tmp/trainflow-src,rw \
    pip install \
        --constraint constraints.txt \
        --find-links /tmp/trainflow-src/docker/wheelhouse \
        --extra-index-url "${TORCH_INDEX_URL}" \
        "torch==2.13.0" \
        /tmp/trainflow-src \
    && python -c "import sys, torch; v = torch.__version__; print('torch', v, 'cuda', torch.version.cuda); \
sys.exit(0 if v.split('+')[0] == '2.13.0' and torch.version.cuda else 'expected the CUDA build of torch 2.13.0, got ' + v)" \
    && python -c "import trainflow.trainers.recommendation.family, trainflow.trainers.driving.family"

# Ubuntu 24.04 images already have uid 1000 (ubuntu).
RUN useradd --create-home --uid 10001 trainer \
    && mkdir -p /workspace/data \
    && chown -R trainer /workspace
USER trainer
WORKDIR /workspace

# torchrun's c10d rendezvous / master port.
EXPOSE 29500
CMD ["python", "-m", "trainflow.trainers.recommendation", "--help"]
