"""Classification metrics against gold: accuracy, macro-F1, per-class P/R/F1, confusion matrix.

One implementation for every user (the report, the students' dev scores, the PEFT dev scores):
everything is computed from the confusion matrix. No rows: accuracy and macro-F1 are NaN (there
is nothing to score), never a made-up 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(gold: Sequence[int], pred: Sequence[int], n_labels: int) -> np.ndarray:
    """[n_labels, n_labels] int64 counts: confusion[i][j] counts gold i predicted as j."""
    cm = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(cm, (np.asarray(gold, dtype=int), np.asarray(pred, dtype=int)), 1)
    return cm


def _per_class_prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 (0 where undefined: a label never predicted / never gold)."""
    tp = np.diag(cm).astype(float)
    pred_n, gold_n = cm.sum(0), cm.sum(1)
    prec = np.divide(tp, pred_n, out=np.zeros_like(tp), where=pred_n > 0)
    rec = np.divide(tp, gold_n, out=np.zeros_like(tp), where=gold_n > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(tp), where=prec + rec > 0)
    return prec, rec, f1


def metrics_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """accuracy and macro-F1 of a confusion matrix (labels absent from both gold and predictions
    count as F1 0); NaN when it holds no rows."""
    n = int(cm.sum())
    f1 = _per_class_prf(cm)[2]
    return {"accuracy": float(np.trace(cm) / n) if n else float("nan"),
            "macro_f1": float(f1.mean()) if n else float("nan"), "n": n}


def classification_metrics(gold: Sequence[int], pred: Sequence[int], labels: list[str]) -> dict:
    """gold/pred: label ids -> n, accuracy, macro_f1, per_class, confusion, labels."""
    cm = confusion_matrix(gold, pred, len(labels))
    prec, rec, f1 = _per_class_prf(cm)
    support = cm.sum(1)
    per_class = {name: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                        "support": int(support[i])} for i, name in enumerate(labels)}
    m = metrics_from_confusion(cm)
    return {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "per_class": per_class, "confusion": cm.tolist(), "labels": list(labels)}


def metrics_from_frame(df, labels: list[str], gold_col: str = "gold", pred_col: str = "label") -> dict:
    """Metrics over rows that have both a gold label and a prediction (errored rows excluded
    and counted as `n_errored`)."""
    to_id = {n: i for i, n in enumerate(labels)}
    ok = df[gold_col].notna() & df[pred_col].notna()
    m = classification_metrics(df.loc[ok, gold_col].map(to_id), df.loc[ok, pred_col].map(to_id), labels)
    m["n_errored"] = int((~ok).sum())
    return m
