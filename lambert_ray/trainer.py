"""One Ray Train fit for every trained model (the BERT students, the PEFT adapters).

    result = fit_torch_trainer(loop, loop_config, name="bert-llm", out_dir=..., workers=...)

Sets up a `TorchTrainer` (gloo on CPU, nccl on GPU), keeps its checkpoints next to `out_dir`
(`layout.train_runs_dir`, or `storage_path`) in a run that `out_dir` claims by name, fits,
raises the run's error, and publishes the final checkpoint's `publish_subdir` to `out_dir`
(`marker` last). `out_dir` may be a bucket URI: Ray Train then stores in the same filesystem.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lambert_ray import layout, storage

RUN_OWNER = "_lambert_out_dir.json"


def claim_run(runs_dir: str, name: str, out_dir: str) -> None:
    """Ray Train resumes a run found under its storage path and name, even a finished one. So
    two models published to different `out_dir`s must never share a run name, or the second
    silently gets the first's model. The first fit claims the run (a file in its dir); a fit for
    another output raises. Outputs are compared by their last path part: by default the runs
    dir is the outputs' parent (`layout.train_runs_dir`), and a relative path may be read from
    another working directory (a Tune trial's)."""
    owner = storage.join(runs_dir, name, RUN_OWNER)
    if not storage.exists(owner):
        storage.write_json(owner, {"out_dir": out_dir})
        return
    held = storage.read_json(owner)["out_dir"]
    if _leaf(held) != _leaf(out_dir):
        raise ValueError(f"Ray Train run {name!r} in {runs_dir} holds the model for {held}, not "
                         f"{out_dir}: each model needs its own run name (or runs dir)")


def _leaf(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Workers:
    """The Train worker group: how many, on what, and how often it may restart."""

    num_workers: int
    cpus_per_worker: float
    use_gpu: bool
    max_failures: int
    accelerator_type: str | None = None
    compute_device: str | None = None  # None: cuda with use_gpu; "cpu": GPU request, CPU compute


def fit_torch_trainer(loop: Callable[[dict], None], loop_config: dict[str, Any], *, name: str,
                      out_dir: str, workers: Workers, publish_subdir: str,
                      marker: str | None = None, num_to_keep: int = 1,
                      datasets: dict[str, Any] | None = None, callbacks: list | None = None,
                      storage_path: str | None = None, score_attribute: str | None = None,
                      choose: Callable[[Any], Any] | None = None,
                      edit: Callable[[str, Any], None] | None = None):
    """Fit `loop` on a Ray Train worker group and publish the result; returns the
    `ray.train.Result` (its `metrics` are the last epoch's report). With `score_attribute`, Ray
    keeps the `num_to_keep` highest-scoring checkpoints (plus, always, the latest, to resume
    from); `choose(result)` picks the checkpoint to publish (default: the latest);
    `edit(local_dir, result)` may change a copy of it before it is published."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    runs_dir = storage_path or layout.train_runs_dir(out_dir)
    claim_run(runs_dir, name, out_dir)
    path, fs = storage.train_storage(runs_dir)
    w = workers
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=w.num_workers, use_gpu=w.use_gpu, accelerator_type=w.accelerator_type,
            resources_per_worker={"CPU": w.cpus_per_worker, **({"GPU": 1} if w.use_gpu else {})}),
        torch_config=TorchConfig(
            backend="nccl" if (w.compute_device or ("cuda" if w.use_gpu else "cpu")) == "cuda"
            else "gloo"),
        datasets=datasets,
        run_config=ray.train.RunConfig(
            name=name, callbacks=callbacks, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=w.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=num_to_keep, checkpoint_score_attribute=score_attribute,
                checkpoint_score_order="max")),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    checkpoint = choose(result) if choose else result.checkpoint
    with checkpoint.as_directory() as d:
        src = os.path.join(d, publish_subdir)
        if edit is None:
            storage.publish_dir(src, out_dir, marker=marker)
        else:  # on a copy: a local checkpoint directory is the checkpoint itself
            with tempfile.TemporaryDirectory() as tmp:
                copy = os.path.join(tmp, publish_subdir)
                shutil.copytree(src, copy)
                edit(copy, result)
                storage.publish_dir(copy, out_dir, marker=marker)
    return result
