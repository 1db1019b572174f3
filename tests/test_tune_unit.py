"""The Tune search space and the selection rule, without Ray (synthetic trial records)."""

from __future__ import annotations

import pytest

from lambert_ray.config import ConfigError, validate_config
from lambert_ray.tune import trial_config, trial_points
from lambert_ray.tune_report import choose, summarise, to_markdown

BASE = {
    "data": {"corpus": {"path": "x.tsv"}},
    "labels": {"names": ["negative", "positive"]},
    "prompt": {"template": "Review: {text}"},
    "peft": {"epochs": 3},
}


def _cfg(tune: dict, **peft):
    return validate_config({**BASE, "peft": {**BASE["peft"], **peft}, "tune": tune})


def test_grid_is_methods_times_lrs_times_params_times_seeds():
    cfg = _cfg({"methods": {"lora": {"lr": [1e-4, 1e-3], "params": {"r": [4, 8]}},
                            "ia3": {}}, "seeds": [0, 1, 2]})
    points = trial_points(cfg)
    assert len(points) == (2 * 2 + 1) * 3
    assert {p["config_id"] for p in points if p["method"] == "lora"} == {
        "lora[lr=0.0001,r=4]", "lora[lr=0.0001,r=8]", "lora[lr=0.001,r=4]", "lora[lr=0.001,r=8]"}
    tc = trial_config(cfg, next(p for p in points if p["config_id"] == "lora[lr=0.001,r=8]"
                                and p["seed"] == 2))
    assert (tc.peft.method, tc.peft.lora.r, tc.peft.lr, tc.peft.seed) == ("lora", 8, 1e-3, 2)


def test_loguniform_lr_draws_are_shared_by_seeds_and_reproducible():
    tune = {"methods": {"dora": {"lr_loguniform": [1e-5, 1e-2]}}, "seeds": [0, 1],
            "num_samples": 3, "search_seed": 7}
    points = trial_points(_cfg(tune))
    by_seed = {s: [p["lr"] for p in points if p["seed"] == s] for s in (0, 1)}
    assert by_seed[0] == by_seed[1] and len(set(by_seed[0])) == 3
    assert all(1e-5 <= lr <= 1e-2 for lr in by_seed[0])
    assert [p["lr"] for p in trial_points(_cfg(tune))] == [p["lr"] for p in points]


def test_tune_epochs_and_worker_overrides_reach_the_trial_config():
    cfg = _cfg({"methods": {"lora": {}}, "epochs": 5, "num_workers": 2, "cpus_per_worker": 0.5},
               lr=0.02)
    tc = trial_config(cfg, trial_points(cfg)[0])
    assert (tc.peft.epochs, tc.peft.num_workers, tc.peft.cpus_per_worker) == (5, 2, 0.5)
    assert tc.peft.lr == 0.02  # no lr in the space: peft.lr (or the method default) is used


def test_unknown_hyperparameter_fails_before_ray_starts():
    cfg = _cfg({"methods": {"lora": {"params": {"rank": [4]}}}})
    with pytest.raises(ConfigError, match=r"lora\[lr=default,rank=4\]"):
        trial_points(cfg)


def test_unknown_method_in_the_search_space_is_a_config_error():
    with pytest.raises(ConfigError, match="tune.methods"):
        _cfg({"methods": {"lora": {}, "adapterdrop": {}}})


def _trial(config_id, seed, acc, *, status="finished", params=100, mb=0.1, f1=None):
    return {"config_id": config_id, "method": config_id.split("[")[0], "seed": seed, "lr": 1e-3,
            "params": {}, "status": status, "epochs_run": 2 if status == "finished" else 1,
            "dev_accuracy": acc, "dev_macro_f1": f1 if f1 is not None else acc,
            "dev_before_accuracy": 0.5, "train_loss": 0.3, "history": [],
            "trainable_params": params, "adapter_mb": mb, "train_time_s": 10.0,
            "peak_memory_mb": 500.0, "checkpoint_path": f"/ckpt/{config_id}/{seed}", "error": None}


def test_choice_is_the_best_mean_over_seeds_not_the_best_single_trial():
    trials = [_trial("lora[a]", 0, 0.95), _trial("lora[a]", 1, 0.70),
              _trial("ia3[b]", 0, 0.85), _trial("ia3[b]", 1, 0.86)]
    c = choose(trials, "dev_accuracy")
    assert (c["config_id"], c["seed"]) == ("ia3[b]", 1)
    assert c["mean_metric"] == pytest.approx(0.855)


def test_tied_means_go_to_the_method_with_fewer_trainable_params():
    trials = [_trial("lora[a]", 0, 0.9, params=5000), _trial("prompt_tuning[b]", 0, 0.9, params=80)]
    assert choose(trials, "dev_accuracy")["method"] == "prompt_tuning"
    near = [_trial("lora[a]", 0, 0.91, params=5000), _trial("ia3[b]", 0, 0.90, params=80)]
    assert choose(near, "dev_accuracy")["method"] == "lora"
    assert choose(near, "dev_accuracy", tol=0.02)["method"] == "ia3"


def test_configs_with_a_stopped_or_errored_seed_are_not_chosen_while_complete_ones_exist():
    trials = [_trial("lora[a]", 0, 0.99, status="stopped_early"), _trial("lora[a]", 1, 0.99),
              _trial("dora[b]", 0, None, status="errored"), _trial("ia3[c]", 0, 0.6)]
    assert choose(trials, "dev_accuracy")["config_id"] == "ia3[c]"
    assert choose([_trial("dora[b]", 0, None, status="errored")], "dev_accuracy") is None


def test_method_rows_report_mean_std_over_seeds_and_trial_counts():
    trials = [_trial("lora[a]", 0, 0.8), _trial("lora[a]", 1, 0.9), _trial("lora[b]", 0, 0.5,
              status="stopped_early"), _trial("ia3[c]", 0, None, status="errored")]
    rows = {r["method"]: r for r in summarise(trials, "dev_accuracy")}
    lora = rows["lora"]
    assert lora["best_config"] == "lora[a]"
    assert lora["mean_dev_accuracy"] == pytest.approx(0.85)
    assert lora["std_dev_accuracy"] == pytest.approx(0.0707, abs=1e-4)  # sample std, 2 seeds
    assert (lora["trials"], lora["stopped_early"], lora["errored"]) == (3, 1, 0)
    assert lora["best_trial_dev_accuracy"] == 0.9
    assert (rows["ia3"]["errored"], rows["ia3"].get("best_config")) == (1, None)
    md = to_markdown(list(rows.values()), choose(trials, "dev_accuracy"), "dev_accuracy")
    assert "| lora | lora[a] | 85.0% ± 7.1% |" in md and "| ia3 | — |" in md


def test_run_report_shows_the_comparison_the_choice_and_writes_plots(tmp_path):
    from lambert_ray.layout import tune_dir
    from lambert_ray.report import build_report
    from lambert_ray.tune_report import PLOTS, write_results

    raw = {**BASE, "run": {"name": "r", "output_dir": str(tmp_path)},
           "peft": {"enabled": True, "method": "lora"},
           "tune": {"enabled": True, "methods": {"lora": {}, "ia3": {}}}}
    cfg = validate_config(raw)
    trials = [_trial("lora[lr=default]", 0, 0.7), _trial("ia3[lr=default]", 0, 0.8)]
    for t in trials:
        t["history"] = [{"epoch": 1, "dev_accuracy": 0.6}, {"epoch": 2, "dev_accuracy": t["dev_accuracy"]}]
    results = tune_dir(cfg) + "/results"
    write_results(trials, cfg.tune, results)
    for name in PLOTS:
        assert (tmp_path / "r" / "tune" / "results" / name).stat().st_size > 1000
    build_report(cfg)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## PEFT comparison (Ray Tune, gold dev)" in md
    assert "**Chosen annotator:** `ia3[lr=default]` seed 0" in md


def test_peft_stage_with_tune_enabled_serves_the_tune_choice_not_peft_method(monkeypatch, tmp_path):
    import pandas as pd

    import lambert_ray.data as data
    import lambert_ray.pipeline as pipeline

    frame = pd.DataFrame({"row_id": ["a", "b"], "text": ["good", "bad"],
                          "label": ["positive", "negative"], "error": [None, None]})
    monkeypatch.setattr(data, "gold_train", lambda cfg: frame)
    monkeypatch.setattr(data, "gold_frame", lambda cfg, field, limit=None: frame)
    seen = {}

    def fake_tune_stage(cfg, train, dev):
        seen["gold"] = (train, dev)
        return "/tune/best_adapter", {"dev_before": {"accuracy": 0.5}, "dev_after": {"accuracy": 0.9}}

    def no_single_method_training(*a, **k):
        raise AssertionError("train_peft must not run when tune.enabled")

    monkeypatch.setattr(pipeline, "tune_stage", fake_tune_stage)
    monkeypatch.setattr(pipeline, "train_peft", no_single_method_training)
    raw = {**BASE, "run": {"name": "r", "output_dir": str(tmp_path)},
           "peft": {"enabled": True, "method": "lora"}, "tune": {"enabled": True}}
    out = pipeline.run_peft_stage(validate_config(raw), reannotate=False)
    assert out["adapter"] == "/tune/best_adapter" and out["dev_after"] == {"accuracy": 0.9}
    assert seen["gold"] == ([("good", 1), ("bad", 0)], [("good", 1), ("bad", 0)])
