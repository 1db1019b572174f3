"""Start and stop a local autoscaling Ray head (fake multi-node), touching no other Ray.

    with FakeClusterHead(autoscaling_config, work_dir) as head:
        head.dashboard   # http://127.0.0.1:<port>, for the Jobs SDK and the state API
        head.env         # environment for clients (token auth, temp dir)

The head runs `RAY_FAKE_CLUSTER=1 ray start --head --block` in its own session, on 127.0.0.1,
with every port picked free, its own temp dir and its own auth token. Its autoscaler starts the
fake worker nodes as more local raylets. Stopping: SIGTERM to the head's process group, then
SIGKILL to every process that carries this head's marker variable (`LAMBERT_FAKE_CLUSTER_ID`,
inherited by the autoscaler, its fake nodes and all their workers): `ray stop` would stop every
Ray on the machine, and a stopped `--block` head leaves its fake nodes' raylets running.
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
import uuid
from pathlib import Path

import yaml

from lambert_ray.fake_cluster import HEAD_TYPE

MARKER = "LAMBERT_FAKE_CLUSTER_ID"
# Ray's timeouts for a whole cluster squeezed onto one small, shared machine (every process of
# this head reads them: RAY_<name> is Ray's system config). With the defaults, a starved box
# failed jobs with "Failed to startup worker" (60 s registration), GCS connections timed out
# (5 s), and a slow raylet risks being declared dead when one health check takes over 10 s.
# The health checks' count and period stay Ray's: they decide how soon a reclaimed (killed)
# node is known dead, part of what a spot reclaim costs.
PATIENT_RAY = {"RAY_worker_register_timeout_seconds": "600",
               "RAY_gcs_rpc_server_connect_timeout_s": "60",
               "RAY_gcs_rpc_server_reconnect_timeout_s": "600",
               "RAY_health_check_timeout_ms": "60000"}
PORT_FLAGS = ["--port", "--dashboard-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
              "--ray-client-server-port", "--node-manager-port", "--object-manager-port"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def marked_pids(marker_value: str) -> list[int]:
    """Pids of processes whose environment holds MARKER=marker_value (this head's tree)."""
    needle = f"{MARKER}={marker_value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class FakeClusterHead:
    """A fake multi-node head; `autoscaling_config` gets the GCS address from `gcs_port`."""

    def __init__(self, autoscaling_config: dict, work_dir: str | Path, head_cpus: int = 2,
                 update_interval_s: int = 1, extra_env: dict[str, str] | None = None):
        self.work = Path(work_dir)
        if len(str(self.work)) > 36:  # + "/ray/session_<date>_<pid>/sockets/plasma_store"
            raise ValueError(f"work_dir {self.work} is too long: Ray's socket paths under it "
                             "must stay below AF_UNIX's 107 bytes (use a short dir under /tmp)")
        self.work.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        self.gcs_address = f"127.0.0.1:{self.ports['--port']}"
        self.dashboard = f"http://127.0.0.1:{self.ports['--dashboard-port']}"
        self.marker = uuid.uuid4().hex
        self.config = autoscaling_config
        self.config["provider"]["gcs_address"] = self.gcs_address
        self.head_cpus = head_cpus
        token = self.work / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        venv_bin = str(Path(sys.executable).parent)
        self.env = dict(os.environ, RAY_TMPDIR=str(self.work / "ray"), RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN_PATH=str(token), PATH=f"{venv_bin}:{os.environ['PATH']}",
                        **{**PATIENT_RAY, **(extra_env or {})})
        self.env.pop("RAY_ADDRESS", None)
        self._head_env = dict(self.env, RAY_FAKE_CLUSTER="1",
                              AUTOSCALER_UPDATE_INTERVAL_S=str(update_interval_s),
                              **{MARKER: self.marker})
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180, attempts: int = 3) -> FakeClusterHead:
        """Start the head; retried with fresh ports when it does not come up (on a loaded
        machine the raylet can miss `ray start`'s fixed 30 s registration window)."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout_s)
            except RuntimeError:
                if attempt == attempts:
                    raise
                self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
                self.gcs_address = f"127.0.0.1:{self.ports['--port']}"
                self.dashboard = f"http://127.0.0.1:{self.ports['--dashboard-port']}"
                self.config["provider"]["gcs_address"] = self.gcs_address
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> FakeClusterHead:
        cfg_path = self.work / "autoscaling.yaml"
        cfg_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        (self.work / "ray").mkdir(exist_ok=True)
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
               "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
               "--num-cpus", str(self.head_cpus), "--num-gpus", "0", "--labels",
               ",".join(f"{k}={v}" for k, v in self.config["available_node_types"]
                        .get(HEAD_TYPE, {}).get("labels", {}).items()),
               f"--autoscaling-config={cfg_path}", "--temp-dir", str(self.work / "ray"),
               "--disable-usage-stats", *[str(x) for kv in self.ports.items() for x in kv]]
        log_path = self.work / "head.log"
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, env=self._head_env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        # Up: `ray start` reported success (its raylet registered) and the dashboard answers.
        while not ("Ray runtime started" in log_path.read_text() and self._dashboard_up()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = log_path.read_text()[-3000:]
                self.stop()
                raise RuntimeError(f"ray head did not come up in {timeout_s}s: {log}")
            time.sleep(1)
        return self

    def _dashboard_up(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2):
                return True
        except urllib.error.HTTPError:  # 401 without the token: the dashboard answers
            return True
        except OSError:
            return False

    def stop(self, grace_s: float = 20) -> list[int]:
        """Stop the head and everything it started; returns the pids killed after the grace
        (`killed_names`: their process names)."""
        self.killed_names: dict[int, str] = {}
        if self.proc is None:
            return []
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.5)
        killed: list[int] = []
        for _ in range(30):  # repeated: a process may be forking (a worker, a fake node) meanwhile
            left = marked_pids(self.marker)
            if not left:
                break
            for pid in left:
                if pid not in killed:
                    self.killed_names[pid] = _comm(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed += [p for p in left if p not in killed]
            time.sleep(1)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:  # a killed process with many threads can take a while to go on a loaded box
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        self.proc = None
        return killed

    def __enter__(self) -> FakeClusterHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> str:
        return json.dumps({"gcs": self.gcs_address, "dashboard": self.dashboard,
                           "temp_dir": str(self.work / "ray")})
