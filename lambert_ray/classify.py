"""Classification on Ray Data: an actor pool of trained BERT students labels a dataset.

Output columns: row_id, gold, label, label_id, confidence, probs, error.
"""

from __future__ import annotations

import logging

import pandas as pd

from lambert_ray.config import PipelineConfig

log = logging.getLogger(__name__)


def quantize_int8(model):
    """int8 dynamic quantisation of every nn.Linear (int8 weights; activations quantised per
    batch at run time). CPU inference only; embeddings and LayerNorm stay fp32."""
    import torch

    if next(model.parameters()).device.type != "cpu":
        raise ValueError("classify.int8 needs the student on CPU (quantize_dynamic has no GPU kernels)")
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


class ClassifyBatch:
    """Ray Data callable class: loads the student once per actor."""

    def __init__(self, model_dir: str, labels: list[str], max_length: int, device: str = "auto",
                 threads: int | None = None, sharers: int = 1, trust_remote_code: bool = False,
                 int8: bool = False):
        import torch

        from lambert_ray.bert import load_classifier
        from lambert_ray.models import pick_device, set_cpu_threads

        set_cpu_threads(threads, sharers)

        self.model, self.tok = load_classifier(model_dir, labels, trust_remote_code)
        self.model.to(pick_device(device)).eval()
        if int8:
            self.model = quantize_int8(self.model)
        self.labels, self.max_length = labels, max_length
        torch.set_grad_enabled(False)

    def _predict_rows(self, texts: list[str]) -> tuple[list, list[str | None]]:
        """Class probabilities per text; if the batch fails, predict rows one by one so one bad
        row errors alone (its probs None, its error the reason)."""
        from lambert_ray.bert import predict_proba

        try:
            return list(predict_proba(self.model, self.tok, texts, self.max_length)), [None] * len(texts)
        except Exception as e:
            log.warning("batch of %d failed (%s); retrying row by row", len(texts), e)
        probs, errors = [], []
        for t in texts:
            try:
                probs.append(predict_proba(self.model, self.tok, [t], self.max_length)[0])
                errors.append(None)
            except Exception as e:
                probs.append(None)
                errors.append(f"classify_failed: {type(e).__name__}: {str(e)[:200]}")
        return probs, errors

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        n = len(batch)
        out = pd.DataFrame({"row_id": batch["row_id"].values, "gold": batch["label"].values})
        errors = list(batch["error"].values)
        errors = [None if pd.isna(e) else e for e in errors]
        ok = [i for i in range(n) if errors[i] is None]
        cols = {k: [None] * n for k in ("label", "label_id", "confidence", "probs")}
        if ok:
            probs, row_errors = self._predict_rows([batch["text"].iloc[i] for i in ok])
            for j, i in enumerate(ok):
                if row_errors[j] is not None:
                    errors[i] = row_errors[j]
                    continue
                k = int(probs[j].argmax())
                cols["label"][i], cols["label_id"][i] = self.labels[k], k
                cols["confidence"][i], cols["probs"][i] = float(probs[j][k]), probs[j].tolist()
        for k, v in cols.items():
            out[k] = v
        out["error"] = errors
        return out


def classify(cfg: PipelineConfig, ds, model_dir: str, out_dir: str, *, name: str = "classify",
             rows_in=None):
    from lambert_ray.stage import run_pool_stage

    kwargs = {"model_dir": model_dir, "labels": cfg.labels.names, "max_length": cfg.bert.max_length,
              "device": "cuda" if cfg.classify.num_gpus else "cpu",
              "threads": cfg.classify.torch_threads, "sharers": cfg.classify.max_actors,
              "trust_remote_code": cfg.bert.trust_remote_code, "int8": cfg.classify.int8}
    return run_pool_stage(ds, ClassifyBatch, kwargs, cfg.classify, out_dir,
                          max_error_fraction=cfg.errors.max_error_fraction, name=name,
                          rows_in=rows_in)
