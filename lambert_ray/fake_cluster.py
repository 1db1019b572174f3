"""A launcher YAML's node types as Ray's local fake multi-node autoscaling cluster.

    cfg = fake_autoscaling_config(yaml.safe_load(open("cluster/aws-gpu.yaml")),
                                  gcs_address="127.0.0.1:40123", control_dir="/tmp/x/control")

Ray's `fake_multinode` provider starts each "node" as one more local raylet that declares the
node type's resources, fake GPUs included; the autoscaler launches and terminates them exactly as
it would cloud VMs. This module writes that autoscaling config from `available_node_types`:

* every worker type keeps its GPUs and custom resources (`accelerator_type:L4`, ...) and gets
  labels (`node-type`, `market`: spot / on-demand, `accelerator`), so a placement can be read
  back from Ray's state API;
* CPUs are multiplied by `cpu_scale` (default 1/8: an L4 node's 8 vCPUs become 1, the 8xA100
  node's 96 become 12), because the fake nodes share one small machine. A job rehearsed on it
  scales its CPU requests by the same factor (`scaled_cpus`), so what fits where is unchanged:
  annotate's 4 CPUs -> 0.5 fit an L4 node (1), a Train worker's 10 -> 1.25 do not. No node
  type may go below 1 CPU: Ray's autoscaler scores node types only on resources >= 1, so a
  0.5-CPU L4 type loses its CPU match and the 8-GPU trainer wins annotate actors (seen at 1/16);
* the head keeps its real CPU count (it runs the driver and Ray Data's read/write tasks);
* `max_workers` per type is capped (`max_workers_cap`) and idle nodes go after `idle_timeout_s`.

The provider is `lambert_ray.spot_provider.SpotReclaimProvider` (the fake provider plus a spot
reclaim on request and a launch/terminate log), connected to the head's GCS at `gcs_address`.
Ray-free: only dicts in, dicts out.
"""

from __future__ import annotations

import math
from typing import Any

HEAD_TYPE = "ray.head.default"  # the head node type name the fake provider uses
PROVIDER_MODULE = "lambert_ray.spot_provider.SpotReclaimProvider"
DEFAULT_CPU_SCALE = 1 / 8


def scaled_cpus(cpus: float, cpu_scale: float = DEFAULT_CPU_SCALE) -> float:
    """A CPU count on the fake cluster (rounded to Ray's 1e-4 resource granularity)."""
    return math.floor(cpus * cpu_scale * 1e4) / 1e4


def is_spot(node_config: dict[str, Any]) -> bool:
    """Spot / preemptible, as AWS (InstanceMarketOptions) or GCP (scheduling) marks it."""
    aws = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    sched = node_config.get("scheduling", {})
    gcp = sched.get("provisioningModel") == "SPOT" or sched.get("preemptible") is True
    return aws or gcp


def node_labels(name: str, node_type: dict[str, Any]) -> dict[str, str]:
    """Labels the fake node carries: its type, spot or on-demand, and its accelerator."""
    labels = {"node-type": name, "market": "spot" if is_spot(node_type.get("node_config", {}))
              else "on-demand"}
    accel = [k.split(":", 1)[1] for k in node_type.get("resources", {})
             if k.startswith("accelerator_type:")]
    if accel:
        labels["accelerator"] = accel[0]
    return labels


def fake_node_type(name: str, node_type: dict[str, Any], *, cpu_scale: float,
                   max_workers_cap: int) -> dict[str, Any]:
    """One worker type of the fake cluster: same GPUs / custom resources, scaled CPUs."""
    res = dict(node_type.get("resources", {}))
    if "CPU" in res:
        res["CPU"] = scaled_cpus(res["CPU"], cpu_scale)
    return {
        "resources": res,
        "labels": {**node_labels(name, node_type), **node_type.get("labels", {})},
        "node_config": {},
        "min_workers": int(node_type.get("min_workers", 0)),
        "max_workers": min(int(node_type.get("max_workers", max_workers_cap)), max_workers_cap),
    }


def fake_autoscaling_config(launcher: dict[str, Any], *, gcs_address: str, control_dir: str,
                            cpu_scale: float = DEFAULT_CPU_SCALE, max_workers_cap: int = 2,
                            idle_timeout_s: float = 15,
                            only_types: list[str] | None = None) -> dict[str, Any]:
    """The fake-multinode autoscaling config for `ray start --head --autoscaling-config`.

    `launcher`: a parsed cluster launcher YAML (`available_node_types`, `head_node_type`).
    `only_types`: keep just these worker types (None: all). Raises KeyError on an unknown name.
    """
    types = launcher["available_node_types"]
    head_name = launcher["head_node_type"]
    workers = {n: t for n, t in types.items() if n != head_name}
    if only_types is not None:
        workers = {n: workers[n] for n in only_types}
    node_types = {n: fake_node_type(n, t, cpu_scale=cpu_scale, max_workers_cap=max_workers_cap)
                  for n, t in workers.items()}
    head = types[head_name]
    node_types[HEAD_TYPE] = {"resources": dict(head.get("resources", {})),
                             "labels": node_labels(head_name, head),
                             "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": f"{launcher.get('cluster_name', 'cluster')}-fake",
        "max_workers": sum(t["max_workers"] for n, t in node_types.items() if n != HEAD_TYPE),
        "upscaling_speed": float(launcher.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {
            "type": "external",
            "module": PROVIDER_MODULE,
            "gcs_address": gcs_address,  # else fake workers dial port 6379 whatever the head's is
            "control_dir": control_dir,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "use_node_id_as_ip": True,
        },
        "available_node_types": node_types,
        "head_node_type": HEAD_TYPE,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }

