"""`lambert-ray plan`: cheap row counts, rows per stage, the prompt split, cost warnings, the
estimate's arithmetic, the calibration on tiny models and the cluster cost. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pipeline_tiny import pipeline_raw, write_corpus
from typer.testing import CliRunner

from lambert_ray import gpu_table
from lambert_ray.cli import app
from lambert_ray.config import TableSource, load_config, validate_config
from lambert_ray.plan import FIXED, estimate_here, make_plan, stage_rows, table_counts
from lambert_ray.plan_measure import TokenStats, count_rows
from lambert_ray.plan_render import render_plan

ROOT = Path(__file__).resolve().parent.parent


def _cfg(tmp_path: Path, llm_path: str = "none", bert_path: str = "none", **sections):
    raw = pipeline_raw(tmp_path, llm_path, bert_path)
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value) if isinstance(value, dict) else raw.update({key: value})
    return validate_config(raw)


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
def test_count_rows_matches_the_rows_written_and_the_limit(tmp_path, fmt):
    write_corpus(tmp_path / f"c.{fmt}", 37, fmt=fmt)
    src = TableSource(path=f"c.{fmt}", text_column="sentence")
    assert count_rows(src, str(tmp_path)) == 37
    assert count_rows(src.model_copy(update={"limit": 10}), str(tmp_path)) == 10


def test_count_rows_sums_a_directory_of_parquet_files(tmp_path):
    (tmp_path / "d").mkdir()
    for i, n in enumerate((5, 7)):
        pd.DataFrame({"text": [f"row {i} {j}" for j in range(n)]}).to_parquet(tmp_path / "d" / f"{i}.parquet")
    assert count_rows(TableSource(path="d"), str(tmp_path)) == 12


def test_count_rows_of_an_hf_dataset_is_unknown_offline():
    assert count_rows(TableSource(path="hf://stanfordnlp/imdb:train"), ".") is None


def test_stage_rows_follow_the_config(tmp_path):
    cfg = _cfg(tmp_path, bert={"settings": ["llm", "gold", "llm+gold"]},
               peft={"enabled": True, "method": "lora", "max_dev": 5, "epochs": 3})
    rows = stage_rows(cfg, table_counts(cfg))
    assert rows["corpus"] == 40
    assert (rows["annotate"], rows["llm_eval"], rows["gold_train"]) == (16, 8, 8)
    assert rows["students"] == {"llm": 16, "gold": 8, "llm+gold": 24}
    assert (rows["peft_train"], rows["peft_dev"], rows["peft_epochs"]) == (8, 5, 3)
    assert rows["classify_test"] == 24 * 3  # the gold test set once per student
    assert rows["classify_corpus"] == 30  # data.classify_limit
    big = cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"annotate_sample": 1000, "classify_limit": None})})
    rows = stage_rows(big, table_counts(big))
    assert (rows["annotate"], rows["classify_corpus"]) == (40, 40)  # capped by the corpus
    given = stage_rows(big, table_counts(big, {"corpus": 10**6}))
    assert (given["annotate"], given["classify_corpus"]) == (1000, 10**6)


def test_plan_splits_the_prompt_at_the_text_and_counts_its_tokens(tmp_path, tiny_llama):
    plan = make_plan(_cfg(tmp_path, tiny_llama), calibrate=False)
    p = plan["prompt"]
    assert len(p["rows"]) == 2
    for r in p["rows"]:
        assert r["rendered"] == p["prefix"] + r["text"] + p["suffix"]
        assert r["total_tokens"] == p["prefix_tokens"] + r["text_tokens"] + p["suffix_tokens"]
    assert [v["tokens"] for v in p["verbalisers"]] == [1, 1]
    assert plan["estimate_here"] is None and plan["cluster"] is None
    json.dumps(plan)  # --json
    assert "PROMPT" in render_plan(plan) and "ROWS" in render_plan(plan)


def test_warnings_name_the_settings_that_multiply_cost(tmp_path, tiny_llama):
    cheap = make_plan(_cfg(tmp_path, tiny_llama, prompt={
        "template": "Is this review positive or negative?\nReview: {text}"}), calibrate=False)
    assert not [w for w in cheap["warnings"] if "{text}" in w or "verbaliser" in w]
    costly = _cfg(tmp_path, tiny_llama, llm={"reuse_prefix": False},
                  labels={"names": ["negative", "positive"],
                          "verbalisers": ["not good at all", "good"]},
                  prompt={"template": "{text}\nRead the review above carefully, then decide whether "
                          "its author liked the movie; answer with exactly one word."})
    warnings = " | ".join(make_plan(costly, calibrate=False)["warnings"])
    assert "tokens after {text} are run for every row" in warnings
    assert "multi-token verbalisers ('not good at all'" in warnings
    assert "llm.reuse_prefix is off" in warnings


def _stats(row: float, student: float) -> TokenStats:
    return TokenStats(rows=10, llm_text_mean=row - 5, llm_row_mean=row, llm_truncated=0.0,
                      student_mean=student)


def test_estimate_is_rows_over_measured_rates_plus_fixed_costs(tmp_path):
    cfg = _cfg(tmp_path, bert={"settings": ["llm", "gold"], "epochs": 2})
    rows = stage_rows(cfg, table_counts(cfg))
    calib = {"llm_load_s": 2.0, "annotate_items_per_s": 4.0, "student_load_s": 1.0,
             "student_train_rows_per_s": 8.0, "student_classify_items_per_s": 16.0}
    ref = _stats(20, 10)
    # the gold test rows are twice as long as the calibration rows: scored at half the rate
    stats = {"corpus": ref, "gold_train": ref, "gold_dev": ref, "gold_test": _stats(40, 20)}
    est = estimate_here(cfg, rows, stats, calib, n_prefix=30, ref=ref)
    a = est["annotate"]["parts"]
    assert a["annotate rows"] == pytest.approx(16 / 4.0)
    assert a["llm_eval rows"] == pytest.approx(8 / 2.0)
    assert a["pools+model loads"] == pytest.approx(2 * (FIXED["pool_start_s"] + 2.0))
    per_student = FIXED["ray_train_fit_s"] + 1.0
    s = est["train-bert"]["parts"]
    assert s["student llm"] == pytest.approx(per_student + 2 * (16 / 8.0 + 24 / 16.0))
    assert s["student gold"] == pytest.approx(per_student + 2 * (8 / 8.0 + 24 / 16.0))
    longer = cfg.model_copy(update={"bert": cfg.bert.model_copy(update={"epochs": 3})})
    more = estimate_here(longer, rows, stats, calib, n_prefix=30, ref=ref)
    assert more["train-bert"]["seconds"] - est["train-bert"]["seconds"] == pytest.approx(
        (16 + 8) / 8.0 + 2 * 24 / 16.0)  # one more epoch of each student


def test_without_zero_shot_only_the_tuned_llm_labels_and_calibration_rows_count(tmp_path):
    cfg = _cfg(tmp_path, bert={"settings": ["llm"]}, calibration={"dev_limit": 5},
               peft={"enabled": True, "method": "ia3", "epochs": 1, "zero_shot": False})
    rows = stage_rows(cfg, table_counts(cfg))
    assert rows["zero_shot"] is False and rows["llm_dev"] == 5
    calib = {"llm_load_s": 2.0, "annotate_items_per_s": 4.0, "annotate_adapter_items_per_s": 2.0,
             "peft_train_rows_per_s": 1.0, "student_load_s": 1.0,
             "student_train_rows_per_s": 8.0, "student_classify_items_per_s": 16.0}
    ref = _stats(20, 10)
    stats = dict.fromkeys(("corpus", "gold_train", "gold_dev", "gold_test"), ref)
    est = estimate_here(cfg, rows, stats, calib, n_prefix=30, ref=ref)
    assert list(est["annotate"]["parts"]) == ["read+sample corpus"]  # the 0-shot LLM labels nothing
    load = 2 * (FIXED["pool_start_s"] + 2.0)
    assert est["peft"]["parts"]["annotate with adapter"] == pytest.approx(load + (16 + 8 + 5) / 2.0)
    on = cfg.model_copy(update={"peft": cfg.peft.model_copy(update={"zero_shot": True})})
    a = estimate_here(on, stage_rows(on, table_counts(on)), stats, calib, n_prefix=30, ref=ref)
    assert a["annotate"]["parts"]["calibration dev rows"] == pytest.approx(5 / 4.0)
    assert a["annotate"]["seconds"] == pytest.approx(
        est["annotate"]["seconds"] + load + (16 + 8 + 5) / 4.0)


def test_plan_calibrates_on_tiny_models_and_estimates_every_stage(tmp_path, tiny_llama, tiny_bert):
    cfg = _cfg(tmp_path, tiny_llama, tiny_bert, bert={"settings": ["llm", "gold", "llm+gold"]},
               peft={"enabled": True, "method": "lora", "epochs": 2, "batch_size": 4})
    plan = make_plan(cfg, calib_rows=8)
    c = plan["calibration"]
    for key in ("annotate_items_per_s", "annotate_adapter_items_per_s", "peft_train_rows_per_s",
                "student_train_rows_per_s", "student_classify_items_per_s"):
        assert c[key] > 0, key
    here = plan["estimate_here"]
    stages = ["start-up", "annotate", "peft", "train-bert", "classify", "evaluate"]
    assert list(here) == [*stages, "total"]
    assert here["total"]["seconds"] == pytest.approx(sum(here[s]["seconds"] for s in stages))
    assert len(here["train-bert"]["parts"]) == 3
    assert all(v > FIXED["ray_train_fit_s"] for v in here["train-bert"]["parts"].values())
    text = render_plan(plan)
    assert "CALIBRATION" in text and "ESTIMATED WALL TIME" in text and "PEFT train" in text


def test_cluster_config_gets_gpu_hours_and_cost_from_the_table():
    cfg = load_config(ROOT / "configs" / "imdb_llama2-7b_qlora_cluster.yaml")
    plan = make_plan(cfg, given_rows={"corpus": 50_000, "gold_test": 25_000}, text_tokens=300)
    cluster = plan["cluster"]
    assert set(cluster["stages"]) == {"annotate", "peft (train)", "peft (re-annotate)",
                                      "train-bert", "classify"}
    ann = cluster["stages"]["annotate"]
    l4 = gpu_table.NODE_TYPES["L4"]
    tokens = 300 + plan["prompt"]["suffix_tokens"]
    # the annotate sample and every gold test row (llm_eval_limit: null, like the students)
    flops = (20_000 + 25_000) * 2 * gpu_table.KNOWN_PARAMS["llama-2-7b"] * tokens
    assert ann["gpu_hours"] == pytest.approx(
        flops / (l4.peak_tflops * 1e12 * gpu_table.MFU["llm_annotate"]) / 3600)
    assert ann["gpus"] == 16 and ann["wall_s"] > l4.boot_minutes * 60
    total = cluster["total"]
    assert total["cost_usd"] > sum(v["cost_usd"] for v in cluster["stages"].values())
    assert plan["estimate_here"] is None  # no GPU here: nothing calibrated


def test_cli_plan_prints_json_and_rejects_a_bad_rows_option(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(pipeline_raw(tmp_path, "smollm2", "minilm")))
    result = CliRunner().invoke(app, ["plan", "-c", str(path), "--no-calibrate", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["stage_rows"]["annotate"] == 16
    bad = CliRunner().invoke(app, ["plan", "-c", str(path), "--rows", "corpus=many"])
    assert bad.exit_code == 2


def test_plan_modules_import_without_ray():
    """The plan is a dry run: its modules must not pull Ray in (a subprocess sees a clean slate)."""
    import subprocess
    import sys

    code = ("import sys, lambert_ray.plan, lambert_ray.plan_render, lambert_ray.plan_cluster; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_given_rates_replace_the_measurement_and_give_the_same_estimate(tmp_path, tiny_llama,
                                                                         tiny_bert):
    cfg = _cfg(tmp_path, tiny_llama, tiny_bert)
    measured = make_plan(cfg, calib_rows=8)
    rates = json.loads(json.dumps(measured))["calibration"]  # what --json wrote
    again = make_plan(cfg, rates=rates)
    assert any("--rates" in n for n in again["notes"])
    for stage, v in measured["estimate_here"].items():
        assert again["estimate_here"][stage]["seconds"] == pytest.approx(v["seconds"]), stage
