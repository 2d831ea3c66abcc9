#!/usr/bin/env bash
# The GPU behaviours users expect, checked on tiny models built here (no download): the photos-like
# recipe (Stable Diffusion + DataDream + synthesis + the CLIP learner in bfloat16/float16) run once
# in one process and once in two (torchrun), then a table of checks: each rank on its own GPU
# (cuda:0 / cuda:1), only rank 0 the main process, and the adapter and every generated PNG the
# same bytes as with one process. Exits 1 when a check fails.
#
#   bash scripts/gpu_check.sh          # needs CUDA and two GPUs for the two-process checks
#   bash scripts/gpu_check.sh --cpu    # the same on two CPU processes (gloo): runs anywhere
#
# KEEP=1 keeps the work folder (printed) for a look at its files and TensorBoard events.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
CPU=""
if [ "${1:-}" = "--cpu" ]; then
  CPU="--cpu"
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/gpu_check.sh [--cpu]" >&2
  exit 2
fi
if [ -z "$CPU" ]; then
  gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
  if [ "$gpus" -lt 2 ]; then
    echo "error: the two-process checks need 2 CUDA devices, this machine has $gpus; run with --cpu for the CPU checks" >&2
    exit 2
  fi
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0,1}"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/fewgen-gpu-check.XXXXXX")
if [ -z "${KEEP:-}" ]; then trap 'rm -rf "$work"' EXIT; else echo "work folder: $work"; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "== building the tiny models"
"$PY" scripts/gpu_check.py build "$work/models"
echo "== one process"
env -u WORLD_SIZE -u LOCAL_RANK -u RANK "$PY" scripts/gpu_check.py worker "$work/models" "$work/one" $CPU
echo "== two processes (torchrun)"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
  scripts/gpu_check.py worker "$work/models" "$work/two" $CPU
"$PY" scripts/gpu_check.py compare "$work/one" "$work/two" $CPU
