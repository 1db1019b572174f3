"""Ray Data datasource over `textfiles.parse_file`: CSV/TSV/JSONL read as streamed blocks in
which malformed lines are error records (column `textfiles.PARSE_ERROR`), never a failed read.

    ds = ray.data.read_datasource(tolerant_text_source(path, fmt="csv", text_columns=["text"],
                                                       other_columns=["label"], filesystem=fs))

One read task per file, as Ray's own CSV reader; each yields one block per chunk of lines.
Ray is imported when a source is made, so this foundation module imports without Ray.
"""

from __future__ import annotations

from lambert_ray.textfiles import parse_file

_SOURCE_CLASS = None


def _source_class():
    global _SOURCE_CLASS
    if _SOURCE_CLASS is None:
        from ray.data.datasource import FileBasedDatasource

        class TolerantTextSource(FileBasedDatasource):
            def __init__(self, paths, *, fmt: str, text_columns: list[str],
                         other_columns: list[str], **file_based_kwargs):
                super().__init__(paths, **file_based_kwargs)
                self.fmt, self.text_columns, self.other_columns = fmt, text_columns, other_columns

            def _read_stream(self, f, path: str):
                yield from parse_file(f, path, self.fmt, self.text_columns, self.other_columns)

        _SOURCE_CLASS = TolerantTextSource
    return _SOURCE_CLASS


def tolerant_text_source(paths: str | list[str], *, fmt: str, text_columns: list[str],
                         other_columns: list[str], **file_based_kwargs):
    """A Ray Data datasource for `read_datasource`; kwargs as FileBasedDatasource's
    (`filesystem=...`)."""
    return _source_class()(paths, fmt=fmt, text_columns=text_columns, other_columns=other_columns,
                           **file_based_kwargs)
