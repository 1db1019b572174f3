"""Shared test setup: offline HF, a project-local cache, one local Ray per session, tiny models.

Unit tests run without Ray. Tests marked `ray` share one `ray.init(address="local", num_cpus=2)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(ROOT / ".cache" / "hf"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_ext"))
os.environ.setdefault("RAY_TMPDIR", "/tmp/ray_tests")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DATA_DIR = Path(os.environ.get("LAMBERT_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole session (never attaches to a running cluster)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer random Llama with the real SmolLM2 tokenizer, saved as safetensors."""
    from peft_tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer random BERT with the real MiniLM tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lambert_ray.models import minilm_dir

    out = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)
