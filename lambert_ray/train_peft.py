"""PEFT on Ray Train + DeepSpeed: `train_peft(cfg, train, dev, out_dir)` -> adapter + metadata.

Each Ray Train worker loads the base LM (on GPU: bf16, or a 4-bit NF4 base for QLoRA), wraps it
with the registry's peft config, and hands the `VerbaliserObjective` + a torch AdamW to
`deepspeed.initialize` (ZeRO stage from `peft.zero_stage`; gloo + fp32 on CPU). Gold rows are
sharded by rank; dev rows too, and the per-rank confusion matrices are summed. Every epoch each
worker reports train loss + dev accuracy / macro-F1 and a `ray.train.Checkpoint` (the ranks'
files are merged into one directory):

    epoch_NNN/
      adapter/                   rank 0: peft save_pretrained + metadata.json (servable)
      train_state_rank{r}.pt     trainable weights, optimizer, scheduler, epoch (weights_only)

After a worker failure Ray restarts the group and the loop resumes from
`ray.train.get_checkpoint()`; rerunning the same run name resumes too. The final adapter is
copied to `out_dir` (by convention `layout.adapter_dir`: `<run_dir>/peft/<method>/`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lambert_ray import storage
from lambert_ray.config import PipelineConfig
from lambert_ray.data import Gold
from lambert_ray.finetune import (
    VerbaliserObjective,
    adapter_metadata,
    confusion,
    encode_gold,
    epoch_batches,
    read_training_state,
    run_epoch,
    save_adapter,
    save_training_state,
    seed_everything,
    set_trainable,
    steps_per_epoch,
    trainable_params,
    trainable_state,
    warmup_linear,
    wrap_peft,
)
from lambert_ray.layout import ADAPTER_META, CHECKPOINT_ADAPTER, checkpoint_name
from lambert_ray.metrics import metrics_from_confusion
from lambert_ray.models import load_causal_lm, set_cpu_threads
from lambert_ray.peft_methods import get_method
from lambert_ray.prompts import PromptBuilder
from lambert_ray.trainer import Workers, fit_torch_trainer

log = logging.getLogger(__name__)


def deepspeed_config(cfg: PipelineConfig) -> dict[str, Any]:
    """DeepSpeed config from the peft section (bf16 on GPU, fp32 on CPU)."""
    pc = cfg.peft
    return {
        "train_micro_batch_size_per_gpu": pc.batch_size,
        "gradient_accumulation_steps": pc.grad_accum,
        "gradient_clipping": pc.max_grad_norm,
        "zero_optimization": {"stage": pc.zero_stage},
        "zero_allow_untested_optimizer": True,  # our own torch AdamW (ZeRO wraps it)
        "bf16": {"enabled": pc.use_gpu},
        "steps_per_print": 10**9,
    }


def _gathered(engine, params, zero_stage: int):
    """ZeRO-3 partitions parameters: gather them (all ranks) before reading or saving."""
    if zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def _all_reduce(x: np.ndarray, device: torch.device) -> np.ndarray:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return x
    t = torch.as_tensor(x, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().numpy()


def _dev_metrics(model, tok, cfg: PipelineConfig, dev: Gold, rank: int, world: int,
                 device: torch.device) -> dict[str, float]:
    # ZeRO-3 forwards are collective: every rank must run the same batches, so all score all.
    shard = dev if cfg.peft.zero_stage == 3 else dev[rank::world]
    cm = confusion(model, tok, cfg, shard)
    if cfg.peft.zero_stage != 3:
        cm = _all_reduce(cm, device).astype(np.int64)
    return metrics_from_confusion(cm)


def _train_loop(config: dict) -> None:
    """Ray Train worker loop (see the module docstring)."""
    import deepspeed
    import ray.train
    import ray.train.torch

    cfg = PipelineConfig.model_validate(config["cfg"])
    pc, method = cfg.peft, get_method(cfg.peft.method)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if pc.use_gpu else torch.device("cpu")
    if not pc.use_gpu:
        set_cpu_threads(None, sharers=world)
    t0 = time.perf_counter()
    seed_everything(pc.seed)
    base, tok = load_causal_lm(cfg.llm.model, dtype="bfloat16" if pc.use_gpu else "float32",
                               quantization=pc.quantization, device=str(device),
                               trust_remote_code=cfg.llm.trust_remote_code)
    builder = PromptBuilder(tok, cfg.prompt, cfg.labels, cfg.llm.max_length)
    train, dev = config["train"], config["dev"]
    rows = encode_gold(builder, train)
    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = read_training_state(d, rank, world)
            before = json.loads((Path(d) / CHECKPOINT_ADAPTER / ADAPTER_META).read_text())["dev_before"]
    else:  # the base model's dev score, unless the caller already has it (a study's trials)
        before = config.get("dev_before") or _dev_metrics(base, tok, cfg, dev, rank, world, device)
    model = wrap_peft(cfg, base, builder, method, quantized=pc.quantization != "none")
    if state:
        set_trainable(model, state["trainable"])  # before DeepSpeed copies the master weights
    lr = pc.lr or method.default_lr
    optimizer = torch.optim.AdamW(trainable_params(model), lr=lr, weight_decay=pc.weight_decay)
    total = pc.epochs * steps_per_epoch(len(rows), pc.batch_size, pc.grad_accum, world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total, pc.warmup_ratio))
    engine, _, _, _ = deepspeed.initialize(model=VerbaliserObjective(model), optimizer=optimizer,
                                           lr_scheduler=scheduler, config=deepspeed_config(cfg),
                                           dist_init_required=False)
    start, history = 0, []
    if state:
        optimizer.load_state_dict(state["optimizer"])  # ZeRO's flat fp32 partition of this rank
        scheduler.load_state_dict(state["scheduler"])
        start, history = int(state["epoch"]), list(state["history"])
        log.info("rank %d resumes %s after epoch %d", rank, method.name, start)

    def backward_step(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer + scheduler at accumulation boundaries

    on_epoch = config.get("on_epoch")
    for epoch in range(start, pc.epochs):
        te = time.perf_counter()
        batches = epoch_batches(rows, pc.batch_size, pc.seed, epoch, rank, world)
        loss = run_epoch(engine, backward_step, batches, builder, tok.pad_token_id)
        loss = float(_all_reduce(np.array([loss]), device)[0] / world)
        train_s = time.perf_counter() - te
        dev_m = _dev_metrics(engine, tok, cfg, dev, rank, world, device)
        history.append({"epoch": epoch + 1, "train_loss": loss, "dev_accuracy": dev_m["accuracy"],
                        "dev_macro_f1": dev_m["macro_f1"], "epoch_s": time.perf_counter() - te,
                        "train_s": train_s})
        with tempfile.TemporaryDirectory() as d:
            with _gathered(engine, trainable_params(model), pc.zero_stage):
                save_training_state(d, model, optimizer, scheduler, epoch + 1, rank, world,
                                    history, trainable=trainable_state(model))
                if rank == 0:
                    meta = adapter_metadata(cfg, model, method, before=before,
                                            after={"accuracy": dev_m["accuracy"],
                                                   "macro_f1": dev_m["macro_f1"], "n": len(dev)},
                                            history=history, n_train=len(rows), n_dev=len(dev),
                                            wall_s=time.perf_counter() - t0, world=world, lr=lr)
                    save_adapter(model, os.path.join(d, CHECKPOINT_ADAPTER), meta)
            ray.train.report({**history[-1], "dev_before_accuracy": before["accuracy"],
                              "select_score": select_score(history[-1])},
                             checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=checkpoint_name(epoch + 1))
        if on_epoch:  # after the checkpoint: a callback that raises leaves the run resumable
            on_epoch({**history[-1], "rank": rank})


def select_score(epoch: dict[str, Any]) -> float:
    """How `keep="best_dev"` ranks epochs: dev accuracy, dev macro-F1 breaking ties (equal
    scores: the earliest epoch, `_best_checkpoint`)."""
    return epoch["dev_accuracy"] + 1e-6 * epoch.get("dev_macro_f1", 0.0)


def _best_checkpoint(result):
    """The kept checkpoint of the best dev epoch (earliest on ties)."""
    kept = result.best_checkpoints or [(result.checkpoint, result.metrics)]
    return max(kept, key=lambda cm: (cm[1].get("select_score", 0.0), -cm[1].get("epoch", 0)))[0]


def _full_history(adapter_dir: str, result) -> None:
    """Rewrite the kept adapter's metadata.json: it was saved at its own epoch, so it is given
    the whole run's history and wall time (from the latest checkpoint) and `kept_epoch`."""
    meta_path = os.path.join(adapter_dir, ADAPTER_META)
    meta = json.loads(Path(meta_path).read_text())
    with result.checkpoint.as_directory() as d:
        last = json.loads((Path(d) / CHECKPOINT_ADAPTER / ADAPTER_META).read_text())
    kept_epoch = meta["history"][-1]["epoch"] if meta.get("history") else None
    meta.update(history=last["history"], wall_time_s=last["wall_time_s"], kept_epoch=kept_epoch,
                keep="best_dev")
    Path(meta_path).write_text(json.dumps(meta, indent=2))


def train_peft(cfg: PipelineConfig, train: Gold, dev: Gold, out_dir: str, *, name: str | None = None,
               on_epoch: Callable[[dict], None] | None = None, callbacks: list | None = None,
               storage_path: str | None = None, keep: str = "last",
               dev_before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `cfg.peft.method` with Ray Train + DeepSpeed; write the adapter (peft format) and
    metadata.json to `out_dir`; return the metadata. Skips when `out_dir` holds a finished adapter.
    `train` / `dev` are (text, label_id) lists (small: gold rows). `on_epoch(record)` runs in
    every worker after each epoch's checkpoint (record: the epoch's history entry + `rank`; it
    must pickle). `callbacks` go to the Train RunConfig (Ray Tune passes its TuneReportCallback);
    `storage_path` overrides where Ray Train keeps the run's checkpoints (default: next to
    `out_dir`, `layout.train_runs_dir`). `keep`: the adapter published is the last epoch's, or
    with "best_dev" the best dev epoch's (`select_score`; its metadata then holds the whole
    run's history and `kept_epoch`). `dev_before`: the base model's dev metrics when the caller
    has them (skips that scoring pass)."""
    if keep not in ("last", "best_dev"):
        raise ValueError(f"keep must be 'last' or 'best_dev', not {keep!r}")
    assert cfg.peft is not None, "config has no peft section"
    done = storage.join(out_dir, ADAPTER_META)
    if storage.exists(done):
        return storage.read_json(done)
    pc = cfg.peft
    train = train[: pc.max_train] if pc.max_train else train
    dev = dev[: pc.max_dev] if pc.max_dev else dev
    best = keep == "best_dev"
    fit_torch_trainer(
        _train_loop, {"cfg": cfg.model_dump(mode="json"), "train": [list(r) for r in train],
                      "dev": [list(r) for r in dev], "on_epoch": on_epoch,
                      "dev_before": dev_before},
        name=name or f"peft-{pc.method}", out_dir=out_dir, publish_subdir=CHECKPOINT_ADAPTER,
        marker=ADAPTER_META, num_to_keep=2, callbacks=callbacks, storage_path=storage_path,
        workers=Workers(pc.num_workers, pc.cpus_per_worker, pc.use_gpu, pc.max_failures),
        # Ray keeps the best-scoring checkpoint and, for resuming, always the latest.
        score_attribute="select_score" if best else None,
        choose=_best_checkpoint if best else None, edit=_full_history if best else None)
    return storage.read_json(done)
