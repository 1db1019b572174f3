"""Small corpora and a complete pipeline config on tiny models, for the pipeline tests."""

from __future__ import annotations

from pathlib import Path


def write_corpus(path: Path, n: int = 40, fmt: str = "tsv", start: int = 0) -> Path:
    """A small labelled corpus in SST-2's shape (sentence, label) with unique texts."""
    import pandas as pd

    words = ["good", "bad", "fine", "awful", "great", "dull", "fun", "poor"]
    rows = [{"sentence": f"{words[i % 8]} movie number {i} , {words[(i * 3) % 8]} plot",
             "label": int(words[i % 8] in ("good", "fine", "great", "fun"))} for i in range(start, start + n)]
    df = pd.DataFrame(rows)
    if fmt == "tsv":
        df.to_csv(path, sep="\t", index=False)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    return path


def pipeline_raw(tmp: Path, llm: str, bert: str, n: int = 40) -> dict:
    """A complete raw config dict on tiny models and a small corpus under `tmp`."""
    write_corpus(tmp / "train.tsv", n)
    write_corpus(tmp / "test.tsv", 24, start=1000)  # texts disjoint from the corpus
    return {
        "run": {"name": "t", "output_dir": str(tmp / "runs"), "seed": 0},
        "data": {"data_dir": str(tmp),
                 "corpus": {"path": "train.tsv", "text_column": "sentence", "label_column": "label"},
                 "annotate_sample": 16, "gold_train_sample": 8, "llm_eval_limit": 8,
                 "gold_train": {"path": "train.tsv", "text_column": "sentence", "label_column": "label"},
                 "gold_dev": {"path": "test.tsv", "text_column": "sentence", "label_column": "label"},
                 "gold_test": {"path": "test.tsv", "text_column": "sentence", "label_column": "label"},
                 "label_values": [0, 1], "classify_limit": 30},
        "labels": {"names": ["negative", "positive"]},
        "prompt": {"system": "Answer 'positive' or 'negative'.",
                   "template": "Review: {text}\nIs it positive or negative?"},
        "llm": {"model": llm, "max_length": 64, "token_budget": 256, "device": "cpu"},
        "annotate": {"batch_size": 8, "num_cpus": 0.25},
        "classify": {"batch_size": 16, "num_cpus": 0.25},
        "bert": {"model": bert, "epochs": 1, "batch_size": 8, "max_length": 32,
                 "settings": ["llm"], "cpus_per_worker": 0.25},
    }
