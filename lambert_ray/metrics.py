"""Classification metrics against gold: accuracy, macro-F1, per-class P/R/F1, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification_metrics(gold: Sequence[int], pred: Sequence[int], labels: list[str]) -> dict:
    """gold/pred: label ids. confusion[i][j] counts gold i predicted as j."""
    g, p = np.asarray(gold, dtype=int), np.asarray(pred, dtype=int)
    k = len(labels)
    conf = np.zeros((k, k), dtype=int)
    np.add.at(conf, (g, p), 1)
    per_class = {}
    f1s = []
    for i, name in enumerate(labels):
        tp = conf[i, i]
        prec = tp / conf[:, i].sum() if conf[:, i].sum() else 0.0
        rec = tp / conf[i, :].sum() if conf[i, :].sum() else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[name] = {"precision": float(prec), "recall": float(rec), "f1": float(f1),
                           "support": int(conf[i, :].sum())}
        f1s.append(f1)
    return {
        "n": int(len(g)),
        "accuracy": float((g == p).mean()) if len(g) else 0.0,
        "macro_f1": float(np.mean(f1s)) if len(g) else 0.0,
        "per_class": per_class,
        "confusion": conf.tolist(),
        "labels": list(labels),
    }


def metrics_from_frame(df, labels: list[str], gold_col: str = "gold", pred_col: str = "label") -> dict:
    """Metrics over rows that have both a gold label and a prediction (errored rows excluded
    and counted as `n_errored`)."""
    to_id = {n: i for i, n in enumerate(labels)}
    ok = df[gold_col].notna() & df[pred_col].notna()
    m = classification_metrics(df.loc[ok, gold_col].map(to_id), df.loc[ok, pred_col].map(to_id), labels)
    m["n_errored"] = int((~ok).sum())
    return m
