#!/usr/bin/env bash
# Opens the Airflow UI on this project's embedded Airflow (the one the main job used).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
source "$ROOT/scripts/airflow-env.sh"
export PATH="$VENV/bin:$PATH"  # standalone starts its components as `airflow ...` from PATH
"$VENV/bin/airflow" db migrate > "$AIRFLOW_HOME/db-migrate.log" 2>&1
"$VENV/bin/airflow" pools set training 1 "trainflow training jobs" > /dev/null
echo "Airflow UI on http://127.0.0.1:8080 ; the admin password is printed below and saved in $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
exec "$VENV/bin/airflow" standalone
