#!/usr/bin/env bash
# `minio server DIR [--console-address ADDR]` -> moto's S3 server on :9000 (no console, no disk).
set -euo pipefail
[ "${1:-}" = server ] || { echo "stand-in minio: only 'minio server' is supported" >&2; exit 2; }
echo "stand-in minio: moto S3 server on 0.0.0.0:9000 (in memory; '$*' ignored beyond 'server')"
exec moto_server --host 0.0.0.0 --port 9000
