"""Disagreement review: the annotated rows a person should label next. No Ray: pandas + numpy.

A row is flagged when the student (trained on the teacher's labels) disagrees with the teacher,
or the teacher's (calibrated) confidence is below `min_confidence`. Flagged rows are ranked by

    score = TV(p_teacher, p_student) + H(p_teacher) / log(L)        each term in [0, 1]

(total-variation distance between the two label distributions, plus the teacher's normalised
entropy): confident disagreements and uncertain teachers first. The export has an empty `label`
column for the person; the filled file goes back in as `data.gold_extra`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CSV_COLUMNS = ["rank", "row_id", "text", "label", "teacher_label", "teacher_confidence",
               "student_label", "student_confidence", "disagree", "low_confidence", "score"]


def _matrix(col: pd.Series) -> np.ndarray:
    return np.array([np.asarray(p, dtype=np.float64) for p in col]).reshape(len(col), -1)


def review_rows(teacher: pd.DataFrame, student: pd.DataFrame, min_confidence: float) -> pd.DataFrame:
    """teacher: row_id, text, label, probs, confidence (the labels the student learned from);
    student: row_id, label, probs, confidence on the same rows. Returns the flagged rows, ranked
    (rank 1 = label first), with CSV_COLUMNS + teacher_probs, student_probs."""
    t = teacher[teacher["probs"].notna()][["row_id", "text", "label", "probs", "confidence"]]
    s = student[student["probs"].notna()][["row_id", "label", "probs", "confidence"]]
    df = t.merge(s, on="row_id", suffixes=("_t", "_s"))
    if df.empty:
        return pd.DataFrame(columns=[*CSV_COLUMNS, "teacher_probs", "student_probs"])
    pt, ps = _matrix(df["probs_t"]), _matrix(df["probs_s"])
    tv = 0.5 * np.abs(pt - ps).sum(1)
    ent = -(pt * np.log(np.clip(pt, 1e-12, 1))).sum(1) / np.log(pt.shape[1])
    out = pd.DataFrame({
        "row_id": df["row_id"], "text": df["text"], "label": "",
        "teacher_label": df["label_t"], "teacher_confidence": df["confidence_t"].astype(float),
        "student_label": df["label_s"], "student_confidence": df["confidence_s"].astype(float),
        "disagree": (df["label_t"] != df["label_s"]).to_numpy(),
        "low_confidence": (df["confidence_t"].astype(float) < min_confidence).to_numpy(),
        "score": tv + ent, "teacher_probs": df["probs_t"], "student_probs": df["probs_s"]})
    out = out[out["disagree"] | out["low_confidence"]]
    out = out.sort_values(["score", "row_id"], ascending=[False, True], kind="stable")
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out.reset_index(drop=True)


def review_summary(flagged: pd.DataFrame, n_compared: int) -> dict:
    """Counts for the report: rows compared, flagged, and why."""
    return {"rows_compared": int(n_compared), "rows_flagged": int(len(flagged)),
            "disagree": int(flagged["disagree"].sum()) if len(flagged) else 0,
            "low_confidence": int(flagged["low_confidence"].sum()) if len(flagged) else 0}
