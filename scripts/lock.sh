#!/usr/bin/env bash
# Refresh requirements-lock.txt: resolve pyproject's ranges afresh in a throw-away venv, run the
# test suite against the result, and write the new lock only if the suite passes. Commit it after.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "torch==${FEWGEN_TORCH:-2.13.0}"
"$work/venv/bin/pip" install -q -e ".[all]"
{
  sed -n '/^#/p' requirements-lock.txt
  "$work/venv/bin/pip" freeze --exclude-editable | grep -v -i '^torch=='
} > "$work/lock.txt"
echo "resolved $(grep -c '==' "$work/lock.txt") packages; running the test suite with them"
export FEWGEN_DATA="${FEWGEN_DATA:-$(cd .. && pwd)/shared/data}"
FEWGEN_CACHE="$work/cache" "$work/venv/bin/python" -m pytest -q -x
cp "$work/lock.txt" requirements-lock.txt
git --no-pager diff --stat -- requirements-lock.txt
echo "requirements-lock.txt updated; review the diff and commit it"
