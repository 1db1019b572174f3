"""The autoscaling rehearsal's verdicts (scripts/autoscale_timeline.py), without Ray: a synthetic
run that placed, scaled and cleaned up as docs/cluster.md says passes, and each way a real run
can go wrong (a lost or doubled row, an actor on the wrong node type, a GPU node up before the
job or never removed, a process left after the head stopped) fails with its own sentence. The
spot-reclaim cost is computed from Ray's task attempts as documented."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

from lambert_ray.fake_cluster import fake_autoscaling_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from autoscale_timeline import check, summarize  # noqa: E402

HEAD = "f" * 51 + "00000"
L4, A100, L4B, L4C = ("f" * 51 + f"0000{i}" for i in range(1, 5))


def _node(node_id, ntype, state, gpus, start, end=None):
    return {"node_id": node_id, "state": state, "is_head": node_id == HEAD,
            "labels": {"node-type": ntype, "market": "spot" if "spot" in ntype else "on-demand"},
            "resources": {"CPU": 1, **({"GPU": gpus} if gpus else {})},
            "start_ms": start * 1000, "end_ms": end * 1000 if end else None}


def _actor(node_id, stage):
    return {"actor_id": f"{stage}-{node_id[-1]}", "class_name": stage, "state": "ALIVE",
            "node_id": node_id, "stage": stage}


def _counts(n):
    return {"rows_in": n, "rows_ok": n, "rows_errored": 0, "resumed_rows": 0}


@pytest.fixture
def good_run() -> dict:
    """Head alone; an L4 spot node for annotate; the A100 node for training; a fresh L4 for
    classify; every GPU node removed ~20 s after its last actor; 32 rows annotated once."""
    launcher = yaml.safe_load((ROOT / "cluster/aws-gpu.yaml").read_text())
    cfg = fake_autoscaling_config(launcher, gcs_address="127.0.0.1:1", control_dir="/x")
    head = _node(HEAD, "head_cpu", "ALIVE", 0, 0)
    l4 = _node(L4, "gpu_l4_spot", "ALIVE", 1, 30)
    a100 = _node(A100, "gpu_a100_train", "ALIVE", 8, 90)
    l4b = _node(L4B, "gpu_l4_spot", "ALIVE", 1, 150)
    dead = lambda n, t: {**n, "state": "DEAD", "end_ms": t * 1000}  # noqa: E731
    samples = [
        {"t": 5, "load1": 2.0, "nodes": [head], "actors": []},
        {"t": 50, "load1": 3.0, "nodes": [head, l4], "actors": [_actor(L4, "annotate")]},
        {"t": 100, "load1": 3.0, "nodes": [head, dead(l4, 80), a100],
         "actors": [_actor(A100, "train-bert")]},
        {"t": 160, "load1": 2.5, "nodes": [head, dead(l4, 80), dead(a100, 140), l4b],
         "actors": [_actor(L4B, "classify")]},
        {"t": 250, "load1": 2.0, "nodes": [head, dead(l4, 80), dead(a100, 140), dead(l4b, 190)],
         "actors": []},
    ]
    events = [{"t": 30, "event": "launch", "node_id": L4, "node_type": "gpu_l4_spot", "reason": "autoscaler"},
              {"t": 80, "event": "terminate", "node_id": L4, "node_type": "gpu_l4_spot", "reason": "autoscaler"},
              {"t": 90, "event": "launch", "node_id": A100, "node_type": "gpu_a100_train", "reason": "autoscaler"},
              {"t": 140, "event": "terminate", "node_id": A100, "node_type": "gpu_a100_train", "reason": "autoscaler"},
              {"t": 150, "event": "launch", "node_id": L4B, "node_type": "gpu_l4_spot", "reason": "autoscaler"},
              {"t": 190, "event": "terminate", "node_id": L4B, "node_type": "gpu_l4_spot", "reason": "autoscaler"}]
    stages = {"annotate": 32, "llm_eval": 16, "test/llm": 16, "classify": 32}
    return {"cluster": "cluster/aws-gpu.yaml", "name": "t", "reclaim": False, "cpu_scale": 0.125,
            "job_config": "configs/ag_news_smollm2_fake_cluster.yaml", "idle_timeout_s": 15,
            "fake_node_types": cfg["available_node_types"], "request_mismatches": [],
            "samples": samples, "provider_events": events, "t_start": 0, "t_submit": 10,
            "t_job_end": 200, "t_end": 250, "job_status": "SUCCEEDED", "annotate_sample": 32,
            "leftover_pids": [], "annotate_tasks": [],
            "outputs": {"annotate_rows": 32, "annotate_unique": 32,
                        "annotate/_COMPLETE.json": {"counts": _counts(32)},
                        "report.json": {"counts": {k: _counts(v) for k, v in stages.items()},
                                        "table": [{"setting": "llm"}]}}}


def _fails(obs: dict) -> list[str]:
    return check(obs, summarize(obs))


def test_a_run_as_documented_passes(good_run):
    assert _fails(good_run) == []
    s = summarize(good_run)
    assert s["actor_node_types"] == {"annotate": ["gpu_l4_spot"], "train-bert": ["gpu_a100_train"],
                                     "classify": ["gpu_l4_spot"]}
    assert [n["idle_before_removal_s"] for n in s["nodes"] if n["gpus"]] == [30, 40, 30]
    assert s["load1_range"] == [2.0, 3.0]


def test_a_duplicated_or_lost_annotate_row_fails(good_run):
    dup = copy.deepcopy(good_run)
    dup["outputs"]["annotate_rows"] = 33  # one row_id twice
    assert any("33 rows, 32 distinct" in f for f in _fails(dup))
    lost = copy.deepcopy(good_run)
    lost["outputs"].update(annotate_rows=31, annotate_unique=31)
    assert any("31 rows, 31 distinct" in f for f in _fails(lost))
    short = copy.deepcopy(good_run)  # the stage itself read fewer rows than sampled
    short["outputs"].update(annotate_rows=30, annotate_unique=30)
    short["outputs"]["annotate/_COMPLETE.json"]["counts"] = _counts(30)
    assert any("read 30 rows, the config samples 32" in f for f in _fails(short))


def test_an_annotate_actor_on_the_training_node_fails(good_run):
    obs = copy.deepcopy(good_run)
    obs["samples"][2]["actors"].append(_actor(A100, "annotate"))
    assert any(f.startswith("annotate actors ran on ['gpu_a100_train', 'gpu_l4_spot']")
               for f in _fails(obs))


def test_train_workers_off_the_training_node_fail(good_run):
    obs = copy.deepcopy(good_run)
    obs["samples"][1]["actors"].append(_actor(L4, "train-bert"))
    assert any(f.startswith("train-bert actors ran on") for f in _fails(obs))


def test_a_gpu_node_before_the_job_or_left_up_fails(good_run):
    early = copy.deepcopy(good_run)
    early["samples"][0]["nodes"].append(_node(L4, "gpu_l4_spot", "ALIVE", 1, 1))
    assert "GPU nodes were up before the job" in _fails(early)
    left = copy.deepcopy(good_run)
    left["samples"][-1]["nodes"][-1]["state"] = "ALIVE"
    assert any("still ALIVE at the end" in f for f in _fails(left))
    slow = copy.deepcopy(good_run)
    slow["provider_events"][-1]["t"] = 400  # removed 240 s after its last actor
    assert any("removed 240 s after its last actor" in f for f in _fails(slow))


def test_leftover_processes_and_a_failed_job_fail(good_run):
    obs = copy.deepcopy(good_run)
    obs["leftover_pids"] = [4242]
    obs["job_status"] = "FAILED"
    fails = _fails(obs)
    assert "processes left after the head stopped: [4242]" in fails
    assert "job FAILED" in fails


def test_reclaim_cost_counts_the_blocks_that_were_running_on_the_reclaimed_node(good_run):
    obs = copy.deepcopy(good_run)
    obs["reclaim"] = True
    obs["reclaim_event"] = {"t": 55, "node_id": L4, "rows_written_before": 8,
                            "annotate_actors_alive": 1}
    obs["provider_events"][1].update(t=56, reason="spot-reclaim")
    obs["provider_events"][2:2] = [
        {"t": 60, "event": "launch", "node_id": L4C, "node_type": "gpu_l4_spot", "reason": "autoscaler"},
        {"t": 85, "event": "terminate", "node_id": L4C, "node_type": "gpu_l4_spot", "reason": "autoscaler"}]
    l4c = _node(L4C, "gpu_l4_spot", "ALIVE", 1, 60)
    obs["samples"].insert(2, {"t": 70, "load1": 3.0, "nodes": [l4c], "actors": [_actor(L4C, "annotate")]})
    obs["samples"][-1]["nodes"].append({**l4c, "state": "DEAD", "end_ms": 85_000})
    task = {"name": "MapWorker(MapBatches(AnnotateBatch)).submit", "end_ms": None}
    obs["annotate_tasks"] = [
        {**task, "task_id": "a", "attempt": 0, "state": "FINISHED", "node_id": L4, "start_ms": 40_000, "end_ms": 45_000},
        {**task, "task_id": "b", "attempt": 0, "state": "FAILED", "node_id": L4, "start_ms": 50_000, "end_ms": 56_000},
        {**task, "task_id": "c", "attempt": 0, "state": "FAILED", "node_id": L4, "start_ms": None},
        {**task, "task_id": "b", "attempt": 1, "state": "FINISHED", "node_id": L4C, "start_ms": 65_000, "end_ms": 66_000},
        {**task, "task_id": "c", "attempt": 1, "state": "FINISHED", "node_id": L4C, "start_ms": 66_000, "end_ms": 67_000},
    ]
    s = summarize(obs)
    r = s["reclaim"]
    # Annotate: 32 rows in blocks of 4 (batch 4 x 1, two actors), llm_eval 16 likewise.
    assert (r["blocks_on_node"], r["blocks_running_when_reclaimed"]) == (2, 1)
    assert (r["rows_per_block_max"], r["rows_redone_max"], r["tasks_retried"]) == (4, 4, 2)
    assert r["compute_lost_s"] == 6.0
    assert (r["t_s"], r["killed_s"], r["next_node_launch_s"], r["actors_back_s"]) == (45.0, 1.0, 5.0, 15.0)
    assert s["nodes"][1]["idle_before_removal_s"] is None  # taken in use: no idle time
    assert check(obs, s) == []
