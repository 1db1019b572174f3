"""Annotation and classification throughput, same model and inputs, one run.

    python benchmarks/annotate_throughput.py --n 200 --n-baseline 50 --out results/bench_annotate.json

Parts (--parts, comma-separated; default all):
  peak       fp32 matmul GFLOP/s of this machine, measured now (best of a few 2048^3 matmuls)
  llambert   LlamBERT's loop: sampled `generate`, batch 1, 10 new tokens, fp32, parse the text
  annotator  lambert_ray's Annotator with (reuse) and without (noreuse) prefix KV reuse,
             interleaved chunk by chunk (chunk = annotate.batch_size rows, as an actor gets them)
  bert       MiniLM classification items/s on the same sentences
  int8       a quick MiniLM student (or --student-dir), fp32 vs classify.int8 on SST-2 dev
  ray        the annotate actor pool (Ray Data) vs a bare loop; 1 vs 2 actors

GFLOP/s = useful forward FLOPs / wall seconds, with the count of lambert_ray.bench:
2 * non-embedding params * tokens + 4 * layers * d_attn * attended positions + 2 * d * V per
answer position (padding not counted). SST-2 is read from --data-dir (or LAMBERT_DATA_DIR).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lambert_ray.annotator import Annotator, load_annotator_model
from lambert_ray.bench import (
    LMShape,
    RunResult,
    interleaved_annotate,
    llambert_generate_loop,
    matmul_peak_gflops,
)
from lambert_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
ALL_PARTS = ["peak", "llambert", "annotator", "bert", "int8", "ray"]


def read_sst2(path: Path, n: int | None) -> tuple[list[str], list[int]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:n] if n else rows
    return [r["sentence"].strip() for r in rows], [int(r["label"]) for r in rows]


def load() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_llm_parts(args, cfg, texts, gold, results) -> None:
    model, tok = load_annotator_model(cfg.llm)
    shape = LMShape.of(model)
    results["model"] = {"name": cfg.llm.model, "dtype": str(next(model.parameters()).dtype),
                        "non_embedding_params": shape.non_embedding_params,
                        "layers": shape.layers, "hidden": shape.hidden, "vocab": shape.vocab}
    kw = dict(max_length=cfg.llm.max_length, token_budget=cfg.llm.token_budget)
    anns = {"reuse": Annotator(model, tok, cfg.prompt, cfg.labels, reuse_prefix=True, **kw),
            "noreuse": Annotator(model, tok, cfg.prompt, cfg.labels, reuse_prefix=False, **kw)}
    for a in anns.values():  # warm-up (first-call allocations; the prefix KV of `reuse`)
        a.score(texts[:4])
    base_runs: list = []
    nb = min(args.n_baseline, len(texts)) if "llambert" in args.parts else 0
    b = anns["reuse"].builder
    prompts = [b.prefix_ids + r.ids for r in b.encode(texts[:nb])]

    def baseline_slice(k: int, n_chunks: int) -> None:
        """The LlamBERT loop on slice k of its items, between the annotator chunks."""
        lo, hi = k * nb // n_chunks, (k + 1) * nb // n_chunks
        print(f"[chunk {k + 1}/{n_chunks}] llambert {hi - lo} items, then annotators; load {load()}",
              flush=True)
        if hi > lo:
            base_runs.append(llambert_generate_loop(
                model, tok, prompts[lo:hi], cfg.labels.answers, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed + k))

    if "annotator" in args.parts:
        runs = interleaved_annotate(anns, texts, args.chunk, baseline_slice if nb else None)
    elif nb:
        baseline_slice(0, 1)
    if nb:
        r = base_runs
        run = RunResult([p for x in r for p in x.preds], sum(x.seconds for x in r),
                        sum(x.prompt_tokens for x in r), sum(x.computed_tokens for x in r),
                        sum(x.flops for x in r), {"new_tokens": sum(x.extra["new_tokens"] for x in r),
                                                  "sample_answers": r[0].extra["sample_answers"]})
        results["llambert"] = run.summary(gold[:nb]) | {
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "do_sample": True, "batch_size": 1, "load": load()}
    if "annotator" in args.parts:
        for name, (run, _) in runs.items():
            results[f"annotator_{name}"] = run.summary(gold) | {
                "chunk": args.chunk, "token_budget": cfg.llm.token_budget, "load": load()}
        a, b = runs["reuse"], runs["noreuse"]
        results["reuse_vs_noreuse"] = {
            "label_agreement": float(np.mean(np.asarray(a[0].preds) == np.asarray(b[0].preds))),
            "accuracy_delta_points": 100 * (results["annotator_reuse"]["accuracy"]
                                            - results["annotator_noreuse"]["accuracy"]),
            "max_abs_prob_diff": float(np.abs(a[1] - b[1]).max()),
            "speedup": b[0].seconds / a[0].seconds}
        if "llambert" in results:
            nb = results["llambert"]["n"]
            sub = np.asarray(a[0].preds[:nb]) == np.asarray(gold[:nb])
            results["reuse_vs_llambert"] = {
                "items_per_s_ratio": results["annotator_reuse"]["items_per_s"]
                / results["llambert"]["items_per_s"],
                "annotator_accuracy_on_baseline_items": float(sub.mean())}


def print_table(results: dict) -> None:
    peak = results.get("peak_gflops")
    rows = [("llambert", "LlamBERT loop (generate, bs 1)"), ("annotator_reuse", "Annotator, prefix reuse"),
            ("annotator_noreuse", "Annotator, no prefix reuse")]
    head = (f"{'system':32} {'n':>5} {'items/s':>8} {'prompt tok/s':>12} {'GFLOP/s':>8} "
            f"{'% peak':>7} {'accuracy':>8} {'dropped':>7}")
    print("\n" + head + "\n" + "-" * len(head))
    for key, label in rows:
        if key in results:
            r = results[key]
            pk = f"{100 * r['gflop_per_s'] / peak:.0f}%" if peak else "-"
            print(f"{label:32} {r['n']:>5} {r['items_per_s']:>8.2f} {r['prompt_tokens_per_s']:>12.0f} "
                  f"{r['gflop_per_s']:>8.1f} {pk:>7} {r['accuracy']:>8.1%} {r['drop_rate']:>7.1%}")
    if peak:
        print(f"fp32 matmul peak (2048^3, best of 5): {peak:.1f} GFLOP/s")
    for key in ("reuse_vs_llambert", "reuse_vs_noreuse"):
        if key in results:
            print(key, json.dumps({k: round(v, 4) for k, v in results[key].items()}))
    if "bert" in results:
        print(f"BERT (MiniLM) classify: {results['bert']['items_per_s']:.1f} items/s "
              f"on {results['bert']['n']} sentences")
    if "int8" in results:
        r = results["int8"]
        print(f"student fp32 {r['fp32_items_per_s']:.1f} items/s acc {r['fp32_accuracy']:.1%} | int8 "
              f"{r['int8_items_per_s']:.1f} items/s acc {r['int8_accuracy']:.1%} "
              f"(delta {r['accuracy_delta_points']:+.2f} pts, x{r['speedup']:.2f}) on {r['n']} dev rows")
    if "ray" in results:
        r = results["ray"]
        print(f"bare loop: {r['bare']['seconds']:.1f}s ({r['bare']['items_per_s']:.2f} items/s, "
              f"load {r['bare']['load_s']:.1f}s)")
        for k, v in r.items():
            if k.startswith("pool_"):
                print(f"{k}: {v['seconds']:.1f}s ({v['items_per_s']:.2f} items/s), overhead vs bare "
                      f"{v['overhead_vs_bare_pct']:+.1f}%, labels = bare {v['label_agreement_with_bare']:.1%}")
        for k, v in r.get("steady_state", {}).items():
            print(f"steady state {k} ({v['n_small']} -> {v['n_large']} rows): bare "
                  f"{v['bare_s_per_row'] * 1e3:.1f} ms/row, pool {v['pool_s_per_row'] * 1e3:.1f} ms/row "
                  f"-> overhead {v['marginal_overhead_pct']:+.1f}% per row; fixed start-up "
                  f"bare {v['bare_fixed_s']:.1f}s, pool {v['pool_fixed_s']:.1f}s")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo-sst2.yaml"))
    p.add_argument("--data-dir", default=os.environ.get("LAMBERT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--n", type=int, default=200, help="SST-2 dev sentences for the annotator/BERT/Ray parts")
    p.add_argument("--n-baseline", type=int, default=50, help="sentences for the (slow) LlamBERT loop")
    p.add_argument("--n-ray", default=None,
                   help="sentences for the Ray part (default --n); two sizes, e.g. 256,1024, also "
                        "give the steady-state overhead (fixed start-up cost fitted out)")
    p.add_argument("--parts", default=",".join(ALL_PARTS))
    p.add_argument("--chunk", type=int, default=None, help="rows per score call (default annotate.batch_size)")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--actors", default="1,2", help="Ray pool sizes to time")
    p.add_argument("--student-dir", default=None, help="a trained student (else one is trained)")
    p.add_argument("--student-train", type=int, default=2000, help="gold train rows for the quick student")
    p.add_argument("--student-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="config override section.key=value")
    p.add_argument("--out", default=str(ROOT / "results" / "bench_annotate.json"))
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if unknown := set(args.parts) - set(ALL_PARTS):
        p.error(f"unknown parts {sorted(unknown)}; known: {ALL_PARTS}")
    cfg = load_config(args.config, ["llm.device=cpu", *args.set])
    args.chunk = args.chunk or cfg.annotate.batch_size
    data = Path(args.data_dir) / "sst2"
    texts, gold = read_sst2(data / "dev.tsv", args.n)

    results: dict = {"meta": {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "uptime_start": uptime(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "config": args.config, "overrides": args.set,
        "n": len(texts), "data": str(data / "dev.tsv"), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}}
    if "peak" in args.parts:
        results["peak_gflops"] = matmul_peak_gflops(2048, 5)
    if {"llambert", "annotator"} & set(args.parts):
        run_llm_parts(args, cfg, texts, gold, results)
    if "bert" in args.parts:
        from parts import bert_speed

        results["bert"] = bert_speed(cfg.labels.names, texts, cfg.bert.max_length) | {"load": load()}
    if "int8" in args.parts:
        from parts import int8_vs_fp32, train_student

        dev_texts, dev_gold = read_sst2(data / "dev.tsv", None)
        if args.student_dir:
            from lambert_ray.bert import load_classifier

            model, tok = load_classifier(args.student_dir, cfg.labels.names)
            trained = args.student_dir
        else:
            tr_texts, tr_gold = read_sst2(data / "train.tsv", args.student_train)
            t0 = time.perf_counter()
            model, tok = train_student(cfg.labels.names, list(zip(tr_texts, tr_gold, strict=True)),
                                       cfg.bert.max_length, args.student_epochs, args.seed)
            trained = f"minilm, {len(tr_texts)} SST-2 train rows, {args.student_epochs} epoch(s), " \
                      f"{time.perf_counter() - t0:.0f}s"
        results["int8"] = int8_vs_fp32(model, tok, dev_texts, dev_gold, cfg.bert.max_length) | {
            "student": trained, "within_half_point": None, "load": load()}
        results["int8"]["within_half_point"] = abs(results["int8"]["accuracy_delta_points"]) <= 0.5
    if "ray" in args.parts:
        from parts import ray_pool_vs_bare, steady_state

        sizes = [int(x) for x in str(args.n_ray or args.n).split(",")]
        actors = [int(a) for a in args.actors.split(",")]
        runs = []
        for n in sizes:
            rt, rg = read_sst2(data / "dev.tsv", n)
            runs.append(ray_pool_vs_bare(cfg, rt, rg, actors) | {"load": load()})
        results["ray"] = runs[-1]
        if len(runs) > 1:
            results["ray"] = {**runs[-1], "sizes": runs, "steady_state": steady_state(runs, actors)}
    if "peak" in args.parts:  # again at the end: the best of both is the machine's peak
        results["peak_gflops_start"] = results["peak_gflops"]
        results["peak_gflops_end"] = matmul_peak_gflops(2048, 5)
        results["peak_gflops"] = max(results["peak_gflops_start"], results["peak_gflops_end"])
        if "annotator_reuse" in results:
            results["annotator_reuse"]["fraction_of_peak"] = (
                results["annotator_reuse"]["gflop_per_s"] / results["peak_gflops"])
    results["meta"]["uptime_end"] = uptime()
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out}  ({results['meta']['uptime_start']} -> {results['meta']['uptime_end']})")
    return results


if __name__ == "__main__":
    main()
