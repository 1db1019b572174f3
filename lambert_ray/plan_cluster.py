"""GPU-hours and cost of a cluster config for `lambert-ray plan`, from `gpu_table` (whose numbers
come from docs/cluster.md). Ray-free arithmetic:

    seconds of GPU = FLOPs / (peak x MFU);  wall = GPU seconds / GPUs + node boot
    cost = nodes x (wall + boot) x node price, + the head node for the whole run
"""

from __future__ import annotations

import math
import re

from lambert_ray import gpu_table
from lambert_ray.config import PipelineConfig
from lambert_ray.plan_measure import TokenStats
from lambert_ray.students import SETTINGS, student_epochs

TABLES = ("corpus", "gold_train", "gold_dev", "gold_test")


def tune_trials(cfg: PipelineConfig) -> int:
    """Ray Tune trials when the peft stage tunes (an upper bound on the work: ASHA stops some)."""
    t = cfg.tune
    if t is None or not t.enabled:
        return 1
    n = 0
    for space in t.methods.values():
        grid = math.prod(len(v) for v in space.params.values()) if space.params else 1
        lrs = len(space.lr) if space.lr else (t.num_samples if space.lr_loguniform else 1)
        n += grid * lrs
    return n * len(t.seeds)


def model_params(name: str) -> float | None:
    """Parameter count from gpu_table.KNOWN_PARAMS or a size in the name ('...-7b-...')."""
    low = name.lower()
    for key, n in sorted(gpu_table.KNOWN_PARAMS.items(), key=lambda kv: -len(kv[0])):
        if key in low:
            return n
    m = re.search(r"(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", low)
    return float(m.group(1)) * (1e9 if m.group(2) == "b" else 1e6) if m else None


def _gpu_line(stage: str, accel: str | None, gpus: float, flops: float, mfu: float) -> dict:
    nt = gpu_table.node_type(accel, stage)
    gpu_s = flops / (nt.peak_tflops * 1e12 * mfu)
    return {"gpu": nt.gpu, "gpus": gpus, "gpu_hours": gpu_s / 3600,
            "compute_s": gpu_s / max(gpus, 1e-9), "nodes": math.ceil(gpus / nt.gpus_per_node),
            "_node": nt}


def _timeline(lines: dict[str, dict]) -> dict:
    """Stages run one after another. A node type boots when its first stage starts (the stage's
    wall includes the boot) and is billed until its last stage ends, idle gaps included (the
    autoscaler keeps idle nodes for idle_timeout_minutes: 10); the head node for the whole run."""
    t, spans = 0.0, {}
    for line in lines.values():
        nt = line.pop("_node")
        boot = 0.0 if nt.gpu in spans else nt.boot_minutes * 60
        line["wall_s"] = boot + line["compute_s"]
        line["cost_usd"] = line["nodes"] * line["wall_s"] / 3600 * nt.usd_per_node_hour
        line["pricing"] = f"{line['nodes']}x {nt.instance} {nt.pricing} ${nt.usd_per_node_hour}/h"
        start = spans.get(nt.gpu, (t, 0, 0, nt))[0]
        nodes = max(line["nodes"], spans.get(nt.gpu, (0, 0, 0, nt))[2])
        t += line["wall_s"]
        spans[nt.gpu] = (start, t, nodes, nt)
    gpu_cost = sum(n * (end - start) / 3600 * nt.usd_per_node_hour
                   for start, end, n, nt in spans.values())
    stage_cost = sum(v["cost_usd"] for v in lines.values())
    return {"gpu_hours": sum(v["gpu_hours"] for v in lines.values()), "wall_s": t,
            "idle_usd": gpu_cost - stage_cost,
            "cost_usd": gpu_cost + t / 3600 * gpu_table.HEAD_USD_PER_HOUR}


def estimate_cluster(cfg: PipelineConfig, rows: dict, stats: dict[str, TokenStats | None],
                     n_prefix: int, n_suffix: int, expansion: int,
                     text_tokens: int = gpu_table.DEFAULT_TOKENS_PER_ITEM) -> dict:
    """GPU-hours, wall time and cost per stage from gpu_table (FLOPs / (peak x MFU)), node boots
    and idle gaps as in `_timeline`. Stages on CPU (num_gpus 0) are left out."""
    notes = []
    llm_n, stu_n = model_params(cfg.llm.model), model_params(cfg.bert.model)
    if llm_n is None or stu_n is None:
        return {"stages": {}, "notes": [f"parameter count unknown for {cfg.llm.model!r} or "
                                        f"{cfg.bert.model!r} (lambert_ray/gpu_table.py KNOWN_PARAMS)"]}

    def tok(table: str, attr: str) -> float:
        s = stats.get(table) or stats.get("corpus")
        v = getattr(s, attr, None) if s else None
        if v is None:  # no sample texts (hf://) or no tokenizer here
            v = text_tokens + (n_suffix if attr == "llm_row_mean" else 2)
            if attr == "student_mean":
                v = min(v, cfg.bert.max_length)
        return v

    if stats.get("corpus") is None:
        notes.append(f"no sample texts here: {text_tokens} text tokens per row assumed "
                     "(--text-tokens; docs/cluster.md assumes 100, IMDb reviews average ~300)")
    pre = 0 if cfg.llm.reuse_prefix else n_prefix
    llm_item = {t: 2 * llm_n * (tok(t, "llm_row_mean") + pre) * expansion for t in TABLES}
    stu_item = {t: 2 * stu_n * tok(t, "student_mean") for t in TABLES}
    mfu, out = gpu_table.MFU, {}
    a = cfg.annotate
    ann_gpus = a.max_actors * a.num_gpus
    annotate_flops = (rows["annotate"] * llm_item["corpus"] + rows["llm_eval"] * llm_item["gold_test"]
                      + rows["llm_dev"] * llm_item["gold_dev"])
    if ann_gpus and rows["zero_shot"]:
        out["annotate"] = _gpu_line("annotate", a.accelerator_type, ann_gpus, annotate_flops,
                                    mfu["llm_annotate"])
    pc = cfg.peft
    if "peft_train" in rows and pc.use_gpu:
        train_tok = n_prefix + tok("gold_train", "llm_row_mean")
        flops = rows["peft_epochs"] * rows["peft_train"] * 6 * llm_n * train_tok * expansion
        flops += (1 + rows["peft_epochs"]) * rows["peft_dev"] * llm_item["gold_dev"]
        out["peft (train)"] = _gpu_line("peft", None, pc.num_workers * tune_trials(cfg), flops,
                                        mfu["llm_train"])
        if ann_gpus:
            out["peft (re-annotate)"] = _gpu_line("annotate", a.accelerator_type, ann_gpus,
                                                  annotate_flops, mfu["llm_annotate"])
    b = cfg.bert
    if b.use_gpu:
        flops = sum(student_epochs(s, b) * (3 * n * stu_item["gold_train" if SETTINGS[s].sources == ("gold",)
                                                  else "corpus"]
                                + rows["student_dev"] * stu_item["gold_dev"])
                    for s, n in rows["students"].items())
        out["train-bert"] = _gpu_line("train-bert", b.accelerator_type, b.num_workers, flops,
                                      mfu["bert_train"])
    cl = cfg.classify
    if cl.num_gpus and rows["classify_corpus"] is not None:
        flops = rows["classify_test"] * stu_item["gold_test"] + rows["classify_corpus"] * stu_item["corpus"]
        out["classify"] = _gpu_line("classify", cl.accelerator_type, cl.max_actors * cl.num_gpus,
                                    flops, mfu["bert_classify"])
    elif cl.num_gpus:
        notes.append("classify: corpus size unknown (hf:// source): pass --rows corpus=N")
    total = _timeline(out)
    return {"stages": out, "total": total, "notes": notes,
            "assumptions": {"llm_params": llm_n, "student_params": stu_n, "mfu": mfu,
                            "head_usd_per_hour": gpu_table.HEAD_USD_PER_HOUR}}
