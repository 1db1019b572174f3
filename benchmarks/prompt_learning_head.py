"""Prompt-learning annotation: the output head at the answer positions only (today's
`scoring.label_logprobs`: virtual tokens as a KV cache) against peft's own forward with the full
[B, T, V] logits, on SmolLM2 + a prompt-tuning adapter, interleaved batch by batch.

    python benchmarks/prompt_learning_head.py --n 64 --method prompt_tuning

Prints seconds per variant, the speedup and the largest score difference (must be ~0).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch

from lambert_ray.annotator import pack_by_tokens
from lambert_ray.config import load_config
from lambert_ray.label_expand import make_expanded_batch
from lambert_ray.models import load_causal_lm
from lambert_ray.prompts import PromptBuilder
from lambert_ray.scoring import label_logprobs, make_batch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_speedups import full_logits_reference  # noqa: E402  (the pre-speedup computation)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--method", default="prompt_tuning", choices=["prompt_tuning", "prefix_tuning"])
    p.add_argument("--data-dir", default=os.environ.get("LAMBERT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    cfg = load_config(None, ["llm.device=cpu"])
    model, tok = load_causal_lm(cfg.llm.model, device="cpu")
    pcfg = (PromptTuningConfig if args.method == "prompt_tuning" else PrefixTuningConfig)(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20)
    model = get_peft_model(model, pcfg).eval()
    with open(Path(args.data_dir) / "sst2" / "dev.tsv", newline="", encoding="utf-8") as f:
        texts = [r["sentence"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][:args.n]
    b = PromptBuilder(tok, cfg.prompt, cfg.labels, cfg.llm.max_length)
    rows = [r.ids for r in b.encode(texts)]
    groups = [[rows[i] for i in idx]
              for idx in pack_by_tokens([len(r) + len(b.prefix_ids) for r in rows], cfg.llm.token_budget)]
    batches = [make_batch(g, b.verbalisers, tok.pad_token_id, b.prefix_ids) for g in groups]
    ref_batches = [make_expanded_batch(g, b.verbalisers, tok.pad_token_id, b.prefix_ids)
                   for g in groups]
    secs = {"head_at_answer": 0.0, "full_logits": 0.0}
    diff = 0.0
    with torch.inference_mode():
        label_logprobs(model, batches[0])  # warm-up
        for batch, ref_batch in zip(batches, ref_batches, strict=True):
            t0 = time.perf_counter()
            fast = label_logprobs(model, batch)
            secs["head_at_answer"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = full_logits_reference(model, ref_batch)
            secs["full_logits"] += time.perf_counter() - t0
            diff = max(diff, (fast - ref).abs().max().item())
    out = {"method": args.method, "n": len(texts), "batches": len(batches), **secs,
           "speedup": secs["full_logits"] / secs["head_at_answer"], "max_abs_logprob_diff": diff,
           "load": open("/proc/loadavg").read().split()[:3]}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
