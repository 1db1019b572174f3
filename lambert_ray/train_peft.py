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
copied to `out_dir` (by convention `<run_dir>/peft/<method>/`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lambert_ray import storage
from lambert_ray.config import PipelineConfig
from lambert_ray.finetune import (
    ADAPTER_META,
    Gold,
    VerbaliserObjective,
    adapter_metadata,
    confusion,
    encode_gold,
    epoch_batches,
    metrics_from_confusion,
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
from lambert_ray.models import load_causal_lm, set_cpu_threads
from lambert_ray.peft_methods import get_method
from lambert_ray.prompts import PromptBuilder

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
            before = json.loads((Path(d) / "adapter" / ADAPTER_META).read_text())["dev_before"]
    else:
        before = _dev_metrics(base, tok, cfg, dev, rank, world, device)
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

    hooks = config.get("test_hooks") or {}
    for epoch in range(start, pc.epochs):
        te = time.perf_counter()
        batches = epoch_batches(rows, pc.batch_size, pc.seed, epoch, rank, world)
        loss = run_epoch(engine, backward_step, batches, builder, tok.pad_token_id)
        loss = float(_all_reduce(np.array([loss]), device)[0] / world)
        dev_m = _dev_metrics(engine, tok, cfg, dev, rank, world, device)
        history.append({"epoch": epoch + 1, "train_loss": loss, "dev_accuracy": dev_m["accuracy"],
                        "dev_macro_f1": dev_m["macro_f1"], "epoch_s": time.perf_counter() - te})
        if hooks.get("log_dir"):  # tests: which epochs each attempt trained
            with open(os.path.join(hooks["log_dir"], f"rank{rank}.log"), "a") as f:
                f.write(f"{epoch + 1}\n")
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
                    save_adapter(model, os.path.join(d, "adapter"), meta)
            ray.train.report({**history[-1], "dev_before_accuracy": before["accuracy"]},
                             checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"epoch_{epoch + 1:03d}")
        marker = hooks.get("fail_once_marker") and f"{hooks['fail_once_marker']}.rank{rank}"
        if marker and epoch + 1 == hooks.get("fail_after_epoch") and not os.path.exists(marker):
            Path(marker).touch()  # tests: every rank fails once, after this epoch's checkpoint
            raise RuntimeError(f"injected failure after epoch {epoch + 1} (test hook)")


def train_peft(cfg: PipelineConfig, train: Gold, dev: Gold, out_dir: str, *, name: str | None = None,
               test_hooks: dict | None = None, callbacks: list | None = None,
               storage_path: str | None = None) -> dict[str, Any]:
    """Train `cfg.peft.method` with Ray Train + DeepSpeed; write the adapter (peft format) and
    metadata.json to `out_dir`; return the metadata. Skips when `out_dir` holds a finished adapter.
    `train` / `dev` are (text, label_id) lists (small: gold rows). `callbacks` go to the Train
    RunConfig (Ray Tune passes its TuneReportCallback); `storage_path` overrides where Ray Train
    keeps the run's checkpoints (default: `<out_dir>/../_ray_train`)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    assert cfg.peft is not None, "config has no peft section"
    done = storage.join(out_dir, ADAPTER_META)
    if storage.exists(done):
        return storage.read_json(done)
    pc = cfg.peft
    train = train[: pc.max_train] if pc.max_train else train
    dev = dev[: pc.max_dev] if pc.max_dev else dev
    name = name or f"peft-{pc.method}"
    storage_path, storage_fs = storage.train_storage(
        storage_path or storage.join(storage.parent(out_dir), "_ray_train"))
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "train": [list(r) for r in train],
                           "dev": [list(r) for r in dev], "test_hooks": test_hooks},
        scaling_config=ray.train.ScalingConfig(
            num_workers=pc.num_workers, use_gpu=pc.use_gpu,
            resources_per_worker={"CPU": pc.cpus_per_worker, **({"GPU": 1} if pc.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if pc.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, callbacks=callbacks,
            storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=pc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:  # metadata.json appears only with a complete adapter
        storage.publish_dir(os.path.join(d, "adapter"), out_dir, marker=ADAPTER_META)
    return storage.read_json(done)


def gold_pairs(df, labels: list[str]) -> Gold:
    """A normalised gold frame (text, label name, error) -> [(text, label_id)], clean rows only."""
    if df is None or len(df) == 0:
        return []
    to_id = {n: i for i, n in enumerate(labels)}
    ok = df[df["error"].isna() & df["label"].isin(list(to_id))]
    return [(str(t), to_id[y]) for t, y in zip(ok["text"], ok["label"], strict=True)]


def run_peft_stage(cfg: PipelineConfig, reannotate: bool = True) -> dict[str, Any]:
    """The pipeline's `peft` stage: tune the annotator on the gold train subset (dev: gold_dev),
    write the adapter to <run_dir>/peft/<method>/, then re-label the rows the 0-shot annotate
    stage labelled (annotate/, llm_eval/) with base + adapter into annotate_peft/, llm_eval_peft/.
    Each part skips when its output is complete; `reannotate=False` only trains (CLI `finetune`).
    Returns the adapter path, dev metrics before/after and the re-annotation counts."""
    import ray.data

    from lambert_ray.annotate import annotate
    from lambert_ray.pipeline import gold_frame, gold_train
    from lambert_ray.stage import read_output

    pc = cfg.peft
    assert pc is not None, "config has no peft section"
    adapter = storage.join(cfg.run_dir, "peft", pc.method)
    storage.makedirs(cfg.run_dir)
    train = gold_pairs(gold_train(cfg), cfg.labels.names)
    dev = gold_pairs(gold_frame(cfg, "gold_dev"), cfg.labels.names)
    if not train:
        raise RuntimeError("peft stage: no gold training rows (data.gold_train)")
    if cfg.tune is not None and cfg.tune.enabled:  # Ray Tune picks the method (tune.py)
        from lambert_ray.tune import tune_stage

        adapter, meta = tune_stage(cfg, train, dev)
    else:
        meta = train_peft(cfg, train, dev, adapter)
    tuned = cfg.model_copy(update={"llm": cfg.llm.model_copy(
        update={"adapter": adapter, "merge_adapter": pc.merge_adapter})})
    counts: dict[str, Any] = {"adapter": adapter, "dev_before": meta["dev_before"],
                              "dev_after": meta["dev_after"]}
    pairs = (("annotate", "annotate_peft"), ("llm_eval", "llm_eval_peft")) if reannotate else ()
    for src, dst in pairs:
        rows = read_output(storage.join(cfg.run_dir, src), ["row_id", "text", "gold", "error"])
        if rows.empty:
            continue
        rows = rows.rename(columns={"gold": "label"})
        counts[dst] = annotate(tuned, ray.data.from_pandas(rows), storage.join(cfg.run_dir, dst),
                               name=dst, rows_in=len(rows))
    return counts
