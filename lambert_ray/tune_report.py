"""Tables, plots and the choice for a PEFT Tune experiment (see tune.py).

Per trial (`collect_trials`): the point (method, lr, hyperparameters, seed), status (finished /
stopped early by ASHA / errored / not run), the final reported epoch's dev accuracy and macro-F1, the epoch
history, and from the adapter's metadata.json: trainable params, adapter MB, wall time, peak
memory.

Per method (`summarise`): trials run / stopped early / errored, its best configuration (a method
+ hyperparameter setting, all seeds) with mean ± std over seeds of dev accuracy and macro-F1, the
best single trial, and the cost columns.

The choice (`choose`), stated in every report as `SELECTION_RULE`.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections import defaultdict
from typing import Any

from lambert_ray import layout

SELECTION_RULE = (
    "Among method+hyperparameter configs whose every seed trained all epochs (not stopped early, "
    "no error): highest mean final-epoch {metric} over seeds; ties (within {tol}) -> fewer "
    "trainable params -> smaller adapter -> method name. The served adapter is that config's "
    "seed with the highest final {metric} (ties -> lower seed).")


def _metadata(checkpoint_path: str | None, filesystem=None) -> dict[str, Any]:
    """The adapter metadata.json inside a Train checkpoint ({} when absent)."""
    if not checkpoint_path:
        return {}
    import ray.train

    try:
        with ray.train.Checkpoint(checkpoint_path, filesystem=filesystem).as_directory() as d:
            with open(os.path.join(d, layout.CHECKPOINT_ADAPTER, layout.ADAPTER_META)) as f:
                return json.load(f)
    except (FileNotFoundError, OSError):
        return {}


def collect_trials(grid, epochs: int, filesystem=None) -> list[dict[str, Any]]:
    """One record per trial of a Tune ResultGrid, in the grid's point order. `filesystem`: the
    one the checkpoints live in (None: local, Ray's default)."""
    trials = []
    for result in grid:
        point = result.config["point"]
        m = result.metrics or {}
        meta = _metadata(m.get("checkpoint_path"), filesystem)
        iters = int(m.get("training_iteration") or 0)  # epochs Tune saw: ASHA decides on these
        if result.error is not None:
            status = "errored"
        elif iters == 0:
            status = "not_run"  # pending when an interrupted experiment stopped
        elif iters < epochs:
            status = "stopped_early"
        else:
            status = "finished"
        # Metrics from the checkpoint's own metadata, so they describe the adapter that would be
        # served (a stopped trial may finish one more epoch before its actors are killed).
        history = meta.get("history", [])
        after = meta.get("dev_after") or {}
        trials.append({
            "config_id": point["config_id"], "method": point["method"], "seed": point["seed"],
            "lr": meta.get("training", {}).get("lr", point["lr"]), "params": point["params"],
            "status": status, "epochs_reported": iters, "epochs_run": len(history) or iters,
            "error": (str(result.error).splitlines() or [""])[0][:300] if result.error else None,
            "dev_accuracy": after.get("accuracy", m.get("dev_accuracy")),
            "dev_macro_f1": after.get("macro_f1", m.get("dev_macro_f1")),
            "dev_before_accuracy": (meta.get("dev_before") or {}).get(
                "accuracy", m.get("dev_before_accuracy")),
            "train_loss": history[-1]["train_loss"] if history else m.get("train_loss"),
            "history": history,
            "trainable_params": meta.get("trainable_params"), "adapter_mb": meta.get("adapter_mb"),
            "train_time_s": meta.get("wall_time_s"), "peak_memory_mb": meta.get("peak_memory_mb"),
            "checkpoint_path": m.get("checkpoint_path"),
        })
    trials.sort(key=lambda t: (t["method"], t["config_id"], t["seed"]))
    return trials


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _configs(trials: list[dict]) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = defaultdict(list)
    for t in trials:
        by[t["config_id"]].append(t)
    return by


def _config_summary(config_id: str, ts: list[dict], metric: str) -> dict[str, Any]:
    ok = [t for t in ts if t["status"] != "errored" and t[metric] is not None]
    mean, std = _mean_std([t[metric] for t in ok])
    f1, f1_std = _mean_std([t["dev_macro_f1"] for t in ok])
    acc, acc_std = _mean_std([t["dev_accuracy"] for t in ok])
    costs = [t for t in ok if t["trainable_params"] is not None]
    return {
        "config_id": config_id, "method": ts[0]["method"], "n_seeds": len(ok),
        "complete": bool(ts) and all(t["status"] == "finished" for t in ts),
        "mean_metric": mean, "std_metric": std,
        "mean_dev_accuracy": acc, "std_dev_accuracy": acc_std,
        "mean_dev_macro_f1": f1, "std_dev_macro_f1": f1_std,
        "trainable_params": costs[0]["trainable_params"] if costs else None,
        "adapter_mb": costs[0]["adapter_mb"] if costs else None,
        "train_time_s": statistics.fmean(t["train_time_s"] for t in costs) if costs else None,
        "peak_memory_mb": max(t["peak_memory_mb"] for t in costs) if costs else None,
        "trials": ts,
    }


def _tie_key(c: dict[str, Any]) -> tuple:
    """Among configs tied on the metric: fewer params, smaller adapter, then the name."""
    return (c["trainable_params"] if c["trainable_params"] is not None else float("inf"),
            c["adapter_mb"] if c["adapter_mb"] is not None else float("inf"), c["config_id"])


def _best(configs: list[dict[str, Any]], tol: float) -> dict[str, Any] | None:
    scored = [c for c in configs if c["mean_metric"] is not None]
    if not scored:
        return None
    top = max(c["mean_metric"] for c in scored)
    tied = [c for c in scored if c["mean_metric"] >= top - tol - 1e-12]
    return min(tied, key=_tie_key)


def summarise(trials: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per method (in the trials' method order), see the module docstring."""
    rows = []
    for method in dict.fromkeys(t["method"] for t in trials):
        ts = [t for t in trials if t["method"] == method]
        configs = [_config_summary(cid, cts, metric) for cid, cts in _configs(ts).items()]
        best = _best(configs, 0.0)
        scored = [t for t in ts if t["dev_accuracy"] is not None and t["status"] != "errored"]
        row = {"method": method, "trials": len(ts),
               "stopped_early": sum(t["status"] == "stopped_early" for t in ts),
               "errored": sum(t["status"] == "errored" for t in ts),
               "best_trial_dev_accuracy": max((t["dev_accuracy"] for t in scored), default=None),
               "best_trial_dev_macro_f1": max((t["dev_macro_f1"] for t in scored), default=None),
               "dev_before_accuracy": next((t["dev_before_accuracy"] for t in scored), None)}
        if best:
            row.update({k: v for k, v in best.items() if k not in ("trials", "method")})
            row["best_config"] = row.pop("config_id")
        rows.append(row)
    return rows


def choose(trials: list[dict[str, Any]], metric: str, tol: float = 0.0) -> dict[str, Any] | None:
    """The chosen config and trial by SELECTION_RULE; None when no trial has a metric."""
    configs = [_config_summary(cid, ts, metric) for cid, ts in _configs(trials).items()]
    complete = [c for c in configs if c["complete"]]
    best = _best(complete, tol) or _best(configs, tol)
    if best is None:
        return None
    candidates = [t for t in best["trials"] if t[metric] is not None and t["checkpoint_path"]]
    if not candidates:
        return None
    trial = min(candidates, key=lambda t: (-t[metric], t["seed"]))
    return {"method": best["method"], "config_id": best["config_id"], "metric": metric,
            "mean_metric": best["mean_metric"], "std_metric": best["std_metric"],
            "n_seeds": best["n_seeds"], "complete": best["complete"], "seed": trial["seed"],
            "lr": trial["lr"], "params": trial["params"], "dev_accuracy": trial["dev_accuracy"],
            "dev_macro_f1": trial["dev_macro_f1"], "trainable_params": trial["trainable_params"],
            "adapter_mb": trial["adapter_mb"], "checkpoint_path": trial["checkpoint_path"],
            "rule": SELECTION_RULE.format(metric=metric, tol=tol)}


def _pm(mean: float | None, std: float | None, pct: bool = True) -> str:
    if mean is None:
        return "—"
    return f"{mean:.1%} ± {std:.1%}" if pct else f"{mean:.3f} ± {std:.3f}"


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def to_markdown(methods: list[dict], choice: dict | None, metric: str) -> str:
    lines = ["| method | best config | dev acc (mean ± std over seeds) | macro-F1 (mean ± std) | "
             "best trial acc | best trial F1 | 0-shot acc | trainable params | adapter MB | "
             "train s | peak MB | trials | stopped early | errored |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in methods:
        lines.append(
            f"| {r['method']} | {r.get('best_config', '—')} | "
            f"{_pm(r.get('mean_dev_accuracy'), r.get('std_dev_accuracy'))} | "
            f"{_pm(r.get('mean_dev_macro_f1'), r.get('std_dev_macro_f1'), pct=False)} | "
            f"{_fmt(r['best_trial_dev_accuracy'], '.1%')} | {_fmt(r['best_trial_dev_macro_f1'], '.3f')} | "
            f"{_fmt(r['dev_before_accuracy'], '.1%')} | {_fmt(r.get('trainable_params'), ',')} | "
            f"{_fmt(r.get('adapter_mb'), '.2f')} | {_fmt(r.get('train_time_s'), '.0f')} | "
            f"{_fmt(r.get('peak_memory_mb'), '.0f')} | {r['trials']} | {r['stopped_early']} | "
            f"{r['errored']} |")
    lines.append("")
    if choice:
        lines.append(f"**Chosen annotator:** `{choice['config_id']}` seed {choice['seed']} — "
                     f"mean {metric} {_pm(choice['mean_metric'], choice['std_metric'])} over "
                     f"{choice['n_seeds']} seed(s); this adapter {choice['dev_accuracy']:.1%} "
                     f"accuracy, macro-F1 {choice['dev_macro_f1']:.3f}.")
        lines.append("")
        lines.append(f"Rule: {choice['rule']}")
    else:
        lines.append("**No adapter chosen:** no trial reported a dev metric.")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["method", "best_config", "mean_dev_accuracy", "std_dev_accuracy",
               "mean_dev_macro_f1", "std_dev_macro_f1", "best_trial_dev_accuracy",
               "best_trial_dev_macro_f1", "dev_before_accuracy", "trainable_params", "adapter_mb",
               "train_time_s", "peak_memory_mb", "trials", "stopped_early", "errored"]
TRIAL_COLUMNS = ["method", "config_id", "seed", "lr", "status", "epochs_reported", "epochs_run",
                 "dev_accuracy",
                 "dev_macro_f1", "train_loss", "trainable_params", "adapter_mb", "train_time_s",
                 "peak_memory_mb", "error"]


def write_results(trials: list[dict], tc, out_dir: str) -> tuple[list[dict], dict | None]:
    """tune_results.{md,json,csv}, trials.csv and the PNG plots into out_dir; returns
    (per-method rows, choice)."""
    os.makedirs(out_dir, exist_ok=True)
    methods = summarise(trials, tc.metric)
    choice = choose(trials, tc.metric, tc.tie_tolerance)
    with open(os.path.join(out_dir, "tune_results.md"), "w") as f:
        f.write(to_markdown(methods, choice, tc.metric))
    with open(os.path.join(out_dir, "tune_results.json"), "w") as f:
        json.dump({"metric": tc.metric, "methods": methods, "choice": choice, "trials": trials},
                  f, indent=1, default=str)
    for name, rows, cols in (("tune_results.csv", methods, CSV_COLUMNS),
                             ("trials.csv", trials, TRIAL_COLUMNS)):
        with open(os.path.join(out_dir, name), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    plot_all(trials, methods, choice, out_dir)
    return methods, choice


PLOTS = ("accuracy_vs_params.png", "learning_curves.png", "accuracy_vs_time.png")


def plot_all(trials: list[dict], methods: list[dict], choice: dict | None, out_dir: str) -> None:
    """The three PNGs in PLOTS: final dev accuracy vs trainable params (log x) per trial, with each
    method's mean over seeds of its best config; dev accuracy per epoch, one panel per method
    (dashed: stopped early); final dev accuracy vs train time."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(t["method"] for t in trials))
    colour = {m: plt.cm.tab10(i % 10) for i, m in enumerate(names)}
    done = [t for t in trials if t["dev_accuracy"] is not None]
    chosen = (choice or {}).get("checkpoint_path")

    def scatter(ax, x_key: str, xlabel: str, log: bool) -> None:
        for m in names:
            pts = [t for t in done if t["method"] == m and t[x_key] is not None]
            ax.scatter([t[x_key] for t in pts], [t["dev_accuracy"] for t in pts], color=colour[m],
                       label=m, alpha=0.6, marker="o")
        for r in methods:
            if r.get("mean_dev_accuracy") is not None and r.get(
                    "trainable_params" if x_key == "trainable_params" else "train_time_s"):
                x = r["trainable_params"] if x_key == "trainable_params" else r["train_time_s"]
                ax.errorbar([x], [r["mean_dev_accuracy"]], yerr=[r["std_dev_accuracy"] or 0],
                            color=colour[r["method"]], marker="D", markersize=8, capsize=3)
        for t in done:
            if t["checkpoint_path"] == chosen and t[x_key] is not None:
                ax.scatter([t[x_key]], [t["dev_accuracy"]], s=250, facecolors="none",
                           edgecolors="black", linewidths=2, label="chosen")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("dev accuracy (final epoch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    scatter(ax, "trainable_params", "trainable parameters (log)", log=True)
    ax.set_title("Dev accuracy vs trainable parameters (dots: trials; diamonds: best config, "
                 "mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, PLOTS[0]), dpi=110)
    plt.close(fig)

    cols = min(3, max(1, len(names)))
    rows = -(-len(names) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False,
                             sharey=True)
    for ax, m in zip(axes.flat, names, strict=False):
        for t in trials:
            if t["method"] != m or not t["history"]:
                continue
            h = t["history"]
            ax.plot([e["epoch"] for e in h], [e["dev_accuracy"] for e in h], marker="o",
                    color=colour[m], linestyle="--" if t["status"] == "stopped_early" else "-",
                    alpha=0.7)
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("dev accuracy")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Learning curves per method (dashed: stopped early by ASHA)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, PLOTS[1]), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    scatter(ax, "train_time_s", "train time per trial (s)", log=False)
    ax.set_title("Dev accuracy vs train time", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, PLOTS[2]), dpi=110)
    plt.close(fig)
