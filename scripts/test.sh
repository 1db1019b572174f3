#!/usr/bin/env bash
# The test suite (pytest, CPU, embedded local Ray). Creates .venv on first use.
# Extra args go to pytest (e.g. -m "not ray" for the fast unit layer).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source scripts/env.sh
exec python -m pytest -q --durations=15 "$@"
