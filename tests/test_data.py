"""Data layer: every reader format, stable row ids, error records, deterministic sampling."""

from __future__ import annotations

import pandas as pd
import pytest
from pipeline_tiny import write_corpus

from lambert_ray.config import validate_config
from lambert_ray.data import DataError, Normalizer, read_table, row_id_for, sample

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _cfg(tmp_path, path, **src):
    return validate_config({
        "data": {"data_dir": str(tmp_path), "label_values": [0, 1],
                 "corpus": {"path": path, "text_column": "sentence", "label_column": "label", **src}},
        "labels": {"names": ["negative", "positive"]},
        "prompt": {"template": "{text}"},
    })


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
def test_each_format_reads_to_the_same_rows(ray_local, tmp_path, fmt):
    write_corpus(tmp_path / f"c.{fmt}", 20, fmt)
    cfg = _cfg(tmp_path, f"c.{fmt}")
    df = read_table(cfg.data.corpus, cfg.data, cfg.labels, "data.corpus").to_pandas()
    assert list(df.columns) == ["row_id", "text", "label", "error"]
    assert len(df) == 20 and df["error"].isna().all()
    assert set(df["label"]) == {"negative", "positive"}
    assert df.loc[df["text"] == "good movie number 0 , good plot", "row_id"].item() == row_id_for(
        b"good movie number 0 , good plot")


def test_tsv_keeps_quotes_literally(ray_local, tmp_path):
    (tmp_path / "q.tsv").write_text('sentence\tlabel\n"quoted" start\t1\nit \'s fine\t0\n')
    cfg = _cfg(tmp_path, "q.tsv")
    df = read_table(cfg.data.corpus, cfg.data, cfg.labels, "data.corpus").to_pandas()
    assert sorted(df["text"]) == ['"quoted" start', "it 's fine"]


def test_id_column_is_used_as_row_id(ray_local, tmp_path):
    pd.DataFrame({"id": ["a", "b"], "sentence": ["x y", "x y"], "label": [0, 1]}).to_parquet(
        tmp_path / "ids.parquet")
    cfg = _cfg(tmp_path, "ids.parquet", id_column="id")
    df = read_table(cfg.data.corpus, cfg.data, cfg.labels, "data.corpus").to_pandas()
    assert sorted(df["row_id"]) == ["a", "b"]


def test_missing_text_column_names_the_field(ray_local, tmp_path):
    write_corpus(tmp_path / "c.tsv", 5)
    cfg = _cfg(tmp_path, "c.tsv", text_column="review")
    with pytest.raises(DataError, match=r"data\.corpus\.text_column.*'review'"):
        read_table(cfg.data.corpus, cfg.data, cfg.labels, "data.corpus")


def test_missing_file_names_the_field_and_data_dir(ray_local, tmp_path):
    cfg = _cfg(tmp_path, "nope.tsv")
    with pytest.raises(DataError, match=r"data\.corpus\.path.*nope\.tsv"):
        read_table(cfg.data.corpus, cfg.data, cfg.labels, "data.corpus")


def test_sample_is_deterministic_and_independent_of_partitioning(ray_local, tmp_path):
    write_corpus(tmp_path / "c.tsv", 200)
    cfg = _cfg(tmp_path, "c.tsv")
    ds = read_table(cfg.data.corpus, cfg.data, cfg.labels, "data.corpus")
    a = sample(ds, 10, seed=3).to_pandas()["row_id"].tolist()
    b = sample(ds.repartition(7), 10, seed=3).to_pandas()["row_id"].tolist()
    c = sample(ds, 10, seed=4).to_pandas()["row_id"].tolist()
    assert a == b and len(set(a)) == 10 and a != c


def test_normalizer_turns_bad_rows_into_error_records():
    cfg = _cfg("/tmp", "x.tsv")
    norm = Normalizer(cfg.data.corpus, cfg.labels, [0, 1])
    batch = pd.DataFrame({"sentence": [b"fine", b"   ", b"\xff\xfe bad", b"nul\x00byte", b"ok", None],
                          "label": [1, 0, 1, 0, 7, 1]})
    out = norm(batch)
    assert pd.isna(out["error"][0])
    assert out["error"][1] == "empty_text"
    assert out["error"][2].startswith("invalid_utf8")
    assert out["error"][3].startswith("binary_content")
    assert out["error"][4].startswith("label_not_in_set")
    assert out["error"][5] == "empty_text"
    assert out["label"][0] == "positive" and len(out) == len(batch)
