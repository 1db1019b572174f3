"""Run one Ray Data actor-pool stage into a resumable Parquet directory, and count its rows.

    out = run_pool_stage(ds, ScorerClass, {"cfg": ...}, resources, "<run_dir>/annotate")

Resume: the output directory is a set of Parquet shards (one per block of at most
SHARD_BATCHES actor batches). A rerun reads the row_ids already written, drops those rows from
the input and appends the rest, so after any number of interruptions every input row is in the
output once (rows are keyed by row_id). A shard cut short by a crash is unreadable and deleted
before the rerun. `_COMPLETE.json` marks a
finished stage; a complete stage is skipped.

Counting: every input row comes out either with a result or with an `error` reason; the stage's
counts (in / ok / errored) are checked and kept in `_COMPLETE.json`. More errored rows than
`errors.max_error_fraction` fails the stage after its output is written (so it can be inspected).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.parquet as pq

from lambert_ray.config import ResourcesConfig
from lambert_ray.data import exclude_ids

log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE.json"
# Rows per output shard, in actor batches: what a crash can cost is the shards in flight, so a
# shard must stay small even when the input arrives as one big block (e.g. a sorted sample).
SHARD_BATCHES = 8


class ErrorBudgetExceeded(RuntimeError):
    pass


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
    if not os.path.isdir(out_dir):
        return []
    return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.endswith(".parquet"))


def done_row_ids(out_dir: str) -> set[str]:
    """row_ids already written; shards left unreadable by a crash are removed."""
    ids: set[str] = set()
    for path in _shards(out_dir):
        try:
            ids.update(pq.read_table(path, columns=["row_id"]).column(0).to_pylist())
        except Exception as e:  # truncated by a kill mid-write: drop it, its rows are redone
            log.warning("removing unreadable shard %s (%s)", path, e)
            os.remove(path)
    return ids


def read_output(out_dir: str, columns: list[str] | None = None):
    """The stage output as one pandas DataFrame (for small outputs: eval, training sets)."""
    import pandas as pd

    shards = _shards(out_dir)
    if not shards:
        return pd.DataFrame(columns=columns or [])
    return pd.concat([pq.read_table(p, columns=columns).to_pandas() for p in shards],
                     ignore_index=True)


def stage_complete(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, COMPLETE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def _count_output(out_dir: str) -> tuple[int, int]:
    ok = err = 0
    for path in _shards(out_dir):
        col = pq.read_table(path, columns=["error"]).column(0)
        err += len(col) - col.null_count
        ok += col.null_count
    return ok, err


def run_pool_stage(ds, fn_cls: type, fn_kwargs: dict[str, Any], res: ResourcesConfig,
                   out_dir: str, *, max_error_fraction: float = 1.0, name: str = "stage",
                   rows_in: int | None = None) -> StageCounts:
    """Map `ds` through an actor pool of `fn_cls(**fn_kwargs)` and append results to `out_dir`."""
    import ray.data

    if (done := stage_complete(out_dir)) is not None:
        log.info("%s: complete in %s, skipped", name, out_dir)
        return StageCounts(**done["counts"])
    os.makedirs(out_dir, exist_ok=True)
    if rows_in is None:
        rows_in = ds.count()
    already = done_row_ids(out_dir)
    # Up to SHARD_BATCHES batches per block (fewer files at scale), but enough blocks that
    # every actor of the pool gets work on a small stage.
    per_block = max(1, min(SHARD_BATCHES, rows_in // (res.batch_size * res.max_actors * 4)))
    todo = exclude_ids(ds, already).repartition(target_num_rows_per_block=res.batch_size * per_block)
    if not already or len(already) < rows_in:
        todo.map_batches(
            fn_cls,
            fn_constructor_kwargs=fn_kwargs,
            batch_size=res.batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus or None,
            accelerator_type=res.accelerator_type,
            max_restarts=res.max_restarts,
            max_task_retries=res.max_task_retries,
        ).write_parquet(out_dir)
    ok, err = _count_output(out_dir)
    counts = StageCounts(rows_in=rows_in, rows_ok=ok, rows_errored=err, resumed_rows=len(already))
    if not counts.balanced:
        # Duplicate texts share a row_id (blake2b of the text), so only an id column makes
        # rows_in == ok + errored exact; say so rather than hide it.
        log.warning("%s: rows in %d != ok %d + errored %d (duplicate row_ids in the input?)",
                    name, rows_in, ok, err)
    if rows_in and err / rows_in > max_error_fraction:  # not marked complete: a rerun re-checks
        raise ErrorBudgetExceeded(
            f"{name}: {err} of {rows_in} rows errored ({err / rows_in:.1%}) > "
            f"errors.max_error_fraction={max_error_fraction:.1%}; see the 'error' column in {out_dir}")
    with open(os.path.join(out_dir, COMPLETE), "w") as f:
        json.dump({"stage": name, "counts": asdict(counts)}, f, indent=1)
    return counts
