"""`lambert-ray plan`: what a config will do and cost, before any of it runs. No Ray, no training.

    plan = make_plan(cfg, calib_rows=64)     # a JSON-ready dict
    print(render_plan(plan))                 # lambert_ray.plan_render

The plan holds: the rendered prompt split into prefix / text / suffix with token counts and each
label's verbaliser tokens; rows per stage (from the config and cheap row counts of the inputs);
a calibration measured here (N rows through the annotator, with a fresh adapter when a peft
stage is configured, one PEFT training pass, the student's train step and classify); the wall
time each stage would take here (measured rates x rows + the fixed costs below); for a config
that puts models on GPUs, GPU-hours and cost from `gpu_table` (docs/cluster.md); and warnings
for the settings that multiply cost.

Per-set rates scale the calibration rate by tokens: a gold set whose rows are twice as long as
the corpus sample's is scored at half the rate (cost ~ tokens at these lengths).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from lambert_ray import gpu_table
from lambert_ray.config import PipelineConfig
from lambert_ray.plan_cluster import TABLES, estimate_cluster, tune_trials
from lambert_ray.plan_measure import (
    TokenStats,
    calibrate_llm,
    calibrate_student,
    count_rows,
    head_sample,
    load_tokenizers,
    token_stats,
)
from lambert_ray.prompts import PromptBuilder, render_prompt
from lambert_ray.students import SETTINGS, student_epochs
from lambert_ray.teacher_labels import needs_dev

# Fixed costs on one machine (seconds). Sources: the pool start-up from the two-size fit in
# results/bench_ray_pool.json (8-18 s including the model load, which plan measures apart); the
# Train fit from the measured demo (three students in 6 min); the scan from issue 12 (read,
# normalise and sort of 1M rows: 38 s); Ray's local start and the report are rounded guesses.
FIXED = {
    "ray_start_s": 8.0,  # `init_ray` + the driver's imports (guess)
    "pool_start_s": 8.0,  # one Ray Data actor pool: actor process, imports, first repartition
    "ray_train_fit_s": 35.0,  # one TorchTrainer.fit: worker group, gloo, dataset, checkpoints
    "scan_s_per_row": 38e-6,  # read + normalise + sample sort, per corpus row
    "evaluate_s": 5.0,  # metrics + report (guess)
}


def table_counts(cfg: PipelineConfig, given: dict[str, int] | None = None) -> dict[str, int | None]:
    """Rows of each configured input table (`given` wins, e.g. for hf:// sources)."""
    given = given or {}
    out: dict[str, int | None] = {}
    for name in TABLES:
        src = getattr(cfg.data, name)
        out[name] = given.get(name, count_rows(src, cfg.data.data_dir) if src else 0)
    return out


def stage_rows(cfg: PipelineConfig, counts: dict[str, int | None]) -> dict[str, Any]:
    """Rows each stage handles, following pipeline.py: the LLM labels a sample of the corpus
    (disjoint from the gold sets) and a sample of the gold test set; each student trains on its
    setting's rows; classify scores the test set once per student and the corpus up to the limit."""
    d, pc = cfg.data, cfg.peft
    corpus, test = counts["corpus"], counts["gold_test"]
    gold = min(d.gold_train_sample or 10**18, counts["gold_train"]) if counts["gold_train"] is not None \
        else d.gold_train_sample
    annotate = d.annotate_sample if corpus is None else min(d.annotate_sample, corpus)
    llm_eval = (min(d.llm_eval_limit or test, test) if test is not None else d.llm_eval_limit) \
        if d.gold_test else 0
    dev_rows = counts["gold_dev"] or 0
    calib_dev = min(cfg.calibration.dev_limit or dev_rows, dev_rows) if needs_dev(cfg) else 0
    rows: dict[str, Any] = {"annotate": annotate, "llm_eval": llm_eval or 0, "gold_train": gold,
                            "llm_dev": calib_dev,
                            # with a peft stage and peft.zero_shot off, only the tuned LLM labels
                            "zero_shot": pc is None or not pc.enabled or pc.zero_shot}
    if pc is not None and pc.enabled:
        rows["peft_train"] = min(pc.max_train or gold or 0, gold or 0)
        rows["peft_dev"] = min(pc.max_dev or dev_rows, dev_rows)
        rows["peft_epochs"] = pc.epochs
    per_source = {"llm": annotate, "llm-0shot": annotate, "gold": gold or 0}
    rows["students"] = {s: sum(per_source[src] for src in SETTINGS[s].sources)
                        for s in cfg.bert.settings}
    rows["student_dev"] = counts["gold_dev"] or 0
    rows["classify_test"] = (test or 0) * len(cfg.bert.settings)
    limit = d.classify_limit
    rows["classify_corpus"] = (limit if corpus is None else min(limit, corpus)) if limit else corpus
    rows["corpus"] = corpus
    return rows


def uses_gpu(cfg: PipelineConfig) -> bool:
    """Whether the config puts a model on a GPU (a cluster config)."""
    return (cfg.llm.device == "cuda" or cfg.annotate.num_gpus > 0 or cfg.classify.num_gpus > 0
            or cfg.bert.use_gpu or bool(cfg.peft and cfg.peft.enabled and cfg.peft.use_gpu))


class _Chars:
    """Stand-in tokenizer where the real one is unavailable: one token per 4 characters (ids
    from the characters, so different texts get different ids)."""

    chat_template = None
    bos_token_id = None
    pad_token_id = 0

    def _ids(self, text: str) -> list[int]:
        return [1 + sum(map(ord, text[i:i + 4])) for i in range(0, max(len(text), 1), 4)]

    def __call__(self, texts, add_special_tokens=False, **_):
        if isinstance(texts, str):
            return {"input_ids": self._ids(texts)}
        return {"input_ids": [self._ids(t) for t in texts]}


def prompt_preview(builder: PromptBuilder, tok, cfg: PipelineConfig, texts: list[str]) -> dict:
    """The prompt's three runs for up to two rows, with token counts, and the verbalisers."""
    decode = getattr(tok, "convert_ids_to_tokens", None)
    rows = []
    for text, enc in zip(texts[:2], builder.encode(texts[:2]), strict=True):
        n_text = len(enc.ids) - len(builder.suffix_ids)
        rows.append({"text": text, "text_tokens": n_text, "truncated": enc.truncated,
                     "total_tokens": len(builder.prefix_ids) + len(enc.ids),
                     "rendered": render_prompt(tok, cfg.prompt, cfg.labels, text)})
    return {
        "prefix": builder.prefix_text, "prefix_tokens": len(builder.prefix_ids),
        "suffix": builder.suffix_text, "suffix_tokens": len(builder.suffix_ids),
        "max_text_tokens": builder.max_text_tokens, "rows": rows,
        "verbalisers": [{"label": name, "answer": ans, "tokens": len(ids),
                         "pieces": decode(ids) if decode else None}
                        for name, ans, ids in zip(cfg.labels.names, cfg.labels.answers,
                                                  builder.verbalisers, strict=True)],
        "exact_tokens": not isinstance(tok, _Chars),
    }


def _scaled(rate: float | None, calib_tokens: float, set_tokens: float) -> float | None:
    return None if not rate else rate * calib_tokens / max(set_tokens, 1e-9)


def estimate_here(cfg: PipelineConfig, rows: dict, stats: dict[str, TokenStats | None],
                  calib: dict, n_prefix: int, ref: TokenStats) -> dict[str, dict]:
    """Seconds per stage on this machine: measured rates x rows (scaled by each set's tokens per
    row against `ref`, the calibration rows' tokens) + FIXED costs + the measured model loads.
    A stage whose inputs are unknown has seconds None."""
    f, c = FIXED, calib
    corpus = stats.get("corpus") or ref

    def llm_s(n: int, table: str, key: str = "annotate_items_per_s") -> float:
        s = stats.get(table) or corpus
        return n / _scaled(c[key], ref.llm_row_mean, s.llm_row_mean)

    def stu_s(n: int, table: str, key: str) -> float:
        s = stats.get(table) or corpus
        return n / _scaled(c[key], ref.student_mean, s.student_mean or ref.student_mean)

    load, sload, pool = c["llm_load_s"], c["student_load_s"], f["pool_start_s"]
    out: dict[str, dict] = {"start-up": {"seconds": f["ray_start_s"], "parts": {"ray": f["ray_start_s"]}}}
    scan = (rows["corpus"] or 0) * f["scan_s_per_row"]
    def labelling(key: str) -> dict[str, float]:
        """One LLM pass over the samples (annotate, llm_eval, calibration's dev rows) at `key`."""
        p = {"pools+model loads": 2 * (pool + load),
             "annotate rows": llm_s(rows["annotate"], "corpus", key),
             "llm_eval rows": llm_s(rows["llm_eval"], "gold_test", key)}
        if rows["llm_dev"]:
            p["calibration dev rows"] = llm_s(rows["llm_dev"], "gold_dev", key)
        return p

    parts = {"read+sample corpus": scan}
    if rows["zero_shot"]:
        parts.update(labelling("annotate_items_per_s"))
    out["annotate"] = {"seconds": sum(parts.values()), "parts": parts}
    if "peft_train" in rows:
        ep, dev = rows["peft_epochs"], rows["peft_dev"]
        adapter = "annotate_adapter_items_per_s"
        train_tok = n_prefix + (stats.get("gold_train") or corpus).llm_row_mean
        train_rate = _scaled(c["peft_train_rows_per_s"], n_prefix + ref.llm_row_mean, train_tok)
        one = {"Ray Train fit + model load": f["ray_train_fit_s"] + load,
               "train (epochs x rows)": ep * rows["peft_train"] / train_rate,
               "dev scoring (before + each epoch)": llm_s(dev, "gold_dev")
               + ep * llm_s(dev, "gold_dev", adapter)}
        trials = tune_trials(cfg)
        parts = {k + (f" x {trials} trials" if trials > 1 else ""): v * trials for k, v in one.items()}
        if trials > 1 and cfg.tune.max_concurrent_trials > 1:
            parts = {k: v / cfg.tune.max_concurrent_trials for k, v in parts.items()}
        parts["annotate with adapter"] = sum(labelling(adapter).values())
        out["peft"] = {"seconds": sum(parts.values()), "parts": parts}
    parts = {}
    for s, n in rows["students"].items():
        table = "gold_train" if SETTINGS[s].sources == ("gold",) else "corpus"
        parts[f"student {s}"] = (f["ray_train_fit_s"] + sload + student_epochs(s, cfg.bert) * (
            stu_s(n, table, "student_train_rows_per_s")
            + stu_s(rows["student_dev"], "gold_dev", "student_classify_items_per_s")))
    out["train-bert"] = {"seconds": sum(parts.values()), "parts": parts}
    n_set = len(cfg.bert.settings)
    parts = {"pools+model loads": (n_set + 1) * (pool + sload),
             "test rows (each student)": stu_s(rows["classify_test"], "gold_test",
                                               "student_classify_items_per_s")}
    if rows["classify_corpus"] is not None:
        parts["corpus rows"] = (stu_s(rows["classify_corpus"], "corpus", "student_classify_items_per_s")
                                + rows["classify_corpus"] * f["scan_s_per_row"])
    out["classify"] = {"seconds": sum(parts.values()) if rows["classify_corpus"] is not None else None,
                       "parts": parts}
    out["evaluate"] = {"seconds": f["evaluate_s"], "parts": {"report": f["evaluate_s"]}}
    return out


def cost_warnings(cfg: PipelineConfig, preview: dict, stats: dict[str, TokenStats | None],
                  rows: dict, calib: dict, here: dict | None) -> list[str]:
    """Settings that multiply cost, each with the number behind it."""
    w = []
    corpus = stats.get("corpus")
    text = corpus.llm_text_mean if corpus else None
    if preview["suffix_tokens"] > 8:
        share = f" (+{preview['suffix_tokens'] / text:.0%} of a row's text tokens)" if text else ""
        w.append(f"prompt: {preview['suffix_tokens']} tokens after {{text}} are run for every row"
                 f"{share}; move the instruction before {{text}} so it joins the shared prefix "
                 f"({preview['prefix_tokens']} tokens, computed once per actor)")
    multi = [v for v in preview["verbalisers"] if v["tokens"] > 1 and preview["exact_tokens"]]
    if multi:
        names = ", ".join(f"{v['answer']!r} = {v['tokens']} tokens" for v in multi)
        exp = calib.get("expansion", len(cfg.labels.names))
        cost = (f"every row is run {exp}x (once per label) when annotating and in PEFT training"
                if exp > 1 else "scored as the sum of their tokens' log-probs")
        w.append(f"multi-token verbalisers ({names}): {cost}; single-token labels.verbalisers avoid it")
    if not cfg.llm.reuse_prefix:
        w.append(f"llm.reuse_prefix is off: the {preview['prefix_tokens']}-token prefix is recomputed "
                 "for every row")
    if corpus and corpus.llm_truncated > 0.05:
        w.append(f"{corpus.llm_truncated:.0%} of the sampled corpus rows exceed llm.max_length="
                 f"{cfg.llm.max_length} and are cut (flagged 'truncated')")
    pc = cfg.peft
    if pc is not None and pc.enabled:
        base, tuned = calib.get("annotate_items_per_s"), calib.get("annotate_adapter_items_per_s")
        if base and tuned and tuned < 0.8 * base:
            why = " (a prompt-learning adapter: no shared-prefix KV reuse)" \
                if calib.get("adapter_reuse_prefix") is False else ""
            w.append(f"annotating with a {pc.method} adapter runs at {tuned:.1f} items/s against "
                     f"{base:.1f} without{why}; re-annotation pays it on every row")
        if here and "peft" in here:
            p = here["peft"]["parts"]
            dev = next((v for k, v in p.items() if k.startswith("dev scoring")), 0)
            train = next((v for k, v in p.items() if k.startswith("train")), 0)
            if dev > 0.5 * train:
                w.append(f"peft dev scoring ({rows['peft_dev']} rows x {pc.epochs + 1}) costs "
                         f"{dev / 60:.1f} min against {train / 60:.1f} min of training; "
                         "peft.max_dev caps it")
    trials = tune_trials(cfg)
    if trials > 1:
        w.append(f"tune.enabled: {trials} PEFT trials (methods x grid x seeds), "
                 f"{cfg.tune.max_concurrent_trials} at a time; ASHA stops some early")
    n_students = len(cfg.bert.settings)
    if n_students >= 3 and here:
        w.append(f"{n_students} students (bert.settings): each pays a Ray Train start-up "
                 f"(~{FIXED['ray_train_fit_s']:.0f} s) and its own training; together "
                 f"{here['train-bert']['seconds'] / 60:.1f} min here")
    if not uses_gpu(cfg) and cfg.bert.num_workers > 1:
        w.append(f"bert.num_workers={cfg.bert.num_workers} on CPU: workers share this machine's "
                 "cores, so more workers add start-up, not speed")
    corpus_rows = rows.get("corpus")
    if corpus_rows and rows["annotate"] >= corpus_rows:
        w.append("data.annotate_sample covers the whole corpus: the LLM labels everything, and "
                 "the students add cost without saving any")
    if cfg.data.classify_limit is None and (corpus_rows or 0) > 1_000_000:
        w.append(f"data.classify_limit is unset: every one of {corpus_rows:,} corpus rows is classified")
    return w


def make_plan(cfg: PipelineConfig, calib_rows: int = 64, given_rows: dict[str, int] | None = None,
              calibrate: bool = True, text_tokens: int = gpu_table.DEFAULT_TOKENS_PER_ITEM,
              rates: dict | None = None) -> dict[str, Any]:
    """Everything `lambert-ray plan` prints, as a JSON-ready dict. Loads the models (not Ray)
    to calibrate unless `calibrate` is False or the config puts them on a GPU this box lacks.
    `given_rows` supplies input row counts the plan cannot count (hf:// sources); `text_tokens`
    the tokens per row where no sample text is readable; `rates` a calibration measured before
    (skips measuring)."""
    t0 = time.perf_counter()
    llm_tok, stu_tok, notes = load_tokenizers(cfg)
    tok = llm_tok or _Chars()
    builder = PromptBuilder(tok, cfg.prompt, cfg.labels, cfg.llm.max_length)
    samples = {t: head_sample(cfg, t, 2000, seed=cfg.run.seed) for t in TABLES}
    stats = {t: token_stats(builder, [x for x, _ in s], stu_tok, cfg.bert.max_length) if s else None
             for t, s in samples.items()}
    preview_texts = [x for x, _ in (samples["corpus"] or samples["gold_test"])] or ["<a row's text>"]
    preview = prompt_preview(builder, tok, cfg, preview_texts)
    counts = table_counts(cfg, given_rows)
    rows = stage_rows(cfg, counts)
    calib, ref = _calibration(cfg, samples["corpus"][:calib_rows], builder, stu_tok, notes,
                              calibrate, rates)
    needed = ["annotate_items_per_s", "student_train_rows_per_s", "student_classify_items_per_s"]
    if cfg.peft is not None and cfg.peft.enabled:
        needed += ["annotate_adapter_items_per_s", "peft_train_rows_per_s"]
    here = None
    if ref is not None and all(k in calib for k in needed) and ref.student_mean:
        here = estimate_here(cfg, rows, stats, calib, preview["prefix_tokens"], ref)
        known = [v["seconds"] for v in here.values()]
        here["total"] = {"seconds": sum(known) if None not in known else None, "parts": {}}
    elif calib:
        missing = [k for k in needed if k not in calib]
        notes.append(f"no wall-time estimate here: rates missing ({', '.join(missing) or 'tokens'})")
    cluster = None
    if uses_gpu(cfg):
        cluster = estimate_cluster(cfg, rows, stats, preview["prefix_tokens"],
                                   preview["suffix_tokens"],
                                   calib.get("expansion") or _expansion(preview), text_tokens)
    return {
        "config": {"run": cfg.run.name, "llm": cfg.llm.model, "student": cfg.bert.model,
                   "peft": cfg.peft.method if cfg.peft is not None and cfg.peft.enabled else None},
        "prompt": preview, "table_rows": counts, "stage_rows": rows,
        "tokens": {t: (vars(s) if s else None) for t, s in stats.items()},
        "calibration": calib, "fixed_costs": FIXED, "estimate_here": here, "cluster": cluster,
        "warnings": cost_warnings(cfg, preview, stats, rows, calib, here), "notes": notes,
        "cpus": os.cpu_count(),
        "plan_seconds": time.perf_counter() - t0,
    }


def _calibration(cfg: PipelineConfig, calib_set: list, builder: PromptBuilder, stu_tok,
                 notes: list[str], calibrate: bool, rates: dict | None):
    """(rates, the token stats of the rows they were measured on): measured here now, or
    `rates` given (a plan's "calibration" section from an earlier --json run)."""
    if rates:
        notes.append("rates given (--rates), not measured here")
        return dict(rates), TokenStats(**rates["tokens"])
    if not calibrate:
        notes.append("calibration skipped (--no-calibrate)")
    elif not calib_set:
        notes.append("calibration skipped: no corpus rows readable here (hf:// source)")
    elif uses_gpu(cfg) and not torch.cuda.is_available():
        notes.append("calibration skipped: the config puts models on a GPU and this machine has none")
    else:
        calib: dict[str, Any] = {"load_average_start": os.getloadavg()[0]}
        for fn in (calibrate_llm, calibrate_student):
            try:
                calib.update(fn(cfg, calib_set))
            except Exception as e:  # a model missing offline: the plan goes on without it
                notes.append(f"{fn.__name__} failed: {type(e).__name__}: {str(e)[:200]}")
        # the rates were measured on exactly these rows: other sets scale by their tokens
        ref = token_stats(builder, [x for x, _ in calib_set], stu_tok, cfg.bert.max_length)
        calib["tokens"] = vars(ref)
        calib["load_average_end"] = load = os.getloadavg()[0]
        cpus = os.cpu_count() or 1
        if max(load, calib["load_average_start"]) > cpus:
            notes.append(f"this machine is busy (load average {calib['load_average_start']:.1f} -> "
                         f"{load:.1f} on {cpus} CPUs): the calibration and the estimate here are "
                         "for a machine this busy")
        return calib, ref
    return {}, None


def _expansion(preview: dict) -> int:
    """Rows per label when a verbaliser is multi-token (scoring.make_batch); 1 when the
    tokenizer is unavailable (verbaliser lengths unknown)."""
    v = preview["verbalisers"]
    return len(v) if preview["exact_tokens"] and any(x["tokens"] > 1 for x in v) else 1
