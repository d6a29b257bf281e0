# Local stand-in of minio/minio and minio/mc: moto's S3 server (the one trainflow's tests use) behind
# a `minio server` command, and an `mc` with the few commands the compose file runs (ready, alias set,
# mb, admin user add, admin policy attach). moto keeps objects in memory and accepts any access key:
# `mc admin` commands are no-ops here and say so. Not a MinIO replacement outside this check.
ARG DEBIAN_IMAGE=trainflow-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY host-ca-bundle.crt /etc/ssl/certs/ca-certificates.crt
ENV PATH=/opt/s3/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY constraints.txt /tmp/standin-constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    python3.11 -m venv /opt/s3 \
    && pip install --constraint /tmp/standin-constraints.txt "moto[server]" boto3 \
    && moto_server --help > /dev/null
COPY --chmod=0755 s3-minio.sh /usr/local/bin/minio
COPY --chmod=0755 s3-mc.py /usr/local/bin/mc
EXPOSE 9000
ENTRYPOINT ["minio"]
