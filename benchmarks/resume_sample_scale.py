"""Sampling, resume and counting at corpus scale: time and driver peak RSS, new vs old.

    python benchmarks/resume_sample_scale.py --sizes 100000,1000000,10000000 \
        --old-max 1000000 --out results/bench_resume_sample_scale

The corpus: N rows (id column `id` = s000000000..., SST-2 train sentences repeated, with labels)
as Parquet files of at most 1M rows under --work, built once per size. Each size runs in its own
driver process (one local Ray, started before any clock); each measurement reports its wall
seconds and the driver's peak RSS while it ran (sampled every 10 ms) next to the RSS it had when
its clock started. The old methods run last, so their memory cannot inflate the new ones':

  count        read_table(corpus).count()
  sample       data.sample(read_table(corpus), 1000, total=source_rows(...)): the source's row
               count (Parquet metadata) + one hash-threshold pass + a sort of the ~1,300
               survivors (what `annotate` does)
  sample_old   the previous method: a key column on every row, sort the whole corpus, limit
  resume       classify killed at 50 %: the first N/2 rows already written as Parquet shards
               (50,000 rows each, a stand-in for the pool's output), then
               stage.remaining_rows(...).count() (the rerun's input: the Ray Data anti-join,
               forced even below stage.RESUME_SET_MAX_IDS) and
               the output count from the shards' error column (stage._count_output)
  resume_old   the previous method: every written row_id in one driver set, a per-row filter

`--old-max` skips the old methods above that size. Writes OUT.json and OUT.md.

Without Ray (`--driver-state`, for a box where Ray cannot start): only the resume state the
driver builds before the rerun's input is filtered, from the half-done shards, each in a fresh
process: `resume_state` (stage.written_rows: Parquet footers) against `resume_state_old` (every
written row_id in one Python set, as before):

    python benchmarks/resume_sample_scale.py --driver-state --sizes 100000,1000000,10000000 \
        --out results/bench_resume_state
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SEED = 0
SAMPLE_N = 1000
SHARD_ROWS = 50_000
PHASES = ["count", "sample", "sample_old", "resume", "resume_old"]


def build_corpus(work: Path, n: int, data_dir: Path) -> Path:
    """N rows under work/corpus_N/ (Parquet, id/sentence/label); reused when present."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = work / f"corpus_{n}"
    if (out / "_DONE").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "sst2" / "train.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    sentences = pa.array([r[0] for r in rows])
    labels = pa.array([int(r[1]) for r in rows])
    for start in range(0, n, 1_000_000):
        stop = min(n, start + 1_000_000)
        idx = pa.array([i % len(rows) for i in range(start, stop)])
        table = pa.table({"id": [f"s{i:09d}" for i in range(start, stop)],
                          "sentence": sentences.take(idx), "label": labels.take(idx)})
        pq.write_table(table, out / f"part-{start // 1_000_000:04d}.parquet")
    (out / "_DONE").touch()
    return out


def write_half_done(corpus: Path, work: Path, n: int) -> Path:
    """The first N/2 rows as classify output shards (row_id, label, error), as if killed at 50 %."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = work / f"classify_half_{n}"
    if (out / "_DONE").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    half = n // 2
    for k, start in enumerate(range(0, half, SHARD_ROWS)):
        stop = min(half, start + SHARD_ROWS)
        pq.write_table(pa.table({"row_id": [f"s{i:09d}" for i in range(start, stop)],
                                 "label": ["positive"] * (stop - start),
                                 "error": pa.nulls(stop - start, pa.string())}),
                       out / f"shard_{k:06d}.parquet")
    (out / "_DONE").touch()  # not a .parquet: the stage's readers ignore it
    return out


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class PeakRSS:
    """The process's peak RSS (MB) between start() and stop(), sampled every 10 ms."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._on = psutil.Process(), 0.0, False

    def _loop(self) -> None:
        while self._on:
            self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)
            time.sleep(0.01)

    def start(self) -> float:
        import threading

        self.peak, self._on = self.proc.memory_info().rss / 2**20, True
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self.peak

    def stop(self) -> float:
        self._on = False
        self._thread.join()
        return max(self.peak, self.proc.memory_info().rss / 2**20)


def run_phase(phase: str, n: int, work: Path, ds, cfg) -> dict:
    """One measurement in this driver (Ray already started)."""
    from lambert_ray import stage
    from lambert_ray.data import _sample_key, sample, source_rows

    out_dir = str(work / f"classify_half_{n}")
    rss = PeakRSS()
    rss0 = rss.start()
    t0 = time.perf_counter()
    extra: dict = {}
    if phase == "count":
        extra["rows"] = ds.count()
    elif phase == "sample":
        total = source_rows(cfg.data.corpus, cfg.data, "data.corpus")  # as stage_annotate
        extra["rows"] = sample(ds, SAMPLE_N, SEED, total=total).materialize().count()
    elif phase == "sample_old":
        keyed = ds.map_batches(lambda b: b.assign(_key=_sample_key(b["row_id"], SEED)),
                               batch_format="pandas")
        extra["rows"] = keyed.sort("_key").limit(SAMPLE_N).drop_columns(["_key"]).materialize().count()
    elif phase == "resume":
        stage.RESUME_SET_MAX_IDS = 0  # always the anti-join (the stage uses a set below 100k)
        done = stage.written_rows(out_dir)
        todo = stage.remaining_rows(ds, out_dir, n).count()
        t1 = time.perf_counter()
        ok, err = stage._count_output(out_dir)
        extra.update(rows=todo, written=done, output_count_s=round(time.perf_counter() - t1, 2),
                     output_rows=ok + err)
    elif phase == "resume_old":
        ids: set[str] = set()
        for path in sorted(Path(out_dir).glob("*.parquet")):
            ids.update(stage.storage.read_parquet(str(path), ["row_id"]).column(0).to_pylist())
        frozen = frozenset(ids)
        extra["rows"] = ds.filter(lambda r: r["row_id"] not in frozen).count()
        del ids, frozen
    seconds = time.perf_counter() - t0
    peak = rss.stop()
    return {"phase": phase, "n": n, "seconds": round(seconds, 2), "rss_start_mb": round(rss0),
            "peak_rss_mb": round(peak), "peak_minus_start_mb": round(peak - rss0), **extra}


def run_driver_state(phase: str, n: int, work: Path) -> dict:
    """The driver's resume state for N/2 written rows, no Ray."""
    from lambert_ray import stage

    out_dir = str(work / f"classify_half_{n}")
    rss = PeakRSS()
    rss0 = rss.start()
    t0 = time.perf_counter()
    if phase == "resume_state":
        rows = stage.written_rows(out_dir)
    else:
        ids: set[str] = set()
        for path in sorted(Path(out_dir).glob("*.parquet")):
            ids.update(stage.storage.read_parquet(str(path), ["row_id"]).column(0).to_pylist())
        rows = len(ids)
    seconds = time.perf_counter() - t0
    peak = rss.stop()
    return {"phase": phase, "n": n, "seconds": round(seconds, 2), "rss_start_mb": round(rss0),
            "peak_rss_mb": round(peak), "peak_minus_start_mb": round(peak - rss0), "rows": rows}


def run_size(phases: list[str], n: int, work: Path) -> None:
    """Child process: start Ray once, run the phases in order, print one RESULT line each."""
    import ray

    from lambert_ray.config import validate_config
    from lambert_ray.data import read_table

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = validate_config({
        "data": {"data_dir": str(work), "label_values": [0, 1],
                 "corpus": {"path": f"corpus_{n}", "text_column": "sentence",
                            "label_column": "label", "id_column": "id"}},
        "labels": {"names": ["negative", "positive"]}, "prompt": {"template": "{text}"}})
    for phase in phases:
        ds = read_table(cfg.data.corpus, cfg.data, cfg.labels, "data.corpus")
        print("RESULT " + json.dumps(run_phase(phase, n, work, ds, cfg)), flush=True)
    ray.shutdown()


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "", "| N | phase | seconds | driver RSS at start MB | driver peak RSS MB | "
             "peak - start MB | rows out | note |", "|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        note = r.get("error", "")
        if r["phase"] == "resume" and "output_count_s" in r:
            note = f"of which output count {r['output_count_s']} s ({r['output_rows']} rows)"
        lines.append(f"| {r['n']:,} | {r['phase']} | {r.get('seconds', '-')} | "
                     f"{r.get('rss_start_mb', '-')} | {r.get('peak_rss_mb', '-')} | "
                     f"{r.get('peak_minus_start_mb', '-')} | {r.get('rows', '-')} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--old-max", type=int, default=1_000_000,
                    help="run sample_old / resume_old only up to this N")
    ap.add_argument("--work", default="/tmp/lambert_scale_bench")
    ap.add_argument("--data-dir", default=os.environ.get("LAMBERT_DATA_DIR", "../shared/data"))
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per size")
    ap.add_argument("--out", default="results/bench_resume_sample_scale")
    ap.add_argument("--driver-state", action="store_true",
                    help="only the driver's resume state, no Ray (see the docstring)")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.phase and args.driver_state:  # child: one driver-state measurement
        print("RESULT " + json.dumps(run_driver_state(args.phase, args.n, work)), flush=True)
        return
    if args.phase:  # child: the phases of one size
        run_size(args.phase.split(","), args.n, work)
        return
    results = []
    if args.driver_state:
        for n in [int(s) for s in args.sizes.split(",")]:
            out_dir = work / f"classify_half_{n}"
            write_half_done(out_dir, work, n)
            for phase in ("resume_state", "resume_state_old"):
                p = subprocess.run([sys.executable, __file__, "--driver-state", "--phase", phase,
                                    "--n", str(n), "--work", str(work)],
                                   capture_output=True, text=True)
                r = [json.loads(ln[7:]) for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                results += r or [{"phase": phase, "n": n, "error": p.stderr[-200:]}]
                print(json.dumps(results[-1]), flush=True)
        args.phases = "resume_state,resume_state_old"
    for n in [] if args.driver_state else [int(s) for s in args.sizes.split(",")]:
        t0 = time.perf_counter()
        write_half_done(build_corpus(work, n, Path(args.data_dir)), work, n)
        print(f"N={n:,}: corpus + half-done shards ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        todo = [p for p in args.phases.split(",") if not (p.endswith("_old") and n > args.old_max)]
        for _attempt in range(8):  # a loaded box can time out Ray's start-up: try again
            cmd = [sys.executable, __file__, "--phase", ",".join(todo), "--n", str(n),
                   "--work", str(work)]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                stdout, err = p.stdout, (p.stderr.strip().splitlines() or ["?"])[-1][:200]
            except subprocess.TimeoutExpired as e:
                stdout, err = (e.stdout or b"").decode(), f"timed out after {args.timeout} s"
            got = [json.loads(ln[7:]) for ln in stdout.splitlines() if ln.startswith("RESULT ")]
            for r in got:
                print(json.dumps(r), flush=True)
            results += got
            todo = todo[len(got):]
            if not todo or "timed out during startup" not in err:
                break
            time.sleep(20)
        results += [{"phase": ph, "n": n, "error": err} for ph in todo]
    load = os.getloadavg()
    what = ("Driver resume state for N/2 written rows, no Ray (benchmarks/resume_sample_scale.py "
            "--driver-state)" if args.driver_state else
            f"Sampling / resume / count at scale (benchmarks/resume_sample_scale.py), local Ray "
            f"num_cpus=2, sample n = {SAMPLE_N}")
    header = (f"{what}; 2-core shared box, load average at the end {load[0]:.1f} / {load[1]:.1f} / "
              f"{load[2]:.1f} (1/5/15 min), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"header": header, "args": vars(args),
                                                    "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(results, header))
    print(markdown(results, header))


if __name__ == "__main__":
    main()
