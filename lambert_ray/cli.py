"""`lambert-ray` command line: one config (YAML + --set overrides) drives every stage.

    lambert-ray run                               # the whole pipeline on the demo config
    lambert-ray run --config configs/ag_news_smollm2.yaml --set data.annotate_sample=200
    lambert-ray annotate | train-bert | classify | evaluate --config ...
    lambert-ray plan --config ...                 # prompt, rows, time and cost; runs nothing
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lambert_ray import storage
from lambert_ray.config import ConfigError, PipelineConfig, load_config
from lambert_ray.console import enable as enable_progress
from lambert_ray.console import set_verbose

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="LlamBERT on Ray: LLM labels a subset, a BERT classifies the corpus.")
console = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (default: configs/demo-sst2.yaml)")
SetOpt = typer.Option([], "--set", "-s", help="Override a field: section.key=value (repeatable)")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Show Ray's own logs, progress bars and "
                          "Tune tables (default: one progress line per stage)")


def _load(config: Path | None, overrides: list[str], verbose: bool = False) -> PipelineConfig:
    set_verbose(verbose)
    enable_progress(sys.stderr)
    level = os.environ.get("LAMBERT_LOG", "INFO" if verbose else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not verbose and "LAMBERT_LOG" not in os.environ:
        # Libraries' start-up notes (bitsandbytes' missing CPU kernels, Ray Data's filter tips)
        # are for --verbose; init_ray quiets Ray's own loggers.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.")
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


def print_report(report: dict) -> None:
    table = Table(title=f"lambert_ray — {report['run']}")
    for col in ("system", "trained on", "evaluated on", "n", "accuracy", "macro-F1", "vs teacher"):
        table.add_column(col, justify="left" if col in ("system", "trained on", "evaluated on")
                         else "right")
    for r in report["table"]:
        gap = r.get("gap_to_teacher")
        table.add_row(r["system"], str(r["trained_on"]), r["evaluated_on"], str(r["n"]),
                      f"{r['accuracy']:.1%}", f"{r['macro_f1']:.3f}",
                      f"{gap['gap_points']:+.1f} pts" if gap else "")
    Console().print(table)
    counts = Table(title="rows per stage")
    for col in ("stage", "in", "ok", "errored", "resumed"):
        counts.add_column(col)
    for name, c in report["counts"].items():
        counts.add_row(name, str(c["rows_in"]), str(c["rows_ok"]), str(c["rows_errored"]),
                       str(c.get("resumed_rows", 0)))
    Console().print(counts)
    Console().print(f"report: {report['run_dir']}/report.md")


def error_line(e: BaseException) -> str:
    """`Type: reason` for the user; an error raised inside a Ray task (e.g. a file that cannot
    be read) is shown as its cause's first line, without the Ray trace."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, Exception):
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    return f"{type(e).__name__}: {e}"


def _run(cfg: PipelineConfig, stages: list[str] | None) -> dict:
    from lambert_ray.pipeline import run_pipeline

    t0 = time.perf_counter()

    def on_stage(name: str) -> None:
        console.rule(f"[bold]{name}[/bold]  (+{time.perf_counter() - t0:.0f}s)")

    try:
        out = run_pipeline(cfg, stages, on_stage=on_stage)
    except Exception as e:  # a clear one-line reason; the traceback with LAMBERT_LOG=DEBUG
        if os.environ.get("LAMBERT_LOG") == "DEBUG":
            raise
        console.print(error_line(e), style="red", markup=False)
        raise typer.Exit(1) from None
    console.print(f"done in {time.perf_counter() - t0:.0f}s")
    return out


@app.command()
def run(config: Path | None = ConfigOpt, set_: list[str] = SetOpt,
        verbose: bool = VerboseOpt) -> None:
    """The whole pipeline: annotate -> (peft) -> train-bert -> classify -> evaluate."""
    print_report(_run(_load(config, set_, verbose), None))


@app.command()
def annotate(config: Path | None = ConfigOpt, set_: list[str] = SetOpt,
             verbose: bool = VerboseOpt) -> None:
    """LLM-label the corpus sample (and the gold-test sample) into <run_dir>/annotate."""
    _run(_load(config, set_, verbose), ["annotate"])


@app.command("train-bert")
def train_bert(config: Path | None = ConfigOpt, set_: list[str] = SetOpt,
               verbose: bool = VerboseOpt) -> None:
    """Train the BERT students (Ray Train) on LLM labels / gold / both."""
    _run(_load(config, set_, verbose), ["train-bert"])


@app.command()
def classify(config: Path | None = ConfigOpt, set_: list[str] = SetOpt,
             verbose: bool = VerboseOpt) -> None:
    """Score the gold test set with each student, and classify the corpus."""
    _run(_load(config, set_, verbose), ["classify"])


@app.command()
def evaluate(config: Path | None = ConfigOpt, set_: list[str] = SetOpt,
             verbose: bool = VerboseOpt) -> None:
    """Metrics against gold and the run report (report.md / report.json)."""
    print_report(_run(_load(config, set_, verbose), ["evaluate"]))


@app.command()
def finetune(config: Path | None = ConfigOpt, method: str | None = typer.Option(
        None, "--method", "-m", help="PEFT method (default: peft.method): lora, dora, prefix_tuning, "
        "p_tuning, prompt_tuning, ia3"), set_: list[str] = SetOpt,
        verbose: bool = VerboseOpt) -> None:
    """PEFT-tune the annotator LLM on the gold train subset (Ray Train + DeepSpeed) into
    <run_dir>/peft/<method>/ (peft adapter + metadata.json)."""
    from lambert_ray.pipeline import run_peft_stage
    from lambert_ray.ray_utils import init_ray

    cfg = _load(config, [*set_, *([f"peft.method={method}"] if method else [])], verbose)
    if cfg.peft is None:  # no peft section in the file: the defaults, with --method
        cfg = _load(config, [*set_, f"peft.method={method or 'lora'}"], verbose)
    init_ray(cfg.run.ray_address, cfg.run.num_cpus)
    out = run_peft_stage(cfg, reannotate=False)
    console.print(f"adapter: {out['adapter']}\n  dev before: {out['dev_before']}\n"
                  f"  dev after:  {out['dev_after']}")


@app.command()
def plan(config: Path | None = ConfigOpt, set_: list[str] = SetOpt,
         calib_rows: int = typer.Option(64, "--calib-rows", "-n", min=1,
                                        help="Corpus rows for the measured calibration."),
         rows: list[str] = typer.Option([], "--rows", help="Row count of an input the plan cannot "
                                        "count here, e.g. corpus=50000 (corpus, gold_train, "
                                        "gold_dev, gold_test; repeatable)"),
         text_tokens: int = typer.Option(100, "--text-tokens", min=1, help="Text tokens per row "
                                         "assumed where no sample text is readable (hf:// corpora)."),
         no_calibrate: bool = typer.Option(False, "--no-calibrate", help="Skip the measurement "
                                           "(no model weights loaded; no time estimate here)."),
         rates: Path | None = typer.Option(None, "--rates", help="Use the calibration of an "
                                           "earlier `plan --json` (its file) instead of measuring."),
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
         verbose: bool = VerboseOpt) -> None:
    """What a run would do and cost, without running it: the prompt and its token counts, rows
    per stage, a short calibration on this machine, the wall time per stage here, GPU-hours and
    cost for a GPU config, and warnings for settings that multiply cost. No Ray, no training."""
    import json

    from lambert_ray.plan import TABLES, make_plan
    from lambert_ray.plan_render import render_plan

    cfg = _load(config, set_, verbose)
    given = {}
    for item in rows:
        name, _, n = item.partition("=")
        if name not in TABLES or not n.strip().isdigit():
            console.print(f"[red]--rows {item!r}: expected NAME=N with NAME in {', '.join(TABLES)}[/red]")
            raise typer.Exit(2)
        given[name] = int(n)
    try:
        given_rates = json.loads(rates.read_text()) if rates else None
        if given_rates is not None and "calibration" in given_rates:  # a whole plan
            given_rates = given_rates["calibration"]
        out = make_plan(cfg, calib_rows=calib_rows, given_rows=given, calibrate=not no_calibrate,
                        text_tokens=text_tokens, rates=given_rates)
    except Exception as e:  # one clear line; the traceback with LAMBERT_LOG=DEBUG
        if os.environ.get("LAMBERT_LOG") == "DEBUG":
            raise
        console.print(f"[red]{type(e).__name__}: {e}[/red]")
        raise typer.Exit(1) from None
    sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n" if as_json else render_plan(out))


@app.command("show-config")
def show_config(config: Path | None = ConfigOpt, set_: list[str] = SetOpt,
                verbose: bool = VerboseOpt) -> None:
    """Print the resolved, validated config as YAML."""
    import yaml

    sys.stdout.write(yaml.safe_dump(_load(config, set_, verbose).model_dump(mode="json"), sort_keys=False))


@app.command("tune")
def tune_cmd(config: Path | None = ConfigOpt, set_: list[str] = SetOpt,
             verbose: bool = VerboseOpt) -> None:
    """Ray Tune over the PEFT methods in tune.methods (ASHA, seeds); writes the per-method table,
    plots and the chosen adapter under tune.storage_path (default <run_dir>/tune). Rerunning
    restores the experiment (finished trials are kept)."""
    from lambert_ray.data import load_gold
    from lambert_ray.ray_utils import init_ray
    from lambert_ray.tune import run_tune

    cfg = _load(config, set_, verbose)
    if cfg.tune is None or cfg.peft is None:  # sections absent in the file: the defaults
        cfg = _load(config, [*set_, "tune.enabled=false", "peft.enabled=true"], verbose)
    init_ray(cfg.run.ray_address, cfg.run.num_cpus)
    t0 = time.perf_counter()
    train, dev = load_gold(cfg)
    if not train or not dev:
        console.print("[red]tune: needs gold rows in data.gold_train and data.gold_dev[/red]")
        raise typer.Exit(1)
    outcome = run_tune(cfg, train, dev)
    sys.stdout.write(storage.read_text(storage.join(outcome.results_dir, "tune_results.md")))
    console.print(f"done in {time.perf_counter() - t0:.0f}s; results: {outcome.results_dir}; "
                  f"chosen adapter: {outcome.adapter_dir}")
    if outcome.adapter_dir is None:
        raise typer.Exit(1)


@app.command("study")
def study_cmd(configs: list[Path] = typer.Option(..., "--config", "-c", help="A study config "
                                                 "(one task each; repeat for several tasks)."),
              set_: list[str] = SetOpt,
              out: Path = typer.Option(Path("results/peft_study"), "--out", "-o",
                                       help="Where the tables, paired comparisons and plots go."),
              phase: int | None = typer.Option(None, "--phase", min=1, max=3, help="Run only "
                                               "phase 1 (lr sweep), 2 (budgets x seeds) or 3 "
                                               "(the downstream check, study.downstream)."),
              report_only: bool = typer.Option(False, "--report-only", help="No training: "
                                               "rewrite the report from the finished trials."),
              downstream: Path | None = typer.Option(None, "--downstream", help="Student vs "
                                                     "annotator accuracies (CSV/JSON) to plot, "
                                                     "instead of the study's own check."),
              verbose: bool = VerboseOpt) -> None:
    """The PEFT study under Ray Tune: per method an lr sweep on dev (phase 1), then every method
    at its lr x gold budgets x seeds (phase 2), best dev epoch kept, verdict on test rows that
    selection never saw. Rerunning resumes (finished trials are never rerun). Writes table.md /
    .json, paired.md and plots to --out."""
    import shlex

    from lambert_ray.study import prepare_rows, read_study, run_study
    from lambert_ray.study_downstream import finished_downstream, run_downstream
    from lambert_ray.study_report import load_preds, write_report

    cfgs = [_load(c, set_, verbose) for c in configs]
    for c, path in zip(cfgs, configs, strict=True):
        if c.study is None:
            console.print(f"[red]{path}: no study section[/red]")
            raise typer.Exit(2)
        if phase == 3 and c.study.downstream is None:
            console.print(f"[red]{path}: --phase 3 needs a study.downstream section[/red]")
            raise typer.Exit(2)
    t0 = time.perf_counter()
    outcomes, down_rows = [], []
    for cfg in cfgs:
        if report_only:
            outcomes.append(read_study(cfg))
        else:
            from lambert_ray.ray_utils import init_ray

            init_ray(cfg.run.ray_address, cfg.run.num_cpus)
            phases = {None: (1, 2), 1: (1,), 2: (2,), 3: ()}[phase]
            outcomes.append(run_study(cfg, phases=phases))
            console.print(f"{outcomes[-1].summary['task']}: {len(outcomes[-1].records)} trials "
                          f"finished (+{time.perf_counter() - t0:.0f}s)")
        o = outcomes[-1]
        stopped = None if report_only else o.summary.get("interrupted")
        if stopped:
            console.print(f"[yellow]{o.summary['task']}: phase {stopped[1:]} was interrupted; "
                          "the study stops here (rerun the command to resume)[/yellow]")
            break
        if cfg.study.downstream is not None:
            if not report_only and phase in (None, 3):
                down_rows += run_downstream(cfg, prepare_rows(cfg), o.records)
            else:
                down_rows += finished_downstream(cfg, prepare_rows(cfg), o.records) or []
    tasks = [{"summary": o.summary, "records": o.records,
              "preds": load_preds(o.study_dir, [r["key"] for r in o.records])} for o in outcomes]
    command = "lambert-ray study " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    write_report(tasks, str(out), downstream=str(downstream) if downstream else down_rows or None,
                 command=f"{command}\n# {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}, "
                         f"{time.perf_counter() - t0:.0f}s, {os.cpu_count()} cores")
    sys.stdout.write((out / "table.md").read_text())
    console.print(f"results: {out}")


if __name__ == "__main__":
    app()
