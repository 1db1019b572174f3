"""The LlamBERT pipeline, stage by stage, into one run directory.

    <run_dir>/
      config.yaml            the resolved config
      annotate/              LLM labels for the sampled corpus subset (Parquet shards)
      llm_eval/              LLM labels for the gold-test subset (scores the LLM itself)
      gold_train.parquet     the gold subset (BERT "gold" setting; disjoint from annotate/)
      bert/<setting>/        HF students: llm, gold, llm+gold (llm-0shot)
      test/<setting>/        each student on the gold test set
      classify/              the chosen student over the corpus
      report.md, report.json

Each stage skips when its output is complete, and resumes when it is partial (see stage.py),
so `lambert-ray run` after a crash continues where it stopped. `run.output_dir` may be a local
dir or a bucket URI (`s3://...`, `gs://...`): every stage reads and writes through `storage`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pandas as pd
import yaml

from lambert_ray import storage
from lambert_ray.config import PipelineConfig
from lambert_ray.data import exclude_ids, read_table, sample
from lambert_ray.ray_utils import init_ray
from lambert_ray.stage import read_output

log = logging.getLogger(__name__)

STAGES = ["annotate", "peft", "train-bert", "classify", "evaluate"]


def _p(cfg: PipelineConfig, *parts: str) -> str:
    return storage.join(cfg.run_dir, *parts)


def _table(cfg: PipelineConfig, field: str):
    src = getattr(cfg.data, field)
    if src is None:
        return None
    return read_table(src, cfg.data, cfg.labels, f"data.{field}", cfg.errors.min_chars)


def gold_train(cfg: PipelineConfig) -> pd.DataFrame:
    """The gold training subset (deterministic sample), cached as Parquet in the run dir."""
    path = _p(cfg, "gold_train.parquet")
    if storage.exists(path):
        return storage.read_parquet(path).to_pandas()
    ds = _table(cfg, "gold_train")
    if ds is None:
        return pd.DataFrame(columns=["row_id", "text", "label", "error"])
    if cfg.data.gold_train_sample:
        ds = sample(ds, cfg.data.gold_train_sample, cfg.run.seed + 1)
    df = ds.to_pandas()
    storage.write_parquet(df, path)
    return df


def gold_frame(cfg: PipelineConfig, field: str, limit: int | None = None) -> pd.DataFrame | None:
    ds = _table(cfg, field)
    if ds is None:
        return None
    if limit:
        ds = sample(ds, limit, cfg.run.seed + 2)
    df = ds.to_pandas()
    return df[df["error"].isna()]


def stage_annotate(cfg: PipelineConfig) -> dict:
    """LLM labels (a) a seeded sample of the corpus, disjoint from the gold train subset and the
    gold test set, and (b) a sample of the gold test set, to score the LLM itself."""
    from lambert_ray.annotate import annotate
    from lambert_ray.stage import StageCounts, stage_complete

    # Both outputs complete (a rerun): skip the corpus scan that draws the samples.
    done = {name: stage_complete(_p(cfg, name)) for name in ("annotate", "llm_eval")}
    if done["annotate"] and (done["llm_eval"] or cfg.data.gold_test is None):
        return {name: StageCounts(**d["counts"]) for name, d in done.items() if d}
    test = _table(cfg, "gold_test")
    test = test.materialize() if test is not None else None
    # The LLM's sample never includes gold rows (train: the "gold" student; test: scoring).
    held_out = set(gold_train(cfg)["row_id"])
    if test is not None:
        held_out |= set(test.unique("row_id"))
    corpus = exclude_ids(_table(cfg, "corpus"), held_out)
    subset = sample(corpus, cfg.data.annotate_sample, cfg.run.seed).materialize()
    counts = {"annotate": annotate(cfg, subset, _p(cfg, "annotate"), rows_in=subset.count())}
    if test is not None:
        if cfg.data.llm_eval_limit:
            test = sample(test, cfg.data.llm_eval_limit, cfg.run.seed + 2).materialize()
        counts["llm_eval"] = annotate(cfg, test, _p(cfg, "llm_eval"), name="llm_eval",
                                      rows_in=test.count())
    return counts


def llm_labels_dir(cfg: PipelineConfig) -> str:
    """Where the students' LLM labels come from: the PEFT-tuned annotator's when the peft stage
    ran, else the 0-shot annotator's."""
    return "annotate_peft" if _peft_enabled(cfg) else "annotate"


def student_training_set(cfg: PipelineConfig, setting: str) -> pd.DataFrame:
    """(text, label) rows for a student: LLM labels, gold labels, or both (gold wins on overlap)."""
    parts = []
    if setting in ("llm", "llm+gold", "llm-0shot"):
        src = "annotate" if setting == "llm-0shot" else llm_labels_dir(cfg)
        llm = read_output(_p(cfg, src), ["row_id", "text", "label", "error"])
        parts.append(llm[llm["error"].isna() & llm["label"].notna()])
    if setting in ("gold", "llm+gold"):
        g = gold_train(cfg)
        parts.append(g[g["error"].isna() & g["label"].notna()])
    df = pd.concat(parts, ignore_index=True)[["row_id", "text", "label"]]
    return df.drop_duplicates("row_id", keep="last")


def stage_train_bert(cfg: PipelineConfig) -> dict:
    from lambert_ray.bert import train_bert

    dev = gold_frame(cfg, "gold_dev")
    out = {}
    for setting in cfg.bert.settings:
        train_df = student_training_set(cfg, setting)
        if train_df.empty:
            raise RuntimeError(f"bert setting {setting!r}: no training rows (run annotate first?)")
        out[setting] = train_bert(cfg, train_df, dev, _p(cfg, "bert", setting),
                                  name=f"bert-{setting.replace('+', '_')}")
    return out


def stage_classify(cfg: PipelineConfig) -> dict:
    """The students on the gold test set, and the chosen student over the corpus."""
    from lambert_ray.classify import classify

    counts = {}
    test = _table(cfg, "gold_test")
    if test is not None:
        test = test.materialize()
        n = test.count()
        for setting in cfg.bert.settings:
            counts[f"test/{setting}"] = classify(cfg, test, _p(cfg, "bert", setting),
                                                 _p(cfg, "test", setting), name=f"test/{setting}",
                                                 rows_in=n)
    corpus = _table(cfg, "corpus")
    if cfg.data.classify_limit:
        corpus = corpus.limit(cfg.data.classify_limit)
    counts["classify"] = classify(cfg, corpus, _p(cfg, "bert", cfg.bert.classify_with),
                                  _p(cfg, "classify"))
    return counts


def stage_evaluate(cfg: PipelineConfig) -> dict:
    from lambert_ray.report import build_report

    return build_report(cfg)


def run_pipeline(cfg: PipelineConfig, stages: list[str] | None = None,
                 on_stage: Callable[[str], None] | None = None) -> dict:
    """Run `stages` (default: all) in order; returns the report dict."""
    init_ray(cfg.run.ray_address, cfg.run.num_cpus)
    storage.makedirs(cfg.run_dir)
    storage.write_text(_p(cfg, "config.yaml"),
                       yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    funcs = {"annotate": stage_annotate, "peft": _stage_peft, "train-bert": stage_train_bert,
             "classify": stage_classify, "evaluate": stage_evaluate}
    result: dict = {}
    for name in stages or STAGES:
        if name == "peft" and not _peft_enabled(cfg):
            continue
        if on_stage:
            on_stage(name)
        result[name] = funcs[name](cfg)
    return result.get("evaluate", result)


def _peft_enabled(cfg: PipelineConfig) -> bool:
    return bool(cfg.peft and getattr(cfg.peft, "enabled", False))


def _stage_peft(cfg: PipelineConfig) -> dict:
    """Tune the annotator (Ray Train + DeepSpeed) and re-annotate with the adapter."""
    from lambert_ray.train_peft import run_peft_stage

    return run_peft_stage(cfg)
