# The trainflow Airflow image: Apache Airflow 3.3.2 (Python 3.11) + trainflow (DAGs, tasks, trainers,
# the plugin through the package's `airflow.plugins` entry point, the GPU routing policy through its
# `airflow.policy` entry point), every package at the version of constraints.txt. torch is the CPU
# build by default: torch==2.13.0 from the PyTorch CPU wheel index (TORCH_INDEX_URL), so no CUDA
# libraries are pulled into the scheduler/API/worker image. For GPU Celery workers build it with a
# CUDA index, see docs/deployment.md.
#
# Build from the repository root (docker-compose.yml does this):
#   docker build -f docker/airflow.Dockerfile -t trainflow-airflow:0.1.0 .
# Air-gapped / private builds (docs/deployment.md, "Building without the internet"): wheels put in
# docker/wheelhouse/ are preferred by pip; PACKAGE_INDEX_URL replaces PyPI with your mirror,
# TORCH_INDEX_URL= (empty) takes torch from the wheelhouse or that mirror, WHEELHOUSE_ONLY=1 uses no
# index at all. The base image is a build argument too (AIRFLOW_IMAGE: a mirror of apache/airflow).
# Needs BuildKit (the default builder of Docker Engine 23+ and of `docker compose build`).
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}

# PyTorch wheel index for torch==2.13.0: the CPU build by default; a CUDA index for GPU workers.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# "cpu": the build fails if a CUDA torch got in; "cuda": it fails if one did not.
ARG TORCH_FLAVOR=cpu
# Your package index instead of PyPI (e.g. a devpi/Artifactory/Nexus mirror); empty: pip's default.
ARG PACKAGE_INDEX_URL=
# 1: no index at all, everything from docker/wheelhouse/ (a fully offline build).
ARG WHEELHOUSE_ONLY=

USER airflow
WORKDIR /opt/trainflow

# Dependencies first, from pyproject.toml's list under constraints.txt: a code change rebuilds only
# the small layer below. Airflow stays at the base image's version (pinned there too); torch==2.13.0
# comes from TORCH_INDEX_URL or the wheelhouse (its "+cpu"/"+cuXXX" build sorts above PyPI's). pip's
# downloads stay in a BuildKit cache between builds, never in the image.
COPY --chown=airflow:0 pyproject.toml constraints.txt ./
RUN --mount=type=cache,target=/home/airflow/.cache/pip,uid=50000,gid=0 \
    --mount=type=bind,source=docker/wheelhouse,target=/opt/trainflow-wheelhouse \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/trainflow-requirements.txt \
    && pip install \
        --constraint constraints.txt \
        --find-links /opt/trainflow-wheelhouse \
        ${WHEELHOUSE_ONLY:+--no-index} \
        ${PACKAGE_INDEX_URL:+--index-url "${PACKAGE_INDEX_URL}"} \
        ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} \
        "apache-airflow==${AIRFLOW_VERSION}" \
        "torch==2.13.0" \
        --requirement /tmp/trainflow-requirements.txt \
    && python -c "import sys, torch; \
v, cuda = torch.__version__, torch.version.cuda; print('torch', v, 'cuda', cuda); \
ok = v.split('+')[0] == '2.13.0' and ((cuda is None) == ('${TORCH_FLAVOR}' == 'cpu')); \
sys.exit(0 if ok else 'unexpected torch build for TORCH_FLAVOR=${TORCH_FLAVOR}: ' + v)"

# trainflow itself, installed by pip from the repository (pyproject.toml says which packages): the
# build context is mounted, not copied into a layer, so nothing but the installed package lands in
# the image (the build runs in a scratch copy: the mount belongs to root, setuptools writes to it).
RUN --mount=type=cache,target=/home/airflow/.cache/pip,uid=50000,gid=0 \
    --mount=type=bind,source=.,target=/tmp/trainflow-context \
    --mount=type=bind,source=docker/wheelhouse,target=/opt/trainflow-wheelhouse \
    cp -r /tmp/trainflow-context /tmp/trainflow-src \
    && pip install --no-deps \
        --constraint constraints.txt \
        --find-links /opt/trainflow-wheelhouse \
        ${WHEELHOUSE_ONLY:+--no-index} \
        ${PACKAGE_INDEX_URL:+--index-url "${PACKAGE_INDEX_URL}"} \
        /tmp/trainflow-src \
    && rm -rf /tmp/trainflow-src \
    && pip check \
    && cd / && python -c "import tasks, trainers, trainflow.airflow.plugin, trainflow.airflow.policies" \
    && python -m trainflow.trainers.recommendation --help > /dev/null && python -m trainflow.trainers.driving --help > /dev/null

# The DAG files; everything they import comes from the installed package.
COPY --chown=airflow:0 dags /opt/airflow/dags

# Local caches (downloads); datasets, runs and MLflow artifacts go to S3 (TRAINFLOW_STORAGE_ROOT).
ENV TRAINFLOW_DATA_DIR=/opt/airflow/trainflow-data
RUN mkdir -p /opt/airflow/trainflow-data
WORKDIR /opt/airflow
