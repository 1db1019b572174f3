#!/usr/bin/env bash
# CPU rehearsal of the GPU kit against the GPU box's own package set (a step of .ci/run).
#   bash scripts/gpu/rehearse.sh
# 1. .gpu_rehearsal/venv (git-ignored, under the clone): CPython 3.12 holding ONLY what the GPU
#    box documents, at its versions where known: torch 2.11.0, transformers 5.17.0, tokenizers
#    0.23.2, huggingface-hub 1.33.0, safetensors 0.8.0, accelerate 1.15.0, an older peft, numpy,
#    pyyaml, pandas, pyarrow; none of pydantic, bitsandbytes, ray, deepspeed (asserted below).
#    torch is PyPI's 2.11.0, the CUDA 13 build (~5 GB with its nvidia wheels), run on the CPU: the
#    GPU box's own build, same Python API (download.pytorch.org's CPU wheels are not reachable
#    from the CI box). Built once, rebuilt when the package list changes.
# 2. .gpu_kit from scripts/gpu/prepare.sh (needs the project .venv and the network once).
# 3. run_all.sh --cpu --tiny in that venv: every check as a smoke run (tiny shapes, a few rows
#    and steps), the NF4 ones through bitsandbytes' CPU backend; results in
#    .gpu_rehearsal/out/results.json.
# 4. The prompt-learning scoring path once more with the box's own transformers 5.17 (the kit's
#    transformers wheel left out), since scoring.py must run on both.
# Env: REHEARSE_PYTHON (a CPython 3.12), GPU_REHEARSAL_VENV (the venv's dir),
#      GPU_KIT_TIMEOUT_SCALE / GPU_KIT_BUDGET_S (the limits, see run_all.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
R=.gpu_rehearsal
VENV=${GPU_REHEARSAL_VENV:-$R/venv}
BOX_PACKAGES=(torch==2.11.0 transformers==5.17.0 tokenizers==0.23.2 huggingface-hub==1.33.0
              safetensors==0.8.0 accelerate==1.15.0 peft==0.17.1 numpy pyyaml pandas pyarrow)
t_all=$SECONDS
# CPython 3.12: on PATH, else pyenv's (its python3.12 shim only answers when 3.12 is selected)
PY312=
for cand in ${REHEARSE_PYTHON:-} python3.12 "$(pyenv prefix 3.12 2>/dev/null || true)/bin/python3.12" \
            "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/bin/python3.12 \
            /usr/local/bin/python3.12; do
  if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
    PY312=$cand; break
  fi
done
[ -n "$PY312" ] || { echo "rehearse: FAILED: no CPython 3.12 found (the GPU box runs 3.12; tried REHEARSE_PYTHON, python3.12, pyenv 3.12): install one or set REHEARSE_PYTHON=/path/to/python3.12" >&2; exit 2; }
STAMP="$VENV/.box_packages"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "${BOX_PACKAGES[*]}" ]; then
  t0=$SECONDS
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  quiet() { { "$@"; } 2>&1 | { grep -v "^WARNING: Location" || true; }; }  # pip's status kept
  quiet "$VENV/bin/python" -m pip install -q --no-cache-dir --upgrade pip
  quiet "$VENV/bin/python" -m pip install -q --no-cache-dir "${BOX_PACKAGES[@]}"
  # typer >= 0.29 pulls pydantic in; the box's (older) typer does not, and the box has none
  "$VENV/bin/python" -m pip uninstall -q -y pydantic pydantic-core annotated-types typing-inspection
  echo "${BOX_PACKAGES[*]}" > "$STAMP"
  echo "rehearse: venv built in $((SECONDS - t0)) s ($(du -sh "$VENV" | cut -f1))"
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
t0=$SECONDS
[ -d .gpu_kit/wheels ] || bash scripts/gpu/prepare.sh
echo "rehearse: kit ready in $((SECONDS - t0)) s"
export PYTHON="$VENV/bin/python" GPU_KIT_WORK=/tmp/lambert_kit_work_rehearsal
# Smoke limits: each check takes seconds on an idle 2-core box (mostly imports), the 4x scale
# is headroom for a busy one; a check still running at 4 minutes is broken, not slow.
export GPU_KIT_BUDGET_S=${GPU_KIT_BUDGET_S:-900} GPU_KIT_TIMEOUT_SCALE=${GPU_KIT_TIMEOUT_SCALE:-4}
rm -rf "$GPU_KIT_WORK"
rc=0
t0=$SECONDS
GPU_KIT_SITE=/tmp/lambert_kit_site_rehearsal bash scripts/gpu/run_all.sh $R/out --cpu --tiny || rc=1
GPU_KIT_SITE=/tmp/lambert_kit_site_rehearsal_tf517 GPU_KIT_NO_WHEELS=transformers \
  GPU_KIT_ONLY="env peft_prompt_tuning" bash scripts/gpu/run_all.sh $R/out_transformers517 --cpu --tiny || rc=1
echo "rehearse: both run_all.sh passes in $((SECONDS - t0)) s"
"$PYTHON" - $R/out/results.json $R/out_transformers517/results.json <<'PY' || rc=1
import json, sys
for path in sys.argv[1:]:
    checks = json.load(open(path))["checks"]
    tf = checks.get("env", {}).get("packages", {}).get("transformers", {})
    print(f"rehearse: {path}: transformers {tf.get('version')} from {tf.get('from')}")
    # every check ran in the GPU box's package set without ray / deepspeed in its import closure
    bad = {n: e.get("forbidden_imports") for n, e in checks.items() if e.get("forbidden_imports")}
    assert not bad, f"ray / deepspeed imported: {bad}"
PY
[ $rc -eq 0 ] && echo "rehearse: passed in $((SECONDS - t_all)) s" \
  || echo "rehearse: FAILED (see $R/out*/results.json)"
exit $rc
