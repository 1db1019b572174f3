"""The cluster path end to end on one machine: a `ray start --head` on 127.0.0.1, a job submitted
through the Jobs SDK with this checkout as working_dir, SUCCEEDED, outputs where the config says.

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
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PORT_FLAGS = ["--port", "--dashboard-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
              "--ray-client-server-port", "--node-manager-port", "--object-manager-port"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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
def ray_head(tmp_path_factory):
    """A local Ray head on 127.0.0.1; yields (dashboard address, env for clients)."""
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


def _client(address: str):
    """A Jobs SDK client, once the dashboard answers. The SDK reads RAY_AUTH_MODE and the token
    path from this process's environment (the test sets them like the head's)."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 90
    while True:
        try:
            return JobSubmissionClient(address)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _submit(client, deadline_s: float = 90, **kwargs) -> str:
    """Submit, retrying while the head's job agent is still registering."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_submitted_annotate_job_succeeds_and_writes_every_sampled_row(ray_head, tmp_path,
                                                                     monkeypatch):
    address, env = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", env["RAY_AUTH_MODE"])
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", env["RAY_AUTH_TOKEN_PATH"])
    from ray.job_submission import JobStatus

    client = _client(address)
    out = tmp_path / "runs"
    data_dir = os.environ.get("LAMBERT_DATA_DIR", str((ROOT / ".." / "shared" / "data").resolve()))
    job_env = {"HF_HUB_OFFLINE": "1", "LAMBERT_DATA_DIR": data_dir,
               "HF_HOME": os.environ.get("HF_HOME", str(ROOT / ".cache" / "hf")),
               "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                      str(ROOT / ".cache" / "torch_ext"))}
    job_id = _submit(
        client,
        entrypoint=("python jobs/annotate.py --config configs/ag_news_smollm2.yaml "
                    f"--set run.output_dir={out} --set run.name=job "
                    "--set data.annotate_sample=12 --set data.llm_eval_limit=8"),
        runtime_env={"working_dir": str(ROOT), "env_vars": job_env,
                     "excludes": [".git", ".venv", ".cache", "runs"]},
        submission_id=f"lambert_test_{int(time.time())}",
    )

    deadline = time.monotonic() + 780
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(3)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id}: {status}\n{logs[-4000:]}"

    annotate_dir = out / "job" / "annotate"
    labelled = pads.dataset(str(annotate_dir), format="parquet").to_table()
    assert labelled.num_rows == 12
    assert len(set(labelled.column("row_id").to_pylist())) == 12
    done = json.loads((annotate_dir / "_COMPLETE.json").read_text())
    assert done["counts"]["rows_in"] == done["counts"]["rows_ok"] + done["counts"]["rows_errored"] == 12
