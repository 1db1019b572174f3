"""The PEFT study's downstream check: does a better annotator make a better student?

    rows = run_downstream(cfg, outcome)     # cfg.study.downstream set; Ray initialised

At one gold budget and seed (`study.downstream`), each method's phase-2 trial at that point has
a kept adapter (its best dev epoch). Then:
1. **One pass, one base model.** Every adapter labels the same corpus sample: `annotate_adapters`
   runs an actor pool of `MultiAnnotator`s (multi_adapter.py), each holding the base model once
   with all the adapters. The sample is `corpus_rows` rows of data.corpus (else the gold pool)
   that are none of the study's gold, dev or test rows.
2. **One student per method.** `train_bert` (Ray Train) trains on that adapter's labels (hard
   targets: the argmax label, as in LlamBERT) and keeps its best epoch on the study's dev rows.
3. **Scored on the study's test rows.** These are the rows the trial's annotator accuracy was
   measured on, so the two numbers compare like with like.

Files, under <study dir>/downstream/<hash of the sample and the student's config>/:
- corpus.parquet: the sample;
- labels-<hash of the trial keys>/: the label pass, Parquet, one row per row_id and adapter;
- students/<trial key>/: each student (HF format), reused when the set of methods grows;
- downstream.json, downstream.csv: one row per method, of the last run.

Each row carries the annotator's test accuracy (the trial's) and the student's, with 95 % CIs
(Wilson). Where the sample has gold labels it also carries the labels' accuracy on the sample.
It carries the label pass's seconds too. Rerunning resumes: a finished label pass and finished
students are read back, not redone.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from lambert_ray import layout, storage
from lambert_ray.config import PipelineConfig
from lambert_ray.stats import wilson_halfwidth
from lambert_ray.study_grid import StudyRows, content_hash, task_name, trial_config

log = logging.getLogger(__name__)

DOWNSTREAM_CSV = "downstream.csv"
CSV_COLUMNS = ["task", "method", "budget", "seed", "lr", "annotator_accuracy", "annotator_ci",
               "student_accuracy", "student_ci", "label_accuracy", "n_labelled", "n_errors",
               "n_test", "student_epoch", "student_s"]


def chosen_trials(cfg: PipelineConfig, records: list[dict[str, Any]]) -> dict[str, dict]:
    """{method: its finished phase-2 record at the downstream budget and seed}, in the order of
    study.methods. Methods without such a record (their sweep or trial unfinished) are left out."""
    st = cfg.study
    budget, seed = downstream_point(cfg)
    at = {r["method"]: r for r in records
          if r["budget"] == budget and r["seed"] == seed and r.get("test_accuracy") is not None}
    return {m: at[m] for m in st.methods if m in at}


def downstream_point(cfg: PipelineConfig) -> tuple[int, int]:
    """The (budget, seed) whose adapters label: study.downstream's, else the smallest budget
    and the first seed."""
    st = cfg.study
    d = st.downstream
    budget = d.budget if d and d.budget is not None else st.budgets[0]
    seed = d.seed if d and d.seed is not None else st.seeds[0]
    return budget, seed


def downstream_dir(cfg: PipelineConfig, rows: StudyRows) -> str:
    """Named by what decides the sample and the students: the study's rows, the sample's size,
    seed and source, and the student's config."""
    d = cfg.study.downstream
    blob = {"rows": rows.fingerprint(),
            "n": d.corpus_rows, "seed": d.sample_seed,
            "corpus": (cfg.data.corpus or cfg.data.gold_train).model_dump(mode="json"),
            "bert": cfg.bert.model_dump(mode="json", exclude={"num_workers", "cpus_per_worker",
                                                              "torch_threads", "use_gpu",
                                                              "accelerator_type", "device",
                                                              "max_failures"})}
    return storage.join(layout.study_dir(cfg), "downstream", content_hash(blob)[:10])


def labels_dir(out: str, trials: dict[str, dict]) -> str:
    return storage.join(out, "labels-" + content_hash(sorted(r["key"] for r in trials.values()))[:10])


def sample_corpus(cfg: PipelineConfig, rows: StudyRows) -> pd.DataFrame:
    """`corpus_rows` rows of data.corpus (else data.gold_train), seeded, none of them a study
    gold (any seed), dev or test row: the students never train on what they are scored on."""
    from lambert_ray.data import exclude_ids, read_source, sample

    d = cfg.study.downstream
    field = "corpus" if cfg.data.corpus is not None else "gold_train"
    ds = read_source(cfg, field)
    if ds is None:
        raise ValueError("study.downstream: needs data.corpus or data.gold_train")
    held = set(rows.dev["row_id"]) | set(rows.test["row_id"])
    for g in rows.gold.values():
        held |= set(g["row_id"])
    ds = exclude_ids(ds, held)
    return sample(ds, d.corpus_rows, d.sample_seed).to_pandas()


def label_pass(cfg: PipelineConfig, trials: dict[str, dict], corpus: pd.DataFrame,
               out: str) -> dict[str, Any]:
    """Every chosen adapter labels `corpus` in one pass (`annotate_adapters`, which skips a
    finished pass); returns the pass's rows, seconds and adapters, from its `_COMPLETE.json`."""
    import ray.data

    from lambert_ray.annotate import annotate_adapters
    from lambert_ray.stage import stage_complete

    study = layout.study_dir(cfg)
    method = next(iter(trials))  # llm fields every trial shares (prompt-length cap included)
    tcfg = trial_config(cfg, {"method": method, "lr": 1.0, "seed": 0})
    adapters = {m: layout.study_adapter(study, r["key"]) for m, r in trials.items()}
    acfg = tcfg.model_copy(update={"llm": tcfg.llm.model_copy(update={"adapter": None,
                                                                      "adapters": adapters})})
    annotate_adapters(acfg, ray.data.from_pandas(corpus), out, name="downstream_labels",
                      rows_in=len(corpus))
    done = stage_complete(out)
    return {"rows": len(corpus), "seconds": done["timing"]["seconds"],
            "adapters": list(done["counts"])}


def _student(cfg: PipelineConfig, labelled: pd.DataFrame, rows: StudyRows, out: str,
             name: str) -> dict[str, Any]:
    """A student on one adapter's clean labels (hard targets), best dev epoch kept, scored on
    the study's test rows (in this process: a few hundred rows)."""
    from lambert_ray.bert import load_classifier, predict_proba, train_bert

    ok = labelled[labelled["error"].isna()]
    train = pd.DataFrame({"text": ok["text"].values, "label": ok["label"].values})
    metrics = train_bert(cfg, train, rows.dev, out, name=name)
    labels = cfg.labels.names
    model, tok = load_classifier(storage.local_dir(out), labels, cfg.bert.trust_remote_code)
    test = rows.pairs("test")
    probs = predict_proba(model, tok, [t for t, _ in test], cfg.bert.max_length)
    acc = float((probs.argmax(1) == [y for _, y in test]).mean()) if test else float("nan")
    return {"student_accuracy": acc, "n_test": len(test), "student_epoch": metrics.get("kept_epoch"),
            "student_s": round(metrics.get("wall_s", 0.0), 1)}


def run_downstream(cfg: PipelineConfig, rows: StudyRows,
                   records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The check (module docstring); writes downstream.json / .csv in its dir and returns the
    rows. Raises when no method has a finished trial at the downstream point."""
    from lambert_ray.stage import read_output

    if cfg.study.downstream is None:
        raise ValueError("study.downstream is not set")
    trials = chosen_trials(cfg, records)
    budget, seed = downstream_point(cfg)
    if not trials:
        raise ValueError(f"study.downstream: no method has a finished phase-2 trial at budget "
                         f"{budget}, seed {seed}: run phase 2 first")
    out = downstream_dir(cfg, rows)
    corpus_path = storage.join(out, "corpus.parquet")
    if storage.exists(corpus_path):
        corpus = storage.read_parquet(corpus_path).to_pandas()
    else:
        corpus = sample_corpus(cfg, rows)
        storage.write_parquet(corpus, corpus_path)
    labelled_dir = labels_dir(out, trials)
    passed = label_pass(cfg, trials, corpus, labelled_dir)
    log.info("downstream: %d rows x %d adapters labelled in one pass (%.0f s)", len(corpus),
             len(trials), passed["seconds"])
    by_adapter = dict(tuple(read_output(labelled_dir).groupby("adapter")))  # one read
    result = []
    for m, rec in trials.items():
        labelled = by_adapter[m].drop(columns="adapter").reset_index(drop=True)
        clean = labelled[labelled["error"].isna()]
        with_gold = clean[clean["gold"].isin(cfg.labels.names)] if "gold" in clean else clean[:0]
        label_acc = (float((with_gold["label"] == with_gold["gold"]).mean())
                     if len(with_gold) else None)
        s = _student(cfg, labelled, rows, storage.join(out, "students", rec["key"]),
                     name=f"downstream-{rec['key']}")  # a new trial of m: a new student
        n_test = rec.get("n_test") or s["n_test"]
        result.append({
            "task": task_name(cfg), "method": m, "budget": budget, "seed": seed, "lr": rec["lr"],
            "annotator_accuracy": rec["test_accuracy"],
            "annotator_ci": round(wilson_halfwidth(rec["test_accuracy"], n_test), 4),
            "student_accuracy": round(s["student_accuracy"], 4),
            "student_ci": round(wilson_halfwidth(s["student_accuracy"], s["n_test"]), 4),
            "label_accuracy": None if label_acc is None else round(label_acc, 4),
            "n_labelled": len(clean), "n_errors": len(labelled) - len(clean),
            "n_test": s["n_test"], "student_epoch": s["student_epoch"],
            "student_s": s["student_s"]})
    summary = {"dir": out, "labels": labelled_dir, "trials": sorted(r["key"] for r in trials.values()),
               "label_pass": passed, "rows": result}
    storage.write_json(storage.join(out, "downstream.json"), summary)
    storage.write_text(storage.join(out, DOWNSTREAM_CSV),
                       pd.DataFrame(result, columns=CSV_COLUMNS).to_csv(index=False))
    return result


def finished_downstream(cfg: PipelineConfig, rows: StudyRows,
                        records: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The rows of a finished downstream check for these trials (no Ray), or None."""
    if cfg.study.downstream is None:
        return None
    trials = chosen_trials(cfg, records)
    if not trials:
        return None
    path = storage.join(downstream_dir(cfg, rows), "downstream.json")
    if not storage.exists(path):
        return None
    done = storage.read_json(path)
    return done["rows"] if done.get("trials") == sorted(r["key"] for r in trials.values()) else None
