"""The report's teacher side: the LLM on the students' gold test rows (raw and calibrated), each
student's gap to its teacher, calibration before/after with a reliability diagram, the review
counts and the cost side (items/s of teacher and student, measured in the same run)."""

from __future__ import annotations

import pandas as pd

from lambert_ray import storage
from lambert_ray.calibration import plot_reliability, summary
from lambert_ray.config import PipelineConfig
from lambert_ray.metrics import metrics_from_frame
from lambert_ray.stage import read_output, stage_complete
from lambert_ray.teacher_labels import (
    TEACHERS,
    ensure_calibration,
    gold_ids,
    llm_labels,
    probs_matrix,
    teacher_dirs,
    teacher_of,
)


def teacher_test_frames(cfg: PipelineConfig) -> dict[str, pd.DataFrame]:
    """Each complete teacher's rows on the gold test set (labelled, not errored)."""
    out = {}
    for src in TEACHERS:
        if stage_complete(storage.join(cfg.run_dir, teacher_dirs(src)["test"])) is None:
            continue
        df = llm_labels(cfg, src, "test")
        out[src] = df[df["error"].isna() & df["gold"].isin(cfg.labels.names)].reset_index(drop=True)
    return out


def teacher_rows(cfg: PipelineConfig, frames: dict[str, pd.DataFrame], names: dict[str, str]) -> list[dict]:
    """Table rows: each teacher on the gold test rows, raw and (when on) calibrated."""
    cals = ensure_calibration(cfg)
    where = "gold test" + (" (sample)" if cfg.data.llm_eval_limit else "")
    rows = []
    for src, df in frames.items():
        trained = "gold train" if src == "annotate_peft" else "-"
        rows.append({"system": names[src], "trained_on": trained, "evaluated_on": where,
                     **metrics_from_frame(df, cfg.labels.names, "gold", "label_raw")})
        cal = cals.get(src)
        if cal is not None and cal.method != "none":
            rows.append({"system": f"{names[src]}, calibrated ({cal.method})", "trained_on": trained,
                         "evaluated_on": where, "teacher": src,
                         **metrics_from_frame(df, cfg.labels.names, "gold", "label")})
    return rows


def student_gap(cfg: PipelineConfig, setting: str, frames: dict[str, pd.DataFrame]) -> dict | None:
    """The student's accuracy minus its teacher's (the labels it learned from, calibrated when
    on), in points, on the gold test rows both labelled."""
    src = teacher_of(cfg, setting)
    teacher = frames.get(src)
    out = storage.join(cfg.run_dir, "test", setting)
    if teacher is None or stage_complete(out) is None:
        return None
    student = read_output(out, ["row_id", "gold", "label", "error"])
    both = teacher[["row_id", "gold", "label"]].merge(
        student[student["error"].isna()][["row_id", "label"]], on="row_id", suffixes=("_t", "_s"))
    if both.empty:
        return None
    acc_t = float((both["label_t"] == both["gold"]).mean())
    acc_s = float((both["label_s"] == both["gold"]).mean())
    return {"teacher": src, "n": len(both), "teacher_accuracy": acc_t,
            "student_accuracy": acc_s, "gap_points": round(100 * (acc_s - acc_t), 2)}


def calibration_section(cfg: PipelineConfig, frames: dict[str, pd.DataFrame]) -> dict:
    """Per teacher: the fitted calibration, accuracy / ECE / NLL before and after on the gold test
    rows (never used for fitting), and a reliability diagram PNG in <run_dir>/calibration/."""
    labels, cals, out = cfg.labels.names, ensure_calibration(cfg), {}
    for src, df in frames.items():
        cal = cals.get(src)
        if cal is None or df.empty:
            continue
        y = gold_ids(df, labels)
        raw = probs_matrix(df.assign(probs=df["probs_raw"]))
        after = cal.apply(raw)
        png = storage.join(cfg.run_dir, "calibration", f"reliability_{src}.png")
        storage.write_bytes(png, plot_reliability(
            {"raw": (raw, y), f"calibrated ({cal.method})": (after, y)},
            f"{src}: {len(y)} gold test rows"))
        out[src] = {"calibration": cal.to_dict(), "before": summary(raw, y, labels),
                    "after": summary(after, y, labels), "plot": png}
    return out


def _items_per_s(cfg: PipelineConfig, rel: str) -> dict | None:
    done = stage_complete(storage.join(cfg.run_dir, rel))
    t = (done or {}).get("timing")
    if not t or not t.get("rows") or not t.get("seconds"):
        return None
    return {"stage": rel, "rows": t["rows"], "seconds": t["seconds"],
            "items_per_s": t["rows"] / t["seconds"]}


def cost_section(cfg: PipelineConfig) -> dict | None:
    """Teacher annotation vs student classification throughput, from this run's stage timings
    (pool start-up included in both)."""
    teacher = _items_per_s(cfg, teacher_of(cfg, cfg.bert.classify_with))
    student = _items_per_s(cfg, "classify")
    if teacher is None or student is None:
        return None
    return {"teacher": teacher, "student": student,
            "student_vs_teacher": student["items_per_s"] / teacher["items_per_s"]}


def review_section(cfg: PipelineConfig) -> dict | None:
    path = storage.join(cfg.run_dir, "review", "summary.json")
    return {**storage.read_json(path), "dir": storage.join(cfg.run_dir, "review")} \
        if storage.exists(path) else None


def to_markdown(report: dict) -> list[str]:
    """Markdown lines for the calibration, review and cost sections of `report`."""
    lines: list[str] = []
    if report.get("calibration"):
        lines += ["", "## Calibration of the annotator (gold test rows, not used for fitting)", "",
                  "| teacher | method | T | fitted on | n | accuracy before -> after | ECE before -> after | predicted before -> after |",
                  "|---|---|---:|---|---:|---|---|---|"]
        for src, c in report["calibration"].items():
            cal, b, a = c["calibration"], c["before"], c["after"]
            lines.append(f"| {src} | {cal['method']} | {cal['temperature']:.2f} | {cal['fitted_on']} "
                         f"({cal['n_fit']}) | {b['n']} | {b['accuracy']:.1%} -> {a['accuracy']:.1%} | "
                         f"{b['ece']:.3f} -> {a['ece']:.3f} | {_hist(b['predicted'])} -> "
                         f"{_hist(a['predicted'])} |")
        lines += ["", "Reliability diagrams: " + ", ".join(c["plot"] for c in report["calibration"].values())]
    if report.get("review"):
        r = report["review"]
        lines += ["", "## Rows to review", "",
                  f"{r['rows_flagged']} of {r['rows_compared']} annotated rows flagged "
                  f"({r['disagree']} student/teacher disagreements, {r['low_confidence']} with teacher "
                  f"confidence < {r['min_confidence']}); ranked in {r['dir']}/review.csv. Fill its "
                  "`label` column and pass it back as `data.gold_extra`."]
    if report.get("cost"):
        c = report["cost"]
        t, s = c["teacher"], c["student"]
        lines += ["", "## Cost (this run, same machine)", "",
                  "| who | stage | rows | seconds | items/s |", "|---|---|---:|---:|---:|",
                  f"| teacher (LLM) | {t['stage']} | {t['rows']} | {t['seconds']:.1f} | {t['items_per_s']:.1f} |",
                  f"| student (BERT) | {s['stage']} | {s['rows']} | {s['seconds']:.1f} | {s['items_per_s']:.1f} |",
                  "", f"The student classifies **{c['student_vs_teacher']:.1f}x** more items per second "
                  "than the teacher labels them (wall time, pool start-up included)."]
    return lines


def _hist(pred: dict) -> str:
    n = sum(pred.values()) or 1
    return "/".join(f"{100 * v / n:.0f}" for v in pred.values()) + " %"
