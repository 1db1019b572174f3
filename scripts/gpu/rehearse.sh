#!/usr/bin/env bash
# CPU rehearsal of the GPU kit against the GPU box's own package set (docs/gpu.md: not yet in CI).
#   bash scripts/gpu/rehearse.sh
# 1. .gpu_rehearsal/venv: CPython 3.12 holding ONLY what the GPU box documents (its versions where
#    known: torch 2.11.0 (PyPI's CUDA-13 build, run on the CPU), transformers 5.17.0, tokenizers
#    0.23.2, huggingface-hub 1.33.0, safetensors 0.8.0, accelerate 1.15.0, plus an older peft) and
#    none of pydantic, bitsandbytes, ray, deepspeed; built once (~1 min, ~5 GB), then reused.
# 2. .gpu_kit from scripts/gpu/prepare.sh (needs the project .venv and the network once).
# 3. run_all.sh --cpu --tiny in that venv: every check, the NF4 ones through bitsandbytes' CPU
#    backend; the results land in .gpu_rehearsal/out/results.json.
# 4. The prompt-learning scoring path once more with the box's own transformers 5.17 (the kit's
#    transformers wheel left out), since scoring.py must run on both.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
R=.gpu_rehearsal
VENV=${GPU_REHEARSAL_VENV:-$R/venv}  # .ci/run keeps it outside the fresh clone, to reuse it
BOX_PACKAGES=(torch==2.11.0 transformers==5.17.0 tokenizers==0.23.2 huggingface-hub==1.33.0
              safetensors==0.8.0 accelerate==1.15.0 peft==0.17.1 numpy pyyaml pandas pyarrow)
PY312=
for cand in ${REHEARSE_PYTHON:-} python3.12 "$(pyenv prefix 3.12 2>/dev/null)/bin/python3.12" \
            /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
  if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    PY312=$cand; break
  fi
done
[ -n "$PY312" ] || { echo "rehearse: no python3.12 here (the GPU box runs 3.12; the kit ships cp312 wheels)" >&2; exit 2; }
STAMP="$VENV/.box_packages"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "${BOX_PACKAGES[*]}" ]; then
  t0=$SECONDS
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install -q "${BOX_PACKAGES[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  # typer >= 0.29 pulls pydantic in; the box's (older) typer does not, and the box has none
  "$VENV/bin/python" -m pip uninstall -q -y pydantic pydantic-core annotated-types typing-inspection
  echo "${BOX_PACKAGES[*]}" > "$STAMP"
  echo "rehearse: venv built in $((SECONDS - t0)) s"
fi
"$VENV/bin/python" - <<'PY'
import importlib.util as u, sys
import torch, transformers
absent = ["pydantic", "bitsandbytes", "ray", "deepspeed"]
present = [m for m in absent if u.find_spec(m) is not None]
assert not present, f"the rehearsal venv must not hold {present} (the GPU box has none of them)"
print(f"rehearse: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}; absent: {', '.join(absent)}")
PY
[ -d .gpu_kit/wheels ] || bash scripts/gpu/prepare.sh
export PYTHON="$VENV/bin/python" GPU_KIT_WORK=/tmp/lambert_kit_work_rehearsal
# a shared 2-core box is far slower than the GPU plan's 8 minutes: wider limits here
export GPU_KIT_BUDGET_S=${GPU_KIT_BUDGET_S:-2400} GPU_KIT_TIMEOUT_SCALE=${GPU_KIT_TIMEOUT_SCALE:-8}
rm -rf "$GPU_KIT_WORK"
rc=0
GPU_KIT_SITE=/tmp/lambert_kit_site_rehearsal bash scripts/gpu/run_all.sh $R/out --cpu --tiny || rc=1
GPU_KIT_SITE=/tmp/lambert_kit_site_rehearsal_tf517 GPU_KIT_NO_WHEELS=transformers \
  GPU_KIT_ONLY="env peft_prompt_tuning" bash scripts/gpu/run_all.sh $R/out_transformers517 --cpu --tiny || rc=1
"$PYTHON" - $R/out/results.json $R/out_transformers517/results.json <<'PY'
import json, sys
for path in sys.argv[1:]:
    env = json.load(open(path))["checks"].get("env", {})
    tf = env.get("packages", {}).get("transformers", {})
    print(f"rehearse: {path}: transformers {tf.get('version')} from {tf.get('from')}")
PY
[ $rc -eq 0 ] && echo "rehearse: passed" || echo "rehearse: FAILED (see $R/out*/results.json)"
exit $rc
