"""Annotation on Ray Data: an actor pool of `Annotator`s labels a dataset into Parquet.

Output columns: row_id, text, gold (the source label, if any), label, label_id, confidence,
probs (per label, in labels.names order), truncated, error, model, prompt_hash.
Each actor loads the model once (in __init__) and scores every batch it is handed.
"""

from __future__ import annotations

import logging

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
        cols, errors = map_clean_rows(batch, self._score, OUTPUT_COLUMNS, "scoring_failed")
        out = pd.DataFrame({"row_id": batch["row_id"].values, "text": batch["text"].values,
                            "gold": batch["label"].values, **cols})
        out["error"] = errors
        out["model"] = self.ann.model_id
        out["prompt_hash"] = self.ann.prompt_hash
        return out


def annotate(cfg: PipelineConfig, ds, out_dir: str, *, name: str = "annotate", rows_in=None):
    """Label `ds` (normalized schema) with the configured LLM (+adapter) into `out_dir`."""
    from lambert_ray.stage import run_pool_stage

    return run_pool_stage(ds, AnnotateBatch, {"cfg": cfg.model_dump()}, cfg.annotate, out_dir,
                          max_error_fraction=cfg.errors.max_error_fraction, name=name,
                          rows_in=rows_in)
