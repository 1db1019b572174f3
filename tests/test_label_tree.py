"""Label-tree scoring (each row once + a trie of label continuations) gives the same log-probs and
gradients as the row-per-label path and as a naive full forward per (row, label); tiny random
Llama with the real SmolLM2 tokenizer, no Ray."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft_tiny import GOLD, tiny_config
from test_speedups import _peft

from lambert_ray.annotator import Annotator, load_annotator_model
from lambert_ray.config import LLMConfig, validate_config
from lambert_ray.finetune import train_adapter
from lambert_ray.label_expand import expanded_logprobs, make_expanded_batch
from lambert_ray.label_tree import LabelTree
from lambert_ray.scoring import label_logprobs, make_batch, prefix_cache

ROWS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]  # ragged: right padding in every batch
PREFIX = [1, 2, 3]
VERBALISERS = {
    "single": [[20], [21]],
    "multi": [[20, 22], [21]],
    # shared first tokens (a trie, not a list), lengths 1..4, a label that is a prefix of another
    "ragged_shared": [[5, 6, 7], [5, 6, 8], [5, 9], [10], [30, 31, 32, 33], [30]],
}
ATOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    model, tok = load_annotator_model(LLMConfig(model=tiny_llama, device="cpu"))
    return model.eval(), tok


def naive_logprobs(model, rows, verbalisers, prefix) -> torch.Tensor:
    """One unpadded full forward per (row, label): sum_k log_softmax(logits)[v[k]]."""
    out = torch.zeros(len(rows), len(verbalisers))
    for i, r in enumerate(rows):
        for j, v in enumerate(verbalisers):
            seq = prefix + r + v[:-1]
            logp = F.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
            start = len(prefix) + len(r) - 1
            out[i, j] = sum(logp[start + k, t] for k, t in enumerate(v))
    return out


def test_label_tree_shares_common_prefixes_of_verbalisers():
    tree = LabelTree.build(VERBALISERS["ragged_shared"])
    # proper prefixes: (5,) (5,6) (30,) (30,31) (30,31,32) -- (5,) and (5,6) shared by 3 labels
    assert tree.n_nodes == 5
    assert tree.token == (5, 6, 30, 31, 32) and tree.depth == (0, 1, 0, 1, 2)
    assert tree.parent == (-1, 0, -1, 2, 3)
    assert tree.label_slot[0] == (0, 1, 2) and tree.label_slot[2] == (0, 1)
    assert tree.label_slot[3] == (0,) and tree.label_slot[5] == (0,)
    assert LabelTree.build(VERBALISERS["single"]).n_nodes == 0


def test_multi_token_batch_holds_each_row_once_plus_the_tree():
    verbalisers = VERBALISERS["ragged_shared"]
    batch = make_batch(ROWS, verbalisers, pad_id=0)
    old = make_expanded_batch(ROWS, verbalisers, pad_id=0)
    assert batch.input_ids.shape == (len(ROWS), max(map(len, ROWS)) + 5)
    assert old.input_ids.shape[0] == len(ROWS) * len(verbalisers)


@pytest.mark.parametrize("kind", list(VERBALISERS))
@pytest.mark.parametrize("reuse", [False, True], ids=["prefix_in_batch", "prefix_kv_cache"])
def test_tree_scores_equal_the_row_per_label_path(tiny, kind, reuse):
    model, _ = tiny
    verbalisers = VERBALISERS[kind]
    with torch.no_grad():
        ref = expanded_logprobs(model, make_expanded_batch(ROWS, verbalisers, 0, PREFIX))
        if reuse:
            got = label_logprobs(model, make_batch(ROWS, verbalisers, 0),
                                 cache=prefix_cache(model, PREFIX))
        else:
            got = label_logprobs(model, make_batch(ROWS, verbalisers, 0, PREFIX))
    torch.testing.assert_close(got, ref, **ATOL)


@pytest.mark.parametrize("kind", ["multi", "ragged_shared"])
def test_tree_scores_equal_a_naive_full_forward_per_label(tiny, kind):
    model, _ = tiny
    verbalisers = VERBALISERS[kind]
    with torch.no_grad():
        got = label_logprobs(model, make_batch(ROWS, verbalisers, 0, PREFIX))
        want = naive_logprobs(model, ROWS, verbalisers, PREFIX)
    torch.testing.assert_close(got, want, **ATOL)


def test_padding_token_does_not_reach_the_scores(tiny):
    model, _ = tiny
    verbalisers = VERBALISERS["ragged_shared"]
    with torch.no_grad():
        a = label_logprobs(model, make_batch(ROWS, verbalisers, 0, PREFIX))
        b = label_logprobs(model, make_batch(ROWS, verbalisers, 777, PREFIX))
    torch.testing.assert_close(a, b, **ATOL)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
@pytest.mark.parametrize("kind", ["single", "ragged_shared"])
def test_prompt_learning_tree_scores_equal_peft_forward(tiny_llama, method, kind):
    model = _peft(tiny_llama, method)
    verbalisers = VERBALISERS[kind]
    with torch.no_grad():
        got = label_logprobs(model, make_batch(ROWS, verbalisers, 0, PREFIX))
        ref = expanded_logprobs(model, make_expanded_batch(ROWS, verbalisers, 0, PREFIX))
    torch.testing.assert_close(got, ref, **ATOL)


def _lora(tiny_llama):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, lora_alpha=4,
                                            target_modules=["q_proj", "v_proj"]))
    for p in model.parameters():  # non-zero B, so every LoRA weight gets a gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    return model


def _grads(model, logprobs_fn) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    gold = torch.tensor([0, 1, 2, 4])
    F.cross_entropy(logprobs_fn(), gold).backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "p_tuning", "prefix_tuning"])
def test_tree_training_gradients_equal_the_row_per_label_gradients(tiny_llama, method):
    model = _lora(tiny_llama) if method == "lora" else _peft(tiny_llama, method)
    model.train()
    verbalisers = VERBALISERS["ragged_shared"]
    new = _grads(model, lambda: label_logprobs(model, make_batch(ROWS, verbalisers, 0, PREFIX)))
    old = _grads(model, lambda: expanded_logprobs(
        model, make_expanded_batch(ROWS, verbalisers, 0, PREFIX)))
    assert new and all(g.abs().sum() > 0 for g in new)
    for a, b in zip(new, old, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reuse", [True, False])
def test_annotator_tree_path_matches_the_row_per_label_path(tiny, reuse):
    model, tok = tiny
    cfg = validate_config({
        "data": {"corpus": {"path": "x.tsv"}},
        "labels": {"names": ["World", "Sports", "Business", "Sci/Tech", "not relevant"]},
        "prompt": {"system": "Answer with one of: {labels}.", "template": "News: {text}\nTopic?"},
        "llm": {"model": "x", "max_length": 64, "device": "cpu"},
    })
    texts = ["chips are faster", "the match ended 2-1", "x " * 30, "stocks fell sharply today"]
    kw = dict(max_length=64, token_budget=96, reuse_prefix=reuse)
    tree = Annotator(model, tok, cfg.prompt, cfg.labels, **kw)
    assert tree.tree_tokens > 0  # "Sci/Tech" and "not relevant" are multi-token
    new = tree.score(texts)
    old = Annotator(model, tok, cfg.prompt, cfg.labels, expand_labels=True, **kw).score(texts)
    torch.testing.assert_close(torch.tensor(new["logprobs"]), torch.tensor(old["logprobs"]), **ATOL)
    assert new["label"] == old["label"]


def test_switching_prefix_reuse_off_after_a_cached_call_keeps_the_scores(tiny):
    model, tok = tiny
    cfg = validate_config({
        "data": {"corpus": {"path": "x.tsv"}}, "labels": {"names": ["negative", "Sci/Tech"]},
        "prompt": {"template": "Review: {text}\nAnswer?"},
        "llm": {"model": "x", "max_length": 48, "device": "cpu"},
    })
    ann = Annotator(model, tok, cfg.prompt, cfg.labels, max_length=48)
    cached = ann.score(["good", "bad film"])["logprobs"]  # builds the prefix KV cache
    ann.reuse_prefix = False  # the prefix then goes into the batch, the cache is not used
    plain = ann.score(["good", "bad film"])["logprobs"]
    torch.testing.assert_close(torch.tensor(plain), torch.tensor(cached), **ATOL)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_adapter_trains_on_multi_token_verbalisers_and_reloads_scoring_the_same(tiny_llama, tmp_path,
                                                                                method):
    base = tiny_config(tiny_llama, method)
    labels = base.labels.model_copy(update={"verbalisers": ["bad review", "good review"]})
    cfg = base.model_copy(update={"labels": labels})
    meta = train_adapter(cfg, GOLD, GOLD, tmp_path / "adapter")
    losses = [h["train_loss"] for h in meta["history"]]
    assert losses[-1] < losses[0] - 0.1, losses
    tuned = Annotator.from_config(cfg.model_copy(update={"llm": cfg.llm.model_copy(
        update={"adapter": str(tmp_path / "adapter")})}))
    assert tuned.tree_tokens == 2  # two 2-token verbalisers: one tree node each
    pred = tuned.score([t for t, _ in GOLD])["label_id"]
    acc = sum(p == y for p, (_, y) in zip(pred, GOLD, strict=True)) / len(GOLD)
    assert acc == pytest.approx(meta["dev_after"]["accuracy"])
