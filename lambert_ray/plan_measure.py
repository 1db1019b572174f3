"""What `lambert-ray plan` measures on this machine, without Ray and without training a thing.

- `count_rows`: a table's row count, cheaply (Parquet footers; a newline count for CSV/TSV/JSONL).
- `head_sample`: a seeded sample of the first rows of a table, read with pandas/pyarrow.
- `token_stats`: the prompt split (prefix / text / suffix) and tokens per row for a sample.
- `calibrate_llm` / `calibrate_student`: N rows through the annotator (with and without a fresh
  adapter of `peft.method`), one PEFT train pass, and the student's train step and classify.

All rates are measured here, now, under whatever else this machine is doing.
"""

from __future__ import annotations

import csv
import io
import logging
import random
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from transformers import AutoTokenizer

from lambert_ray import storage
from lambert_ray.annotator import Annotator, load_annotator_model
from lambert_ray.bert import load_classifier, predict_proba, train_epoch
from lambert_ray.classify import quantize_int8
from lambert_ray.config import PipelineConfig, TableSource
from lambert_ray.data import Normalizer, detect_format, resolve_path
from lambert_ray.finetune import (
    VerbaliserObjective,
    encode_gold,
    epoch_batches,
    run_epoch,
    trainable_params,
    wrap_peft,
)
from lambert_ray.models import pick_device, resolve_encoder, resolve_llm, set_cpu_threads
from lambert_ray.peft_methods import get_method
from lambert_ray.prompts import PromptBuilder

log = logging.getLogger(__name__)

_CHUNK = 1 << 22


def _files(path: str, fmt: str) -> list[str]:
    if not storage.is_dir(path):
        return [path]
    ext = {"parquet": ".parquet", "csv": ".csv", "tsv": ".tsv", "jsonl": ".json"}[fmt]
    return [f for f in storage.list_files(path) if ext in f.rsplit("/", 1)[-1]]


def _count_lines(path: str) -> int:
    fs, p = storage.resolve(path)
    n, last = 0, b"\n"
    with fs.open_input_stream(p) as f:
        while chunk := f.read(_CHUNK):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def count_rows(src: TableSource, data_dir: str) -> int | None:
    """Rows of a table without reading it through Ray: Parquet footer counts; for CSV/TSV the
    line count less the header (a quoted value spanning lines counts once per line); JSONL lines.
    None for `hf://` datasets (no network here). `limit` caps the count."""
    if src.path.startswith("hf://"):
        return src.limit
    path = resolve_path(data_dir, src.path)
    fmt = detect_format(src, path)
    total = 0
    for f in _files(path, fmt):
        if fmt == "parquet":
            fs, p = storage.resolve(f)
            total += pq.ParquetFile(fs.open_input_file(p)).metadata.num_rows
        else:
            total += _count_lines(f) - (fmt in ("csv", "tsv"))
    return min(total, src.limit) if src.limit else total


def _read_head(path: str, fmt: str, n: int) -> pd.DataFrame:
    fs, p = storage.resolve(path)
    if fmt == "parquet":
        batches = pq.ParquetFile(fs.open_input_file(p)).iter_batches(batch_size=n)
        return next(batches).to_pandas() if n else pd.DataFrame()
    with fs.open_input_stream(p) as f:
        head = f.read(_CHUNK * 4)
    head = head[: head.rfind(b"\n") + 1] or head  # whole lines only
    buf = io.BytesIO(head)
    if fmt == "jsonl":
        return pd.read_json(buf, lines=True, nrows=n)
    if fmt == "tsv":
        return pd.read_csv(buf, sep="\t", quoting=csv.QUOTE_NONE, nrows=n, dtype=str,
                           on_bad_lines="skip")
    return pd.read_csv(buf, nrows=n, dtype=str, on_bad_lines="skip")


def head_sample(cfg: PipelineConfig, field: str, n: int, read: int = 2000,
                seed: int = 0) -> list[tuple[str, str | None]]:
    """Up to `n` clean (text, label) rows drawn (seeded) from the first `read` rows of
    `data.<field>`, normalised as the pipeline would. [] for `hf://` sources."""
    src = getattr(cfg.data, field)
    if src is None or src.path.startswith("hf://"):
        return []
    path = resolve_path(cfg.data.data_dir, src.path)
    fmt = detect_format(src, path)
    df = _read_head(_files(path, fmt)[0], fmt, read)
    norm = Normalizer(src, cfg.labels, cfg.data.label_values, cfg.errors.min_chars)(df)
    ok = norm[norm["error"].isna()]
    rows = list(zip(ok["text"], ok["label"], strict=True))
    random.Random(seed).shuffle(rows)
    return rows[:n]


@dataclass
class TokenStats:
    """Tokens per row of one table under the LLM prompt and the student tokenizer."""

    rows: int
    llm_text_mean: float  # text tokens after truncation (llm.max_length)
    llm_row_mean: float  # text + suffix: what a row costs beyond the shared prefix
    llm_truncated: float  # fraction of rows cut to fit llm.max_length
    student_mean: float | None = None  # student tokens (capped at bert.max_length)


def token_stats(builder: PromptBuilder, texts: list[str], student_tok=None,
                student_max: int = 128) -> TokenStats:
    rows = builder.encode(texts)
    n_suffix = len(builder.suffix_ids)
    stu = None
    if student_tok is not None and texts:
        ids = student_tok(texts, truncation=True, max_length=student_max)["input_ids"]
        stu = float(np.mean([len(i) for i in ids]))
    return TokenStats(len(rows), float(np.mean([len(r.ids) - n_suffix for r in rows])),
                      float(np.mean([len(r.ids) for r in rows])),
                      float(np.mean([r.truncated for r in rows])), stu)


def _timed(fn, items: list, chunk: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(items), chunk):
        fn(items[i:i + chunk])
    return time.perf_counter() - t0


def calibrate_llm(cfg: PipelineConfig, rows: list[tuple[str, str | None]]) -> dict:
    """Annotate `rows` with the configured annotator; with a peft stage also with a fresh
    (untrained) adapter of `peft.method` and one PEFT training pass over them (plain AdamW; the
    stage adds DeepSpeed in Ray Train). Returns the load time and rows/s."""
    texts = [t for t, _ in rows]
    names = cfg.labels.names
    set_cpu_threads(cfg.annotate.torch_threads, cfg.annotate.max_actors)
    t0 = time.perf_counter()
    model, tok = load_annotator_model(cfg.llm)
    ann = Annotator(model, tok, cfg.prompt, cfg.labels, max_length=cfg.llm.max_length,
                    token_budget=cfg.llm.token_budget, reuse_prefix=cfg.llm.reuse_prefix)
    out = {"rows": len(texts), "llm_load_s": time.perf_counter() - t0,
           "expansion": getattr(ann, "expansion", 1), "reuse_prefix": ann.reuse_prefix}
    ann.score(texts[:4])  # warm-up: the prefix KV, allocator, thread pool
    out["annotate_items_per_s"] = len(texts) / _timed(ann.score, texts, cfg.annotate.batch_size)
    pc = cfg.peft
    if pc is None or not pc.enabled:
        return out
    method = get_method(pc.method)
    peft_model = wrap_peft(cfg, model, ann.builder, method)
    peft_model.eval()
    if pc.merge_adapter and method.supports_merge:
        out["annotate_adapter_items_per_s"] = out["annotate_items_per_s"]  # merged: the base's cost
    else:
        tuned = Annotator(peft_model, tok, cfg.prompt, cfg.labels, max_length=cfg.llm.max_length,
                          token_budget=cfg.llm.token_budget, reuse_prefix=cfg.llm.reuse_prefix)
        tuned.score(texts[:4])
        out["annotate_adapter_items_per_s"] = len(texts) / _timed(tuned.score, texts,
                                                                  cfg.annotate.batch_size)
        out["adapter_reuse_prefix"] = tuned.reuse_prefix
    set_cpu_threads(pc.torch_threads, pc.num_workers)
    peft_model.train()
    optimizer = torch.optim.AdamW(trainable_params(peft_model), lr=pc.lr or method.default_lr)
    gold = [(t, names.index(y) if y in names else 0) for t, y in rows]
    batches = epoch_batches(encode_gold(ann.builder, gold), pc.batch_size, pc.seed, 0)

    def step(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    objective = VerbaliserObjective(peft_model)
    run_epoch(objective, step, batches[:1], ann.builder, tok.pad_token_id)  # warm-up
    n = sum(len(b) for b in batches)
    t0 = time.perf_counter()
    run_epoch(objective, step, batches, ann.builder, tok.pad_token_id)
    out["peft_train_rows_per_s"] = n / (time.perf_counter() - t0)
    out["peft_method"] = method.name
    return out


def calibrate_student(cfg: PipelineConfig, rows: list[tuple[str, str | None]]) -> dict:
    """The student (untrained head on `bert.model`): train steps and `predict_proba` on `rows`,
    each on the device its stage uses (`bert.use_gpu`, `classify.num_gpus`)."""
    texts = [t for t, _ in rows]
    names = cfg.labels.names
    y = [names.index(lab) if lab in names else 0 for _, lab in rows]
    b = cfg.bert
    set_cpu_threads(b.torch_threads, b.num_workers)
    t0 = time.perf_counter()
    model, tok = load_classifier(resolve_encoder(b.model), names, b.trust_remote_code)
    model.to(pick_device("cuda" if b.use_gpu else "cpu"))
    out = {"rows": len(texts), "student_load_s": time.perf_counter() - t0}
    optimizer = torch.optim.AdamW(model.parameters(), lr=b.lr, weight_decay=b.weight_decay)
    batches = [(texts[i:i + b.batch_size], y[i:i + b.batch_size])
               for i in range(0, len(texts), b.batch_size)]
    train_epoch(model, tok, optimizer, batches[:1], b.max_length)  # warm-up
    t0 = time.perf_counter()
    train_epoch(model, tok, optimizer, batches, b.max_length)
    out["student_train_rows_per_s"] = len(texts) / (time.perf_counter() - t0)
    set_cpu_threads(cfg.classify.torch_threads, cfg.classify.max_actors)
    model.to(pick_device("cuda" if cfg.classify.num_gpus else "cpu")).eval()
    if cfg.classify.int8:
        model = quantize_int8(model)
    predict_proba(model, tok, texts[:8], b.max_length)  # warm-up
    t0 = time.perf_counter()
    predict_proba(model, tok, texts, b.max_length)
    out["student_classify_items_per_s"] = len(texts) / (time.perf_counter() - t0)
    return out


def load_tokenizers(cfg: PipelineConfig):
    """(LLM tokenizer or None, student tokenizer or None, notes): offline, no model weights."""
    notes, llm_tok, stu_tok = [], None, None
    try:
        kw = {"gguf_file": cfg.llm.gguf_file} if cfg.llm.gguf_file else {}
        llm_tok = AutoTokenizer.from_pretrained(resolve_llm(cfg.llm.model),
                                                trust_remote_code=cfg.llm.trust_remote_code, **kw)
        if llm_tok.pad_token is None:
            llm_tok.pad_token = llm_tok.eos_token
    except Exception as e:  # gated / not cached offline: the plan goes on with estimates
        notes.append(f"LLM tokenizer {cfg.llm.model!r} not available here ({type(e).__name__}); "
                     "token counts ~4 characters per token, verbalisers assumed single-token")
    try:
        stu_tok = AutoTokenizer.from_pretrained(resolve_encoder(cfg.bert.model),
                                                trust_remote_code=cfg.bert.trust_remote_code)
    except Exception as e:
        notes.append(f"student tokenizer {cfg.bert.model!r} not available here ({type(e).__name__})")
    return llm_tok, stu_tok, notes
