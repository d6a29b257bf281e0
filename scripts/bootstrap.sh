#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs trainflow with its test extras from the committed
# constraints; does nothing when the environment already matches. Sourced by main.sh/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${TRAINFLOW_PYTHON:-python3.11}"
# One bootstrap at a time (the UI scripts and the main job may start together).
exec 9>"$ROOT/.bootstrap.lock"
flock 9
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.trainflow-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[bootstrap] installing trainflow and its dependencies (constraints.txt)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # torch is pinned to 2.13.0 (the CPU wheel here); constraints keep every other package as tested.
  "$VENV/bin/python" -m pip install --quiet -c "$ROOT/constraints.txt" -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
fi
exec 9>&-  # release the lock: the environment is ready
