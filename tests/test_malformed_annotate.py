"""`lambert-ray annotate` over a corpus seeded with malformed lines runs to completion, and every
line is accounted for: a labelled row or an error record `parse: <file>:<line>: <reason>`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from malformed_corpus import write_malformed_corpus
from typer.testing import CliRunner

from lambert_ray.stage import COMPLETE, read_output


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_annotate_cli_completes_on_malformed_csv_and_accounts_for_every_line(
        ray_local, tiny_llama, tmp_path):
    from lambert_ray.cli import app

    expected = {name: exp for name, exp in write_malformed_corpus(tmp_path).items()
                if name.startswith("csv/")}
    raw = {
        "run": {"name": "malformed", "output_dir": str(tmp_path / "runs")},
        "data": {"data_dir": str(tmp_path), "annotate_sample": 1000, "label_values": [0, 1],
                 "corpus": {"path": "csv", "format": "csv", "text_column": "text",
                            "label_column": "label", "id_column": "id"}},
        "labels": {"names": ["negative", "positive"]},
        "prompt": {"template": "Review: {text}\nIs it positive or negative?"},
        "llm": {"model": tiny_llama, "max_length": 64, "token_budget": 256, "device": "cpu"},
        "annotate": {"batch_size": 4, "num_cpus": 0.25},
        "errors": {"max_error_fraction": 1.0},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["annotate", "--config", str(tmp_path / "job.yaml")])
    assert result.exit_code == 0, result.output

    out_dir = tmp_path / "runs" / "malformed" / "annotate"
    out = read_output(str(out_dir))
    good = {exp for exps in expected.values() for _, exp in exps if isinstance(exp, str)}
    bad = {(name, line) for name, exps in expected.items() for line, exp in exps
           if isinstance(exp, tuple)}
    assert out["row_id"].is_unique and len(out) == len(good) + len(bad)
    ok = out[out["error"].isna()]
    assert set(ok["row_id"]) == good and ok["label"].notna().all()
    parsed = out[out["error"].str.startswith("parse: ", na=False)]
    where = set()
    for e in parsed["error"]:
        path, line = re.match(r"parse: (.+):(\d+): ", e).groups()
        where.add((f"{Path(path).parent.name}/{Path(path).name}", int(line)))
    assert where == bad and parsed["label"].isna().all()
    counts = json.loads((out_dir / COMPLETE).read_text())["counts"]
    assert counts["rows_in"] == len(good) + len(bad) == counts["rows_ok"] + counts["rows_errored"]
    assert counts["rows_errored"] == len(bad)
