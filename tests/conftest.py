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
    from tests.peft_tiny import make_tiny_llama

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


def write_corpus(path: Path, n: int = 40, fmt: str = "tsv") -> Path:
    """A small labelled corpus in SST-2's shape (sentence, label) with unique texts."""
    import pandas as pd

    words = ["good", "bad", "fine", "awful", "great", "dull", "fun", "poor"]
    rows = [{"sentence": f"{words[i % 8]} movie number {i} , {words[(i * 3) % 8]} plot",
             "label": int(words[i % 8] in ("good", "fine", "great", "fun"))} for i in range(n)]
    df = pd.DataFrame(rows)
    if fmt == "tsv":
        df.to_csv(path, sep="\t", index=False)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    return path


def pipeline_raw(tmp: Path, llm: str, bert: str, n: int = 40) -> dict:
    """A complete raw config dict on tiny models and a small corpus under `tmp`."""
    write_corpus(tmp / "train.tsv", n)
    write_corpus(tmp / "test.tsv", 24)
    return {
        "run": {"name": "t", "output_dir": str(tmp / "runs"), "seed": 0},
        "data": {"data_dir": str(tmp),
                 "corpus": {"path": "train.tsv", "text_column": "sentence", "label_column": "label"},
                 "annotate_sample": 16, "gold_train_sample": 8, "llm_eval_limit": 8,
                 "gold_train": {"path": "train.tsv", "text_column": "sentence", "label_column": "label"},
                 "gold_dev": {"path": "test.tsv", "text_column": "sentence", "label_column": "label"},
                 "gold_test": {"path": "test.tsv", "text_column": "sentence", "label_column": "label"},
                 "label_values": [0, 1], "classify_limit": 30},
        "labels": {"names": ["negative", "positive"]},
        "prompt": {"system": "Answer 'positive' or 'negative'.",
                   "template": "Review: {text}\nIs it positive or negative?"},
        "llm": {"model": llm, "max_length": 64, "token_budget": 256, "device": "cpu"},
        "annotate": {"batch_size": 8, "num_cpus": 0.25},
        "classify": {"batch_size": 16, "num_cpus": 0.25},
        "bert": {"model": bert, "epochs": 1, "batch_size": 8, "max_length": 32,
                 "settings": ["llm"], "cpus_per_worker": 0.25},
    }
