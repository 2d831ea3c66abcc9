#!/usr/bin/env bash
# Create .venv with the CPU torch wheel and fewgen with every extra, at the tested versions of
# requirements-lock.txt. Idempotent: a rerun brings an existing .venv back to the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned, so nothing later pulls a newer (CUDA) build
.venv/bin/pip install -q "torch==${FEWGEN_TORCH:-2.13.0}"
.venv/bin/pip install -q -c requirements-lock.txt -e ".[all]"
