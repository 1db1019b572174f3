"""Annotation on Ray Data: an actor pool of `Annotator`s labels a dataset into Parquet.

Output columns: row_id, text, gold (the source label, if any), label, label_id, confidence,
probs (per label, in labels.names order), truncated, error, model, prompt_hash.
Each actor loads the model once (in __init__) and scores every batch it is handed.

`annotate_adapters`: the same, under each adapter of `llm.adapters` in one pass, every actor
holding one base model and all adapters (multi_adapter.py). The output has one row per row_id
and adapter, the same columns plus `adapter` (its name); a row_id's rows are in one shard.
`adapter_output(out_dir, name)` reads one adapter's rows in the single-adapter schema.
"""

from __future__ import annotations

import logging
from functools import partial

import pandas as pd

from lambert_ray.config import PipelineConfig
from lambert_ray.stage import map_clean_rows

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ["label", "label_id", "confidence", "probs", "truncated"]


class AnnotateBatch:
    """Ray Data callable class: one loaded annotator per actor."""

    def __init__(self, cfg: dict):
        from lambert_ray.annotator import Annotator
        from lambert_ray.models import set_cpu_threads

        self.cfg = PipelineConfig.model_validate(cfg)
        set_cpu_threads(self.cfg.annotate.torch_threads, self.cfg.annotate.max_actors)
        self.ann = Annotator.from_config(self.cfg)

    def _score(self, texts: list[str]) -> list[dict]:
        scored = self.ann.score(texts)  # columns -> one dict per row
        return [{k: scored[k][j] for k in OUTPUT_COLUMNS} for j in range(len(texts))]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return _output_frame(batch, self._score, self.ann.model_id, self.ann.prompt_hash)


def _output_frame(batch: pd.DataFrame, score, model_id: str, prompt_hash: str) -> pd.DataFrame:
    """The stage's output rows for `batch`: `score(texts)` per clean row, an error record per
    row that failed (stage.map_clean_rows)."""
    cols, errors = map_clean_rows(batch, score, OUTPUT_COLUMNS, "scoring_failed")
    out = pd.DataFrame({"row_id": batch["row_id"].values, "text": batch["text"].values,
                        "gold": batch["label"].values, **cols})
    out["error"] = errors
    out["model"] = model_id
    out["prompt_hash"] = prompt_hash
    return out


def annotate(cfg: PipelineConfig, ds, out_dir: str, *, name: str = "annotate", rows_in=None):
    """Label `ds` (normalized schema) with the configured LLM (+adapter) into `out_dir`."""
    from lambert_ray.stage import run_pool_stage

    return run_pool_stage(ds, AnnotateBatch, {"cfg": cfg.model_dump()}, cfg.annotate, out_dir,
                          max_error_fraction=cfg.errors.max_error_fraction, name=name,
                          rows_in=rows_in)


class AnnotateAdaptersBatch:
    """Ray Data callable class: one base model + every adapter of `llm.adapters` per actor."""

    def __init__(self, cfg: dict):
        from lambert_ray.models import set_cpu_threads
        from lambert_ray.multi_adapter import MultiAnnotator

        self.cfg = PipelineConfig.model_validate(cfg)
        set_cpu_threads(self.cfg.annotate.torch_threads, self.cfg.annotate.max_actors)
        self.ann = MultiAnnotator.from_config(self.cfg)

    def _score(self, name: str, texts: list[str]) -> list[dict]:
        scored = self.ann.score(texts, [name])[name]
        return [{k: scored[k][j] for k in OUTPUT_COLUMNS} for j in range(len(texts))]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        frames = []
        for name in self.ann.names:  # each adapter's failures stay its own (row by row)
            out = _output_frame(batch, partial(self._score, name), self.ann.model_ids[name],
                                self.ann.prompt_hash)
            out.insert(1, "adapter", name)
            frames.append(out)
        return pd.concat(frames, ignore_index=True)


def annotate_adapters(cfg: PipelineConfig, ds, out_dir: str, *, name: str = "annotate_adapters",
                      rows_in=None) -> dict:
    """Label `ds` with every adapter of `cfg.llm.adapters` in one pass into `out_dir`; returns
    {adapter: StageCounts}, each adapter's rows in = ok + errored."""
    from lambert_ray.stage import run_pool_stage

    if not cfg.llm.adapters:
        raise ValueError("annotate_adapters: llm.adapters is empty")
    return run_pool_stage(ds, AnnotateAdaptersBatch, {"cfg": cfg.model_dump()}, cfg.annotate,
                          out_dir, max_error_fraction=cfg.errors.max_error_fraction, name=name,
                          rows_in=rows_in, fan_out=("adapter", list(cfg.llm.adapters)))


def adapter_output(out_dir: str, adapter: str, columns: list[str] | None = None) -> pd.DataFrame:
    """One adapter's rows of an `annotate_adapters` output, without the `adapter` column."""
    from lambert_ray.stage import read_output

    df = read_output(out_dir, None if columns is None else ["adapter", *columns])
    df = df[df["adapter"] == adapter].drop(columns="adapter").reset_index(drop=True)
    return df
