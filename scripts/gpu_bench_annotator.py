"""Annotator throughput on one GPU (no Ray): bf16 and 4-bit NF4 (bitsandbytes), a random-init
Llama-2-7B-shaped model and SmolLM2; items/s, tokens/s and model FLOP utilisation (MFU).

    python scripts/gpu_bench_annotator.py                       # CUDA: llama7b + smollm2, bf16 + nf4
    python scripts/gpu_bench_annotator.py --tiny --n 16         # CPU smoke test: tiny random Llama

The 7B model is `LlamaConfig()` (hidden 4096, 32 layers, 32 heads, MLP 11008) with random weights
and the vocabulary resized to the SmolLM2 tokenizer's (49,152 instead of 32,000): embeddings are
a lookup and the head runs only at the answer position, so the non-embedding parameters and the
FLOPs per token are Llama-2-7B's. NF4 replaces every decoder nn.Linear by bitsandbytes'
Linear4bit (QLoRA's NF4 + double quantisation, bf16 compute), as `from_pretrained` would.
MFU = useful FLOPs / s / --peak-tflops (default 989: H100 SXM dense bf16), with the FLOP count
of lambert_ray.bench (2 * non-embedding params * tokens + attention + head at answer positions).
Texts: SST-2 dev from --data-dir when present, else deterministic synthetic sentences.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from lambert_ray.annotator import Annotator
from lambert_ray.bench import LMShape, annotator_flops, matmul_peak_gflops
from lambert_ray.config import load_config
from lambert_ray.models import resolve_llm

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the film is a charming moving dull tedious bold clever funny slow bleak gorgeous "
         "story acting script cast never quite works but often lands with warmth and wit").split()


def texts_for(n: int, data_dir: str | None, seed: int = 0) -> list[str]:
    path = Path(data_dir or "") / "sst2" / "dev.tsv"
    if data_dir and path.exists():
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            rows = [r["sentence"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
        return (rows * (n // len(rows) + 1))[:n]
    rng = random.Random(seed)  # SST-2-like lengths: 5 to 40 words
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n)]


def quantize_nf4(model, device: torch.device, compute_dtype: torch.dtype):
    """Swap every nn.Linear except the output head for an NF4 Linear4bit (quantised on `.to`)."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True,
                                      quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(mod, child_name, q.to(device))
                del child
    return model


def build_model(kind: str, precision: str, tok, device: torch.device, tiny: bool):
    """(model, description): 'llama7b' random-init or 'smollm2' weights, in bf16 or NF4."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16
    if kind == "llama7b":
        shape = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4) if tiny else {}
        cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
        torch.manual_seed(0)
        # NF4 quantises from host memory, layer by layer, so bf16 7B never sits twice on the GPU
        with torch.device("cpu" if precision == "nf4" else device):
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_llm("smollm2"), dtype=dtype,
                                                     use_safetensors=True)
    if precision == "nf4":
        model = quantize_nf4(model, device, dtype)
    model.to(device).eval()
    return model


def bench_one(model, tok, cfg, texts: list[str], token_budget: int, peak_tflops: float) -> dict:
    ann = Annotator(model, tok, cfg.prompt, cfg.labels, max_length=cfg.llm.max_length,
                    token_budget=token_budget)
    ann.score(texts[:8])  # warm-up: kernels, allocator, the prefix KV
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = ann.score(texts)  # returns numpy: the device work is finished when it returns
    sync()
    secs = time.perf_counter() - t0
    n_prefix = len(ann.builder.prefix_ids)
    rows = [n - n_prefix for n in out["n_tokens"]]
    flops = annotator_flops(LMShape.of(model), n_prefix, rows, True, ann.expansion)
    return {"n": len(texts), "seconds": secs, "items_per_s": len(texts) / secs,
            "prompt_tokens_per_s": sum(out["n_tokens"]) / secs,
            "computed_tokens_per_s": sum(rows) / secs, "tflop_per_s": flops / secs / 1e12,
            "mfu": flops / secs / (peak_tflops * 1e12), "token_budget": token_budget,
            "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                                if torch.cuda.is_available() else None)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llama7b,smollm2")
    p.add_argument("--precisions", default="bf16,nf4")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--token-budget", type=int, default=None,
                   help="padded tokens per forward (default 16384 on CUDA, 2048 on CPU)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--tiny", action="store_true", help="tiny random Llama instead of 7B (CPU smoke)")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo-sst2.yaml"))
    p.add_argument("--data-dir", default=os.environ.get("LAMBERT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = args.token_budget or (16384 if device.type == "cuda" else 2048)
    cfg = load_config(args.config, [f"llm.device={device.type}"])
    tok = AutoTokenizer.from_pretrained(resolve_llm("smollm2"))
    texts = texts_for(args.n, args.data_dir)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "peak_tflops_given": args.peak_tflops, "tiny": args.tiny, "n": len(texts),
                     "torch": torch.__version__, "runs": {}}
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    results["matmul_tflops_measured"] = matmul_peak_gflops(4096 if device.type == "cuda" else 1024,
                                                           5, dt, device.type) / 1e3
    for kind in args.models.split(","):
        for prec in args.precisions.split(","):
            key = f"{kind}{'-tiny' if args.tiny and kind == 'llama7b' else ''}/{prec}"
            try:
                model = build_model(kind, prec, tok, device, args.tiny)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                results["runs"][key] = bench_one(model, tok, cfg, texts, budget, args.peak_tflops)
            except Exception as e:  # one failing variant (e.g. no bnb kernels) must not hide the rest
                results["runs"][key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            finally:
                model = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            r = results["runs"][key]
            if "error" in r:
                print(f"{key:22} ERROR {r['error']}", flush=True)
            else:
                print(f"{key:22} {r['items_per_s']:9.1f} items/s {r['prompt_tokens_per_s']:10.0f} "
                      f"prompt tok/s {r['tflop_per_s']:8.2f} TFLOP/s  MFU {r['mfu']:.1%}", flush=True)
    print(f"measured matmul peak: {results['matmul_tflops_measured']:.2f} TFLOP/s ({dt}); "
          f"MFU against --peak-tflops {args.peak_tflops}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
