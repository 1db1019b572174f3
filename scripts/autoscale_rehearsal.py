"""Autoscaling rehearsal: a launcher YAML's node types on Ray's fake multi-node autoscaler, the
pipeline submitted as a Ray job, placement and scaling checked from Ray's own state.

    python scripts/autoscale_rehearsal.py --cluster cluster/aws-gpu.yaml [--reclaim] \
        [--out results/autoscale] [--name aws]

1. Derive the fake cluster from the YAML's `available_node_types` (lambert_ray.fake_cluster),
   start its head on 127.0.0.1 (own ports, temp dir and token; lambert_ray.fake_head).
2. Submit `jobs/run_pipeline.py` with configs/ag_news_smollm2_fake_cluster.yaml (the cluster
   config's resource requests, CPUs scaled like the fake nodes', computing on CPU).
3. While it runs, sample the state API (nodes, actors). With --reclaim, terminate the node of a
   running annotate actor through the provider once the first annotate shard is written.
4. After the job, wait for the idle GPU nodes to go, then check (exit 1 on any failure):
   no GPU node before the job; annotate / classify actors only on 1-GPU spot types; Train
   workers only on the training type; every GPU node removed after its stage; job SUCCEEDED;
   report complete; every sampled row in the annotate output exactly once; with --reclaim,
   the reclaim's cost (blocks and rows scored again, seconds); after stopping the head, no
   process of it or its fake nodes left.
5. Write <out>/<name>.json (observations + checks), <name>_timeline.md and <name>_timeline.png.

The fake nodes' CPUs are scaled to this small machine, the load average is recorded with every
state sample (docs/autoscale.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from autoscale_timeline import check, summarize, write_results  # noqa: E402

from lambert_ray.config import load_config  # noqa: E402
from lambert_ray.fake_cluster import fake_autoscaling_config, scaled_cpus  # noqa: E402
from lambert_ray.fake_head import FakeClusterHead, marked_pids  # noqa: E402

JOB_CONFIG = "configs/ag_news_smollm2_fake_cluster.yaml"
PROD_CONFIG = "configs/imdb_llama2-7b_qlora_cluster.yaml"
CPU_SCALE = 1 / 8
IDLE_TIMEOUT_S = 15
# Ray Data / Ray Train actor class names -> the stage they serve.
STAGE_OF_CLASS = {"AnnotateBatch": "annotate", "ClassifyBatch": "classify",
                  "RayTrainWorker": "train-bert"}


def check_requests_match_production(cpu_scale: float) -> list[str]:
    """The rehearsal config asks for what the production config asks for (CPUs scaled)."""
    prod, small = load_config(ROOT / PROD_CONFIG), load_config(ROOT / JOB_CONFIG)
    pairs = [("annotate.num_gpus", prod.annotate.num_gpus, small.annotate.num_gpus),
             ("annotate.num_cpus", scaled_cpus(prod.annotate.num_cpus, cpu_scale), small.annotate.num_cpus),
             ("annotate.accelerator_type", prod.annotate.accelerator_type, small.annotate.accelerator_type),
             ("classify.num_gpus", prod.classify.num_gpus, small.classify.num_gpus),
             ("classify.num_cpus", scaled_cpus(prod.classify.num_cpus, cpu_scale), small.classify.num_cpus),
             ("classify.accelerator_type", prod.classify.accelerator_type, small.classify.accelerator_type),
             ("annotate.max_restarts", prod.annotate.max_restarts, small.annotate.max_restarts),
             ("annotate.max_task_retries", prod.annotate.max_task_retries, small.annotate.max_task_retries),
             ("classify.max_restarts", prod.classify.max_restarts, small.classify.max_restarts),
             ("classify.max_task_retries", prod.classify.max_task_retries, small.classify.max_task_retries),
             ("bert.use_gpu", prod.bert.use_gpu, small.bert.use_gpu),
             ("bert.cpus_per_worker", scaled_cpus(prod.bert.cpus_per_worker, cpu_scale), small.bert.cpus_per_worker),
             ("bert.accelerator_type", prod.bert.accelerator_type, small.bert.accelerator_type)]
    return [f"{k}: production {p!r} -> {s!r} here" for k, p, s in pairs if p != s]


def stage_of(class_name: str) -> str | None:
    return next((s for k, s in STAGE_OF_CLASS.items() if k in class_name), None)


def sample_state(address: str) -> dict | None:
    """One state-API sample; None when the dashboard did not answer in time (a loaded box)."""
    try:
        return _sample_state(address)
    except Exception as e:  # ServerUnavailable, timeouts: skip this sample, keep the run
        print(f"state sample skipped: {type(e).__name__}", flush=True)
        return None


def _sample_state(address: str) -> dict:
    from ray.util.state import list_actors, list_nodes

    nodes = [{"node_id": n.node_id, "state": n.state, "labels": dict(n.labels or {}),
              "resources": dict(n.resources_total or {}), "start_ms": n.start_time_ms,
              "end_ms": n.end_time_ms, "is_head": n.is_head_node}
             for n in list_nodes(address=address, detail=True, limit=1000, raise_on_missing_output=False)]
    actors = [{"actor_id": a.actor_id, "class_name": a.class_name, "state": a.state,
               "node_id": a.node_id, "stage": stage_of(a.class_name or "")}
              for a in list_actors(address=address, limit=10000, raise_on_missing_output=False)]
    return {"t": time.time(), "load1": os.getloadavg()[0], "nodes": nodes,
            "actors": [a for a in actors if a["stage"]]}


def annotate_progress(run_dir: Path) -> tuple[int, bool]:
    """(rows written to annotate/ so far, stage complete)."""
    import pyarrow.parquet as pq

    d = run_dir / "annotate"
    rows = 0
    for p in d.glob("*.parquet") if d.is_dir() else []:
        try:
            rows += pq.read_metadata(p).num_rows
        except Exception:  # a shard being written
            pass
    return rows, (d / "_COMPLETE.json").exists()


def annotate_task_attempts(address: str, job_id: str | None) -> list[dict]:
    from ray.util.state import list_tasks

    tasks = list_tasks(address=address, detail=True, limit=10000, raise_on_missing_output=False,
                       filters=[("job_id", "=", job_id)] if job_id else None)
    # One `submit` actor task per block of rows (annotate and llm_eval share the class).
    return [{"task_id": t.task_id, "attempt": t.attempt_number, "state": t.state,
             "node_id": t.node_id, "name": t.name, "start_ms": t.start_time_ms,
             "end_ms": t.end_time_ms} for t in tasks
            if "AnnotateBatch" in (t.name or "") and (t.name or "").endswith(".submit")]


def run(cluster: str, name: str, out: Path, reclaim: bool, work: Path) -> dict:
    launcher = yaml.safe_load((ROOT / cluster).read_text())
    cfg = fake_autoscaling_config(launcher, gcs_address="set-by-head", control_dir=str(work / "control"),
                                  cpu_scale=CPU_SCALE, idle_timeout_s=IDLE_TIMEOUT_S)
    run_dir = work / "out" / name
    data_dir = os.environ.get("LAMBERT_DATA_DIR", str((ROOT / ".." / "shared" / "data").resolve()))
    job_env = {"HF_HUB_OFFLINE": "1", "LAMBERT_DATA_DIR": data_dir, "LAMBERT_LOG": "INFO",
               "TOKENIZERS_PARALLELISM": "false",
               "HF_HOME": os.environ.get("HF_HOME", str(ROOT / ".cache" / "hf")),
               "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                      str(ROOT / ".cache" / "torch_ext"))}
    obs: dict = {"cluster": cluster, "name": name, "reclaim": reclaim, "cpu_scale": CPU_SCALE,
                 "job_config": JOB_CONFIG,
                 "idle_timeout_s": IDLE_TIMEOUT_S, "fake_node_types": cfg["available_node_types"],
                 "request_mismatches": check_requests_match_production(CPU_SCALE), "samples": []}
    head = FakeClusterHead(cfg, work / "head")
    t_start = time.time()
    obs["load_at_start"] = os.getloadavg()
    head.start()
    os.environ.update({k: head.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})

    def sample() -> dict | None:
        s = sample_state(head.dashboard)
        if s is not None:
            obs["samples"].append(s)
        return s

    try:
        from ray.job_submission import JobSubmissionClient

        obs["t_head_up"] = time.time()
        while sample() is None:  # the "no GPU node before the job" check needs this one
            if time.time() - obs["t_head_up"] > 300:
                raise RuntimeError("the state API did not answer for 300 s")
        client = JobSubmissionClient(head.dashboard)
        spec = {"entrypoint": (f"python jobs/run_pipeline.py --config {JOB_CONFIG} "
                               f"--set run.output_dir={work / 'out'} --set run.name={name}"),
                "runtime_env": {"working_dir": str(ROOT), "env_vars": job_env,
                                "excludes": [".git", ".venv", ".cache", "runs", "results",
                                             ".ruff_cache", ".pytest_cache"]},
                "submission_id": f"rehearsal_{name}_{int(time.time())}"}
        job_id = _retry(lambda: submit(client, spec), 180,
                        # the job agent registers a few seconds after the dashboard, and its
                        # own GCS connection can time out on a loaded box
                        lambda e: any(k in str(e) for k in ("No available agent",
                                                            "Failed to connect to GCS"))
                        or _transient(e))
        obs["t_submit"] = time.time()
        obs["job_id"] = job_id
        deadline = time.monotonic() + 5400  # a starved shared box: up to 90 min
        while True:
            # Read-only: any error (500s and timeouts of a starved dashboard) is retried.
            status = _retry(lambda: client.get_job_status(job_id), 1200, lambda e: True)
            last = sample()
            if reclaim and "reclaim_event" not in obs and last is not None:
                rows, done = annotate_progress(run_dir)
                alive = [a for a in last["actors"]
                         if a["stage"] == "annotate" and a["state"] == "ALIVE" and a["node_id"]]
                if rows and not done and alive:
                    node = alive[0]["node_id"]
                    (work / "control" / "reclaim").mkdir(parents=True, exist_ok=True)
                    (work / "control" / "reclaim" / node).touch()
                    obs["reclaim_event"] = {"t": time.time(), "node_id": node,
                                            "rows_written_before": rows,
                                            "annotate_actors_alive": len(alive)}
                    print(f"spot reclaim: node {node[-5:]} with {rows} annotate rows written", flush=True)
            if status.is_terminal() or time.monotonic() > deadline:
                break
            time.sleep(1.5)
        obs["t_job_end"] = time.time()
        obs["job_status"] = str(status.value)
        obs["job_logs_tail"] = _retry(lambda: client.get_job_logs(job_id), 120,
                                      lambda e: True)[-6000:]
        obs["annotate_tasks"] = _retry(lambda: annotate_task_attempts(head.dashboard, None), 300,
                                       lambda e: True)
        # Idle GPU nodes: give the autoscaler its idle timeout plus slack to remove them.
        wait_until = time.monotonic() + IDLE_TIMEOUT_S + 90
        while time.monotonic() < wait_until:
            last = sample()
            if last and not [n for n in last["nodes"] if n["state"] == "ALIVE" and not n["is_head"]]:
                break
            time.sleep(2)
        obs["t_end"] = time.time()
    finally:
        obs["left_after_grace"] = head.stop()
        obs["killed_after_grace"] = sorted(head.killed_names.values())
        # Clean shutdown: nothing this head started may outlive it (raylets of fake nodes,
        # workers, agents), by the head's marker variable and by its Ray temp dir in a command
        # line; killed processes get half a minute to finish exiting.
        for _ in range(30):
            obs["leftover_pids"] = sorted(set(marked_pids(head.marker))
                                          | set(pids_mentioning(str(work / "head" / "ray"))))
            if not obs["leftover_pids"]:
                break
            time.sleep(1)
        obs["load_at_end"] = os.getloadavg()
        events = work / "control" / "events.jsonl"
        obs["provider_events"] = ([json.loads(x) for x in events.read_text().splitlines()]
                                  if events.exists() else [])
    obs["t_start"] = t_start
    obs["outputs"] = read_outputs(run_dir)
    obs["annotate_sample"] = load_config(ROOT / JOB_CONFIG).data.annotate_sample
    return obs


def submit(client, spec: dict) -> str:
    """Submit the job; a retry after a submission that did get through finds it by its id."""
    try:
        return client.submit_job(**spec)
    except RuntimeError as e:
        if "already exists" in str(e):
            return spec["submission_id"]
        raise


def _transient(e: Exception) -> bool:
    """A dashboard / state API that did not answer in time (the loaded box), not a real error."""
    text = f"{type(e).__name__} {e}"
    return any(k in text for k in ("ServerUnavailable", "Timeout", "timed out", "Connection"))


def _retry(fn, budget_s: float, retryable):
    t0 = time.monotonic()
    while True:
        try:
            return fn()
        except Exception as e:
            if not retryable(e) or time.monotonic() - t0 > budget_s:
                raise
            time.sleep(2)


def pids_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text`, other than this process and its ancestors
    (`timeout`, a shell: they name the work dir too, and started no Ray)."""
    mine, pid = set(), os.getpid()
    while pid > 1:
        mine.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in mine:
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def read_outputs(run_dir: Path) -> dict:
    """What the job wrote: annotate row ids (duplicates?), the report's counts."""
    import pyarrow.dataset as pads

    res: dict = {"run_dir": str(run_dir)}
    ann = run_dir / "annotate"
    if ann.is_dir() and list(ann.glob("*.parquet")):
        ids = pads.dataset(str(ann), format="parquet").to_table(columns=["row_id"]).column(0).to_pylist()
        res["annotate_rows"], res["annotate_unique"] = len(ids), len(set(ids))
    for f in ("annotate/_COMPLETE.json", "report.json"):
        p = run_dir / f
        res[f] = json.loads(p.read_text()) if p.exists() else None
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cluster", required=True, help="launcher YAML, e.g. cluster/aws-gpu.yaml")
    ap.add_argument("--name", help="result name (default: the YAML's stem, +_reclaim)")
    ap.add_argument("--reclaim", action="store_true", help="spot-reclaim a node mid-annotate")
    ap.add_argument("--out", default=str(ROOT / "results" / "autoscale"))
    ap.add_argument("--work", help="scratch dir (default: a new temp dir under $RAY_TMPDIR)")
    args = ap.parse_args()
    # `timeout` / a CI runner stop with SIGTERM: exit through the `finally` that stops the head.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    name = args.name or Path(args.cluster).stem + ("_reclaim" if args.reclaim else "")
    work = Path(args.work or tempfile.mkdtemp(prefix="autoscale_", dir=os.environ.get("RAY_TMPDIR")))
    obs = run(args.cluster, name, Path(args.out), args.reclaim, work)
    summary = summarize(obs)
    failures = check(obs, summary)
    write_results(obs, summary, failures, Path(args.out))
    print(json.dumps({"name": name, "job_status": obs.get("job_status"), "failures": failures,
                      "wall_s": round(obs["t_end"] - obs["t_start"], 1),
                      "reclaim": summary.get("reclaim")}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

