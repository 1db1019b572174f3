"""The real packaged models on a handful of real sentences (SmolLM2 annotator, MiniLM student)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import DATA_DIR

from lambert_ray.annotator import Annotator
from lambert_ray.config import load_config, validate_config

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(600)]

SENTENCES = ["a gripping , beautifully acted film .", "a dull , lifeless mess .",
             "it 's a charming and often affecting journey .", "unfunny and tedious ."]


@pytest.fixture(scope="module")
def smollm2():
    return Annotator.from_config(load_config())


def test_smollm2_scores_real_sentences_with_and_without_prefix_reuse(smollm2):
    out = smollm2.score(SENTENCES)
    assert out["label"] and set(out["label"]) <= {"negative", "positive"}
    assert np.allclose(np.sum(out["probs"], 1), 1, atol=1e-5)
    smollm2.reuse_prefix = False
    try:
        plain = smollm2.score(SENTENCES)
    finally:
        smollm2.reuse_prefix = True
    np.testing.assert_allclose(out["logprobs"], plain["logprobs"], atol=2e-3)
    assert out["label"] == plain["label"]
    assert smollm2.prompt_hash == Annotator.from_config(load_config()).prompt_hash


def test_smollm2_labels_four_ag_news_classes_with_multi_token_verbaliser(smollm2):
    cfg = validate_config({
        "data": {"corpus": {"path": "ag_news/test.csv"}},
        "labels": {"names": ["World", "Sports", "Business", "Sci/Tech"]},
        "prompt": {"system": "Classify the news article. Answer with one of: {labels}.",
                   "template": "Article: {text}\nTopic?"},
    })
    ann = Annotator(smollm2.model, smollm2.tokenizer, cfg.prompt, cfg.labels, max_length=256)
    # 'Sci/Tech' is three tokens: each row runs once, plus a 2-token label tree (not 4 copies)
    assert ann.tree_tokens == 2 and ann.expansion == 1
    texts = ["Stocks fell sharply as the central bank raised rates.",
             "The striker scored twice in the cup final."]
    out = ann.score(texts)
    assert all(len(p) == 4 for p in out["probs"])
    old = Annotator(smollm2.model, smollm2.tokenizer, cfg.prompt, cfg.labels, max_length=256,
                    expand_labels=True).score(texts)
    np.testing.assert_allclose(out["logprobs"], old["logprobs"], atol=1e-4)


@pytest.mark.skipif(not (DATA_DIR / "sst2" / "dev.tsv").exists(), reason="shared data not present")
def test_minilm_student_loads_from_package_and_predicts(tmp_path):
    from lambert_ray.bert import load_classifier, predict_proba
    from lambert_ray.models import resolve_encoder

    with open(DATA_DIR / "sst2" / "dev.tsv") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:9]
    model, tok = load_classifier(resolve_encoder("minilm"), ["negative", "positive"])
    assert sum(p.numel() for p in model.bert.parameters()) == pytest.approx(22.7e6, rel=0.02)
    probs = predict_proba(model, tok, [r[0] for r in rows], max_length=64)
    assert probs.shape == (8, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
