"""Annotation items/s against the number of labels: single- vs multi-token verbalisers, the label
tree (today's path) vs the old row-per-label path, same SmolLM2 rows.

    nice -n 10 python benchmarks/label_count_throughput.py --n 48 \
        --out results/bench_label_count.json --md results/bench_label_count.md

For 2, 4 and 8 labels, a single-token and a multi-token label set (below) label the same first
--n SST-2 dev sentences with the packaged SmolLM2 (fp32, CPU, prefix KV reuse, token budget 2048,
as in the demo). Each (labels, verbalisers, path) runs `Annotator.score` on all rows after a
warm-up; the order is interleaved per label count and repeated --repeats times, best kept. The
box is shared, so both wall items/s and items per CPU-second of this process (all threads) are
reported, with the load average. Also reported: the label tree's extra tokens per
row (K) and the largest |log-prob| difference between the two paths on the real model.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from lambert_ray.annotator import Annotator, pack_by_tokens
from lambert_ray.bench import LMShape
from lambert_ray.config import validate_config
from lambert_ray.label_expand import make_expanded_batch
from lambert_ray.models import load_causal_lm
from lambert_ray.scoring import make_batch

ROOT = Path(__file__).resolve().parent.parent
# Single-token answers for SmolLM2, and multi-word ones (2-3 tokens each, few shared prefixes).
LABEL_SETS = {
    ("single", 2): ["negative", "positive"],
    ("single", 4): ["negative", "positive", "neutral", "mixed"],
    ("single", 8): ["negative", "positive", "neutral", "mixed", "happy", "great", "bad", "good"],
    ("multi", 2): ["negative review", "positive review"],
    ("multi", 4): ["negative review", "positive review", "mixed feelings", "off topic"],
    ("multi", 8): ["negative review", "positive review", "mixed feelings", "off topic",
                   "strongly negative", "strongly positive", "no opinion", "harsh criticism"],
}
for _kind in ("single", "multi"):  # 6 labels: the first six of the 8-label sets
    LABEL_SETS[(_kind, 6)] = LABEL_SETS[(_kind, 8)][:6]


def read_sst2(path: Path, n: int) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"].strip() for r in rows[:n]]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def annotator(model, tok, names: list[str], expand: bool) -> Annotator:
    cfg = validate_config({
        "data": {"corpus": {"path": "x.tsv"}},
        "labels": {"names": names},
        "prompt": {"system": "Please answer with one of these labels only: {labels}.",
                   "template": "Which label fits the following movie review best?\n"
                               "Movie review: {text}"},
        "llm": {"model": "smollm2", "max_length": 256, "token_budget": 2048, "device": "cpu"},
    })
    return Annotator(model, tok, cfg.prompt, cfg.labels, max_length=256, token_budget=2048,
                     expand_labels=expand)


def timed(ann: Annotator, texts: list[str]) -> tuple[float, float, np.ndarray]:
    """(wall s, this process's CPU s, log-probs). On a shared, oversubscribed box the CPU seconds
    (all threads) track the work done; the wall seconds track the share of the box we got."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = ann.score(texts)
    return time.perf_counter() - t0, time.process_time() - c0, np.array(out["logprobs"])


def work_per_row(ann: Annotator, texts: list[str], shape: LMShape) -> dict:
    """The work `ann.score(texts)` does, counted from its batches (no forward): padded tokens
    through the decoder and output-head positions per row, and their matmul FLOPs
    (2 * non-embedding params per token + 2 * d * V per head position; attention scores and the
    cached prefix left out). Load-independent, unlike the timings."""
    rows = [r.ids for r in ann.builder.encode(texts)]
    verbalisers, tokens, head = ann.builder.verbalisers, 0, 0
    for idx in pack_by_tokens([len(r) + ann.tree_tokens for r in rows], ann.token_budget,
                              ann.expansion):
        group = [rows[i] for i in idx]
        b = (make_expanded_batch(group, verbalisers, 0) if ann.expand_labels
             else make_batch(group, verbalisers, 0))
        tokens += b.input_ids.numel()
        head += b.score_pos.numel()
    flops = 2.0 * shape.non_embedding_params * tokens + 2.0 * shape.hidden * shape.vocab * head
    return {"tokens_per_row": tokens / len(rows), "head_positions_per_row": head / len(rows),
            "gflop_per_row": flops / len(rows) / 1e9}


def work_table(model, tok, texts: list[str], label_counts: list[int]) -> list[dict]:
    shape = LMShape.of(model)
    out = []
    for n_labels in label_counts:
        for kind in ("single", "multi"):
            for path in ("new", "old"):
                ann = annotator(model, tok, LABEL_SETS[(kind, n_labels)], path == "old")
                out.append({"labels": n_labels, "verbalisers": kind, "path": path,
                            "tree_tokens_per_row": ann.tree_tokens if path == "new" else None,
                            **work_per_row(ann, texts, shape)})
    for r in out:
        ref = next(x for x in out if (x["labels"], x["verbalisers"], x["path"])
                   == (r["labels"], "single", "new"))
        r["gflop_vs_single_token"] = r["gflop_per_row"] / ref["gflop_per_row"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--labels", default="2,4,8")
    p.add_argument("--skip-old-single", action="store_true",
                   help="do not time the old path on single-token labels (the same work as the new "
                        "path there: no tree, no copies)")
    p.add_argument("--data-dir", default=os.environ.get("LAMBERT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--work-only", action="store_true",
                   help="only count the work per row (no forward passes, no timing)")
    p.add_argument("--out", default=None)
    p.add_argument("--md", default=None)
    args = p.parse_args()
    start = uptime()
    model, tok = load_causal_lm("smollm2", device="cpu", dtype="float32")
    texts = read_sst2(Path(args.data_dir) / "sst2" / "dev.tsv", args.n)
    label_counts = [int(x) for x in args.labels.split(",")]
    work = work_table(model, tok, texts, label_counts)
    rows = []
    for n_labels in ([] if args.work_only else label_counts):
        anns = {(kind, path): annotator(model, tok, LABEL_SETS[(kind, n_labels)], path == "old")
                for kind in ("single", "multi") for path in ("new", "old")
                if not (args.skip_old_single and kind == "single" and path == "old")}
        for ann in anns.values():
            ann.score(texts[:4])  # warm-up + the prefix KV cache
        secs: dict = {k: [] for k in anns}
        cpu: dict = {k: [] for k in anns}
        logp: dict = {}
        for _ in range(args.repeats):
            for key, ann in anns.items():
                s, c, logp[key] = timed(ann, texts)
                secs[key].append(s)
                cpu[key].append(c)
        for (kind, path), ann in anns.items():
            other = logp.get((kind, "old" if path == "new" else "new"), logp[(kind, path)])
            rows.append({
                "labels": n_labels, "verbalisers": kind, "path": path,
                "items_per_s": len(texts) / min(secs[(kind, path)]),
                "seconds": min(secs[(kind, path)]), "all_seconds": secs[(kind, path)],
                "items_per_cpu_s": len(texts) / min(cpu[(kind, path)]),
                "cpu_seconds": min(cpu[(kind, path)]), "all_cpu_seconds": cpu[(kind, path)],
                "verbaliser_tokens": [len(v) for v in ann.builder.verbalisers],
                "tree_tokens_per_row": ann.tree_tokens if path == "new" else None,
                "max_abs_logprob_diff_vs_other_path": float(np.abs(logp[(kind, path)] - other).max()),
                "load_after": open("/proc/loadavg").read().split()[:3],
            })
            print(json.dumps(rows[-1]), flush=True)
    by = {(r["labels"], r["verbalisers"], r["path"]): r for r in rows}
    for r in rows:  # cost relative to single-token verbalisers (label tree path), same labels
        ref = by[(r["labels"], "single", "new")]
        r["cost_vs_single_token"] = ref["items_per_s"] / r["items_per_s"]
        r["cpu_cost_vs_single_token"] = ref["items_per_cpu_s"] / r["items_per_cpu_s"]
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
             for k, v in vars(args).items() if v not in (None, False) and k != "data_dir"]
    out = {"meta": {"command": "python benchmarks/label_count_throughput.py " + " ".join(flags),
               "n": len(texts), "repeats": args.repeats, "uptime_start": start, "uptime_end": uptime(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "model": "smollm2 (SmolLM2-135M-Instruct, fp32, CPU)",
               "label_sets": {f"{k}-{n}": v for (k, n), v in LABEL_SETS.items()},
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
           "work": work, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    if args.md:
        Path(args.md).write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    m = out["meta"]
    path_name = {"new": "label tree", "old": "row per label (old)"}
    lines = [f"`{m['command']}` — {m['n']} SST-2 dev sentences, {m['model']}.", "",
             "Work per row, counted from the batches `Annotator.score` builds (load-independent):",
             "", "| labels | verbalisers | path | tree tokens/row | decoder tokens/row (padded) "
             "| head positions/row | GFLOP/row | vs single-token |", "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in out["work"]:
        tree = "-" if r["tree_tokens_per_row"] is None else r["tree_tokens_per_row"]
        lines.append(f"| {r['labels']} | {r['verbalisers']} | {path_name[r['path']]} | {tree} | "
                     f"{r['tokens_per_row']:.1f} | {r['head_positions_per_row']:.1f} | "
                     f"{r['gflop_per_row']:.2f} | {r['gflop_vs_single_token']:.2f}x |")
    if not out["rows"]:
        return "\n".join(lines) + "\n"
    lines += ["", f"Timed ({m['torch_threads']} torch threads, best of {m['repeats']}). Load: start "
              f"`{m['uptime_start']}`, end `{m['uptime_end']}`.", "",
              "| labels | verbalisers | tokens per label | path | items/s (wall) | cost vs "
              "single-token (wall) | items per CPU-s | cost vs single-token (CPU) | tree tokens/row "
              "| max abs log-prob diff |", "|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        tree = "-" if r["tree_tokens_per_row"] is None else r["tree_tokens_per_row"]
        lines.append(f"| {r['labels']} | {r['verbalisers']} | {r['verbaliser_tokens']} | "
                     f"{path_name[r['path']]} | "
                     f"{r['items_per_s']:.2f} | {r['cost_vs_single_token']:.2f}x | "
                     f"{r['items_per_cpu_s']:.2f} | {r['cpu_cost_vs_single_token']:.2f}x | {tree} | "
                     f"{r['max_abs_logprob_diff_vs_other_path']:.1e} |")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
