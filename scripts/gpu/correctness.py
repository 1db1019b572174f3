"""The kit's environment and correctness checks (each returns a dict; `ok` says pass/fail).

- env: device, driver, versions and where each package was imported from (shipped or the box's);
- nf4_agreement: the same random-init SmolLM2-shape checkpoint loaded bf16 and bitsandbytes NF4
  through `models.load_causal_lm`; label log-probs compared;
- prefix_reuse: `Annotator` with the prefix KV reused vs recomputed per row: labels identical;
- peft_<method>: a few training steps on NF4 lower the loss; the saved adapter reloads with the
  same weights and the same scores.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from kit import Mode, demo_config, saved_causal_lm, texts, timed

SENTENCES = [("a gripping , beautifully acted film", 1), ("dull , lifeless and far too long", 0),
             ("one of the year 's most satisfying movies", 1), ("a mess of clichés", 0),
             ("funny , warm and surprisingly moving", 1), ("the plot makes no sense at all", 0),
             ("an absolute delight from start to finish", 1), ("i wanted my two hours back", 0)]
PACKAGES = ("transformers", "peft", "pydantic", "pydantic_core", "bitsandbytes", "accelerate",
            "tokenizers", "huggingface_hub", "safetensors", "numpy", "yaml")


def check_env(mode: Mode) -> dict:
    from lambert_ray.bench import matmul_peak_gflops

    out: dict = {"python": sys.version.split()[0], "torch": torch.__version__,
                 "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                 "packages": {}}
    for name in PACKAGES:
        try:
            mod = importlib.import_module(name)
            out["packages"][name] = {"version": getattr(mod, "__version__", "?"),
                                     "from": str(Path(mod.__file__).parent.parent)}
        except Exception as e:  # reported, and fails the check below
            out["packages"][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    from peft import PeftType

    out["peft_has_cartridge"] = hasattr(PeftType, "CARTRIDGE")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / 2**30, 1),
                         "multiprocessors": p.multi_processor_count}
        try:
            out["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            out["nvidia_smi"] = f"unavailable: {e}"
        out["matmul_bf16_tflops"] = round(matmul_peak_gflops(8192, 10, torch.bfloat16, "cuda") / 1e3, 1)
    else:
        out["device"] = {"name": "cpu", "threads": torch.get_num_threads()}
        out["matmul_fp32_tflops"] = round(matmul_peak_gflops(512, 3) / 1e3, 4)
    if mode.cpu == torch.cuda.is_available():
        out["note"] = "mode and device disagree (--cpu on a GPU box, or no GPU without --cpu)"
    out["ok"] = (all("error" not in v for v in out["packages"].values())
                 and mode.cpu != torch.cuda.is_available())
    return out


def _scores(model, tok, cfg, rows: list[str], reuse: bool = True) -> np.ndarray:
    from lambert_ray.annotator import Annotator

    ann = Annotator(model, tok, cfg.prompt, cfg.labels, max_length=cfg.llm.max_length,
                    token_budget=cfg.llm.token_budget, reuse_prefix=reuse)
    return np.asarray(ann.score(rows)["logprobs"], dtype=np.float64)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Label log-prob agreement of two [n, 2] score arrays."""
    ma, mb = a[:, 1] - a[:, 0], b[:, 1] - b[:, 0]
    diff = np.abs(a - b)
    same = a.argmax(-1) == b.argmax(-1)
    # a label flip is numeric noise when that row's margin is within the runs' largest difference
    noise = bool(np.all(np.abs(ma[~same]) <= 2 * diff.max() + 1e-12))
    corr = float(np.corrcoef(ma, mb)[0, 1]) if ma.std() > 0 and mb.std() > 0 else float("nan")
    return {"n": len(a), "argmax_match": round(float(same.mean()), 4),
            "max_abs_logprob_diff": float(diff.max()), "mean_abs_logprob_diff": float(diff.mean()),
            "margin_corr": round(corr, 4), "margin_std": float(ma.std()),
            "flips_within_noise": noise, "finite": bool(np.isfinite(a).all() and np.isfinite(b).all())}


def check_nf4_agreement(mode: Mode) -> dict:
    from lambert_ray.models import load_causal_lm

    path = saved_causal_lm(mode, "smollm2")
    cfg = demo_config(mode, max_length=256)
    rows = texts("sst2", mode.n(256, 16)) + texts("imdb", mode.n(32, 2), seed=1)
    out, scores = {"model": "smollm2-shape random-init" + (" (tiny)" if mode.tiny else "")}, {}
    for quant in ("none", "4bit"):
        model, tok = load_causal_lm(path, dtype="bfloat16", quantization=quant, device=mode.device)
        secs, scores[quant] = timed(_scores, model, tok, cfg, rows)
        out[f"score_s_{quant}"] = round(secs, 3)
        del model
    out.update(compare(scores["none"], scores["4bit"]))
    # Random weights give near-uniform labels, so NF4's rounding moves the margins relative to
    # their spread far more than on a trained model: the pass bar is a sanity bound (finite,
    # margins still clearly correlated), the numbers are the measurement.
    out["ok"] = out["finite"] and out["margin_corr"] >= 0.5
    return out


def check_prefix_reuse(mode: Mode) -> dict:
    from lambert_ray.models import load_causal_lm

    path = saved_causal_lm(mode, "smollm2")
    cfg = demo_config(mode, max_length=256, token_budget=1024)  # several batches, mixed lengths
    rows = texts("sst2", mode.n(96, 12)) + texts("imdb", mode.n(16, 2), seed=2)
    out: dict = {"model": "smollm2-shape random-init" + (" (tiny)" if mode.tiny else "")}
    for dtype in ("float32", "bfloat16"):
        model, tok = load_causal_lm(path, dtype=dtype, device=mode.device)
        out[dtype] = compare(_scores(model, tok, cfg, rows, True), _scores(model, tok, cfg, rows, False))
        del model
    # fp32: labels must be identical; bf16: a flip is allowed only inside the numeric noise
    out["ok"] = (out["float32"]["argmax_match"] == 1.0 and out["bfloat16"]["flips_within_noise"]
                 and out["float32"]["finite"] and out["bfloat16"]["finite"])
    return out


def check_peft(mode: Mode, method_name: str) -> dict:
    from peft import PeftModel, get_peft_model_state_dict, prepare_model_for_kbit_training

    from lambert_ray.finetune import (
        VerbaliserObjective,
        encode_gold,
        trainable_params,
        wrap_peft,
    )
    from lambert_ray.models import load_causal_lm
    from lambert_ray.peft_methods import METHODS
    from lambert_ray.prompts import PromptBuilder
    from lambert_ray.scoring import make_batch, unwrap

    method = METHODS[method_name]
    path = saved_causal_lm(mode, "smollm2")
    cfg = demo_config(mode, max_length=128, token_budget=2048, overrides=(
        f"llm.model={path}", "llm.dtype=bfloat16", f"peft.method={method_name}",
        "peft.quantization=4bit", "peft.gradient_checkpointing=true"))
    base, tok = load_causal_lm(path, dtype="bfloat16", quantization="4bit", device=mode.device)
    builder = PromptBuilder(tok, cfg.prompt, cfg.labels, cfg.llm.max_length)
    model = wrap_peft(cfg, base, builder, method, quantized=True)
    objective = VerbaliserObjective(model)
    opt = torch.optim.AdamW(trainable_params(model), lr=method.default_lr)
    rows = encode_gold(builder, SENTENCES)
    batch = make_batch([ids for ids, _ in rows], builder.verbalisers, tok.pad_token_id,
                       prefix=builder.prefix_ids)
    gold = torch.tensor([y for _, y in rows])
    losses, step_s = [], []
    for step in range(mode.n(9, 5)):  # step 0 warms up (kernels, allocator): untimed
        secs, loss = timed(_train_step, objective, opt, batch, gold)
        losses.append(loss)
        if step:
            step_s.append(secs)
    model.eval()
    probe = [t for t, _ in SENTENCES] + texts("sst2", mode.n(8, 2), seed=3)
    trained = _scores(model, tok, cfg, probe)
    with tempfile.TemporaryDirectory(dir=mode.work) as d:
        unwrap(model).save_pretrained(d)
        adapter_mib = sum(f.stat().st_size for f in Path(d).iterdir()) / 2**20
        base2, _ = load_causal_lm(path, dtype="bfloat16", quantization="4bit", device=mode.device)
        # the same k-bit preparation as at training time (it casts norms to fp32)
        base2 = prepare_model_for_kbit_training(base2, use_gradient_checkpointing=False)
        reloaded = PeftModel.from_pretrained(base2, d).eval()
        again = _scores(reloaded, tok, cfg, probe)
        saved_sd, loaded_sd = get_peft_model_state_dict(unwrap(model)), get_peft_model_state_dict(reloaded)
    exact = set(saved_sd) == set(loaded_sd) and all(
        torch.equal(saved_sd[k].cpu(), loaded_sd[k].cpu()) for k in saved_sd)
    trainable, total = unwrap(model).get_nb_trainable_parameters()
    reload = compare(trained, again)
    out = {"method": method_name, "base": "smollm2-shape NF4" + (" (tiny)" if mode.tiny else ""),
           "losses": [round(x, 4) for x in losses], "step_s": round(float(np.mean(step_s)), 4),
           "train_tokens_per_s": round(int(batch.attention_mask.sum()) / float(np.mean(step_s)), 1),
           "trainable_params": int(trainable), "total_params": int(total),
           "adapter_mib": round(adapter_mib, 3), "adapter_weights_roundtrip_exact": exact,
           "reload": reload}
    out["ok"] = (losses[-1] < losses[0] and exact and reload["finite"]
                 and reload["max_abs_logprob_diff"] <= 1e-3 and reload["argmax_match"] == 1.0)
    return out


def _train_step(objective, opt, batch, gold) -> float:
    logp = objective(batch)
    loss = torch.nn.functional.cross_entropy(logp, gold.to(logp.device))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()
