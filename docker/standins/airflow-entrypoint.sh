#!/usr/bin/env bash
# Stand-in of apache/airflow's /entrypoint (the parts trainflow's compose file uses): an Airflow
# subcommand runs as `airflow <command>` once the metadata DB answers; bash/python/a path runs as is.
set -euo pipefail
if [ "$#" -eq 0 ]; then exec airflow --help; fi
case "$1" in
  bash|sh|python|python3|/*) exec "$@" ;;
esac
if [ -n "${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-}" ]; then
  for _ in $(seq 1 "${CONNECTION_CHECK_MAX_COUNT:-20}"); do
    if airflow db check >/dev/null 2>&1; then break; fi
    echo "[entrypoint] waiting for the metadata DB"; sleep "${CONNECTION_CHECK_SLEEP_TIME:-3}"
  done
fi
exec airflow "$@"
