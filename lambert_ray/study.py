"""The PEFT study under Ray Tune: which method labels best, at which gold budget, with error bars.

    outcome = run_study(cfg)          # cfg.study set; Ray initialised
    outcome.summary                   # lrs chosen, trial keys per phase, baseline, errors
    outcome.records                   # one dict per finished trial (study_grid.trial_record)

Phase 1 (fair learning rates): each method's lr grid at `study.select_budget`, chosen on dev
(`study_grid.choose_lrs`). Phase 2 (budgets): each method at its lr x `study.budgets` x
`study.seeds`. Each phase is one Tune experiment (grid search, no scheduler: no trial is cut
early, every trial runs `study.epochs`); every trial is a Ray Train + DeepSpeed PEFT run
(`train_peft`, Tune sees each epoch through `TuneReportCallback`) that keeps its best dev epoch,
then one Ray task (the Train worker's resources) scores the kept adapter on the test rows.

Resuming, two ways, both tested: a phase restores its Tune experiment (`Tuner.restore`; the
experiment is named by its trial keys, so a changed grid starts a new one), and a trial whose
record file exists reports it and returns at once, so a finished trial never trains again, in
any later experiment either; an unfinished trial's Train run (named by the trial key) resumes
from its last epoch checkpoint. Paths: `layout.study_dir` and below.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from lambert_ray import console, layout, storage
from lambert_ray.config import PipelineConfig
from lambert_ray.data import gold_frame
from lambert_ray.study_grid import (
    StudyRows,
    choose_lrs,
    content_hash,
    phase1_points,
    phase2_points,
    split_rows,
    study_rows,
    task_name,
    trial_config,
    trial_record,
    with_test_scores,
)
from lambert_ray.train_peft import train_peft
from lambert_ray.tune import _release_callback, _train_callbacks

log = logging.getLogger(__name__)

REPORTED = ("dev_accuracy", "test_accuracy", "best_epoch", "train_s", "trainable_params")


# --- rows ---

def _rows_dir(cfg: PipelineConfig) -> str:
    """Cache dir of the drawn rows, named by what decides the draw."""
    st = cfg.study
    blob = {"data": cfg.data.model_dump(mode="json", include={"gold_train", "gold_dev",
                                                              "gold_test", "label_values"}),
            "split": st.split.model_dump() if st.split else None, "dev": st.dev_rows,
            "test": st.test_rows, "seeds": sorted(set(st.seeds) | set(st.select_seeds)),
            "need": max(st.budgets + [st.select_budget]), "labels": cfg.labels.names}
    h = content_hash(blob)[:10]
    return storage.join(layout.study_dir(cfg), "rows", h)


def prepare_rows(cfg: PipelineConfig) -> StudyRows:
    """The study's rows, drawn once (Ray Data reads the sources) and cached as Parquet, so every
    trial of every session scores the same dev rows."""
    d = _rows_dir(cfg)
    meta_path = storage.join(d, "rows.json")
    if storage.exists(meta_path):
        meta = storage.read_json(meta_path)

        def read(name: str) -> pd.DataFrame:
            return storage.read_parquet(storage.join(d, f"{name}.parquet")).to_pandas()

        return StudyRows({int(s): read(f"gold_s{s}") for s in meta["seeds"]}, read("dev"),
                         read("test"), meta["labels"], meta["pool_fp"])
    if cfg.study.split is not None:
        pool, dev, test = split_rows(cfg, gold_frame(cfg, "gold_train"))
    else:
        pool, dev, test = (gold_frame(cfg, f) for f in ("gold_train", "gold_dev", "gold_test"))
        if dev is None or test is None or pool is None:
            raise ValueError("study: needs data.gold_train, gold_dev and gold_test (or study.split)")
    rows = study_rows(cfg, pool, dev, test)
    for s, g in rows.gold.items():
        storage.write_parquet(g, storage.join(d, f"gold_s{s}.parquet"))
    storage.write_parquet(rows.dev, storage.join(d, "dev.parquet"))
    storage.write_parquet(rows.test, storage.join(d, "test.parquet"))
    storage.write_json(meta_path, {"seeds": sorted(rows.gold), "labels": rows.labels,
                                   "pool_fp": rows.pool_fp, "n_dev": len(rows.dev),
                                   "n_test": len(rows.test)})  # last: the cache is complete
    return rows


def _payload(rows: StudyRows) -> dict[str, Any]:
    """What each trial reads (plain lists, shipped once through the object store)."""
    test = rows.pairs("test")
    return {"gold": {s: [list(r) for r in rows.train(s, len(g))] for s, g in rows.gold.items()},
            "dev": [list(r) for r in rows.pairs("dev")],
            "test_ids": list(rows.test["row_id"]), "test_text": [t for t, _ in test],
            "test_y": [y for _, y in test]}


# --- scoring (a Ray task with a Train worker's resources) ---

def _score(cfg_json: dict, adapter: str | None, texts: list[str], threads: int | None,
           sharers: int) -> tuple[list[int], float]:
    from lambert_ray.annotator import Annotator
    from lambert_ray.models import set_cpu_threads

    cfg = PipelineConfig.model_validate(cfg_json)
    set_cpu_threads(threads, sharers=sharers)
    llm = cfg.llm.model_copy(update={"adapter": adapter, "merge_adapter": False})
    t0 = time.perf_counter()
    ann = Annotator.from_config(cfg.model_copy(update={"llm": llm}))
    return ann.score(texts)["label_id"], time.perf_counter() - t0


def score_rows(cfg: PipelineConfig, adapter: str | None, texts: list[str]) -> tuple[list[int], float]:
    """Predicted label ids for `texts` by the base LLM (+ adapter), and the seconds it took, in a
    Ray task that asks for what one Train worker of the trial asks for."""
    import ray

    pc = cfg.peft
    # "DEFAULT": outside the calling Tune trial's placement group (it holds only the trial's
    # own small CPU share), like the trial's Train workers.
    task = ray.remote(_score).options(num_cpus=pc.cpus_per_worker,
                                      num_gpus=1 if pc.use_gpu else 0, max_retries=1,
                                      scheduling_strategy="DEFAULT")
    return ray.get(task.remote(cfg.model_dump(mode="json"), adapter, texts, pc.torch_threads,
                               cfg.study.max_concurrent_trials))


def baseline(cfg: PipelineConfig, rows: StudyRows) -> dict[str, Any]:
    """The base model (0-shot) on the dev and test rows, cached in baseline.json."""
    from lambert_ray.metrics import confusion_matrix, metrics_from_confusion

    path = storage.join(layout.study_dir(cfg), "baseline.json")
    if storage.exists(path):
        return storage.read_json(path)
    tcfg = trial_config(cfg, {"method": next(iter(cfg.study.methods)), "lr": 1.0, "seed": 0})
    out: dict[str, Any] = {"task": task_name(cfg)}
    for part in ("dev", "test"):
        pairs = rows.pairs(part)
        pred, secs = score_rows(tcfg, None, [t for t, _ in pairs])
        m = metrics_from_confusion(confusion_matrix([y for _, y in pairs], pred,
                                                    len(rows.labels)))
        out[part] = {**m, "n": len(pairs), "seconds": round(secs, 2)}
    storage.write_json(path, out)
    return out


# --- one trial ---

def _trial(config: dict, cfg_json: dict, rows: dict, study: str, before: dict,
           on_train_start: Callable[[dict], None] | None = None) -> None:
    """One Tune trial: train (best dev epoch kept) unless the trial's record exists, score the
    kept adapter on the test rows when the point asks for it (phase 2; phase 1 never reads
    test) and the record has no test score yet, write the predictions, then the record."""
    from ray import tune

    point = config["point"]
    key = point["key"]
    record_path = layout.study_trial(study, key)
    cfg = PipelineConfig.model_validate(cfg_json)
    tcfg = trial_config(cfg, point)
    adapter = layout.study_adapter(study, key)
    rec = storage.read_json(record_path) if storage.exists(record_path) else None
    trained = rec is None
    if trained:
        if on_train_start:
            on_train_start(point)
        train = [tuple(r) for r in rows["gold"][point["seed"]][: point["budget"]]]
        train_runs = storage.join(study, "train_runs")
        # The Train run is named by the key: a rerun of an unfinished trial resumes its epochs.
        meta = train_peft(tcfg, train, [tuple(r) for r in rows["dev"]], adapter, name=key,
                          callbacks=_train_callbacks("dev_accuracy", True),
                          storage_path=train_runs, keep="best_dev", dev_before=before)
        rec = trial_record(point, meta, len(tcfg.labels.names))
        storage.write_json(record_path, rec)  # the trial is trained
        if not cfg.study.keep_train_runs:
            storage.delete_dir(storage.join(train_runs, key))
    if point["score_test"] and rec.get("test_accuracy") is None:
        pred, secs = score_rows(tcfg, adapter, rows["test_text"])
        storage.write_parquet(pd.DataFrame({"row_id": rows["test_ids"], "label_id": rows["test_y"],
                                            "pred": pred}),
                              layout.study_trial(study, key, ".test.parquet"))
        rec = with_test_scores(rec, rows["test_y"], pred, len(tcfg.labels.names), secs)
        storage.write_json(record_path, rec)  # after the predictions it counts
    if not trained:  # a trained trial's epochs reached Tune through TuneReportCallback, whose
        # last item may still be in flight: a second reporter here could race it
        tune.report({k: rec[k] for k in REPORTED if rec.get(k) is not None})


def _trial_dirname(trial) -> str:
    return trial.config["point"]["key"][:80]


def run_phase(cfg: PipelineConfig, phase: str, points: list[dict], rows: dict,
              before: dict, *, tune_callbacks: list | None = None,
              on_train_start: Callable[[dict], None] | None = None) -> dict[str, str]:
    """One Tune experiment over `points`; returns {trial key: error} for the trials that failed
    (they have no record and run again next time)."""
    from ray import tune

    st, study = cfg.study, layout.study_dir(cfg)
    if not points:
        return {}
    keys = sorted(p["key"] for p in points)
    name = f"{st.name}-{phase}-{content_hash(keys)[:8]}"
    root_path, fs = storage.train_storage(storage.join(study, "tune"))
    exp_ref = storage.join(root_path, name)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, cfg_json=cfg.model_dump(mode="json"), rows=rows, study=study,
                             before=before, on_train_start=on_train_start),
        {"cpu": st.trial_cpus})
    if tune.Tuner.can_restore(exp_ref, storage_filesystem=fs):
        log.info("restoring the Tune experiment %s", exp_ref)
        # Errored trials run again: with no record they are unfinished work (often a transient
        # failure on a loaded machine), and a restore happens once per session.
        tuner = tune.Tuner.restore(exp_ref, trainable=trainable, resume_unfinished=True,
                                   restart_errored=True, storage_filesystem=fs)
    else:
        storage.makedirs(storage.join(study, "tune"))
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search(points)},
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=st.max_concurrent_trials,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=name, storage_path=root_path, storage_filesystem=fs,
                callbacks=[_release_callback(), *(tune_callbacks or [])],
                failure_config=tune.FailureConfig(max_failures=st.max_failures, fail_fast=False),
                verbose=1 if console.verbose() else 0))
    grid = tuner.fit()
    errors = {}
    for result in grid:
        if result.error is not None:
            errors[result.config["point"]["key"]] = (str(result.error).splitlines() or [""])[0][:300]
    return errors


# --- the study ---

def load_records(study: str, keys: list[str]) -> list[dict[str, Any]]:
    """The finished trials among `keys` (a key without a record has not finished)."""
    out = []
    for key in keys:
        path = layout.study_trial(study, key)
        if storage.exists(path):
            out.append(storage.read_json(path))
    return out


def unfinished(study: str, points: list[dict], errors: dict[str, str]) -> list[str]:
    """Keys of `points` with neither a record nor an error: after a phase's Tune run, these
    trials never ran to an end, i.e. the run was interrupted."""
    return [p["key"] for p in points
            if p["key"] not in errors and not storage.exists(layout.study_trial(study, p["key"]))]


@dataclass
class StudyOutcome:
    study_dir: str
    summary: dict[str, Any]
    records: list[dict[str, Any]]


def run_study(cfg: PipelineConfig, *, phases: tuple[int, ...] = (1, 2),
              tune_callbacks: list | None = None,
              on_train_start: Callable[[dict], None] | None = None) -> StudyOutcome:
    """Run (or resume) the study's phases and write study.json; see the module docstring.
    `on_train_start(point)` runs in a trial's process when it starts training (it must pickle)."""
    st, study = cfg.study, layout.study_dir(cfg)
    storage.makedirs(study)
    rows = prepare_rows(cfg)
    fp = rows.fingerprint()
    p1 = phase1_points(cfg, fp)
    for p in p1:
        trial_config(cfg, p)  # a bad hyperparameter fails here, before Ray Tune starts
    base = baseline(cfg, rows)
    payload = _payload(rows)
    before = {k: v for k, v in base["dev"].items() if k != "seconds"}
    errors: dict[str, str] = {}
    interrupted = None
    if 1 in phases:
        errors.update(run_phase(cfg, "p1", p1, payload, before, tune_callbacks=tune_callbacks,
                                on_train_start=on_train_start))
        if unfinished(study, p1, errors):
            interrupted = "p1"
    lrs = choose_lrs(cfg, load_records(study, [p["key"] for p in p1]))
    p2 = phase2_points(cfg, {m: c["lr"] for m, c in lrs.items()}, fp)
    if 2 in phases and interrupted is None:
        errors.update(run_phase(cfg, "p2", p2, payload, before, tune_callbacks=tune_callbacks,
                                on_train_start=on_train_start))
        if unfinished(study, p2, errors):
            interrupted = "p2"
    keys = list(dict.fromkeys(p["key"] for p in p1 + p2))
    records = load_records(study, keys)
    done = {r["key"] for r in records}
    summary = {
        "task": task_name(cfg), "labels": rows.labels, "model": cfg.llm.model,
        "n_dev": len(rows.dev), "n_test": len(rows.test), "epochs": st.epochs,
        "budgets": st.budgets, "seeds": st.seeds, "select_budget": st.select_budget,
        "select_seeds": st.select_seeds, "max_length": trial_config(cfg, {
            "method": next(iter(st.methods)), "lr": 1.0, "seed": 0}).llm.max_length,
        "baseline": base, "lrs": lrs, "methods": list(st.methods),
        "phase1": [p["key"] for p in p1], "phase2": [p["key"] for p in p2],
        "missing_methods": [m for m in st.methods if m not in lrs],
        "errors": {k: v for k, v in errors.items() if k not in done},
        "rows_fingerprint": fp,
        # A phase whose Tune run returned with trials neither finished nor errored was stopped
        # (SIGINT): the study stops there instead of starting the next phase.
        "interrupted": interrupted,
    }
    storage.write_json(storage.join(study, layout.STUDY_SUMMARY), summary)
    return StudyOutcome(study, summary, records)


def read_study(cfg: PipelineConfig) -> StudyOutcome:
    """A study's last summary and its finished records, without Ray (for `--report-only`)."""
    study = layout.study_dir(cfg)
    path = storage.join(study, layout.STUDY_SUMMARY)
    if not storage.exists(path):
        raise FileNotFoundError(f"no {layout.STUDY_SUMMARY} in {study}: run `lambert-ray study` first")
    summary = storage.read_json(path)
    keys = list(dict.fromkeys(summary["phase1"] + summary["phase2"]))
    return StudyOutcome(study, summary, load_records(study, keys))
