"""Calibrated teacher labels from a run directory, and the disagreement review (no Ray): stage
outputs are written by hand, as the annotate stage would."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from pipeline_tiny import pipeline_raw

from lambert_ray import storage
from lambert_ray.calibration import softmax
from lambert_ray.config import validate_config
from lambert_ray.review import CSV_COLUMNS, review_rows, review_summary
from lambert_ray.teacher_labels import CALIBRATION_FILE, ensure_calibration, llm_labels, teacher_of

LABELS = ["negative", "positive"]


def write_stage(run_dir, name: str, n: int, seed: int, with_gold: bool = True) -> None:
    """An annotate-shaped output: a teacher that says 'positive' for most rows."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, n)
    evidence = rng.normal(0, 1, (n, 2))
    evidence[np.arange(n), gold] += 1.5
    p = softmax(3 * evidence + np.array([0.0, 8.0]))
    df = pd.DataFrame({"row_id": [f"{name}-{i}" for i in range(n)], "text": [f"t{i}" for i in range(n)],
                       "gold": [LABELS[g] for g in gold] if with_gold else None,
                       "label": [LABELS[k] for k in p.argmax(1)], "confidence": p.max(1),
                       "probs": list(p), "error": None})
    df.loc[0, ["label", "confidence", "probs"]] = None  # one errored row
    df.loc[0, "error"] = "empty_text"
    out = storage.join(str(run_dir), name)
    storage.write_parquet(df, storage.join(out, "part-0.parquet"))
    storage.write_json(storage.join(out, "_COMPLETE.json"),
                       {"stage": name, "counts": {"rows_in": n, "rows_ok": n - 1, "rows_errored": 1}})


@pytest.fixture
def cfg(tmp_path):
    raw = pipeline_raw(tmp_path, "llm", "bert")
    c = validate_config(raw)
    write_stage(c.run_dir, "annotate", 400, 0, with_gold=False)
    write_stage(c.run_dir, "llm_dev", 300, 1)
    write_stage(c.run_dir, "llm_eval", 400, 2)
    return c


def accuracy(df: pd.DataFrame, col: str) -> float:
    ok = df["error"].isna()
    return float((df.loc[ok, col] == df.loc[ok, "gold"]).mean())


def test_auto_calibration_fits_temperature_bias_on_dev_and_fixes_the_test_labels(cfg):
    cals = ensure_calibration(cfg)
    assert cals["annotate"].method == "temperature_bias" and cals["annotate"].fitted_on == "llm_dev"
    test = llm_labels(cfg, "annotate", "test")
    assert accuracy(test, "label") > accuracy(test, "label_raw") + 0.15
    assert (test["label_raw"] == "positive").mean() > 0.85  # the raw teacher's bias is kept
    assert {"row_id", "text", "label", "probs", "confidence", "label_raw", "probs_raw"} <= set(test.columns)
    assert test.loc[0, "error"] == "empty_text" and pd.isna(test.loc[0, "label"])


def test_calibration_json_round_trips_and_refits_when_the_config_changes(cfg):
    first = ensure_calibration(cfg)
    path = storage.join(cfg.run_dir, CALIBRATION_FILE)
    saved = json.loads(open(path).read())
    assert saved["teachers"]["annotate"]["temperature"] == pytest.approx(first["annotate"].temperature)
    assert ensure_calibration(cfg) == first  # read back, not refitted
    prior = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update={"method": "prior"})})
    assert ensure_calibration(prior)["annotate"].method == "prior"
    assert json.loads(open(path).read())["config"]["method"] == "prior"


def test_prior_calibration_needs_no_gold_and_balances_the_labels(cfg):
    prior = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update={"method": "prior"})})
    labels = llm_labels(prior, "annotate")
    assert labels["gold"].isna().all()
    ok = labels["error"].isna()
    assert (labels.loc[ok, "label"] == "positive").mean() == pytest.approx(0.5, abs=0.1)
    test = llm_labels(prior, "annotate", "test")
    assert accuracy(test, "label") > accuracy(test, "label_raw") + 0.15


def test_calibration_none_leaves_the_labels_raw(cfg):
    off = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update={"method": "none"})})
    df = llm_labels(off, "annotate")
    assert df["label"].equals(df["label_raw"])


def test_temperature_bias_without_dev_rows_names_the_setting(cfg):
    tb = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(
        update={"method": "temperature_bias"})})
    storage.delete_file(storage.join(cfg.run_dir, "llm_dev", "_COMPLETE.json"))
    with pytest.raises(ValueError, match="calibration.method=temperature_bias"):
        ensure_calibration(tb)


def test_students_learn_from_the_tuned_teacher_except_the_0shot_baseline(tmp_path):
    raw = pipeline_raw(tmp_path, "llm", "bert")
    assert teacher_of(validate_config(raw), "llm") == "annotate"
    raw["peft"] = {"enabled": True, "method": "ia3"}
    c = validate_config(raw)
    assert teacher_of(c, "llm") == "annotate_peft" and teacher_of(c, "llm-0shot") == "annotate"


def test_review_flags_disagreements_and_unsure_teachers_ranked_by_score():
    teacher = pd.DataFrame({"row_id": ["a", "b", "c", "d", "e"], "text": list("ABCDE"),
                            "label": ["positive", "positive", "negative", "positive", "negative"],
                            "probs": [[0.05, 0.95], [0.3, 0.7], [0.55, 0.45], [0.2, 0.8], [0.9, 0.1]],
                            "confidence": [0.95, 0.7, 0.55, 0.8, 0.9]})
    student = pd.DataFrame({"row_id": ["a", "b", "c", "d", "e"],
                            "label": ["negative", "positive", "negative", "negative", "negative"],
                            "probs": [[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.6, 0.4], [0.95, 0.05]],
                            "confidence": [0.9, 0.6, 0.6, 0.6, 0.95]})
    flagged = review_rows(teacher, student, min_confidence=0.6)
    # a, d disagree; c is unsure (0.55 < 0.6); b and e agree and are confident
    assert set(flagged["row_id"]) == {"a", "c", "d"}
    assert flagged["rank"].tolist() == [1, 2, 3]
    assert flagged["score"].is_monotonic_decreasing
    # c: teacher entropy ~0.99 + TV 0.05; a: TV 0.85 + entropy 0.29; d: TV 0.4 + entropy 0.72
    assert flagged["row_id"].tolist() == ["a", "d", "c"]
    assert list(flagged.columns[:len(CSV_COLUMNS)]) == CSV_COLUMNS
    assert (flagged["label"] == "").all()
    assert review_summary(flagged, 5) == {"rows_compared": 5, "rows_flagged": 3, "disagree": 2,
                                          "low_confidence": 1}


def test_report_gives_students_their_gap_to_the_calibrated_teacher_and_the_cost(cfg):
    from lambert_ray.report import build_report

    rd = cfg.run_dir
    test = storage.read_parquet(storage.join(rd, "llm_eval", "part-0.parquet")).to_pandas()
    flip = {"negative": "positive", "positive": "negative"}
    student = pd.DataFrame({"row_id": test["row_id"], "gold": test["gold"],
                            "label": [g if i % 5 else flip[g] for i, g in enumerate(test["gold"])],
                            "error": None})  # 80 % right
    storage.write_parquet(student, storage.join(rd, "test", "llm", "part-0.parquet"))
    storage.write_json(storage.join(rd, "bert", "llm", "metrics.json"), {"train_rows": 399})
    for name, rows, seconds in (("test/llm", 400, 2.0), ("classify", 1000, 4.0)):
        storage.write_json(storage.join(rd, name, "_COMPLETE.json"),
                           {"stage": name, "counts": {"rows_in": rows, "rows_ok": rows,
                                                      "rows_errored": 0},
                            "timing": {"rows": rows, "seconds": seconds}})
    done = storage.read_json(storage.join(rd, "annotate", "_COMPLETE.json"))
    storage.write_json(storage.join(rd, "annotate", "_COMPLETE.json"),
                       {**done, "timing": {"rows": 400, "seconds": 40.0}})

    report = build_report(cfg)
    rows = {r["system"]: r for r in report["table"]}
    teacher = next(r for s, r in rows.items() if "calibrated (temperature_bias)" in s)
    assert teacher["n"] == 399 and teacher["evaluated_on"] == "gold test (sample)"
    gap = rows["BERT on LLM labels"]["gap_to_teacher"]
    common = student[student["row_id"] != test["row_id"][0]]
    student_acc = float((common["label"] == common["gold"]).mean())
    assert gap["n"] == 399 and gap["teacher_accuracy"] == pytest.approx(teacher["accuracy"])
    assert gap["gap_points"] == pytest.approx(100 * (student_acc - teacher["accuracy"]), abs=0.01)
    md = storage.read_text(storage.join(rd, "report.md"))
    assert f"{gap['gap_points']:+.1f} pts" in md
    cal = report["calibration"]["annotate"]
    assert cal["after"]["accuracy"] > cal["before"]["accuracy"] and cal["before"]["n"] == 399
    assert storage.exists(cal["plot"]) and "## Calibration of the annotator" in md
    assert report["cost"]["teacher"]["items_per_s"] == 10.0
    assert report["cost"]["student_vs_teacher"] == pytest.approx(25.0)
    assert "**25.0x**" in md


def test_calibration_config_errors_name_the_field(tmp_path):
    from lambert_ray.config import ConfigError

    raw = pipeline_raw(tmp_path, "llm", "bert")
    with pytest.raises(ConfigError, match="calibration.prior_target has 1 entries"):
        validate_config({**raw, "calibration": {"prior_target": [1.0]}})
    with pytest.raises(ConfigError, match="calibration.method"):
        validate_config({**raw, "calibration": {"method": "platt"}})
    assert validate_config(raw).data.llm_eval_limit == 8  # pipeline_raw samples; default is all
    del raw["data"]["llm_eval_limit"]
    assert validate_config(raw).data.llm_eval_limit is None
