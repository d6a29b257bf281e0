#!/usr/bin/env bash
# The test command: sets up the environment if needed, then runs the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/tasks -x`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
source "$ROOT/scripts/test-system-deps.sh"
cd "$ROOT"
# In CI the live stack (PostgreSQL, Redis), the browser and the Docker deployment (the compose check,
# tests/integration/test_compose_check.py) must be there: fail, never skip.
if [ "${CI:-}" = "true" ]; then
  export TRAINFLOW_REQUIRE_LIVE_STACK="${TRAINFLOW_REQUIRE_LIVE_STACK:-1}" TRAINFLOW_REQUIRE_BROWSER="${TRAINFLOW_REQUIRE_BROWSER:-1}"
  export TRAINFLOW_REQUIRE_COMPOSE_CHECK="${TRAINFLOW_REQUIRE_COMPOSE_CHECK:-1}"
fi
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  # pytest: no tests collected. A selection (arguments given) may legitimately match nothing;
  # the full suite never should.
  if [ "$#" -gt 0 ]; then echo "[test] no tests matched the selection: $*"; exit 0; fi
  echo "[test] pytest collected no tests"; exit 1
fi
exit "$rc"
