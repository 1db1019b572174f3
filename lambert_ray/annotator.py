"""`Annotator`: a loaded causal LM (+ optional PEFT adapter) that labels texts. No Ray needed.

    ann = Annotator.from_config(cfg)            # cfg: PipelineConfig
    out = ann.score(["a gripping film", ...])   # dict of lists: label, confidence, probs, ...

Batches are length-sorted and packed to `llm.token_budget` padded tokens; the shared prompt
prefix is run once and its KV cache reused by every batch (`llm.reuse_prefix`).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from lambert_ray.config import LabelsConfig, LLMConfig, PipelineConfig, PromptConfig
from lambert_ray.models import load_causal_lm
from lambert_ray.prompts import PromptBuilder
from lambert_ray.scoring import Batch, is_prompt_learning, label_logprobs, make_batch, prefix_cache

log = logging.getLogger(__name__)


def load_annotator_model(llm: LLMConfig):
    """Base causal LM, with `llm.adapter` applied (and merged when asked and possible)."""
    model, tok = load_causal_lm(llm.model, dtype=llm.dtype, quantization=llm.quantization,
                                device=llm.device, trust_remote_code=llm.trust_remote_code,
                                gguf_file=llm.gguf_file)
    if llm.adapter:
        from peft import PeftModel

        from lambert_ray import storage

        # A bucket URI is downloaded first (peft reads local dirs or hub ids).
        path = storage.local_dir(llm.adapter) if storage.is_remote(llm.adapter) else llm.adapter
        model = PeftModel.from_pretrained(model, path)
        model.eval()
        if llm.merge_adapter:
            from lambert_ray.peft_methods import method_of_adapter

            method = method_of_adapter(model.active_peft_config)
            if not method.supports_merge:
                raise ValueError(f"llm.merge_adapter: adapter {llm.adapter} is {method.name}, which "
                                 "does not merge; only weight adapters (LoRA, DoRA, IA3) do")
            model = model.merge_and_unload()
    return model, tok


def pack_by_tokens(lengths: list[int], budget: int, expansion: int = 1) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size fits `budget` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur, cur_max = [], [], 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and new_max * (len(cur) + 1) * expansion > budget:
            batches.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


class Annotator:
    def __init__(self, model, tokenizer, prompt: PromptConfig, labels: LabelsConfig, *,
                 max_length: int = 512, token_budget: int = 4096, reuse_prefix: bool = True,
                 model_id: str = ""):
        self.model, self.tokenizer = model, tokenizer
        self.labels = labels
        self.builder = PromptBuilder(tokenizer, prompt, labels, max_length)
        self.token_budget = token_budget
        self.model_id = model_id
        self.prompt_hash = self.builder.hash
        self.expansion = len(labels.names) if any(len(v) > 1 for v in self.builder.verbalisers) else 1
        self.reuse_prefix = reuse_prefix and not is_prompt_learning(model)
        self._cache = None
        self.stats = {"rows": 0, "tokens": 0, "seconds": 0.0}

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> Annotator:
        model, tok = load_annotator_model(cfg.llm)
        model_id = cfg.llm.model + (f"+{cfg.llm.adapter}" if cfg.llm.adapter else "")
        return cls(model, tok, cfg.prompt, cfg.labels, max_length=cfg.llm.max_length,
                   token_budget=cfg.llm.token_budget, reuse_prefix=cfg.llm.reuse_prefix,
                   model_id=model_id)

    @torch.inference_mode()
    def _logprobs(self, batch: Batch) -> torch.Tensor:
        if not self.reuse_prefix:
            return label_logprobs(self.model, _with_prefix(batch, self.builder.prefix_ids,
                                                           self.tokenizer.pad_token_id))
        if self._cache is None:
            self._cache = prefix_cache(self.model, self.builder.prefix_ids)
        return label_logprobs(self.model, batch, cache=self._cache)

    def score(self, texts: list[str]) -> dict[str, list]:
        """Label `texts`. Returns lists (one entry per text, input order):
        label (name), label_id, confidence (max prob), probs (per label, sums to 1 over labels),
        logprobs (per label, log p(verbaliser | prompt)), truncated, n_tokens (prompt length)."""
        t0 = time.perf_counter()
        rows = self.builder.encode(texts)
        n_labels = len(self.labels.names)
        logp = np.zeros((len(rows), n_labels), dtype=np.float32)
        pad = self.tokenizer.pad_token_id
        for idx in pack_by_tokens([len(r.ids) for r in rows], self.token_budget, self.expansion):
            batch = make_batch([rows[i].ids for i in idx], self.builder.verbalisers, pad)
            logp[idx] = self._logprobs(batch).float().cpu().numpy()
        probs = _softmax(logp)
        n_prefix = len(self.builder.prefix_ids)
        self.stats["rows"] += len(rows)
        self.stats["tokens"] += sum(len(r.ids) + n_prefix for r in rows)
        self.stats["seconds"] += time.perf_counter() - t0
        label_id = probs.argmax(-1)
        return {
            "label": [self.labels.names[i] for i in label_id],
            "label_id": label_id.tolist(),
            "confidence": probs.max(-1).tolist(),
            "probs": probs.tolist(),
            "logprobs": logp.tolist(),
            "truncated": [r.truncated for r in rows],
            "n_tokens": [len(r.ids) + n_prefix for r in rows],
        }


def _with_prefix(batch: Batch, prefix: list[int], pad_id: int) -> Batch:
    """The same batch with the prefix tokens prepended (no KV reuse)."""
    B, P = batch.input_ids.shape[0], len(prefix)
    pre = torch.tensor(prefix, dtype=torch.long).expand(B, P)
    return Batch(torch.cat([pre, batch.input_ids], 1),
                 torch.cat([torch.ones(B, P, dtype=torch.long), batch.attention_mask], 1),
                 batch.score_pos + P, batch.score_tok, batch.score_mask, batch.n_rows,
                 batch.n_labels, batch.expanded)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
