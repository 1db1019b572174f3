"""Shared pieces of the GPU kit's checks: the run mode, the model shapes, the timing helpers.

No Ray, no DeepSpeed: everything here runs on a box holding only torch, transformers, peft,
pydantic and bitsandbytes (the kit ships the last four). Model weights never travel: the shapes'
config files do (`.gpu_kit/models/`), and random-init weights are written on the device.
"""

from __future__ import annotations

import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("ray", "deepspeed")  # the kit's import closure must hold neither
WORDS = ("the film is a charming moving dull tedious bold clever funny slow bleak gorgeous story "
         "acting script cast never quite works but often lands with warmth and wit plot score "
         "ending director performance scene").split()
SHAPE_OF_TINY = {"llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16),
                 "roberta": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4)}


@dataclass(frozen=True)
class Mode:
    """cuda (the GPU box) or cpu (the rehearsal); tiny shrinks every shape to a few layers."""

    cpu: bool
    tiny: bool
    kit: Path
    work: Path

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"

    @property
    def smoke(self) -> bool:
        """The CPU rehearsal: the same code path on a few rows, steps and tokens, in seconds."""
        return self.cpu or self.tiny

    def n(self, real: int, smoke: int) -> int:
        """A size: `real` on the GPU box, `smoke` in the rehearsal."""
        return smoke if self.smoke else real

    def model_dir(self, name: str) -> Path:
        return self.kit / "models" / name


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> dict:
    """Peak GPU memory of this process (each check runs in its own); host RSS on CPU."""
    if torch.cuda.is_available():
        return {"peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "peak_gpu_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1)}
    return {"peak_host_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def forbidden_imports() -> list[str]:
    return sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN))


def texts(profile: str, n: int, seed: int = 0) -> list[str]:
    """Deterministic synthetic reviews: 'sst2' 5-40 words (SST-2's sentences), 'imdb' 50-600
    words (IMDb's reviews; the long ones are cut at llm.max_length, as in production)."""
    lo, hi = (5, 40) if profile == "sst2" else (50, 600)
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def tokenizer(mode: Mode):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mode.model_dir("smollm2"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def llama_config(mode: Mode, name: str):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(mode.model_dir(name))
    if mode.tiny:
        for k, v in SHAPE_OF_TINY["llama"].items():
            setattr(cfg, k, v)
    return cfg


def random_causal_lm(mode: Mode, name: str, dtype: torch.dtype, seed: int = 0):
    """A random-init LlamaForCausalLM of shape `name`, built directly on the device."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(mode.device):
        model = LlamaForCausalLM._from_config(llama_config(mode, name), dtype=dtype)
    return model.eval()


def saved_causal_lm(mode: Mode, name: str) -> str:
    """Random-init weights of shape `name` written once (bf16 safetensors + tokenizer) under the
    work dir, so checks load them through the production path (`models.load_causal_lm`, bf16 or
    bitsandbytes NF4 like a real checkpoint). Returns the directory."""
    out = mode.work / (name + ("-tiny" if mode.tiny else ""))
    if (out / "config.json").exists():
        return str(out)
    model = random_causal_lm(mode, name, torch.bfloat16)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer(mode).save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


def quantize_nf4(model, compute_dtype: torch.dtype = torch.bfloat16):
    """Every decoder nn.Linear (not the output head) -> bitsandbytes NF4 Linear4bit with double
    quantisation (QLoRA's recipe, what `from_pretrained(quantization_config=...)` builds),
    quantised on the weights' own device, layer by layer."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                dev = child.weight.device
                q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                      bias=child.bias is not None, compute_dtype=compute_dtype,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(mod, child_name, q.to(dev))
                del child
    return model


def demo_config(mode: Mode, max_length: int = 512, token_budget: int | None = None,
                overrides: tuple[str, ...] = ()):
    """The demo's SST-2 prompt (its instruction is the shared prefix) as a PipelineConfig."""
    from lambert_ray.config import load_config

    budget = token_budget or (2048 if mode.cpu else 16384)
    return load_config(str(ROOT / "configs" / "demo-sst2.yaml"),
                       [f"llm.device={mode.device}", f"llm.max_length={max_length}",
                        f"llm.token_budget={budget}", *overrides])


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    sync()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return time.perf_counter() - t0, out
