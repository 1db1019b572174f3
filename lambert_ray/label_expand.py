"""The pre-tree scoring path, kept as the exactness reference and for the old-vs-new benchmark.

Once any verbaliser is multi-token, every row is copied once per label (row + v[:-1]) and run
whole through the model: L x the row's tokens. `label_tree` + `scoring.label_logprobs` replace
it (each row once, then a shared tree of the label continuations); tests pin the two to the
same log-probs and `benchmarks/label_count_throughput.py` times both. Prompt-learning adapters
go through peft's own forward here, the output head only at the answer positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lambert_ray.scoring import causal_lm, expand_cache, is_prompt_learning, unwrap


@dataclass
class ExpandedBatch:
    """Right-padded rows, each = (optional prefix) + row tokens + verbaliser[:-1] when expanded.

    `score_pos[b, j]` is the position whose next-token distribution predicts `score_tok[b, j]`;
    `score_mask` marks the real (non-padding) entries. Without expansion every row scores all
    labels at one position."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    score_pos: torch.Tensor  # [B, J]
    score_tok: torch.Tensor  # [B, J] (expanded) or [L] (single-token verbalisers)
    score_mask: torch.Tensor  # [B, J]
    n_rows: int
    n_labels: int
    expanded: bool


def make_expanded_batch(rows: list[list[int]], verbalisers: list[list[int]], pad_id: int,
                        prefix: list[int] | None = None) -> ExpandedBatch:
    """`prefix` is prepended here (training / no cache) or left out (KV-cached)."""
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
    return ExpandedBatch(ids_t, mask_t, pos_t, tok_t, smask, len(rows), n_labels, expanded)


def _virtual_offset(model) -> int:
    """Positions peft prepends to the sequence: prompt / P-tuning put virtual token embeddings
    before the input; prefix tuning passes them as past key/values (no shift)."""
    from peft import PeftType

    cfg = unwrap(model).active_peft_config
    return 0 if cfg.peft_type in (PeftType.PREFIX_TUNING, PeftType.CARTRIDGE) else cfg.num_virtual_tokens


def expanded_logprobs(model, batch: ExpandedBatch, cache=None) -> torch.Tensor:
    """[n_rows, n_labels] log p(verbaliser | prompt) (differentiable); `cache`: a prefix KV cache
    from `scoring.prefix_cache` (direct path only)."""
    lm = causal_lm(model)
    device = lm.get_input_embeddings().weight.device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    pos = batch.score_pos.to(device)
    if is_prompt_learning(model):
        assert cache is None, "prompt-learning PEFT methods own the prefix; no KV reuse"
        picked = unwrap(model)(input_ids=ids, attention_mask=mask,
                               logits_to_keep=pos + _virtual_offset(model)).logits
    else:
        kwargs = {}
        if cache is not None:
            past = cache.get_seq_length()
            kwargs["past_key_values"] = expand_cache(cache, ids.shape[0], lm.config)
            mask = torch.cat([mask.new_ones(ids.shape[0], past), mask], dim=1)
        hidden = lm.model(input_ids=ids, attention_mask=mask, use_cache=cache is not None,
                          **kwargs).last_hidden_state
        h = torch.gather(hidden, 1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        picked = lm.get_output_embeddings()(h)
    logp = F.log_softmax(picked.float(), dim=-1)  # [B, J, V]
    if not batch.expanded:
        return logp[:, 0, :].index_select(-1, batch.score_tok.to(device))
    tok_lp = torch.gather(logp, 2, batch.score_tok.to(device).unsqueeze(-1)).squeeze(-1)
    tok_lp = tok_lp * batch.score_mask.to(device)
    return tok_lp.sum(-1).view(batch.n_rows, batch.n_labels)
