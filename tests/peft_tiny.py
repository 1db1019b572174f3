"""Shared helpers for the PEFT tests: a tiny random-init Llama with the real SmolLM2 tokenizer,
a pipeline config pointing at it, and a small separable gold set."""

from __future__ import annotations

from pathlib import Path

import torch

from lambert_ray.config import PipelineConfig, validate_config
from lambert_ray.models import resolve_llm

POS = ["a wonderful film", "great acting and a great story", "I loved it", "superb and moving",
       "a delight from start to end", "brilliant, funny and warm", "excellent work", "truly great"]
NEG = ["a terrible film", "awful acting and a dull story", "I hated it", "boring and lifeless",
       "a mess from start to end", "dreadful, stupid and cold", "horrible work", "truly awful"]
GOLD = [(t, 1) for t in POS] + [(t, 0) for t in NEG]


def make_tiny_llama(out_dir: Path, seed: int = 0) -> str:
    """Save a 2-layer, 32-wide random Llama + the SmolLM2 tokenizer to out_dir; return the path."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_llm("smollm2"))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.3,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def tiny_config(model_path: str, method: str = "lora", **peft: object) -> PipelineConfig:
    """A pipeline config whose LLM is the tiny model; `peft` overrides the peft section."""
    section = {"method": method, "epochs": 8, "batch_size": 4, "lr": 3e-2,
               "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "dora": {"r": 4, "alpha": 8, "dropout": 0.0},
               "prefix_tuning": {"num_virtual_tokens": 4},
               "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
               "prompt_tuning": {"num_virtual_tokens": 4},
               "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"],
                       "feedforward_modules": ["down_proj"]},
               "zero_stage": 2, "num_workers": 1, "cpus_per_worker": 0.5}
    section.update(peft)
    return validate_config({
        "run": {"name": "peft-test", "output_dir": "runs"},
        "data": {"corpus": {"path": "x.tsv"}},
        "labels": {"names": ["negative", "positive"]},
        "prompt": {"system": "Answer positive or negative.",
                   "template": "Review: {text}\nIs it positive or negative?"},
        "llm": {"model": model_path, "max_length": 64, "token_budget": 512, "device": "cpu",
                "dtype": "float32"},
        "peft": section,
    })


def save_random_adapter(model_path: str, method: str, out_dir: Path, seed: int = 0) -> str:
    """A `method` adapter (tiny_config's hyperparameters) on the tiny model with random weights,
    so it moves every score away from the base's and from other seeds'; saved to out_dir."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lambert_ray.peft_methods import BuildContext, get_method

    cfg = tiny_config(model_path, method)
    peft_config = get_method(method).build(cfg.peft.params(), BuildContext(model_path, "Review"))
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), peft_config)
    for p in model.parameters():
        if p.requires_grad:  # IA3 scales around 1; the others add around 0
            torch.nn.init.normal_(p, mean=1.0 if method == "ia3" else 0.0, std=0.3)
    model.save_pretrained(out_dir)
    return str(out_dir)
