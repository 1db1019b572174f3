"""Offline checks of what `ray up`, `kubectl apply` and `ray job submit` would be given.

Launcher YAMLs go through Ray's own `prepare_config` + `validate_config` (ray-schema.json);
KubeRay manifests through a JSON schema of the ray.io/v1 CRD fields (kubeconform is not
available offline); the GPU pipeline config is checked against the node types it must land on.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from lambert_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = ["cluster/aws-gpu.yaml", "cluster/gcp-gpu.yaml"]
KUBERAY = ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"]
GPU_CONFIG = "configs/imdb_llama2-7b_qlora_cluster.yaml"
CPU_CONFIGS = ["configs/demo-sst2.yaml", "configs/ag_news_smollm2.yaml"]

# How each cloud marks a node type as spot / preemptible.
SPOT_MARKERS = {
    "aws": lambda nc: nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot",
    "gcp": lambda nc: nc.get("scheduling", {}).get("provisioningModel") == "SPOT",
}
# Secret-shaped strings: HF tokens, AWS access keys, private keys.
SECRET_PATTERNS = [re.compile(p) for p in (r"hf_[A-Za-z0-9]{20,}", r"AKIA[0-9A-Z]{16}",
                                           r"-----BEGIN [A-Z ]*PRIVATE KEY-----")]


def _load(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text())


def _worker_types(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def _fits(shape: dict[str, float], resources: dict[str, float], count: int = 1) -> bool:
    return all(resources.get(k, 0) >= v * count for k, v in shape.items() if v)


# ---------------------------------------------------------------- cluster launcher YAMLs


@pytest.mark.parametrize("path", LAUNCHERS)
def test_launcher_yaml_passes_rays_schema_validation(path):
    validate_config(prepare_config(_load(path)))


@pytest.mark.parametrize("path", LAUNCHERS)
def test_launcher_validation_rejects_a_misspelt_node_type_key(path):
    cfg = _load(path)
    worker = next(iter(_worker_types(cfg)))
    cfg["available_node_types"][worker]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.mark.parametrize("path", LAUNCHERS)
def test_launcher_has_cpu_head_and_autoscaling_spot_gpu_workers(path):
    cfg = _load(path)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert 0 < cfg["idle_timeout_minutes"] <= 30
    workers = _worker_types(cfg)
    for name, t in workers.items():
        assert 0 == t["min_workers"] < t["max_workers"], f"{name} must scale from zero"
    is_spot = SPOT_MARKERS[cfg["provider"]["type"]]
    annotators = {n: t for n, t in workers.items() if t["resources"].get("GPU") == 1}
    trainers = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 8}
    assert annotators and all(is_spot(t["node_config"]) for t in annotators.values())
    assert trainers and not any(is_spot(t["node_config"]) for t in trainers.values())
    assert cfg["max_workers"] >= sum(t["max_workers"] for t in workers.values()) // 2


@pytest.mark.parametrize("path", LAUNCHERS)
def test_launcher_installs_this_project_and_keeps_dashboard_on_localhost(path):
    cfg = _load(path)
    assert any("pip install" in c and "-e" in c for c in cfg["setup_commands"])
    assert "/home/ray/lambert_ray" in cfg["file_mounts"]
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])
    # The image's Ray must be the one pyproject.toml pins, or the job client and cluster differ.
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")


@pytest.mark.parametrize("path", LAUNCHERS)
def test_gpu_config_actors_fit_one_gpu_nodes_and_train_workers_only_the_training_node(path):
    cluster, pc = _load(path), load_config(ROOT / GPU_CONFIG)
    workers = _worker_types(cluster)
    one_gpu = {n: t["resources"] for n, t in workers.items() if t["resources"].get("GPU") == 1}
    multi_gpu = {n: t["resources"] for n, t in workers.items() if t["resources"].get("GPU", 0) > 1}

    for stage in (pc.annotate, pc.classify):
        shape = {"CPU": stage.num_cpus, "GPU": stage.num_gpus}
        assert stage.num_gpus > 0 and stage.max_actors > stage.min_actors
        assert all(_fits(shape, r) for r in one_gpu.values())
        # The autoscaler can add enough 1-GPU nodes for the whole pool.
        capacity = sum(workers[n]["max_workers"] * int(r["GPU"] / stage.num_gpus)
                       for n, r in one_gpu.items())
        assert capacity >= stage.max_actors

    for trainer in (pc.bert, pc.peft):
        assert trainer.use_gpu
        shape = {"CPU": trainer.cpus_per_worker, "GPU": 1}
        assert not any(_fits(shape, r) for r in one_gpu.values())
        assert any(_fits(shape, r, trainer.num_workers) for r in multi_gpu.values())

    # Concurrent Tune trials (one Train worker group each) fit the training node together.
    tune = pc.tune
    shape = {"CPU": tune.cpus_per_worker, "GPU": 1}
    assert tune.use_gpu and not any(_fits(shape, r) for r in one_gpu.values())
    assert any(_fits(shape, r, tune.num_workers * tune.max_concurrent_trials)
               for r in multi_gpu.values())


@pytest.mark.parametrize("path", CPU_CONFIGS)
def test_cpu_configs_ask_for_no_gpus_and_fit_two_cores(path):
    pc = load_config(ROOT / path)
    assert pc.annotate.num_gpus == pc.classify.num_gpus == 0 and not pc.bert.use_gpu
    assert pc.annotate.num_cpus * pc.annotate.max_actors <= 2
    assert pc.classify.num_cpus * pc.classify.max_actors <= 2
    assert pc.bert.cpus_per_worker * pc.bert.num_workers <= 2


# ---------------------------------------------------------------- KubeRay manifests


@pytest.fixture(scope="module")
def kuberay_schema() -> dict:
    return json.loads((ROOT / "cluster/kuberay/crd-subset.schema.json").read_text())


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("path", KUBERAY)
def test_kuberay_manifest_matches_crd_schema(path, kuberay_schema):
    jsonschema.validate(_load(path), kuberay_schema)


@pytest.mark.parametrize("path", KUBERAY)
def test_kuberay_schema_rejects_a_misspelt_worker_group_field(path, kuberay_schema):
    manifest = _load(path)
    _cluster_spec(manifest)["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, kuberay_schema)


@pytest.mark.parametrize("path", KUBERAY)
def test_kuberay_gpu_groups_autoscale_from_zero_with_whole_gpus(path):
    spec = _cluster_spec(_load(path))
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"] == res["limits"], "Ray sizes the node from the limits"
        gpus = int(res["limits"].get("nvidia.com/gpu", 0))
        if gpus:
            gpu_groups += 1
            assert group["template"]["spec"]["tolerations"]
    assert gpu_groups >= 2


def test_rayjob_entrypoint_runs_an_existing_job_script_and_config():
    spec = _load("cluster/kuberay/rayjob.yaml")["spec"]
    script, config = re.search(r"python (jobs/\S+\.py) --config (\S+)", spec["entrypoint"]).groups()
    assert (ROOT / script).is_file() and (ROOT / config).is_file()
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    assert spec["shutdownAfterJobFinishes"] is True


# ---------------------------------------------------------------- runtime env and secrets


def test_runtime_env_file_is_a_valid_ray_runtime_env():
    env = _load("jobs/runtime_env.yaml")
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    assert env["env_vars"]["HF_HUB_OFFLINE"] in ("0", "1")


def test_secret_env_vars_are_passed_by_name_only():
    env_vars = _load("jobs/runtime_env.yaml")["env_vars"]
    secret_like = {k: v for k, v in env_vars.items()
                   if re.search(r"(^|_)(TOKEN|SECRET|KEY|PASSWORD)(_|$)", k)}
    assert "HF_TOKEN" in secret_like
    for name, value in secret_like.items():
        assert value == f"${{{name}}}", f"{name} must reference the node's env, not hold a value"


@pytest.mark.parametrize("path", [*LAUNCHERS, *KUBERAY, "jobs/runtime_env.yaml", GPU_CONFIG])
def test_no_secret_values_in_shipped_yaml(path):
    text = (ROOT / path).read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"{path} holds something shaped like a secret"
