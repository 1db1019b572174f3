"""The BERT student: fine-tune an HF encoder as a sequence classifier with Ray Train.

`train_bert(cfg, train_df, dev_df, out_dir)` fits on Ray Train (`trainer.fit_torch_trainer`:
gloo on CPU, nccl on GPU, `bert.num_workers` workers); each worker reads its shard of the
training set (text, target distribution, weight: `distill.build_targets`), the loop steps a
warm-up + decay LR schedule, reports train loss + dev accuracy/macro-F1 per epoch through
`ray.train.report` with an HF-format checkpoint, resumes from `ray.train.get_checkpoint()` after
a worker failure, and the best gold-dev epoch (`bert.keep`) is published to `out_dir`.

`out_dir` may be a bucket URI: checkpoints go to Ray Train's storage next to it (same
filesystem) and the final model is published there with `metrics.json` last.

`train_epoch` / `make_optimizer` / `predict_proba` are the Ray-free core (usable on any box;
benchmarks/student_volume.py trains with them directly).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings

import numpy as np
import pandas as pd
import torch

from lambert_ray import storage
from lambert_ray.config import BertConfig, PipelineConfig
from lambert_ray.data import gold_pairs
from lambert_ray.distill import one_hot
from lambert_ray.layout import STUDENT_DONE
from lambert_ray.metrics import classification_metrics
from lambert_ray.models import resolve_encoder, set_cpu_threads
from lambert_ray.trainer import Workers, fit_torch_trainer

log = logging.getLogger(__name__)


def load_classifier(path: str, labels: list[str], trust_remote_code: bool = False):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}, use_safetensors=True,
        trust_remote_code=trust_remote_code)
    return model, tok


def length_sorted_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """Indices grouped by length so padding stays small (dynamic padding per batch)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def predict_proba(model, tok, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """[n, n_labels] class probabilities; length-sorted batches, dynamic padding."""
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    for idx in length_sorted_batches(texts, batch_size):
        enc = tok([texts[i] for i in idx], truncation=True, max_length=max_length,
                  padding=True, return_tensors="pt").to(device)
        out[idx] = torch.softmax(model(**enc).logits.float(), -1).cpu().numpy()
    return out


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of -sum_k target_k log softmax(logits)_k, each row weighted by `weight`
    (normalised by the weights' sum). One-hot targets give the usual cross-entropy."""
    per_row = -(target * torch.log_softmax(logits.float(), -1)).sum(-1)
    if weight is None:
        return per_row.mean()
    return (per_row * weight).sum() / weight.sum().clamp_min(1e-8)


def _as_targets(y, k: int) -> np.ndarray:
    """Label ids [n] or target rows [n, k] -> float32 [n, k]."""
    arr = np.stack([np.asarray(r, dtype=np.float32) for r in y]) if len(y) else np.zeros((0, k))
    if arr.ndim == 1:
        arr = one_hot(arr.astype(int), k)
    return arr.astype(np.float32)


def train_epoch(model, tok, optimizer, batches, max_length: int, scheduler=None) -> float:
    """One pass over `batches`: iterables of (texts, targets) or (texts, targets, weights),
    targets as label ids or [n, K] distributions. Steps `scheduler` (if any) once per batch.
    Returns the mean (weighted) loss."""
    model.train()
    device = next(model.parameters()).device
    k = getattr(model, "module", model).config.num_labels  # DDP wraps the model on 2+ workers
    total, n = 0.0, 0
    for texts, y, *w in batches:
        enc = tok(list(texts), truncation=True, max_length=max_length, padding=True,
                  return_tensors="pt").to(device)
        target = torch.as_tensor(_as_targets(y, k), device=device)
        weight = torch.as_tensor(np.asarray(w[0], dtype=np.float32), device=device) if w else None
        loss = soft_cross_entropy(model(**enc).logits, target, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(texts)
        n += len(texts)
    return total / max(n, 1)


def make_optimizer(model, bert: BertConfig, total_steps: int, start_step: int = 0):
    """AdamW and the LR schedule (`bert.schedule` with `bert.warmup_ratio` warm-up over
    `total_steps`), advanced to `start_step` when resuming."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(model.parameters(), lr=bert.lr, weight_decay=bert.weight_decay)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[bert.schedule]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=int(bert.warmup_ratio * total_steps),
                              num_training_steps=max(total_steps, 1))
    with warnings.catch_warnings():  # stepping before any optimizer.step() is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start_step):
            scheduler.step()
    return optimizer, scheduler


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return max(1, -(-n_rows // batch_size))


def dev_metrics(model, tok, dev: dict, labels: list[str], max_length: int) -> dict:
    """Accuracy and macro-F1 on the gold dev rows ({} when there are none)."""
    if not dev["text"]:
        return {}
    probs = predict_proba(model, tok, dev["text"], max_length)
    m = classification_metrics(dev["label_id"], probs.argmax(-1), labels)
    return {"dev_accuracy": m["accuracy"], "dev_macro_f1": m["macro_f1"]}


def select_score(metrics: dict, keep: str) -> float:
    """The number Ray Train ranks checkpoints by: dev accuracy (macro-F1 breaks ties) when the
    best dev epoch is kept and there are dev rows, else the epoch (the last one wins)."""
    if keep == "best_dev" and "dev_accuracy" in metrics:
        return metrics["dev_accuracy"] + 1e-6 * metrics.get("dev_macro_f1", 0.0)
    return float(metrics["epoch"])


def _train_loop(config: dict) -> None:
    """Ray Train worker loop: train_epoch per epoch, dev metrics and an HF checkpoint each epoch
    (rank 0), resume from the latest checkpoint after a worker failure."""
    import ray.train
    import ray.train.torch

    bert = BertConfig.model_validate(config["bert"])
    labels, dev = config["labels"], config["dev"]
    ckpt = ray.train.get_checkpoint()
    start, history = 0, []
    # llm-then-gold: start from another student (its kept epoch), evaluated first as "epoch -1"
    init = config.get("init")
    path = storage.local_dir(init) if init else resolve_encoder(bert.model)
    if ckpt:
        with ckpt.as_directory() as d:
            path_ckpt = os.path.join(tempfile.mkdtemp(), "model")
            shutil.copytree(os.path.join(d, "model"), path_ckpt)
            with open(os.path.join(d, "state.json")) as f:
                state = json.load(f)
            start, history = state["epoch"] + 1, state.get("history", [])
        path = path_ckpt
    set_cpu_threads(bert.torch_threads, bert.num_workers)
    torch.manual_seed(config["seed"])
    model, tok = load_classifier(path, labels, bert.trust_remote_code)
    # Default: the device Ray Train assigned; bert.device=cpu trains on CPU even on a GPU worker.
    model = ray.train.torch.prepare_model(
        model, move_to_device=torch.device("cpu") if bert.compute_device == "cpu" else True)
    world = ray.train.get_context().get_world_size()
    per_epoch = steps_per_epoch(-(-config["n_rows"] // world), bert.batch_size)
    optimizer, scheduler = make_optimizer(model, bert, bert.epochs * per_epoch, start * per_epoch)
    shard = ray.train.get_dataset_shard("train")
    rank = ray.train.get_context().get_world_rank()
    if init and not history:  # not resumed past it
        _report_epoch(model, tok, dev, labels, bert, rank, history, {"epoch": -1})
    for epoch in range(start, bert.epochs):
        batches = ((b["text"].tolist(), b["target"].tolist(), b["weight"].to_numpy())
                   for b in shard.iter_batches(
                       batch_size=bert.batch_size, batch_format="pandas",
                       local_shuffle_buffer_size=1024, local_shuffle_seed=config["seed"] + epoch))
        t0 = time.perf_counter()
        loss = train_epoch(model, tok, optimizer, batches, bert.max_length, scheduler)
        _report_epoch(model, tok, dev, labels, bert, rank, history,
                      {"epoch": epoch, "train_loss": loss, "epoch_s": time.perf_counter() - t0})


def _report_epoch(model, tok, dev: dict, labels: list[str], bert: BertConfig, rank: int,
                  history: list[dict], metrics: dict) -> None:
    """Dev metrics (rank 0), then an HF checkpoint + state.json reported to Ray Train."""
    import ray.train

    inner = model.module if hasattr(model, "module") else model
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        metrics.update(dev_metrics(inner, tok, dev, labels, bert.max_length) if rank == 0 else {})
        metrics["select_score"] = select_score(metrics, bert.keep)
        history.append(metrics)
        if rank == 0:
            inner.save_pretrained(os.path.join(d, "model"))
            tok.save_pretrained(os.path.join(d, "model"))
            with open(os.path.join(d, "state.json"), "w") as f:
                json.dump({"epoch": metrics["epoch"], "history": history}, f)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def chosen_checkpoint(result, keep: str):
    """(checkpoint, metrics) of the epoch to publish: the best dev epoch (earliest on ties) or
    the last one."""
    ranked = sorted(result.best_checkpoints or [(result.checkpoint, result.metrics)],
                    key=lambda cm: (cm[1].get("select_score", 0.0), -cm[1].get("epoch", 0)))
    if keep == "last":
        return result.checkpoint, result.metrics
    return ranked[-1]


def _history(result) -> list[dict]:
    """Per-epoch metrics of a finished fit, oldest first (kept in the latest checkpoint)."""
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, "state.json")) as f:
            return json.load(f).get("history", [])


def train_bert(cfg: PipelineConfig, train_df: pd.DataFrame, dev_df: pd.DataFrame | None,
               out_dir: str, name: str = "bert", balance: dict | None = None,
               init: str | None = None) -> dict:
    """Fine-tune the student on `train_df` -> HF model in `out_dir`. `train_df` has text and
    either label (hard targets) or target (K probabilities) + weight (distill.build_targets).
    Keeps the best gold-dev epoch (`bert.keep`). Returns the kept epoch's metrics plus the
    per-epoch history and `balance` (the training set's label mix; a skewed mix is logged).
    Skips training when `out_dir` already holds a finished model. `init`: a student's model dir
    (local or bucket) to start from, for `bert.then_epochs` epochs; that starting point is
    scored on gold dev first (epoch -1), so it is kept when the extra epochs do not help."""
    import ray.data

    done = storage.join(out_dir, STUDENT_DONE)
    if storage.exists(done):
        return storage.read_json(done)
    labels = cfg.labels.names
    if "target" not in train_df.columns:  # plain (text, label) rows: hard one-hot targets
        pairs = gold_pairs(train_df, labels)
        train_df = pd.DataFrame({"text": [t for t, _ in pairs],
                                 "target": list(one_hot([y for _, y in pairs], len(labels))),
                                 "weight": np.float32(1.0)})
    train_df = train_df[["text", "target", "weight"]]
    dev_pairs = gold_pairs(dev_df, labels)
    dev = {"text": [t for t, _ in dev_pairs], "label_id": [y for _, y in dev_pairs]}
    b = cfg.bert.model_copy(update={"epochs": cfg.bert.then_epochs}) if init else cfg.bert
    if init and not storage.is_remote(init):  # Train workers run in their own directory
        init = os.path.abspath(init)
    if balance and balance.get("skewed"):
        log.warning("%s: skewed training labels %s (largest/smallest class %.1fx)", name,
                    balance["rows"], balance["max_min_ratio"])
    t0 = time.perf_counter()
    result = fit_torch_trainer(
        _train_loop, {"bert": b.model_dump(), "labels": labels, "dev": dev, "seed": cfg.run.seed,
                      "n_rows": len(train_df), "init": init},
        name=name, out_dir=out_dir, publish_subdir="model",
        datasets={"train": ray.data.from_pandas(train_df)},
        workers=Workers(b.num_workers, b.cpus_per_worker, b.use_gpu, b.max_failures,
                        b.accelerator_type, b.compute_device),
        # Ray keeps the best-scoring checkpoint and, for resuming, always the latest.
        score_attribute="select_score", choose=lambda r: chosen_checkpoint(r, b.keep)[0])
    _, chosen = chosen_checkpoint(result, b.keep)
    metrics = {k: v for k, v in chosen.items() if isinstance(v, int | float)}
    metrics.update(train_rows=len(train_df), wall_s=time.perf_counter() - t0,
                   kept_epoch=chosen.get("epoch"), class_balance=balance,
                   last_epoch=result.metrics.get("epoch"),
                   history=[{k: v for k, v in m.items() if isinstance(v, int | float)}
                            for m in _history(result)])
    storage.write_json(done, metrics)  # last: marks the student complete
    return metrics
