"""Tolerant CSV / TSV / JSONL parsing: a line that cannot be parsed becomes an error record.

    for table in parse_file(f, path, "csv", text_columns=["sentence"], other_columns=["label"]):
        ...   # pyarrow Tables: the named columns + PARSE_ERROR

`f` is any binary file object with `.read(n)` (a pyarrow input stream in a Ray read task, an
open file in a test). No Ray here. Every output table has the same schema: the text columns as
`binary` (bytes as in the file, so invalid UTF-8 stays a per-row error downstream), the other
columns as `string`, and `PARSE_ERROR` (string, null for a good record). A bad record has
`PARSE_ERROR = "parse: <path>:<line>: <reason>"`, its raw line(s) in the first text column and
nulls elsewhere; <line> is the physical 1-based line in the file (the header is line 1), also
for records after quoted fields that hold newlines.

How: the file is read in chunks of whole lines (CHUNK_BYTES). A chunk is first handed to
pyarrow's CSV reader (with an `invalid_row_handler`); it is accepted when pyarrow reports no bad
row and made exactly one record per non-blank line. Anything else (a ragged row, a quoted field
over several lines, an unbalanced quote, which pyarrow would silently merge with the lines after
it) sends the chunk to a strict line-level parser (Python's `csv`, RFC 4180 quoting): a record
that breaks the quoting becomes an error for its first line and parsing resumes on the next line.
A quoted record still open at the end of a chunk continues into the next one (up to
MAX_RECORD_BYTES); still open at the end of the file, it is an unbalanced quote. JSONL is parsed
line by line with `json` (pyarrow's JSON reader fails a whole block on one bad line).

Conventions: a UTF-8 BOM at the start of a file is dropped; CRLF and LF both end lines; blank
lines are not records; a record with more or fewer fields than the header is an error (ragged);
TSV has no quoting (quotes are literal), as before. An empty or header-only file yields one
empty table (its schema only).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv as pacsv

PARSE_ERROR = "__parse_error"
CHUNK_BYTES = 4 << 20
MAX_RECORD_BYTES = 16 << 20  # a quoted record may span lines up to this size
BOM = b"\xef\xbb\xbf"
FORMATS = ("csv", "tsv", "jsonl")


class HeaderError(ValueError):
    """The file's header cannot be read or lacks a needed column (message names file and line)."""


def _chunks(f, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(line number of the chunk's first line, bytes of whole lines) for the file; BOM dropped."""
    buf, line_no, first = b"", 1, True
    while True:
        data = f.read(chunk_bytes)
        if first:
            first = False
            if data.startswith(BOM):
                data = data[len(BOM):]
        if not data:
            if buf:
                yield line_no, buf if buf.endswith(b"\n") else buf + b"\n"
            return
        buf += data
        cut = buf.rfind(b"\n")
        if cut < 0:
            continue
        block, buf = buf[:cut + 1], buf[cut + 1:]
        yield line_no, block
        line_no += block.count(b"\n")


def _to_bytes(s: str) -> bytes:
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: keep it, invalid UTF-8
        return s.encode("utf-8", "surrogatepass")


def _to_str(v: Any) -> str | None:
    """A non-text field as a string: JSON numbers as written (1.0 -> '1'), bytes decoded."""
    if v is None:
        return None
    if isinstance(v, str):
        return _to_bytes(v).decode("utf-8", "replace")
    if isinstance(v, bool):  # as str() of the config's data.label_values (True -> 'True')
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


class _Records:
    """Column accumulator for one output table."""

    def __init__(self, text_columns: list[str], other_columns: list[str], path: str):
        self.text, self.other, self.path = text_columns, other_columns, path
        self.cols: dict[str, list] = {c: [] for c in text_columns + other_columns}
        self.errors: list[str | None] = []

    def add(self, values: dict[str, Any]) -> None:
        for c in self.text:
            v = values.get(c)
            self.cols[c].append(None if v is None else _to_bytes(v if isinstance(v, str) else _to_str(v)))
        for c in self.other:
            self.cols[c].append(_to_str(values.get(c)))
        self.errors.append(None)

    def add_error(self, line_no: int, reason: str, raw: str) -> None:
        for c in self.cols:
            self.cols[c].append(None)
        self.cols[self.text[0]][-1] = _to_bytes(raw.rstrip("\r\n"))
        self.errors.append(f"parse: {self.path}:{line_no}: {reason}")

    def __len__(self) -> int:
        return len(self.errors)

    def table(self) -> pa.Table:
        arrays = {c: pa.array(self.cols[c], pa.binary()) for c in self.text}
        arrays.update({c: pa.array(self.cols[c], pa.string()) for c in self.other})
        arrays[PARSE_ERROR] = pa.array(self.errors, pa.string())
        return pa.table(arrays)


def output_schema(text_columns: list[str], other_columns: list[str]) -> pa.Schema:
    return pa.schema([(c, pa.binary()) for c in text_columns]
                     + [(c, pa.string()) for c in other_columns] + [(PARSE_ERROR, pa.string())])


def _split_header(line: str, delimiter: str, quoted: bool) -> list[str]:
    if not quoted:
        return line.rstrip("\r\n").split(delimiter)
    rows = list(csv.reader([line], delimiter=delimiter, strict=True))
    return rows[0] if rows else []


def _nonblank_lines(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if line.strip(b"\r"))


class _DelimitedParser:
    """CSV (quoted) or TSV (unquoted) body parsing against a known header."""

    def __init__(self, path: str, header: list[str], delimiter: str, quoted: bool,
                 text_columns: list[str], other_columns: list[str]):
        self.path, self.header, self.delimiter, self.quoted = path, header, delimiter, quoted
        self.text, self.other = text_columns, other_columns
        self.index = {c: header.index(c) for c in text_columns + other_columns}
        self.schema = output_schema(text_columns, other_columns)

    def fast(self, data: bytes) -> pa.Table | None:
        """pyarrow's parse of a chunk, or None when it is not exactly one clean record per line."""
        bad: list[int] = []

        def on_invalid(_row) -> str:
            bad.append(1)
            return "skip"

        types = {c: pa.binary() for c in self.text} | {c: pa.string() for c in self.other}
        try:
            t = pacsv.read_csv(
                io.BytesIO(data),
                read_options=pacsv.ReadOptions(column_names=self.header, use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter=self.delimiter,
                                                 quote_char='"' if self.quoted else False,
                                                 newlines_in_values=self.quoted,
                                                 invalid_row_handler=on_invalid),
                convert_options=pacsv.ConvertOptions(column_types=types,
                                                     include_columns=self.text + self.other))
        except (pa.ArrowInvalid, pa.ArrowKeyError):  # e.g. invalid UTF-8 in a string column
            return None
        if bad or t.num_rows != _nonblank_lines(data):
            return None
        for c in self.text + self.other:  # a quoted field that swallowed a line break
            if pc.any(pc.match_substring(t.column(c), "\n")).as_py():
                return None
        errors = pa.nulls(t.num_rows, pa.string())
        return pa.table([t.column(c) for c in self.text + self.other] + [errors],
                        schema=self.schema)

    def _record(self, out: _Records, fields: list[str], line_no: int, raw: str) -> None:
        if len(fields) != len(self.header):
            out.add_error(line_no, f"expected {len(self.header)} fields, got {len(fields)}", raw)
        else:
            out.add({c: fields[i] for c, i in self.index.items()})

    def slow(self, data: bytes, first_line: int, final: bool) -> tuple[pa.Table, bytes, int]:
        """Strict line-level parse: (records, the bytes of a quoted record still open at the end
        of `data` when not `final`, that record's first line number)."""
        lines = data.decode("utf-8", "surrogateescape").split("\n")[:-1]  # data ends with \n
        lines = [ln + "\n" for ln in lines]
        out = _Records(self.text, self.other, self.path)
        if not self.quoted:
            for i, ln in enumerate(lines):
                if ln.strip("\r\n"):
                    self._record(out, ln.rstrip("\n").removesuffix("\r").split(self.delimiter),
                                 first_line + i, ln)
            return out.table(), b"", 0
        pos = 0
        while pos < len(lines):
            cursor = _Cursor(lines, pos)
            reader = csv.reader(cursor, delimiter=self.delimiter, strict=True)
            start = pos
            try:
                while True:
                    start = cursor.pos
                    try:
                        fields = next(reader)
                    except StopIteration:
                        pos = len(lines)
                        break
                    if fields:
                        self._record(out, fields, first_line + start,
                                     "".join(lines[start:cursor.pos]))
            except csv.Error as e:
                open_at_end = "unexpected end of data" in str(e)
                pending = "".join(lines[start:])
                if open_at_end and not final and len(pending) < MAX_RECORD_BYTES:
                    return out.table(), _to_bytes(pending), first_line + start
                pos = start + 1
                if not open_at_end and cursor.pos == pos:  # e.g. `"a" b` within one line:
                    fields = _lenient(lines[start], self.delimiter)  # read as pyarrow does
                    if fields is not None:
                        self._record(out, fields, first_line + start, lines[start])
                        continue
                reason = ("unbalanced quote: the quoted field never closes" if open_at_end
                          else f"unbalanced quote: the quoted field runs on to line "
                          f"{first_line + cursor.pos - 1} ({e})")
                out.add_error(first_line + start, reason, lines[start])
        return out.table(), b"", 0


def _lenient(line: str, delimiter: str) -> list[str] | None:
    """A one-line record with a stray quote inside a quoted field, read leniently (`"a" b` ->
    `a b`, as pyarrow reads it); None when a quote stays open past the line."""
    try:
        rows = list(csv.reader([line], delimiter=delimiter))
    except csv.Error:
        return None
    if len(rows) != 1 or any("\n" in f for f in rows[0]):
        return None
    return rows[0]


class _Cursor:
    """Line iterator that remembers how far the csv reader has read."""

    def __init__(self, lines: list[str], pos: int):
        self.lines, self.pos = lines, pos

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.pos >= len(self.lines):
            raise StopIteration
        self.pos += 1
        return self.lines[self.pos - 1]


def _parse_delimited(f, path: str, fmt: str, text_columns: list[str], other_columns: list[str],
                     chunk_bytes: int) -> Iterator[pa.Table]:
    delimiter, quoted = ("\t", False) if fmt == "tsv" else (",", True)
    chunks = _chunks(f, chunk_bytes)
    parser = None
    pending, pending_line = b"", 0
    for line_no, block in chunks:
        if parser is None:  # the header: the first non-blank line
            lines = block.split(b"\n")
            skip = 0
            while skip < len(lines) - 1 and not lines[skip].strip(b"\r"):
                skip += 1
            if skip == len(lines) - 1:
                continue
            header_line = lines[skip].decode("utf-8", "replace")
            try:
                header = _split_header(header_line, delimiter, quoted)
            except csv.Error as e:
                raise HeaderError(f"{path}:{line_no + skip}: cannot parse the header: {e}") from None
            missing = [c for c in text_columns + other_columns if c not in header]
            if missing:
                raise HeaderError(f"{path}:{line_no + skip}: header {header} has no column "
                                  f"{missing[0]!r}")
            parser = _DelimitedParser(path, header, delimiter, quoted, text_columns, other_columns)
            block = b"\n".join(lines[skip + 1:])
            line_no += skip + 1
            if not block:
                continue
        data, first = (pending + block, pending_line) if pending else (block, line_no)
        table = None if pending else parser.fast(data)
        if table is None:
            table, pending, pending_line = parser.slow(data, first, final=False)
        else:
            pending = b""
        if table.num_rows:
            yield table
    if pending:
        table, _, _ = parser.slow(pending, pending_line, final=True)
        if table.num_rows:
            yield table


def _parse_jsonl(f, path: str, text_columns: list[str], other_columns: list[str],
                 chunk_bytes: int) -> Iterator[pa.Table]:
    for line_no, block in _chunks(f, chunk_bytes):
        out = _Records(text_columns, other_columns, path)
        for i, ln in enumerate(block.decode("utf-8", "surrogateescape").split("\n")[:-1]):
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except ValueError as e:
                out.add_error(line_no + i, f"invalid JSON: {getattr(e, 'msg', e)} at column "
                              f"{getattr(e, 'colno', '?')}", ln)
                continue
            if not isinstance(obj, dict):
                out.add_error(line_no + i, f"not a JSON object: {type(obj).__name__}", ln)
                continue
            out.add(obj)
        if len(out):
            yield out.table()


def parse_file(f, path: str, fmt: str, text_columns: list[str], other_columns: list[str],
               chunk_bytes: int = CHUNK_BYTES) -> Iterator[pa.Table]:
    """The records of one CSV/TSV/JSONL file (see the module docstring). Raises HeaderError when
    a CSV/TSV header cannot be read or lacks a column (the file's rows cannot be named)."""
    if fmt == "jsonl":
        tables = _parse_jsonl(f, path, text_columns, other_columns, chunk_bytes)
    elif fmt in ("csv", "tsv"):
        tables = _parse_delimited(f, path, fmt, text_columns, other_columns, chunk_bytes)
    else:
        raise ValueError(f"not a line format: {fmt!r} (one of {FORMATS})")
    return _schema_if_empty(tables, output_schema(text_columns, other_columns))


def _schema_if_empty(tables: Iterator[pa.Table], schema: pa.Schema) -> Iterator[pa.Table]:
    """The tables, or one empty table with the schema when there are none (an empty or
    header-only file), so a dataset of such files still has its columns."""
    empty = True
    for t in tables:
        empty = False
        yield t
    if empty:
        yield schema.empty_table()


def peek_columns(f, fmt: str, max_lines: int = 1000) -> list[str] | None:
    """The column names of a file (CSV/TSV header, keys of the first JSON object), None when it
    has none (empty, or no parseable JSON object in its first `max_lines` lines)."""
    head = f.read(1 << 20)
    if head.startswith(BOM):
        head = head[len(BOM):]
    for i, ln in enumerate(head.decode("utf-8", "replace").split("\n")):
        if i >= max_lines:
            break
        if not ln.strip():
            continue
        if fmt == "jsonl":
            try:
                obj = json.loads(ln)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return list(obj)
            continue
        try:
            return _split_header(ln, "\t" if fmt == "tsv" else ",", fmt == "csv")
        except csv.Error:
            return None
    return None
