"""Ray's fake multi-node provider with spot reclaims and a node log, for autoscaling rehearsals.

The autoscaler (on the head, `ray start --autoscaling-config`) loads this class through
`provider: {type: external, module: lambert_ray.spot_provider.SpotReclaimProvider}` (see
`fake_cluster.fake_autoscaling_config`). It behaves like `FakeMultiNodeProvider` (each node a
local raylet with the node type's resources and labels; here each with its own runtime_env
directory) and adds, under `control_dir`:

* `events.jsonl`: one line per launch / terminate: time, node id (= the Ray node id), node type,
  and why (`autoscaler` or `spot-reclaim`);
* spot reclaims: a file `reclaim/<node_id>` asks the provider to terminate that node the way a
  cloud takes a spot VM back: its processes are killed without a drain, and the node disappears
  from the provider's node list. The provider checks for requests every time the autoscaler polls
  it (each `AUTOSCALER_UPDATE_INTERVAL_S`);
* a patient node start: Ray's `Node()` gives a new raylet a fixed 30 s to register with the GCS,
  which a loaded small machine misses (the previous rehearsals logged 21-39 failed launches in a
  row). Here a node that missed it keeps its processes and gets up to `register_timeout_s`
  (provider config, default 300) in all before the launch counts as failed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import ray
import ray._private.node
import ray._private.parameter
import ray._private.ray_constants as ray_constants
import ray._private.services
from ray._common.network_utils import build_address
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from lambert_ray.fake_head import free_ports


def _children() -> set[int]:
    """Pids of this process's children (a fake node's processes are started from here)."""
    me, kids = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        kids.add(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return kids


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class _PatientNode(ray._private.node.Node):
    """A worker `Node` that leaves itself in `started` once its processes run, so that a node
    whose raylet missed `Node()`'s 30 s registration window can still be waited for (and
    killed: `kill_all_processes` needs the object)."""

    started: list[_PatientNode] = []

    def start_ray_processes(self):
        _PatientNode.started.append(self)
        super().start_ray_processes()


def _start_node(params, node_id: str, gcs: str, register_timeout_s: float):
    """`Node(params)`, waiting up to `register_timeout_s` for its raylet to register."""
    t0 = time.monotonic()
    _PatientNode.started.clear()
    try:
        return _PatientNode(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    except Exception:
        if not _PatientNode.started:
            raise
        node = _PatientNode.started[0]
        raylet = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [None])[0]
        while time.monotonic() - t0 < register_timeout_s:
            if raylet is None or raylet.process.poll() is not None:
                break  # the raylet died starting (e.g. its agents missed their port window)
            try:
                ray._private.services.get_node(gcs, node_id)
                return node
            except Exception:  # not registered yet, or the GCS did not answer in time
                time.sleep(1)
        node.kill_all_processes(check_alive=False, allow_graceful=False)
        raise


class SpotReclaimProvider(FakeMultiNodeProvider):
    def __init__(self, provider_config, cluster_name):
        super().__init__(provider_config, cluster_name)
        self._control = provider_config["control_dir"]
        self._register_timeout_s = float(provider_config.get("register_timeout_s", 300))
        self._launch_lock = threading.Lock()
        os.makedirs(os.path.join(self._control, "reclaim"), exist_ok=True)

    def _log(self, event: str, node_id: str, node_type: str, reason: str, **extra) -> None:
        with open(os.path.join(self._control, "events.jsonl"), "a") as f:
            f.write(json.dumps({"t": time.time(), "event": event, "node_id": node_id,
                                "node_type": node_type, "reason": reason, **extra}) + "\n")

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        """The fake provider's node start, with one change: each node gets its own runtime_env
        directory. Fake nodes share the head's session dir, and a node that goes away deletes
        the job's unpacked working_dir from the shared `runtime_resources/`, under the feet of
        the driver and every other node's workers (seen as oneMKL "Cannot load libtorch_cpu.so"
        crashes right after an idle node was removed)."""
        resources = dict(resources)
        node_type = tags[TAG_RAY_USER_NODE_TYPE]
        with self.lock:
            node_id = self._next_hex_node_id()
        gcs = self._gcs_address or build_address(ray._private.services.get_node_ip_address(), 6379)
        # The agents' ports are given, not left to them (0): with 0 the raylet waits a fixed
        # ~15 s for the dashboard agent to write its port files and aborts when it is late,
        # which a loaded machine made the usual failed launch.
        agent, export, listen, env_agent = free_ports(4)
        params = ray._private.parameter.RayParams(
            min_worker_port=0, max_worker_port=0, dashboard_port=None,
            metrics_agent_port=agent, metrics_export_port=export,
            dashboard_agent_listen_port=listen, runtime_env_agent_port=env_agent,
            num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
            object_store_memory=resources.pop("object_store_memory", None),
            resources=resources, labels=labels, redis_address=gcs, gcs_address=gcs,
            runtime_env_dir_name=f"runtime_resources_{node_id[-5:]}",
            env_vars={"RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id,
                      "RAY_CLOUD_INSTANCE_ID": node_id, "RAY_NODE_TYPE_NAME": node_type,
                      ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                      ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels)})
        # Launches are serialised (the new children are this launch's), but not under
        # self.lock: the autoscaler's polls and reclaims go on while a slow node starts.
        with self._launch_lock:
            before = _children()
            t0 = time.time()
            try:
                node = _start_node(params, node_id, gcs, self._register_timeout_s)
            except Exception:
                # Not registered even after register_timeout_s: stop whatever was started
                # (raylet, agents, log monitor: it would join later, unknown to the
                # autoscaler); the autoscaler retries the launch.
                _kill(_children() - before)
                self._log("launch-failed", node_id, node_type, "raylet did not register",
                          after_s=round(time.time() - t0, 1))
                raise
        with self.lock:
            self._nodes[node_id] = {"tags": {TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
                                             TAG_RAY_USER_NODE_TYPE: node_type,
                                             TAG_RAY_NODE_NAME: node_id,
                                             TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE, **tags},
                                    "node": node}
            self._log("launch", node_id, node_type, "autoscaler",
                      start_s=round(time.time() - t0, 1))

    def terminate_node(self, node_id, reason: str = "autoscaler"):
        with self.lock:
            node_type = self._nodes.get(node_id, {}).get("tags", {}).get(TAG_RAY_USER_NODE_TYPE, "?")
            super().terminate_node(node_id)
            self._log("terminate", node_id, node_type, reason)

    def _terminate_node(self, node):
        # A reclaimed VM gets no graceful shutdown; the autoscaler's own terminations do.
        node["node"].kill_all_processes(check_alive=False,
                                        allow_graceful=not node.get("reclaimed", False))

    def _reclaim_requested(self) -> None:
        req_dir = os.path.join(self._control, "reclaim")
        for node_id in os.listdir(req_dir):
            os.remove(os.path.join(req_dir, node_id))
            with self.lock:
                if node_id in self._nodes:
                    self._nodes[node_id]["reclaimed"] = True
                    self.terminate_node(node_id, reason="spot-reclaim")

    def non_terminated_nodes(self, tag_filters):
        self._reclaim_requested()
        return super().non_terminated_nodes(tag_filters)
