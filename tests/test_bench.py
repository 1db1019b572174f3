"""Benchmark pieces: answer parsing, the FLOP count, and the int8 student option (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lambert_ray.bench import (
    LMShape,
    _llama_non_embedding,
    annotator_flops,
    generate_flops,
    parse_answer,
    timed_annotate,
)

ANSWERS = ["negative", "positive"]


@pytest.mark.parametrize("text, expected", [
    ("positive", 1), (" Negative.", 0), ("The review is positive!", 1),
    ("positive or negative", None), ("", None), ("I cannot tell", None), ("positively", None),
])
def test_generated_answer_maps_to_one_label_or_is_dropped(text, expected):
    assert parse_answer(text, ANSWERS) == expected


SHAPE = LMShape(non_embedding_params=1000, layers=2, d_attn=8, hidden=8, vocab=50)


def test_prefix_reuse_saves_exactly_the_repeated_prefix_work():
    rows, prefix = [5, 7, 9], 4
    reuse = annotator_flops(SHAPE, prefix, rows, reuse_prefix=True)
    full = annotator_flops(SHAPE, prefix, rows, reuse_prefix=False)
    one_prefix = annotator_flops(SHAPE, 0, [prefix], reuse_prefix=False) - 2 * 8 * 50
    assert full - reuse == pytest.approx((len(rows) - 1) * one_prefix)


def test_flops_are_two_per_parameter_per_token_plus_attention_and_head():
    # one 3-token row, no prefix: attended positions 1 + 2 + 3 = 6
    expected = 2 * 1000 * 3 + 4 * 2 * 8 * 6 + 2 * 8 * 50
    assert annotator_flops(SHAPE, 0, [3], reuse_prefix=False) == expected
    # generate: prefill 3 tokens, then 1 more decode step (2 new tokens), head on 2 positions
    assert generate_flops(SHAPE, 3, 2) == expected + 2 * 1000 + 4 * 2 * 8 * 4 + 2 * 8 * 50


def test_non_embedding_params_match_the_llama_formula(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert LMShape.of(model).non_embedding_params == _llama_non_embedding(model.config)


def test_timed_annotate_labels_match_a_single_score_call(tiny_llama):
    from lambert_ray.annotator import Annotator, load_annotator_model
    from lambert_ray.config import LLMConfig, validate_config

    cfg = validate_config({"data": {"corpus": {"path": "x.tsv"}}, "labels": {"names": ANSWERS},
                           "prompt": {"template": "Review: {text}\nAnswer?"}})
    model, tok = load_annotator_model(LLMConfig(model=tiny_llama, device="cpu"))
    ann = Annotator(model, tok, cfg.prompt, cfg.labels, max_length=64, token_budget=64)
    texts = ["good", "a long and very boring film", "fine", "great fun", "bad"]
    run, probs = timed_annotate(ann, texts, chunk=2)
    whole = np.asarray(ann.score(texts)["probs"])
    np.testing.assert_allclose(probs, whole, atol=1e-5)
    assert run.preds == whole.argmax(-1).tolist() and run.flops > 0
    assert run.computed_tokens < run.prompt_tokens  # the prefix ran once, not per row


def test_int8_student_quantizes_linear_layers_and_keeps_its_predictions(tiny_bert):
    from lambert_ray.classify import ClassifyBatch

    fp32 = ClassifyBatch(tiny_bert, ANSWERS, max_length=32, device="cpu", threads=1)
    int8 = ClassifyBatch(tiny_bert, ANSWERS, max_length=32, device="cpu", threads=1, int8=True)
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.model.modules())
    assert sum(isinstance(m, dynamic_linear) for m in int8.model.modules()) == sum(
        isinstance(m, torch.nn.Linear) for m in fp32.model.modules())
    texts = ["a fine film", "dull", "the best thing this year", "not good at all"]
    from lambert_ray.bert import predict_proba

    p32 = predict_proba(fp32.model, fp32.tok, texts, 32)
    p8 = predict_proba(int8.model, int8.tok, texts, 32)
    np.testing.assert_allclose(p8, p32, atol=0.05)
    torch.set_grad_enabled(True)  # ClassifyBatch turns autograd off process-wide


def test_classify_int8_flag_reaches_the_classify_actors(monkeypatch):
    import lambert_ray.stage
    from lambert_ray.classify import classify
    from lambert_ray.config import validate_config

    seen = {}
    monkeypatch.setattr(lambert_ray.stage, "run_pool_stage",
                        lambda ds, fn, kwargs, *a, **k: seen.update(kwargs))
    cfg = validate_config({"data": {"corpus": {"path": "x.tsv"}}, "labels": {"names": ANSWERS},
                           "prompt": {"template": "{text}"}, "classify": {"int8": True}})
    classify(cfg, None, "model_dir", "out_dir")
    assert seen["int8"] is True and not hasattr(cfg.annotate, "int8")
