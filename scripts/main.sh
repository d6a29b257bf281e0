#!/usr/bin/env bash
# The main job: runs the recommendation pipeline end to end (shard -> train -> evaluate ->
# register) on embedded defaults (SQLite Airflow, local object store under data/, SQLite
# MLflow, 2 CPU processes) with real Airflow (`airflow dags test`) and real torchrun.
# Extra DAG params: TRAINFLOW_MAIN_CONF='{"epochs": 5}' bash scripts/main.sh
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
"$VENV/bin/airflow" pools set training 1 "trainflow training jobs (one at a time on this machine)" > /dev/null
# One log per run: written under a name of this job's own, renamed after the run id once
# `airflow dags test` has printed it (it chooses the id); the success check and the report are
# this run's, so two main jobs in one data folder never read each other's log or report.
LOG_DIR="$TRAINFLOW_DATA_DIR/logs/main"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/${KIND}-started-$(date -u +%Y%m%dT%H%M%S)-$$.log"
echo "[main] running ${KIND}_training with airflow dags test: shard -> train -> evaluate -> register (log: $LOG)"
EXTRA="${TRAINFLOW_MAIN_CONF:-}"; [ -n "$EXTRA" ] || EXTRA='{}'
# `airflow dags test` is a manual run, which would wait for a reviewer (require_approval=auto):
# the main job lets the gate decide unless TRAINFLOW_MAIN_CONF says otherwise.
CONF="$("$VENV/bin/python" -c 'import json,sys; print(json.dumps({"source_url": sys.argv[1], "require_approval": "never", **json.loads(sys.argv[2])}))' "$SOURCE" "$EXTRA")"
# The source the run uses (TRAINFLOW_MAIN_CONF may name another), for the manifest hint below.
SOURCE="$("$VENV/bin/python" -c 'import json,sys; print(json.loads(sys.argv[1])["source_url"])' "$CONF")"
START=$(date +%s)
STATUS=0
"$VENV/bin/airflow" dags test "${KIND}_training" -c "$CONF" > "$LOG" 2>&1 || STATUS=$?
FINISHED="$(grep -E "DagRun Finished: dag_id=${KIND}_training, " "$LOG" | tail -1 || true)"
RUN_ID="$(printf '%s\n' "$FINISHED" | sed -nE 's/.* run_id=([^,]+),.*/\1/p')"
if [ -n "$RUN_ID" ]; then
  RUN_LOG="$LOG_DIR/${KIND}-${RUN_ID}.log"
  mv "$LOG" "$RUN_LOG"; LOG="$RUN_LOG"
fi
ln -sfn "$LOG" "$TRAINFLOW_DATA_DIR/last-${KIND}-run.log"  # the latest run's, for convenience
if [ "$STATUS" -ne 0 ]; then
  tail -60 "$LOG"; echo "[main] the DAG run ${RUN_ID:-(no run id)} failed; see $LOG" >&2; exit 1
fi
if [ -z "$RUN_ID" ] || ! printf '%s\n' "$FINISHED" | grep -q "state=success"; then
  grep -E "ERROR|Error|Traceback" "$LOG" | tail -20; echo "[main] the DAG run ${RUN_ID:-(no run id)} did not succeed; see $LOG" >&2; exit 1
fi
echo "[main] run $RUN_ID finished in $(( $(date +%s) - START )) s (log: $LOG)"
echo
"$VENV/bin/python" -m trainflow.tasks.cli report "${KIND}_training" --run-id "$RUN_ID"
cat <<MSG

[main] To look at the results:
  Airflow UI:  bash scripts/airflow-ui.sh    -> http://127.0.0.1:8080 (DAG ${KIND}_training, its runs, task logs, MLflow links)
  MLflow UI:   bash scripts/mlflow-ui.sh     -> http://127.0.0.1:5000 (experiment trainflow-${KIND}, model trainflow-${KIND})
  Manifest:    .venv/bin/python -m trainflow.tasks.cli manifest '$SOURCE' --kind $KIND
MSG
