#!/usr/bin/env bash
# The main job: the whole LlamBERT pipeline on the demo config (SST-2, offline).
# Creates .venv on first use. Extra args go to `lambert-ray run` (e.g. --set run.name=x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source scripts/env.sh
exec lambert-ray run --config configs/demo-sst2.yaml "$@"
