"""Ray Tune over all six PEFT methods on the tiny random Llama: one experiment, interrupted (the
driver's SIGUSR1, Tune's own "stop and save" signal) after some trials finish, then restored.
Every assertion reads that one experiment (module fixture), to pay Tune's start-up cost once.
The experiment, its Train runs, the results and the chosen adapter live in an `s3://` bucket (a
local S3 API, conftest.s3_endpoint), as on a cluster; every read below goes through `storage`."""

from __future__ import annotations

import os
import signal
from collections import Counter

import numpy as np
import pytest
from conftest import S3_BUCKET
from peft_tiny import GOLD, tiny_config

from lambert_ray import storage
from lambert_ray.annotator import Annotator
from lambert_ray.config import validate_config
from lambert_ray.peft_methods import METHODS
from lambert_ray.tune import run_tune
from lambert_ray.tune_report import PLOTS

pytestmark = [pytest.mark.ray]

EPOCHS = 2
INTERRUPT_AFTER = 3  # trials finished before the driver is "killed"


def _tune_cfg(model_path: str, storage: str):
    cfg = tiny_config(model_path, "lora", epochs=EPOCHS, batch_size=4, cpus_per_worker=0.5)
    raw = cfg.model_dump(mode="json")
    raw["tune"] = {"methods": {m: {} for m in METHODS}, "seeds": [0], "epochs": EPOCHS,
                   "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": 2,
                   "storage_path": storage, "name": "six_methods"}
    return validate_config(raw)


@pytest.fixture(scope="module")
def tuned(ray_local, tiny_llama, tmp_path_factory):
    from ray import tune

    tmp = tmp_path_factory.mktemp("tune")
    cfg = _tune_cfg(tiny_llama, f"s3://{S3_BUCKET}/{tmp.name}/tune")
    start_log = tmp / "starts.log"

    def on_trial_start(point: dict) -> None:  # which trials each fit started (in the trial)
        with open(start_log, "a") as f:
            f.write(f"{point['config_id']}|seed={point['seed']}\n")

    class InterruptAfter(tune.Callback):
        """Sends the driver SIGUSR1 once INTERRUPT_AFTER trials are done: Tune saves the
        experiment state and returns with the remaining trials unfinished."""

        def __init__(self) -> None:
            self.done: list[str] = []
            self.marker = tmp / "interrupted"  # Tuner.restore unpickles this callback: fire once

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done.append(trial.config["point"]["config_id"])
            if len(self.done) == INTERRUPT_AFTER and not self.marker.exists():
                self.marker.touch()
                os.kill(os.getpid(), signal.SIGUSR1)

    interrupt = InterruptAfter()
    first = run_tune(cfg, GOLD, GOLD, tune_callbacks=[interrupt], on_trial_start=on_trial_start,
                     write_report=False)
    starts_before = Counter(start_log.read_text().split())
    # same name: Tuner.restore
    outcome = run_tune(cfg, GOLD, GOLD, on_trial_start=on_trial_start)
    starts = Counter(start_log.read_text().split())
    return cfg, first, outcome, interrupt.done, starts_before, starts


def _key(t: dict) -> str:
    return f"{t['config_id']}|seed={t['seed']}"


@pytest.mark.timeout(600)
def test_interrupted_experiment_leaves_trials_unfinished(tuned):
    _, first, _, done, starts_before, _ = tuned
    assert len(done) == INTERRUPT_AFTER
    # the interruption happened before every trial had run: restore has work left to do
    assert len(starts_before) < len(METHODS), starts_before
    assert any(t["status"] == "not_run" for t in first.trials), [t["status"] for t in first.trials]


@pytest.mark.timeout(600)
def test_restore_finishes_every_method_without_rerunning_finished_trials(tuned):
    _, _, outcome, done, _, starts = tuned
    assert sorted(t["method"] for t in outcome.trials) == sorted(METHODS)
    assert [t for t in outcome.trials if t["status"] == "errored"] == []
    for config_id in done:
        assert starts[f"{config_id}|seed=0"] == 1, (config_id, starts)
    assert set(starts) == {_key(t) for t in outcome.trials}


@pytest.mark.timeout(600)
def test_asha_stops_a_weak_trial_after_the_grace_epoch(tuned):
    _, _, outcome, _, _, _ = tuned
    stopped = [t for t in outcome.trials if t["status"] == "stopped_early"]
    assert stopped, [(t["config_id"], t["status"], t["dev_accuracy"]) for t in outcome.trials]
    for t in stopped:  # ASHA decided after epoch 1 (the actors may finish one more before dying)
        assert t["epochs_reported"] == 1 and 1 <= len(t["history"]) <= EPOCHS
    finished = [t for t in outcome.trials if t["status"] == "finished"]
    assert finished and all(len(t["history"]) == EPOCHS for t in finished)
    assert sum(r["stopped_early"] for r in outcome.methods) == len(stopped)


@pytest.mark.timeout(600)
def test_results_table_json_csv_and_plots_are_written(tuned):
    _, _, outcome, _, _, _ = tuned
    out = outcome.results_dir
    assert out.startswith("s3://")
    md = storage.read_text(storage.join(out, "tune_results.md"))
    for m in METHODS:
        assert f"| {m} |" in md
    assert "Chosen annotator" in md and "Rule:" in md
    data = storage.read_json(storage.join(out, "tune_results.json"))
    assert {r["method"] for r in data["methods"]} == set(METHODS)
    for r in data["methods"]:
        assert r["trainable_params"] > 0 and r["adapter_mb"] > 0 and r["train_time_s"] > 0
        assert 0 <= r["mean_dev_accuracy"] <= 1 and r["std_dev_accuracy"] == 0.0  # one seed
    csv_lines = storage.read_text(storage.join(out, "tune_results.csv")).strip().splitlines()
    assert len(csv_lines) == 1 + len(METHODS)
    for name in PLOTS:
        assert storage.read_bytes(storage.join(out, name))[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.timeout(600)
def test_chosen_adapter_is_a_finished_best_trial_and_serves_its_dev_accuracy(tuned):
    cfg, _, outcome, _, _, _ = tuned
    choice = outcome.choice
    finished = [t for t in outcome.trials if t["status"] == "finished"]
    assert choice["complete"]
    assert choice["dev_accuracy"] == max(t["dev_accuracy"] for t in finished)
    meta = storage.read_json(storage.join(outcome.adapter_dir, "metadata.json"))
    assert meta["method"] == choice["method"]
    llm = cfg.llm.model_copy(update={"adapter": outcome.adapter_dir})
    pred = Annotator.from_config(cfg.model_copy(update={"llm": llm})).score(
        [t for t, _ in GOLD])["label_id"]
    acc = float(np.mean([p == y for p, (_, y) in zip(pred, GOLD, strict=True)]))
    assert acc == pytest.approx(choice["dev_accuracy"])
