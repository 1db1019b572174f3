#!/usr/bin/env bash
# CI smoke test of the cluster path: start a Ray head on 127.0.0.1, `ray job submit` a tiny
# AG News pipeline (SmolLM2 labels 16 rows, MiniLM trains 1 epoch, classifies 40 rows), wait
# for SUCCEEDED, check the outputs, stop the head. Offline; ~2-4 min on 2 CPU cores.
#   scripts/job_submit_smoke.sh            (exit 0: passed)
#
# Token auth: `ray start` turns token auth on when a token exists (~/.ray/auth_token, written by
# any earlier `ray.init()`), but the job client only sends it when RAY_AUTH_MODE=token. So the
# head, the client and the driver all get RAY_AUTH_MODE=token and one token file of our own.
# Stopping: the head runs with --block in its own process group; only that group is stopped
# (`ray stop` would stop every Ray on the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PY")
WORK=$(mktemp -d /tmp/lr_smoke.XXXXXX)
export RAY_TMPDIR=$WORK/ray
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$WORK/auth_token
export HF_HUB_OFFLINE=1 HF_HOME=${HF_HOME:-$ROOT/.cache/hf}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_ext}
export LAMBERT_DATA_DIR=${LAMBERT_DATA_DIR:-$(cd "$ROOT/../shared/data" && pwd)}
mkdir -p "$RAY_TMPDIR"
(umask 077 && "$PY" -c "import secrets; print(secrets.token_hex(32))" > "$RAY_AUTH_TOKEN_PATH")
# Every port the head opens, picked free (the defaults, e.g. the agent's 52365 or the client
# server's 10001, collide with other Ray instances on a shared machine).
read -r GCS_PORT DASH_PORT AGENT_HTTP AGENT_GRPC METRICS RT_ENV CLIENT NM OM < <("$PY" -c "
import socket
socks = [socket.socket() for _ in range(9)]
for s in socks: s.bind(('127.0.0.1', 0))
print(*[s.getsockname()[1] for s in socks])")
ADDR=http://127.0.0.1:$DASH_PORT
OUT=$WORK/out

HEAD_PID=
stop_head() {
  [ -n "$HEAD_PID" ] || return 0
  kill -TERM -- "-$HEAD_PID" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 -- "-$HEAD_PID" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$HEAD_PID" 2>/dev/null || true
  echo "head stopped"
}
trap stop_head EXIT

# The job's `python` must be this venv's: the driver inherits the head's PATH.
PATH="$BIN:$PATH" setsid "$BIN/ray" start --head --block --node-ip-address 127.0.0.1 \
  --port "$GCS_PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --num-cpus 2 \
  --dashboard-agent-listen-port "$AGENT_HTTP" --dashboard-agent-grpc-port "$AGENT_GRPC" \
  --metrics-export-port "$METRICS" --runtime-env-agent-port "$RT_ENV" \
  --ray-client-server-port "$CLIENT" --node-manager-port "$NM" --object-manager-port "$OM" \
  --temp-dir "$RAY_TMPDIR" --disable-usage-stats > "$WORK/head.log" 2>&1 &
HEAD_PID=$!

for _ in $(seq 90); do
  "$BIN/ray" job list --address "$ADDR" > /dev/null 2>&1 && break
  kill -0 "$HEAD_PID" 2>/dev/null || { cat "$WORK/head.log"; exit 1; }
  sleep 1
done

JOB_ID=lambert_smoke_$(date +%s)
ENV_JSON=$("$PY" -c "import json, os; print(json.dumps({'env_vars': {k: os.environ[k] for k in
  ('HF_HUB_OFFLINE', 'HF_HOME', 'TORCH_EXTENSIONS_DIR', 'LAMBERT_DATA_DIR')}}))")
# The head's job agent registers a few seconds after the API answers: retry the submission.
for attempt in $(seq 20); do
  "$BIN/ray" job submit --no-wait --address "$ADDR" --submission-id "$JOB_ID" --working-dir . \
    --runtime-env-json "$ENV_JSON" -- \
    python jobs/run_pipeline.py --config configs/ag_news_smollm2.yaml \
      --set run.output_dir="$OUT" --set run.name=smoke \
      --set data.annotate_sample=16 --set data.llm_eval_limit=16 --set data.classify_limit=40 \
      --set data.gold_test.limit=40 --set bert.epochs=1 > "$WORK/submit.log" 2>&1 && break
  grep -q "No available agent" "$WORK/submit.log" || { cat "$WORK/submit.log"; exit 1; }
  [ "$attempt" -lt 20 ] || { cat "$WORK/submit.log"; exit 1; }
  sleep 2
done
"$BIN/ray" job logs --address "$ADDR" --follow "$JOB_ID"

STATUS=$("$PY" -c "import sys; from ray.job_submission import JobSubmissionClient
print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)" "$ADDR" "$JOB_ID")
echo "job $JOB_ID: $STATUS"
[ "$STATUS" = SUCCEEDED ]

# Outputs: every sampled row labelled, every corpus row classified, a report with metrics.
"$PY" - "$OUT/smoke" <<'EOF'
import json, sys
import pyarrow.dataset as pads
run = sys.argv[1]
rows = {s: pads.dataset(f"{run}/{s}", format="parquet").count_rows() for s in ("annotate", "classify")}
report = json.load(open(f"{run}/report.json"))
print("rows:", rows, "report systems:", [r["system"] for r in report["table"]])
assert rows == {"annotate": 16, "classify": 40}, rows
assert report["table"] and all(0 <= r["accuracy"] <= 1 for r in report["table"])
EOF
echo "job submit smoke: OK ($OUT)"
