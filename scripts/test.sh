#!/usr/bin/env bash
# Set up (if needed) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FEWGEN_DATA="${FEWGEN_DATA:-$(cd .. && pwd)/shared/data}"
export FEWGEN_CACHE="${FEWGEN_CACHE:-$PWD/.cache/test}"
.venv/bin/python -m pytest -q "$@"
