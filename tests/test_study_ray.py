"""The PEFT study's smoke path under Ray Tune, on the tiny random Llama: phase 1 (an lr sweep for
one method) and phase 2 (2 methods x 2 budgets x 2 seeds), then the same study again, which must
train nothing. One module fixture runs it, to pay Tune's start-up once."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from peft_tiny import NEG, POS, tiny_config

from lambert_ray import layout, storage
from lambert_ray.annotator import Annotator
from lambert_ray.config import validate_config
from lambert_ray.study import run_study
from lambert_ray.study_report import PLOTS, load_preds, write_report

pytestmark = [pytest.mark.ray]

EPOCHS = 2


def _tsv(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return str(path)


def _study_cfg(model_path: str, tmp):
    pool = [(f"{t} {i}", 1) for i in range(6) for t in POS[:3]] + \
        [(f"{t} {i}", 0) for i in range(6) for t in NEG[:3]]
    dev = [(t, 1) for t in POS[3:7]] + [(t, 0) for t in NEG[3:7]]
    test = [(f"{t} indeed", 1) for t in POS[:5]] + [(f"{t} indeed", 0) for t in NEG[:5]]
    raw = tiny_config(model_path, "lora", epochs=EPOCHS, batch_size=4,
                      cpus_per_worker=0.5).model_dump(mode="json")
    src = {"text_column": "sentence", "label_column": "label"}
    raw["data"] = {"data_dir": str(tmp), "corpus": {"path": _tsv(tmp / "pool.tsv", pool), **src},
                   "gold_train": {"path": str(tmp / "pool.tsv"), **src},
                   "gold_dev": {"path": _tsv(tmp / "dev.tsv", dev), **src},
                   "gold_test": {"path": _tsv(tmp / "test.tsv", test), **src},
                   "label_values": [0, 1]}
    raw["study"] = {"task": "tiny", "methods": {"lora": {"lr": [1e-3, 3e-2]}, "ia3": {"lr": [3e-2]}},
                    "select_budget": 8, "select_seeds": [0], "budgets": [4, 8], "seeds": [0, 1],
                    "epochs": EPOCHS, "dev_rows": None, "storage_path": str(tmp / "study"),
                    "max_concurrent_trials": 2, "cpus_per_worker": 0.5}
    return validate_config(raw)


@pytest.fixture(scope="module")
def studied(ray_local, tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    cfg = _study_cfg(tiny_llama, tmp)
    log = tmp / "trainings.log"

    def on_train_start(point: dict) -> None:  # in the trial: which trials trained
        with open(log, "a") as f:
            f.write(point["key"] + "\n")

    t0 = time.perf_counter()
    first = run_study(cfg, on_train_start=on_train_start)
    first_s = time.perf_counter() - t0
    trained_first = Counter(log.read_text().split())
    again = run_study(cfg, on_train_start=on_train_start)  # restores both phases: trains nothing
    trained = Counter(log.read_text().split())
    return cfg, first, again, trained_first, trained, first_s, tmp


@pytest.mark.timeout(900)
def test_phase1_picks_the_lr_on_dev_and_phase2_reuses_its_trial(studied):
    cfg, first, _, trained_first, _, first_s, _ = studied
    s = first.summary
    sweep = {x["lr"]: x["dev_accuracy"] for x in s["lrs"]["lora"]["sweep"]}
    assert set(sweep) == {1e-3, 3e-2} and s["lrs"]["lora"]["lr"] == max(
        sweep, key=lambda lr: (sweep[lr], -lr))
    assert s["lrs"]["ia3"]["swept"] is False and len(s["phase1"]) == 2 and len(s["phase2"]) == 8
    reused = set(s["phase1"]) & set(s["phase2"])
    assert len(reused) == 1  # lora at its lr, select_budget, seed 0
    assert set(trained_first) == set(s["phase1"]) | set(s["phase2"])
    assert all(n == 1 for n in trained_first.values()), trained_first
    assert s["errors"] == {} and len(first.records) == 9
    print(f"study smoke: {first_s:.0f}s for {len(trained_first)} trainings")


@pytest.mark.timeout(900)
def test_every_trial_keeps_its_best_dev_epoch_and_is_scored_on_test(studied):
    cfg, first, _, _, _, _, _ = studied
    dev = [(f"{t}", 1) for t in POS[3:7]] + [(t, 0) for t in NEG[3:7]]
    phase2 = set(first.summary["phase2"])
    for r in first.records:
        assert len(r["dev_by_epoch"]) == EPOCHS and r["epochs"] == EPOCHS
        assert r["dev_accuracy"] == max(r["dev_by_epoch"])
        assert r["dev_by_epoch"].index(r["dev_accuracy"]) + 1 == r["best_epoch"]
        assert r["n_dev"] == 8 and r["trainable_params"] > 0
        assert r["train_s"] > 0 and r["adapter_mb"] > 0
        if r["key"] not in phase2:  # the sweep's losing lr: never scored on test
            assert r["test_accuracy"] is None
            assert not load_preds(first.study_dir, [r["key"]])
            continue
        assert r["n_test"] == 10 and r["test_eval_s"] > 0
        preds = load_preds(first.study_dir, [r["key"]])[r["key"]]
        assert len(preds) == 10
        assert float(np.mean(preds["pred"] == preds["label_id"])) == pytest.approx(r["test_accuracy"])
    # the published adapter is the kept epoch's: it scores the record's dev accuracy
    r = next(r for r in first.records if r["best_epoch"] < EPOCHS) if any(
        r["best_epoch"] < EPOCHS for r in first.records) else first.records[0]
    llm = cfg.llm.model_copy(update={"adapter": layout.study_adapter(first.study_dir, r["key"])})
    pred = Annotator.from_config(cfg.model_copy(update={"llm": llm})).score(
        [t for t, _ in dev])["label_id"]
    acc = float(np.mean([p == y for p, (_, y) in zip(pred, dev, strict=True)]))
    assert acc == pytest.approx(r["dev_accuracy"])
    # finished trials leave no Train checkpoints behind (the kept adapter is the result)
    assert storage.list_dir(storage.join(first.study_dir, "train_runs")) == []


@pytest.mark.timeout(900)
def test_rerunning_restores_and_trains_nothing_and_the_report_is_written(studied):
    _, first, again, trained_first, trained, _, tmp = studied
    assert trained == trained_first
    assert [r["key"] for r in again.records] == [r["key"] for r in first.records]
    assert len(storage.list_dir(storage.join(first.study_dir, "tune"))) == 2  # one per phase
    out = tmp / "report"
    data = write_report([{"summary": again.summary, "records": again.records,
                          "preds": load_preds(again.study_dir, [r["key"] for r in again.records])}],
                        str(out))
    assert {(c["method"], c["budget"]) for c in data["tasks"][0]["curves"]} == {
        (m, b) for m in ("lora", "ia3") for b in (4, 8)}
    assert all(c["n_seeds"] == 2 for c in data["tasks"][0]["curves"])
    for name in PLOTS:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "| 8 |" in (out / "paired.md").read_text()


@pytest.mark.timeout(900)
def test_downstream_labels_in_one_pass_as_separate_runs_and_trains_a_student_per_method(
        studied, tiny_bert):
    """The downstream check on the finished study: both adapters (LoRA and IA3: two peft groups
    on one base) label a corpus sample in one Ray Data pass; the labels equal single-adapter
    runs; the sample avoids every gold, dev and test row; one student per method is scored on
    the test rows; a rerun trains nothing and the report gets its table and plot."""
    from lambert_ray.annotate import adapter_output
    from lambert_ray.study import prepare_rows
    from lambert_ray.study_downstream import (
        downstream_dir,
        finished_downstream,
        labels_dir,
        run_downstream,
    )

    cfg, first, _, _, _, _, tmp = studied
    raw = cfg.model_dump(mode="json")
    raw["study"]["downstream"] = {"budget": 4, "seed": 1, "corpus_rows": 12}
    raw["bert"] = {**raw["bert"], "model": tiny_bert, "epochs": 1, "batch_size": 4,
                   "cpus_per_worker": 0.5, "max_length": 32}
    cfg = validate_config(raw)
    rows = prepare_rows(cfg)
    assert finished_downstream(cfg, rows, first.records) is None
    down = run_downstream(cfg, rows, first.records)
    assert [r["method"] for r in down] == ["lora", "ia3"]
    chosen = {m: next(t for t in first.records if t["method"] == m and t["budget"] == 4
                      and t["seed"] == 1) for m in ("lora", "ia3")}
    out = downstream_dir(cfg, rows)
    corpus = storage.read_parquet(storage.join(out, "corpus.parquet")).to_pandas()
    held = set(rows.dev["row_id"]) | set(rows.test["row_id"]) | {
        i for g in rows.gold.values() for i in g["row_id"]}
    assert len(corpus) == 12 and not set(corpus["row_id"]) & held
    for r in down:
        trial = chosen[r["method"]]
        assert r["annotator_accuracy"] == trial["test_accuracy"]
        assert r["n_labelled"] + r["n_errors"] == 12 and r["n_test"] == 10
        assert 0 <= r["student_accuracy"] <= 1 and r["label_accuracy"] is not None
        # one pass on one base = a single-adapter run of the same adapter
        labelled = adapter_output(labels_dir(out, chosen), r["method"])
        llm = cfg.llm.model_copy(update={"adapter": layout.study_adapter(first.study_dir,
                                                                          trial["key"])})
        alone = Annotator.from_config(cfg.model_copy(update={"llm": llm})).score(
            list(labelled["text"]))
        assert list(labelled["label_id"]) == alone["label_id"]
        np.testing.assert_allclose(np.stack(labelled["probs"]), np.array(alone["probs"]),
                                   atol=1e-5)
    students = storage.join(out, "students")

    def stamps() -> dict[str, float]:  # each student's training seconds, as it recorded them
        return {k: storage.read_json(storage.join(students, k, layout.STUDENT_DONE))["wall_s"]
                for k in storage.list_dir(students) if not k.startswith("_")}

    before = stamps()
    assert set(before) == {t["key"] for t in chosen.values()}
    assert run_downstream(cfg, rows, first.records) == down  # resumed: nothing trained again
    assert stamps() == before
    assert finished_downstream(cfg, rows, first.records) == down
    data = write_report([{"summary": first.summary, "records": first.records}], str(tmp / "rep"),
                        downstream=down)
    assert data["downstream"] == down
    assert (tmp / "rep" / "student_vs_annotator.png").read_bytes()[:4] == b"\x89PNG"
    assert "| tiny | ia3 | 4 |" in (tmp / "rep" / "table.md").read_text()
