#!/usr/bin/env bash
# Installs what the test suite needs (CPU torch first, so no CUDA build is pulled), lints, runs pytest.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
quiet() { grep -v -E "^(WARNING|  Location)" || true; }   # pip's notices only; a failed install still fails
python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | quiet
python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | quiet
python -m ruff check .
# tests never reach a model/dataset hub
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
