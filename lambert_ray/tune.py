"""Ray Tune over the PEFT methods: which method, trained on the same gold set, labels best?

    outcome = run_tune(cfg, train=[(text, label_id), ...], dev=[...])
    outcome.adapter_dir    # the chosen adapter (peft format + metadata.json): cfg.llm.adapter

The search space is an explicit grid built from `cfg.tune` (`trial_points`): for every method in
`tune.methods`, its learning rates x its hyperparameter grid x `tune.seeds`. Every point is one
Tune trial whose function runs the Ray Train + DeepSpeed PEFT loop (`train_peft`) with a
`TuneReportCallback`, so each epoch's train loss and dev accuracy / macro-F1 reach Tune and
ASHA stops the weak trials after `grace_period` epochs. A trial that fails is recorded as
errored; the experiment goes on. Rerunning with the same `tune.name` restores the experiment
(`Tuner.restore`): finished trials are kept, unfinished ones run (their Train runs resume from
their last checkpoint). Results, plots and the choice: `tune_report.py`.

    <tune dir>/                      tune.storage_path or <run_dir>/tune
      <tune.name>/                   Tune experiment (restorable), trial dirs
      <tune.name>/train_runs/        each trial's Ray Train run (checkpoints: epoch_NNN/adapter)
      results/                       tune_results.{md,json,csv}, trials.csv, *.png
      best_adapter/                  copy of the chosen trial's final adapter
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lambert_ray import console, layout, storage
from lambert_ray.config import ConfigError, PipelineConfig, validate_config
from lambert_ray.data import Gold
from lambert_ray.train_peft import train_peft
from lambert_ray.tune_report import collect_trials, write_results

log = logging.getLogger(__name__)

RANK_METRIC = "rank_score"  # what ASHA compares: the chosen metric, ties broken by train loss


def _draw_lrs(low: float, high: float, n: int, rng: random.Random) -> list[float]:
    return [float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.3g}") for _ in range(n)]


def trial_points(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The experiment's trials, in order: one dict per (method, lr, hyperparameters, seed).

    `config_id` names a method + hyperparameter setting independently of the seed, so results can
    be averaged over seeds. lr None means peft.lr or, failing that, the method's default.
    Each point is validated against the peft section, so a typo fails before Ray starts."""
    if cfg.peft is None or cfg.tune is None:
        raise ConfigError("tuning needs both a peft and a tune section in the config")
    tc = cfg.tune
    rng = random.Random(tc.search_seed)
    points = []
    for method, space in tc.methods.items():
        if space.lr is not None:
            lrs: list[float | None] = list(space.lr)
        elif space.lr_loguniform is not None:
            lrs = list(_draw_lrs(*space.lr_loguniform, tc.num_samples, rng))
        else:
            lrs = [None]
        keys = sorted(space.params)
        for lr in lrs:
            for values in itertools.product(*(space.params[k] for k in keys)):
                params = dict(zip(keys, values, strict=True))
                shown = [f"lr={lr if lr is not None else 'default'}",
                         *(f"{k}={v}" for k, v in params.items())]
                config_id = f"{method}[{','.join(shown)}]"
                for seed in tc.seeds:
                    point = {"method": method, "lr": lr, "params": params, "seed": seed,
                             "config_id": config_id}
                    trial_config(cfg, point)
                    points.append(point)
    return points


def trial_config(cfg: PipelineConfig, point: dict[str, Any]) -> PipelineConfig:
    """The pipeline config one trial trains with: the peft section set to the point, the tune
    section's epochs and per-trial resources applied."""
    tc = cfg.tune
    raw = cfg.model_dump(mode="json")
    pc = raw["peft"]
    pc["method"] = point["method"]
    pc[point["method"]] = {**pc[point["method"]], **point["params"]}
    if point["lr"] is not None:
        pc["lr"] = point["lr"]
    pc["seed"] = point["seed"]
    pc["epochs"] = tc.epochs or pc["epochs"]
    for key in ("num_workers", "cpus_per_worker", "use_gpu"):
        if getattr(tc, key) is not None:
            pc[key] = getattr(tc, key)
    try:
        return validate_config(raw)
    except ConfigError as e:
        raise ConfigError(f"tune point {point['config_id']}: {e}") from None


PG_KEY = "train_placement_group"  # the trial's Train worker placement group (hex id)


def _train_callbacks(metric: str, tie_break_loss: bool) -> list:
    """Ray Train callbacks for one trial (built in the trial: TuneReportCallback needs a Tune
    session): a TuneReportCallback that also reports `rank_score` and the worker group's
    placement group, and the recorder that learns that placement group.

    Why the placement group: when Tune stops a trial (ASHA, or max_t at the last epoch) it kills
    the trial actor and with it the Train controller, whose worker placement group outlives it
    (Ray's detached cleaner needs the state API, absent without a dashboard), so the next
    trial would wait for CPUs forever. `_ReleaseTrainPlacementGroups` removes it driver-side."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    from ray.tune.integration.ray_train import TuneReportCallback

    class RankingReportCallback(TuneReportCallback):
        placement_group: str | None = None

        def after_report(self, run_context, metrics, checkpoint):
            scored = []
            for m in metrics:
                loss = m.get("train_loss", 0.0) if tie_break_loss else 0.0
                scored.append({**m, RANK_METRIC: m[metric] - 1e-6 * loss,
                               PG_KEY: self.placement_group})
            super().after_report(run_context, scored, checkpoint)

    class PlacementGroupRecorder(WorkerGroupCallback):
        def __init__(self, report: RankingReportCallback):
            self.report = report  # same object in the controller: pickled in one RunConfig

        def after_worker_group_start(self, worker_group) -> None:
            try:
                handle = worker_group.get_worker_group_state().placement_group_handle
                self.report.placement_group = handle.placement_group.id.hex()
            except Exception:  # internal API (Ray 2.60): losing the id only risks the leak
                log.warning("could not read the Train worker placement group", exc_info=True)

    report = RankingReportCallback()
    return [report, PlacementGroupRecorder(report)]


def _release_callback():
    """A Tune callback removing each ended trial's Train worker placement group (see
    `_train_callbacks`); a group the controller already removed is skipped."""
    from ray import tune
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    class ReleaseTrainPlacementGroups(tune.Callback):
        def _release(self, trial) -> None:
            pg_hex = (trial.last_result or {}).get(PG_KEY)
            if not pg_hex:
                return
            try:
                remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex))))
            except Exception:  # already removed by a controller that shut down cleanly
                log.debug("placement group %s already gone", pg_hex)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release(trial)

    return ReleaseTrainPlacementGroups()


def _trial(config: dict, cfg_json: dict, train: list, dev: list, exp_dir: str,
           on_trial_start: Callable[[dict], None] | None = None) -> None:
    """One Tune trial: a Ray Train PEFT run whose epochs are reported to Tune."""
    from ray import tune

    cfg = PipelineConfig.model_validate(cfg_json)
    point = config["point"]
    tcfg = trial_config(cfg, point)
    trial_id = tune.get_context().get_trial_id()
    if on_trial_start:
        on_trial_start(point)
    # The Train run's name is the trial id: a restored trial resumes its own Train checkpoints.
    train_peft(tcfg, [tuple(r) for r in train], [tuple(r) for r in dev],
               layout.trial_adapter(exp_dir, trial_id), name=f"trial-{trial_id}",
               callbacks=_train_callbacks(cfg.tune.metric, cfg.tune.tie_break_loss),
               storage_path=layout.trial_train_runs(exp_dir))


def _fingerprint(cfg: PipelineConfig, points: list[dict], train: list, dev: list) -> str:
    """What a restored experiment must share with the config that started it."""
    blob = json.dumps({"points": points, "peft": cfg.peft.model_dump(mode="json"),
                       "llm": cfg.llm.model, "prompt": cfg.prompt.model_dump(mode="json"),
                       "train": train, "dev": dev, "tune": cfg.tune.model_dump(
                           mode="json", exclude={"enabled", "max_concurrent_trials"})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TuneOutcome:
    """What `run_tune` returns: the per-trial records, the per-method table and the choice."""

    experiment_path: str
    trials: list[dict[str, Any]]
    methods: list[dict[str, Any]]
    choice: dict[str, Any] | None
    adapter_dir: str | None
    results_dir: str


def run_tune(cfg: PipelineConfig, train: Gold, dev: Gold, *, tune_callbacks: list | None = None,
             on_trial_start: Callable[[dict], None] | None = None,
             write_report: bool = True) -> TuneOutcome:
    """Run (or restore and finish) the experiment, then write the results and the chosen adapter.

    `train` / `dev`: (text, label_id) gold rows shared by every trial (peft.max_train / max_dev
    cut them). `tune_callbacks`: extra `ray.tune.Callback`s (tests interrupt the run with one).
    `on_trial_start(point)` runs in each trial's process as its fit starts (it must pickle).
    Ray must already be initialised."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    tc = cfg.tune
    points = trial_points(cfg)
    root = layout.tune_dir(cfg)
    exp_path = layout.tune_experiment(cfg)
    root_path, fs = storage.train_storage(root)  # fs None: local (Ray's default)
    exp_ref = storage.join(root_path, tc.name)  # the experiment as Ray sees it (inside fs)
    train_l, dev_l = [list(r) for r in train], [list(r) for r in dev]
    fp = _fingerprint(cfg, points, train_l, dev_l)
    fp_file = layout.tune_fingerprint(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, cfg_json=cfg.model_dump(mode="json"), train=train_l, dev=dev_l,
                             exp_dir=exp_path, on_trial_start=on_trial_start),
        {"cpu": tc.trial_cpus})
    epochs = tc.epochs or cfg.peft.epochs
    if tune.Tuner.can_restore(exp_ref, storage_filesystem=fs):
        if storage.exists(fp_file) and storage.read_text(fp_file).strip() != fp:
            raise ConfigError(f"{exp_path} was started with another search space, data or model; "
                              "set tune.name to start a new experiment")
        log.info("restoring the Tune experiment at %s", exp_path)
        # Errored trials stay errored (a method that cannot train is a result, not a retry loop).
        tuner = tune.Tuner.restore(exp_ref, trainable=trainable, resume_unfinished=True,
                                   storage_filesystem=fs)
    else:
        storage.makedirs(root)
        storage.write_text(fp_file, fp)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                                  grace_period=min(tc.grace_period, epochs),
                                  reduction_factor=tc.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search(points)},
            tune_config=tune.TuneConfig(metric=RANK_METRIC, mode=tc.mode, scheduler=scheduler,
                                        num_samples=1, max_concurrent_trials=tc.max_concurrent_trials,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=tc.name, storage_path=root_path, storage_filesystem=fs,
                callbacks=[_release_callback(), *(tune_callbacks or [])],
                failure_config=tune.FailureConfig(max_failures=tc.max_failures, fail_fast=False),
                verbose=1 if console.verbose() else 0),
        )
    grid = tuner.fit()
    trials = collect_trials(grid, epochs, filesystem=fs)
    results_dir = layout.tune_results(cfg)
    if not write_report:
        return TuneOutcome(exp_path, trials, [], None, None, results_dir)
    adapter_dir = None
    with tempfile.TemporaryDirectory() as local:  # written here, then published whole
        methods, choice = write_results(trials, tc, local)
        if choice is not None:
            adapter_dir = layout.tune_best_adapter(cfg)
            _copy_adapter(choice["checkpoint_path"], adapter_dir, fs)
            with open(os.path.join(local, layout.TUNE_CHOICE), "w") as f:
                json.dump({**choice, "adapter_dir": adapter_dir}, f, indent=1)
        storage.publish_dir(local, results_dir, marker=layout.TUNE_CHOICE)
    return TuneOutcome(exp_path, trials, methods, choice, adapter_dir, results_dir)


def _trial_dirname(trial) -> str:
    point = trial.config["point"]
    return f"{trial.trial_id}_{point['method']}_s{point['seed']}"


def _copy_adapter(checkpoint_path: str, out_dir: str, filesystem=None) -> None:
    """Copy the checkpoint's adapter (a path inside `filesystem`, Ray's view) to out_dir (local
    path or URI), replaced whole, metadata.json last."""
    import ray.train

    with ray.train.Checkpoint(checkpoint_path, filesystem=filesystem).as_directory() as d:
        storage.publish_dir(os.path.join(d, layout.CHECKPOINT_ADAPTER), out_dir,
                            marker=layout.ADAPTER_META)


def tune_stage(cfg: PipelineConfig, train: Gold, dev: Gold) -> tuple[str, dict[str, Any]]:
    """The peft stage with `tune.enabled`: run (or restore) the experiment and return the chosen
    adapter's path and metadata. A finished choice (results/choice.json + best_adapter/) is reused
    as is, like every other stage's complete output."""
    choice_file = storage.join(layout.tune_results(cfg), layout.TUNE_CHOICE)
    adapter = layout.tune_best_adapter(cfg)
    meta_file = storage.join(adapter, layout.ADAPTER_META)
    if not (storage.exists(choice_file) and storage.exists(meta_file)):
        outcome = run_tune(cfg, train, dev)
        if outcome.adapter_dir is None:
            raise RuntimeError(f"tune: no trial reported a dev metric; see {outcome.results_dir}")
    return adapter, storage.read_json(meta_file)
