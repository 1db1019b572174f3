"""The teacher's labels as the students read them: calibrated (calibration.py), raw ones kept.

A run has one or two teachers, each named by the directory of its corpus labels:

    annotate/        the 0-shot annotator     (llm_eval/, llm_dev/, llm_content_free/)
    annotate_peft/   base + PEFT adapter      (llm_eval_peft/, llm_dev_peft/, llm_content_free_peft/)

llm_eval*: its labels on the gold test rows (the report scores it there); llm_dev*: on gold dev
rows (fits temperature_bias); llm_content_free*: on calibration.content_free_inputs.
Each teacher's calibration is fitted once, from its own outputs, into <run_dir>/calibration.json
(refitted when the calibration config changes) and applied whenever labels are read, so the
annotation shards are never rewritten.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from lambert_ray import storage
from lambert_ray.calibration import Calibration, fit_prior, fit_temperature_bias, identity
from lambert_ray.config import PipelineConfig
from lambert_ray.stage import read_output, stage_complete

log = logging.getLogger(__name__)

TEACHERS = {"annotate": "", "annotate_peft": "_peft"}
CALIBRATION_FILE = "calibration.json"


def teacher_dirs(src: str) -> dict[str, str]:
    """Run-dir-relative output dirs of the teacher whose corpus labels are in `src`."""
    sfx = TEACHERS[src]
    return {"labels": src, "test": f"llm_eval{sfx}", "dev": f"llm_dev{sfx}",
            "content_free": f"llm_content_free{sfx}"}


def teacher_of(cfg: PipelineConfig, setting: str) -> str:
    """The teacher whose labels a student setting learns from: the PEFT-tuned annotator's when
    the peft stage runs (except 'llm-0shot'), else the 0-shot annotator's."""
    tuned = cfg.peft is not None and cfg.peft.enabled and setting != "llm-0shot"
    return "annotate_peft" if tuned else "annotate"


def needs_dev(cfg: PipelineConfig) -> bool:
    """The annotate stage also labels gold dev rows (to fit temperature_bias)."""
    return cfg.calibration.method in ("temperature_bias", "auto") and cfg.data.gold_dev is not None


def needs_content_free(cfg: PipelineConfig) -> bool:
    c = cfg.calibration
    return c.method in ("prior", "auto") and c.prior_source == "content_free"


def content_free_frame(cfg: PipelineConfig) -> pd.DataFrame:
    """calibration.content_free_inputs in the normalised schema (no error, even when empty)."""
    texts = cfg.calibration.content_free_inputs
    return pd.DataFrame({"row_id": [f"content-free-{i}" for i in range(len(texts))],
                         "text": texts, "label": [None] * len(texts), "error": [None] * len(texts)})


def _read(cfg: PipelineConfig, rel: str) -> pd.DataFrame | None:
    path = storage.join(cfg.run_dir, rel)
    if stage_complete(path) is None:
        return None
    df = read_output(path, ["row_id", "text", "gold", "label", "confidence", "probs", "error"])
    return df[df["error"].isna() & df["probs"].notna()].reset_index(drop=True)


def probs_matrix(df: pd.DataFrame) -> np.ndarray:
    return np.array([np.asarray(p, dtype=np.float64) for p in df["probs"]]).reshape(len(df), -1)


def gold_ids(df: pd.DataFrame, labels: list[str]) -> np.ndarray:
    to_id = {n: i for i, n in enumerate(labels)}
    return df["gold"].map(to_id).to_numpy(dtype=int)


def fit_teacher(cfg: PipelineConfig, src: str) -> Calibration | None:
    """Fit `src`'s calibration from its outputs (None while its labels are not complete)."""
    c, labels, dirs = cfg.calibration, cfg.labels.names, teacher_dirs(src)
    corpus = _read(cfg, dirs["labels"])
    if corpus is None:
        return None
    if c.method == "none":
        return identity(labels)
    method = c.method
    dev = _read(cfg, dirs["dev"]) if method in ("temperature_bias", "auto") else None
    if dev is not None:
        dev = dev[dev["gold"].isin(labels)]
    if method == "auto":
        method = ("temperature_bias" if dev is not None and len(dev) >= c.min_dev_rows
                  else "prior")
    if method == "temperature_bias":
        if dev is None or len(dev) < 2:
            raise ValueError(f"calibration.method=temperature_bias: {src} has no labelled gold dev "
                             f"rows in {dirs['dev']}/ (set data.gold_dev)")
        return fit_temperature_bias(probs_matrix(dev), gold_ids(dev, labels), labels,
                                    steps=c.steps, fitted_on=dirs["dev"])
    if c.prior_source == "content_free":
        cf = _read(cfg, dirs["content_free"])
        if cf is None or cf.empty:
            raise ValueError(f"calibration.prior_source=content_free: no scored content-free "
                             f"inputs in {dirs['content_free']}/ (rerun the annotate stage)")
        return fit_prior(probs_matrix(cf), labels, dirs["content_free"])
    return fit_prior(probs_matrix(corpus), labels, dirs["labels"],
                     iterations=c.prior_iterations, target=c.prior_target)


def ensure_calibration(cfg: PipelineConfig) -> dict[str, Calibration]:
    """Every complete teacher's calibration: read from calibration.json, fitting (and saving)
    the teachers it lacks, or all of them when the calibration config changed."""
    path = storage.join(cfg.run_dir, CALIBRATION_FILE)
    conf = cfg.calibration.model_dump(mode="json")
    saved = storage.read_json(path) if storage.exists(path) else {}
    teachers = ({k: Calibration.from_dict(v) for k, v in saved.get("teachers", {}).items()}
                if saved.get("config") == conf else {})
    changed = False
    for src in TEACHERS:
        if src not in teachers and (cal := fit_teacher(cfg, src)) is not None:
            teachers[src] = cal
            changed = True
            log.info("calibration of %s: %s (T=%.3f, bias=%s)", src, cal.method, cal.temperature,
                     np.round(cal.bias, 3).tolist())
    if changed:
        storage.write_json(path, {"config": conf,
                                  "teachers": {k: v.to_dict() for k, v in teachers.items()}})
    return teachers


def calibrated(df: pd.DataFrame, cal: Calibration | None, labels: list[str]) -> pd.DataFrame:
    """`df` (label, probs, confidence; errored rows may have None) with the calibrated label,
    probs and confidence; the raw ones move to label_raw / probs_raw / confidence_raw."""
    out = df.copy()
    out["label_raw"], out["probs_raw"] = df["label"], df["probs"]
    out["confidence_raw"] = df["confidence"]
    ok = df["probs"].notna().to_numpy()
    if cal is None or cal.method == "none" or not ok.any():
        return out
    p = cal.apply(probs_matrix(df[ok]))
    idx = np.flatnonzero(ok)
    probs, label, conf = list(df["probs"]), list(df["label"]), list(df["confidence"])
    for j, i in enumerate(idx):
        probs[i] = p[j].tolist()
        label[i] = labels[int(p[j].argmax())]
        conf[i] = float(p[j].max())
    out["probs"], out["label"], out["confidence"] = probs, label, conf
    return out


def llm_labels(cfg: PipelineConfig, src: str, kind: str = "labels") -> pd.DataFrame:
    """A teacher's rows as the students read them: row_id, text, label, probs, confidence
    (calibrated when calibration is on), label_raw, probs_raw, confidence_raw, gold, error.
    `src`: the teacher (annotate / annotate_peft); `kind`: labels (its corpus rows) or test
    (its gold test rows)."""
    cols = ["row_id", "text", "gold", "label", "confidence", "probs", "error"]
    path = storage.join(cfg.run_dir, teacher_dirs(src)[kind])
    df = read_output(path)  # all columns: older outputs may lack some (then None)
    for c in cols:
        if c not in df.columns:
            df[c] = None
    df = df[cols]
    cal = ensure_calibration(cfg).get(src)
    return calibrated(df, cal, cfg.labels.names)
