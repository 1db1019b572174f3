"""The student's targets and training rules: soft-target loss, tempering, confidence filter and
weights, class balance, LR schedule, best-epoch selection. No Ray; tiny models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lambert_ray.bert import (
    chosen_checkpoint,
    make_optimizer,
    select_score,
    soft_cross_entropy,
    train_epoch,
)
from lambert_ray.config import BertConfig
from lambert_ray.distill import build_targets, class_balance, margin_weight, tempered

LABELS = ["neg", "pos"]


def _llm_rows() -> pd.DataFrame:
    return pd.DataFrame({"row_id": ["a", "b", "c"], "text": ["x", "y", "z"],
                         "label": ["pos", "neg", "pos"],
                         "probs": [[0.1, 0.9], [0.55, 0.45], [0.3, 0.7]]})


def test_soft_cross_entropy_equals_cross_entropy_for_one_hot_targets():
    logits = torch.randn(5, 3)
    y = torch.tensor([0, 2, 1, 1, 0])
    one_hot = torch.nn.functional.one_hot(y, 3).float()
    assert torch.allclose(soft_cross_entropy(logits, one_hot),
                          torch.nn.functional.cross_entropy(logits, y), atol=1e-6)


def test_soft_cross_entropy_is_minimised_at_the_target_distribution():
    target = torch.tensor([[0.7, 0.3]])
    at_target = soft_cross_entropy(torch.log(target), target)
    for other in ([0.9, 0.1], [0.5, 0.5], [0.3, 0.7]):
        assert soft_cross_entropy(torch.log(torch.tensor([other])), target) > at_target


def test_row_weights_scale_each_rows_share_of_the_loss():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # row 0 right, row 1 wrong
    only_first = soft_cross_entropy(logits, target, torch.tensor([1.0, 0.0]))
    assert torch.isclose(only_first, soft_cross_entropy(logits[:1], target[:1]))
    assert soft_cross_entropy(logits, target, torch.tensor([0.0, 1.0])) > only_first


def test_temperature_sharpens_below_one_and_flattens_above_and_keeps_argmax():
    p = np.array([[0.6, 0.3, 0.1]])
    sharp, flat = tempered(p, 0.5), tempered(p, 2.0)
    assert sharp[0, 0] > 0.6 > flat[0, 0]
    np.testing.assert_allclose(tempered(p, 1.0), p, atol=1e-6)
    assert sharp.argmax() == flat.argmax() == 0
    np.testing.assert_allclose(sharp.sum(), 1.0, atol=1e-6)
    with pytest.raises(ValueError):
        tempered(p, 0.0)


def test_margin_weight_is_zero_at_chance_and_one_when_certain():
    np.testing.assert_allclose(margin_weight(np.array([[0.5, 0.5], [1.0, 0.0], [0.75, 0.25]])),
                               [0.0, 1.0, 0.5])


def test_hard_targets_are_one_hot_argmax_labels_and_soft_targets_the_probabilities():
    hard = build_targets(_llm_rows(), None, LABELS, targets="hard")
    assert [list(t) for t in hard["target"]] == [[0, 1], [1, 0], [0, 1]]
    soft = build_targets(_llm_rows(), None, LABELS, targets="soft")
    np.testing.assert_allclose(np.stack(soft["target"]), [[0.1, 0.9], [0.55, 0.45], [0.3, 0.7]],
                               atol=1e-6)
    assert set(soft["source"]) == {"llm"} and (soft["weight"] == 1).all()


def test_min_confidence_drops_unsure_llm_rows_but_never_gold():
    gold = pd.DataFrame({"row_id": ["g"], "text": ["w"], "label": ["neg"]})
    df = build_targets(_llm_rows(), gold, LABELS, min_confidence=0.6, gold_weight=2.0)
    assert sorted(df["row_id"]) == ["a", "c", "g"]
    assert df.set_index("row_id").loc["g", "weight"] == 2.0


def test_gold_wins_over_an_llm_row_with_the_same_row_id():
    gold = pd.DataFrame({"row_id": ["a"], "text": ["x"], "label": ["neg"]})
    df = build_targets(_llm_rows(), gold, LABELS, targets="soft").set_index("row_id")
    assert df.loc["a", "source"] == "gold" and list(df.loc["a", "target"]) == [1.0, 0.0]
    assert len(df) == 3


def test_confidence_weight_follows_the_teachers_margin():
    df = build_targets(_llm_rows(), None, LABELS, confidence_weight=True).set_index("row_id")
    np.testing.assert_allclose(df["weight"].to_numpy(), [0.8, 0.1, 0.4], atol=1e-6)


def test_llm_rows_without_probs_fall_back_to_their_label():
    rows = _llm_rows().drop(columns="probs")
    soft = build_targets(rows, None, LABELS, targets="soft")
    np.testing.assert_allclose(np.stack(soft["target"]), [[0, 1], [1, 0], [0, 1]], atol=1e-6)


def test_class_balance_counts_rows_and_flags_a_skewed_mix():
    df = build_targets(pd.DataFrame({"row_id": list("abcdefgh"), "text": list("abcdefgh"),
                                     "label": ["pos"] * 7 + ["neg"]}), None, LABELS)
    bal = class_balance(df, LABELS)
    assert bal["rows"] == {"neg": 1, "pos": 7} and bal["skewed"] and bal["max_min_ratio"] == 7.0
    even = class_balance(df.iloc[5:], LABELS)
    assert not even["skewed"]


def test_schedule_warms_up_then_decays_linearly_to_zero():
    model = torch.nn.Linear(2, 2)
    cfg = BertConfig(lr=1e-3, warmup_ratio=0.1, schedule="linear")
    opt, sched = make_optimizer(model, cfg, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 10
    assert lrs[-1] < 2e-5 and all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    _, resumed = make_optimizer(model, cfg, total_steps=100, start_step=50)
    assert resumed.get_last_lr()[0] == pytest.approx(lrs[50])


def test_train_epoch_learns_soft_targets_on_a_tiny_bert(tiny_bert):
    from lambert_ray.bert import load_classifier, predict_proba

    torch.manual_seed(0)
    model, tok = load_classifier(tiny_bert, LABELS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    texts = ["good fun", "bad dull", "great film", "awful plot"] * 4
    targets = np.array([[0.2, 0.8], [0.9, 0.1], [0.2, 0.8], [0.9, 0.1]] * 4, dtype=np.float32)
    weights = np.ones(len(texts), dtype=np.float32)
    first = train_epoch(model, tok, opt, [(texts, targets, weights)], 16)
    for _ in range(30):
        last = train_epoch(model, tok, opt, [(texts, targets, weights)], 16)
    assert last < first
    p = predict_proba(model, tok, texts[:4], 16)
    np.testing.assert_allclose(p, targets[:4], atol=0.1)  # matches the soft targets, not one-hot


def test_best_epoch_selection_prefers_dev_accuracy_then_macro_f1_then_earlier():
    def score(acc, f1):
        return select_score({"epoch": 0, "dev_accuracy": acc, "dev_macro_f1": f1}, "best_dev")

    assert score(0.81, 0.5) > score(0.8, 0.9)  # accuracy first
    assert score(0.8, 0.7) > score(0.8, 0.6)  # then macro-F1
    assert score(0.8, 0.7) == score(0.8, 0.7)  # a full tie: chosen_checkpoint takes the earlier
    assert select_score({"epoch": 2}, "best_dev") == 2.0  # no dev rows: the last epoch wins
    assert select_score({"epoch": 2, "dev_accuracy": 0.7}, "last") == 2.0


class _Result:
    def __init__(self, history):
        self.best_checkpoints = [(f"ckpt{m['epoch']}", m) for m in history]
        self.checkpoint, self.metrics = f"ckpt{history[-1]['epoch']}", history[-1]


def test_the_published_student_is_the_best_dev_epoch_not_the_last():
    hist = [{"epoch": e, "dev_accuracy": a, "dev_macro_f1": a} for e, a in
            enumerate([0.70, 0.85, 0.85, 0.80])]
    for m in hist:
        m["select_score"] = select_score(m, "best_dev")
    ckpt, metrics = chosen_checkpoint(_Result(hist), "best_dev")
    assert ckpt == "ckpt1" and metrics["epoch"] == 1  # tie with epoch 2: the earlier one
    assert chosen_checkpoint(_Result(hist), "last")[0] == "ckpt3"


def test_a_student_started_from_a_local_student_gets_its_absolute_path(tmp_path, monkeypatch):
    """Ray Train workers run in their own directory: a relative run dir (runs/...) must reach
    them as an absolute path, and the student trains then_epochs, not epochs."""
    import ray.data

    from lambert_ray import bert
    from lambert_ray.config import load_config

    seen = {}

    def fake_fit(loop, config, **kw):
        seen.update(config)
        raise RuntimeError("stop here")

    monkeypatch.setattr(bert, "fit_torch_trainer", fake_fit)
    monkeypatch.setattr(ray.data, "from_pandas", lambda df: df)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["bert.settings=[llm,llm-then-gold]", "bert.then_epochs=1"])
    rows = pd.DataFrame({"text": ["good", "bad"], "label": ["positive", "negative"]})
    with pytest.raises(RuntimeError, match="stop here"):
        bert.train_bert(cfg, rows, rows, str(tmp_path / "out"), init="runs/x/bert/llm")
    assert seen["init"] == str(tmp_path / "runs/x/bert/llm")
    assert seen["bert"]["epochs"] == 1
