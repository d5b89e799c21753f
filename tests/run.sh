#!/usr/bin/env bash
# The test suite. Usage:
#   bash tests/run.sh [pytest args...]          installs CPU torch and the package, lints with ruff, runs every test
#   bash tests/run.sh --fast [pytest args...]   while editing: unit tests only (no integration/slow markers),
#                                               no install, no lint, 120 s per test; under two minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
# tests never reach a model/dataset hub
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -q -p no:cacheprovider -m "not integration and not slow" --timeout=120 "$@"
else
  quiet() { grep -v -E "^(WARNING|  Location)" || true; }   # pip's notices only; a failed install still fails
  python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | quiet
  python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | quiet
  python -m ruff check .
fi
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
