# Local stand-in of apache/airflow:3.3.2-python3.11, for machines that reach PyPI and Debian but no
# container registry (see docs/deployment.md, "Stand-ins"). It keeps the contract trainflow's image
# relies on: Python 3.11, Apache Airflow ${AIRFLOW_VERSION} with the Celery, PostgreSQL and FAB
# providers, user airflow (uid 50000, gid 0) who can `pip install`, AIRFLOW_HOME=/opt/airflow, curl,
# and an /entrypoint that runs `airflow <command>` under dumb-init. Built by scripts/compose-check.sh.
#
# Python: Debian bookworm's python3.11 is 3.11.2, older than constraints.txt allows (soupsieve 4.1.3,
# through the Amazon provider, needs 3.11.5+), so the build context brings a CPython 3.11 (>= 3.11.5)
# of the building machine in python3.11/ (its standard library, no site-packages), relocated to
# /opt/python3.11, on Debian's shared libraries.
ARG DEBIAN_IMAGE=trainflow-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
ARG AIRFLOW_VERSION=3.3.2

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates curl dumb-init procps libssl3 libffi8 libsqlite3-0 libbz2-1.0 liblzma5 zlib1g \
        libreadline8 libncursesw6 libuuid1 libgdbm6 libexpat1 \
    && rm -rf /var/lib/apt/lists/*
# The CA bundle of the machine that builds the stand-ins (TLS to the package indexes as it has it).
COPY host-ca-bundle.crt /etc/ssl/certs/ca-certificates.crt
COPY python3.11/ /opt/python3.11/
RUN echo /opt/python3.11/lib > /etc/ld.so.conf.d/python3.11.conf && ldconfig \
    && /opt/python3.11/bin/python3.11 -c "import ssl, sqlite3, ctypes, lzma, bz2, venv, ensurepip, sys; print(sys.version)"

ENV LANG=C.UTF-8 \
    AIRFLOW_VERSION=${AIRFLOW_VERSION} \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW_USER_HOME_DIR=/home/airflow \
    AIRFLOW_UID=50000 \
    PATH=/home/airflow/.local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

RUN useradd --uid 50000 --gid 0 --home-dir /home/airflow --create-home --shell /bin/bash airflow \
    && mkdir -p /opt/airflow/dags /opt/airflow/logs /opt/airflow/plugins /home/airflow/.cache \
    && chown -R airflow:0 /opt/airflow /home/airflow/.cache && chmod -R g+rwX /opt/airflow
USER airflow
COPY --chown=airflow:0 constraints.txt /tmp/standin-constraints.txt
RUN --mount=type=cache,target=/home/airflow/.cache/pip,uid=50000,gid=0 \
    /opt/python3.11/bin/python3.11 -m venv /home/airflow/.local \
    && pip install --upgrade pip \
    && pip install --constraint /tmp/standin-constraints.txt \
        "apache-airflow==${AIRFLOW_VERSION}" \
        apache-airflow-providers-celery apache-airflow-providers-postgres apache-airflow-providers-fab \
    && airflow version
COPY --chmod=0755 airflow-entrypoint.sh /entrypoint
WORKDIR /opt/airflow
ENTRYPOINT ["/usr/bin/dumb-init", "--", "/entrypoint"]
CMD []
