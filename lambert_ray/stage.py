"""Run one Ray Data actor-pool stage into a resumable Parquet directory, and count its rows.

    out = run_pool_stage(ds, ScorerClass, {"cfg": ...}, resources, "<run_dir>/annotate")

Resume: the output directory is a set of Parquet shards (one per block of at most
SHARD_BATCHES actor batches). A rerun drops the rows already written from the input with a Ray
Data anti-join (`remaining_rows`: input LEFT ANTI JOIN the shards' row_id column, hash-partitioned
across the cluster), so the driver never holds the finished row_ids (below RESUME_SET_MAX_IDS
written rows, a filter against a small id set, to skip the shuffle's start-up), and appends the
rest: after
any number of interruptions every input row is in the output once (rows are keyed by row_id).
A shard cut short by a crash has no Parquet footer and is deleted before the rerun (only footers
are read). `_COMPLETE.json` marks a finished stage; a complete stage is skipped.

Counting: every input row comes out either with a result or with an `error` reason; the stage's
counts (in / ok / errored) are checked and kept in `_COMPLETE.json`. More errored rows than
`errors.max_error_fraction` fails the stage after its output is written (so it can be inspected).

Fan-out (`fan_out=(column, values)`, e.g. one row per adapter): each input row comes out once
per value, all of them in the same shard (so a shard stays all-or-nothing and resume by row_id
still holds); rows and errors are then counted per value, each against rows_in.

`out_dir` is a local path or a URI (`s3://`, `gs://`): every read and write goes through
`storage` (pyarrow filesystems), and Ray Data writes the shards with the same filesystem.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from lambert_ray import storage
from lambert_ray.config import ResourcesConfig
from lambert_ray.console import progress
from lambert_ray.layout import STAGE_COMPLETE as COMPLETE

log = logging.getLogger(__name__)

# Rows per output shard, in actor batches: what a crash can cost is the shards in flight, so a
# shard must stay small even when the input arrives as one big block (e.g. a sorted sample).
SHARD_BATCHES = 8
JOIN_ROWS_PER_PARTITION = 1_000_000
# Up to this many rows written, a rerun filters its input against a driver-side set of their
# ids (a few MB at most) instead of starting the join's shuffle workers; above it, the join.
RESUME_SET_MAX_IDS = 100_000
JOIN_MAX_PARTITIONS = 256


class ErrorBudgetExceeded(RuntimeError):
    pass


def isolate_rows(fn: Callable[[list[str]], list[dict]], texts: list[str],
                 tag: str) -> tuple[list[dict | None], list[str | None]]:
    """`fn(texts)` -> one result dict per text. If the whole batch raises, rerun it row by row so
    a bad row errors alone: returns (results, errors), a row's result None where its error is
    `"<tag>: <exception>"`."""
    try:
        return list(fn(texts)), [None] * len(texts)
    except Exception as e:  # find the failing row(s)
        log.warning("batch of %d failed (%s); retrying row by row", len(texts), e)
    results: list[dict | None] = []
    errors: list[str | None] = []
    for t in texts:
        try:
            results.append(fn([t])[0])
            errors.append(None)
        except Exception as e:
            results.append(None)
            errors.append(f"{tag}: {type(e).__name__}: {str(e)[:200]}")
    return results, errors


def map_clean_rows(batch, fn: Callable[[list[str]], list[dict]], columns: list[str],
                   tag: str) -> tuple[dict[str, list], list[str | None]]:
    """Apply `fn` to the rows of a normalised batch (row_id, text, label, error) that have no
    error yet; returns the result `columns` (None on errored rows) and every row's error."""
    import pandas as pd

    n = len(batch)
    errors = [None if pd.isna(e) else e for e in batch["error"].values]
    ok = [i for i in range(n) if errors[i] is None]
    cols: dict[str, list] = {k: [None] * n for k in columns}
    if ok:
        results, row_errors = isolate_rows(fn, [batch["text"].iloc[i] for i in ok], tag)
        for j, i in enumerate(ok):
            if row_errors[j] is not None:
                errors[i] = row_errors[j]
                continue
            for k in columns:
                cols[k][i] = results[j][k]
    return cols, errors


@dataclass
class StageCounts:
    rows_in: int
    rows_ok: int
    rows_errored: int
    resumed_rows: int = 0

    @property
    def balanced(self) -> bool:
        return self.rows_in == self.rows_ok + self.rows_errored


def _shards(out_dir: str) -> list[str]:
    return storage.list_files(out_dir, ".parquet")


def written_rows(out_dir: str) -> int:
    """Rows in the shards already written (from their Parquet footers); shards left unreadable
    by a crash are removed, their rows are redone."""
    import pyarrow.parquet as pq

    n = 0
    for path in _shards(out_dir):
        fs, fs_path = storage.resolve(path)
        try:
            with fs.open_input_file(fs_path) as f:
                n += pq.ParquetFile(f).metadata.num_rows
        except Exception as e:  # truncated by a kill mid-write: drop it, its rows are redone
            log.warning("removing unreadable shard %s (%s)", path, e)
            storage.delete_file(path)
    return n


def remaining_rows(ds, out_dir: str, rows_in: int):
    """`ds` less the rows whose row_id is already in `out_dir`'s shards: a hash-partitioned
    left anti-join in Ray Data (about one partition per JOIN_ROWS_PER_PARTITION input rows);
    at most RESUME_SET_MAX_IDS written rows, a filter against their ids (no shuffle start-up)."""
    import ray.data

    if written_rows(out_dir) <= RESUME_SET_MAX_IDS:  # small: bounded by the constant
        ids = frozenset(i for p in _shards(out_dir)
                        for i in storage.read_parquet(p, ["row_id"]).column(0).to_pylist())
        return ds.filter(lambda r: r["row_id"] not in ids)
    fs, fs_path = storage.resolve(out_dir)
    done = ray.data.read_parquet(fs_path, filesystem=fs, columns=["row_id"])
    parts = max(1, min(JOIN_MAX_PARTITIONS, rows_in // JOIN_ROWS_PER_PARTITION + 1))
    return ds.join(done, join_type="left_anti", num_partitions=parts, on=("row_id",))


def read_output(out_dir: str, columns: list[str] | None = None):
    """The stage output as one pandas DataFrame (for small outputs: eval, training sets)."""
    import pandas as pd

    shards = _shards(out_dir)
    if not shards:
        return pd.DataFrame(columns=columns or [])
    return pd.concat([storage.read_parquet(p, columns).to_pandas() for p in shards],
                     ignore_index=True)


_shard_rows: dict[str, int] = {}  # finished shards never change: count each one once


def rows_written(out_dir: str) -> int:
    """Rows in the readable shards of `out_dir` (Parquet footers only; for progress lines)."""
    import pyarrow.parquet as pq

    total = 0
    for path in _shards(out_dir):
        if path not in _shard_rows:
            fs, fs_path = storage.resolve(path)
            try:
                with fs.open_input_file(fs_path) as f:
                    _shard_rows[path] = pq.ParquetFile(f).metadata.num_rows
            except Exception:  # still being written: counted once it is finished
                continue
        total += _shard_rows[path]
    return total


def stage_complete(out_dir: str) -> dict | None:
    """The stage's `_COMPLETE.json` (stage name + counts), or None while it is not finished."""
    try:
        return storage.read_json(storage.join(out_dir, COMPLETE))
    except FileNotFoundError:
        return None


def _count_output(out_dir: str) -> tuple[int, int]:
    ok = err = 0
    for path in _shards(out_dir):
        col = storage.read_parquet(path, ["error"]).column(0)
        err += len(col) - col.null_count
        ok += col.null_count
    return ok, err


def _count_fan_out(out_dir: str, column: str) -> dict[str, tuple[int, int]]:
    """(ok, errored) rows per value of `column`."""
    counts: dict[str, list[int]] = {}
    for path in _shards(out_dir):
        t = storage.read_parquet(path, [column, "error"]).to_pandas()
        for value, errs in t.groupby(column)["error"]:
            c = counts.setdefault(str(value), [0, 0])
            c[0] += int(errs.isna().sum())
            c[1] += int(errs.notna().sum())
    return {k: (ok, err) for k, (ok, err) in counts.items()}


def completed_counts(done: dict) -> StageCounts | dict[str, StageCounts]:
    """The counts of a `_COMPLETE.json`: one StageCounts, or one per fan-out value."""
    if done.get("fan_out"):
        return {k: StageCounts(**c) for k, c in done["counts"].items()}
    return StageCounts(**done["counts"])


def rows_per_shard(rows_in: int, res: ResourcesConfig) -> int:
    """Rows per block, i.e. per actor task and per output shard: up to SHARD_BATCHES batches
    (fewer files at scale), but enough blocks that every actor of the pool gets work on a
    small stage."""
    per_block = max(1, min(SHARD_BATCHES, rows_in // (res.batch_size * res.max_actors * 4)))
    return res.batch_size * per_block


def run_pool_stage(ds, fn_cls: type, fn_kwargs: dict[str, Any], res: ResourcesConfig,
                   out_dir: str, *, max_error_fraction: float = 1.0, name: str = "stage",
                   rows_in: int | None = None, fan_out: tuple[str, list[str]] | None = None,
                   ) -> StageCounts | dict[str, StageCounts]:
    """Map `ds` through an actor pool of `fn_cls(**fn_kwargs)` and append results to `out_dir`.
    With `fan_out=(column, values)` every input row yields one output row per value (see the
    module docstring); the counts are then {value: StageCounts}."""
    import ray.data

    if (done := stage_complete(out_dir)) is not None:
        log.info("%s: complete in %s, skipped", name, out_dir)
        return completed_counts(done)
    storage.makedirs(out_dir)
    if rows_in is None:
        rows_in = ds.count()
    per_row = len(fan_out[1]) if fan_out else 1
    already = written_rows(out_dir) // per_row  # input rows done: a shard holds all their rows
    todo = remaining_rows(ds, out_dir, rows_in) if already else ds
    todo = todo.repartition(target_num_rows_per_block=rows_per_shard(rows_in, res))
    t0 = time.perf_counter()
    if already < rows_in:
        fs, fs_path = storage.resolve(out_dir)
        with warnings.catch_warnings():
            # Ray 2.60 has no named parameter for an actor's max_restarts / max_task_retries
            # (only the deprecated **ray_remote_args); the bounded retries are ours to keep.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            mapped = todo.map_batches(
                fn_cls,
                fn_constructor_kwargs=fn_kwargs,
                batch_size=res.batch_size,
                batch_format="pandas",
                compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus or None,
                accelerator_type=res.accelerator_type,
                **({"resources": res.resources} if res.resources else {}),
                max_restarts=res.max_restarts,
                max_task_retries=res.max_task_retries,
            )
        with progress(name, rows_in - already,
                      lambda: rows_written(out_dir) // per_row - already):
            mapped.write_parquet(fs_path, filesystem=fs)
    seconds = time.perf_counter() - t0
    if fan_out:
        found = _count_fan_out(out_dir, fan_out[0])
        if unexpected := set(found) - set(fan_out[1]):
            raise RuntimeError(f"{name}: {out_dir} holds {fan_out[0]} values {sorted(unexpected)} "
                               f"besides {sorted(fan_out[1])} (written by another config?)")
        per_value = {k: StageCounts(rows_in, *found.get(k, (0, 0)), resumed_rows=already)
                     for k in fan_out[1]}
    else:
        per_value = {"": StageCounts(rows_in, *_count_output(out_dir), resumed_rows=already)}
    for value, c in per_value.items():
        what = f"{name}[{value}]" if value else name
        if not c.balanced:
            # Duplicate texts share a row_id (blake2b of the text), so only an id column makes
            # rows_in == ok + errored exact; say so rather than hide it.
            log.warning("%s: rows in %d != ok %d + errored %d (duplicate row_ids in the input?)",
                        what, rows_in, c.rows_ok, c.rows_errored)
        err = c.rows_errored
        if rows_in and err / rows_in > max_error_fraction:  # not marked complete: rerun re-checks
            raise ErrorBudgetExceeded(
                f"{what}: {err} of {rows_in} rows errored ({err / rows_in:.1%}) > "
                f"errors.max_error_fraction={max_error_fraction:.1%}; see the 'error' column in "
                f"{out_dir}")
    # Wall time of this run's rows (pool start-up included; earlier runs' rows not counted).
    counts = per_value if fan_out else per_value[""]
    out_rows = sum(c.rows_ok + c.rows_errored for c in per_value.values()) // len(per_value)
    timing = {"seconds": round(seconds, 3), "rows": out_rows - already}
    record = ({"stage": name, "counts": asdict(counts), "timing": timing} if not fan_out else
              {"stage": name, "fan_out": fan_out[0],
               "counts": {k: asdict(c) for k, c in per_value.items()}, "timing": timing})
    storage.write_json(storage.join(out_dir, COMPLETE), record)
    return counts
