#!/usr/bin/env bash
# GPU check (#17), under 5 minutes on a machine with NVIDIA GPUs:
#   1. the GPU probe: nvidia-smi and torch's CUDA devices (fails here, clearly, without them);
#   2. the `gpu`-marked tests (pytest -m gpu);
#   3. one epoch of both example families on small synthetic data, bf16 autocast, 1 GPU and
#      (with 2+ GPUs) 2 GPUs under torchrun: samples/s from each run's result.json;
#   4. samples/s of NeuMF with the real loader (ShardLoader, checksums, negatives, pinned copies)
#      vs synthetic batches already in GPU memory: loader step time / memory step time, target <= 1.05.
# Prints a summary; exit status 0 when every part ran and passed, 1 when a part failed, 2 when
# there is no usable NVIDIA GPU (nothing else is run then).
# Usage: bash scripts/gpu-check.sh [--skip-tests] [--steps N] [--keep DIR]
#   --skip-tests  leave out part 2;  --steps N  optimizer steps of part 4 (default 200);
#   --keep DIR    write the data, runs and logs under DIR (default: a temporary folder, removed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SKIP_TESTS=0; STEPS=200; KEEP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --skip-tests) SKIP_TESTS=1; shift ;;
    --steps) [ $# -ge 2 ] && [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "[gpu-check] --steps needs a positive whole number" >&2; exit 64; }
             STEPS="$2"; shift 2 ;;
    --keep) [ $# -ge 2 ] && [ -n "$2" ] || { echo "[gpu-check] --keep needs a folder" >&2; exit 64; }
            KEEP="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "[gpu-check] unknown argument: $1 (see --help)" >&2; exit 64 ;;
  esac
done
PY="${TRAINFLOW_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || { echo "[gpu-check] no project virtualenv at $PY: run 'bash scripts/test.sh tests/tasks/test_params.py' once (or set TRAINFLOW_PYTHON)" >&2; exit 1; }
cd "$ROOT"

# 1. The GPU probe: stop here, clearly, without one.
if ! command -v nvidia-smi > /dev/null 2>&1; then
  echo "[gpu-check] FAILED: no NVIDIA GPU here: 'nvidia-smi' is not on PATH (no NVIDIA driver). This check needs a machine with NVIDIA GPUs; nothing was run." >&2
  exit 2
fi
if ! nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; then
  echo "[gpu-check] FAILED: nvidia-smi found no usable GPU (see its message above); nothing was run." >&2
  exit 2
fi
PROBE="$("$PY" scripts/gpu_check.py probe)"
echo "[gpu-check] torch: $PROBE"
GPUS="$("$PY" -c 'import json,sys; p=json.loads(sys.argv[1]); print(p["devices"])' "$PROBE")"
if [ "$GPUS" -lt 1 ]; then
  echo "[gpu-check] FAILED: the driver sees GPUs but torch does not (a CPU-only torch wheel? cuda_build above is null then): install torch's CUDA build (docs/deployment.md); nothing else was run." >&2
  exit 2
fi

WORK="${KEEP:-$(mktemp -d -t trainflow-gpu-check-XXXXXX)}"
mkdir -p "$WORK"
[ -n "$KEEP" ] || trap 'rm -rf "$WORK"' EXIT
export TRAINFLOW_DATA_DIR="$WORK/data" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
FAILED=()
SUMMARY=()
START=$(date +%s)

# 2. The gpu-marked tests.
if [ "$SKIP_TESTS" -eq 0 ]; then
  echo "[gpu-check] pytest -m gpu"
  if "$PY" -m pytest -m gpu -q -p no:cacheprovider tests > "$WORK/gpu-tests.log" 2>&1; then
    SUMMARY+=("gpu tests: $(tail -1 "$WORK/gpu-tests.log")")
  else
    tail -30 "$WORK/gpu-tests.log"; FAILED+=("gpu-marked tests"); SUMMARY+=("gpu tests: FAILED ($(tail -1 "$WORK/gpu-tests.log"))")
  fi
fi

# 3. Both families, bf16, 1 GPU and (2+ GPUs) 2 GPUs.
shard() { "$PY" -c 'import sys; from trainflow.tasks.sharding import shard_dataset; print(shard_dataset(sys.argv[1], sys.argv[2])["manifest_uri"])' "$1" "$2"; }
REC="$(shard 'synthetic://recommendation?num_interactions=200000&num_users=2000&num_items=4000' recommendation)"
DRV="$(shard 'synthetic://driving?num_sequences=2000' driving)"
NPROCS=(1); [ "$GPUS" -ge 2 ] && NPROCS+=(2)
for family in recommendation driving; do
  manifest="$REC"; [ "$family" = driving ] && manifest="$DRV"
  for n in "${NPROCS[@]}"; do
    run="$WORK/runs/$family-$n"
    echo "[gpu-check] $family: $n GPU(s), bf16, 1 epoch"
    if "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" -m "trainers.$family" \
         --manifest-uri "$manifest" --train.run_dir="file://$run" --train.device=cuda --train.precision=bf16 \
         --train.pin_memory=true --train.epochs=1 --train.log_to_mlflow=false > "$WORK/$family-$n.log" 2>&1; then
      line="$("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(f"{r[\"samples_per_s\"]:.0f} samples/s, {r[\"precision\"]}, {r[\"world_size\"]} rank(s) on {r[\"device\"]}, eval {r[\"metrics\"][\"eval\"]}")' "$run/result.json")"
      SUMMARY+=("$family x$n: $line")
    else
      tail -30 "$WORK/$family-$n.log"; FAILED+=("$family on $n GPU(s)"); SUMMARY+=("$family x$n: FAILED (log $WORK/$family-$n.log)")
    fi
  done
done

# 4. The real loader vs synthetic in-memory batches.
echo "[gpu-check] NeuMF step time: real loader vs batches in GPU memory ($STEPS steps)"
if LOADER="$("$PY" scripts/gpu_check.py loader --device cuda --manifest-uri "$REC" --steps "$STEPS" 2> "$WORK/loader.log")"; then
  SUMMARY+=("loader: $LOADER")
  "$PY" -c 'import json,sys; sys.exit(0 if json.loads(sys.argv[1])["ok"] else 1)' "$LOADER" || FAILED+=("loader step time above 1.05x the in-memory one")
else
  tail -30 "$WORK/loader.log"; FAILED+=("loader check"); SUMMARY+=("loader: FAILED")
fi

echo
echo "[gpu-check] summary ($(( $(date +%s) - START )) s, $GPUS GPU(s)):"
printf '  %s\n' "${SUMMARY[@]}"
if [ "${#FAILED[@]}" -gt 0 ]; then
  printf '[gpu-check] FAILED: %s\n' "${FAILED[@]}" >&2
  exit 1
fi
echo "[gpu-check] all parts passed"
