"""N adapters in one pass on one base model vs N separate single-adapter passes (SmolLM2, SST-2).

    python benchmarks/multi_adapter.py --n 200 --out results/bench_multi_adapter

Adapters: the trained IA3 adapter of /work/lab/adapters/ia3 (--ia3) when it exists, plus LoRA and
prompt tuning adapters from random init (the registry's default hyperparameters; LoRA's B drawn
small so it is not the identity), written to --workdir. Both arms read SST-2 dev rows from disk
and score them in actor-sized chunks (annotate.batch_size) with the pipeline's config:
- separate: per adapter, load base + adapter (`Annotator.from_config` with llm.adapter), read
  the rows, score them: what N runs of the annotate stage cost today.
- multi: load base + all adapters once (`MultiAnnotator`), read the rows once, score each chunk
  under every adapter.
Items = rows x adapters labelled. The two arms' log-probs are compared (max |difference|).

--stages N: also time the pipeline's stages on Ray (what a cluster run costs): N separate
`annotate` stages (llm.adapter = each adapter; each reads the rows from disk, starts its actor
pool and loads base + adapter) against one `annotate_adapters` stage (one read, one pool, one
base with every adapter), over N rows of SST-2 dev written to a TSV, local Ray on this box.

--mixed K: also time peft's mixed-batch forward (`adapter_names=`, every row under 2 random LoRA
adapters in one forward, packed to the same token budget) against switching with
`set_adapter`, on K rows, chunk by chunk interleaved, both without prefix reuse (the mixed
batch has no per-adapter prefix cache).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lambert_ray.annotator import Annotator, pack_by_tokens
from lambert_ray.config import LLMConfig, LoraParams, PromptTuningParams, load_config
from lambert_ray.models import load_causal_lm, resolve_llm, set_cpu_threads
from lambert_ray.multi_adapter import MultiAnnotator
from lambert_ray.peft_methods import BuildContext, get_method
from lambert_ray.scoring import label_logprobs, make_batch

ROOT = Path(__file__).resolve().parent.parent
IA3 = Path("/work/lab/adapters/ia3")


def read_sst2(path: Path, n: int) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"].strip() for r in rows[:n]]


def loadavg() -> float:
    return float(open("/proc/loadavg").read().split()[0])


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def make_adapters(llm: LLMConfig, workdir: Path, init_text: str, ia3: str) -> dict[str, str]:
    """{name: dir}: random LoRA x2 (seeds 1, 2), random prompt tuning, and the real IA3."""
    from peft import get_peft_model

    path = resolve_llm(llm.model)
    out = {}
    for name, method, seed in [("lora", "lora", 1), ("lora_b", "lora", 2),
                               ("prompt_tuning", "prompt_tuning", 3)]:
        d = workdir / name
        if not (d / "adapter_config.json").exists():
            base, _ = load_causal_lm(llm.model, dtype="float32", device="cpu")
            params = PromptTuningParams() if method == "prompt_tuning" else LoraParams()
            pc = get_method(method).build(params, BuildContext(path, init_text))
            torch.manual_seed(seed)
            model = get_peft_model(base, pc)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.02)
            model.save_pretrained(d)
        out[name] = str(d)
    if ia3 and Path(ia3).exists():
        out["ia3"] = ia3
    return out


def separate_passes(cfg, adapters: dict[str, str], data: Path, n: int) -> tuple[dict, dict]:
    runs, out = {}, {}
    for name, path in adapters.items():
        t0 = time.perf_counter()
        one = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"adapter": path})})
        ann = Annotator.from_config(one)
        t1 = time.perf_counter()
        texts = read_sst2(data, n)
        t2 = time.perf_counter()
        logps: list = []
        for i in range(0, len(texts), cfg.annotate.batch_size):
            logps.extend(ann.score(texts[i:i + cfg.annotate.batch_size])["logprobs"])
        t3 = time.perf_counter()
        runs[name] = {"load_s": t1 - t0, "read_s": t2 - t1, "score_s": t3 - t2,
                      "total_s": t3 - t0}
        out[name] = np.array(logps)
        del ann
    return runs, out


def multi_pass(cfg, adapters: dict[str, str], data: Path, n: int) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    ann = MultiAnnotator.from_config(cfg, adapters)
    t1 = time.perf_counter()
    texts = read_sst2(data, n)
    t2 = time.perf_counter()
    logps: dict[str, list] = {name: [] for name in adapters}

    def score(chunk):
        for name, o in ann.score(chunk).items():
            logps[name].extend(o["logprobs"])

    for i in range(0, len(texts), cfg.annotate.batch_size):
        score(texts[i:i + cfg.annotate.batch_size])
    t3 = time.perf_counter()
    run = {"load_s": t1 - t0, "read_s": t2 - t1, "score_s": t3 - t2, "total_s": t3 - t0,
           "score_s_per_adapter": {k: v["seconds"] for k, v in ann.stats.items()}}
    return run, {k: np.array(v) for k, v in logps.items()}


def mixed_vs_switch(cfg, adapters: dict[str, str], data: Path, n: int) -> dict:
    """Two LoRA adapters: peft's mixed-batch forward vs set_adapter switching, interleaved."""
    names = ["lora", "lora_b"]
    nopre = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"reuse_prefix": False})})
    ann = MultiAnnotator.from_config(nopre, {k: adapters[k] for k in names})
    slot = ann.slots[names[0]]
    model, peft_names = slot.model, [ann.slots[k].peft_name for k in names]
    one = ann._annotators[names[0]]
    builder, pad = one.builder, one.tokenizer.pad_token_id
    texts = read_sst2(data, n)
    budget, n_prefix = cfg.llm.token_budget, len(builder.prefix_ids)

    @torch.inference_mode()
    def mixed(chunk: list[str]) -> np.ndarray:
        rows = [r.ids for r in builder.encode(chunk)]
        out = np.zeros((len(names), len(rows), len(cfg.labels.names)), dtype=np.float32)
        for idx in pack_by_tokens([len(r) + n_prefix for r in rows], budget, len(names)):
            sub = [rows[i] for i in idx]
            batch = make_batch([r for _ in names for r in sub], builder.verbalisers, pad,
                               builder.prefix_ids)
            tags = [p for p in peft_names for _ in sub]
            with model.base_model._enable_peft_forward_hooks(adapter_names=tags):
                lp = label_logprobs(model, batch).float().view(len(names), len(sub), -1)
            out[:, idx] = lp.numpy()
        return out

    t_switch = t_mixed = 0.0
    diff = 0.0
    mixed(texts[:4])  # warm-up (and the switching arm's first call below)
    ann.score(texts[:4])
    for i in range(0, len(texts), cfg.annotate.batch_size):
        chunk = texts[i:i + cfg.annotate.batch_size]
        t0 = time.perf_counter()
        sw = ann.score(chunk)
        t1 = time.perf_counter()
        mx = mixed(chunk)
        t2 = time.perf_counter()
        t_switch += t1 - t0
        t_mixed += t2 - t1
        for j, name in enumerate(names):
            diff = max(diff, float(np.abs(np.array(sw[name]["logprobs"]) - mx[j]).max()))
    items = len(texts) * len(names)
    return {"adapters": names, "rows": len(texts), "switch_s": t_switch, "mixed_s": t_mixed,
            "switch_items_per_s": items / t_switch, "mixed_items_per_s": items / t_mixed,
            "mixed_over_switch_time": t_mixed / t_switch, "max_abs_dlogp": diff}


def stage_arms(cfg, adapters: dict[str, str], data: Path, n: int, workdir: Path) -> dict:
    """N `annotate` stages vs one `annotate_adapters` stage on local Ray (module docstring)."""
    from lambert_ray.annotate import adapter_output, annotate, annotate_adapters
    from lambert_ray.config import validate_config
    from lambert_ray.data import read_source
    from lambert_ray.ray_utils import init_ray
    from lambert_ray.stage import read_output

    tsv = workdir / "rows.tsv"
    texts = read_sst2(data, n)
    tsv.write_text("sentence\tlabel\n" + "".join(f"{t}\t0\n" for t in texts), encoding="utf-8")
    raw = cfg.model_dump(mode="json")
    raw["data"] = {**raw["data"], "data_dir": str(workdir),
                   "corpus": {"path": str(tsv), "text_column": "sentence", "label_column": "label"}}
    base = validate_config(raw)
    init_ray(None, 2)
    t0 = time.perf_counter()
    separate: dict[str, float] = {}
    labels: dict[str, list] = {}
    for name, path in adapters.items():
        t = time.perf_counter()
        one = base.model_copy(update={"llm": base.llm.model_copy(update={"adapter": path})})
        out = str(workdir / f"stage_{name}")
        annotate(one, read_source(one, "corpus"), out, rows_in=n)
        separate[name] = time.perf_counter() - t
        labels[name] = read_output(out, ["row_id", "label_id"]).sort_values("row_id")["label_id"].tolist()
    separate_s = time.perf_counter() - t0
    t = time.perf_counter()
    multi = base.model_copy(update={"llm": base.llm.model_copy(update={"adapters": adapters})})
    out = str(workdir / "stage_all")
    annotate_adapters(multi, read_source(multi, "corpus"), out, rows_in=n)
    one_s = time.perf_counter() - t
    equal = {name: adapter_output(out, name, ["row_id", "label_id"]).sort_values("row_id")
             ["label_id"].tolist() == labels[name] for name in adapters}
    return {"rows": n, "separate_s": separate_s, "separate_per_adapter_s": separate,
            "one_pass_s": one_s, "speedup": separate_s / one_s, "labels_equal": equal,
            "items_per_s_separate": n * len(adapters) / separate_s,
            "items_per_s_one_pass": n * len(adapters) / one_s}


def to_markdown(r: dict) -> str:
    m, s = r["multi"], r["separate"]
    lines = [
        "# Multi-adapter annotation: one pass vs separate passes",
        "",
        f"Command: `{r['meta']['command']}`",
        "",
        f"Load: start `{r['meta']['uptime_start']}`, end `{r['meta']['uptime_end']}`"
        + (" — **under load** (1-min load average above 3 on a 2-core box; the numbers are "
           "noisy and slower than on an idle box)" if r["meta"]["under_load"] else ""),
        "",
        f"{r['model']} (fp32, CPU, {r['meta']['torch_threads']} threads), "
        f"{r['rows']} SST-2 dev rows, adapters: "
        + ", ".join(f"{k} ({v})" for k, v in r["adapter_methods"].items())
        + f"; prefix reuse {'on' if r['reuse_prefix'] else 'off'}, chunks of "
        f"{r['chunk']} rows, token budget {r['token_budget']}.",
        "",
        "| arm | model loads | load s | read s | score s | total s | items/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {len(s['runs'])} separate passes | {len(s['runs'])} | {s['load_s']:.1f} | "
        f"{s['read_s']:.2f} | {s['score_s']:.1f} | {s['total_s']:.1f} | {s['items_per_s']:.1f} |",
        f"| one pass, all adapters | 1 | {m['load_s']:.1f} | {m['read_s']:.2f} | "
        f"{m['score_s']:.1f} | {m['total_s']:.1f} | {m['items_per_s']:.1f} |",
        "",
        f"Speed-up of one pass: **{r['speedup']:.2f}x** (separate total / one-pass total). "
        "Items = rows x adapters.",
        "",
        "Per adapter, scoring seconds (separate / one pass) and max |log-prob difference| between "
        "the arms:",
        "",
        "| adapter | method | separate score s | one-pass score s | max abs dlogp | labels equal |",
        "|---|---|---:|---:|---:|---|",
    ]
    for k in r["adapter_methods"]:
        a = r["agreement"][k]
        lines.append(f"| {k} | {r['adapter_methods'][k]} | {s['runs'][k]['score_s']:.1f} | "
                     f"{m['score_s_per_adapter'][k]:.1f} | {a['max_abs_dlogp']:.2e} | "
                     f"{a['labels_equal']} |")
    if "stages" in r:
        x = r["stages"]
        lines += ["", "## As pipeline stages on Ray (local Ray, this box)", "",
                  f"{x['rows']} rows read from a TSV; {len(x['separate_per_adapter_s'])} `annotate` "
                  "stages (one per adapter: read, actor pool, base + adapter loaded, scored) vs "
                  "one `annotate_adapters` stage:", "",
                  "| arm | seconds | items/s |", "|---|---:|---:|",
                  f"| separate stages | {x['separate_s']:.1f} | {x['items_per_s_separate']:.1f} |",
                  f"| one stage, all adapters | {x['one_pass_s']:.1f} | "
                  f"{x['items_per_s_one_pass']:.1f} |", "",
                  f"Speed-up: **{x['speedup']:.2f}x**. Labels equal per adapter: "
                  + ", ".join(f"{k} {v}" for k, v in x["labels_equal"].items()) + "."]
    if "mixed" in r:
        x = r["mixed"]
        lines += ["", "## peft mixed-batch forward vs set_adapter switching (2 LoRA adapters)", "",
                  f"{x['rows']} rows, every row under both adapters, same token budget, no prefix "
                  "reuse, interleaved chunk by chunk:", "",
                  "| mechanism | seconds | items/s |", "|---|---:|---:|",
                  f"| set_adapter per batch | {x['switch_s']:.1f} | {x['switch_items_per_s']:.1f} |",
                  f"| mixed batch (`adapter_names`) | {x['mixed_s']:.1f} | "
                  f"{x['mixed_items_per_s']:.1f} |", "",
                  f"Mixed / switch time: {x['mixed_over_switch_time']:.2f}; max |dlogp| "
                  f"{x['max_abs_dlogp']:.2e}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo-sst2.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="a.b=value")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--mixed", type=int, default=96, help="rows for the mixed-batch part (0: skip)")
    ap.add_argument("--stages", type=int, default=0, help="rows for the Ray stage arms (0: skip)")
    ap.add_argument("--ia3", default=str(IA3), help="a trained IA3 adapter of the model ('': none)")
    ap.add_argument("--workdir", default=None, help="where the random adapters are written")
    ap.add_argument("--out", default=None, help="results/<name>: writes <name>.json and .md")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    cfg = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"device": "cpu",
                                                                    "dtype": "float32"})})
    threads = set_cpu_threads(None)
    data = Path(cfg.data.data_dir) / "sst2" / "dev.tsv"
    meta = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
            "uptime_start": uptime(), "load_start": loadavg(), "torch": torch.__version__,
            "torch_threads": threads, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="multi_adapter_"))
    adapters = make_adapters(cfg.llm, workdir, "Is this review positive or negative?", args.ia3)
    main_set = {k: adapters[k] for k in ("ia3", "lora", "prompt_tuning") if k in adapters}
    from peft import PeftConfig

    from lambert_ray.peft_methods import method_of_adapter

    methods = {k: method_of_adapter(PeftConfig.from_pretrained(v)).name for k, v in main_set.items()}
    load_causal_lm(cfg.llm.model, dtype="float32", device="cpu")  # warm the page cache
    multi, multi_lp = multi_pass(cfg, main_set, data, args.n)
    runs, sep_lp = separate_passes(cfg, main_set, data, args.n)
    items = args.n * len(main_set)
    separate = {k: sum(r[k] for r in runs.values()) for k in ("load_s", "read_s", "score_s",
                                                              "total_s")}
    separate.update(runs=runs, items_per_s=items / separate["total_s"])
    multi["items_per_s"] = items / multi["total_s"]
    agreement = {k: {"max_abs_dlogp": float(np.abs(multi_lp[k] - sep_lp[k]).max()),
                     "labels_equal": bool((multi_lp[k].argmax(1) == sep_lp[k].argmax(1)).all())}
                 for k in main_set}
    results = {"meta": meta, "model": cfg.llm.model, "rows": args.n, "adapter_methods": methods,
               "reuse_prefix": cfg.llm.reuse_prefix, "chunk": cfg.annotate.batch_size,
               "token_budget": cfg.llm.token_budget, "multi": multi, "separate": separate,
               "speedup": separate["total_s"] / multi["total_s"], "agreement": agreement}
    if args.mixed:
        results["mixed"] = mixed_vs_switch(cfg, adapters, data, args.mixed)
    if args.stages:
        results["stages"] = stage_arms(cfg, main_set, data, args.stages, workdir)
    meta.update(uptime_end=uptime(), load_end=loadavg())
    meta["under_load"] = max(meta["load_start"], meta["load_end"]) > 3
    print(to_markdown(results))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        out.with_suffix(".md").write_text(to_markdown(results))
    return results


if __name__ == "__main__":
    main()
