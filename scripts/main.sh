#!/usr/bin/env bash
# The main job: runs the recommendation pipeline on embedded defaults (SQLite Airflow,
# local object store under data/, SQLite MLflow, CPU) with real Airflow (`airflow dags test`).
# Data: ML-100K (NCF split) from ../shared/data when present, otherwise the synthetic stand-in.
# Usage: bash scripts/main.sh [recommendation|driving]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
source "$ROOT/scripts/airflow-env.sh"
KIND="${1:-recommendation}"
SHARED="${TRAINFLOW_SHARED_DATA:-$ROOT/../shared/data}"
case "$KIND" in
  recommendation)
    if [ -d "$SHARED/ncf_movielens_100k" ]; then SOURCE="$(cd "$SHARED/ncf_movielens_100k" && pwd)"
    else SOURCE="synthetic://recommendation?num_interactions=100000"; fi ;;
  driving)
    if [ -d "$SHARED/argoverse1_forecasting_subset" ]; then SOURCE="$(cd "$SHARED/argoverse1_forecasting_subset" && pwd)"
    else SOURCE="synthetic://driving?num_sequences=2000"; fi ;;
  *) echo "usage: $0 [recommendation|driving]" >&2; exit 2 ;;
esac
echo "[main] data: $SOURCE"
"$VENV/bin/airflow" db migrate > "$AIRFLOW_HOME/db-migrate.log" 2>&1 || { tail -40 "$AIRFLOW_HOME/db-migrate.log"; exit 1; }
LOG="$TRAINFLOW_DATA_DIR/last-${KIND}-run.log"
echo "[main] running ${KIND}_training with airflow dags test (full log: $LOG)"
CONF="$("$VENV/bin/python" -c 'import json,sys; print(json.dumps({"source_url": sys.argv[1]}))' "$SOURCE")"
if ! "$VENV/bin/airflow" dags test "${KIND}_training" -c "$CONF" > "$LOG" 2>&1; then
  tail -60 "$LOG"; echo "[main] the DAG run failed; see $LOG" >&2; exit 1
fi
grep -E "cache hit|new version committed|splits:|DagRun Finished" "$LOG" | sed -E 's/^[^ ]+ \[[a-z ]+\] //' || true
echo "[main] dataset manifest:"
"$VENV/bin/python" -m tasks.cli manifest "$SOURCE" --kind "$KIND"
cat <<MSG

[main] done. To look around:
  Airflow UI:  bash scripts/airflow-ui.sh     (airflow standalone on http://127.0.0.1:8080, this project's DAGs)
MSG
