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


S3_BUCKET = "lambert-test"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3 API (moto's server on 127.0.0.1) holding the bucket S3_BUCKET, so `s3://`
    outputs are tested without a cloud account. The AWS_* variables are set in this process
    before `ray_local` starts Ray, so its workers reach the same endpoint."""
    import logging
    import socket

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1",
                      allow_bucket_creation=True).create_dir(S3_BUCKET)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One embedded local Ray for the whole session (never attaches to a running cluster).
    Started after `s3_endpoint`, so workers inherit its AWS_* variables."""
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
