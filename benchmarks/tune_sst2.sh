#!/usr/bin/env bash
# Which PEFT method makes SmolLM2 the best SST-2 annotator? Ray Tune over all six methods
# (configs/sst2_smollm2_tune.yaml: 300 gold train sentences, 2 epochs, 300 dev sentences, one
# config per method, ASHA), then the table + plots are copied to results/tune_sst2/ with the
# exact command. Target: under an hour on 2 idle CPU cores.
#
#   benchmarks/tune_sst2.sh           # the full comparison
#   benchmarks/tune_sst2.sh --smoke   # 2 methods, 40 train, 1 epoch, 40 dev: checks the wiring
#
# Rerunning restores the Tune experiment under runs/ (finished trials are kept).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HOME="$PWD/.cache/hf" TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_ext"
export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/ray_tune}"

CONFIG=configs/sst2_smollm2_tune.yaml
if [[ "${1:-}" == "--smoke" ]]; then
  RUN=sst2-tune-smoke
  OUT=results/tmp/tune_sst2_smoke
  SETS=(--set run.name=$RUN --set data.gold_train_sample=40 --set peft.max_dev=40
        --set peft.epochs=1 --set 'tune.methods={lora: {}, prompt_tuning: {}}')
else
  RUN=sst2-smollm2-tune
  OUT=results/tune_sst2
  SETS=(--set run.name=$RUN)
fi
CMD=(.venv/bin/lambert-ray tune --config "$CONFIG" --set run.num_cpus=2 "${SETS[@]}")

start=$(date +%s)
timeout 3h "${CMD[@]}"
secs=$(( $(date +%s) - start ))

mkdir -p "$OUT"
cp runs/$RUN/tune/results/*.{md,json,csv,png} "$OUT"/
{
  echo "command: ${CMD[*]}"
  echo "wall time: ${secs}s on $(nproc) cores ($(uname -m)); $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "git: $(git rev-parse --short HEAD)"
} > "$OUT/command.txt"
cat "$OUT/command.txt"
