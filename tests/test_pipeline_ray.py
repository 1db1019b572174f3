"""The Ray layer: annotation and classification actor pools, the BERT student on Ray Train
with 2 workers, and the whole pipeline through the CLI — on tiny models."""

from __future__ import annotations

import json
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest
from pipeline_tiny import pipeline_raw, write_corpus
from typer.testing import CliRunner

from lambert_ray.config import validate_config
from lambert_ray.stage import read_output

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_annotation_stage_writes_every_row_once_with_its_columns(ray_local, tmp_path, tiny_llama,
                                                                 tiny_bert):
    from lambert_ray.annotate import annotate
    from lambert_ray.data import read_table

    cfg = validate_config(pipeline_raw(tmp_path, tiny_llama, tiny_bert))
    ds = read_table(cfg.data.corpus, cfg.data, cfg.labels, "data.corpus")
    counts = annotate(cfg, ds, str(tmp_path / "ann"))
    df = read_output(str(tmp_path / "ann"))
    assert counts.rows_in == 40 == counts.rows_ok and counts.rows_errored == 0
    assert len(df) == 40 and df["row_id"].is_unique
    assert {"row_id", "text", "gold", "label", "confidence", "probs", "truncated", "error",
            "model", "prompt_hash"} <= set(df.columns)
    assert df["label"].isin(["negative", "positive"]).all()
    # a finished stage is skipped on rerun, and its counts come back from _COMPLETE.json
    again = annotate(cfg, ds, str(tmp_path / "ann"))
    assert again == counts and len(read_output(str(tmp_path / "ann"))) == 40


def test_bert_student_trains_on_two_ray_train_workers(ray_local, tmp_path, tiny_llama, tiny_bert):
    from lambert_ray.bert import train_bert

    raw = pipeline_raw(tmp_path, tiny_llama, tiny_bert)
    raw["bert"].update(num_workers=2, epochs=2, cpus_per_worker=0.25)
    cfg = validate_config(raw)
    df = pd.read_csv(write_corpus(tmp_path / "b.tsv", 32), sep="\t")
    train = pd.DataFrame({"text": df["sentence"], "label": df["label"].map({0: "negative", 1: "positive"})})
    metrics = train_bert(cfg, train, train.head(8), str(tmp_path / "bert"))
    assert metrics["epoch"] == 1 and "dev_accuracy" in metrics and metrics["train_rows"] == 32
    assert os.path.exists(tmp_path / "bert" / "model.safetensors")
    assert json.load(open(tmp_path / "bert" / "config.json"))["id2label"] == {"0": "negative",
                                                                               "1": "positive"}


def test_cli_run_executes_the_whole_pipeline_and_reports(ray_local, tmp_path, tiny_llama, tiny_bert):
    import yaml

    from lambert_ray.cli import app

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(pipeline_raw(tmp_path, tiny_llama, tiny_bert)))
    result = CliRunner().invoke(app, ["run", "--config", str(path), "--set", "run.name=cli"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "cli"
    report = json.load(open(run_dir / "report.json"))
    systems = [r["system"] for r in report["table"]]
    assert any(s.startswith("LLM 0-shot") for s in systems) and "BERT on LLM labels" in systems
    counts = report["counts"]
    assert counts["annotate"]["rows_in"] == 16 and counts["llm_eval"]["rows_in"] == 8
    assert counts["classify"]["rows_in"] == 30 and counts["test/llm"]["rows_in"] == 24
    assert all(c["rows_in"] == c["rows_ok"] + c["rows_errored"] for c in counts.values())
    # the LLM's sample and the gold sample are disjoint
    ann = set(read_output(str(run_dir / "annotate"))["row_id"])
    gold = set(pq.read_table(run_dir / "gold_train.parquet").column("row_id").to_pylist())
    assert ann and gold and not ann & gold
    assert "BERT on LLM labels" in (run_dir / "report.md").read_text()


def test_cli_bad_config_exits_2_naming_the_field(tmp_path):
    from lambert_ray.cli import app

    result = CliRunner().invoke(app, ["show-config", "--set", "bert.epochs=several"])
    assert result.exit_code == 2 and "bert.epochs" in result.output


def test_whole_pipeline_with_peft_reads_and_writes_an_s3_bucket(ray_local, s3_endpoint, tmp_path,
                                                                tiny_llama, tiny_bert, monkeypatch):
    """run.output_dir and the corpus on s3:// (a local S3 API): every stage, the Ray Train
    checkpoints, the adapter and the students land in the bucket and nothing on local disk."""
    from conftest import S3_BUCKET

    from lambert_ray import storage
    from lambert_ray.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    raw = pipeline_raw(tmp_path, tiny_llama, tiny_bert)
    bucket = f"s3://{S3_BUCKET}/pipeline"
    storage.write_bytes(f"{bucket}/data/train.tsv", (tmp_path / "train.tsv").read_bytes())
    raw["data"]["corpus"]["path"] = f"{bucket}/data/train.tsv"
    raw["run"]["output_dir"] = f"{bucket}/runs"
    raw["peft"] = {"enabled": True, "method": "lora", "epochs": 1, "batch_size": 4, "lr": 3e-2,
                   "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "num_workers": 1,
                   "cpus_per_worker": 0.25}
    raw["bert"].update(settings=["llm", "llm-then-gold"], then_epochs=1)  # one starts from another
    before = set(os.listdir(tmp_path))
    report = run_pipeline(validate_config(raw))

    run = f"{bucket}/runs/t"
    counts = report["counts"]
    assert counts["annotate"]["rows_in"] == counts["annotate_peft"]["rows_in"] == 16
    assert counts["llm_eval"]["rows_in"] == counts["llm_eval_peft"]["rows_in"] == 8
    assert counts["classify"]["rows_in"] == 30 and counts["test/llm"]["rows_in"] == 24
    assert all(c["rows_in"] == c["rows_ok"] + c["rows_errored"] for c in counts.values())
    assert storage.read_json(f"{run}/peft/lora/metadata.json")["method"] == "lora"
    assert storage.exists(f"{run}/peft/lora/adapter_config.json")
    assert storage.exists(f"{run}/bert/llm/model.safetensors")
    assert storage.read_json(f"{run}/bert/llm/metrics.json")["train_rows"] >= 1
    then = storage.read_json(f"{run}/bert/llm-then-gold/metrics.json")
    assert then["train_rows"] == 8  # the gold rows only
    # epoch -1 is the llm student it started from, scored on dev before its gold epochs
    assert [h["epoch"] for h in then["history"]] == [-1, 0]
    assert storage.exists(f"{run}/bert/llm-then-gold/model.safetensors")
    assert counts["test/llm-then-gold"]["rows_in"] == 24
    assert storage.list_dir(f"{run}/bert/_ray_train") and storage.list_dir(f"{run}/peft/_ray_train")
    assert "LLM + lora adapter" in storage.read_text(f"{run}/report.md")
    assert len(read_output(f"{run}/classify")) == 30
    assert set(os.listdir(tmp_path)) == before  # no runs/ and no "s3:" directory on local disk


def test_without_zero_shot_the_annotate_stage_only_draws_the_samples_once(ray_local, tmp_path,
                                                                          tiny_llama, tiny_bert):
    from lambert_ray import layout, pipeline, storage

    raw = pipeline_raw(tmp_path, tiny_llama, tiny_bert)
    raw["peft"] = {"enabled": True, "method": "lora", "zero_shot": False}
    cfg = validate_config(raw)
    assert pipeline.stage_annotate(cfg) == {}
    drawn = storage.read_parquet(layout.sample_path(cfg, layout.ANNOTATE)).to_pandas()
    test = storage.read_parquet(layout.sample_path(cfg, layout.LLM_EVAL)).to_pandas()
    assert len(drawn) == 16 and len(test) == 8 and {"row_id", "text", "label"} <= set(drawn.columns)
    gold = set(pipeline.gold_train(cfg)["row_id"])
    assert not (set(drawn["row_id"]) & (gold | set(test["row_id"])))  # disjoint, as with labels
    assert not storage.exists(layout.run_path(cfg, layout.ANNOTATE))  # the 0-shot LLM ran on nothing
    # the same rows as the 0-shot run would label
    subset, _ = pipeline.draw_samples(cfg)
    assert sorted(subset.to_pandas()["row_id"]) == sorted(drawn["row_id"])
