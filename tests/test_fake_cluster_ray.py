"""The short CI version of the autoscaling rehearsal (the full one, with the pipeline as a Ray job,
is scripts/autoscale_rehearsal.py; its results are in results/autoscale/).

A fake multi-node cluster derived from cluster/aws-gpu.yaml, on 127.0.0.1 with its own ports,
temp dir and token. A driver (a subprocess, so no other Ray of this pytest session interferes)
creates one actor of the cluster config's annotate shape and a Train-worker-shaped actor; the
test reads from Ray's state API where they ran, reclaims the annotate actor's node through the
provider while the actor runs, and checks the actor comes back on a replacement node and that
idle GPU nodes go away. Then one more node is requested and the head is stopped while it runs:
no process of the head or its fake nodes may be left (by marker variable and by temp dir).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from lambert_ray.config import load_config
from lambert_ray.fake_cluster import fake_autoscaling_config, scaled_cpus
from lambert_ray.fake_head import FakeClusterHead, marked_pids

ROOT = Path(__file__).resolve().parent.parent
SCALE = 1 / 8
IDLE_S = 10

DRIVER = r"""
import json, sys, time
import ray
ann, train, ctl = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
ray.init(address="auto", log_to_driver=False)

@ray.remote
class Worker:
    def where(self):
        return ray.get_runtime_context().get_node_id()

a = Worker.options(num_cpus=ann["CPU"], num_gpus=ann["GPU"], resources=ann["res"],
                   max_restarts=ann["max_restarts"], max_task_retries=ann["max_task_retries"]).remote()
first = ray.get(a.where.remote(), timeout=300)
print(json.dumps({"annotate_node": first}), flush=True)
open(f"{ctl}/reclaim/{first}", "w").close()          # spot reclaim through the provider
deadline = time.time() + 300
while True:                                           # the actor restarts on a new node
    try:
        second = ray.get(a.where.remote(), timeout=60)
        if second != first:
            break
    except Exception:
        pass
    if time.time() > deadline:
        raise TimeoutError("annotate actor not back after the reclaim")
    time.sleep(1)
t = Worker.options(num_cpus=train["CPU"], num_gpus=1).remote()
print(json.dumps({"annotate_node_after": second, "train_node": ray.get(t.where.remote(), timeout=300)}))
"""


# Asks the autoscaler for one annotate-shaped node and waits until it is up (then exits; the
# request stays), so that the head is stopped with a fake node running.
KEEP_A_NODE = r"""
import json, sys, time
import ray
from ray.autoscaler.sdk import request_resources
ann = json.loads(sys.argv[1])
ray.init(address="auto", log_to_driver=False)
request_resources(bundles=[{"CPU": ann["CPU"], "GPU": ann["GPU"], **ann["res"]}])
deadline = time.time() + 300
while not any(n["Alive"] and n["Resources"].get("GPU") for n in ray.nodes()):
    if time.time() > deadline:
        raise TimeoutError("no GPU node came up for request_resources")
    time.sleep(1)
"""


# The state API is queried from a subprocess with the head's environment: a Ray client in this
# pytest process keeps the auth mode of the first Ray it met (the suite's local Ray, no token).
NODES = r"""
import json, sys
from ray.util.state import list_nodes
print(json.dumps([{"node_id": n.node_id, "labels": dict(n.labels or {}), "state": n.state,
                   "gpus": (n.resources_total or {}).get("GPU", 0)}
                  for n in list_nodes(address=sys.argv[1], detail=True, limit=1000)]))
"""


def _labels_by_node(head: FakeClusterHead) -> dict[str, dict]:
    proc = subprocess.run([sys.executable, "-c", NODES, head.dashboard], env=head.env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {n.pop("node_id"): n for n in json.loads(proc.stdout.splitlines()[-1])}


@pytest.mark.ray
# ~70 s on the 2-core box at load average 4-10; the fake nodes' start waits out a loaded
# machine (lambert_ray/spot_provider.py, fake_head.PATIENT_RAY), hence the long guard.
@pytest.mark.timeout(900)
def test_fake_cluster_places_scales_reclaims_and_removes_idle_nodes():
    # A short work dir: Ray's socket paths under it must stay below AF_UNIX's 107 bytes.
    tmp_path = Path(tempfile.mkdtemp(prefix="lr_fc_", dir="/tmp"))
    launcher = yaml.safe_load((ROOT / "cluster/aws-gpu.yaml").read_text())
    control = tmp_path / "control"
    cfg = fake_autoscaling_config(launcher, gcs_address="set-by-head", control_dir=str(control),
                                  cpu_scale=SCALE, idle_timeout_s=IDLE_S,
                                  only_types=["gpu_l4_spot", "gpu_a100_train"])
    prod = load_config(ROOT / "configs/imdb_llama2-7b_qlora_cluster.yaml")
    ann = {"CPU": scaled_cpus(prod.annotate.num_cpus, SCALE), "GPU": prod.annotate.num_gpus,
           "res": prod.annotate.resources, "max_restarts": prod.annotate.max_restarts,
           "max_task_retries": prod.annotate.max_task_retries}
    train = {"CPU": scaled_cpus(prod.bert.cpus_per_worker, SCALE)}
    head = FakeClusterHead(cfg, tmp_path / "head")
    head.start()
    try:
        before = _labels_by_node(head)
        assert not [n for n in before.values() if n["gpus"] and n["state"] == "ALIVE"]
        proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(ann), json.dumps(train),
                               str(control)], env=dict(head.env, RAY_ADDRESS=head.gcs_address),
                              capture_output=True, text=True, timeout=800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        seen = {k: v for d in lines for k, v in d.items()}
        nodes = _labels_by_node(head)
        node_type = {i: n["labels"].get("node-type") for i, n in nodes.items()}
        assert node_type[seen["annotate_node"]] == "gpu_l4_spot"
        assert node_type[seen["annotate_node_after"]] == "gpu_l4_spot"
        assert seen["annotate_node_after"] != seen["annotate_node"]
        assert node_type[seen["train_node"]] == "gpu_a100_train"
        events = [json.loads(x) for x in (control / "events.jsonl").read_text().splitlines()]
        assert {"event": "terminate", "node_id": seen["annotate_node"], "reason": "spot-reclaim"} \
            .items() <= next(e for e in events if e["event"] == "terminate"
                             and e["node_id"] == seen["annotate_node"]).items()
        # The driver has exited: every GPU node is idle and goes after the idle timeout.
        deadline = time.monotonic() + IDLE_S + 90
        while time.monotonic() < deadline:
            alive = [i for i, n in _labels_by_node(head).items()
                     if n["gpus"] and n["state"] == "ALIVE"]
            if not alive:
                break
            time.sleep(2)
        assert not alive, f"GPU nodes still up {IDLE_S + 90} s after the driver exited: {alive}"
        # Stopping the head with a fake node up stops the node's raylet too.
        proc = subprocess.run([sys.executable, "-c", KEEP_A_NODE, json.dumps(ann)],
                              env=dict(head.env, RAY_ADDRESS=head.gcs_address),
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        head.stop()
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert not marked_pids(head.marker)
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit()
                and str(tmp_path).encode() in _cmdline(p)]


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""
