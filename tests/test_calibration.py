"""Calibration core (no Ray): a biased, over-confident synthetic annotator is corrected."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lambert_ray.calibration import (
    Calibration,
    ece,
    fit_prior,
    fit_temperature_bias,
    plot_reliability,
    reliability_bins,
    softmax,
    summary,
)

LABELS = ["a", "b", "c"]


def biased_annotator(n: int, seed: int, bias=(8.0, 0.0, 0.0), scale: float = 4.0):
    """Gold ids and the [N, 3] probabilities of an annotator whose row evidence is right but
    that adds a large prior to label 0 and is over-confident (logits scaled up)."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 3, n)
    evidence = rng.normal(0, 1, (n, 3))
    evidence[np.arange(n), gold] += 1.5
    return gold, softmax(scale * evidence + np.asarray(bias))


def test_biased_annotator_puts_most_rows_in_one_label():
    gold, p = biased_annotator(2000, 0)
    assert (p.argmax(1) == 0).mean() > 0.7
    assert summary(p, gold, LABELS)["accuracy"] < 0.6


def test_temperature_bias_fit_on_dev_improves_accuracy_and_ece_on_test():
    dev_y, dev_p = biased_annotator(600, 1)
    test_y, test_p = biased_annotator(2000, 2)
    cal = fit_temperature_bias(dev_p, dev_y, LABELS)
    before, after = summary(test_p, test_y, LABELS), summary(cal.apply(test_p), test_y, LABELS)
    assert after["accuracy"] > before["accuracy"] + 0.2
    assert after["ece"] < before["ece"] / 2 and after["ece"] < 0.05
    assert after["nll"] < before["nll"]
    assert cal.temperature > 2  # the over-confidence (scale 4) is undone
    assert cal.bias[0] < min(cal.bias[1:])  # label 0's extra prior is taken away


def test_prior_correction_without_gold_removes_the_label_prior():
    test_y, test_p = biased_annotator(2000, 3)
    unlabelled_y, unlabelled_p = biased_annotator(1000, 4)  # gold never passed to the fit
    one_step = fit_prior(unlabelled_p, LABELS, "annotated rows")
    cal = fit_prior(unlabelled_p, LABELS, "annotated rows", iterations=100)
    assert cal.method == "prior" and cal.temperature == 1.0 and cal.n_fit == 1000
    acc = {name: summary(c.apply(test_p), test_y, LABELS)["accuracy"]
           for name, c in (("one_step", one_step), ("iterated", cal))}
    raw = summary(test_p, test_y, LABELS)["accuracy"]
    # near one-hot probabilities: one step of contextual calibration only partly removes the
    # prior; iterating to a uniform mean distribution removes it
    assert raw < acc["one_step"] < acc["iterated"] and acc["iterated"] > raw + 0.15
    after = cal.apply(test_p)
    counts = np.bincount(after.argmax(1), minlength=3) / len(after)
    assert counts.max() < 0.4  # no label takes the rows any more


def test_prior_from_content_free_inputs_divides_out_their_distribution():
    content_free = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]])
    cal = fit_prior(content_free, LABELS)
    np.testing.assert_allclose(cal.apply(content_free.mean(0, keepdims=True)), [[1 / 3] * 3],
                               atol=1e-9)


def test_prior_target_must_be_a_distribution_over_the_labels():
    with pytest.raises(ValueError, match="prior target must be 3 positive numbers"):
        fit_prior(np.full((4, 3), 1 / 3), LABELS, target=[0.5, 0.5])


def test_calibration_round_trips_through_json():
    dev_y, dev_p = biased_annotator(300, 5)
    cal = fit_temperature_bias(dev_p, dev_y, LABELS, fitted_on="llm_dev")
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back == cal
    np.testing.assert_allclose(back.apply(dev_p), cal.apply(dev_p))


def test_identity_calibration_leaves_probabilities_unchanged():
    _, p = biased_annotator(50, 6)
    np.testing.assert_allclose(Calibration("none", LABELS).apply(p), p, atol=1e-9)


def test_calibration_rejects_a_bias_of_the_wrong_length():
    with pytest.raises(ValueError, match="bias has 2 entries for 3 labels"):
        Calibration("prior", LABELS, bias=[0.0, 1.0])


def test_ece_is_zero_when_confidence_matches_accuracy_and_bins_count_every_row():
    p = np.array([[0.75, 0.25]] * 4)
    gold = np.array([0, 0, 0, 1])
    assert ece(p, gold) == pytest.approx(0.0)
    assert ece(p, np.array([1, 1, 1, 1])) == pytest.approx(0.75)
    assert sum(b["count"] for b in reliability_bins(p, gold)) == 4


def test_reliability_diagram_is_a_png():
    y, p = biased_annotator(200, 7)
    png = plot_reliability({"raw": (p, y)}, "test")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_temperature_stays_bounded_when_the_annotator_has_no_signal():
    # half of each confident prediction is right: the NLL optimum is T -> infinity
    p = np.array([[0.9, 0.1]] * 50 + [[0.1, 0.9]] * 50)
    gold = np.array([0] * 25 + [1] * 25 + [0] * 25 + [1] * 25)
    cal = fit_temperature_bias(p, gold, ["a", "b"])
    assert 10 < cal.temperature <= np.exp(5) + 1e-6
    np.testing.assert_allclose(cal.apply(p), 0.5, atol=0.02)
