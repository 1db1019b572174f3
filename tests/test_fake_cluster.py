"""The fake multi-node cluster derived from the launcher YAMLs (no Ray cluster started): same
node types, GPUs, custom resources and spot markers; CPUs scaled so every stage of the cluster
config fits exactly the node types it fits on the real cluster. And which node types Ray's
autoscaler itself would launch for the cluster config's pending actors and Train workers (its
scheduling function on the real YAMLs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from lambert_ray.config import load_config
from lambert_ray.fake_cluster import HEAD_TYPE, fake_autoscaling_config, is_spot, scaled_cpus

ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = ["cluster/aws-gpu.yaml", "cluster/gcp-gpu.yaml"]
SCALE = 1 / 8


def _derive(path: str, **kw) -> tuple[dict, dict]:
    launcher = yaml.safe_load((ROOT / path).read_text())
    return launcher, fake_autoscaling_config(launcher, gcs_address="127.0.0.1:1", control_dir="/x",
                                             cpu_scale=SCALE, **kw)


def _fits(shape: dict, resources: dict) -> bool:
    return all(resources.get(k, 0) >= v for k, v in shape.items() if v)


@pytest.mark.parametrize("path", LAUNCHERS)
def test_fake_cluster_passes_rays_schema_validation(path):
    _, cfg = _derive(path)
    validate_config(prepare_config(cfg))


@pytest.mark.parametrize("path", LAUNCHERS)
def test_fake_types_keep_gpus_custom_resources_and_spot_labels(path):
    launcher, cfg = _derive(path)
    real = {n: t for n, t in launcher["available_node_types"].items() if n != launcher["head_node_type"]}
    fake = {n: t for n, t in cfg["available_node_types"].items() if n != HEAD_TYPE}
    assert fake.keys() == real.keys()
    for name, t in real.items():
        res = fake[name]["resources"]
        assert {k: v for k, v in res.items() if k != "CPU"} == \
               {k: v for k, v in t["resources"].items() if k != "CPU"}
        assert res["CPU"] == pytest.approx(t["resources"]["CPU"] * SCALE)
        assert fake[name]["labels"]["node-type"] == name
        assert fake[name]["labels"]["market"] == ("spot" if is_spot(t["node_config"]) else "on-demand")
    assert cfg["available_node_types"][HEAD_TYPE]["resources"].get("GPU", 0) == 0


@pytest.mark.parametrize("path", LAUNCHERS)
def test_fake_types_scale_from_zero_with_capped_max_and_short_idle_timeout(path):
    _, cfg = _derive(path, max_workers_cap=2, idle_timeout_s=15)
    workers = [t for n, t in cfg["available_node_types"].items() if n != HEAD_TYPE]
    assert all(t["min_workers"] == 0 and 1 <= t["max_workers"] <= 2 for t in workers)
    assert cfg["idle_timeout_minutes"] == pytest.approx(0.25)
    assert cfg["provider"]["gcs_address"] == "127.0.0.1:1"  # not the default 6379


@pytest.mark.parametrize("path", LAUNCHERS)
def test_every_fake_worker_type_keeps_at_least_one_cpu(path):
    """Ray's autoscaler scores node types only on resources >= 1: a node type scaled below one
    CPU loses its CPU match and the scorer then prefers the 8-GPU trainer for annotate actors
    (seen at cpu_scale 1/16)."""
    _, cfg = _derive(path)
    assert all(t["resources"]["CPU"] >= 1 for t in cfg["available_node_types"].values())


@pytest.mark.parametrize("path", LAUNCHERS)
def test_rehearsal_config_fits_the_same_node_types_as_the_cluster_config(path):
    launcher, cfg = _derive(path)
    prod = load_config(ROOT / "configs/imdb_llama2-7b_qlora_cluster.yaml")
    small = load_config(ROOT / "configs/ag_news_smollm2_fake_cluster.yaml")
    real = launcher["available_node_types"]
    fake = cfg["available_node_types"]
    head = launcher["head_node_type"]
    for stage in ("annotate", "classify"):
        p, s = getattr(prod, stage), getattr(small, stage)
        assert (s.num_gpus, s.accelerator_type) == (p.num_gpus, p.accelerator_type)
        assert s.num_cpus == scaled_cpus(p.num_cpus, SCALE)
    # The GPUs are fake: every stage computes on CPU.
    assert small.llm.device == small.classify.compute_device == "cpu"
    assert small.bert.use_gpu == prod.bert.use_gpu and small.bert.compute_device == "cpu"
    assert small.bert.cpus_per_worker == scaled_cpus(prod.bert.cpus_per_worker, SCALE)
    shapes = {
        "annotate": ({"CPU": prod.annotate.num_cpus, "GPU": prod.annotate.num_gpus},
                     {"CPU": small.annotate.num_cpus, "GPU": small.annotate.num_gpus}),
        "classify": ({"CPU": prod.classify.num_cpus, "GPU": prod.classify.num_gpus},
                     {"CPU": small.classify.num_cpus, "GPU": small.classify.num_gpus}),
        "train": ({"CPU": prod.bert.cpus_per_worker, "GPU": 1},
                  {"CPU": small.bert.cpus_per_worker, "GPU": 1}),
    }
    for stage, (p_shape, s_shape) in shapes.items():
        on_real = {n for n, t in real.items() if n != head and _fits(p_shape, t["resources"])}
        on_fake = {n for n, t in fake.items() if n != HEAD_TYPE and _fits(s_shape, t["resources"])}
        assert on_real == on_fake, stage
        assert on_real, stage


# ---------------------------------------------------------------- Ray's choice of node type


def _nodes_to_add(types: dict, head: str, demands: list[dict]) -> dict[str, int]:
    """What Ray's (v1) autoscaler launches for these pending resource demands, from scratch."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_nodes_for,
    )

    def scorer(node_resources, resources, node_type):
        return _default_utilization_scorer(
            node_resources, resources, node_type,
            node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))

    added, _ = get_nodes_for(types, {}, head, 100, demands, scorer)
    return dict(added)


def _pool_shape(stage) -> dict:
    return {"CPU": stage.num_cpus, "GPU": stage.num_gpus, **stage.resources}


@pytest.mark.parametrize("path", LAUNCHERS)
def test_autoscaler_adds_only_one_gpu_spot_nodes_for_any_burst_of_pool_actors(path):
    """Up to max_actors annotate / classify actors pending at once (a Ray Data pool scaling up):
    the autoscaler launches only 1-GPU spot types, never the 8-GPU training node."""
    launcher = yaml.safe_load((ROOT / path).read_text())
    types, head = launcher["available_node_types"], launcher["head_node_type"]
    spot_1gpu = {n for n, t in types.items()
                 if t["resources"].get("GPU") == 1 and is_spot(t["node_config"])}
    prod = load_config(ROOT / "configs/imdb_llama2-7b_qlora_cluster.yaml")
    for stage in (prod.annotate, prod.classify):
        for k in range(1, stage.max_actors + 1):
            added = _nodes_to_add(types, head, [_pool_shape(stage)] * k)
            assert added and set(added) <= spot_1gpu, (k, added)
    workers = [{"CPU": prod.bert.cpus_per_worker, "GPU": 1}] * prod.bert.num_workers
    assert _nodes_to_add(types, head, workers) == {"gpu_a100_train": 1}


@pytest.mark.parametrize("path", LAUNCHERS)
def test_without_spot_gpu_five_pending_annotate_actors_bring_up_the_training_node(path):
    """Why the pools ask for spot_gpu: on shape alone ({GPU: 1, CPU: 4}) Ray's scorer prefers
    the 8xA100 node once 5 actors are pending (it fills more of it)."""
    launcher = yaml.safe_load((ROOT / path).read_text())
    types, head = launcher["available_node_types"], launcher["head_node_type"]
    shape = {"CPU": 4, "GPU": 1}
    assert set(_nodes_to_add(types, head, [shape] * 4)) <= {"gpu_l4_spot", "gpu_a10g_spot"}
    assert "gpu_a100_train" in _nodes_to_add(types, head, [shape] * 5)


def test_spot_pools_retry_batches_until_their_actor_restarts_run_out():
    """A spot node lost without notice leaves its actor unreachable until the GCS declares the
    node dead; Ray spends a bounded `max_task_retries` in that window (4 were gone in 17 s in
    the rehearsed reclaim, and the job failed). The cluster pools retry without a count and
    stay bounded by max_restarts; the rehearsal config asks for the same."""
    prod = load_config(ROOT / "configs/imdb_llama2-7b_qlora_cluster.yaml")
    small = load_config(ROOT / "configs/ag_news_smollm2_fake_cluster.yaml")
    for cfg in (prod, small):
        for pool in (cfg.annotate, cfg.classify):
            assert pool.max_task_retries == -1 and 1 <= pool.max_restarts < 100
