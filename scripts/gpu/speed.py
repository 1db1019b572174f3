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

import math

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


def _plan_mfu(params: int, tokens_per_s: float, peaks: dict) -> dict:
    """Training MFU as `lambert-ray plan` counts it: 6 x params x tokens, params being the
    model's total (embeddings included, as in gpu_table.KNOWN_PARAMS)."""
    return {"tokens_per_s": round(tokens_per_s, 1), **_mfu(6 * params * tokens_per_s / 1e12, peaks)}


def _median_step(steps: int, fn, *args) -> tuple[float, list]:
    """`fn(*args)` run steps + 1 times, the first a warm-up (kernels, allocator): the median
    seconds of the timed runs, and every run's return value."""
    secs, outs = [], []
    for step in range(steps + 1):
        s, o = timed(fn, *args)
        outs.append(o)
        if step:
            secs.append(s)
    return sorted(secs)[len(secs) // 2], outs


def check_train(mode: Mode) -> dict:
    """Training throughput, for the two MFUs `plan` still assumes (gpu_table.MFU llm_train,
    bert_train), each through the production step:
    - qlora_7b: the peft stage's step (`wrap_peft` with k-bit preparation and gradient
      checkpointing, LoRA r from the demo config on an NF4 Llama-2-7B shape,
      `VerbaliserObjective`, AdamW) on SST-2-like and IMDb-like batches;
    - student: `bert.train_epoch` on the RoBERTa-large shape as train-bert runs it (fp32 weights,
      no autocast), and the same under bf16 autocast, which train-bert does not use.
    Tokens are the real (unpadded) prompt tokens of each batch, prefix included."""
    from correctness import _train_step

    from lambert_ray.bench import logical_numel
    from lambert_ray.bert import train_epoch
    from lambert_ray.finetune import VerbaliserObjective, encode_gold, trainable_params, wrap_peft
    from lambert_ray.peft_methods import METHODS
    from lambert_ray.prompts import PromptBuilder
    from lambert_ray.scoring import make_batch

    peaks = _peaks(mode)
    tok = tokenizer(mode)
    out: dict = {**peaks, "qlora_7b": {}, "student": {}}
    steps = mode.n(6, 2)
    # --- QLoRA on the 7B shape ---
    build_s, model = timed(random_causal_lm, mode, "llama2-7b-shape", torch.bfloat16)
    model = quantize_nf4(model)
    model.is_loaded_in_4bit = True  # as from_pretrained marks it: k-bit prep enables checkpointing
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    params = sum(logical_numel(p) for p in model.parameters())
    # llm.model: a local dir (the kit's tokenizer files), as the box has no packaged SmolLM2;
    # LoRA's build reads nothing from it
    cfg = demo_config(mode, max_length=512, overrides=(
        f"llm.model={mode.model_dir('smollm2')}", "peft.method=lora", "peft.quantization=4bit",
        "peft.gradient_checkpointing=true"))
    builder = PromptBuilder(tok, cfg.prompt, cfg.labels, cfg.llm.max_length)
    model = wrap_peft(cfg, model, builder, METHODS["lora"], quantized=True)
    objective = VerbaliserObjective(model)
    opt = torch.optim.AdamW(trainable_params(model), lr=1e-4)
    out["qlora_7b"]["build_s"] = round(build_s, 1)
    out["qlora_7b"]["trainable_params"] = sum(p.numel() for p in trainable_params(model))
    out["qlora_7b"]["params"] = params
    for profile, batch_rows in (("sst2", mode.n(32, 2)), ("imdb", mode.n(8, 1))):
        rows = encode_gold(builder, [(t, i % 2) for i, t in enumerate(texts(profile, batch_rows))])
        batch = make_batch([ids for ids, _ in rows], builder.verbalisers, tok.pad_token_id,
                           prefix=builder.prefix_ids)
        gold = torch.tensor([y for _, y in rows])
        n_tok = sum(len(builder.prefix_ids) + len(ids) for ids, _ in rows)
        step_s, losses = _median_step(steps, _train_step, objective, opt, batch, gold)
        losses = [round(x, 4) for x in losses]
        out["qlora_7b"][profile] = {"batch_rows": batch_rows, "tokens_per_step": n_tok,
                                    "step_s": round(step_s, 4), "losses": losses,
                                    **_plan_mfu(params, n_tok / step_s, peaks)}
    del model, objective, opt
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # --- the student: full fine-tuning of the RoBERTa-large shape ---
    from transformers import AutoConfig, AutoModelForSequenceClassification

    rcfg = AutoConfig.from_pretrained(mode.model_dir("roberta-large-shape"))
    if mode.tiny:
        for k, v in SHAPE_OF_TINY["roberta"].items():
            setattr(rcfg, k, v)
    for precision in ("fp32", "bf16_autocast"):
        torch.manual_seed(0)
        with torch.device(mode.device):
            student = AutoModelForSequenceClassification.from_config(rcfg)  # fp32 weights
        sparams = sum(p.numel() for p in student.parameters())
        sopt = torch.optim.AdamW(student.parameters(), lr=1e-5)
        res = {}
        for profile, batch_rows, max_length in (("sst2", mode.n(32, 2), 128),
                                                ("imdb", mode.n(16, 1), 512)):
            rows = texts(profile, batch_rows)
            ys = [i % 2 for i in range(batch_rows)]
            n_tok = sum(min(len(x), max_length) for x in tok(rows)["input_ids"])
            ctx = (torch.autocast(mode.device, dtype=torch.bfloat16) if precision != "fp32"
                   else torch.autocast(mode.device, enabled=False))
            with ctx:
                step_s, _ = _median_step(steps, train_epoch, student, tok, sopt, [(rows, ys)],
                                         max_length)
            res[profile] = {"batch_rows": batch_rows, "max_length": max_length,
                            "tokens_per_step": n_tok, "step_s": round(step_s, 4),
                            "rows_per_s": round(batch_rows / step_s, 1),
                            **_plan_mfu(sparams, n_tok / step_s, peaks)}
        out["student"][precision] = {"params": sparams, **res}
        del student, sopt
    q = out["qlora_7b"]
    out["ok"] = all(q[p]["tokens_per_s"] > 0 and all(math.isfinite(x) for x in q[p]["losses"])
                    for p in ("sst2", "imdb"))
    return out
