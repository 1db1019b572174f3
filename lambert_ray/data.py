"""Corpus and gold-set reading into Ray Data, with stable row ids and per-row error records.

Every table becomes the same schema, streamed (never collected on the driver):

    row_id  str   the id column's value, else blake2b(text bytes) (duplicate texts share an id)
    text    str   the text columns joined by newlines ("" when the row is unusable)
    label   str?  gold label name (labels.names), None when the source has no label column
    error   str?  why the row cannot be used (None: fine); such rows flow on and are counted

Bad rows never raise: empty/whitespace text, invalid UTF-8, NUL bytes / binary content and gold
labels outside the label set become error records, and so do CSV/TSV/JSONL lines that cannot be
parsed (`error = "parse: <file>:<line>: <reason>"`, row_id = hash of that error and the line;
see textfiles.py). A missing column or unreadable file raises a `DataError` naming the field
(e.g. `data.corpus.text_column`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import pandas as pd

from lambert_ray import layout, storage
from lambert_ray.config import DataConfig, LabelsConfig, PipelineConfig, TableSource
from lambert_ray.textfiles import PARSE_ERROR, peek_columns

SCHEMA_COLUMNS = ["row_id", "text", "label", "error"]


class DataError(ValueError):
    pass


def resolve_path(data_dir: str, path: str) -> str:
    """Relative paths resolve against data.data_dir; absolute paths and URIs pass through."""
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(data_dir, path))


def detect_format(src: TableSource, path: str) -> str:
    if src.format != "auto":
        return src.format
    lower = path.lower().rstrip("/")
    for ext, fmt in ((".parquet", "parquet"), (".tsv", "tsv"), (".csv", "csv"),
                     (".jsonl", "jsonl"), (".json", "jsonl")):
        if lower.endswith(ext):
            return fmt
    if storage.is_dir(path):
        return "parquet"
    raise DataError(f"cannot tell the format of {path!r}: set format: parquet|csv|tsv|jsonl")


def _text_columns(src: TableSource) -> list[str]:
    return [src.text_column] if isinstance(src.text_column, str) else list(src.text_column)


def read_raw(src: TableSource, data_dir: str, field: str):
    """The source as a Ray Dataset with its own columns (text columns kept as bytes for CSV/TSV
    so invalid UTF-8 becomes a per-row error instead of a failed read)."""
    import ray.data

    if src.path.startswith("hf://"):
        import datasets  # optional extra: pip install lambert_ray[hub]

        name, _, split = src.path[5:].partition(":")
        ds = ray.data.from_huggingface(datasets.load_dataset(name, split=split or "train"))
    else:
        path = resolve_path(data_dir, src.path)
        if not storage.exists(path):
            raise DataError(f"{field}.path: file not found: {path} (data.data_dir={data_dir!r}; "
                            "set LAMBERT_DATA_DIR or data.data_dir)")
        fmt = detect_format(src, path)
        # Bucket URIs are read through the filesystem `storage` resolves (S3-compatible
        # endpoints from the environment included); local paths as they are.
        fs, fs_path = storage.resolve(path) if storage.scheme(path) else (None, path)
        if fmt == "parquet":
            ds = ray.data.read_parquet(fs_path, filesystem=fs)
        else:  # CSV/TSV/JSONL: malformed lines become error records (textfiles.py)
            from lambert_ray.textsource import tolerant_text_source

            text_cols = _text_columns(src)
            others = [c for c in (src.id_column, src.label_column)
                      if c is not None and c not in text_cols]
            check_columns(_peek_columns(path, fmt, field), src, field)
            ds = ray.data.read_datasource(tolerant_text_source(
                fs_path, fmt=fmt, text_columns=text_cols, other_columns=list(dict.fromkeys(others)),
                filesystem=fs))
    if src.limit:
        ds = ds.limit(src.limit)
    return ds


def _peek_columns(path: str, fmt: str, field: str) -> list[str]:
    """The columns of the first file under `path` that has any (header / first JSON object)."""
    files = storage.list_files(path) if storage.is_dir(path) else [path]
    for f in sorted(files):
        if os.path.basename(f).startswith((".", "_")):
            continue
        fs, fs_path = storage.resolve(f)
        with fs.open_input_stream(fs_path) as stream:
            cols = peek_columns(stream, fmt)
        if cols is not None:
            return cols
    raise DataError(f"{field}.path: no {fmt} header or row in {path} (every file is empty)")


def check_columns(columns: list[str], src: TableSource, field: str) -> None:
    for c in _text_columns(src):
        if c not in columns:
            raise DataError(f"{field}.text_column: column {c!r} not in {columns}")
    for attr in ("label_column", "id_column"):
        c = getattr(src, attr)
        if c is not None and c not in columns:
            raise DataError(f"{field}.{attr}: column {c!r} not in {columns}")


def _as_bytes(v: Any) -> bytes | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, bytes | bytearray):
        return bytes(v)
    return str(v).encode("utf-8", "surrogatepass")


def row_id_for(text_bytes: bytes) -> str:
    return hashlib.blake2b(text_bytes, digest_size=8).hexdigest()


class Normalizer:
    """Batch function: source columns -> SCHEMA_COLUMNS with error records. Picklable."""

    def __init__(self, src: TableSource, labels: LabelsConfig, label_values: list[Any] | None,
                 min_chars: int = 1):
        self.text_cols = _text_columns(src)
        self.label_col, self.id_col = src.label_column, src.id_column
        self.names = list(labels.names)
        values = label_values if label_values is not None else self.names
        self.value_to_name = {str(v).strip(): n for v, n in zip(values, self.names, strict=True)}
        for n in self.names:  # label names are accepted too (e.g. a person's review file)
            self.value_to_name.setdefault(n, n)
        self.min_chars = min_chars

    def _text(self, parts: list[bytes | None]) -> tuple[bytes, str, str | None]:
        raw = b"\n".join(p for p in parts if p)
        if b"\x00" in raw:
            return raw, raw.replace(b"\x00", b"").decode("utf-8", "replace")[:200], "binary_content: NUL bytes"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return raw, raw.decode("utf-8", "replace")[:200], f"invalid_utf8: byte {e.start}"
        if len(text.strip()) < self.min_chars:
            return raw, text, "empty_text"
        return raw, text, None

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        n = len(batch)
        cols = [batch[c].map(_as_bytes).tolist() for c in self.text_cols]
        parse_errors = (batch[PARSE_ERROR].tolist() if PARSE_ERROR in batch.columns
                        else [None] * n)
        ids, texts, labels, errors = [], [], [], []
        for i in range(n):
            if isinstance(parse_errors[i], str):  # a malformed line: its raw text, no label
                raw = cols[0][i] or b""
                ids.append(row_id_for(parse_errors[i].encode("utf-8", "replace") + b"\n" + raw))
                texts.append(raw.decode("utf-8", "replace")[:200])
                labels.append(None)
                errors.append(parse_errors[i])
                continue
            raw, text, err = self._text([c[i] for c in cols])
            if self.id_col is not None:
                rid = batch[self.id_col].iloc[i]
                missing = rid is None or (not isinstance(rid, str) and pd.isna(rid)) or rid == ""
                ids.append(row_id_for(raw) if missing else str(rid))
            else:
                ids.append(row_id_for(raw))
            label = None
            if self.label_col is not None:
                v = batch[self.label_col].iloc[i]
                v = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                if isinstance(v, float) and v.is_integer():  # ints read as float beside a NaN
                    v = int(v)
                label = self.value_to_name.get(str(v).strip())
                if label is None and err is None:
                    err = f"label_not_in_set: {str(v)[:50]!r} not in {list(self.value_to_name)}"
            texts.append(text)
            labels.append(label)
            errors.append(err)
        return pd.DataFrame({"row_id": ids, "text": texts, "label": labels, "error": errors})


def read_table(src: TableSource, data: DataConfig, labels: LabelsConfig, field: str,
               min_chars: int = 1):
    """A TableSource as a normalized Ray Dataset (SCHEMA_COLUMNS)."""
    ds = read_raw(src, data.data_dir, field)
    check_columns(ds.columns(), src, field)
    norm = Normalizer(src, labels, data.label_values, min_chars)
    return ds.map_batches(norm, batch_format="pandas", batch_size=1024)


def source_rows(src: TableSource, data: DataConfig, field: str) -> int:
    """Rows in the source before normalising: an upper bound for `sample(total=...)` that costs a
    metadata read for Parquet and a parse without the per-row Python work for CSV/TSV/JSONL."""
    return read_raw(src, data.data_dir, field).count()


def _sample_key(row_ids: pd.Series, seed: int) -> np.ndarray:
    salt = str(seed).encode()
    return np.array([int.from_bytes(hashlib.blake2b(r.encode(), digest_size=8, salt=salt[:16]).digest(),
                                    "little") >> 1 for r in row_ids], dtype=np.int64)


# Rows kept by the hash threshold: n + SAMPLE_SIGMAS * sqrt(n) + SAMPLE_SLACK expected, so that
# fewer than n survive (and the threshold is raised and the pass rerun) essentially never.
SAMPLE_SIGMAS, SAMPLE_SLACK = 8, 16
_KEY_RANGE = 1 << 63


class _BelowThreshold:
    """Batch function: the rows whose sample key is below `threshold`, with the key (`_key`)."""

    def __init__(self, seed: int, threshold: int):
        self.seed, self.threshold = seed, threshold

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        key = _sample_key(batch["row_id"], self.seed)
        keep = key < self.threshold if self.threshold < _KEY_RANGE else np.ones(len(key), bool)
        return batch[keep].assign(_key=key[keep])


def sample(ds, n: int, seed: int, total: int | None = None):
    """Deterministic seeded sample of n rows: the n smallest hash(seed, row_id). The same rows for
    the same data and seed, however the data is partitioned.

    Scales with the corpus: one streamed pass keeps only the rows whose key falls under a
    threshold set for about n + 8 sqrt(n) survivors of `total` rows (default: `ds.count()`;
    any upper bound will do); only those few are sorted. If fewer than n survive (or `total` was
    too small) the threshold is raised and the pass repeated, so the result is always exactly
    the n smallest keys, as a full sort would give."""
    if total is None:
        total = ds.count()
    want = n + SAMPLE_SIGMAS * n ** 0.5 + SAMPLE_SLACK
    threshold = _KEY_RANGE if want >= total else int(_KEY_RANGE * (want / max(total, 1)))
    while True:
        kept = ds.map_batches(_BelowThreshold(seed, threshold), batch_format="pandas").materialize()
        if threshold >= _KEY_RANGE or kept.count() >= n:
            return kept.sort("_key").limit(n).drop_columns(["_key"])
        threshold = min(_KEY_RANGE, threshold * 16)


def exclude_ids(ds, row_ids: set[str]):
    """Rows whose row_id is not in `row_ids` (e.g. keep the gold set apart from the LLM's)."""
    if not row_ids:
        return ds
    ids = frozenset(row_ids)
    return ds.filter(lambda r: r["row_id"] not in ids)


# --- the gold sets of a run: one way to read them, one way to turn them into (text, label_id) ---

Gold = list[tuple[str, int]]


def read_source(cfg: PipelineConfig, field: str):
    """`data.<field>` (corpus, gold_train, gold_dev, gold_test) as a normalized Ray Dataset, or
    None when the config leaves it out."""
    src = getattr(cfg.data, field)
    if src is None:
        return None
    return read_table(src, cfg.data, cfg.labels, f"data.{field}", cfg.errors.min_chars)


def gold_train(cfg: PipelineConfig) -> pd.DataFrame:
    """The gold training subset (deterministic sample), cached as Parquet in the run dir."""
    path = layout.run_path(cfg, layout.GOLD_TRAIN)
    if storage.exists(path):
        return storage.read_parquet(path).to_pandas()
    ds = read_source(cfg, "gold_train")
    if ds is None:
        return pd.DataFrame(columns=SCHEMA_COLUMNS)
    if cfg.data.gold_train_sample:
        ds = sample(ds, cfg.data.gold_train_sample, cfg.run.seed + 1)
    df = ds.to_pandas()
    storage.write_parquet(df, path)
    return df


def gold_frame(cfg: PipelineConfig, field: str, limit: int | None = None) -> pd.DataFrame | None:
    """The clean rows of a gold table (`data.<field>`), optionally a seeded sample of `limit`."""
    ds = read_source(cfg, field)
    if ds is None:
        return None
    if limit:
        ds = sample(ds, limit, cfg.run.seed + 2)
    df = ds.to_pandas()
    return df[df["error"].isna()]


def gold_pairs(df: pd.DataFrame | None, labels: list[str]) -> Gold:
    """A normalised frame (text, label name[, error]) -> [(text, label_id)]: clean rows with a
    label in `labels`, in order."""
    if df is None or len(df) == 0:
        return []
    to_id = {n: i for i, n in enumerate(labels)}
    ok = df["label"].isin(list(to_id))
    if "error" in df:
        ok &= df["error"].isna()
    return [(str(t), to_id[y]) for t, y in zip(df.loc[ok, "text"], df.loc[ok, "label"], strict=True)]


def load_gold(cfg: PipelineConfig) -> tuple[Gold, Gold]:
    """(train, dev) gold pairs as PEFT training reads them: the gold_train sample, gold_dev."""
    storage.makedirs(cfg.run_dir)  # gold_train caches its sample there
    return (gold_pairs(gold_train(cfg), cfg.labels.names),
            gold_pairs(gold_frame(cfg, "gold_dev"), cfg.labels.names))
