"""`Annotator`: a loaded causal LM (+ optional PEFT adapter) that labels texts. No Ray needed.

    ann = Annotator.from_config(cfg)            # cfg: PipelineConfig
    out = ann.score(["a gripping film", ...])   # dict of lists: label, confidence, probs, ...

Batches are length-sorted and packed to `llm.token_budget` padded tokens; the shared prompt
prefix is run once and its KV cache reused by every batch (`llm.reuse_prefix`). Each row runs
once whatever the number of labels (multi-token verbalisers add one small label tree per row,
`label_tree`); `expand_labels=True` selects the old row-per-label path (reference, benchmark).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from lambert_ray.config import LabelsConfig, LLMConfig, PipelineConfig, PromptConfig
from lambert_ray.label_expand import expanded_logprobs, make_expanded_batch
from lambert_ray.models import load_causal_lm
from lambert_ray.prompts import PromptBuilder
from lambert_ray.scoring import (
    is_prompt_learning,
    label_logprobs,
    make_batch,
    prefix_cache,
    tree_tokens,
)

log = logging.getLogger(__name__)


def load_annotator_model(llm: LLMConfig):
    """Base causal LM, with `llm.adapter` applied (and merged when asked and possible)."""
    model, tok = load_causal_lm(llm.model, dtype=llm.dtype, quantization=llm.quantization,
                                device=llm.device, trust_remote_code=llm.trust_remote_code,
                                gguf_file=llm.gguf_file)
    if llm.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_local_path(llm.adapter))
        model.eval()
        if llm.merge_adapter:
            from lambert_ray.peft_methods import method_of_adapter

            method = method_of_adapter(model.active_peft_config)
            if not method.supports_merge:
                raise ValueError(f"llm.merge_adapter: adapter {llm.adapter} is {method.name}, which "
                                 "does not merge; only weight adapters (LoRA, DoRA, IA3) do")
            model = model.merge_and_unload()
    return model, tok


def adapter_local_path(adapter: str) -> str:
    """An adapter dir or hub id as peft reads it: a bucket URI is downloaded first."""
    from lambert_ray import storage

    return storage.local_dir(adapter) if storage.is_remote(adapter) else adapter


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
                 model_id: str = "", expand_labels: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.labels = labels
        self.builder = PromptBuilder(tokenizer, prompt, labels, max_length)
        self.token_budget = token_budget
        self.model_id = model_id
        self.prompt_hash = self.builder.hash
        self.expand_labels = expand_labels
        multi = any(len(v) > 1 for v in self.builder.verbalisers)
        # Padded tokens a row costs beyond its own: the label tree (K tokens), or L x the row.
        self.tree_tokens = 0 if expand_labels else tree_tokens(self.builder.verbalisers)
        self.expansion = len(labels.names) if expand_labels and multi else 1
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
    def _logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        pad, verbalisers = self.tokenizer.pad_token_id, self.builder.verbalisers
        prefix, cache = self.builder.prefix_ids, None
        if self.reuse_prefix:
            if self._cache is None:
                self._cache = prefix_cache(self.model, self.builder.prefix_ids)
            prefix, cache = None, self._cache
        if self.expand_labels:
            return expanded_logprobs(self.model, make_expanded_batch(rows, verbalisers, pad, prefix),
                                     cache=cache)
        return label_logprobs(self.model, make_batch(rows, verbalisers, pad, prefix), cache=cache)

    def score(self, texts: list[str]) -> dict[str, list]:
        """Label `texts`. Returns lists (one entry per text, input order):
        label (name), label_id, confidence (max prob), probs (per label, sums to 1 over labels),
        logprobs (per label, log p(verbaliser | prompt)), truncated, n_tokens (prompt length)."""
        t0 = time.perf_counter()
        rows = self.builder.encode(texts)
        n_labels = len(self.labels.names)
        logp = np.zeros((len(rows), n_labels), dtype=np.float32)
        extra = self.tree_tokens + (0 if self.reuse_prefix else len(self.builder.prefix_ids))
        for idx in pack_by_tokens([len(r.ids) + extra for r in rows], self.token_budget,
                                  self.expansion):
            logp[idx] = self._logprobs([rows[i].ids for i in idx]).float().cpu().numpy()
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


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
