"""Ray Data datasource over `textfiles.parse_file`: CSV/TSV/JSONL read as streamed blocks in
which malformed lines are error records (column `textfiles.PARSE_ERROR`), never a failed read.

    ds = ray.data.read_datasource(TolerantTextSource(path, fmt="csv", text_columns=["text"],
                                                     other_columns=["label"], filesystem=fs))

One read task per file, as Ray's own CSV reader; each yields one block per chunk of lines.
"""

from __future__ import annotations

from collections.abc import Iterator

from ray.data.datasource import FileBasedDatasource

from lambert_ray.textfiles import parse_file


class TolerantTextSource(FileBasedDatasource):
    def __init__(self, paths: str | list[str], *, fmt: str, text_columns: list[str],
                 other_columns: list[str], **file_based_kwargs):
        super().__init__(paths, **file_based_kwargs)
        self.fmt, self.text_columns, self.other_columns = fmt, text_columns, other_columns

    def _read_stream(self, f, path: str) -> Iterator:
        yield from parse_file(f, path, self.fmt, self.text_columns, self.other_columns)
