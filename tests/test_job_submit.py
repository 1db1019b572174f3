"""The cluster path end to end on one machine: a `ray start --head` on 127.0.0.1, a job submitted
through the Jobs SDK with this checkout as working_dir, SUCCEEDED, outputs where the config says.

The job writes to an `s3://` bucket (a local S3 API, conftest.s3_endpoint): results go to the
storage path the config names, as on a cloud cluster.

The head gets token auth with a token file of its own (RAY_AUTH_MODE=token for the head, the
client and the driver alike), runs with --block in its own process group, and the fixture's
finalizer stops exactly that group, even when the test fails. scripts/job_submit_smoke.sh does
the same for the whole pipeline with the `ray job submit` CLI.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import S3_BUCKET

from lambert_ray import storage
from lambert_ray.fake_head import PORT_FLAGS
from lambert_ray.fake_head import free_ports as _free_ports

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
def _stop_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the head's process group (ray start --block drains and stops its children),
    then SIGKILL whatever is left of that group. Touches no other Ray on the machine."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_endpoint):
    """A local Ray head on 127.0.0.1 (its workers see the S3 endpoint); yields (dashboard
    address, env for clients)."""
    work = tmp_path_factory.mktemp("head")
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = dict(os.environ, RAY_TMPDIR=str(work / "ray"), RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token), PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--temp-dir", env["RAY_TMPDIR"],
           "--disable-usage-stats", *[str(x) for kv in ports.items() for x in kv]]
    log = open(work / "head.log", "w")  # closed in the finalizer below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        address = f"http://127.0.0.1:{ports['--dashboard-port']}"
        yield address, env
    finally:
        _stop_group(proc)
        log.close()


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_submitted_pipeline_job_succeeds_and_writes_every_stage_to_the_bucket(ray_head):
    address, env = ray_head
    out = f"s3://{S3_BUCKET}/job-runs"
    data_dir = os.environ.get("LAMBERT_DATA_DIR", str((ROOT / ".." / "shared" / "data").resolve()))
    job_env = {"HF_HUB_OFFLINE": "1", "LAMBERT_DATA_DIR": data_dir,
               "HF_HOME": os.environ.get("HF_HOME", str(ROOT / ".cache" / "hf")),
               "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                      str(ROOT / ".cache" / "torch_ext")),
               **{k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                             "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}
    spec = {
        # The whole pipeline, small: SmolLM2 labels 12 + 8 rows, one MiniLM student (1 epoch)
        # on Ray Train, 40 corpus + 40 test rows classified, the report.
        "entrypoint": ("python jobs/run_pipeline.py --config configs/ag_news_smollm2.yaml "
                       f"--set run.output_dir={out} --set run.name=job "
                       "--set data.annotate_sample=12 --set data.llm_eval_limit=8 "
                       "--set data.gold_test.limit=40 --set data.classify_limit=40 "
                       "--set bert.epochs=1"),
        "runtime_env": {"working_dir": str(ROOT), "env_vars": job_env,
                        "excludes": [".git", ".venv", ".cache", "runs"]},
        "submission_id": f"lambert_test_{int(time.time())}",
    }
    # The Jobs SDK client runs in a fresh interpreter: a Ray driver started earlier in this
    # pytest process caches another auth token, which this head would reject.
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("job_client.py")), address,
                           json.dumps(spec)], env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "SUCCEEDED"

    annotate_dir = f"{out}/job/annotate"
    labelled = storage.read_parquet(annotate_dir)
    assert labelled.num_rows == 12
    assert len(set(labelled.column("row_id").to_pylist())) == 12
    done = storage.read_json(f"{annotate_dir}/_COMPLETE.json")
    assert done["counts"]["rows_in"] == done["counts"]["rows_ok"] + done["counts"]["rows_errored"] == 12
    report = storage.read_json(f"{out}/job/report.json")
    counts = report["counts"]
    assert counts["llm_eval"]["rows_in"] == 8
    assert counts["classify"]["rows_in"] == counts["test/llm"]["rows_in"] == 40
    assert all(c["rows_in"] == c["rows_ok"] + c["rows_errored"] for c in counts.values())
    assert storage.exists(f"{out}/job/bert/llm/model.safetensors")
    assert any(r["system"] == "BERT on LLM labels" for r in report["table"])
