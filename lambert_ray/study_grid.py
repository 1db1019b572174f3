"""The PEFT study's rows, trials and choices, without Ray (`study.py` runs them under Tune).

    rows = study_rows(cfg, pool_df, dev_df, test_df)      # or split_rows(cfg, one_df) first
    points = phase1_points(cfg, fp)                       # method x lr at select_budget
    lrs = choose_lrs(cfg, records)                        # per method, on dev
    points = phase2_points(cfg, lrs, fp)                  # method x budget x seed at that lr

Rows. Every draw is a hash of row_id, so the same data gives the same rows whatever its order:
dev is a fixed `study.dev_rows` sample shared by every trial, test is never seen by selection,
and seed s orders the pool by hash(s, row_id) and takes its first `budget` rows, so a seed's
100 rows are inside its 300 and its 1,000 (budgets are nested) and all methods of seed s train
on the same rows (comparisons are paired).

Trials. A trial's key names its method, lr, budget and seed plus a hash of everything else that
shapes it (model, prompt, labels, peft section, epochs, the rows); phase 2 reuses the phase-1
trial with the same key, and a finished trial (its record file) is never run again.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from lambert_ray.config import ConfigError, PipelineConfig, peft_method_names, validate_config
from lambert_ray.data import Gold, gold_pairs
from lambert_ray.metrics import confusion_matrix, metrics_from_confusion


def hash_unit(row_ids: pd.Series | list[str], salt: str) -> np.ndarray:
    """A uniform [0, 1) number per row_id, fixed by (salt, row_id) alone."""
    key = salt.encode()
    return np.array([int.from_bytes(hashlib.blake2b(f"{r}".encode(), digest_size=8,
                                                    key=key[:64]).digest(), "little") / 2**64
                     for r in row_ids], dtype=np.float64)


def _clean(df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Labelled, error-free rows, one per row_id (duplicate texts share an id)."""
    ok = df["label"].isin(labels)
    if "error" in df:
        ok &= df["error"].isna()
    return df.loc[ok, ["row_id", "text", "label"]].drop_duplicates("row_id").reset_index(drop=True)


def split_rows(cfg: PipelineConfig, df: pd.DataFrame) -> tuple[pd.DataFrame, ...]:
    """(pool, dev, test) cut from one labelled table by `study.split` (hash of row_id)."""
    sp = cfg.study.split
    df = _clean(df, cfg.labels.names)
    u = hash_unit(df["row_id"], sp.salt)
    test = u < sp.test_fraction
    dev = (u >= sp.test_fraction) & (u < sp.test_fraction + sp.dev_fraction)
    return df[~test & ~dev], df[dev], df[test]


@dataclass
class StudyRows:
    """What every trial of one task reads: per-seed gold (max budget, nested), dev and test."""

    gold: dict[int, pd.DataFrame]  # seed -> rows in draw order; a budget is the first n
    dev: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]
    pool_fp: str  # hash of the pool's row ids: with a seed, it fixes that seed's draw

    def train(self, seed: int, budget: int) -> Gold:
        return gold_pairs(self.gold[seed].head(budget), self.labels)

    def pairs(self, part: str) -> Gold:
        return gold_pairs(getattr(self, part), self.labels)

    def fingerprint(self) -> str:
        """Hash of the pool, the dev and test row ids and the labels: other rows, other trial
        keys. Raising the largest budget keeps it (a seed's first rows stay the same)."""
        parts = {"pool": self.pool_fp, "dev": list(self.dev["row_id"]),
                 "dev_y": list(self.dev["label"]), "test": list(self.test["row_id"]),
                 "labels": self.labels}
        return content_hash(parts)[:12]


def content_hash(obj: Any) -> str:
    """sha256 of `obj` as sorted JSON: what names trials, row caches and experiments."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def study_rows(cfg: PipelineConfig, pool: pd.DataFrame, dev: pd.DataFrame,
               test: pd.DataFrame) -> StudyRows:
    """Draw the study's rows (module docstring). Pool rows whose id is also a dev or test row
    are dropped, so no selection or verdict row was trained on."""
    st, labels = cfg.study, cfg.labels.names
    pool, dev, test = (_clean(d, labels) for d in (pool, dev, test))
    held_out = set(dev["row_id"]) | set(test["row_id"])
    pool = pool[~pool["row_id"].isin(held_out)].reset_index(drop=True)
    need = max(st.budgets + [st.select_budget])
    if len(pool) < need:
        raise ConfigError(f"study: the gold pool has {len(pool)} clean rows, the largest budget "
                          f"needs {need}")

    def first(df: pd.DataFrame, salt: str, n: int | None) -> pd.DataFrame:
        order = np.argsort(hash_unit(df["row_id"], salt), kind="stable")
        out = df.iloc[order].reset_index(drop=True)
        return out.head(n) if n else out

    seeds = sorted(set(st.seeds) | set(st.select_seeds))
    gold = {s: first(pool, f"gold-{s}", need) for s in seeds}
    pool_fp = content_hash(sorted(zip(pool["row_id"], pool["label"], strict=True)))[:12]
    return StudyRows(gold, first(dev, "dev", st.dev_rows), first(test, "test", st.test_rows),
                     list(labels), pool_fp)


# --- trials ---

def trial_config(cfg: PipelineConfig, point: dict[str, Any]) -> PipelineConfig:
    """The pipeline config one trial trains with: peft set to the point's method, lr, seed and
    fixed hyperparameters; the study's epochs, prompt-length cap and per-trial resources."""
    st = cfg.study
    raw = cfg.model_dump(mode="json")
    pc = raw.get("peft") or {}
    raw["peft"] = pc
    pc.update(enabled=True, method=point["method"], lr=point["lr"], seed=point["seed"],
              epochs=st.epochs, max_train=None, max_dev=None)
    pc[point["method"]] = {**pc.get(point["method"], {}), **st.methods[point["method"]].params}
    for key in ("num_workers", "cpus_per_worker", "use_gpu"):
        if getattr(st, key) is not None:
            pc[key] = getattr(st, key)
    if st.max_length:
        raw["llm"]["max_length"] = min(raw["llm"]["max_length"], st.max_length)
    raw["tune"] = None
    try:
        return validate_config(raw)
    except ConfigError as e:
        raise ConfigError(f"study trial {point.get('key', point['method'])}: {e}") from None


def _shape_hash(cfg: PipelineConfig, method: str, rows_fp: str) -> str:
    """What, besides method / lr / budget / seed, decides a trial's result."""
    tc = trial_config(cfg, {"method": method, "lr": 1.0, "seed": 0})
    pc = tc.peft.model_dump(mode="json", exclude={"lr", "seed", "enabled", "max_train", "max_dev",
                                                  "merge_adapter", "zero_shot", "max_failures"})
    pc = {k: v for k, v in pc.items() if k == method or k not in peft_method_names()}
    blob = {"peft": pc, "llm": tc.llm.model_dump(mode="json", exclude={"adapter", "merge_adapter"}),
            "prompt": tc.prompt.model_dump(mode="json"), "labels": tc.labels.model_dump(mode="json"),
            "rows": rows_fp}
    return content_hash(blob)[:8]


def _point(cfg: PipelineConfig, method: str, lr: float, budget: int, seed: int,
           shapes: dict[str, str], score_test: bool) -> dict[str, Any]:
    key = f"{method}-lr{lr:g}-n{budget}-s{seed}-{shapes[method]}"
    return {"key": key, "task": task_name(cfg), "method": method, "lr": lr, "budget": budget,
            "seed": seed, "score_test": score_test}


def task_name(cfg: PipelineConfig) -> str:
    return cfg.study.task or cfg.run.name


def _shapes(cfg: PipelineConfig, rows_fp: str) -> dict[str, str]:
    return {m: _shape_hash(cfg, m, rows_fp) for m in cfg.study.methods}


def phase1_points(cfg: PipelineConfig, rows_fp: str) -> list[dict[str, Any]]:
    """The lr sweep: every method with more than one lr, each lr, at select_budget, per select
    seed (a method with one lr needs no sweep). Dev only: its trials are not scored on test."""
    st, shapes = cfg.study, _shapes(cfg, rows_fp)
    return [_point(cfg, m, lr, st.select_budget, s, shapes, score_test=False)
            for m, space in st.methods.items() if len(space.lr) > 1
            for lr in space.lr for s in st.select_seeds]


def phase2_points(cfg: PipelineConfig, lrs: dict[str, float], rows_fp: str) -> list[dict[str, Any]]:
    """Every method at its chosen lr x budgets x seeds, each scored on test (methods without a
    chosen lr are left out: their sweep is not finished). Ordered budget, then seed, then
    method (trials run in this order): a study stopped part-way has every method at the same
    budgets and seeds so far, which is what a paired comparison needs."""
    st, shapes = cfg.study, _shapes(cfg, rows_fp)
    return [_point(cfg, m, lrs[m], b, s, shapes, score_test=True)
            for b in st.budgets for s in st.seeds for m in st.methods if m in lrs]


def choose_lrs(cfg: PipelineConfig, records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, the sweep lr with the highest mean best-epoch dev accuracy over the select
    seeds (ties: mean dev macro-F1, then the smaller lr). Only finished sweep trials count, and
    a method is decided only when every one of its sweep trials has finished; a one-lr method
    is decided by its config. Returns {method: {lr, dev_accuracy, sweep: [...]}}."""
    st = cfg.study
    out: dict[str, dict[str, Any]] = {}
    done = {(r["method"], r["lr"], r["seed"]): r for r in records
            if r.get("status") == "finished" and r["budget"] == st.select_budget}
    for m, space in st.methods.items():
        if len(space.lr) == 1:
            out[m] = {"lr": space.lr[0], "dev_accuracy": None, "sweep": [], "swept": False}
            continue
        sweep = []
        for lr in space.lr:
            rs = [done.get((m, lr, s)) for s in st.select_seeds]
            if any(r is None for r in rs):
                break
            sweep.append({"lr": lr, "dev_accuracy": statistics.fmean(r["dev_accuracy"] for r in rs),
                          "dev_macro_f1": statistics.fmean(r["dev_macro_f1"] for r in rs),
                          "n_seeds": len(rs)})
        else:
            best = max(sweep, key=lambda x: (x["dev_accuracy"], x["dev_macro_f1"], -x["lr"]))
            out[m] = {"lr": best["lr"], "dev_accuracy": best["dev_accuracy"], "sweep": sweep,
                      "swept": True}
    return out


# --- a trial's record ---

def best_epoch(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch a trial keeps: best dev accuracy, then dev macro-F1, then the earliest."""
    return max(history, key=lambda h: (h["dev_accuracy"], h.get("dev_macro_f1", 0.0), -h["epoch"]))


def trial_record(point: dict[str, Any], meta: dict[str, Any], n_labels: int) -> dict[str, Any]:
    """One trained trial as the study keeps it (`<study dir>/trials/<key>.json`): the point, dev
    accuracy per epoch, the kept (best dev) epoch's dev scores and its costs. The test scores
    are None until `with_test_scores` (phase 1 never reads test)."""
    history = meta["history"]
    kept = best_epoch(history)
    return {
        **{k: v for k, v in point.items() if k != "score_test"}, "status": "finished",
        "epochs": len(history), "best_epoch": kept["epoch"],
        "dev_accuracy": kept["dev_accuracy"], "dev_macro_f1": kept.get("dev_macro_f1"),
        "dev_accuracy_last": history[-1]["dev_accuracy"],
        "dev_by_epoch": [h["dev_accuracy"] for h in history],
        "train_loss_by_epoch": [h.get("train_loss") for h in history],
        "test_accuracy": None, "test_macro_f1": None, "n_test": None, "test_eval_s": None,
        "n_labels": n_labels, "n_train": meta.get("n_train"), "n_dev": meta.get("n_dev"),
        "trainable_params": meta.get("trainable_params"), "adapter_mb": meta.get("adapter_mb"),
        # Training alone (the per-epoch dev scoring excluded), and the whole Train run.
        "train_s": round(sum(h.get("train_s", h.get("epoch_s", 0.0)) for h in history), 2),
        "dev_eval_s": round(sum(h.get("epoch_s", 0.0) - h.get("train_s", h.get("epoch_s", 0.0))
                                for h in history), 2),
        "wall_s": meta.get("wall_time_s"),
        "dev_before_accuracy": (meta.get("dev_before") or {}).get("accuracy"),
    }


def with_test_scores(record: dict[str, Any], test_y: list[int], test_pred: list[int],
                     n_labels: int, seconds: float) -> dict[str, Any]:
    """The record with the kept adapter's test accuracy / macro-F1 (scored once)."""
    test = metrics_from_confusion(confusion_matrix(test_y, test_pred, n_labels))
    return {**record, "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
            "n_test": len(test_y), "test_eval_s": round(seconds, 2)}
