#!/usr/bin/env bash
# Runs once, when the PostgreSQL data volume is first initialised (docker-entrypoint-initdb.d):
# one server, two databases with an owner each: "airflow" (Airflow's metadata DB and the Celery
# result backend) and "mlflow" (MLflow's tracking and model-registry store).
# Passwords come from the environment (docker/.env via docker-compose.yml), never from this file.
set -euo pipefail

: "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"

# psql variables (:'name') quote the passwords as SQL literals. UTF8 whatever the server's default
# (a server initialised without a locale defaults to SQL_ASCII, where Airflow fails to store a DAG
# whose texts are not ASCII: found on the first real start of the stack).
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v airflow_password="$AIRFLOW_DB_PASSWORD" \
    -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow ENCODING 'UTF8' TEMPLATE template0;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow ENCODING 'UTF8' TEMPLATE template0;
SQL
echo "trainflow: created databases airflow and mlflow"
