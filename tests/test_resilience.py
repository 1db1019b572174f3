"""Nothing lost: a SIGKILLed annotation job resumes and writes each row exactly once; a BERT run
whose Ray Train worker is SIGKILLed mid-epoch finishes from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from lambert_ray.config import validate_config
from lambert_ray.stage import COMPLETE, read_output

ROOT = Path(__file__).resolve().parent.parent
N_ROWS = 120
SECRET = "hf_SECRETresumeToken9876543210"


def _readable_shards(out_dir: Path) -> list[Path]:
    """Shards that are fully written (a shard cut short by a kill has no footer)."""
    ok = []
    for p in sorted(out_dir.glob("*.parquet")) if out_dir.is_dir() else []:
        try:
            pq.read_metadata(p)
            ok.append(p)
        except Exception:
            pass
    return ok


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the job's process group, then any process left in its session (Ray's raylet,
    GCS and workers), one pid at a time."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
        left = [int(pid) for pid, sid in (line.split() for line in ps.splitlines())
                if int(sid) == proc.pid and int(pid) != os.getpid()]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


@pytest.fixture
def annotate_job(tiny_llama, tmp_path):
    """A config file for `lambert-ray annotate` over N_ROWS unique rows (id column), tiny batches."""
    ids = [f"r{i:04d}" for i in range(N_ROWS)]
    pd.DataFrame({"id": ids, "sentence": [f"review {i}: the film was {'good' if i % 2 else 'bad'}"
                                          for i in range(N_ROWS)]}).to_csv(
        tmp_path / "corpus.tsv", sep="\t", index=False)
    raw = {
        "run": {"name": "killed", "output_dir": str(tmp_path / "runs"), "num_cpus": 2},
        "data": {"data_dir": str(tmp_path), "annotate_sample": N_ROWS,
                 "corpus": {"path": "corpus.tsv", "text_column": "sentence", "id_column": "id"}},
        "labels": {"names": ["negative", "positive"]},
        "prompt": {"system": "Answer 'positive' or 'negative'.",
                   "template": "Review: {text}\nIs it positive or negative?"},
        "llm": {"model": tiny_llama, "max_length": 64, "token_budget": 256, "device": "cpu"},
        "annotate": {"batch_size": 2, "num_cpus": 0.5, "torch_threads": 1},
    }
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    return cfg_path, validate_config(raw), set(ids)


def _start(cfg_path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_TOKEN": SECRET, "LAMBERT_LOG": "INFO"}
    return subprocess.Popen([sys.executable, "-m", "lambert_ray.cli", "annotate", "--config",
                             str(cfg_path)], cwd=ROOT, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_resume_after_kill9_writes_each_row_once(annotate_job, tmp_path):
    cfg_path, cfg, ids = annotate_job
    out_dir = Path(cfg.run_dir) / "annotate"
    t0 = time.monotonic()
    proc = _start(cfg_path, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 300
        while len(_readable_shards(out_dir)) < 2:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shards written in time"
            time.sleep(0.05)
    finally:
        _kill_session(proc)
    print(f"killed after {time.monotonic() - t0:.1f}s")
    assert not (out_dir / COMPLETE).exists(), "the job finished before it could be killed"
    before = read_output(str(out_dir), ["row_id"])  # what survived the kill
    assert 0 < len(before) < N_ROWS

    rerun = subprocess.run([sys.executable, "-m", "lambert_ray.cli", "annotate", "--config",
                            str(cfg_path)], cwd=ROOT, capture_output=True, timeout=300,
                           env={**os.environ, "HF_TOKEN": SECRET}, start_new_session=True)
    print(f"rerun done after {time.monotonic() - t0:.1f}s")
    logs = (tmp_path / "first.log").read_bytes() + rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, logs.decode(errors="replace")[-3000:]

    out = read_output(str(out_dir))
    assert out["row_id"].is_unique, out["row_id"][out["row_id"].duplicated()].tolist()
    assert set(out["row_id"]) == ids and len(out) == N_ROWS
    assert out["error"].isna().all() and out["label"].notna().all()
    counts = json.loads((out_dir / COMPLETE).read_text())["counts"]
    assert counts["rows_in"] == N_ROWS == counts["rows_ok"] + counts["rows_errored"]
    assert counts["resumed_rows"] >= len(before) > 0
    assert SECRET.encode() not in logs
    assert not [p for p in Path(cfg.run_dir).rglob("*") if p.is_file()
                and SECRET.encode() in p.read_bytes()]


def make_dying_loop(events: Path, marker: Path, snapshot: Path):
    """A Ray Train loop around `lambert_ray.bert._train_loop` that, on its first attempt only, trains one batch of
    the second epoch, waits until the controller has registered epoch 0's checkpoint, and then
    SIGKILLs its own worker process. Every attempt logs what it does to `events`."""

    def loop(config: dict) -> None:
        import ray.train

        from lambert_ray import bert

        def note(line: str) -> None:
            with open(events, "a") as f:
                f.write(line + "\n")

        # The worker imports lambert_ray.bert afresh: its _train_loop is the real one (only the
        # driver's module attribute is patched to this function).
        real_loop = bert._train_loop
        assert real_loop.__qualname__ == "_train_loop"
        ckpt = ray.train.get_checkpoint()
        resumed_after = None
        if ckpt:
            with ckpt.as_directory() as d:
                resumed_after = json.load(open(os.path.join(d, "state.json")))["epoch"]
        note(f"start after={resumed_after}")
        real_epoch, calls = bert.train_epoch, []

        def epoch(model, tok, optimizer, batches, max_length, *rest):
            calls.append(1)
            note("epoch")
            if len(calls) == 2 and not marker.exists():
                it = iter(batches)
                real_epoch(model, tok, optimizer, [next(it)], max_length, *rest)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not (
                        snapshot.exists() and json.loads(snapshot.read_text()).get(
                            "latest_checkpoint_result")):
                    time.sleep(0.2)
                marker.write_text(str(os.getpid()))
                note("killed")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_epoch(model, tok, optimizer, batches, max_length, *rest)

        bert.train_epoch = epoch
        try:
            real_loop(config)
        finally:
            bert.train_epoch = real_epoch

    return loop


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_bert_run_survives_a_killed_train_worker_and_resumes_from_checkpoint(
        ray_local, tiny_bert, tmp_path, monkeypatch):
    from lambert_ray import bert

    cfg = validate_config({
        "run": {"name": "bert-kill", "output_dir": str(tmp_path / "runs")},
        "data": {"corpus": {"path": "x.tsv"}},
        "labels": {"names": ["negative", "positive"]},
        "prompt": {"template": "Review: {text}"},
        "bert": {"model": tiny_bert, "epochs": 3, "batch_size": 8, "max_length": 16,
                 "num_workers": 1, "cpus_per_worker": 0.5, "torch_threads": 1,
                 "max_failures": 1, "settings": ["llm"]},
    })
    train = pd.DataFrame({"text": [f"{w} movie {i}" for i, w in enumerate(["good", "bad"] * 16)],
                          "label": ["positive", "negative"] * 16})
    out_dir = tmp_path / "runs" / "bert-kill" / "bert" / "llm"
    events, marker = tmp_path / "events.txt", tmp_path / "killed.pid"
    snapshot = out_dir.parent / "_ray_train" / "bert-llm" / "checkpoint_manager_snapshot.json"
    monkeypatch.setattr(bert, "_train_loop",
                        make_dying_loop(events, marker, snapshot))

    metrics = bert.train_bert(cfg, train, None, str(out_dir), name="bert-llm")

    assert marker.exists(), "the worker was never killed"
    assert events.read_text().split("\n")[:-1] == [
        "start after=None", "epoch", "epoch", "killed",   # attempt 1: dies inside epoch 1
        "start after=0", "epoch", "epoch"]                # attempt 2: epochs 1, 2 from ckpt 0
    assert metrics["epoch"] == 2 and metrics["train_rows"] == len(train)
    assert (out_dir / "model.safetensors").exists() and (out_dir / "config.json").exists()
