"""What the student learns from: per-row target distributions and weights. No Ray, no torch.

LlamBERT trains the student on the LLM's argmax labels. The annotator also writes its per-label
probabilities (`probs`, calibrated when calibration ran), which carry what the argmax throws
away: how sure the teacher was. `build_targets` turns LLM rows and gold rows into one training
table of (text, target, weight):

- `targets="hard"`: the target is the one-hot argmax label (LlamBERT's recipe).
- `targets="soft"`: the target is the teacher's distribution sharpened or flattened by a
  temperature, p_T ∝ p^(1/T) (T < 1 sharpens, T = 1 keeps it, T > 1 flattens) — knowledge
  distillation (Hinton et al. 2015) with the teacher's probabilities as the only signal.
- `min_confidence`: LLM rows whose top probability is below it are left out (gold rows never).
- `confidence_weight`: each LLM row's loss is weighted by its teacher margin over chance,
  (max p - 1/K) / (1 - 1/K), so a coin-flip label counts ~0 and a sure one counts 1.

Gold rows always get one-hot targets and weight `gold_weight`. `class_balance` summarises the
label mix of a training table (the report shows it; a skewed mix is flagged).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

TARGETS = ("hard", "soft")


def one_hot(label_ids: Sequence[int], k: int) -> np.ndarray:
    """[n, k] float32 one-hot rows."""
    out = np.zeros((len(label_ids), k), dtype=np.float32)
    out[np.arange(len(label_ids)), np.asarray(label_ids, dtype=int)] = 1.0
    return out


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rows of `probs` raised to 1/T and renormalised (log-space, so 0-probabilities are safe)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0)) / temperature
    logp -= logp.max(-1, keepdims=True)
    p = np.exp(logp)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def margin_weight(probs: np.ndarray) -> np.ndarray:
    """Teacher certainty above chance in [0, 1]: (max p - 1/K) / (1 - 1/K)."""
    k = probs.shape[1]
    return np.clip((probs.max(-1) - 1.0 / k) / (1.0 - 1.0 / k), 0.0, 1.0).astype(np.float32)


def _probs_matrix(df: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """[n, K] probabilities from a `probs` list column; rows without one get one-hot labels."""
    k, to_id = len(labels), {n: i for i, n in enumerate(labels)}
    if "probs" not in df.columns:
        return one_hot(df["label"].map(to_id).to_numpy(), k)
    out = np.zeros((len(df), k), dtype=np.float32)
    for i, (p, lab) in enumerate(zip(df["probs"], df["label"], strict=True)):
        if p is not None and len(p) == k:
            out[i] = np.asarray(p, dtype=np.float32)
        else:
            out[i, to_id[lab]] = 1.0
    return out


def build_targets(llm: pd.DataFrame | None, gold: pd.DataFrame | None, labels: list[str], *,
                  targets: str = "hard", temperature: float = 1.0, min_confidence: float = 0.0,
                  confidence_weight: bool = False, gold_weight: float = 1.0) -> pd.DataFrame:
    """One training table: columns row_id, text, label, target (list of K floats), weight,
    source ('llm' | 'gold'). `llm` rows need text, label and (for soft targets, confidence
    filters and weights) `probs`; `gold` rows need text and label. A row_id in both keeps gold."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    k, to_id = len(labels), {n: i for i, n in enumerate(labels)}
    parts = []
    if llm is not None and len(llm):
        probs = _probs_matrix(llm, labels)
        keep = probs.max(-1) >= min_confidence
        llm, probs = llm[keep], probs[keep]
        if targets == "soft":
            tgt = tempered(probs, temperature)
        else:
            tgt = one_hot(llm["label"].map(to_id).to_numpy(), k)
        w = margin_weight(probs) if confidence_weight else np.ones(len(llm), np.float32)
        parts.append(pd.DataFrame({"row_id": llm["row_id"].to_numpy(), "text": llm["text"].to_numpy(),
                                   "label": llm["label"].to_numpy(), "target": list(tgt),
                                   "weight": w, "source": "llm"}))
    if gold is not None and len(gold):
        tgt = one_hot(gold["label"].map(to_id).to_numpy(), k)
        parts.append(pd.DataFrame({"row_id": gold["row_id"].to_numpy(), "text": gold["text"].to_numpy(),
                                   "label": gold["label"].to_numpy(), "target": list(tgt),
                                   "weight": np.full(len(gold), gold_weight, np.float32),
                                   "source": "gold"}))
    if not parts:
        return pd.DataFrame(columns=["row_id", "text", "label", "target", "weight", "source"])
    df = pd.concat(parts, ignore_index=True)
    return df.drop_duplicates("row_id", keep="last").reset_index(drop=True)


def class_balance(df: pd.DataFrame, labels: list[str], skew_ratio: float = 3.0) -> dict:
    """Label mix of a training table: rows per label (argmax label), their shares, the soft
    mass per label when targets are soft, and `skewed` when the largest class has more than
    `skew_ratio` times the rows of the smallest (a student trained on that mostly learns the prior)."""
    counts = df["label"].value_counts().reindex(labels, fill_value=0)
    n = int(counts.sum())
    mass = np.stack(df["target"].to_numpy()).sum(0) if len(df) else np.zeros(len(labels))
    smallest = int(counts.min()) if len(counts) else 0
    ratio = float(counts.max() / smallest) if smallest else float("inf")
    return {"rows": {lab: int(c) for lab, c in counts.items()},
            "share": {lab: (float(c) / n if n else 0.0) for lab, c in counts.items()},
            "target_mass": {lab: float(m) for lab, m in zip(labels, mass, strict=True)},
            "max_min_ratio": ratio, "skewed": bool(ratio > skew_ratio)}
