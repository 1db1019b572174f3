"""The LlamBERT pipeline, stage by stage, into one run directory (`layout.py` shows it).

    annotate -> (peft) -> train-bert -> classify -> evaluate

This is the only module that knows the stage order. Each stage skips when its output is
complete, and resumes when it is partial (see stage.py), so `lambert-ray run` after a crash
continues where it stopped. `run.output_dir` may be a local dir or a bucket URI (`s3://...`,
`gs://...`): every stage reads and writes through `storage`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pandas as pd
import yaml

from lambert_ray import layout, storage
from lambert_ray.annotate import annotate
from lambert_ray.bert import train_bert
from lambert_ray.classify import classify
from lambert_ray.config import PipelineConfig
from lambert_ray.console import progress
from lambert_ray.data import (
    exclude_ids,
    gold_frame,
    gold_train,
    load_gold,
    read_source,
    sample,
    source_rows,
)
from lambert_ray.ray_utils import init_ray
from lambert_ray.report import build_report
from lambert_ray.stage import StageCounts, read_output, stage_complete
from lambert_ray.students import SETTINGS
from lambert_ray.train_peft import train_peft
from lambert_ray.tune import tune_stage

log = logging.getLogger(__name__)

STAGES = ["annotate", "peft", "train-bert", "classify", "evaluate"]


def stage_annotate(cfg: PipelineConfig) -> dict:
    """LLM labels (a) a seeded sample of the corpus, disjoint from the gold train subset and the
    gold test set, and (b) a sample of the gold test set, to score the LLM itself."""
    out = {name: layout.run_path(cfg, name) for name in (layout.ANNOTATE, layout.LLM_EVAL)}
    # Both outputs complete (a rerun): skip the corpus scan that draws the samples.
    done = {name: stage_complete(path) for name, path in out.items()}
    if done[layout.ANNOTATE] and (done[layout.LLM_EVAL] or cfg.data.gold_test is None):
        return {name: StageCounts(**d["counts"]) for name, d in done.items() if d}
    test = read_source(cfg, "gold_test")
    test = test.materialize() if test is not None else None
    # The LLM's sample never includes gold rows (train: the "gold" student; test: scoring).
    held_out = set(gold_train(cfg)["row_id"])
    if test is not None:
        held_out |= set(test.unique("row_id"))
    corpus = exclude_ids(read_source(cfg, "corpus"), held_out)
    total = source_rows(cfg.data.corpus, cfg.data, "data.corpus")  # sizes the hash threshold
    subset = sample(corpus, cfg.data.annotate_sample, cfg.run.seed, total=total).materialize()
    counts = {"annotate": annotate(cfg, subset, out[layout.ANNOTATE], rows_in=subset.count())}
    if test is not None:
        if cfg.data.llm_eval_limit:
            test = sample(test, cfg.data.llm_eval_limit, cfg.run.seed + 2).materialize()
        counts["llm_eval"] = annotate(cfg, test, out[layout.LLM_EVAL], name="llm_eval",
                                      rows_in=test.count())
    return counts


def peft_enabled(cfg: PipelineConfig) -> bool:
    return bool(cfg.peft and getattr(cfg.peft, "enabled", False))


def run_peft_stage(cfg: PipelineConfig, reannotate: bool = True) -> dict[str, Any]:
    """The `peft` stage: tune the annotator on the gold train subset (dev: gold_dev), write the
    adapter to <run_dir>/peft/<method>/ (or let Ray Tune choose it, with `tune.enabled`), then
    re-label the rows the 0-shot annotate stage labelled (annotate/, llm_eval/) with base +
    adapter into annotate_peft/, llm_eval_peft/. Each part skips when its output is complete;
    `reannotate=False` only trains (CLI `finetune`). Returns the adapter path, dev metrics
    before/after and the re-annotation counts."""
    import ray.data

    pc = cfg.peft
    assert pc is not None, "config has no peft section"
    train, dev = load_gold(cfg)
    if not train:
        raise RuntimeError("peft stage: no gold training rows (data.gold_train)")
    tuning = cfg.tune is not None and cfg.tune.enabled  # Ray Tune picks the method (tune.py)
    what = f"{len(train)} gold rows, " + ("Ray Tune over the methods" if tuning else pc.method)
    with progress("peft", detail=what) as line:
        if tuning:
            adapter, meta = tune_stage(cfg, train, dev)
        else:
            adapter = layout.adapter_dir(cfg, pc.method)
            meta = train_peft(cfg, train, dev, adapter)
        line["detail"] = (f"{what}: dev accuracy {meta['dev_before']['accuracy']:.1%} -> "
                          f"{meta['dev_after']['accuracy']:.1%}")
    tuned = cfg.model_copy(update={"llm": cfg.llm.model_copy(
        update={"adapter": adapter, "merge_adapter": pc.merge_adapter})})
    counts: dict[str, Any] = {"adapter": adapter, "dev_before": meta["dev_before"],
                              "dev_after": meta["dev_after"]}
    pairs = ((layout.ANNOTATE, layout.ANNOTATE_PEFT),
             (layout.LLM_EVAL, layout.LLM_EVAL_PEFT)) if reannotate else ()
    for src, dst in pairs:
        rows = read_output(layout.run_path(cfg, src), ["row_id", "text", "gold", "error"])
        if rows.empty:
            continue
        rows = rows.rename(columns={"gold": "label"})
        counts[dst] = annotate(tuned, ray.data.from_pandas(rows), layout.run_path(cfg, dst),
                               name=dst, rows_in=len(rows))
    return counts


def student_training_set(cfg: PipelineConfig, setting: str) -> pd.DataFrame:
    """(row_id, text, label) rows for a student (students.py): LLM labels, gold labels, or both
    (gold wins on overlap). "llm" labels are the PEFT-tuned annotator's when the peft stage ran."""
    llm_dirs = {"llm": layout.ANNOTATE_PEFT if peft_enabled(cfg) else layout.ANNOTATE,
                "llm-0shot": layout.ANNOTATE}
    parts = []
    for source in SETTINGS[setting].sources:
        if source == "gold":
            g = gold_train(cfg)
        else:
            g = read_output(layout.run_path(cfg, llm_dirs[source]), ["row_id", "text", "label", "error"])
        parts.append(g[g["error"].isna() & g["label"].notna()])
    df = pd.concat(parts, ignore_index=True)[["row_id", "text", "label"]]
    return df.drop_duplicates("row_id", keep="last")


def stage_train_bert(cfg: PipelineConfig) -> dict:
    dev = gold_frame(cfg, "gold_dev")
    out = {}
    for setting in cfg.bert.settings:
        train_df = student_training_set(cfg, setting)
        if train_df.empty:
            raise RuntimeError(f"bert setting {setting!r}: no training rows (run annotate first?)")
        what = f"{len(train_df)} rows x {cfg.bert.epochs} epochs"
        with progress(f"bert/{setting}", detail=what) as line:
            out[setting] = train_bert(cfg, train_df, dev, layout.student_dir(cfg, setting),
                                      name=f"bert-{setting.replace('+', '_')}")
            if "dev_accuracy" in out[setting]:
                line["detail"] = f"{what}: dev accuracy {out[setting]['dev_accuracy']:.1%}"
    return out


def stage_classify(cfg: PipelineConfig) -> dict:
    """The students on the gold test set, and the chosen student over the corpus."""
    counts = {}
    test = read_source(cfg, "gold_test")
    if test is not None:
        test = test.materialize()
        n = test.count()
        for setting in cfg.bert.settings:
            counts[f"test/{setting}"] = classify(cfg, test, layout.student_dir(cfg, setting),
                                                 layout.student_test_dir(cfg, setting),
                                                 name=f"test/{setting}", rows_in=n)
    corpus = read_source(cfg, "corpus")
    if cfg.data.classify_limit:
        corpus = corpus.limit(cfg.data.classify_limit)
    counts["classify"] = classify(cfg, corpus, layout.student_dir(cfg, cfg.bert.classify_with),
                                  layout.run_path(cfg, layout.CLASSIFY))
    return counts


def run_pipeline(cfg: PipelineConfig, stages: list[str] | None = None,
                 on_stage: Callable[[str], None] | None = None) -> dict:
    """Run `stages` (default: all) in order; returns the report dict."""
    init_ray(cfg.run.ray_address, cfg.run.num_cpus)
    storage.makedirs(cfg.run_dir)
    storage.write_text(layout.run_path(cfg, layout.CONFIG),
                       yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    funcs = {"annotate": stage_annotate, "peft": run_peft_stage, "train-bert": stage_train_bert,
             "classify": stage_classify, "evaluate": build_report}
    result: dict = {}
    for name in stages or STAGES:
        if name == "peft" and not peft_enabled(cfg):
            continue
        if on_stage:
            on_stage(name)
        result[name] = funcs[name](cfg)
    return result.get("evaluate", result)
