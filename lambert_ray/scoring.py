"""The annotator core: prompt -> per-label log-probabilities, one forward pass per batch.

A label's score is log p(verbaliser tokens | prompt) under the causal LM, summed over the
verbaliser's tokens. Each row runs once: its tokens, then the label tree of `label_tree` (the
labels' continuation tokens as a trie, each node attending to the row and its own ancestors), so
the cost does not grow with the number of labels. The same `label_logprobs` is the training
objective of the PEFT stage (cross-entropy over these scores), so a tuned model is scored
exactly as it was trained. No sampling, no parsing.

One forward path for every model: the decoder runs on (shared cached tokens +) the batch, and
the output head is applied only at the answer position and the tree nodes (not all positions x
the whole vocabulary). The shared cached tokens are the prompt prefix (`prefix_cache`, reused
across batches at inference) or, for prompt-learning PEFT (prefix / prompt / P-tuning), the
adapter's virtual tokens, computed from peft's `get_prompt` in every forward so gradients reach
them: prefix tuning's key/values as they are, prompt / P-tuning's embeddings run through the
decoder first (they sit before the input, as in peft's own forward).
No Ray here: this module runs on any box with torch + transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lambert_ray.label_tree import Batch, make_batch, tree_tokens

__all__ = ["Batch", "make_batch", "tree_tokens", "label_logprobs", "prefix_cache", "unwrap",
           "causal_lm", "is_prompt_learning", "expand_cache"]


def unwrap(model):
    """DeepSpeed engine / DDP -> PeftModel or HF model."""
    while hasattr(model, "module") and not hasattr(model, "peft_config"):
        model = model.module
    return model


def is_prompt_learning(model) -> bool:
    m = unwrap(model)
    cfg = getattr(m, "active_peft_config", None)
    return bool(cfg is not None and cfg.is_prompt_learning)


def causal_lm(model):
    """The HF *ForCausalLM inside a PeftModel (LoRA layers already injected) or the model itself."""
    m = unwrap(model)
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def prefix_cache(model, prefix: list[int]):
    """Run the shared prefix once; returns its KV cache (batch 1)."""
    lm = causal_lm(model)
    device = lm.get_input_embeddings().weight.device
    ids = torch.tensor([prefix], device=device)
    out = lm.model(input_ids=ids, use_cache=True)
    return out.past_key_values


def expand_cache(cache, batch_size: int, config):
    """A batch-1 KV cache viewed as `batch_size` rows (no copy) in a fresh DynamicCache."""
    from transformers import DynamicCache

    new = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        new.update(layer.keys.expand(batch_size, -1, -1, -1),
                   layer.values.expand(batch_size, -1, -1, -1), i)
    return new


def virtual_cache(model):
    """The KV cache (batch 1) of a prompt-learning adapter's virtual tokens, differentiable."""
    m, lm = unwrap(model), causal_lm(model)
    if m.active_peft_config.peft_type in ("PREFIX_TUNING", "CARTRIDGE"):
        return m.get_prompt(batch_size=1)  # key/values for every layer
    prompts = m.get_prompt(batch_size=1).to(lm.get_input_embeddings().weight.dtype)
    return lm.model(inputs_embeds=prompts, use_cache=True).past_key_values


def label_logprobs(model, batch: Batch, cache=None) -> torch.Tensor:
    """[n_rows, n_labels] log p(verbaliser | prompt). Differentiable (used for training too).

    `cache` is a prefix KV cache from `prefix_cache` (inference); prompt-learning adapters bring
    their own (virtual tokens) and take none."""
    lm = causal_lm(model)
    emb = lm.get_input_embeddings().weight
    device = emb.device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    B = ids.shape[0]
    if is_prompt_learning(model):
        assert cache is None, "prompt-learning PEFT methods own the prefix; no KV reuse"
        cache = virtual_cache(model)
    kwargs = {}
    past = 0
    if cache is not None:
        past = cache.get_seq_length()
        kwargs["past_key_values"] = expand_cache(cache, B, lm.config)
    # Label tree: nodes see the row and their ancestors, at row length + depth. Without one
    # (single-token verbalisers) the model's own causal + padding mask is exact.
    bias = batch.attention_bias(past, emb.dtype, device)
    attn = torch.cat([mask.new_ones(B, past), mask], dim=1) if bias is None else bias
    positions = (batch.position_ids + past).to(device)
    hidden = lm.model(input_ids=ids, attention_mask=attn, position_ids=positions,
                      use_cache=cache is not None, **kwargs).last_hidden_state
    pos = batch.score_pos.to(device)  # [B, 1 + K]
    h = torch.gather(hidden, 1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    logp = F.log_softmax(lm.get_output_embeddings()(h).float(), dim=-1)  # head at [B, 1 + K]
    tok_lp = logp[:, batch.label_slot.to(device), batch.label_tok.to(device)]  # [B, L, J]
    return (tok_lp * batch.label_mask.to(device)).sum(-1)
