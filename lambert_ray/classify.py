"""Classification on Ray Data: an actor pool of trained BERT students labels a dataset.

Output columns: row_id, gold, label, label_id, confidence, probs, error.
"""

from __future__ import annotations

import logging

import pandas as pd

from lambert_ray.config import PipelineConfig
from lambert_ray.stage import map_clean_rows

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ["label", "label_id", "confidence", "probs"]


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
        from lambert_ray.storage import local_dir

        set_cpu_threads(threads, sharers)
        # A bucket URI is downloaded once per actor; a local/shared path is loaded in place.
        self.model, self.tok = load_classifier(local_dir(model_dir), labels, trust_remote_code)
        self.model.to(pick_device(device)).eval()
        if int8:
            self.model = quantize_int8(self.model)
        self.labels, self.max_length = labels, max_length
        torch.set_grad_enabled(False)

    def _predict(self, texts: list[str]) -> list[dict]:
        from lambert_ray.bert import predict_proba

        rows = []
        for p in predict_proba(self.model, self.tok, texts, self.max_length):
            k = int(p.argmax())
            rows.append({"label": self.labels[k], "label_id": k, "confidence": float(p[k]),
                         "probs": p.tolist()})
        return rows

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        cols, errors = map_clean_rows(batch, self._predict, OUTPUT_COLUMNS, "classify_failed")
        out = pd.DataFrame({"row_id": batch["row_id"].values, "gold": batch["label"].values, **cols})
        out["error"] = errors
        return out


def classify(cfg: PipelineConfig, ds, model_dir: str, out_dir: str, *, name: str = "classify",
             rows_in=None):
    from lambert_ray.stage import run_pool_stage

    kwargs = {"model_dir": model_dir, "labels": cfg.labels.names, "max_length": cfg.bert.max_length,
              "device": cfg.classify.compute_device,
              "threads": cfg.classify.torch_threads, "sharers": cfg.classify.max_actors,
              "trust_remote_code": cfg.bert.trust_remote_code, "int8": cfg.classify.int8}
    return run_pool_stage(ds, ClassifyBatch, kwargs, cfg.classify, out_dir,
                          max_error_fraction=cfg.errors.max_error_fraction, name=name,
                          rows_in=rows_in)
