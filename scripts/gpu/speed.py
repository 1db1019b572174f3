"""The kit's speed checks: annotator items/s + MFU on the Llama-2-7B shape, the student's items/s.

annotator_7b_<bf16|nf4>: a random-init Llama-2-7B-shape model built on the device (NF4: each
decoder Linear quantised in place by bitsandbytes), scored through `Annotator` on SST-2-like and
IMDb-like texts with the prefix KV reused and not, then LlamBERT's naive loop (one prompt at a
time, sampled `generate`, 10 new tokens) on a few of the same prompts. FLOPs are
`lambert_ray.bench`'s count (2 x non-embedding params x tokens + attention + head at the answer
positions); a 4-bit weight counts as one weight (bitsandbytes packs two per byte), so NF4 and
bf16 do the same useful FLOPs and their MFUs compare directly.
"""

from __future__ import annotations

import torch
from kit import (
    SHAPE_OF_TINY,
    Mode,
    demo_config,
    quantize_nf4,
    random_causal_lm,
    texts,
    timed,
    tokenizer,
)

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's datasheet figure (the H100 SXM's too), no sparsity
LABELS = ["negative", "positive"]


def _peaks(mode: Mode) -> dict:
    from lambert_ray.bench import matmul_peak_gflops

    if mode.cpu:
        measured = matmul_peak_gflops(512, 3, torch.bfloat16, "cpu") / 1e3
        return {"nominal_tflops": None, "matmul_bf16_tflops": _sig(measured)}
    measured = matmul_peak_gflops(8192, 10, torch.bfloat16, "cuda") / 1e3
    return {"nominal_tflops": H200_BF16_DENSE_TFLOPS, "matmul_bf16_tflops": round(measured, 1)}


def _mfu(tflops: float, peaks: dict) -> dict:
    out = {"tflop_per_s": _sig(tflops), "mfu_vs_matmul": _sig(tflops / peaks["matmul_bf16_tflops"])}
    if peaks["nominal_tflops"]:
        out["mfu"] = _sig(tflops / peaks["nominal_tflops"])
    return out


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def check_annotator_7b(mode: Mode, precision: str) -> dict:
    from lambert_ray.annotator import Annotator
    from lambert_ray.bench import LMShape, llambert_generate_loop, timed_annotate

    tok = tokenizer(mode)
    build_s, model = timed(random_causal_lm, mode, "llama2-7b-shape", torch.bfloat16)
    if precision == "nf4":
        q_s, model = timed(quantize_nf4, model)
        build_s += q_s
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    shape = LMShape.of(model)
    peaks = _peaks(mode)
    out: dict = {"model": "llama2-7b-shape random-init" + (" (tiny)" if mode.tiny else ""),
                 "precision": precision, "build_s": round(build_s, 1),
                 "non_embedding_params": shape.non_embedding_params, **peaks, "runs": {}}
    sizes = {"sst2": (mode.n(2048, 8), mode.n(16, 1)), "imdb": (mode.n(512, 2), mode.n(4, 1))}
    for profile, (n, n_gen) in sizes.items():
        rows = texts(profile, n)
        cfg = demo_config(mode, max_length=256 if profile == "sst2" else 512)
        labels = {}
        for reuse in (True, False):
            ann = Annotator(model, tok, cfg.prompt, cfg.labels, max_length=cfg.llm.max_length,
                            token_budget=cfg.llm.token_budget, reuse_prefix=reuse)
            ann.score(rows[:mode.n(16, 2)])  # warm-up: kernels, allocator, the prefix KV
            run, probs = timed_annotate(ann, rows, chunk=n)
            labels[reuse] = probs.argmax(-1)
            s = run.summary([0] * n)
            key = f"{profile}/{'reuse' if reuse else 'no_reuse'}"
            out["runs"][key] = {
                "n": n, "seconds": s["seconds"], "items_per_s": round(s["items_per_s"], 2),
                "prompt_tokens_per_s": round(s["prompt_tokens_per_s"], 1),
                "computed_tokens_per_s": round(s["computed_tokens_per_s"], 1),
                "mean_prompt_tokens": round(run.prompt_tokens / n, 1),
                **_mfu(run.flops / run.seconds / 1e12, peaks)}
        out["runs"][f"{profile}/reuse_vs_no_reuse_label_match"] = round(
            float((labels[True] == labels[False]).mean()), 4)
        ann = Annotator(model, tok, cfg.prompt, cfg.labels, max_length=cfg.llm.max_length)
        prompts = [ann.builder.prefix_ids + r.ids for r in ann.builder.encode(rows[:n_gen])]
        llambert_generate_loop(model, tok, prompts[:1], LABELS, max_new_tokens=2)  # warm-up
        gen = llambert_generate_loop(model, tok, prompts, LABELS, max_new_tokens=10)
        out["runs"][f"{profile}/hf_generate_loop"] = {
            "n": n_gen, "seconds": round(gen.seconds, 3), "items_per_s": round(n_gen / gen.seconds, 3),
            "new_tokens": gen.extra["new_tokens"], **_mfu(gen.flops / gen.seconds / 1e12, peaks)}
        out["runs"][f"{profile}/speedup_vs_generate"] = round(
            out["runs"][f"{profile}/reuse"]["items_per_s"] / (n_gen / gen.seconds), 1)
    out["ok"] = all(v["items_per_s"] > 0 for v in out["runs"].values() if isinstance(v, dict))
    return out


def check_student(mode: Mode) -> dict:
    """RoBERTa-large-shape classifier (random init, bf16 on the GPU) through `bert.predict_proba`:
    the LlamBERT student; the SmolLM2 tokenizer stands in for RoBERTa's (ids < its vocabulary)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lambert_ray.bench import timed_classify

    cfg = AutoConfig.from_pretrained(mode.model_dir("roberta-large-shape"))
    if mode.tiny:
        for k, v in SHAPE_OF_TINY["roberta"].items():
            setattr(cfg, k, v)
    torch.manual_seed(0)
    with torch.device(mode.device):
        model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.bfloat16).eval()
    tok = tokenizer(mode)
    params = sum(p.numel() for p in model.parameters())
    out: dict = {"model": "roberta-large-shape random-init" + (" (tiny)" if mode.tiny else ""),
                 "params": params, "dtype": "bfloat16", "runs": {}}
    sizes = {"sst2": mode.n(4096, 8), "imdb": mode.n(1024, 2)}
    for profile, n in sizes.items():
        rows = texts(profile, n)
        max_length = 128 if profile == "sst2" else 512
        batch = 256 if profile == "sst2" and not mode.cpu else 64
        with torch.inference_mode():
            timed_classify(model, tok, rows[:batch], max_length, batch)  # warm-up
            items_s, probs = timed_classify(model, tok, rows, max_length, batch, repeats=mode.n(2, 1))
        n_tok = sum(min(len(x), max_length) for x in tok(rows)["input_ids"])
        out["runs"][profile] = {"n": n, "max_length": max_length, "batch_size": batch,
                                "items_per_s": round(items_s, 1),
                                "tokens_per_s": round(items_s * n_tok / n, 1)}
    out["ok"] = all(r["items_per_s"] > 0 for r in out["runs"].values())
    return out
