"""Annotator speedups leave the scores unchanged (tiny random Llama + the real SmolLM2 tokenizer).

The reference is the plain computation through peft's own forward: every row copied once per
label (`label_expand`), all positions x the whole vocabulary, then pick the answer positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lambert_ray.label_expand import ExpandedBatch, make_expanded_batch
from lambert_ray.scoring import label_logprobs, make_batch, unwrap

ROWS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]


def full_logits_reference(model, batch: ExpandedBatch) -> torch.Tensor:
    """log p(verbaliser | prompt) from the full [B, T, V] logits (the pre-speedup path)."""
    logits = unwrap(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    offset = logits.shape[1] - batch.input_ids.shape[1]  # virtual tokens of prompt tuning
    pos = batch.score_pos + offset
    picked = torch.gather(logits, 1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    logp = F.log_softmax(picked.float(), dim=-1)
    if not batch.expanded:
        return logp[:, 0, :].index_select(-1, batch.score_tok)
    tok = torch.gather(logp, 2, batch.score_tok.unsqueeze(-1)).squeeze(-1) * batch.score_mask
    return tok.sum(-1).view(batch.n_rows, batch.n_labels)


def _peft(tiny_llama: str, method: str):
    from peft import (
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        TaskType,
        get_peft_model,
    )
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cfg = {"prompt_tuning": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3),
           "p_tuning": PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3,
                                           encoder_hidden_size=16),
           "prefix_tuning": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3)}
    torch.manual_seed(1)
    model = get_peft_model(base, cfg[method]).eval()
    for p in model.parameters():  # random virtual tokens, so a wrong offset changes the scores
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
@pytest.mark.parametrize("verbalisers", [[[20], [21]], [[20, 22], [21]]], ids=["single", "multi"])
def test_prompt_learning_scores_equal_the_full_logits_path(tiny_llama, method, verbalisers):
    model = _peft(tiny_llama, method)
    with torch.no_grad():
        fast = label_logprobs(model, make_batch(ROWS, verbalisers, pad_id=0, prefix=[1, 2, 3]))
        ref = full_logits_reference(model, make_expanded_batch(ROWS, verbalisers, 0, [1, 2, 3]))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.argmax(-1), ref.argmax(-1))


def test_prompt_learning_scores_stay_differentiable(tiny_llama):
    model = _peft(tiny_llama, "prompt_tuning")
    batch = make_batch(ROWS, [[20], [21]], pad_id=0, prefix=[1, 2, 3])
    loss = -label_logprobs(model, batch)[:, 0].sum()
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
