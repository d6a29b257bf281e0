#!/usr/bin/env bash
# Environment of this project's embedded Airflow (sourced): SQLite metadata DB and logs under
# data/airflow, this checkout's DAGs, no example DAGs. Override any variable before sourcing.
ROOT="${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export TRAINFLOW_DATA_DIR="${TRAINFLOW_DATA_DIR:-$ROOT/data}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$TRAINFLOW_DATA_DIR/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="${AIRFLOW__CORE__DAGS_FOLDER:-$ROOT/dags}"
export AIRFLOW__CORE__LOAD_EXAMPLES="${AIRFLOW__CORE__LOAD_EXAMPLES:-False}"
mkdir -p "$AIRFLOW_HOME"
