"""GPU check of the PEFT core (no Ray, no DeepSpeed): train step + scoring per method on a 4-bit
NF4 base, for SmolLM2 and for a random-init model of Llama-2-7B's shape.

    python scripts/gpu_check_peft.py                      # GPU: both models, all six methods
    python scripts/gpu_check_peft.py --models smollm2 --methods lora,prefix_tuning --steps 5
    python scripts/gpu_check_peft.py --tiny               # CPU: tiny random Llama, fp32, no 4-bit

Per (model, method) it prints the mean train-step time (forward + verbaliser loss + backward +
AdamW step), training tokens/s (real, unpadded prompt tokens), scoring items/s through the
Annotator, peak GPU memory (torch.cuda.max_memory_allocated since the method started), trainable
parameters, and the loss of the first and last step (it should fall: the batches repeat). The
7B-shaped model is LlamaConfig() defaults (4096 wide, 32 layers, 11008 FFN) with the vocabulary
widened to the SmolLM2 tokenizer's 49,152 ids; it is written once as bf16 safetensors (~14 GB)
under --work and loaded through bitsandbytes NF4 like a real checkpoint. JSON lines go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lambert_ray.annotator import Annotator  # noqa: E402
from lambert_ray.config import PipelineConfig, validate_config  # noqa: E402
from lambert_ray.finetune import (  # noqa: E402
    VerbaliserObjective,
    encode_gold,
    epoch_batches,
    trainable_params,
    wrap_peft,
)
from lambert_ray.models import load_causal_lm, resolve_llm  # noqa: E402
from lambert_ray.peft_methods import METHODS  # noqa: E402
from lambert_ray.prompts import PromptBuilder  # noqa: E402
from lambert_ray.scoring import make_batch  # noqa: E402

SENTENCES = [("a gripping , beautifully acted film", 1), ("dull , lifeless and far too long", 0),
             ("one of the year 's most satisfying movies", 1), ("a mess of clichés", 0),
             ("funny , warm and surprisingly moving", 1), ("the plot makes no sense at all", 0),
             ("an absolute delight from start to finish", 1), ("i wanted my two hours back", 0)]


def make_config(model: str, method: str, quantization: str, device: str, dtype: str) -> PipelineConfig:
    return validate_config({
        "data": {"corpus": {"path": "unused.tsv"}},
        "labels": {"names": ["negative", "positive"]},
        "prompt": {"system": "Please answer with 'positive' or 'negative' only!",
                   "template": "Decide if the following movie review is positive or negative:\n"
                               "{text}\nAnswer 'positive' or 'negative'."},
        "llm": {"model": model, "max_length": 256, "token_budget": 4096, "device": device,
                "dtype": dtype},
        "peft": {"method": method, "quantization": quantization, "lr": 1e-3,
                 "gradient_checkpointing": True},
    })


def random_llama(out: Path, tokenizer_dir: str, tiny: bool) -> str:
    """A random-init Llama (7B shape, or tiny) with the SmolLM2 tokenizer, saved once."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return str(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if tiny else {}
    config = LlamaConfig(vocab_size=max(32000, len(tok)), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del model
    return str(out)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check(model_path: str, method: str, args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available() and not args.tiny
    quant = "none" if args.tiny or args.no_4bit else "4bit"
    cfg = make_config(model_path, method, quant, "cuda" if cuda else "cpu",
                      "bfloat16" if cuda else "float32")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base, tok = load_causal_lm(model_path, dtype=cfg.llm.dtype, quantization=quant,
                               device=cfg.llm.device)
    builder = PromptBuilder(tok, cfg.prompt, cfg.labels, cfg.llm.max_length)
    model = wrap_peft(cfg, base, builder, METHODS[method], quantized=quant != "none")
    objective = VerbaliserObjective(model)
    opt = torch.optim.AdamW(trainable_params(model), lr=cfg.peft.lr)
    rows = encode_gold(builder, (SENTENCES * 64)[: args.batch_size])
    chunk = epoch_batches(rows, args.batch_size, 0, 0)[0]
    batch = make_batch([ids for ids, _ in chunk], builder.verbalisers, tok.pad_token_id,
                       prefix=builder.prefix_ids)
    gold = torch.tensor([y for _, y in chunk])
    losses, times = [], []
    for step in range(args.steps + 1):  # step 0 warms up (kernels, allocator), not timed
        _sync()
        t0 = time.perf_counter()
        logp = objective(batch)
        loss = torch.nn.functional.cross_entropy(logp, gold.to(logp.device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        if step:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    model.eval()
    texts = [t for t, _ in SENTENCES] * max(1, args.score_items // len(SENTENCES))
    ann = Annotator(model, tok, cfg.prompt, cfg.labels, max_length=cfg.llm.max_length,
                    token_budget=cfg.llm.token_budget)
    ann.score(texts[:8])
    _sync()
    t0 = time.perf_counter()
    ann.score(texts)
    _sync()
    score_s = time.perf_counter() - t0
    step_s = sum(times) / len(times)
    trainable, total = model.get_nb_trainable_parameters()
    out = {"model": Path(model_path).name, "method": method, "quantization": quant,
           "batch_size": args.batch_size, "step_s": round(step_s, 4),
           "train_tokens_per_s": round(int(batch.attention_mask.sum()) / step_s, 1),
           "score_items_per_s": round(len(texts) / score_s, 1),
           "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
           "trainable_params": int(trainable), "total_params": int(total),
           "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}
    del model, base, objective, opt, ann
    if cuda:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="smollm2,llama2-7b-shape")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--score-items", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="CPU, fp32: a tiny random Llama, no 4-bit")
    ap.add_argument("--no-4bit", action="store_true", help="bf16 base instead of NF4")
    ap.add_argument("--work", default=os.environ.get("TMPDIR", "/tmp") + "/lambert_gpu_check")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU smoke version")
    smol = resolve_llm("smollm2")
    paths = {"smollm2": smol}
    if "llama2-7b-shape" in args.models:
        paths["llama2-7b-shape"] = random_llama(
            Path(args.work) / ("tiny-llama" if args.tiny else "llama2-7b-shape"), smol, args.tiny)
    if args.tiny:  # SmolLM2 itself is too slow for a CPU smoke run: the tiny model stands in
        paths["smollm2"] = random_llama(Path(args.work) / "tiny-llama", smol, True)
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    for name in args.models.split(","):
        for method in args.methods.split(","):
            r = check(paths[name], method, args)
            r["model"] = name + (" (tiny stand-in)" if args.tiny else "")
            print(json.dumps(r), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
