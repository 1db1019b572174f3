"""Malformed lines are data: every line of a CSV/TSV/JSONL corpus seeded with broken lines comes
out as a record or as an error record naming its file and line (no Ray)."""

from __future__ import annotations

import io
import re

import pytest
from malformed_corpus import write_malformed_corpus

from lambert_ray.textfiles import PARSE_ERROR, HeaderError, parse_file, peek_columns


def _fmt(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _records(raw: bytes, name: str, chunk_bytes: int) -> list[dict]:
    rows = []
    for t in parse_file(io.BytesIO(raw), name, _fmt(name), ["text"], ["id", "label"], chunk_bytes):
        assert t.schema.names == ["text", "id", "label", PARSE_ERROR]
        rows += t.to_pylist()
    return rows


def _check(rows: list[dict], name: str, expected: list[tuple[int, object]]) -> None:
    assert len(rows) == len(expected), (name, rows)
    for row, (line, exp) in zip(rows, expected, strict=True):
        if isinstance(exp, tuple):
            m = re.fullmatch(rf"parse: {re.escape(name)}:(\d+): (.*)", row[PARSE_ERROR] or "")
            assert m and int(m.group(1)) == line and exp[1] in m.group(2), (name, line, row)
            assert row["id"] is None and row["text"]  # the raw line, for inspection
        else:
            assert row[PARSE_ERROR] is None and row["id"] == exp, (name, line, row)


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 64, 7])
def test_every_line_is_a_record_or_an_error_naming_file_and_line(tmp_path, chunk_bytes):
    """Small chunks force quoted records across chunk boundaries and the line-level fallback."""
    expected = write_malformed_corpus(tmp_path)
    for name, exp in expected.items():
        _check(_records((tmp_path / name).read_bytes(), name, chunk_bytes), name, exp)


def test_quoted_newlines_bom_crlf_and_doubled_quotes_keep_their_text(tmp_path):
    write_malformed_corpus(tmp_path)
    rows = {r["id"]: r for name in ("csv/a_clean.csv", "csv/c_bom_crlf.csv", "corpus.jsonl")
            for r in _records((tmp_path / name).read_bytes(), name, 1 << 20)}
    assert rows["a3"]["text"] == b"a review over\ntwo lines"
    assert rows["a4"]["text"] == b'she said "wow" twice'
    assert rows["a5"]["text"] == b"three\n\nlines with a blank one"
    assert rows["c1"]["text"] == b"crlf line" and rows["c1"]["label"] == "1"
    assert rows["c4"]["text"] == b"crlf multi\r\nline"
    assert rows["j3"]["text"] == "café é".encode() and rows["j3"]["label"] == "0"
    assert rows["j4"]["label"] is None


def test_clean_chunks_take_pyarrows_path_and_match_the_line_parser():
    body = "".join(f'r{i},"text {i}, with comma",{i % 2}\n' for i in range(500))
    raw = ("id,text,label\n" + body).encode()
    fast = _records(raw, "x.csv", 1 << 20)
    slow = _records(raw + b'bad,"open\n', "x.csv", 1 << 20)  # one bad line: the line parser
    assert fast == slow[:-1] and len(fast) == 500
    assert slow[-1][PARSE_ERROR] == "parse: x.csv:502: unbalanced quote: the quoted field never closes"


def test_invalid_utf8_in_text_is_kept_as_bytes_and_in_a_label_replaced():
    raw = b"id,text,label\nr1,caf\xe9,1\nr2,ok,\xff\n"
    rows = _records(raw, "x.csv", 1 << 20)
    assert rows[0]["text"] == b"caf\xe9" and rows[0][PARSE_ERROR] is None
    assert rows[1]["label"] == "\ufffd"


def test_header_without_the_text_column_names_file_and_line():
    with pytest.raises(HeaderError, match=r"x\.csv:2: header \['id', 'body'\] has no column 'text'"):
        list(parse_file(io.BytesIO(b"\nid,body\nr1,x\n"), "x.csv", "csv", ["text"], []))


def test_empty_and_header_only_files_yield_no_rows_but_the_schema():
    for raw in (b"", b"text\r\n", b"\xef\xbb\xbftext\n\n"):
        tables = list(parse_file(io.BytesIO(raw), "e.csv", "csv", ["text"], []))
        assert [(t.num_rows, t.schema.names) for t in tables] == [(0, ["text", PARSE_ERROR])]
    assert [t.num_rows for t in parse_file(io.BytesIO(b""), "e.jsonl", "jsonl", ["text"], [])] == [0]


def test_peek_reads_the_header_or_first_json_object():
    assert peek_columns(io.BytesIO(b""), "csv") is None
    assert peek_columns(io.BytesIO(b"\xef\xbb\xbfid,text\r\n"), "csv") == ["id", "text"]
    assert peek_columns(io.BytesIO(b'{bad\n{"text": "a", "n": 1}\n'), "jsonl") == ["text", "n"]


def test_an_error_inside_a_ray_task_is_one_line_naming_file_and_line():
    from lambert_ray.cli import error_line

    class TaskError(RuntimeError):  # stands in for ray.exceptions.RayTaskError
        def __init__(self, cause):
            super().__init__("ray::ReadTolerantTextSource() (pid=1)\nTraceback ...\n" * 5)
            self.cause = cause

    cause = HeaderError("/d/b.csv:1: header ['id', 'body'] has no column 'text'\nFailed to read "
                        "stream iteratively after 1/10 attempts")
    assert error_line(TaskError(cause)) == (
        "HeaderError: /d/b.csv:1: header ['id', 'body'] has no column 'text'")
    assert error_line(ValueError("plain")) == "ValueError: plain"
