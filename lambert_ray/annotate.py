"""Annotation on Ray Data: an actor pool of `Annotator`s labels a dataset into Parquet.

Output columns: row_id, text, gold (the source label, if any), label, label_id, confidence,
probs (per label, in labels.names order), truncated, error, model, prompt_hash.
Each actor loads the model once (in __init__) and scores every batch it is handed.
"""

from __future__ import annotations

import logging

import pandas as pd

from lambert_ray.config import PipelineConfig

log = logging.getLogger(__name__)


class AnnotateBatch:
    """Ray Data callable class: one loaded annotator per actor."""

    def __init__(self, cfg: dict):
        from lambert_ray.annotator import Annotator
        from lambert_ray.models import set_cpu_threads

        self.cfg = PipelineConfig.model_validate(cfg)
        set_cpu_threads(self.cfg.annotate.torch_threads, self.cfg.annotate.max_actors)
        self.ann = Annotator.from_config(self.cfg)

    def _score_rows(self, texts: list[str]) -> tuple[dict | None, list[str | None]]:
        """Score a batch; if it fails, score rows one by one so one bad row errors alone."""
        try:
            return self.ann.score(texts), [None] * len(texts)
        except Exception as e:  # isolate the failing row(s)
            log.warning("batch of %d failed (%s); retrying row by row", len(texts), e)
        outs, errors = [], []
        for t in texts:
            try:
                outs.append(self.ann.score([t]))
                errors.append(None)
            except Exception as e:
                outs.append(None)
                errors.append(f"scoring_failed: {type(e).__name__}: {str(e)[:200]}")
        merged = {k: [] for k in next((o for o in outs if o), {"label": []})}
        for o in outs:
            for k in merged:
                merged[k].append(o[k][0] if o else None)
        return merged, errors

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        n = len(batch)
        out = pd.DataFrame({"row_id": batch["row_id"].values, "text": batch["text"].values,
                            "gold": batch["label"].values})
        errors = list(batch["error"].values)
        errors = [None if pd.isna(e) else e for e in errors]
        ok = [i for i in range(n) if errors[i] is None]
        cols = {k: [None] * n for k in ("label", "label_id", "confidence", "probs", "truncated")}
        if ok:
            scored, row_errors = self._score_rows([batch["text"].iloc[i] for i in ok])
            for j, i in enumerate(ok):
                if row_errors[j] is not None:
                    errors[i] = row_errors[j]
                    continue
                for k in cols:
                    cols[k][i] = scored[k][j]
        for k, v in cols.items():
            out[k] = v
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
