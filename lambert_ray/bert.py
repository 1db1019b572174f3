"""The BERT student: fine-tune an HF encoder as a sequence classifier with Ray Train.

`train_bert(cfg, train_df, dev_df, out_dir)` fits on Ray Train (`trainer.fit_torch_trainer`:
gloo on CPU, nccl on GPU, `bert.num_workers` workers); each worker reads its shard of the training set, the loop reports
train loss + dev accuracy/macro-F1 per epoch through `ray.train.report` with an HF-format
checkpoint, resumes from `ray.train.get_checkpoint()` after a worker failure, and the final
model is saved with `save_pretrained` in `out_dir`.

`out_dir` may be a bucket URI: checkpoints go to Ray Train's storage next to it (same
filesystem) and the final model is published there with `metrics.json` last.

`train_epoch` / `predict_proba` are the Ray-free core (usable on any box).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import pandas as pd
import torch

from lambert_ray import storage
from lambert_ray.config import BertConfig, PipelineConfig
from lambert_ray.data import gold_pairs
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


def train_epoch(model, tok, optimizer, batches, max_length: int) -> float:
    """One pass over `batches` (iterable of (texts, label_ids)); returns the mean loss."""
    model.train()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for texts, y in batches:
        enc = tok(list(texts), truncation=True, max_length=max_length, padding=True,
                  return_tensors="pt").to(device)
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, torch.as_tensor(y, device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(texts)
        n += len(texts)
    return total / max(n, 1)


def _train_loop(config: dict) -> None:
    """Ray Train worker loop."""
    import ray.train
    import ray.train.torch

    bert = BertConfig.model_validate(config["bert"])
    labels, dev = config["labels"], config["dev"]
    ckpt = ray.train.get_checkpoint()
    start = 0
    path = resolve_encoder(bert.model)
    if ckpt:
        with ckpt.as_directory() as d:
            path_ckpt = os.path.join(tempfile.mkdtemp(), "model")
            shutil.copytree(os.path.join(d, "model"), path_ckpt)
            with open(os.path.join(d, "state.json")) as f:
                start = json.load(f)["epoch"] + 1
        path = path_ckpt
    set_cpu_threads(bert.torch_threads, bert.num_workers)
    torch.manual_seed(config["seed"])
    model, tok = load_classifier(path, labels, bert.trust_remote_code)
    # Default: the device Ray Train assigned; bert.device=cpu trains on CPU even on a GPU worker.
    model = ray.train.torch.prepare_model(
        model, move_to_device=torch.device("cpu") if bert.compute_device == "cpu" else True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=bert.lr, weight_decay=bert.weight_decay)
    shard = ray.train.get_dataset_shard("train")
    rank = ray.train.get_context().get_world_rank()
    for epoch in range(start, bert.epochs):
        batches = ((b["text"].tolist(), b["label_id"].tolist()) for b in shard.iter_batches(
            batch_size=bert.batch_size, batch_format="pandas", local_shuffle_buffer_size=1024,
            local_shuffle_seed=config["seed"] + epoch))
        t0 = time.perf_counter()
        loss = train_epoch(model, tok, optimizer, batches, bert.max_length)
        metrics = {"epoch": epoch, "train_loss": loss, "epoch_s": time.perf_counter() - t0}
        inner = model.module if hasattr(model, "module") else model
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                if dev["text"]:
                    probs = predict_proba(inner, tok, dev["text"], bert.max_length)
                    m = classification_metrics(dev["label_id"], probs.argmax(-1), labels)
                    metrics.update(dev_accuracy=m["accuracy"], dev_macro_f1=m["macro_f1"])
                inner.save_pretrained(os.path.join(d, "model"))
                tok.save_pretrained(os.path.join(d, "model"))
                with open(os.path.join(d, "state.json"), "w") as f:
                    json.dump({"epoch": epoch}, f)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def train_bert(cfg: PipelineConfig, train_df: pd.DataFrame, dev_df: pd.DataFrame | None,
               out_dir: str, name: str = "bert") -> dict:
    """Fine-tune the student on `train_df` (text, label) -> HF model in `out_dir`. Returns the
    final metrics. Skips training when `out_dir` already holds a finished model."""
    import ray.data

    done = storage.join(out_dir, STUDENT_DONE)
    if storage.exists(done):
        return storage.read_json(done)
    labels = cfg.labels.names
    train_df = pd.DataFrame(gold_pairs(train_df, labels), columns=["text", "label_id"])
    dev_pairs = gold_pairs(dev_df, labels)
    dev = {"text": [t for t, _ in dev_pairs], "label_id": [y for _, y in dev_pairs]}
    b = cfg.bert
    datasets = {"train": ray.data.from_pandas(train_df)}
    t0 = time.perf_counter()
    result = fit_torch_trainer(
        _train_loop, {"bert": b.model_dump(), "labels": labels, "dev": dev, "seed": cfg.run.seed},
        name=name, out_dir=out_dir, publish_subdir="model", datasets=datasets,
        workers=Workers(b.num_workers, b.cpus_per_worker, b.use_gpu, b.max_failures,
                        b.accelerator_type, b.compute_device))
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    metrics.update(train_rows=len(train_df), wall_s=time.perf_counter() - t0)
    storage.write_json(done, metrics)  # last: marks the student complete
    return metrics
