"""The PEFT study's verdict, without Ray: tables, paired comparisons and plots from trial records.

    tasks = [{"summary": study.json, "records": [trial record, ...], "preds": {key: frame}}]
    write_report(tasks, "results/peft_study", downstream="student_vs_annotator.csv")

Per task x method x budget: test accuracy mean ± 95 % CI (t, n - 1 df) over seeds, each trial
at its best dev epoch, with dev accuracy, trainable params, adapter MB and train seconds.

The winner at a budget is chosen on dev (highest mean dev accuracy over seeds, among methods with
every seed finished; ties: fewer trainable params) and judged on test, against each other method
on the same seeds (same gold rows) and the same test rows:
- paired t-test over seeds on the test-accuracy differences (Holm-corrected over the comparisons
  at that budget). A seed is one draw of gold rows and init, the variation a user retraining
  the method meets; at small budgets it dominates.
- exact McNemar on the per-row test predictions, discordant rows pooled over the seeds (Holm too):
  whether the two methods' labels differ beyond test-row sampling noise.
A gap is flagged significant only when both tests say so (where the per-row predictions exist):
with 3 seeds a t-test on near-identical differences (DoRA vs LoRA: +1 test row on each seed) has
sd ~0 and p ~0 however small the gap, and McNemar ignores seed variation; each test covers the
other's blind spot. With 3 seeds the t-test has 2 degrees of freedom: only large, consistent
gaps are significant, and "not significant" means the data cannot tell, not that the methods
are equal.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections import defaultdict
from typing import Any

from lambert_ray import layout, storage
from lambert_ray.stats import holm, mcnemar_exact, mean_ci, paired_t

ALPHA = 0.05
PLOTS = ("accuracy_vs_budget.png", "accuracy_vs_params.png", "learning_curves.png")
DOWNSTREAM_PLOT = "student_vs_annotator.png"


def load_preds(study_dir: str, keys: list[str]) -> dict[str, Any]:
    """{key: DataFrame(row_id, label_id, pred)} of the trials whose test predictions exist."""
    out = {}
    for key in keys:
        path = layout.study_trial(study_dir, key, ".test.parquet")
        if storage.exists(path):
            out[key] = storage.read_parquet(path).to_pandas()
    return out


# --- tables ---

def _scored(summary: dict, records: list[dict]) -> list[dict]:
    """The phase-2 trials with a test score (a reused phase-1 trial is scored in phase 2)."""
    keys = set(summary["phase2"])
    return [r for r in records if r["key"] in keys and r.get("test_accuracy") is not None]


def curve_rows(summary: dict, records: list[dict]) -> list[dict[str, Any]]:
    """One row per method x budget of phase 2 (each method at its chosen lr)."""
    by: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in _scored(summary, records):
        by[(r["method"], r["budget"])].append(r)
    rows = []
    n_seeds = len(summary["seeds"])
    for method in summary["methods"]:
        for budget in summary["budgets"]:
            rs = sorted(by.get((method, budget), []), key=lambda r: r["seed"])
            if not rs:
                continue
            test, dev = mean_ci([r["test_accuracy"] for r in rs]), mean_ci(
                [r["dev_accuracy"] for r in rs])
            rows.append({
                "task": summary["task"], "method": method, "budget": budget,
                "lr": rs[0]["lr"], "n_seeds": len(rs), "complete": len(rs) == n_seeds,
                "seeds": [r["seed"] for r in rs],
                "test_mean": test["mean"], "test_ci": test["half"], "test_sd": test["sd"],
                "dev_mean": dev["mean"], "dev_ci": dev["half"],
                "test_macro_f1": statistics.fmean(r["test_macro_f1"] for r in rs),
                "best_epochs": [r["best_epoch"] for r in rs],
                "trainable_params": rs[0]["trainable_params"], "adapter_mb": rs[0]["adapter_mb"],
                "train_s": statistics.fmean(r["train_s"] for r in rs),
                "wall_s": statistics.fmean(r["wall_s"] or 0.0 for r in rs),
            })
    return rows


def _params(row: dict) -> float:
    return row["trainable_params"] if row["trainable_params"] is not None else math.inf


def winner(rows: list[dict], budget: int) -> dict | None:
    """The method chosen on dev at `budget`: highest mean dev accuracy among complete rows
    (every seed finished); ties: fewer trainable params, then the name."""
    cands = [r for r in rows if r["budget"] == budget and r["complete"]]
    if not cands:
        return None
    return min(cands, key=lambda r: (-r["dev_mean"], _params(r), r["method"]))


def paired_rows(summary: dict, records: list[dict], preds: dict[str, Any],
                alpha: float = ALPHA) -> list[dict[str, Any]]:
    """The winner (on dev) against every other method at each budget, on test (module
    docstring): Δ = winner - other, over the seeds both finished."""
    rows = curve_rows(summary, records)
    rec = {(r["method"], r["budget"], r["seed"]): r for r in _scored(summary, records)}
    out = []
    for budget in summary["budgets"]:
        win = winner(rows, budget)
        if win is None:
            continue
        block = []
        for other in (r for r in rows if r["budget"] == budget and r["method"] != win["method"]):
            seeds = sorted(set(win["seeds"]) & set(other["seeds"]))
            a = [rec[(win["method"], budget, s)] for s in seeds]
            b = [rec[(other["method"], budget, s)] for s in seeds]
            t = paired_t([x["test_accuracy"] - y["test_accuracy"] for x, y in zip(a, b, strict=True)])
            only_win = only_other = 0
            have_rows = all(x["key"] in preds and y["key"] in preds for x, y in zip(a, b, strict=True))
            for x, y in zip(a, b, strict=True) if have_rows else ():
                px, py = preds[x["key"]], preds[y["key"]]
                m = px.merge(py, on="row_id", suffixes=("_w", "_o"))
                right_w = m["pred_w"] == m["label_id_w"]
                right_o = m["pred_o"] == m["label_id_o"]
                only_win += int((right_w & ~right_o).sum())
                only_other += int((~right_w & right_o).sum())
            block.append({
                "task": summary["task"], "budget": budget, "winner": win["method"],
                "other": other["method"], "n_seeds": len(seeds), "diff_mean": t["mean"],
                "diff_ci": t["half"], "t": t["t"], "p_t": t["p"],
                "mcnemar_only_winner": only_win if have_rows else None,
                "mcnemar_only_other": only_other if have_rows else None,
                "p_mcnemar": mcnemar_exact(only_win, only_other) if have_rows else None})
        p_t = holm([r["p_t"] for r in block])
        p_mc = holm([r["p_mcnemar"] for r in block])
        for row, pt, pm in zip(block, p_t, p_mc, strict=True):
            row["p_t_holm"], row["p_mcnemar_holm"] = pt, pm
            row["mcnemar_significant"] = pm is not None and pm < alpha
            row["significant"] = (pt is not None and pt < alpha
                                  and (pm is None or row["mcnemar_significant"]))
        out.extend(block)
    return out


def sweep_rows(summary: dict) -> list[dict[str, Any]]:
    """Phase 1: each swept method's dev accuracy per lr, and the lr chosen."""
    rows = []
    for method, c in summary["lrs"].items():
        for s in c.get("sweep", []):
            rows.append({"task": summary["task"], "method": method, "lr": s["lr"],
                         "dev_accuracy": s["dev_accuracy"], "n_seeds": s["n_seeds"],
                         "chosen": s["lr"] == c["lr"]})
    return rows


# --- markdown ---

def _pct(x: float | None, half: float | None = None) -> str:
    if x is None:
        return "—"
    return f"{x:.1%}" if half is None else f"{x:.1%} ± {half:.1%}"


def _num(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _p(x: float | None) -> str:
    return "—" if x is None else ("<0.001" if x < 1e-3 else f"{x:.3f}")


def table_markdown(tasks: list[dict]) -> str:
    lines = ["# PEFT study: test accuracy per method and gold budget", "",
             "Each cell: test accuracy of the trial's best dev epoch, mean ± 95 % CI (t "
             "distribution) over seeds; a seed draws its own gold rows and init, shared by all "
             "methods. **Bold**: the method chosen on dev at that budget. Learning rates were "
             "chosen on dev in phase 1.", ""]
    for t in tasks:
        s, rows = t["summary"], t["curves"]
        base = s["baseline"]
        lines += [f"## {s['task']}", "",
                  f"{s['model']}, {s['epochs']} epoch(s) per trial (best dev epoch kept), dev "
                  f"{s['n_dev']} rows, test {s['n_test']} rows (never used to select), prompt "
                  f"≤ {s['max_length']} tokens, seeds {s['seeds']}. 0-shot: dev "
                  f"{_pct(base['dev']['accuracy'])}, test {_pct(base['test']['accuracy'])}.", ""]
        budgets = [b for b in s["budgets"] if any(r["budget"] == b for r in rows)]
        wins = {b: (winner(rows, b) or {}).get("method") for b in budgets}
        lines.append("| method | lr | " + " | ".join(f"test @ {b} gold" for b in budgets)
                     + " | dev @ " + str(budgets[-1] if budgets else "—")
                     + " | trainable params | adapter MB | train s @ " + str(budgets[-1] if budgets else "—")
                     + " | best epochs |")
        lines.append("|---|---:|" + "---:|" * len(budgets) + "---:|---:|---:|---:|---|")
        for method in s["methods"]:
            mr = {r["budget"]: r for r in rows if r["method"] == method}
            if not mr:
                lines.append(f"| {method} | — |" + " — |" * (len(budgets) + 4) + " — |")
                continue
            cells = []
            for b in budgets:
                r = mr.get(b)
                cell = "—" if r is None else _pct(r["test_mean"], r["test_ci"]) + (
                    "" if r["complete"] else f" (n={r['n_seeds']})")
                cells.append(f"**{cell}**" if wins.get(b) == method and r else cell)
            last = mr.get(budgets[-1]) if budgets else None
            any_r = next(iter(mr.values()))
            lines.append(
                f"| {method} | {any_r['lr']:g} | " + " | ".join(cells) + " | "
                f"{_pct(last['dev_mean'], last['dev_ci']) if last else '—'} | "
                f"{_num(any_r['trainable_params'], ',')} | {_num(any_r['adapter_mb'], '.2f')} | "
                f"{_num(last['train_s'] if last else None, '.0f')} | "
                f"{', '.join(str(e) for e in last['best_epochs']) if last else '—'} |")
        lines.append("")
        sweep = sweep_rows(s)
        if sweep:
            lines += [f"Phase 1 (lr sweep at {s['select_budget']} gold, seeds "
                      f"{s['select_seeds']}, dev accuracy of the best epoch):", "",
                      "| method | lr | dev acc | chosen |", "|---|---:|---:|---|"]
            lines += [f"| {r['method']} | {r['lr']:g} | {_pct(r['dev_accuracy'])} | "
                      f"{'yes' if r['chosen'] else ''} |" for r in sweep]
            lines.append("")
        if s.get("missing_methods"):
            lines += [f"Not in the table yet (lr sweep unfinished): {', '.join(s['missing_methods'])}.", ""]
        if s.get("errors"):
            lines += [f"Errored trials (rerun on resume): {len(s['errors'])}.", ""]
        expected = len(s["phase2"])
        done = len(_scored(s, t["records"]))
        if done < expected:
            lines += [f"**Partial:** {done} of {expected} phase-2 trials finished and scored.", ""]
    return "\n".join(lines) + "\n"


def paired_markdown(tasks: list[dict], alpha: float = ALPHA) -> str:
    lines = ["# Winner (chosen on dev) vs each other method, on test", "",
             "Δ = winner − other test accuracy, mean over the seeds both finished, with its 95 % "
             "CI. Two tests, each Holm-corrected over the comparisons at that budget: a paired "
             "t-test over seeds (seed-to-seed variation), and McNemar, an exact test on the "
             "per-row test predictions, rows only the winner got right / only the other got "
             "right, pooled over seeds (test-row noise). **significant**: both p < "
             f"{alpha}; either alone can mislead (3 near-identical differences give the t-test "
             "sd ~0 and p ~0; McNemar ignores the seeds). With 3 seeds the t-test has 2 degrees "
             "of freedom: 'no' means the data cannot tell the two apart.", ""]
    for t in tasks:
        rows = t["paired"]
        if not rows:
            continue
        lines += [f"## {t['summary']['task']}", "",
                  "| budget | winner | vs | seeds | Δ test acc (95 % CI) | p (t) | p (t, Holm) | "
                  "McNemar only-winner / only-other | p (McNemar, Holm) | significant |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            diff = "—" if r["diff_mean"] is None else (
                f"{100 * r['diff_mean']:+.1f} pts" + (f" ± {100 * r['diff_ci']:.1f}"
                                                       if r["diff_ci"] is not None else ""))
            mc = ("—" if r["mcnemar_only_winner"] is None
                  else f"{r['mcnemar_only_winner']} / {r['mcnemar_only_other']}")
            lines.append(f"| {r['budget']} | {r['winner']} | {r['other']} | {r['n_seeds']} | "
                         f"{diff} | {_p(r['p_t'])} | {_p(r['p_t_holm'])} | {mc} | "
                         f"{_p(r['p_mcnemar_holm'])} | "
                         f"{'**yes**' if r['significant'] else 'no'} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def verdicts(tasks: list[dict], alpha: float = ALPHA) -> list[str]:
    """One sentence per task x budget: the dev choice, its test score, and what it beats."""
    out = []
    for t in tasks:
        for b in t["summary"]["budgets"]:
            w = winner(t["curves"], b)
            if w is None:
                continue
            ps = [p for p in t["paired"] if p["budget"] == b]
            beaten = [p["other"] for p in ps if p["significant"] and p["diff_mean"] > 0]
            worse = [p["other"] for p in ps if p["significant"] and p["diff_mean"] < 0]
            tied = [p["other"] for p in ps if not p["significant"]]
            ci = f" ± {w['test_ci']:.1%}" if w["test_ci"] is not None else ""
            text = (f"{t['summary']['task']} @ {b} gold: **{w['method']}** (chosen on dev) — test "
                    f"{w['test_mean']:.1%}{ci} over {w['n_seeds']} seeds")
            if beaten:
                text += f"; significantly better than {', '.join(beaten)}"
            if worse:  # dev chose it, yet on test these beat it consistently
                text += f"; significantly worse on test than {', '.join(worse)}"
            if tied:
                text += f"; not distinguishable from {', '.join(tied)}"
            out.append(text + ".")
    return out


# --- downstream (student vs annotator) ---

def read_downstream(path: str) -> list[dict[str, Any]]:
    """Rows of {task, method, annotator_accuracy, student_accuracy[, budget, *_ci]} from a JSON
    list or a CSV (the multi-adapter annotation run writes it)."""
    text = storage.read_text(path)
    if path.endswith(".json"):
        rows = json.loads(text)
        rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
    else:
        rows = list(csv.DictReader(text.splitlines()))
    out = []
    for r in rows:
        row = dict(r)
        for k in ("annotator_accuracy", "student_accuracy", "annotator_ci", "student_ci",
                  "label_accuracy"):
            if row.get(k) not in (None, ""):
                row[k] = float(row[k])
            else:
                row.pop(k, None)
        missing = {"method", "annotator_accuracy", "student_accuracy"} - set(row)
        if missing:
            raise ValueError(f"{path}: a row lacks {sorted(missing)}: {r}")
        out.append(row)
    return out


def downstream_markdown(rows: list[dict[str, Any]]) -> str:
    """The student-vs-annotator table: per method, the labels' accuracy on the sample they label
    (where it has gold labels), the annotator's and its student's test accuracy (± 95 % CI)."""
    def pct_ci(r: dict, k: str) -> str:
        return _pct(r[k], r.get(k.replace("accuracy", "ci")))

    out = ["", "## Student vs annotator", "",
           "| task | method | budget | labels right on the sample | annotator test acc | "
           "student test acc |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.get('task', '')} | {r['method']} | {r.get('budget', '')} | "
                   f"{_pct(r.get('label_accuracy'))} | "
                   f"{pct_ci(r, 'annotator_accuracy')} | {pct_ci(r, 'student_accuracy')} |")
    if len(rows) >= 3:
        a = [float(r["annotator_accuracy"]) for r in rows]
        b = [float(r["student_accuracy"]) for r in rows]
        if len(set(a)) > 1 and len(set(b)) > 1:
            gap = statistics.fmean(x - y for x, y in zip(a, b, strict=True))
            out += ["", f"Over the {len(rows)} rows: Pearson r(annotator, student) = "
                    f"{statistics.correlation(a, b):.2f}; the student is {100 * gap:.1f} points "
                    "below its annotator on average."]
    return "\n".join(out) + "\n"


# --- plots ---

def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _colours(methods: list[str]) -> dict[str, Any]:
    plt = _plt()

    return {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}


def plot_budget(tasks: list[dict], path: str) -> None:
    """Test accuracy vs gold budget (log x, ticks at the budgets), mean with a 95 % CI band per
    method, 0-shot dashed; a task with one budget: one point per method with CI bars."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        s, rows = t["summary"], t["curves"]
        colour = _colours(s["methods"])
        budgets = sorted({r["budget"] for r in rows})
        if len(budgets) > 1:
            for m in s["methods"]:
                mr = sorted((r for r in rows if r["method"] == m), key=lambda r: r["budget"])
                if not mr:
                    continue
                x = [r["budget"] for r in mr]
                y = [r["test_mean"] for r in mr]
                h = [r["test_ci"] or 0.0 for r in mr]
                ax.plot(x, y, marker="o", color=colour[m], label=m)
                part = [r for r in mr if not r["complete"]]  # open: not every seed has run
                ax.plot([r["budget"] for r in part], [r["test_mean"] for r in part], "o",
                        color=colour[m], markerfacecolor="white")
                ax.fill_between(x, [a - b for a, b in zip(y, h, strict=True)],
                                [a + b for a, b in zip(y, h, strict=True)], color=colour[m], alpha=0.15)
            ax.set_xscale("log")
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.minorticks_off()
            ax.set_xlabel("gold training rows (log scale)")
        else:
            ms = [m for m in s["methods"] if any(r["method"] == m for r in rows)]
            for i, m in enumerate(ms):
                r = next(r for r in rows if r["method"] == m)
                ax.errorbar([i], [r["test_mean"]], yerr=[r["test_ci"] or 0.0], fmt="o",
                            color=colour[m], capsize=4)  # the x ticks name the methods
            ax.set_xticks(range(len(ms)), ms, rotation=20)
            ax.set_xlim(-0.5, len(ms) - 0.5)
            ax.set_xlabel(f"method ({budgets[0] if budgets else '?'} gold rows)")
        ax.axhline(s["baseline"]["test"]["accuracy"], color="grey", linestyle="--", label="0-shot")
        ax.set_ylabel("test accuracy (mean ± 95 % CI over seeds)")
        partial = any(not r["complete"] for r in rows)
        ax.set_title(f"{s['task']}: {s['n_test']} test rows"
                     + (" (open points: not every seed yet)" if partial else ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_params(tasks: list[dict], path: str) -> None:
    """Test accuracy vs trainable parameters (log x) at each task's largest budget."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        s, rows = t["summary"], t["curves"]
        colour = _colours(s["methods"])
        budget = max((r["budget"] for r in rows), default=None)
        for r in (r for r in rows if r["budget"] == budget and r["trainable_params"]):
            ax.errorbar([r["trainable_params"]], [r["test_mean"]], yerr=[r["test_ci"] or 0.0],
                        fmt="o", color=colour[r["method"]], capsize=4, label=r["method"])
            ax.annotate(r["method"], (r["trainable_params"], r["test_mean"]), fontsize=8,
                        xytext=(5, 5), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel("test accuracy (mean ± 95 % CI over seeds)")
        ax.set_title(f"{s['task']} @ {budget} gold rows", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(tasks: list[dict], path: str) -> None:
    """Dev accuracy per epoch of every phase-2 trial, one panel per task x method, coloured by
    budget; integer epoch ticks over the epochs run."""
    plt = _plt()
    panels = [(t, m) for t in tasks for m in t["summary"]["methods"]]
    cols = min(3, max(1, len(panels)))
    nrows = -(-len(panels) // cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, (t, m) in zip(axes.flat, panels, strict=False):
        s = t["summary"]
        budgets = s["budgets"]
        cmap = plt.cm.viridis
        keys = set(s["phase2"])
        for r in t["records"]:
            if r["key"] not in keys or r["method"] != m:
                continue
            c = cmap(budgets.index(r["budget"]) / max(1, len(budgets) - 1))
            xs = list(range(1, len(r["dev_by_epoch"]) + 1))
            ax.plot(xs, r["dev_by_epoch"], marker="o", color=c, alpha=0.7,
                    label=f"{r['budget']} gold" if r["seed"] == s["seeds"][0] else None)
            ax.scatter([r["best_epoch"]], [r["dev_by_epoch"][r["best_epoch"] - 1]], s=90,
                       facecolors="none", edgecolors="black")
        epochs = s["epochs"]
        ax.set_xticks(range(1, epochs + 1))
        ax.set_xlim(0.5, epochs + 0.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel("dev accuracy")
        ax.set_title(f"{s['task']}: {m}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Dev accuracy per epoch (circled: the epoch each trial keeps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_downstream(rows: list[dict], path: str) -> None:
    """Student test accuracy vs its annotator's test accuracy, one point per method (x = y
    dashed: a student as good as its teacher)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colour = _colours(methods)
    tasks = list(dict.fromkeys(r.get("task", "") for r in rows))
    markers = dict(zip(tasks, "osD^v<>", strict=False))
    for r in rows:  # a legend, not labels on the points: close methods would overlap
        label = r["method"] + (f" ({r['task']})" if len(tasks) > 1 else "")
        ax.errorbar([r["annotator_accuracy"]], [r["student_accuracy"]],
                    xerr=[r.get("annotator_ci", 0.0)], yerr=[r.get("student_ci", 0.0)],
                    fmt=markers.get(r.get("task", ""), "o"), color=colour[r["method"]],
                    capsize=3, label=label)
    xs = [r["annotator_accuracy"] for r in rows] + [r["student_accuracy"] for r in rows]
    lo, hi = min(xs) - 0.02, max(xs) + 0.02
    ax.plot([lo, hi], [lo, hi], linestyle="--", color="grey")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("annotator (PEFT LLM) test accuracy")
    ax.set_ylabel("student (BERT on its labels) test accuracy")
    ax.set_title("Does a better annotator make a better student?", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- all of it ---

def analyse(tasks: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Add curves and paired rows to each task dict ({summary, records, preds})."""
    out = []
    for t in tasks:
        t = {**t, "preds": t.get("preds") or {}}
        t["curves"] = curve_rows(t["summary"], t["records"])
        t["paired"] = paired_rows(t["summary"], t["records"], t["preds"], alpha)
        out.append(t)
    return out


def write_report(tasks: list[dict], out_dir: str, *, downstream: str | list[dict] | None = None,
                 command: str | None = None, alpha: float = ALPHA) -> dict[str, Any]:
    """table.md/.json, paired.md, the plots (and the downstream table and plot when `downstream`
    is given: a CSV/JSON path, or the rows of study_downstream.run_downstream), command.txt;
    returns the JSON written."""
    os.makedirs(out_dir, exist_ok=True)
    tasks = analyse(tasks, alpha)
    down = read_downstream(downstream) if isinstance(downstream, str) else downstream or None
    lines = verdicts(tasks, alpha)
    table = table_markdown(tasks)
    if lines:
        table += "\n## Verdict (chosen on dev, reported on test)\n\n" + "\n".join(
            f"- {v}" for v in lines) + "\n"
    if down:
        table += downstream_markdown(down)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, "paired.md"), "w") as f:
        f.write(paired_markdown(tasks, alpha))
    data = {"alpha": alpha, "verdicts": lines, "downstream": down,
            "tasks": [{"summary": t["summary"], "curves": t["curves"], "paired": t["paired"],
                       "sweep": sweep_rows(t["summary"]), "trials": t["records"]} for t in tasks]}
    with open(os.path.join(out_dir, "table.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    plot_budget(tasks, os.path.join(out_dir, PLOTS[0]))
    plot_params(tasks, os.path.join(out_dir, PLOTS[1]))
    plot_curves(tasks, os.path.join(out_dir, PLOTS[2]))
    if down:
        plot_downstream(down, os.path.join(out_dir, DOWNSTREAM_PLOT))
    if command:
        with open(os.path.join(out_dir, "command.txt"), "w") as f:
            f.write(command.rstrip() + "\n")
    return data
