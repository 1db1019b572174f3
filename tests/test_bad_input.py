"""Bad input is contained: a corpus seeded with broken rows gives per-row error records and a
finished annotation job whose counts add up (rows in = ok + errored); too many errors fail the
stage with the count; a missing column or a mistyped config field is a clear error naming it;
secrets in the environment never reach the run directory."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lambert_ray.config import ConfigError, load_config, validate_config
from lambert_ray.data import DataError
from lambert_ray.stage import COMPLETE, ErrorBudgetExceeded, read_output

GOOD = [b"a wonderful film", b"a dull and lifeless plot", b"great acting", b"truly awful",
        b"fun for the whole family", b"a mess from start to end"]
_garbage = bytes(b for b in random.Random(0).randbytes(400) if b not in b"\t\r\n")
# id -> (raw text bytes, raw label, expected error prefix or None)
BAD = {
    "empty": (b"", b"1", "empty_text"),
    "blank": (b"   \x0b  ", b"0", "empty_text"),
    "bad_utf8": (b"caf\xc3 ok \xff\xfe", b"1", "invalid_utf8"),
    "latin1": ("déjà vu, très bien".encode("latin-1"), b"1", "invalid_utf8"),
    "nul": (b"good\x00movie", b"1", "binary_content"),
    "garbage": (_garbage, b"0", ("binary_content", "invalid_utf8")),
    "label_7": (b"a fine film with an odd label", b"7", "label_not_in_set"),
}
LONG_ID = "long"
SECRET = "hf_SECRETtokenValue0123456789"


def write_bad_corpus(path: Path) -> int:
    """A TSV (id, sentence, label) mixing good rows, BAD rows and a 100,000-character text."""
    lines = [b"id\tsentence\tlabel"]
    for i, text in enumerate(GOOD):
        lines.append(b"g%d\t%s\t%d" % (i, text, i % 2))
    for rid, (text, label, _) in BAD.items():
        lines.append(rid.encode() + b"\t" + text + b"\t" + label)
    lines.append(LONG_ID.encode() + b"\t" + b"great movie " * 8334 + b"\t1")  # 100,008 chars
    path.write_bytes(b"\n".join(lines) + b"\n")
    return len(lines) - 1


def raw_config(tmp: Path, llm: str, **errors: object) -> dict:
    return {
        "run": {"name": "bad", "output_dir": str(tmp / "runs")},
        "data": {"data_dir": str(tmp), "annotate_sample": 100, "label_values": [0, 1],
                 "corpus": {"path": "bad.tsv", "text_column": "sentence",
                            "label_column": "label", "id_column": "id"}},
        "labels": {"names": ["negative", "positive"]},
        "prompt": {"system": "Answer 'positive' or 'negative'.",
                   "template": "Review: {text}\nIs it positive or negative?"},
        "llm": {"model": llm, "max_length": 64, "token_budget": 256, "device": "cpu"},
        "annotate": {"batch_size": 4, "num_cpus": 0.25},
        "errors": {"max_error_fraction": 1.0, **errors},
    }


@pytest.fixture(scope="module")
def bad_run(ray_local, tiny_llama, tmp_path_factory):
    """The annotate + evaluate stages over the seeded corpus, with HF_TOKEN set in the driver."""
    from lambert_ray.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("bad")
    n = write_bad_corpus(tmp / "bad.tsv")
    cfg = validate_config(raw_config(tmp, tiny_llama))
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_TOKEN", SECRET)
    try:
        run_pipeline(cfg, ["annotate", "evaluate"])
    finally:
        mp.undo()
    return cfg, n, read_output(str(Path(cfg.run_dir) / "annotate"))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_bad_rows_become_error_records_not_a_dead_job(bad_run):
    _, n, out = bad_run
    assert len(out) == n and out["row_id"].is_unique
    by_id = out.set_index("row_id")
    for rid, (_, _, expected) in BAD.items():
        err = by_id.loc[rid, "error"]
        assert isinstance(err, str) and err.startswith(expected), (rid, err)
        assert pd.isna(by_id.loc[rid, "label"])
    good = by_id.loc[[f"g{i}" for i in range(len(GOOD))]]
    assert good["error"].isna().all() and good["label"].isin(["negative", "positive"]).all()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_overlong_text_is_truncated_and_flagged(bad_run):
    _, _, out = bad_run
    row = out.set_index("row_id").loc[LONG_ID]
    assert pd.isna(row["error"]) and row["label"] in ("negative", "positive")
    assert bool(row["truncated"]) is True
    assert not out.set_index("row_id").loc["g0", "truncated"]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_counts_in_equal_ok_plus_errored_in_complete_marker_and_report(bad_run):
    cfg, n, _ = bad_run
    run_dir = Path(cfg.run_dir)
    counts = json.loads((run_dir / "annotate" / COMPLETE).read_text())["counts"]
    assert counts["rows_in"] == n
    assert counts["rows_errored"] == len(BAD)
    assert counts["rows_ok"] + counts["rows_errored"] == counts["rows_in"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["counts"]["annotate"] == counts


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_secrets_in_the_environment_never_reach_the_run_dir(bad_run):
    cfg, _, _ = bad_run
    files = [p for p in Path(cfg.run_dir).rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "report.json" for p in files)
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_error_budget_fails_the_stage_naming_the_count(bad_run, tmp_path):
    """Over budget: the stage raises with the count and is not marked complete; the rows stay
    written (inspectable) and a rerun re-checks the budget instead of skipping the stage."""
    from lambert_ray.annotate import annotate
    from lambert_ray.data import read_table

    cfg, n, _ = bad_run
    out_dir = tmp_path / "annotate"
    shutil.copytree(Path(cfg.run_dir) / "annotate", out_dir)
    (out_dir / COMPLETE).unlink()
    strict = validate_config({**cfg.model_dump(), "errors": {"max_error_fraction": 0.1}})
    ds = read_table(strict.data.corpus, strict.data, strict.labels, "data.corpus")
    for _ in range(2):
        with pytest.raises(ErrorBudgetExceeded, match=rf"{len(BAD)} of {n} rows errored.*max_error_fraction"):
            annotate(strict, ds, str(out_dir), rows_in=n)
        assert not (out_dir / COMPLETE).exists()
    assert len(read_output(str(out_dir))) == n


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_missing_text_column_is_a_data_error_naming_the_field(ray_local, tiny_llama, tmp_path):
    from lambert_ray.pipeline import run_pipeline

    write_bad_corpus(tmp_path / "bad.tsv")
    raw = raw_config(tmp_path, tiny_llama)
    raw["data"]["corpus"]["text_column"] = "review"
    with pytest.raises(DataError, match=r"data\.corpus\.text_column.*'review'"):
        run_pipeline(validate_config(raw), ["annotate"])


@pytest.mark.parametrize("override, field", [
    ("annotate.batch_size=lots", "annotate.batch_size"),
    ("errors.max_error_fraction=[0.1]", "errors.max_error_fraction"),
    ("llm.trust_remote_code=maybe", "llm.trust_remote_code"),
    ("data.annotate_sample=-3", "data.annotate_sample"),
])
def test_wrong_config_type_is_a_config_error_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def _batch(texts: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"row_id": [f"r{i}" for i in range(len(texts))], "text": texts,
                         "label": [None] * len(texts),
                         "error": [None] * (len(texts) - 1) + ["empty_text"]})


class _FakeAnnotator:
    """Scores any batch unless it holds a text with BOOM (then the whole call raises)."""

    model_id, prompt_hash = "fake", "0" * 16

    def score(self, texts: list[str]) -> dict[str, list]:
        if any("BOOM" in t for t in texts):
            raise RuntimeError("CUDA error: device-side assert")
        n = len(texts)
        return {"label": ["positive"] * n, "label_id": [1] * n, "confidence": [0.9] * n,
                "probs": [[0.1, 0.9]] * n, "truncated": [False] * n}


def test_annotate_row_that_breaks_the_model_errors_alone():
    from lambert_ray.annotate import AnnotateBatch

    fn = object.__new__(AnnotateBatch)
    fn.ann = _FakeAnnotator()
    out = fn(_batch(["fine", "BOOM here", "also fine", ""]))
    assert out["error"].isna().tolist() == [True, False, True, False]
    assert out["error"][1].startswith("scoring_failed: RuntimeError")
    assert out["error"][3] == "empty_text"
    assert [None if pd.isna(x) else x for x in out["label"]] == ["positive", None, "positive", None]


def test_classify_row_that_breaks_the_model_errors_alone(monkeypatch):
    import numpy as np

    from lambert_ray import bert
    from lambert_ray.classify import ClassifyBatch

    def predict_proba(model, tok, texts, max_length):
        if any("BOOM" in t for t in texts):
            raise RuntimeError("index out of range in self")
        return np.tile([[0.2, 0.8]], (len(texts), 1))

    monkeypatch.setattr(bert, "predict_proba", predict_proba)
    fn = object.__new__(ClassifyBatch)
    fn.model = fn.tok = None
    fn.labels, fn.max_length = ["negative", "positive"], 16
    out = fn(_batch(["fine", "BOOM here", "also fine", ""]))
    assert [None if pd.isna(x) else x for x in out["label"]] == ["positive", None, "positive", None]
    assert out["error"].isna().tolist() == [True, False, True, False]
    assert out["error"][1].startswith("classify_failed: RuntimeError")
    assert out["error"][3] == "empty_text" and out["confidence"][0] == pytest.approx(0.8)
