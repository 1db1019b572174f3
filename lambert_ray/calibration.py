"""Calibrating the annotator's label probabilities. No Ray: numpy + torch only.

An LLM scores each label by log p(verbaliser | prompt). Those scores carry a prior that has
nothing to do with the row: a 135M model says "positive" for ~90 % of SST-2 sentences, and a
multi-token verbaliser that starts with a common sub-word can take nearly every row. Every
method here is one affine map of the row's log-probabilities, then a softmax over the labels:

    calibrated = softmax(log(p_raw) / T + b)          T > 0: temperature, b: per-label bias

- `prior` (no gold; Zhao et al. 2021, "contextual calibration"): T = 1, b = -log(prior), where
  the prior is the annotator's mean distribution on content-free inputs ("N/A", "[MASK]", ...)
  or on the annotated rows themselves. Dividing the prior out makes a row's label the one whose
  probability rose most above the label's baseline (a PMI-style score).
- `temperature_bias` (gold dev rows the annotator never trained on): T and b fitted by
  minimising the negative log-likelihood of the gold labels (vector / "bias" scaling, LBFGS).

`Calibration` round-trips through JSON (`calibration.json` in the run directory) and is applied
when labels are read, so the raw annotation shards are never rewritten.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

EPS = 1e-12
# |log T| bound: an annotator with no signal on the dev rows drives T to infinity (uniform
# probabilities); T stays within [e^-5, e^5] = [0.007, 148] instead.
LOG_T_MAX = 5.0


@dataclass
class Calibration:
    """softmax(log(p) / temperature + bias). `method`: how it was fitted; `n_fit`: rows used."""

    method: str
    labels: list[str]
    temperature: float = 1.0
    bias: list[float] = field(default_factory=list)
    n_fit: int = 0
    fitted_on: str = ""

    def __post_init__(self) -> None:
        if not self.bias:
            self.bias = [0.0] * len(self.labels)
        if len(self.bias) != len(self.labels):
            raise ValueError(f"calibration bias has {len(self.bias)} entries for "
                             f"{len(self.labels)} labels")
        if not self.temperature > 0:
            raise ValueError(f"calibration temperature must be > 0, got {self.temperature}")

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """[N, L] raw label probabilities -> [N, L] calibrated ones (rows sum to 1)."""
        logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0))
        return softmax(logits / self.temperature + np.asarray(self.bias))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(**d)


def identity(labels: list[str]) -> Calibration:
    return Calibration("none", list(labels))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def fit_prior(prior_probs: np.ndarray, labels: list[str], fitted_on: str = "", *,
              iterations: int = 1, target: list[float] | None = None) -> Calibration:
    """Divide out the annotator's label prior, estimated from `prior_probs` ([N, L]: the
    annotator on content-free inputs, or on the unlabelled annotated rows). Needs no gold.

    iterations=1 is contextual calibration (Zhao et al. 2021): b = -log(mean of prior_probs).
    More iterations repeat the step on the corrected probabilities, b -= log(mean / target),
    until the rows' mean calibrated distribution is `target` (default uniform). Over-confident
    (near one-hot) probabilities need this: their mean is the predicted-label frequency, which
    understates the bias in log space."""
    p = np.clip(np.asarray(prior_probs, dtype=np.float64), EPS, 1.0)
    tgt = np.full(p.shape[1], 1 / p.shape[1]) if target is None else np.asarray(target, float)
    if tgt.shape != (p.shape[1],) or not np.isclose(tgt.sum(), 1) or (tgt <= 0).any():
        raise ValueError(f"calibration prior target must be {p.shape[1]} positive numbers "
                         f"summing to 1, got {target}")
    bias = np.zeros(p.shape[1])
    logp = np.log(p)
    for _ in range(max(1, iterations)):
        mean = softmax(logp + bias).mean(0)
        step = np.log(np.clip(mean, EPS, None) / tgt)
        bias -= step
        if np.abs(step).max() < 1e-6:
            break
    bias -= bias.mean()
    return Calibration("prior", list(labels), 1.0, bias.tolist(), len(p), fitted_on)


def fit_temperature_bias(probs: np.ndarray, gold: np.ndarray, labels: list[str], *,
                         steps: int = 200, fitted_on: str = "") -> Calibration:
    """Temperature + per-label bias minimising the NLL of `gold` (label ids) under
    softmax(log(probs) / T + b), by LBFGS in torch. T is fitted as log T (stays positive,
    |log T| <= LOG_T_MAX); b is centred (a constant shift changes nothing)."""
    import torch

    x = torch.log(torch.as_tensor(np.clip(probs, EPS, 1.0), dtype=torch.float64))
    y = torch.tensor(np.array(gold), dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / log_t.clamp(-LOG_T_MAX, LOG_T_MAX).exp() + b, y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().clamp(-LOG_T_MAX, LOG_T_MAX).exp())
    bias = (b - b.mean()).detach().numpy()
    return Calibration("temperature_bias", list(labels), t, bias.tolist(), len(y), fitted_on)


def ece(probs: np.ndarray, gold: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top label: sum over equal-width confidence bins of
    (rows in bin / N) * |accuracy - mean confidence| (0 = perfectly calibrated)."""
    bins = reliability_bins(probs, gold, n_bins)
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in bins if b["count"])) if n else 0.0


def reliability_bins(probs: np.ndarray, gold: np.ndarray, n_bins: int = 15) -> list[dict]:
    """Per confidence bin [lo, hi): count, mean confidence, accuracy of the top label."""
    p = np.asarray(probs, dtype=np.float64)
    conf, pred = p.max(1), p.argmax(1)
    correct = pred == np.asarray(gold)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, n_bins - 1)
    out = []
    for k in range(n_bins):
        m = idx == k
        out.append({"lo": float(edges[k]), "hi": float(edges[k + 1]), "count": int(m.sum()),
                    "confidence": float(conf[m].mean()) if m.any() else 0.0,
                    "accuracy": float(correct[m].mean()) if m.any() else 0.0})
    return out


def summary(probs: np.ndarray, gold: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, ECE, NLL and the predicted-label histogram of `probs` against `gold` ids."""
    p = np.asarray(probs, dtype=np.float64)
    g = np.asarray(gold)
    pred = p.argmax(1)
    return {"n": int(len(g)), "accuracy": float((pred == g).mean()) if len(g) else 0.0,
            "ece": ece(p, g), "nll": float(-np.log(np.clip(p[np.arange(len(g)), g], EPS, 1)).mean())
            if len(g) else 0.0,
            "predicted": {name: int((pred == i).sum()) for i, name in enumerate(labels)}}


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "",
                     n_bins: int = 15) -> bytes:
    """A reliability diagram (PNG bytes): accuracy against confidence per bin, one line per
    `curves` entry (name -> (probs, gold ids)), with each curve's ECE in the legend."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.5), dpi=110)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect")
    for name, (p, g) in curves.items():
        bins = [b for b in reliability_bins(p, g, n_bins) if b["count"]]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                label=f"{name} (ECE {ece(p, g, n_bins):.3f})")
    ax.set_xlabel("confidence (top label)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
