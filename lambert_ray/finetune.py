"""PEFT core, no Ray: train an adapter on gold rows with the annotator's own scoring as the loss.

    meta = train_adapter(cfg, train=[(text, label_id), ...], dev=[...], out_dir="runs/x/peft/lora")

The objective is classification as language modelling: the prompt is built exactly as at
annotation time (`PromptBuilder`), `label_logprobs` gives log p(verbaliser | prompt) per label, and
the loss is the cross-entropy of the gold label over those label scores (the loss touches only
the verbaliser tokens). Dev accuracy / macro-F1 are measured through the `Annotator` itself, so
the numbers are the ones annotation will see. The pieces (`VerbaliserObjective`, `run_epoch`,
`evaluate`, `save_training_state`, ...) are shared with the Ray Train + DeepSpeed loop in
`train_peft.py`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lambert_ray.annotator import Annotator
from lambert_ray.config import PipelineConfig
from lambert_ray.data import Gold
from lambert_ray.layout import ADAPTER_META
from lambert_ray.metrics import confusion_matrix, metrics_from_confusion
from lambert_ray.models import load_causal_lm, resolve_llm
from lambert_ray.peft_methods import BuildContext, PeftMethod, get_method
from lambert_ray.prompts import PromptBuilder
from lambert_ray.scoring import Batch, label_logprobs, make_batch, unwrap

log = logging.getLogger(__name__)

STATE_FILE = "train_state_rank{rank}.pt"


class VerbaliserObjective(torch.nn.Module):
    """forward(batch) -> [n, n_labels] label log-probs. Wraps the PEFT model so a DeepSpeed engine
    runs its own forward; `.module` keeps `scoring.unwrap` able to reach the PeftModel."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.module = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return label_logprobs(self.module, batch)


def encode_gold(builder: PromptBuilder, gold: Gold) -> list[tuple[list[int], int]]:
    """(text, label_id) -> (row ids without the shared prefix, label_id)."""
    rows = builder.encode([t for t, _ in gold])
    return [(r.ids, int(y)) for r, (_, y) in zip(rows, gold, strict=True)]


def epoch_batches(rows: list[tuple[list[int], int]], batch_size: int, seed: int, epoch: int,
                  rank: int = 0, world: int = 1) -> list[list[tuple[list[int], int]]]:
    """This rank's micro-batches for one epoch: one seeded shuffle shared by all ranks, then an
    equal-sized shard per rank (equal batch counts keep DeepSpeed's collectives in step)."""
    order = list(range(len(rows)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    per_rank = len(order) // world
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    return [[rows[i] for i in mine[s:s + batch_size]] for s in range(0, len(mine), batch_size)]


def steps_per_epoch(n_rows: int, batch_size: int, grad_accum: int, world: int = 1) -> int:
    return max(1, math.ceil(math.ceil((n_rows // world) / batch_size) / grad_accum))


def warmup_linear(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over warmup_ratio of the steps, then linear decay to 0."""
    warm = max(1, int(total_steps * warmup_ratio))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    return f


def run_epoch(forward: Callable[[Batch], torch.Tensor], backward_step: Callable[[torch.Tensor], None],
              batches: list[list[tuple[list[int], int]]], builder: PromptBuilder,
              pad_id: int) -> float:
    """One pass over `batches`; returns the mean training loss (nats per row)."""
    total, n = 0.0, 0
    for chunk in batches:
        batch = make_batch([ids for ids, _ in chunk], builder.verbalisers, pad_id,
                           prefix=builder.prefix_ids)
        gold = torch.tensor([y for _, y in chunk])
        logp = forward(batch)
        loss = F.cross_entropy(logp, gold.to(logp.device))  # softmax over the labels only
        backward_step(loss)
        total += loss.item() * len(chunk)
        n += len(chunk)
    return total / max(1, n)


def confusion(model, tok, cfg: PipelineConfig, dev: Gold) -> np.ndarray:
    """[n_labels, n_labels] counts (gold x predicted), scored through the Annotator."""
    n_labels = len(cfg.labels.names)
    if not dev:
        return confusion_matrix([], [], n_labels)
    was_training = unwrap(model).training
    model.eval()
    # A fresh Annotator each time: its prefix KV cache depends on the current weights.
    ann = Annotator(model, tok, cfg.prompt, cfg.labels, max_length=cfg.llm.max_length,
                    token_budget=cfg.llm.token_budget, reuse_prefix=cfg.llm.reuse_prefix)
    pred = ann.score([t for t, _ in dev])["label_id"]
    cm = confusion_matrix([y for _, y in dev], pred, n_labels)
    if was_training:
        model.train()
    return cm


def evaluate(model, tok, cfg: PipelineConfig, dev: Gold) -> dict[str, float]:
    return metrics_from_confusion(confusion(model, tok, cfg, dev))


def build_context(cfg: PipelineConfig, builder: PromptBuilder) -> BuildContext:
    instruction = cfg.prompt.template.split("{text}")[0].strip() or builder.prefix_text
    return BuildContext(model_path=resolve_llm(cfg.llm.model), init_text=instruction)


def wrap_peft(cfg: PipelineConfig, base, builder: PromptBuilder, method: PeftMethod,
              quantized: bool = False):
    """Base LM -> trainable PeftModel (k-bit preparation first for a quantized base)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    pc = cfg.peft
    if quantized:
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=pc.gradient_checkpointing
            and not method.needs_no_gradient_checkpointing)
    peft_config = method.build(pc.params(), build_context(cfg, builder))
    model = get_peft_model(base, peft_config)
    model.train()
    return model


def trainable_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable tensors by name. Unlike the peft adapter file (which for P-tuning / projected
    prefix tuning stores the encoder's *output*), this is exactly what the optimizer updates."""
    return {n: p.detach().cpu().clone() for n, p in unwrap(model).named_parameters()
            if p.requires_grad}


def save_training_state(ckpt_dir: str | Path, model, optimizer: torch.optim.Optimizer, scheduler,
                        epoch: int, rank: int = 0, world: int = 1, history: list | None = None,
                        trainable: dict[str, torch.Tensor] | None = None) -> None:
    """Per-rank trainable weights + optimizer / scheduler / epoch state (ZeRO partitions the
    optimizer state by rank). `trainable` overrides the weights read from `model` (ZeRO-3)."""
    torch.save({"trainable": trainable if trainable is not None else trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch, "world_size": world, "history": history or []},
               Path(ckpt_dir) / STATE_FILE.format(rank=rank))


def read_training_state(ckpt_dir: str | Path, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """What `save_training_state` wrote for `rank` (loaded with weights_only=True)."""
    state = torch.load(Path(ckpt_dir) / STATE_FILE.format(rank=rank), map_location="cpu",
                       weights_only=True)
    if state["world_size"] != world:
        raise ValueError(f"checkpoint {ckpt_dir} was written by {state['world_size']} workers; "
                         f"resuming needs the same number (got {world})")
    return state


def has_training_state(ckpt_dir: str | Path | None, rank: int = 0) -> bool:
    return bool(ckpt_dir) and (Path(ckpt_dir) / STATE_FILE.format(rank=rank)).exists()


def set_trainable(model, saved: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable weights into a (not yet DeepSpeed-wrapped) PeftModel."""
    want = {n for n, p in unwrap(model).named_parameters() if p.requires_grad}
    if set(saved) != want:
        raise ValueError("checkpoint does not match the model's trainable parameters (e.g. "
                         f"{sorted(set(saved) ^ want)[:3]}); same method and hyperparameters?")
    unwrap(model).load_state_dict(saved, strict=False)


def load_training_state(ckpt_dir: str | Path, model, optimizer: torch.optim.Optimizer, scheduler,
                        rank: int = 0, world: int = 1) -> tuple[int, list]:
    """Restore weights, optimizer and scheduler (single process); returns (epochs done, history)."""
    state = read_training_state(ckpt_dir, rank, world)
    set_trainable(model, state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), list(state["history"])


def dir_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def peak_memory_mb() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def adapter_metadata(cfg: PipelineConfig, model, method: PeftMethod, *, before: dict, after: dict,
                     history: list, n_train: int, n_dev: int, wall_s: float, world: int = 1,
                     lr: float) -> dict[str, Any]:
    trainable, total = unwrap(model).get_nb_trainable_parameters()
    peak, kind = peak_memory_mb()
    pc = cfg.peft
    return {
        "method": method.name, "hyperparameters": pc.params().model_dump(),
        "training": {"epochs": pc.epochs, "lr": lr, "batch_size": pc.batch_size,
                     "grad_accum": pc.grad_accum, "weight_decay": pc.weight_decay,
                     "warmup_ratio": pc.warmup_ratio, "zero_stage": pc.zero_stage,
                     "num_workers": world, "quantization": pc.quantization, "seed": pc.seed},
        "base_model": cfg.llm.model, "base_model_path": resolve_llm(cfg.llm.model),
        "labels": cfg.labels.names, "supports_merge": method.supports_merge,
        "prompt_learning": method.prompt_learning,
        "n_train": n_train, "n_dev": n_dev, "dev_before": before, "dev_after": after,
        "history": history, "trainable_params": int(trainable), "total_params": int(total),
        "wall_time_s": round(wall_s, 2), "peak_memory_mb": round(peak, 1), "peak_memory_kind": kind,
    }


def save_adapter(model, out_dir: str | Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """peft `save_pretrained` + metadata.json (adapter_mb filled in here)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unwrap(model).save_pretrained(str(out))
    metadata = {**metadata, "adapter_mb": round(dir_mb(out), 3)}
    (out / ADAPTER_META).write_text(json.dumps(metadata, indent=2))
    return metadata


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_adapter(cfg: PipelineConfig, train: Gold, dev: Gold, out_dir: str | Path, *,
                  checkpoint_dir: str | Path | None = None, model_tok: tuple | None = None,
                  on_epoch: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train `cfg.peft.method` on `train`, score `dev` before/after, save the adapter + metadata.

    Single process, torch AdamW. With `checkpoint_dir`, the adapter and optimizer state are saved
    there after every epoch and a run restarted on the same dir resumes after the last saved
    epoch. `model_tok` supplies an already loaded (base model, tokenizer) (tests, benchmarks).
    Returns the metadata dict (also written to out_dir/metadata.json)."""
    assert cfg.peft is not None, "config has no peft section"
    pc, method = cfg.peft, get_method(cfg.peft.method)
    t0 = time.perf_counter()
    seed_everything(pc.seed)
    base, tok = model_tok or load_causal_lm(cfg.llm.model, dtype=cfg.llm.dtype,
                                            quantization=pc.quantization, device=cfg.llm.device)
    builder = PromptBuilder(tok, cfg.prompt, cfg.labels, cfg.llm.max_length)
    train = train[: pc.max_train] if pc.max_train else train
    dev = dev[: pc.max_dev] if pc.max_dev else dev
    before = evaluate(base, tok, cfg, dev)
    log.info("%s: dev before %s", method.name, before)
    model = wrap_peft(cfg, base, builder, method, quantized=pc.quantization != "none")
    rows = encode_gold(builder, train)
    lr = pc.lr or method.default_lr
    optimizer = torch.optim.AdamW(trainable_params(model), lr=lr, weight_decay=pc.weight_decay)
    total = pc.epochs * steps_per_epoch(len(rows), pc.batch_size, pc.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total, pc.warmup_ratio))
    start, history = 0, []
    if has_training_state(checkpoint_dir):
        start, history = load_training_state(checkpoint_dir, model, optimizer, scheduler)
        log.info("resuming %s after epoch %d", method.name, start)
    objective = VerbaliserObjective(model)
    micro = {"n": 0}

    def optimizer_step() -> None:
        torch.nn.utils.clip_grad_norm_(trainable_params(model), pc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def backward_step(loss: torch.Tensor) -> None:
        (loss / pc.grad_accum).backward()
        micro["n"] += 1
        if micro["n"] % pc.grad_accum == 0:
            optimizer_step()

    for epoch in range(start, pc.epochs):
        te = time.perf_counter()
        batches = epoch_batches(rows, pc.batch_size, pc.seed, epoch)
        loss = run_epoch(objective, backward_step, batches, builder, tok.pad_token_id)
        if micro["n"] % pc.grad_accum:  # flush a partial accumulation at the epoch's end
            micro["n"] = 0
            optimizer_step()
        dev_m = evaluate(model, tok, cfg, dev)
        history.append({"epoch": epoch + 1, "train_loss": loss, "dev_accuracy": dev_m["accuracy"],
                        "dev_macro_f1": dev_m["macro_f1"], "epoch_s": time.perf_counter() - te})
        log.info("%s epoch %d: %s", method.name, epoch + 1, history[-1])
        if checkpoint_dir:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            save_training_state(checkpoint_dir, model, optimizer, scheduler, epoch + 1,
                                history=history)
        if on_epoch:  # after the checkpoint: a callback that stops the run leaves it resumable
            on_epoch(history[-1])
    after = ({"accuracy": history[-1]["dev_accuracy"], "macro_f1": history[-1]["dev_macro_f1"],
              "n": len(dev)} if history else evaluate(model, tok, cfg, dev))
    meta = adapter_metadata(cfg, model, method, before=before, after=after, history=history,
                            n_train=len(rows), n_dev=len(dev), wall_s=time.perf_counter() - t0,
                            lr=lr)
    return save_adapter(model, out_dir, meta)
