"""The run report: LlamBERT's table (LLM 0-shot, BERT on LLM labels / gold / both) measured
against gold, per-stage row counts, written as report.md + report.json in the run directory."""

from __future__ import annotations

from lambert_ray import layout, storage
from lambert_ray.config import PipelineConfig
from lambert_ray.metrics import metrics_from_frame
from lambert_ray.report_teacher import (
    calibration_section,
    cost_section,
    review_section,
    student_gap,
    teacher_rows,
    teacher_test_frames,
)
from lambert_ray.report_teacher import to_markdown as teacher_markdown
from lambert_ray.stage import read_output, stage_complete
from lambert_ray.students import SETTINGS, student_epochs, student_title
from lambert_ray.tune_report import to_markdown as tune_markdown


def _rows(cfg: PipelineConfig) -> list[dict]:
    labels = cfg.labels.names
    rows = []

    def add(system: str, trained_on: str, evaluated_on: str, out_dir: str) -> dict | None:
        if stage_complete(out_dir) is None:
            return None
        df = read_output(out_dir, ["gold", "label"])
        if df["gold"].notna().any():
            m = metrics_from_frame(df, labels)
            rows.append({"system": system, "trained_on": trained_on, "evaluated_on": evaluated_on, **m})
            return rows[-1]
        return None

    llm = cfg.llm.model + (f" + {cfg.llm.adapter}" if cfg.llm.adapter else "")
    tuned, method = "", None
    if cfg.peft is not None and cfg.peft.enabled:
        tune = _tune_summary(cfg)  # with tune.enabled the adapter is the experiment's choice
        method = tune["choice"]["method"] if tune and tune["choice"] else cfg.peft.method
        tuned = f"{method} adapter"
    names = {"annotate": f"LLM 0-shot ({llm})", "annotate_peft": f"LLM + {tuned} ({cfg.llm.model})"}
    # The teachers on the students' gold test rows (raw, and calibrated when on).
    frames = teacher_test_frames(cfg)
    rows += teacher_rows(cfg, frames, names)
    add(names["annotate"], "-", "annotated corpus subset", layout.run_path(cfg, layout.ANNOTATE))
    meta_path = storage.join(layout.adapter_dir(cfg, method or ""), layout.ADAPTER_META)
    if tuned and storage.exists(meta_path):  # the peft stage's own check, before and after
        meta = storage.read_json(meta_path)
        for key, system, trained in (("dev_before", names["annotate"], "-"),
                                     ("dev_after", names["annotate_peft"], "gold train")):
            if meta.get(key):
                rows.append({"system": system, "trained_on": trained,
                             "evaluated_on": "gold dev (peft stage)", **meta[key]})
    if tuned:
        add(names["annotate_peft"], "gold train", "annotated corpus subset",
            layout.run_path(cfg, layout.ANNOTATE_PEFT))
    for setting in cfg.bert.settings:
        mpath = storage.join(layout.student_dir(cfg, setting), layout.STUDENT_DONE)
        n_train = storage.read_json(mpath).get("train_rows") if storage.exists(mpath) else None
        row = add(student_title(setting, method), f"{n_train} rows", "gold test",
                  layout.student_test_dir(cfg, setting))
        if row is not None:
            row["gap_to_teacher"] = student_gap(cfg, setting, frames)
            row["student"] = _student_summary(cfg, setting, mpath)
    add(f"{student_title(cfg.bert.classify_with, method)} (corpus)", "-", "classified corpus",
        layout.run_path(cfg, layout.CLASSIFY))
    return rows


def _student_summary(cfg: PipelineConfig, setting: str, metrics_path: str) -> dict:
    """How a student was trained: targets, kept epoch (best gold dev) and its training labels' mix."""
    m = storage.read_json(metrics_path)
    bal = m.get("class_balance") or {}
    base = SETTINGS[setting].init_from
    targets = ("hard" if SETTINGS[setting].sources == ("gold",) else cfg.bert.targets)
    return {"setting": setting, "targets": f"{base} student, then {targets}" if base else targets,
            "rows": m.get("train_rows"), "kept_epoch": m.get("kept_epoch"),
            "epochs": student_epochs(setting, cfg.bert), "dev_accuracy": m.get("dev_accuracy"),
            "label_share": bal.get("share"), "skewed": bal.get("skewed")}


def _tune_summary(cfg: PipelineConfig) -> dict | None:
    """The Ray Tune comparison (per-method rows + the choice) when tune.enabled produced one."""
    if cfg.tune is None or not cfg.tune.enabled:
        return None
    results_dir = layout.tune_results(cfg)
    path = storage.join(results_dir, "tune_results.json")
    if not storage.exists(path):
        return None
    data = storage.read_json(path)
    return {"metric": data["metric"], "methods": data["methods"], "choice": data["choice"],
            "results_dir": results_dir}


def _counts(cfg: PipelineConfig) -> dict:
    out = {}
    for rel in storage.find_dirs_with(cfg.run_dir, layout.STAGE_COMPLETE):
        done = stage_complete(storage.join(cfg.run_dir, rel))
        if done.get("fan_out"):  # one row per adapter (annotate_adapters/)
            out.update({f"{rel}[{k}]": c for k, c in done["counts"].items()})
        else:
            out[rel] = done["counts"]
    return dict(sorted(out.items()))


def to_markdown(report: dict) -> str:
    lines = [f"# lambert_ray run: {report['run']}", "",
             "| system | trained on | evaluated on | n | accuracy | macro-F1 | gap to teacher |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in report["table"]:
        gap = r.get("gap_to_teacher")
        gap_s = f"{gap['gap_points']:+.1f} pts" if gap else ""
        lines.append(f"| {r['system']} | {r['trained_on']} | {r['evaluated_on']} | {r['n']} | "
                     f"{r['accuracy']:.1%} | {r['macro_f1']:.3f} | {gap_s} |")
    if any(r.get("gap_to_teacher") for r in report["table"]):
        lines += ["", "Gap to teacher: the student's accuracy minus that of the LLM whose labels "
                  "it learned from (calibrated when calibration is on), in points, on the gold "
                  "test rows both labelled."]
    students = [r["student"] for r in report["table"] if r.get("student")]
    if students:
        lines += ["", "## Students", "", "| setting | targets | rows | kept epoch (best gold dev) "
                  "| dev accuracy | label mix |", "|---|---|---:|---|---:|---|"]
        for st in students:
            mix = ", ".join(f"{k} {v:.0%}" for k, v in (st["label_share"] or {}).items())
            kept = st["kept_epoch"] + 1 if st["kept_epoch"] is not None else "-"
            if kept == 0:  # llm-then-gold kept its starting student: the gold epochs did not help dev
                kept = "start"
            dev = f"{st['dev_accuracy']:.1%}" if st["dev_accuracy"] is not None else "-"
            lines.append(f"| {st['setting']} | {st['targets']} | {st['rows']} | {kept} of "
                         f"{st['epochs']} | {dev} | {mix}{' (skewed)' if st['skewed'] else ''} |")
    lines += ["", "## Rows per stage", "", "| stage | rows in | ok | errored | resumed | balanced |",
              "|---|---:|---:|---:|---:|---|"]
    for name, c in report["counts"].items():
        bal = c["rows_in"] == c["rows_ok"] + c["rows_errored"]
        lines.append(f"| {name} | {c['rows_in']} | {c['rows_ok']} | {c['rows_errored']} | "
                     f"{c.get('resumed_rows', 0)} | {'yes' if bal else 'NO'} |")
    if report.get("per_class"):
        lines += ["", "## Per class (first row of the table)", "", "| class | precision | recall | F1 | support |",
                  "|---|---:|---:|---:|---:|"]
        for name, pc in report["per_class"].items():
            lines.append(f"| {name} | {pc['precision']:.3f} | {pc['recall']:.3f} | {pc['f1']:.3f} | {pc['support']} |")
    lines += teacher_markdown(report)
    if report.get("tune"):
        t = report["tune"]
        lines += ["", "## PEFT comparison (Ray Tune, gold dev)", "",
                  tune_markdown(t["methods"], t["choice"], t["metric"]).rstrip(),
                  "", f"Plots and CSV: {t['results_dir']}"]
    return "\n".join(lines) + "\n"


def build_report(cfg: PipelineConfig) -> dict:
    table = _rows(cfg)
    frames = teacher_test_frames(cfg)
    report = {"run": cfg.run.name, "run_dir": cfg.run_dir, "table": table, "counts": _counts(cfg),
              "per_class": table[0]["per_class"] if table else {}, "tune": _tune_summary(cfg),
              "calibration": calibration_section(cfg, frames), "review": review_section(cfg),
              "cost": cost_section(cfg)}
    storage.write_json(layout.run_path(cfg, layout.REPORT_JSON), report)
    storage.write_text(layout.run_path(cfg, layout.REPORT_MD), to_markdown(report))
    return report
