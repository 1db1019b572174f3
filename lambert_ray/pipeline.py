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
from lambert_ray.annotate import annotate, annotate_adapters
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
from lambert_ray.distill import build_targets, class_balance
from lambert_ray.ray_utils import init_ray
from lambert_ray.report import build_report
from lambert_ray.review import CSV_COLUMNS, review_rows, review_summary
from lambert_ray.stage import StageCounts, completed_counts, read_output, stage_complete
from lambert_ray.students import SETTINGS, student_epochs
from lambert_ray.teacher_labels import (
    content_free_frame,
    llm_labels,
    needs_content_free,
    needs_dev,
    teacher_of,
)
from lambert_ray.train_peft import train_peft
from lambert_ray.tune import tune_stage

log = logging.getLogger(__name__)

STAGES = ["annotate", "peft", "train-bert", "classify", "evaluate"]


def stage_annotate(cfg: PipelineConfig) -> dict:
    """LLM labels (a) a seeded sample of the corpus, disjoint from the gold train subset and the
    gold test set, (b) the gold test set (all of it, or data.llm_eval_limit rows), to score the
    LLM on the students' rows, and for calibration (c) gold dev rows and (d) content-free inputs
    when calibration needs them (teacher_labels.py). With a peft stage and `peft.zero_shot` off,
    the rows are only drawn (sample/) for the tuned LLM to label. With `llm.adapters`, the same
    rows are then labelled under each of those adapters in one pass (`annotate_with_adapters`)."""
    counts = _annotate_samples(cfg)
    if cfg.llm.adapters:
        counts.update(annotate_with_adapters(cfg))
    return counts


def annotate_with_adapters(cfg: PipelineConfig) -> dict:
    """The rows of annotate/, llm_eval/ (and calibration's llm_dev/, llm_content_free/) under
    every adapter of `llm.adapters`, one pass each, into <name>_adapters/; returns
    {"<name>_adapters": {adapter: StageCounts}}."""
    import ray.data

    counts: dict[str, Any] = {}
    for src in (layout.ANNOTATE, layout.LLM_EVAL, "llm_dev", "llm_content_free"):
        dst = src + layout.ADAPTERS_SUFFIX
        out = layout.run_path(cfg, dst)
        if (done := stage_complete(out)) is not None:
            counts[dst] = completed_counts(done)
            continue
        rows = _rows_labelled_by_the_llm(cfg, src)
        if rows is None or rows.empty:
            continue
        counts[dst] = annotate_adapters(cfg, ray.data.from_pandas(rows), out, name=dst,
                                        rows_in=len(rows))
    return counts


def _rows_labelled_by_the_llm(cfg: PipelineConfig, src: str) -> pd.DataFrame | None:
    """The input rows (row_id, text, label, error) of the annotate stage's output `src`: those
    the 0-shot LLM labelled, or the drawn sample when it labels nothing; None if there is none."""
    if zero_shot(cfg):
        rows = read_output(layout.run_path(cfg, src), ["row_id", "text", "gold", "error"])
        return rows.rename(columns={"gold": "label"})
    if storage.exists(layout.sample_path(cfg, src)):
        rows = storage.read_parquet(layout.sample_path(cfg, src)).to_pandas()
        return rows[[c for c in ("row_id", "text", "label", "error") if c in rows.columns]]
    return None


def _annotate_samples(cfg: PipelineConfig) -> dict:
    """stage_annotate's 0-shot part: draw the samples and label them (or only draw them)."""
    import ray.data

    extra = {"llm_dev": needs_dev(cfg), "llm_content_free": needs_content_free(cfg)}
    if not zero_shot(cfg):
        return _draw_samples_only(cfg, extra)
    # Every output complete (a rerun): skip the corpus scan that draws the samples.
    wanted = [layout.ANNOTATE, *([layout.LLM_EVAL] if cfg.data.gold_test is not None else []),
              *[name for name, on in extra.items() if on]]
    done = {name: stage_complete(layout.run_path(cfg, name)) for name in wanted}
    if all(done.values()):
        return {name: StageCounts(**d["counts"]) for name, d in done.items()}
    counts = {}
    if not done.get(layout.ANNOTATE) or not done.get(layout.LLM_EVAL, True):
        subset, test = draw_samples(cfg)
        counts["annotate"] = annotate(cfg, subset, layout.run_path(cfg, layout.ANNOTATE),
                                      rows_in=subset.count())
        if test is not None:
            counts["llm_eval"] = annotate(cfg, test, layout.run_path(cfg, layout.LLM_EVAL),
                                          name="llm_eval", rows_in=test.count())
    for name, rows in _calibration_rows(cfg, extra).items():
        counts[name] = annotate(cfg, ray.data.from_pandas(rows), layout.run_path(cfg, name),
                                name=name, rows_in=len(rows))
    return counts


def _calibration_rows(cfg: PipelineConfig, extra: dict[str, bool]) -> dict[str, pd.DataFrame]:
    """The rows calibration needs the annotator to label: gold dev rows, content-free inputs."""
    rows = {}
    if extra["llm_dev"] and (dev := gold_frame(cfg, "gold_dev", cfg.calibration.dev_limit)) is not None:
        rows["llm_dev"] = dev
    if extra["llm_content_free"]:
        rows["llm_content_free"] = content_free_frame(cfg)
    return rows


def draw_samples(cfg: PipelineConfig):
    """(corpus sample, gold test sample or None) as materialised Ray datasets. The corpus sample
    never includes gold rows (train: the "gold" student; test: scoring)."""
    test = read_source(cfg, "gold_test")
    test = test.materialize() if test is not None else None
    held_out = set(gold_train(cfg)["row_id"])
    if test is not None:
        held_out |= set(test.unique("row_id"))
    corpus = exclude_ids(read_source(cfg, "corpus"), held_out)
    total = source_rows(cfg.data.corpus, cfg.data, "data.corpus")  # sizes the hash threshold
    subset = sample(corpus, cfg.data.annotate_sample, cfg.run.seed, total=total).materialize()
    if test is not None and cfg.data.llm_eval_limit:
        test = sample(test, cfg.data.llm_eval_limit, cfg.run.seed + 2).materialize()
    return subset, test


def _draw_samples_only(cfg: PipelineConfig, extra: dict[str, bool]) -> dict:
    """The rows each LLM output will hold, unlabelled, as sample/<name>.parquet;
    sample/annotate.parquet is written last: it marks the draw done."""
    if storage.exists(layout.sample_path(cfg, layout.ANNOTATE)):
        return {}
    subset, test = draw_samples(cfg)
    frames = {**_calibration_rows(cfg, extra),
              layout.LLM_EVAL: test.to_pandas() if test is not None else None,
              layout.ANNOTATE: subset.to_pandas()}
    for name, df in frames.items():
        if df is not None:
            storage.write_parquet(df, layout.sample_path(cfg, name))
    return {}


def zero_shot(cfg: PipelineConfig) -> bool:
    """Whether the 0-shot LLM labels the samples (always, without a peft stage)."""
    return not peft_enabled(cfg) or cfg.peft.zero_shot


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
    pairs = ((layout.ANNOTATE, layout.ANNOTATE_PEFT), (layout.LLM_EVAL, layout.LLM_EVAL_PEFT),
             ("llm_dev", "llm_dev_peft"),  # calibration's rows (teacher_labels.py)
             ("llm_content_free", "llm_content_free_peft")) if reannotate else ()
    for src, dst in pairs:
        rows = _rows_labelled_by_the_llm(cfg, src)
        if rows is None or rows.empty:
            continue
        counts[dst] = annotate(tuned, ray.data.from_pandas(rows), layout.run_path(cfg, dst),
                               name=dst, rows_in=len(rows))
    return counts


def gold_rows(cfg: PipelineConfig) -> pd.DataFrame:
    """Labelled gold rows for the students: the gold train subset plus data.gold_extra (e.g. a
    reviewed review/review.csv; its unlabelled rows are skipped)."""
    parts = [gold_train(cfg)]
    if cfg.data.gold_extra is not None:
        parts.append(gold_frame(cfg, "gold_extra"))
    g = pd.concat(parts, ignore_index=True)
    return g[g["error"].isna() & g["label"].notna()].drop_duplicates("row_id", keep="last")


def student_training_set(cfg: PipelineConfig, setting: str) -> pd.DataFrame:
    """A student's training table (row_id, text, label, target, weight, source; students.py):
    LLM labels as hard or soft targets (`bert.targets`, distill.py), gold labels (gold train +
    data.gold_extra), or both (gold wins on overlap). LLM labels are read through
    teacher_labels.llm_labels: calibrated when calibration is on, and the PEFT-tuned annotator's
    when the peft stage ran ("llm-0shot": always the 0-shot one's)."""
    llm = gold = None
    for source in SETTINGS[setting].sources:
        if source == "gold":
            gold = gold_rows(cfg)
        else:
            llm = llm_labels(cfg, teacher_of(cfg, source))
            llm = llm[llm["error"].isna() & llm["label"].notna()]
    b = cfg.bert
    return build_targets(llm, gold, cfg.labels.names, targets=b.targets, temperature=b.temperature,
                         min_confidence=b.min_confidence, confidence_weight=b.confidence_weight,
                         gold_weight=b.gold_weight)


def stage_train_bert(cfg: PipelineConfig) -> dict:
    dev = gold_frame(cfg, "gold_dev")
    out = {}
    for setting in cfg.bert.settings:
        train_df = student_training_set(cfg, setting)
        if train_df.empty:
            raise RuntimeError(f"bert setting {setting!r}: no training rows (run annotate first?)")
        base = SETTINGS[setting].init_from
        what = f"{len(train_df)} rows x {student_epochs(setting, cfg.bert)} epochs"
        if base:
            what += f" from the {base} student"
        with progress(f"bert/{setting}", detail=what) as line:
            out[setting] = train_bert(cfg, train_df, dev, layout.student_dir(cfg, setting),
                                      name=f"bert-{setting.replace('+', '_')}",
                                      balance=class_balance(train_df, cfg.labels.names),
                                      init=layout.student_dir(cfg, base) if base else None)
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
    if cfg.review.enabled:
        counts.update(stage_review(cfg))
    return counts


def stage_review(cfg: PipelineConfig) -> dict:
    """The corpus-classifying student on the teacher's annotated rows (review/student/), and the
    rows where they disagree or the teacher is unsure, ranked (review.py), to
    review/review.parquet + review.csv + summary.json: the rows a person should label next."""
    import ray.data

    src = teacher_of(cfg, cfg.bert.classify_with)
    teacher = llm_labels(cfg, src)
    teacher = teacher[teacher["error"].isna()]
    rows = teacher[["row_id", "text", "gold", "error"]].rename(columns={"gold": "label"})
    out = layout.run_path(cfg, "review", "student")
    counts = {"review/student": classify(cfg, ray.data.from_pandas(rows),
                                         layout.student_dir(cfg, cfg.bert.classify_with), out,
                                         name="review/student", rows_in=len(rows))}
    student = read_output(out, ["row_id", "label", "probs", "confidence", "error"])
    flagged = review_rows(teacher, student[student["error"].isna()], cfg.review.min_confidence)
    storage.write_parquet(flagged, layout.run_path(cfg, "review", "review.parquet"))
    storage.write_text(layout.run_path(cfg, "review", "review.csv"),
                       flagged[CSV_COLUMNS].to_csv(index=False))
    storage.write_json(layout.run_path(cfg, "review", "summary.json"),
                       {"teacher": src, "student": cfg.bert.classify_with,
                        "min_confidence": cfg.review.min_confidence,
                        **review_summary(flagged, len(student))})
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
