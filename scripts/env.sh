# Sourced by the entry scripts: offline, project-local caches, a short Ray temp dir.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export HF_HOME="${HF_HOME:-$ROOT/.cache/hf}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_ext}"
export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/lambert_ray}"
export TOKENIZERS_PARALLELISM=false
export LAMBERT_DATA_DIR="${LAMBERT_DATA_DIR:-$ROOT/../shared/data}"
export PATH="$ROOT/.venv/bin:$PATH"
mkdir -p "$HF_HOME" "$RAY_TMPDIR"
