"""The pipeline on tiny models with calibration, like-for-like teacher scoring, the disagreement
review and gold_extra: what lands in the run directory and the report."""

from __future__ import annotations

import pandas as pd
import pytest
from pipeline_tiny import pipeline_raw

from lambert_ray import storage
from lambert_ray.config import validate_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]


def test_pipeline_reports_teacher_gaps_calibration_review_and_cost(ray_local, tmp_path, tiny_llama,
                                                                   tiny_bert):
    from lambert_ray.pipeline import run_pipeline, student_training_set

    raw = pipeline_raw(tmp_path, tiny_llama, tiny_bert)
    raw["data"]["llm_eval_limit"] = None
    raw["calibration"] = {"method": "auto", "min_dev_rows": 10, "dev_limit": 20}
    raw["review"] = {"min_confidence": 0.9}
    report = run_pipeline(validate_config(raw))
    run_dir = tmp_path / "runs" / "t"

    # the teacher is scored on every gold test row (24), raw and calibrated, like the students
    rows = {r["system"]: r for r in report["table"]}
    raw_t = next(r for s, r in rows.items() if s.startswith("LLM 0-shot") and r["evaluated_on"] == "gold test")
    cal_t = next(r for s, r in rows.items() if "calibrated (temperature_bias)" in s)
    assert raw_t["n"] == cal_t["n"] == 24
    assert report["counts"]["llm_dev"]["rows_in"] == 20
    gap = rows["BERT on LLM labels"]["gap_to_teacher"]
    assert gap["teacher"] == "annotate" and gap["n"] == 24
    assert gap["teacher_accuracy"] == pytest.approx(cal_t["accuracy"])
    assert gap["gap_points"] == pytest.approx(
        100 * (rows["BERT on LLM labels"]["accuracy"] - cal_t["accuracy"]), abs=0.01)
    md = (run_dir / "report.md").read_text()
    assert "gap to teacher" in md and " pts |" in md

    # calibration: fitted on the dev rows, judged on the test rows, with a reliability diagram
    assert (run_dir / "calibration.json").exists()
    c = report["calibration"]["annotate"]
    assert c["calibration"]["fitted_on"] == "llm_dev" and c["before"]["n"] == 24
    assert (run_dir / "calibration" / "reliability_annotate.png").read_bytes()[:4] == b"\x89PNG"

    # review: every flagged row once, ranked, in Parquet and CSV; counted in the report
    csv = pd.read_csv(run_dir / "review" / "review.csv", keep_default_na=False)
    parquet = pd.read_parquet(run_dir / "review" / "review.parquet")
    assert len(csv) == len(parquet) == report["review"]["rows_flagged"] > 0
    assert report["review"]["rows_compared"] == report["counts"]["annotate"]["rows_ok"]
    assert csv["rank"].tolist() == list(range(1, len(csv) + 1)) and csv["row_id"].is_unique
    assert "Rows to review" in md

    # cost: items/s of the teacher and of the student, from this run's stage timings
    cost = report["cost"]
    assert cost["teacher"]["rows"] == 16 and cost["student"]["rows"] == 30
    assert cost["student_vs_teacher"] == pytest.approx(
        cost["student"]["items_per_s"] / cost["teacher"]["items_per_s"])

    # a person labels three review rows; they come back as gold for the gold student
    csv.loc[:2, "label"] = ["negative", "positive", "negative"]
    reviewed = tmp_path / "reviewed.csv"
    csv.to_csv(reviewed, index=False)
    raw["data"]["gold_extra"] = {"path": str(reviewed), "text_column": "text",
                                 "label_column": "label", "id_column": "row_id"}
    gold = student_training_set(validate_config(raw), "gold").set_index("row_id")
    assert len(gold) == len(pd.read_parquet(run_dir / "gold_train.parquet")) + 3
    assert gold.loc[csv["row_id"][:3], "label"].tolist() == ["negative", "positive", "negative"]
    assert storage.exists(str(run_dir / "review" / "summary.json"))
