"""Prompt building and verbaliser scoring on a tiny random Llama (no Ray)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lambert_ray.annotator import Annotator, load_annotator_model, pack_by_tokens
from lambert_ray.config import LLMConfig, validate_config
from lambert_ray.prompts import PromptBuilder, render_prompt
from lambert_ray.scoring import label_logprobs, make_batch


def _cfg(model: str, names=("negative", "positive"), **prompt):
    return validate_config({
        "data": {"corpus": {"path": "x.tsv"}},
        "labels": {"names": list(names)},
        "prompt": {"system": "Answer with one of: {labels}.",
                   "template": "Review: {text}\nAnswer?", **prompt},
        "llm": {"model": model, "max_length": 48, "token_budget": 128, "device": "cpu"},
    })


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_annotator_model(LLMConfig(model=tiny_llama, device="cpu"))


def test_prompt_uses_chat_template_and_label_list(tiny):
    _, tok = tiny
    cfg = _cfg("x")
    text = render_prompt(tok, cfg.prompt, cfg.labels, "a fine film")
    assert "<|im_start|>system\nAnswer with one of: 'negative', 'positive'." in text
    assert text.endswith("Review: a fine film\nAnswer?<|im_end|>\n<|im_start|>assistant\n")


def test_prefix_holds_everything_before_the_text(tiny):
    _, tok = tiny
    cfg = _cfg("x")
    b = PromptBuilder(tok, cfg.prompt, cfg.labels, 48)
    assert b.prefix_text.endswith("Review: ") and b.suffix_text.startswith("\nAnswer?")
    row = b.encode(["a fine film"])[0]
    assert tok.decode(b.prefix_ids + row.ids) == render_prompt(tok, cfg.prompt, cfg.labels, "a fine film")


def test_few_shot_examples_become_turns(tiny):
    _, tok = tiny
    cfg = _cfg("x", few_shot=[{"text": "loved it", "label": "positive"}])
    text = render_prompt(tok, cfg.prompt, cfg.labels, "meh")
    assert "Review: loved it" in text and "<|im_start|>assistant\npositive<|im_end|>" in text


def test_long_text_is_truncated_to_the_window_and_flagged(tiny):
    _, tok = tiny
    cfg = _cfg("x")
    b = PromptBuilder(tok, cfg.prompt, cfg.labels, 48)
    short, long = b.encode(["short one", "word " * 20_000])
    assert not short.truncated and long.truncated
    assert len(b.prefix_ids) + len(long.ids) + 1 <= 48


def test_single_token_scores_equal_full_forward_log_softmax(tiny):
    model, tok = tiny
    cfg = _cfg("x")
    b = PromptBuilder(tok, cfg.prompt, cfg.labels, 48)
    rows = [r.ids for r in b.encode(["good", "a much longer review text here"])]
    with torch.no_grad():
        got = label_logprobs(model, make_batch(rows, b.verbalisers, tok.pad_token_id, b.prefix_ids))
        for i, r in enumerate(rows):
            logits = model(torch.tensor([b.prefix_ids + r])).logits[0, -1]
            want = F.log_softmax(logits, -1)[[v[0] for v in b.verbalisers]]
            torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-4)


def test_multi_token_verbaliser_sums_token_logprobs(tiny):
    model, tok = tiny
    cfg = _cfg("x", names=("World", "Sci/Tech"))
    b = PromptBuilder(tok, cfg.prompt, cfg.labels, 64)
    assert [len(v) for v in b.verbalisers] == [1, 3]
    row = b.encode(["chips are faster"])[0].ids
    with torch.no_grad():
        got = label_logprobs(model, make_batch([row], b.verbalisers, tok.pad_token_id, b.prefix_ids))
        v = b.verbalisers[1]
        logp = F.log_softmax(model(torch.tensor([b.prefix_ids + row + v[:-1]])).logits[0], -1)
        start = len(b.prefix_ids) + len(row) - 1
        want = sum(logp[start + j, v[j]] for j in range(len(v)))
    torch.testing.assert_close(got[0, 1], want, atol=1e-4, rtol=1e-4)


def test_prefix_kv_reuse_gives_the_same_scores(tiny):
    model, tok = tiny
    cfg = _cfg("x")
    texts = ["good", "bad film", "x " * 30, "an ok movie with some very long words in it"]
    kw = dict(max_length=48, token_budget=64)
    with_reuse = Annotator(model, tok, cfg.prompt, cfg.labels, reuse_prefix=True, **kw).score(texts)
    without = Annotator(model, tok, cfg.prompt, cfg.labels, reuse_prefix=False, **kw).score(texts)
    torch.testing.assert_close(torch.tensor(with_reuse["logprobs"]), torch.tensor(without["logprobs"]),
                               atol=1e-4, rtol=1e-4)
    assert with_reuse["label"] == without["label"]


def test_scores_do_not_depend_on_batch_composition(tiny):
    model, tok = tiny
    cfg = _cfg("x")
    ann = Annotator(model, tok, cfg.prompt, cfg.labels, max_length=48, token_budget=4096)
    texts = ["good", "bad film", "an ok movie with some very long words in it"]
    together = ann.score(texts)["logprobs"]
    alone = [ann.score([t])["logprobs"][0] for t in texts]
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=1e-4, rtol=1e-4)


def test_score_output_shape_and_probabilities(tiny):
    model, tok = tiny
    cfg = _cfg("x", names=("World", "Sports", "Business", "Sci/Tech"))
    out = Annotator(model, tok, cfg.prompt, cfg.labels, max_length=64).score(["a", "b c"])
    assert set(out) >= {"label", "label_id", "confidence", "probs", "truncated", "n_tokens"}
    for p, c, lab in zip(out["probs"], out["confidence"], out["label"], strict=True):
        assert len(p) == 4 and abs(sum(p) - 1) < 1e-5 and c == max(p)
        assert lab == cfg.labels.names[p.index(max(p))]


def test_pack_by_tokens_respects_the_budget_and_keeps_every_row():
    lengths = [5, 50, 7, 30, 6, 49, 8]
    batches = pack_by_tokens(lengths, budget=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 100
