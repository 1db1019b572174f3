"""Text rendering of a `lambert-ray plan` (the dict from `plan.make_plan`)."""

from __future__ import annotations


def _n(x) -> str:
    return "?" if x is None else f"{x:,}"


def _quote(text: str, width: int = 100) -> list[str]:
    lines = text.replace("\r", "").split("\n")
    return [f"    | {ln[:width]}{'...' if len(ln) > width else ''}" for ln in lines]


def _prompt(p: dict) -> list[str]:
    unit = "tokens" if p["exact_tokens"] else "tokens (approx.: ~4 chars/token)"
    out = ["PROMPT  (prefix shared by every row: its KV is computed once per actor)",
           f"  prefix: {p['prefix_tokens']} {unit}", *_quote(p["prefix"])]
    for i, r in enumerate(p["rows"], 1):
        cut = ", truncated" if r["truncated"] else ""
        out += [f"  row {i}: text {r['text_tokens']} + suffix {p['suffix_tokens']} tokens "
                f"(+ prefix = {r['total_tokens']}{cut})", *_quote(r["text"])]
    out += [f"  suffix: {p['suffix_tokens']} tokens, run for every row", *_quote(repr(p["suffix"]))]
    verb = "; ".join(f"{v['label']} -> {v['answer']!r} "
                     + (f"{v['tokens']} token{'s' * (v['tokens'] > 1)}" if p["exact_tokens"]
                        else "(tokens unknown)")
                     + (f" {v['pieces']}" if v["pieces"] else "") for v in p["verbalisers"])
    out += [f"  verbalisers: {verb}",
            f"  text budget: {p['max_text_tokens']} tokens per row (llm.max_length less the prompt)"]
    return out


def _rows(plan: dict) -> list[str]:
    t, r = plan["table_rows"], plan["stage_rows"]
    out = ["ROWS", "  inputs: " + ", ".join(f"{k} {_n(v)}" for k, v in t.items())]
    labelled = (f"{_n(r['annotate'])} corpus rows + {_n(r['llm_eval'])} gold-test rows"
                + (f" + {_n(r['llm_dev'])} gold-dev rows (calibration)" if r["llm_dev"] else ""))
    out.append(f"  annotate (0-shot LLM): {labelled}" if r["zero_shot"]
               else "  annotate: draws the samples; only the tuned LLM labels them (peft.zero_shot off)")
    if "peft_train" in r:
        out.append(f"  peft: {_n(r['peft_train'])} gold rows x {r['peft_epochs']} epochs; dev "
                   f"{_n(r['peft_dev'])} rows x {r['peft_epochs'] + 1}; then the tuned LLM labels "
                   f"{labelled}")
    studs = ", ".join(f"{s} {_n(n)}" for s, n in r["students"].items())
    out.append(f"  train-bert: {studs} rows (x epochs; dev {_n(r['student_dev'])} rows per epoch)")
    out.append(f"  classify: {_n(r['classify_test'])} gold-test rows (all students) + "
               f"{_n(r['classify_corpus'])} corpus rows")
    tok = plan["tokens"]
    parts = [f"{k} {v['llm_row_mean']:.1f} (student {v['student_mean'] or 0:.1f})"
             for k, v in tok.items() if v]
    if parts:
        out.append("  tokens per row beyond the prefix, LLM (student): " + ", ".join(parts))
    return out


def _calibration(plan: dict) -> list[str]:
    c = plan["calibration"]
    if not c:
        return []
    load = c.get("load_average_start")
    where = "here" if load is not None else "given (--rates)"
    out = [f"CALIBRATION {where} ({c.get('rows', '?')} corpus rows"
           + (f"; load average {load:.1f} -> {c['load_average_end']:.1f} on {plan.get('cpus')} CPUs)"
              if load is not None else ")")]
    if "annotate_items_per_s" in c:
        line = f"  LLM: load {c['llm_load_s']:.1f} s, annotate {c['annotate_items_per_s']:.1f} items/s"
        if "annotate_adapter_items_per_s" in c:
            line += (f", with a fresh {c.get('peft_method')} adapter "
                     f"{c['annotate_adapter_items_per_s']:.1f} items/s, PEFT train "
                     f"{c['peft_train_rows_per_s']:.2f} rows/s")
        out.append(line)
    if "student_train_rows_per_s" in c:
        out.append(f"  student: load {c['student_load_s']:.1f} s, train {c['student_train_rows_per_s']:.1f}"
                   f" rows/s, classify {c['student_classify_items_per_s']:.1f} items/s")
    return out


def _here(plan: dict) -> list[str]:
    h = plan["estimate_here"]
    if not h:
        return []
    out = ["ESTIMATED WALL TIME here (measured rates x rows + fixed costs)"]
    for stage, v in h.items():
        secs = v["seconds"]
        mins = "     ?" if secs is None else f"{secs / 60:6.1f}"
        parts = ", ".join(f"{k} {s:.0f} s" for k, s in v["parts"].items())
        out.append(f"  {stage:<11}{mins} min  {parts}")
    return out


def _cluster(plan: dict) -> list[str]:
    c = plan["cluster"]
    if not c:
        return []
    out = ["CLUSTER (lambert_ray/gpu_table.py, from docs/cluster.md; FLOPs / (peak x MFU) + node boot)"]
    for stage, v in c["stages"].items():
        out.append(f"  {stage:<19}{v['gpu']:>5} x{v['gpus']:<5g} {v['gpu_hours']:7.2f} GPU-h  "
                   f"wall {v['wall_s'] / 60:6.1f} min  ${v['cost_usd']:8.2f}  ({v['pricing']})")
    if c.get("total"):
        t = c["total"]
        out.append(f"  {'total':<26}{t['gpu_hours']:7.2f} GPU-h  wall {t['wall_s'] / 60:6.1f} min  "
                   f"${t['cost_usd']:8.2f}  (with ${t['idle_usd']:.2f} of nodes idle between "
                   "their stages, and the head node)")
    out += [f"  note: {n}" for n in c.get("notes", [])]
    return out


def render_plan(plan: dict) -> str:
    cfg = plan["config"]
    head = (f"lambert-ray plan: {cfg['run']} (LLM {cfg['llm']}, student {cfg['student']}, "
            f"peft {cfg['peft'] or 'off'})")
    sections = [[head], _prompt(plan["prompt"]), _rows(plan), _calibration(plan), _here(plan),
                _cluster(plan)]
    if plan["warnings"]:
        sections.append(["WARNINGS (settings that multiply cost)", *[f"  ! {w}" for w in plan["warnings"]]])
    if plan["notes"]:
        sections.append(["NOTES", *[f"  - {n}" for n in plan["notes"]]])
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"
