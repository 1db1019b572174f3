"""PEFT methods on the real SmolLM2 + SST-2: dev accuracy before/after, size, time, memory.

    python benchmarks/peft_methods.py --methods lora,dora --n-train 500 --epochs 2 \
        --out results/peft_methods            # -> results/peft_methods.{json,md}

Per method (each in its own process, so peak memory is that method's): the 0-shot dev accuracy
and macro-F1 of the base model, the same after tuning, trainable parameters, adapter size on disk,
train wall time and peak RSS. Training is `lambert_ray.finetune.train_adapter` (no Ray: the core
loop the Ray Train workers run), with the annotator's prompt and verbaliser loss. Gold train rows
are a seeded sample of SST-2 train; dev is SST-2 dev (872, or --dev-limit). `--set` overrides
any config field, e.g. `--set peft.p_tuning.encoder_hidden_size=128`; `--lr method=value`
overrides one method's learning rate (default: the registry's per-method lr, or peft.lr).
Not a test; the full six-method run takes about an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "sst2_smollm2_lora.yaml"


def read_sst2(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        return [(r["sentence"].strip(), int(r["label"]))
                for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def run_one(args: argparse.Namespace) -> dict:
    """Child process: train one method, return its metadata."""
    import logging

    import torch

    from lambert_ray.config import load_config
    from lambert_ray.finetune import train_adapter

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("lambert_ray").setLevel(logging.INFO)  # per-epoch lines in the log file
    data = Path(args.data_dir) / "sst2"
    train = read_sst2(data / "train.tsv")
    train = random.Random(args.seed).sample(train, args.n_train)
    dev = read_sst2(data / "dev.tsv")[: args.dev_limit]
    overrides = [*args.set, f"peft.method={args.method}", f"peft.epochs={args.epochs}",
                 f"peft.seed={args.seed}"]
    if args.method_lr is not None:
        overrides.append(f"peft.lr={args.method_lr}")
    cfg = load_config(args.config, overrides)
    t0 = time.perf_counter()
    meta = train_adapter(cfg, train, dev, Path(args.adapters) / args.method)
    meta["benchmark_wall_s"] = round(time.perf_counter() - t0, 1)
    meta["train_s"] = round(sum(h["epoch_s"] for h in meta["history"]), 1)
    return meta


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| method | dev acc before | dev acc after | macro-F1 after | trainable params | "
             "adapter MB | lr | train+eval s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in rows:
        lines.append(
            f"| {m['method']} | {100 * m['dev_before']['accuracy']:.1f} % | "
            f"{100 * m['dev_after']['accuracy']:.1f} % | {100 * m['dev_after']['macro_f1']:.1f} | "
            f"{m['trainable_params']:,} | {m['adapter_mb']:.2f} | {m['training']['lr']:g} | "
            f"{m['train_s']:.0f} | {m['peak_memory_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--methods", default="lora,dora,prefix_tuning,p_tuning,prompt_tuning,ia3")
    ap.add_argument("--n-train", type=int, default=500, help="gold train sentences (<= 1000)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--dev-limit", type=int, default=None, help="first N dev sentences (all: 872)")
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", default=os.environ.get("LAMBERT_DATA_DIR",
                                                         str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--out", default="results/peft_methods", help="writes OUT.json and OUT.md")
    ap.add_argument("--adapters", default="results/peft_adapters")
    ap.add_argument("--child", metavar="METHOD", help=argparse.SUPPRESS)
    ap.add_argument("--method-lr", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.method = args.child
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    lrs = dict(kv.split("=", 1) for kv in args.lr)
    results = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method, "--config", args.config,
               "--n-train", str(args.n_train), "--epochs", str(args.epochs),
               "--seed", str(args.seed), "--data-dir", args.data_dir, "--adapters", args.adapters,
               *(["--dev-limit", str(args.dev_limit)] if args.dev_limit else []),
               *(["--threads", str(args.threads)] if args.threads else []),
               *(["--method-lr", lrs[method]] if method in lrs else []),
               *[x for kv in args.set for x in ("--set", kv)]]
        log_path = Path(f"{args.out}.{method}.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"== {method} (progress: {log_path})", flush=True)
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(log_path.read_text()[-3000:], file=sys.stderr)
            raise SystemExit(f"{method} failed (exit {proc.returncode})")
        meta = json.loads(line[len("RESULT "):])
        results.append(meta)
        print(f"   dev {meta['dev_before']['accuracy']:.3f} -> {meta['dev_after']['accuracy']:.3f}"
              f"  trainable {meta['trainable_params']:,}  {meta['adapter_mb']:.2f} MB"
              f"  {meta['train_s']:.0f} s  peak {meta['peak_memory_mb']:.0f} MB", flush=True)
    header = (f"PEFT on SmolLM2-135M-Instruct, SST-2: {args.n_train} gold train sentences, "
              f"{args.epochs} epoch(s), dev = {results[0]['n_dev']} SST-2 dev sentences, "
              f"{os.cpu_count()} CPU cores")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"header": header, "args": vars(args),
                                                    "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(results, header))
    print(markdown(results, header))


if __name__ == "__main__":
    main()
