"""A corpus of CSV/TSV/JSONL files seeded with malformed lines, and what each line must become.

`write_malformed_corpus(dir)` returns {file name: [(line, expected)]}: `expected` is a good
record's id or `("parse", reason fragment)` for a line that must come out as an error record.
Blank lines and headers are not records. Together the entries account for every other line.
"""

from __future__ import annotations

from pathlib import Path

BOM = b"\xef\xbb\xbf"

# (file, raw bytes, [(line, expected)])
_FILES: list[tuple[str, bytes, list[tuple[int, object]]]] = [
    ("a_clean.csv",
     b'id,text,label\n'
     b'a1,a plain good film,1\n'
     b'a2,"quoted, with a comma",0\n'
     b'a3,"a review over\ntwo lines",1\n'          # one record, lines 4-5
     b'a4,"she said ""wow"" twice",1\n'
     b'\n'                                          # blank: not a record
     b'a5,"three\n\nlines with a blank one",0\n',  # one record, lines 7-9
     [(2, "a1"), (3, "a2"), (4, "a3"), (6, "a4"), (8, "a5")]),
    ("b_broken.csv",
     b'id,text,label\n'
     b'b1,fine,1\n'
     b'b2,"unbalanced quote here,0\n'             # runs on until the quote on line 7
     b'b3,after the bad one,1\n'
     b'b4,extra,field,1\n'                          # ragged: 4 fields
     b'b5,missing field\n'                          # ragged: 2 fields
     b'b6,"a ""quoted"" word",0\n'
     b'b7,"multi\nline after errors",1\n'
     b'b8,"never closed,1\n'                       # unbalanced at the end of the file
     b'b9,last line,0\n',
     [(2, "b1"), (3, ("parse", "unbalanced quote")), (4, "b3"),
      (5, ("parse", "expected 3 fields, got 4")), (6, ("parse", "expected 3 fields, got 2")),
      (7, "b6"), (8, "b7"), (10, ("parse", "unbalanced quote")), (11, "b9")]),
    ("c_bom_crlf.csv",
     BOM + b'id,text,label\r\n'
     b'c1,crlf line,1\r\n'
     b'c2,"crlf, quoted",0\r\n'
     b'c3,ragged,1,2\r\n'
     b'c4,"crlf multi\r\nline",1\r\n'
     b'c5,no newline at the end,0',
     [(2, "c1"), (3, "c2"), (4, ("parse", "expected 3 fields, got 4")), (5, "c4"), (7, "c5")]),
    ("d_header_only.csv", b"id,text,label\n", []),
    ("e_empty.csv", b"", []),
]

TSV = (BOM + b"id\ttext\tlabel\r\n"
       b"t1\ta \"quoted\" tsv line\t1\r\n"
       b"t2\textra\tfield\t0\r\n"
       b"t3\tmissing\r\n"
       b"\r\n"
       b"t4\tlast\t0\r\n",
       [(2, "t1"), (3, ("parse", "expected 3 fields, got 4")),
        (4, ("parse", "expected 3 fields, got 2")), (6, "t4")])

JSONL = (BOM + b'{"id": "j1", "text": "good json", "label": 1}\r\n'
         b'{"id": "j2", "text": "truncated json", "lab\r\n'
         b'[1, 2, 3]\r\n'
         b'\r\n'
         b'{"id": "j3", "text": "caf\\u00e9 \xc3\xa9", "label": 0}\r\n'
         b'{"id": "j4", "text": "no label"}\r\n',
         [(1, "j1"), (2, ("parse", "invalid JSON")), (3, ("parse", "not a JSON object")),
          (5, "j3"), (6, "j4")])


def write_malformed_corpus(root: Path) -> dict[str, list[tuple[int, object]]]:
    """The CSV files under root/csv/, plus root/corpus.tsv and root/corpus.jsonl."""
    (root / "csv").mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, raw, exp in _FILES:
        (root / "csv" / name).write_bytes(raw)
        expected[f"csv/{name}"] = exp
    for name, (raw, exp) in (("corpus.tsv", TSV), ("corpus.jsonl", JSONL)):
        (root / name).write_bytes(raw)
        expected[name] = exp
    return expected
