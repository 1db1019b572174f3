"""The air-gapped GPU kit (scripts/gpu/): 4-bit FLOP counting, NF4 on the CPU, the trimmed
bitsandbytes wheel, the answer-position slicing that transformers 5.17 accepts, and run_all.sh's
results.json / exit-code contract. The full rehearsal in the GPU box's package set is
scripts/gpu/rehearse.sh (a step of .ci/run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))

from kit_files import trim_bnb  # noqa: E402

from lambert_ray.bench import LMShape  # noqa: E402


def test_nf4_model_counts_the_same_non_embedding_params_as_bf16(tiny_llama):
    import kit
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    before = LMShape.of(model).non_embedding_params
    stored_before = sum(p.numel() for p in model.parameters())
    kit.quantize_nf4(model)
    assert sum(p.numel() for p in model.parameters()) < stored_before  # packed: 2 weights a byte
    assert LMShape.of(model).non_embedding_params == before


@pytest.fixture(scope="module")
def llama_64(tiny_llama, tmp_path_factory) -> str:
    """The kit's tiny Llama shape (64 wide: bitsandbytes' CPU 4-bit kernels need in_features of
    at least one 64-weight block) with the tiny_llama fixture's tokenizer."""
    import kit
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("llama_64")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **kit.SHAPE_OF_TINY["llama"])
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def test_nf4_annotator_runs_on_cpu_and_tracks_the_bf16_scores(llama_64):
    import bitsandbytes as bnb

    from lambert_ray.annotator import Annotator
    from lambert_ray.config import validate_config
    from lambert_ray.models import load_causal_lm

    cfg = validate_config({"data": {"corpus": {"path": "x.tsv"}},
                           "labels": {"names": ["negative", "positive"]},
                           "prompt": {"template": "Review: {text}\nAnswer?"}})
    texts = ["good", "a long and very boring film", "fine", "great fun", "bad"]
    scores = {}
    for quant in ("none", "4bit"):
        model, tok = load_causal_lm(llama_64, dtype="bfloat16", quantization=quant, device="cpu")
        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        assert (n4 > 0) == (quant == "4bit")
        ann = Annotator(model, tok, cfg.prompt, cfg.labels, max_length=64, token_budget=64)
        scores[quant] = np.asarray(ann.score(texts)["logprobs"])
    assert np.isfinite(scores["4bit"]).all()
    assert np.abs(scores["4bit"] - scores["none"]).max() < 0.1


def test_trimmed_bnb_wheel_keeps_only_the_named_kernels_and_a_matching_record(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.0.1-py3-none-any.whl"
    libs = ["cuda130", "cuda118", "cpu", "rocm64"]
    files = {f"bitsandbytes/libbitsandbytes_{b}.so": b"x" * 1000 for b in libs}
    files["bitsandbytes/__init__.py"] = b""
    record = "".join(f"{n},sha256=abc,1\n" for n in files) + "bitsandbytes-0.0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("bitsandbytes-0.0.1.dist-info/RECORD", record)
    trim_bnb(wheel, ["cuda130", "cpu"])
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        rec = z.read("bitsandbytes-0.0.1.dist-info/RECORD").decode()
    kept = {"bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cpu.so"}
    assert {n for n in names if n.endswith(".so")} == kept
    assert {ln.split(",")[0] for ln in rec.splitlines() if ".so" in ln} == kept
    assert "bitsandbytes/__init__.py" in names


def _run_all(tmp_path: Path, *flags: str) -> tuple[int, dict]:
    kit_dir = tmp_path / "kit"
    (kit_dir / "wheels").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GPU_KIT": str(kit_dir), "GPU_KIT_NO_WHEELS": "all", "GPU_KIT_ONLY": "env",
           "PYTHON": sys.executable, "GPU_KIT_SITE": str(tmp_path / "site"),
           "GPU_KIT_WORK": str(tmp_path / "work"), "GPU_KIT_TIMEOUT_SCALE": "10",
           "GPU_KIT_BUDGET_S": "3000"}
    out = tmp_path / ("out" + "".join(flags))
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu/run_all.sh"), str(out), *flags],
                          env=env, capture_output=True, text=True, timeout=900)
    return proc.returncode, json.loads((out / "results.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-box outcome")
def test_run_all_writes_results_and_exits_nonzero_when_a_check_fails(tmp_path):
    rc, res = _run_all(tmp_path)  # CUDA mode on a CPU box: the env check fails
    assert rc == 1
    assert "date_utc" in res["run"]
    env = res["checks"]["env"]
    assert env["status"] == "failed" and "mode and device disagree" in env["note"]
    assert env["packages"]["transformers"]["version"] and "peak_host_rss_mib" in env
    assert env["forbidden_imports"] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-box outcome")
def test_run_all_cpu_tiny_passes_on_one_thread_and_says_where_the_time_went(tmp_path):
    rc, res = _run_all(tmp_path, "--cpu", "--tiny")  # the rehearsal's mode, the env check only
    env = res["checks"]["env"]
    assert rc == 0 and env["status"] == "ok", env
    assert env["device"]["threads"] == 1  # tiny shapes: one thread (no OpenMP spin-waits)
    assert env["startup_s"] > 0 and env["process_cpu_s"] > 0
    assert res["run"]["cpu"] and res["run"]["tiny"]


def test_bookkeeping_calls_do_not_import_torch():
    """run_all.sh's --list / --start / --mark calls start in well under a second (no torch)."""
    code = ("import sys; sys.argv = ['checks.py', '--list', '--cpu']; "
            f"sys.path.insert(0, {str(ROOT / 'scripts' / 'gpu')!r}); import checks; checks.main(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names[:2] == ["env", "annotator_7b_bf16"] and len(names) == 13
    assert all(int(line.split()[1]) > 0 for line in proc.stdout.splitlines())
