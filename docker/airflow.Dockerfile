# syntax=docker/dockerfile:1
# The trainflow Airflow image: Apache Airflow 3.3.2 (Python 3.11) + trainflow (DAGs, tasks, trainers,
# the plugin through the package's `airflow.plugins` entry point), every package at the version of
# constraints.txt. torch is the CPU build by default: torch==2.13.0 from the PyTorch CPU wheel index
# (TORCH_INDEX_URL), so no CUDA libraries are pulled into the scheduler/API/worker image. For GPU
# Celery workers build it with a CUDA index, see docs/deployment.md.
#
# Build from the repository root (docker-compose.yml does this):
#   docker build -f docker/airflow.Dockerfile -t trainflow-airflow:0.1.0 .
FROM apache/airflow:3.3.2-python3.11

# PyTorch wheel index for torch==2.13.0: the CPU build by default; a CUDA index for GPU workers.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# "cpu": the build fails if a CUDA torch got in; "cuda": it fails if one did not.
ARG TORCH_FLAVOR=cpu

USER airflow
WORKDIR /opt/trainflow

# Only what the package needs (see docker/airflow.Dockerfile.dockerignore for the context).
COPY --chown=airflow:0 pyproject.toml README.md constraints.txt ./
COPY --chown=airflow:0 tasks ./tasks
COPY --chown=airflow:0 trainers ./trainers
COPY --chown=airflow:0 plugins ./plugins

# One resolution under constraints.txt: Airflow stays at the base image's version (pinned there
# too), torch==2.13.0 is taken from TORCH_INDEX_URL (its "+cpu"/"+cuXXX" build sorts above PyPI's).
RUN pip install --no-cache-dir \
        --constraint constraints.txt \
        --extra-index-url "${TORCH_INDEX_URL}" \
        "apache-airflow==${AIRFLOW_VERSION}" \
        "torch==2.13.0" \
        . \
    && python -c "import sys, torch; \
v, cuda = torch.__version__, torch.version.cuda; print('torch', v, 'cuda', cuda); \
ok = v.split('+')[0] == '2.13.0' and ((cuda is None) == ('${TORCH_FLAVOR}' == 'cpu')); \
sys.exit(0 if ok else 'unexpected torch build for TORCH_FLAVOR=${TORCH_FLAVOR}: ' + v)" \
    && python -c "import tasks, trainers, trainflow_airflow.plugin"

# The DAG files; everything they import comes from the installed package.
COPY --chown=airflow:0 dags /opt/airflow/dags

# Local caches (downloads); datasets, runs and MLflow artifacts go to S3 (TRAINFLOW_STORAGE_ROOT).
ENV TRAINFLOW_DATA_DIR=/opt/airflow/trainflow-data
RUN mkdir -p /opt/airflow/trainflow-data
WORKDIR /opt/airflow
