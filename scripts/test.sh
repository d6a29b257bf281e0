#!/usr/bin/env bash
# The test command: sets up the environment if needed, then runs the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/tasks -x`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
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
