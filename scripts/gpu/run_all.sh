#!/usr/bin/env bash
# The GPU kit's one entry point: every check, each in its own process under its own timeout,
# 8 minutes in all; OUTDIR/results.json is rewritten after every check; exits 1 if any failed.
#   bash scripts/gpu/run_all.sh OUTDIR                # the GPU box (CUDA; the real shapes)
#   bash scripts/gpu/run_all.sh OUTDIR --cpu --tiny   # the CPU rehearsal (scripts/gpu/rehearse.sh)
# Installs .gpu_kit/wheels (prepare.sh) into a target dir put first on PYTHONPATH; set
# GPU_KIT_NO_WHEELS="transformers peft" to keep the box's own copies of those instead ("all":
# install none, e.g. in the project's .venv).
# GPU_KIT_ONLY="env peft_lora" runs a subset; GPU_KIT_BUDGET_S changes the 480 s budget and
# GPU_KIT_TIMEOUT_SCALE multiplies every check's timeout (the CPU rehearsal on a busy box).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT=${1:?usage: run_all.sh OUTDIR [--cpu] [--tiny]}
shift
FLAGS=("$@")
KIT=${GPU_KIT:-$ROOT/.gpu_kit}
SITE=${GPU_KIT_SITE:-/tmp/lambert_kit_site}
BUDGET=${GPU_KIT_BUDGET_S:-480}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
[ -d "$KIT/wheels" ] || { echo "no kit at $KIT: run scripts/gpu/prepare.sh on a networked box" >&2; exit 2; }
wheels=()
for w in "$KIT"/wheels/*.whl; do
  skip=0
  for name in ${GPU_KIT_NO_WHEELS:-}; do
    [[ $name == all || "$(basename "$w")" == "${name}"-* ]] && skip=1
  done
  [ $skip = 1 ] || wheels+=("$w")
done
rm -rf "$SITE"
mkdir -p "$SITE"
if [ ${#wheels[@]} -gt 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "${wheels[@]}" || { echo "installing the kit's wheels failed" >&2; exit 2; }
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" GPU_KIT="$KIT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
echo "kit: $KIT -> $SITE (${#wheels[@]} wheels); out: $OUT; flags: ${FLAGS[*]:-none}; budget ${BUDGET}s"
"$PY" "$ROOT/scripts/gpu/checks.py" --start --out "$OUT" "${FLAGS[@]}" || exit 2
failed=0
start=$SECONDS
while read -r name limit; do
  if [ -n "${GPU_KIT_ONLY:-}" ] && [[ " $GPU_KIT_ONLY " != *" $name "* ]]; then continue; fi
  left=$((BUDGET - (SECONDS - start)))
  if [ "$left" -lt 15 ]; then
    "$PY" "$ROOT/scripts/gpu/checks.py" "$name" --out "$OUT" --mark "skipped: 8-minute budget spent"
    echo "[$name] skipped (budget)"; failed=1; continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout -k 10 "$limit" "$PY" "$ROOT/scripts/gpu/checks.py" "$name" --out "$OUT" "${FLAGS[@]}"
  rc=$?
  if [ $rc -ne 0 ]; then
    failed=1
    case $rc in
      124|137) status="timeout after ${limit}s" ;;
      *) status="crashed (exit $rc)" ;;
    esac
    "$PY" "$ROOT/scripts/gpu/checks.py" "$name" --out "$OUT" --mark "$status"
    [ $rc -eq 1 ] || echo "[$name] $status"
  fi
done < <("$PY" "$ROOT/scripts/gpu/checks.py" --list "${FLAGS[@]}")
echo "done in $((SECONDS - start)) s; results: $OUT/results.json"
"$PY" - "$OUT/results.json" <<'PY'
import json, sys
checks = json.load(open(sys.argv[1]))["checks"]
for name, e in checks.items():
    print(f"  {name:22} {e.get('status', '?'):10} {e.get('seconds', '')}")
PY
exit $failed
