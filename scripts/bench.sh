#!/usr/bin/env bash
# The benchmark command on a fresh clone: sets up the project's environment (as the main and
# test commands do) and, unless TRAINFLOW_BENCH_PEERS=0, the peers' own virtualenvs, then runs
# `python -m benchmarks` with the arguments given:
#   bash scripts/bench.sh                 # every case, full size (docs/benchmarks.md)
#   bash scripts/bench.sh --quick         # every case, small: the harness check CI runs
#   bash scripts/bench.sh loading --quick # some cases
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
if [ "${TRAINFLOW_BENCH_PEERS:-1}" != "0" ]; then
  bash "$ROOT/benchmarks/setup_peers.sh"
fi
exec "$VENV/bin/python" -m benchmarks "$@"
