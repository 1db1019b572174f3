"""The PEFT study without Ray: rows, trial grid, lr choice, statistics and the report, on
synthetic data and synthetic trial records."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lambert_ray.config import ConfigError, validate_config
from lambert_ray.stats import holm, mcnemar_exact, mean_ci, paired_t, t_cdf, t_quantile
from lambert_ray.study_grid import (
    best_epoch,
    choose_lrs,
    phase1_points,
    phase2_points,
    split_rows,
    study_rows,
    trial_config,
    trial_record,
    with_test_scores,
)
from lambert_ray.study_report import (
    DOWNSTREAM_PLOT,
    PLOTS,
    curve_rows,
    paired_rows,
    read_downstream,
    winner,
    write_report,
)

BASE = {
    "run": {"name": "study-test"},
    "data": {"corpus": {"path": "x.tsv"}},
    "labels": {"names": ["negative", "positive"]},
    "prompt": {"template": "Review: {text}"},
    "peft": {"lora": {"r": 4}},
}


def _cfg(**study):
    section = {"methods": {"lora": {"lr": [1e-4, 1e-3]}, "ia3": {"lr": [5e-3]}},
               "budgets": [4, 8], "seeds": [0, 1], "select_budget": 8, "dev_rows": 6, **study}
    return validate_config({**BASE, "study": section})


def _frame(n: int, prefix: str) -> pd.DataFrame:
    return pd.DataFrame({"row_id": [f"{prefix}{i}" for i in range(n)],
                         "text": [f"{prefix} text {i}" for i in range(n)],
                         "label": ["positive" if i % 2 else "negative" for i in range(n)],
                         "error": [None] * n})


# --- rows ---

def test_split_is_a_deterministic_disjoint_hash_partition_whatever_the_row_order():
    cfg = _cfg(split={"dev_fraction": 0.1, "test_fraction": 0.2})
    df = _frame(2000, "r")
    pool, dev, test = split_rows(cfg, df)
    shuffled = split_rows(cfg, df.sample(frac=1.0, random_state=3))
    for a, b in zip((pool, dev, test), shuffled, strict=True):
        assert set(a["row_id"]) == set(b["row_id"])
    ids = [set(x["row_id"]) for x in (pool, dev, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(map(len, ids)) == 2000
    assert 0.16 < len(test) / 2000 < 0.24 and 0.07 < len(dev) / 2000 < 0.13


def test_gold_rows_are_nested_over_budgets_differ_by_seed_and_never_touch_dev_or_test():
    cfg = _cfg(budgets=[4, 8, 16], seeds=[0, 1, 2])
    pool = pd.concat([_frame(200, "p"), _frame(3, "d")])  # 3 pool rows are also dev rows
    rows = study_rows(cfg, pool, _frame(20, "d"), _frame(10, "t"))
    again = study_rows(cfg, pool.sample(frac=1.0, random_state=1), _frame(20, "d"), _frame(10, "t"))
    assert rows.train(0, 16) == again.train(0, 16)  # order-free
    assert rows.train(0, 16)[:4] == rows.train(0, 4)  # nested
    assert rows.train(0, 16) != rows.train(1, 16)
    used = {r for s in rows.gold for r in rows.gold[s]["row_id"]}
    assert not used & set(rows.dev["row_id"]) and not used & set(rows.test["row_id"])
    assert len(rows.dev) == 6 and len(rows.test) == 10  # dev_rows caps dev
    assert rows.fingerprint() == again.fingerprint()
    bigger = study_rows(_cfg(budgets=[4, 8, 32], seeds=[0, 1, 2]), pool, _frame(20, "d"),
                        _frame(10, "t"))
    assert bigger.fingerprint() == rows.fingerprint()  # a larger budget keeps the trial keys
    assert bigger.train(2, 16) == rows.train(2, 16)


def test_a_pool_smaller_than_the_largest_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="largest budget"):
        study_rows(_cfg(budgets=[4, 500]), _frame(100, "p"), _frame(10, "d"), _frame(10, "t"))


# --- grid ---

def test_phase1_sweeps_only_multi_lr_methods_and_phase2_reuses_its_trials():
    cfg = _cfg()
    p1 = phase1_points(cfg, "fp")
    assert [(p["method"], p["lr"], p["budget"], p["seed"]) for p in p1] == [
        ("lora", 1e-4, 8, 0), ("lora", 1e-3, 8, 0)]
    p2 = phase2_points(cfg, {"lora": 1e-3, "ia3": 5e-3}, "fp")
    assert len(p2) == 2 * 2 * 2
    assert not any(p["score_test"] for p in p1) and all(p["score_test"] for p in p2)
    assert {p["key"] for p in p1} & {p["key"] for p in p2} == {p1[1]["key"]}
    assert phase2_points(cfg, {"ia3": 5e-3}, "fp") == [p for p in p2 if p["method"] == "ia3"]
    assert {p["key"] for p in phase2_points(cfg, {"lora": 1e-3}, "other rows")}.isdisjoint(
        p["key"] for p in p2)
    longer = _cfg(epochs=5)
    assert {p["key"] for p in phase2_points(longer, {"lora": 1e-3}, "fp")}.isdisjoint(
        p["key"] for p in p2)


def test_trial_config_applies_the_point_epochs_length_cap_and_fixed_params():
    cfg = _cfg(methods={"lora": {"lr": [1e-3], "params": {"r": 16}}}, epochs=4, max_length=64,
               cpus_per_worker=0.5)
    tc = trial_config(cfg, {"method": "lora", "lr": 1e-3, "seed": 2, "key": "k"})
    assert (tc.peft.method, tc.peft.lr, tc.peft.seed, tc.peft.epochs) == ("lora", 1e-3, 2, 4)
    assert (tc.peft.lora.r, tc.llm.max_length, tc.peft.cpus_per_worker) == (16, 64, 0.5)
    bad = _cfg(methods={"lora": {"lr": [1e-3], "params": {"rank": 16}}})
    with pytest.raises(ConfigError, match="study trial"):
        phase1_points(bad, "fp") or trial_config(bad, {"method": "lora", "lr": 1e-3, "seed": 0})


def test_unknown_study_method_is_a_config_error():
    with pytest.raises(ConfigError, match="study.methods"):
        _cfg(methods={"adapterdrop": {"lr": [1e-3]}})


def _rec(method, lr, budget, seed, dev, test=0.8, **kw):
    return {"key": f"{method}-lr{lr:g}-n{budget}-s{seed}-x", "method": method, "lr": lr,
            "budget": budget, "seed": seed, "status": "finished", "dev_accuracy": dev,
            "dev_macro_f1": dev, "test_accuracy": test, "test_macro_f1": test, "best_epoch": 1,
            "dev_by_epoch": [dev], "trainable_params": kw.get("params", 100),
            "adapter_mb": 0.1, "train_s": 10.0, "wall_s": 20.0}


def test_lr_choice_is_the_best_dev_lr_and_waits_for_the_whole_sweep():
    cfg = _cfg()
    recs = [_rec("lora", 1e-4, 8, 0, 0.70, test=0.99), _rec("lora", 1e-3, 8, 0, 0.80, test=0.5)]
    lrs = choose_lrs(cfg, recs)
    assert lrs["lora"]["lr"] == 1e-3  # dev decides, never test
    assert lrs["ia3"] == {"lr": 5e-3, "dev_accuracy": None, "sweep": [], "swept": False}
    assert "lora" not in choose_lrs(cfg, recs[:1])  # one lr of the sweep still missing


def test_the_kept_epoch_is_the_best_dev_epoch_earliest_on_ties_and_the_record_scores_test():
    history = [{"epoch": 1, "dev_accuracy": 0.8, "dev_macro_f1": 0.8, "epoch_s": 5, "train_s": 4},
               {"epoch": 2, "dev_accuracy": 0.9, "dev_macro_f1": 0.9, "epoch_s": 5, "train_s": 4},
               {"epoch": 3, "dev_accuracy": 0.9, "dev_macro_f1": 0.9, "epoch_s": 5, "train_s": 4}]
    assert best_epoch(history)["epoch"] == 2
    meta = {"history": history, "trainable_params": 10, "adapter_mb": 0.5, "wall_time_s": 30,
            "n_train": 8, "n_dev": 6, "dev_before": {"accuracy": 0.5}}
    rec = trial_record({"key": "k", "method": "lora", "score_test": False}, meta, 2)
    assert (rec["best_epoch"], rec["dev_accuracy"], rec["dev_accuracy_last"]) == (2, 0.9, 0.9)
    assert rec["test_accuracy"] is None and "score_test" not in rec  # phase 1 never reads test
    rec = with_test_scores(rec, [0, 1, 1, 0], [0, 1, 0, 0], 2, 3.0)
    assert rec["test_accuracy"] == 0.75 and rec["n_test"] == 4 and rec["test_eval_s"] == 3.0
    assert (rec["train_s"], rec["dev_eval_s"], rec["dev_by_epoch"]) == (12, 3, [0.8, 0.9, 0.9])


# --- statistics ---

def test_t_quantiles_and_tests_match_textbook_values():
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)
    assert t_quantile(0.975, 10**7) == pytest.approx(1.9600, abs=1e-4)
    assert t_cdf(2.0, 5) == pytest.approx(0.94903, abs=1e-5)
    ci = mean_ci([0.80, 0.84, 0.88])
    assert ci["mean"] == pytest.approx(0.84) and ci["half"] == pytest.approx(4.3027 * 0.04 / 3**0.5,
                                                                             rel=1e-4)
    assert mean_ci([0.9])["half"] is None
    t = paired_t([0.01, 0.02, 0.015])
    assert t["t"] == pytest.approx(5.196, abs=1e-3) and t["p"] == pytest.approx(0.0351, abs=1e-3)
    assert paired_t([0.01])["p"] is None
    assert mcnemar_exact(12, 3) == pytest.approx(2 * 576 / 2**15)  # 2 P(X <= 3), n = 15
    assert mcnemar_exact(0, 0) == 1.0
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([None, 0.02]) == [None, 0.02]


# --- the report ---

SEEDS = [0, 1, 2]


def _summary(methods, budgets, records):
    return {"task": "T", "labels": ["negative", "positive"], "model": "tiny", "n_dev": 6,
            "n_test": 200, "epochs": 3, "budgets": budgets, "seeds": SEEDS, "select_budget": 8,
            "select_seeds": [0], "max_length": 64, "methods": methods,
            "baseline": {"dev": {"accuracy": 0.5}, "test": {"accuracy": 0.55}},
            "lrs": {m: {"lr": 1e-3, "dev_accuracy": None, "sweep": [], "swept": False}
                    for m in methods},
            "phase1": [], "phase2": [r["key"] for r in records], "missing_methods": [],
            "errors": {}}


def _preds(correct: np.ndarray) -> pd.DataFrame:
    y = np.arange(len(correct)) % 2
    return pd.DataFrame({"row_id": [f"t{i}" for i in range(len(y))], "label_id": y,
                         "pred": np.where(correct, y, 1 - y)})


def _study(gap: float, noise: float, budgets=(8, 16)):
    """Methods a (better on test by `gap`), b and c; dev favours a; seed noise `noise`."""
    rng = np.random.default_rng(0)
    records, preds = [], {}
    for b in budgets:
        for s in SEEDS:
            jitter = rng.normal(0, noise)
            for m, base, params in (("a", 0.80 + gap, 100), ("b", 0.80, 50), ("c", 0.70, 10)):
                acc = float(np.clip(base + jitter + rng.normal(0, noise / 4), 0, 1))
                r = _rec(m, 1e-3, b, s, dev=base, test=acc, params=params)
                r["dev_by_epoch"] = [base - 0.05, base, base - 0.01]
                r["best_epoch"] = 2
                records.append(r)
                preds[r["key"]] = _preds(rng.random(200) < acc)
    return {"summary": _summary(["a", "b", "c"], list(budgets), records), "records": records,
            "preds": preds}


def test_curves_give_mean_and_t_interval_over_seeds_and_the_winner_is_chosen_on_dev():
    t = _study(gap=0.0, noise=0.0)
    for r in t["records"]:  # b: better on test, worse on dev
        if r["method"] == "b":
            r["test_accuracy"], r["dev_accuracy"] = 0.95, 0.79
    rows = curve_rows(t["summary"], t["records"])
    a8 = next(r for r in rows if r["method"] == "a" and r["budget"] == 8)
    assert a8["test_mean"] == pytest.approx(0.80) and a8["test_ci"] == pytest.approx(0.0)
    assert a8["complete"] and a8["n_seeds"] == 3
    assert winner(rows, 8)["method"] == "a"


def test_a_large_consistent_gap_is_significant_and_a_noisy_small_one_is_not():
    clear = paired_rows(**{k: v for k, v in _study(gap=0.08, noise=0.01).items()})
    assert {(r["budget"], r["other"]) for r in clear} == {(8, "b"), (8, "c"), (16, "b"), (16, "c")}
    assert all(r["winner"] == "a" and r["significant"] for r in clear)
    assert all(r["mcnemar_only_winner"] > r["mcnemar_only_other"] for r in clear)
    vague = paired_rows(**{k: v for k, v in _study(gap=0.005, noise=0.05).items()})
    ab = [r for r in vague if r["other"] == "b"]
    assert ab and not any(r["significant"] for r in ab)
    assert all(r["p_t_holm"] >= r["p_t"] for r in vague)


def test_a_one_row_gap_on_every_seed_is_not_significant():
    """3 identical differences give the t-test sd 0 and p 0; McNemar on the rows says one row
    per seed is noise, and the flag needs both (the real study's DoRA vs LoRA at 100 gold)."""
    t = _study(gap=0.0, noise=0.0, budgets=(8,))
    for r in t["records"]:
        base = _preds(np.arange(200) % 5 > 0)            # 160 of 200 right
        if r["method"] == "a":                           # a: one more row right on every seed
            base.loc[0, "pred"] = base.loc[0, "label_id"]
            r["test_accuracy"], r["dev_accuracy"] = 161 / 200, 0.9
        elif r["method"] == "b":
            r["test_accuracy"] = 160 / 200
        t["preds"][r["key"]] = base
    ab = next(r for r in paired_rows(**t) if r["other"] == "b")
    assert ab["winner"] == "a" and ab["p_t_holm"] < 0.05           # the t-test alone would flag it
    assert (ab["mcnemar_only_winner"], ab["mcnemar_only_other"]) == (3, 0)
    assert ab["p_mcnemar_holm"] > 0.05 and not ab["significant"]
    t["preds"] = {}                                      # no per-row predictions: the t-test decides
    assert next(r for r in paired_rows(**t) if r["other"] == "b")["significant"]


def test_an_incomplete_method_is_not_chosen_and_is_marked(tmp_path):
    t = _study(gap=0.10, noise=0.01, budgets=(8,))
    t["records"] = [r for r in t["records"] if not (r["method"] == "a" and r["seed"] == 2)]
    t["records"].append({**_rec("a", 1e-3, 8, 2, 0.99), "test_accuracy": None})  # not scored yet
    t["summary"]["phase2"].append(t["records"][-1]["key"])
    rows = curve_rows(t["summary"], t["records"])
    assert winner(rows, 8)["method"] == "b"
    write_report([t], str(tmp_path))
    md = (tmp_path / "table.md").read_text()
    assert "(n=2)" in md and "**Partial:** 8 of 10 phase-2 trials finished and scored." in md
    assert "T @ 8 gold: **b** (chosen on dev)" in md and "significantly worse on test than a" in md


def test_report_writes_tables_json_plots_and_the_downstream_plot(tmp_path):
    down = tmp_path / "downstream.csv"
    down.write_text("task,method,annotator_accuracy,student_accuracy\nT,a,0.88,0.84\nT,b,0.80,0.79\n")
    one_budget = _study(gap=0.05, noise=0.01, budgets=(8,))
    one_budget["summary"]["task"] = "U"
    data = write_report([_study(gap=0.05, noise=0.01), one_budget], str(tmp_path / "out"),
                        downstream=str(down), command="lambert-ray study -c x.yaml")
    out = tmp_path / "out"
    for name in (*PLOTS, DOWNSTREAM_PLOT):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (out / "table.md").read_text()
    assert "| a | 0.001 | **85.0% ± 0.0%**" not in md  # noisy seeds: a real interval
    assert "## T" in md and "## U" in md and "Verdict" in md and "Student vs annotator" in md
    assert "T @ 8 gold: **a** (chosen on dev)" in md
    paired = (out / "paired.md").read_text()
    assert "| 8 | a | b | 3 |" in paired
    saved = json.loads((out / "table.json").read_text())
    assert saved["verdicts"] == data["verdicts"] and len(saved["tasks"]) == 2
    assert (out / "command.txt").read_text().startswith("lambert-ray study")
    assert [r["method"] for r in read_downstream(str(down))] == ["a", "b"]


# --- the downstream check's choices (study_downstream.py; its Ray run: test_study_ray.py) ---

def test_downstream_point_must_be_a_phase2_point_and_defaults_to_the_first():
    from lambert_ray.study_downstream import downstream_point

    with pytest.raises(ConfigError, match="study.downstream.budget 5 is not in study.budgets"):
        _cfg(downstream={"budget": 5})
    with pytest.raises(ConfigError, match="study.downstream.seed 7"):
        _cfg(downstream={"seed": 7})
    assert downstream_point(_cfg(downstream={})) == (4, 0)
    assert downstream_point(_cfg(downstream={"budget": 8, "seed": 1})) == (8, 1)


def test_downstream_takes_each_methods_test_scored_trial_at_its_point_in_method_order():
    from lambert_ray.study_downstream import chosen_trials

    cfg = _cfg(downstream={"budget": 8, "seed": 1})
    recs = [_rec("ia3", 5e-3, 8, 1, 0.7), _rec("lora", 1e-3, 8, 1, 0.8),
            _rec("lora", 1e-3, 4, 1, 0.9), _rec("lora", 1e-4, 8, 0, 0.9),
            {**_rec("ia3", 5e-3, 8, 0, 0.9), "test_accuracy": None}]
    got = chosen_trials(cfg, recs)
    assert list(got) == ["lora", "ia3"]  # study.methods order, not the records'
    assert [(r["budget"], r["seed"]) for r in got.values()] == [(8, 1), (8, 1)]
    # a trial without a test score (phase 1 only) is not a downstream annotator
    assert chosen_trials(_cfg(downstream={"budget": 8, "seed": 0}), recs) == {"lora": recs[3]}


def test_wilson_interval_half_width_matches_the_formula_and_stays_inside_zero_one():
    from lambert_ray.stats import wilson_halfwidth

    # 600 rows at 88 %: about +-2.6 points; at 100 % the interval still has width
    assert wilson_halfwidth(0.88, 600) == pytest.approx(0.0259, abs=5e-4)
    assert 0 < wilson_halfwidth(1.0, 50) < 0.05 and wilson_halfwidth(0.5, 0) == 0.0


def test_the_downstream_table_shows_label_accuracy_and_intervals():
    from lambert_ray.study_report import downstream_markdown

    md = downstream_markdown([{"task": "T", "method": "ia3", "budget": 100,
                               "label_accuracy": 0.9, "annotator_accuracy": 0.88,
                               "annotator_ci": 0.026, "student_accuracy": 0.85,
                               "student_ci": 0.028},
                              {"method": "lora", "annotator_accuracy": 0.8,
                               "student_accuracy": 0.79}])
    assert "| T | ia3 | 100 | 90.0% | 88.0% ± 2.6% | 85.0% ± 2.8% |" in md
    assert "| lora |  | — | 80.0% | 79.0% |" in md
    assert "Pearson" not in md  # two rows: no correlation line
    three = downstream_markdown([{"method": m, "annotator_accuracy": a, "student_accuracy": b}
                                 for m, a, b in (("a", 0.9, 0.85), ("b", 0.8, 0.76),
                                                 ("c", 0.6, 0.55))])
    assert "Pearson r(annotator, student) = 1.00" in three and "4.7 points below" in three


def test_a_phase_left_with_unfinished_trials_stops_the_study_before_the_next(tmp_path, monkeypatch):
    """SIGINT during phase 1: Tune returns with trials neither finished nor errored. The study
    must not go on into phase 2 (once, that phase's first trial then hung with no worker)."""
    from lambert_ray import study as study_mod

    cfg = _cfg(storage_path=str(tmp_path / "study"))
    rows = study_rows(cfg, _frame(40, "p"), _frame(6, "d"), _frame(6, "t"))
    ran = []

    def fake_phase(cfg, phase, points, *a, **kw):
        ran.append(phase)
        return {}  # no record written, no error: as an interrupted Tune run leaves it

    monkeypatch.setattr(study_mod, "prepare_rows", lambda cfg: rows)
    monkeypatch.setattr(study_mod, "baseline", lambda cfg, rows: {"dev": {"accuracy": 0.5}})
    monkeypatch.setattr(study_mod, "run_phase", fake_phase)
    out = study_mod.run_study(cfg)
    assert ran == ["p1"] and out.summary["interrupted"] == "p1"
    assert study_mod.unfinished(out.study_dir, [{"key": k} for k in out.summary["phase1"]],
                                {}) == out.summary["phase1"]
    # an errored trial is an end, not an interruption
    keys = out.summary["phase1"]
    assert study_mod.unfinished(out.study_dir, [{"key": k} for k in keys],
                                {k: "boom" for k in keys}) == []
