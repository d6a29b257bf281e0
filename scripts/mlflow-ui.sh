#!/usr/bin/env bash
# Opens the MLflow UI on this project's local tracking store (the one the main job used).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
DATA="${TRAINFLOW_DATA_DIR:-$ROOT/data}"
echo "MLflow UI on http://127.0.0.1:5000"
exec "$VENV/bin/mlflow" ui --backend-store-uri "${MLFLOW_TRACKING_URI:-sqlite:///$DATA/mlflow.db}" \
  --default-artifact-root "file://$DATA/mlartifacts" --host 127.0.0.1 --port "${MLFLOW_PORT:-5000}"
