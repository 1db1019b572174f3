"""The annotator core: prompt -> per-label log-probabilities, one forward pass per batch.

A label's score is log p(verbaliser tokens | prompt) under the causal LM (summed over the
verbaliser's tokens; rows are expanded once per label only when some verbaliser is multi-token).
The same `label_logprobs` is the training objective of the PEFT stage (cross-entropy over these
scores), so a tuned model is scored exactly as it was trained. No sampling, no parsing.

Two forward paths, chosen by the model, not by the caller:
- direct: the decoder runs on (shared prefix KV cache +) the row tokens, and the output head is
  applied only at the answer positions (not all positions x the whole vocabulary);
- prompt-learning PEFT (prefix/prompt/P-tuning): peft owns the forward (it injects virtual tokens
  or past key/values), so we call the wrapped model and read its logits.
No Ray here: this module runs on any box with torch + transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


@dataclass
class Batch:
    """Right-padded rows, each = (optional prefix) + row tokens + verbaliser[:-1] when expanded.

    `score_pos[b, j]` is the position whose next-token distribution predicts `score_tok[b, j]`;
    `score_mask` marks the real (non-padding) entries; `owner[b]`/`label[b]` map an expanded
    row back to (input row, label). Without expansion every row scores all labels at one position.
    """

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    score_pos: torch.Tensor  # [B, J]
    score_tok: torch.Tensor  # [B, J] (expanded) or [L] (single-token verbalisers)
    score_mask: torch.Tensor  # [B, J]
    n_rows: int
    n_labels: int
    expanded: bool


def make_batch(rows: list[list[int]], verbalisers: list[list[int]], pad_id: int,
               prefix: list[int] | None = None) -> Batch:
    """Build a Batch. `prefix` is prepended here (training / no cache) or left out (KV-cached)."""
    prefix = prefix or []
    n_labels = len(verbalisers)
    expanded = any(len(v) > 1 for v in verbalisers)
    seqs, pos, tok = [], [], []
    for ids in rows:
        base = prefix + ids
        if not expanded:
            seqs.append(base)
            pos.append([len(base) - 1])
        else:
            for v in verbalisers:
                seqs.append(base + v[:-1])
                pos.append([len(base) - 1 + j for j in range(len(v))])
                tok.append(list(v))
    T = max(len(s) for s in seqs)
    J = max(len(p) for p in pos)
    ids_t = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask_t = torch.zeros((len(seqs), T), dtype=torch.long)
    pos_t = torch.zeros((len(seqs), J), dtype=torch.long)
    smask = torch.zeros((len(seqs), J), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids_t[i, : len(s)] = torch.tensor(s)
        mask_t[i, : len(s)] = 1
        pos_t[i, : len(pos[i])] = torch.tensor(pos[i])
        smask[i, : len(pos[i])] = True
    if expanded:
        tok_t = torch.zeros((len(seqs), J), dtype=torch.long)
        for i, t in enumerate(tok):
            tok_t[i, : len(t)] = torch.tensor(t)
    else:
        tok_t = torch.tensor([v[0] for v in verbalisers])
    return Batch(ids_t, mask_t, pos_t, tok_t, smask, len(rows), n_labels, expanded)


def prefix_cache(model, prefix: list[int]):
    """Run the shared prefix once; returns its KV cache (batch 1)."""
    lm = causal_lm(model)
    device = lm.get_input_embeddings().weight.device
    ids = torch.tensor([prefix], device=device)
    out = lm.model(input_ids=ids, use_cache=True)
    return out.past_key_values


def _expand_cache(cache, batch_size: int, config):
    from transformers import DynamicCache

    new = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        new.update(layer.keys.expand(batch_size, -1, -1, -1),
                   layer.values.expand(batch_size, -1, -1, -1), i)
    return new


def _virtual_offset(model) -> int:
    """Positions peft prepends to the sequence: prompt / P-tuning put virtual token embeddings
    before the input; prefix tuning passes them as past key/values (no shift)."""
    from peft import PeftType

    cfg = unwrap(model).active_peft_config
    # CARTRIDGE (past key/values like prefix tuning) exists only in newer peft releases.
    kv_types = {PeftType.PREFIX_TUNING, getattr(PeftType, "CARTRIDGE", PeftType.PREFIX_TUNING)}
    return 0 if cfg.peft_type in kv_types else cfg.num_virtual_tokens


def answer_positions(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([U] sorted distinct positions, [B, J] index of each `pos` entry among them).

    A 1-D `logits_to_keep` is read by every transformers 5.x as `hidden[:, keep, :]`; older 5.x
    releases reject the per-row [B, J] form. Keeping the union of the answer positions (length-
    bucketed batches have few) and picking each row's own afterwards works on both."""
    keep, index = torch.unique(pos, sorted=True, return_inverse=True)
    return keep, index


def label_logprobs(model, batch: Batch, cache=None) -> torch.Tensor:
    """[n_rows, n_labels] log p(verbaliser | prompt). Differentiable (used for training too).

    `cache` is a prefix KV cache from `prefix_cache` (only for the direct path, inference)."""
    lm = causal_lm(model)
    device = lm.get_input_embeddings().weight.device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    pos = batch.score_pos.to(device)
    if is_prompt_learning(model):
        assert cache is None, "prompt-learning PEFT methods own the prefix; no KV reuse"
        # The head only at the answer positions (logits_to_keep), not all positions x the
        # whole vocabulary (a fifth of SmolLM2's FLOPs, and [B, T, V] memory).
        keep, index = answer_positions(pos + _virtual_offset(model))
        logits = unwrap(model)(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        picked = torch.gather(logits, 1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    else:
        kwargs = {}
        if cache is not None:
            past = cache.get_seq_length()
            kwargs["past_key_values"] = _expand_cache(cache, ids.shape[0], lm.config)
            mask = torch.cat([mask.new_ones(ids.shape[0], past), mask], dim=1)
        hidden = lm.model(input_ids=ids, attention_mask=mask, use_cache=cache is not None,
                          **kwargs).last_hidden_state
        h = torch.gather(hidden, 1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        picked = lm.get_output_embeddings()(h)  # head only at the answer positions
    logp = F.log_softmax(picked.float(), dim=-1)  # [B, J, V]
    if not batch.expanded:
        return logp[:, 0, :].index_select(-1, batch.score_tok.to(device))  # [n_rows, L]
    tok_lp = torch.gather(logp, 2, batch.score_tok.to(device).unsqueeze(-1)).squeeze(-1)
    tok_lp = tok_lp * batch.score_mask.to(device)
    return tok_lp.sum(-1).view(batch.n_rows, batch.n_labels)
