"""Where everything of a run lives: every run / tune path and every "done" marker, by name.

    <run_dir>/                 run.output_dir / run.name (a local dir or a bucket URI)
      config.yaml              the resolved config
      gold_train.parquet       the gold train subset (cached sample; disjoint from annotate/)
      annotate/                LLM labels for the sampled corpus subset      } Parquet shards +
      llm_eval/                LLM labels for the gold-test sample          } _COMPLETE.json
      peft/<method>/           the PEFT adapter (peft format) + metadata.json
      annotate_peft/, llm_eval_peft/   the same rows re-labelled with base + adapter
      annotate_adapters/, llm_eval_adapters/   the same rows under each of llm.adapters, one
                               pass (a row per row_id and adapter; annotate.adapter_output)
      sample/                  the drawn rows, unlabelled (annotate.parquet written last), when
                               peft.zero_shot is off and only the tuned LLM labels them
      bert/<setting>/          an HF student + metrics.json
      bert/_ray_train/         Ray Train checkpoints of the students (peft/_ray_train likewise)
      test/<setting>/          each student on the gold test set
      classify/                the chosen student over the corpus
      tune/                    the Ray Tune experiment (or tune.storage_path), see below
      report.md, report.json

    <tune dir>/
      <tune.name>/             the Tune experiment (restorable), trial dirs
      <tune.name>/adapters/<trial id>/, <tune.name>/train_runs/   each trial's adapter, Train run
      <tune.name>.fingerprint  what a restore must share with the run that started it
      results/                 tune_results.{md,json,csv}, trials.csv, plots, choice.json
      best_adapter/            the chosen trial's final adapter

Each output is complete when its marker, written last, exists: a stage's `_COMPLETE.json`
(row counts), a student's `metrics.json`, an adapter's `metadata.json`, the Tune choice's
`choice.json`.
"""

from __future__ import annotations

import os

from lambert_ray import storage
from lambert_ray.config import PipelineConfig

# "Done" markers (each written last).
STAGE_COMPLETE = "_COMPLETE.json"
STUDENT_DONE = "metrics.json"
ADAPTER_META = "metadata.json"
TUNE_CHOICE = "choice.json"

# Run directory entries.
CONFIG = "config.yaml"
GOLD_TRAIN = "gold_train.parquet"
ANNOTATE, LLM_EVAL = "annotate", "llm_eval"
ANNOTATE_PEFT, LLM_EVAL_PEFT = "annotate_peft", "llm_eval_peft"
ADAPTERS_SUFFIX = "_adapters"  # annotate_adapters/, llm_eval_adapters/, ... (llm.adapters)
SAMPLE = "sample"  # <run_dir>/sample/{annotate,llm_eval}.parquet: drawn rows, not labelled


def sample_path(cfg: PipelineConfig, name: str) -> str:
    """The drawn rows of `name` (ANNOTATE or LLM_EVAL) before any LLM labels them."""
    return run_path(cfg, SAMPLE, f"{name}.parquet")
CLASSIFY = "classify"
REPORT_MD, REPORT_JSON = "report.md", "report.json"
RAY_TRAIN = "_ray_train"
# Inside a PEFT Train checkpoint: the servable adapter (rank 0).
CHECKPOINT_ADAPTER = "adapter"


def run_path(cfg: PipelineConfig, *parts: str) -> str:
    return storage.join(cfg.run_dir, *parts)


def student_dir(cfg: PipelineConfig, setting: str) -> str:
    return run_path(cfg, "bert", setting)


def student_test_dir(cfg: PipelineConfig, setting: str) -> str:
    return run_path(cfg, "test", setting)


def adapter_dir(cfg: PipelineConfig, method: str) -> str:
    return run_path(cfg, "peft", method)


def train_runs_dir(out_dir: str) -> str:
    """Where Ray Train keeps the checkpoints of a model published to `out_dir`: next to it."""
    return storage.join(storage.parent(out_dir), RAY_TRAIN)


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}"


def tune_dir(cfg: PipelineConfig) -> str:
    """Parent of the Tune experiment, the results and the chosen adapter: a local/shared path
    (made absolute) or a bucket URI (Ray Tune and Train store there through pyarrow)."""
    assert cfg.tune is not None, "config has no tune section"
    root = cfg.tune.storage_path or run_path(cfg, "tune")
    return root if storage.scheme(root) else os.path.abspath(root)


def tune_experiment(cfg: PipelineConfig) -> str:
    return storage.join(tune_dir(cfg), cfg.tune.name)


def tune_fingerprint(cfg: PipelineConfig) -> str:
    return storage.join(tune_dir(cfg), f"{cfg.tune.name}.fingerprint")


def tune_results(cfg: PipelineConfig) -> str:
    return storage.join(tune_dir(cfg), "results")


def tune_best_adapter(cfg: PipelineConfig) -> str:
    return storage.join(tune_dir(cfg), "best_adapter")


def trial_adapter(experiment: str, trial_id: str) -> str:
    return storage.join(experiment, "adapters", trial_id)


def trial_train_runs(experiment: str) -> str:
    return storage.join(experiment, "train_runs")


# The PEFT study (study.py): <study dir> = study.storage_path or <run_dir>/study
#   rows/<hash>/{gold_s<seed>,dev,test}.parquet   the drawn rows every trial reads (cached)
#   baseline.json                                 the base model (0-shot) on dev and test
#   trials/<key>.json, trials/<key>.test.parquet  a finished trial (json last) + test predictions
#   adapters/<key>/                               each trial's kept (best dev epoch) adapter
#   train_runs/<key>/                             Ray Train checkpoints of an unfinished trial
#   tune/                                         the Tune experiments (one per phase, restorable)
#   study.json                                    lrs chosen, trial keys per phase, errors
STUDY_SUMMARY = "study.json"


def study_dir(cfg: PipelineConfig) -> str:
    assert cfg.study is not None, "config has no study section"
    root = cfg.study.storage_path or run_path(cfg, "study")
    return root if storage.scheme(root) else os.path.abspath(root)


def study_trial(study: str, key: str, suffix: str = ".json") -> str:
    return storage.join(study, "trials", key + suffix)


def study_adapter(study: str, key: str) -> str:
    return storage.join(study, "adapters", key)
