#!/usr/bin/env bash
# Creates the benchmark-only virtualenvs for the peer libraries (never the project's .venv):
#   benchmarks/.venv-peers     WebDataset, MosaicML Streaming (MDS), plain pyarrow, py-spy
#   benchmarks/.venv-peers-hf  Hugging Face datasets (its huggingface_hub/numpy pins clash
#                              with mosaicml-streaming's, see docs/benchmarks.md)
# Both get the same CPU torch 2.13.0 as the project. Idempotent: does nothing when a stamp
# matches this script. The benchmarks report a peer as skipped when its venv is missing.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${TRAINFLOW_PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
WANT="$(sha256sum "$HERE/setup_peers.sh" | cut -d' ' -f1)"

make_env() {  # make_env DIR PACKAGES...
  local dir="$1"; shift
  if [ "$(cat "$dir/.stamp" 2>/dev/null)" = "$WANT" ]; then return; fi
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  echo "[setup_peers] installing into $dir: $*"
  # torch is pinned with every peer so pip never swaps the CPU build for another one.
  "$dir/bin/python" -m pip install --quiet "torch==2.13.0" "$@"
  "$dir/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  echo "$WANT" > "$dir/.stamp"
}

# mosaicml-streaming pulls torchvision: pin the one built for torch 2.13.0. PyPI's torchvision
# is a CUDA build that does not import next to the CPU torch; the MDS benchmark stubs
# streaming.vision (it needs only MDSWriter/StreamingDataset).
make_env "$HERE/.venv-peers" "torchvision==0.28.0" "mosaicml-streaming==0.13.0" "webdataset==1.0.2" \
  "pyarrow" "psutil" "boto3" "py-spy" "pyinstrument"
# s3fs (and boto3 for the shared S3 helpers): save_to_disk/load_from_disk on s3:// URLs
make_env "$HERE/.venv-peers-hf" "datasets" "pyarrow" "psutil" "s3fs" "boto3"
echo "[setup_peers] ready: $HERE/.venv-peers $HERE/.venv-peers-hf"
