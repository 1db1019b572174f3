"""The autoscaling rehearsal's node timeline, checks and result files (used by
scripts/autoscale_rehearsal.py).

Input: the observations `run()` collected: state-API samples of nodes and actors (every ~1.5 s),
the provider's launch/terminate log, the job's status and outputs. Times in the outputs are
seconds since the job was submitted.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IDLE_SLACK_S = 60  # autoscaler update period, the state API's sampling and a loaded box


def _node_type(node: dict) -> str:
    return node["labels"].get("node-type", "head" if node["is_head"] else "?")


def _load_range(obs: dict) -> list[float] | None:
    """The 1-minute load average's range over the run (this box is shared)."""
    loads = [s["load1"] for s in obs["samples"] if "load1" in s]
    loads += [x[0] for x in (obs.get("load_at_start"), obs.get("load_at_end")) if x]
    return [round(min(loads), 1), round(max(loads), 1)] if loads else None


def summarize(obs: dict) -> dict:
    """Per node: type, launch / terminate times, stages it ran; per stage: its time window."""
    t0 = obs.get("t_submit", obs["t_start"])
    types = obs["fake_node_types"]
    last_nodes = {n["node_id"]: n for s in obs["samples"] for n in s["nodes"]}
    launches = {e["node_id"]: e for e in obs["provider_events"] if e["event"] == "launch"}
    terminations = {e["node_id"]: e for e in obs["provider_events"] if e["event"] == "terminate"}
    use: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    windows: dict[str, list[float]] = defaultdict(list)
    actor_nodes: dict[str, set[str]] = defaultdict(set)
    for s in obs["samples"]:
        for a in s["actors"]:
            if a["state"] == "ALIVE" and a["node_id"]:
                use[a["node_id"]][a["stage"]].append(s["t"] - t0)
                windows[a["stage"]].append(s["t"] - t0)
                actor_nodes[a["stage"]].add(a["node_id"])
    nodes = []
    for node_id, n in sorted(last_nodes.items(), key=lambda kv: kv[1]["start_ms"] or 0):
        ntype = _node_type(n)
        launch = launches.get(node_id, {}).get("t")
        term = terminations.get(node_id, {})
        end = term.get("t") or (n["end_ms"] / 1000 if n["end_ms"] else None)
        last_use = max((t for ts in use[node_id].values() for t in ts), default=None)
        nodes.append({
            "node_id": node_id, "short": node_id[-5:], "type": ntype,
            "market": n["labels"].get("market", "-"),
            "gpus": types.get(ntype, {}).get("resources", {}).get("GPU", n["resources"].get("GPU", 0)),
            "launched_s": round(launch - t0, 1) if launch else None,
            "registered_s": round(n["start_ms"] / 1000 - t0, 1) if n["start_ms"] else None,
            "terminated_s": round(end - t0, 1) if end else None,
            "terminate_reason": term.get("reason"),
            "state_at_end": n["state"],
            "stages": sorted(use[node_id]),
            "last_use_s": round(last_use, 1) if last_use is not None else None,
            "idle_before_removal_s": (round(end - t0 - last_use, 1) if end and last_use is not None
                                      and term.get("reason") != "spot-reclaim" else None),
        })
    stage_windows = {s: [round(min(ts), 1), round(max(ts), 1)] for s, ts in windows.items()}
    summary = {"nodes": nodes, "stage_windows": stage_windows,
               "actor_node_types": {s: sorted({_node_type(last_nodes[i]) for i in ids if i in last_nodes})
                                    for s, ids in actor_nodes.items()},
               "launch_failures": sum(e["event"] == "launch-failed" for e in obs["provider_events"]),
               "load1_range": _load_range(obs),
               "wall_s": round(obs["t_end"] - obs["t_start"], 1),
               "job_s": round(obs["t_job_end"] - t0, 1)}
    if obs.get("reclaim_event"):
        summary["reclaim"] = _reclaim_cost(obs, summary, t0)
    return summary


def _reclaim_cost(obs: dict, summary: dict, t0: float) -> dict:
    """What the spot reclaim cost, from Ray's task records and the state samples.

    Rows: every annotate actor task is one block of at most `rows_per_shard` rows; an attempt
    that had started on the reclaimed node and failed is a block scored again elsewhere (an
    attempt that was only queued there costs no scoring). Seconds: the compute those attempts
    lost; the time from the reclaim until as many annotate actors were alive again; the
    annotate stage's wall time (its `_COMPLETE.json`), to hold against a run without reclaim."""
    from lambert_ray.config import load_config
    from lambert_ray.stage import rows_per_shard

    r = obs["reclaim_event"]
    t_r = r["t"]
    tasks = obs.get("annotate_tasks", [])
    on_node = [t for t in tasks if t["node_id"] == r["node_id"] and t["state"] != "FINISHED"]
    started = [t for t in on_node if t.get("start_ms")]
    killed = next((e["t"] for e in obs["provider_events"]
                   if e.get("reason") == "spot-reclaim" and e["node_id"] == r["node_id"]), None)
    known_dead = next((s["t"] for s in obs["samples"] if s["t"] > t_r and any(
        n["node_id"] == r["node_id"] and n["state"] == "DEAD" for n in s["nodes"])), None)
    retried = {t["task_id"] for t in tasks if t["attempt"] > 0}
    counts = (obs["outputs"].get("report.json") or {}).get("counts", {})
    res = load_config(ROOT / obs["job_config"]).annotate
    per_block = max((rows_per_shard(counts[s]["rows_in"], res) for s in ("annotate", "llm_eval")
                     if counts.get(s, {}).get("rows_in")), default=0)
    lost_s = sum(((t["end_ms"] or t_r * 1000) - t["start_ms"]) / 1000 for t in started)
    back = next((s["t"] for s in obs["samples"] if s["t"] > t_r and sum(
        a["stage"] == "annotate" and a["state"] == "ALIVE" and a["node_id"] != r["node_id"]
        for a in s["actors"]) >= r.get("annotate_actors_alive", 1)), None)
    relaunch = next((e["t"] for e in obs["provider_events"]
                     if e["event"] == "launch" and e["t"] > t_r), None)
    done = obs["outputs"].get("annotate/_COMPLETE.json") or {}
    ann = summary["stage_windows"].get("annotate", [None, None])
    return {"t_s": round(t_r - t0, 1), "node": r["node_id"][-5:],
            "rows_written_before": r["rows_written_before"],
            "annotate_task_attempts": len(tasks), "tasks_retried": len(retried),
            "attempts_failed_on_node": len(on_node),
            "blocks_on_node": len({t["task_id"] for t in on_node}),
            "blocks_running_when_reclaimed": len({t["task_id"] for t in started}),
            "rows_per_block_max": per_block,
            "rows_redone_max": len({t["task_id"] for t in started}) * per_block,
            "killed_s": round(killed - t_r, 1) if killed else None,
            "node_known_dead_s": round(known_dead - killed, 1) if known_dead and killed else None,
            "compute_lost_s": round(lost_s, 1),
            "next_node_launch_s": round(relaunch - t_r, 1) if relaunch else None,
            "actors_back_s": round(back - t_r, 1) if back else None,
            "annotate_stage_s": (done.get("timing") or {}).get("seconds"),
            "annotate_window_s": ann,
            "annotate_after_reclaim_s": round(ann[1] - (t_r - t0), 1) if ann[1] else None}


def check(obs: dict, summary: dict) -> list[str]:
    """Every failed expectation, as a sentence (empty: the rehearsal passed)."""
    fails = [f"request differs from production: {m}" for m in obs["request_mismatches"]]
    types = obs["fake_node_types"]
    one_gpu_spot = {n for n, t in types.items() if t["resources"].get("GPU") == 1
                    and t["labels"].get("market") == "spot"}
    trainers = {n for n, t in types.items() if t["resources"].get("GPU", 0) >= 8}
    first = obs["samples"][0]["nodes"]
    if [n for n in first if n["state"] == "ALIVE" and n["resources"].get("GPU")]:
        fails.append("GPU nodes were up before the job")
    gpu_nodes = [n for n in summary["nodes"] if n["gpus"]]
    first_gpu = min((n for n in gpu_nodes if n["launched_s"] is not None),
                    key=lambda n: n["launched_s"], default=None)
    if first_gpu is None or first_gpu["type"] not in one_gpu_spot:
        fails.append(f"the first GPU node launched is {first_gpu and first_gpu['type']}, "
                     f"not a 1-GPU spot type {sorted(one_gpu_spot)}")
    where = summary["actor_node_types"]
    for stage, allowed in (("annotate", one_gpu_spot), ("classify", one_gpu_spot),
                           ("train-bert", trainers)):
        if not where.get(stage):
            fails.append(f"no {stage} actor was seen running")
        elif set(where[stage]) - allowed:
            fails.append(f"{stage} actors ran on {where[stage]}, expected only {sorted(allowed)}")
    for n in gpu_nodes:
        if n["state_at_end"] != "DEAD":
            fails.append(f"GPU node {n['short']} ({n['type']}) still {n['state_at_end']} at the end")
        elif n["terminate_reason"] == "spot-reclaim":
            continue  # taken while in use; Ray's state shows its actors until the GCS notices
        elif n["idle_before_removal_s"] is not None and not (
                0 <= n["idle_before_removal_s"] <= obs["idle_timeout_s"] + IDLE_SLACK_S):
            fails.append(f"GPU node {n['short']} removed {n['idle_before_removal_s']} s after its "
                         f"last actor (idle timeout {obs['idle_timeout_s']} s)")
    if obs.get("job_status") != "SUCCEEDED":
        fails.append(f"job {obs.get('job_status')}")
    out = obs["outputs"]
    report = out.get("report.json")
    if not report:
        fails.append("no report.json")
    else:
        counts = report["counts"]
        for stage in ("annotate", "llm_eval", "classify", "test/llm"):
            c = counts.get(stage)
            if not c or c["rows_in"] != c["rows_ok"] + c["rows_errored"] or not c["rows_in"]:
                fails.append(f"report counts for {stage}: {c}")
        if not report.get("table"):
            fails.append("report has no table")
    done = out.get("annotate/_COMPLETE.json")
    n_in = done["counts"]["rows_in"] if done else None
    if not (out.get("annotate_rows") == out.get("annotate_unique") == n_in):
        fails.append(f"annotate output: {out.get('annotate_rows')} rows, "
                     f"{out.get('annotate_unique')} distinct row_ids, {n_in} sampled")
    if obs.get("annotate_sample") is not None and n_in != obs["annotate_sample"]:
        fails.append(f"annotate read {n_in} rows, the config samples {obs['annotate_sample']}")
    if obs.get("leftover_pids"):
        fails.append(f"processes left after the head stopped: {obs['leftover_pids']}")
    if obs["reclaim"] and not obs.get("reclaim_event"):
        fails.append("no annotate actor was running with rows written: nothing reclaimed")
    if obs.get("reclaim_event") and not any(e["reason"] == "spot-reclaim"
                                            for e in obs["provider_events"]):
        fails.append("the provider never terminated the reclaimed node")
    return fails


def timeline_markdown(obs: dict, summary: dict, failures: list[str]) -> str:
    lines = [f"# Autoscaling rehearsal: {obs['cluster']}" + (" with a spot reclaim" if obs["reclaim"] else ""),
             "",
             f"Fake multi-node cluster from `{obs['cluster']}` (CPUs x {obs['cpu_scale']}, "
             f"idle timeout {obs['idle_timeout_s']} s); job `{obs.get('job_id')}`: "
             f"**{obs.get('job_status')}** in {summary['job_s']} s; times are seconds after "
             "submission." + (f" Note: {obs['note']}." if obs.get("note") else ""), "",
             "| node | type | market | GPUs | launched | terminated | why | stages run on it | idle before removal |",
             "|---|---|---|---:|---:|---:|---|---|---:|"]
    for n in summary["nodes"]:
        lines.append(f"| {n['short']} | {n['type']} | {n['market']} | {n['gpus']:g} | "
                     f"{n['launched_s'] if n['launched_s'] is not None else 'start'} | "
                     f"{n['terminated_s'] if n['terminated_s'] is not None else '-'} | "
                     f"{n['terminate_reason'] or '-'} | {', '.join(n['stages']) or '-'} | "
                     f"{n['idle_before_removal_s'] if n['idle_before_removal_s'] is not None else '-'} |")
    if summary.get("launch_failures"):
        t0 = obs.get("t_submit", obs["t_start"])
        failed = [f"{e['node_type']} at {e['t'] - t0:.1f} s" + (f" (gave up after {e['after_s']} s)"
                                                               if e.get("after_s") else "")
                  for e in obs["provider_events"] if e["event"] == "launch-failed"]
        lines += ["", f"{summary['launch_failures']} node launch(es) failed, the fake node's raylet "
                  "not registered with the GCS (on the loaded machine: its dashboard agent too "
                  "slow to start, the raylet aborted): " + "; ".join(failed) + ". The autoscaler "
                  "went on with the nodes it had or launched again."]
    lines += ["", "Stage windows (an actor of the stage alive; `annotate` covers llm_eval too, "
              "same actor class): " + ", ".join(
                  f"{s} {w[0]}-{w[1]} s" for s, w in summary["stage_windows"].items()), ""]
    if summary.get("load1_range"):
        lo, hi = summary["load1_range"]
        lines += [f"Load average (1 min) during the run: {lo}-{hi} (2-core box, shared).", ""]
    if summary.get("reclaim"):
        lines += [reclaim_sentence(summary["reclaim"]), ""]
    if "leftover_pids" in obs:
        names = obs.get("killed_after_grace") or []
        lines += ["Shutdown: SIGTERM to the head's `ray start --block`; "
                  + (f"{len(names)} of its processes were still running 20 s later ("
                     + ", ".join(f"{n} x{names.count(n)}" for n in sorted(set(names)))
                     + ") and were killed by the head's marker variable; " if names else "")
                  + ("no process of this head was left afterwards (marker variable, temp dir)."
                     if not obs["leftover_pids"] else f"left running: {obs['leftover_pids']}."), ""]
    lines.append("Checks: " + ("all passed" if not failures else "; ".join(failures)))
    return "\n".join(lines) + "\n"


def reclaim_sentence(r: dict) -> str:
    return (f"Spot reclaim asked at {r['t_s']} s with {r['rows_written_before']} annotate rows "
            f"written: node {r['node']} killed through the provider (no drain) "
            f"{r['killed_s']} s later; Ray's state showed it dead {r['node_known_dead_s']} s after "
            f"the kill. {r['blocks_on_node']} block(s) were on its actor, "
            f"{r['blocks_running_when_reclaimed']} of them running: <= {r['rows_redone_max']} rows "
            f"scored again ({r['rows_per_block_max']} rows per block), {r['compute_lost_s']} s of "
            f"actor compute lost; their attempts failed {r['attempts_failed_on_node']} times before "
            f"the actor came back elsewhere. Next node launched {r['next_node_launch_s']} s after "
            f"the reclaim; as many annotate actors alive as before after {r['actors_back_s']} s; "
            f"annotate/llm_eval actors gone {r['annotate_after_reclaim_s']} s after it; the "
            f"annotate stage took {r['annotate_stage_s']} s in all.")


def plot(obs: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = summary["nodes"]
    colors = {"head": "#888888"}
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(nodes) + 1.8))
    end_all = summary["wall_s"]
    for i, n in enumerate(nodes):
        c = (colors["head"] if n["launched_s"] is None and n["market"] == "on-demand"
             and not n["gpus"] else colors.setdefault(n["type"], palette[len(colors) % len(palette)]))
        start = n["launched_s"] if n["launched_s"] is not None else (n["registered_s"] or 0)
        end = n["terminated_s"] if n["terminated_s"] is not None else end_all
        ax.barh(i, end - start, left=start, color=c, alpha=0.8)
        ax.text(start, i, f" {', '.join(n['stages'])}", va="center", fontsize=7)
        if n["terminate_reason"] == "spot-reclaim":
            ax.plot(end, i, "rx", markersize=10)
    for stage, (a, b) in summary["stage_windows"].items():
        ax.axvspan(a, b, alpha=0.08, color="k")
        ax.text(a, len(nodes) - 0.4, stage, fontsize=7)
    ax.set_yticks(range(len(nodes)), [f"{n['short']} {n['type']}" for n in nodes], fontsize=8)
    ax.set_xlabel("seconds after job submission")
    ax.set_title(f"{obs['cluster']} on the fake autoscaler" + (" (spot reclaim: x)" if obs["reclaim"] else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(out: Path) -> str:
    """One line per rehearsal result in `out` (its <name>.json files)."""
    lines = ["| run | job | job s | load avg | GPU nodes launched | annotate on | classify on | "
             "train on | idle before removal (s) | spot reclaim | checks |",
             "|---|---|---:|---|---|---|---|---|---|---|---|"]
    for f in sorted(out.glob("*.json")):
        d = json.loads(f.read_text())
        s, o = d["summary"], d["observations"]
        gpu = [n for n in s["nodes"] if n["gpus"]]
        launched = ", ".join(f"{sum(n['type'] == t for n in gpu)}x {t}"
                             for t in sorted({n["type"] for n in gpu}))
        idle = sorted(n["idle_before_removal_s"] for n in gpu if n["idle_before_removal_s"] is not None)
        r = s.get("reclaim")
        rec = (f"at {r['t_s']} s, {r['rows_written_before']} rows written; "
               f"{r['blocks_running_when_reclaimed']} block(s) redone (<= {r['rows_redone_max']} "
               f"rows, {r['compute_lost_s']} s compute); actors back after {r['actors_back_s']} s; "
               f"annotate stage {r['annotate_stage_s']} s"
               if r and "blocks_running_when_reclaimed" in r else "-")
        load = s.get("load1_range")
        where = {k: ", ".join(v) for k, v in s["actor_node_types"].items()}
        lines.append(f"| {f.stem} | {o.get('job_status')} | {s['job_s']} | "
                     f"{'-'.join(map(str, load)) if load else '-'} | {launched} | "
                     f"{where.get('annotate', '-')} | {where.get('classify', '-')} | "
                     f"{where.get('train-bert', '-')} | {', '.join(map(str, idle)) or '-'} | {rec} | "
                     f"{'pass' if not d['failures'] else '; '.join(d['failures'])} |")
    return "\n".join(lines) + "\n"


def write_results(obs: dict, summary: dict, failures: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = obs["name"]
    slim = {k: v for k, v in obs.items() if k != "samples"}
    slim["n_samples"] = len(obs["samples"])
    (out / f"{name}.json").write_text(json.dumps({"summary": summary, "failures": failures,
                                                  "observations": slim}, indent=1, default=str))
    # The raw state-API samples, to recompute the summary: python scripts/autoscale_timeline.py
    with gzip.open(out / f"{name}_samples.json.gz", "wt") as f:
        json.dump(obs["samples"], f)
    (out / f"{name}_timeline.md").write_text(timeline_markdown(obs, summary, failures))
    plot(obs, summary, out / f"{name}_timeline.png")
    (out / "summary.md").write_text(summary_table(out))


def main() -> None:
    """Recompute summaries, timelines and summary.md from the saved observations + samples."""
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "results" / "autoscale"
    for f in sorted(out.glob("*_samples.json.gz")):
        name = f.name[:-len("_samples.json.gz")]
        obs = json.loads((out / f"{name}.json").read_text())["observations"]
        with gzip.open(f, "rt") as g:
            obs["samples"] = json.load(g)
        summary = summarize(obs)
        write_results(obs, summary, check(obs, summary), out)


if __name__ == "__main__":
    main()
