"""Student accuracy against the number of LLM-labelled rows, hard against soft targets.

    python benchmarks/student_volume.py --adapter results/tmp/adapters/ia3 \
        --config configs/sst2_smollm2_tune.yaml --pool 8000 --sizes 1000,2000,4000,8000 \
        --modes hard,soft,soft_cal --out results/student_volume

1. The teacher: SmolLM2 + a PEFT adapter trained on 500 gold SST-2 sentences
   (`benchmarks/peft_methods.py --methods ia3 --adapters DIR`, same seed: this script leaves
   exactly those 500 sentences out of the pool). Without --adapter the 0-shot model labels.
2. It labels a seeded pool of SST-2 train sentences (disjoint from the 500 gold rows and from
   dev/test texts) plus all dev and test rows, with `Annotator.score` (no Ray), in chunks cached
   as Parquet under --cache: a rerun resumes where it stopped.
3. For each size (the first N rows of the pool) and each target mode it trains a MiniLM student
   with the pipeline's own pieces (`distill.build_targets`, `bert.train_epoch`,
   `bert.make_optimizer`: warm-up + decay), evaluates dev and test after every epoch and reports
   test accuracy at the best dev epoch (the pipeline's `bert.keep: best_dev`) and at the last.
   Settings: `llm` (LLM rows only), `llm+gold` (plus the 500 gold rows, mixed), `llm-then-gold`
   (the LLM-label student, then fine-tuned on the 500 gold rows: the LlamBERT paper's "labels,
   then gold"), `gold` (500 gold rows alone, the baseline), `gold-N` (N true SST-2 labels for the
   same pool rows: the student's ceiling at that volume, so label noise and student capacity can
   be told apart).
Results: OUT.json (appended after every run, so an interrupted benchmark resumes), OUT.md, OUT.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def read_sst2(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        return [(r["sentence"].strip(), int(r["label"]))
                for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def splits(data_dir: Path, pool: int, seed: int) -> dict[str, list[tuple[str, int]]]:
    """gold (the adapter's 500 training rows, as benchmarks/peft_methods.py draws them), pool,
    dev, test. The pool excludes gold rows and any text that appears in dev or test."""
    train = read_sst2(data_dir / "train.tsv")
    gold = random.Random(seed).sample(train, 500)
    dev, test = read_sst2(data_dir / "dev.tsv"), read_sst2(data_dir / "test_labeled.tsv")
    banned = {t for t, _ in gold} | {t for t, _ in dev} | {t for t, _ in test}
    seen, rest = set(), []
    for t, y in train:
        if t and t not in banned and t not in seen:
            seen.add(t)
            rest.append((t, y))
    random.Random(seed + 7).shuffle(rest)
    return {"gold": gold, "pool": rest[:pool], "dev": dev, "test": test}


class Labeller:
    """Teacher probabilities per split, cached in chunks (resumable); the model loads on first use."""

    def __init__(self, cfg, cache: Path):
        self.cfg, self.cache, self.ann = cfg, cache, None
        cache.mkdir(parents=True, exist_ok=True)

    def score(self, texts: list[str]) -> dict:
        from lambert_ray.annotator import Annotator

        self.ann = self.ann or Annotator.from_config(self.cfg)
        return self.ann.score(texts)


def label_split(lab: Labeller, name: str, data: list[tuple[str, int]], chunk: int = 500) -> pd.DataFrame:
    """Teacher probabilities for `data` (a split, or the pool's first rows), chunk by chunk."""
    frames = []
    for start in range(0, len(data), chunk):
        part = data[start:start + chunk]
        path = lab.cache / f"{name}_{start:07d}_{len(part)}.parquet"
        if not path.exists():
            t0 = time.perf_counter()
            s = lab.score([t for t, _ in part])
            pd.DataFrame({"text": [t for t, _ in part], "gold": [y for _, y in part],
                          "label_id": s["label_id"], "probs": s["probs"]}).to_parquet(path)
            print(f"  labelled {name} {start + len(part)}/{len(data)} "
                  f"({len(part) / (time.perf_counter() - t0):.1f} items/s)", flush=True)
        frames.append(pd.read_parquet(path))
    return pd.concat(frames, ignore_index=True)


def accuracy(gold, pred) -> float:
    return float(np.mean(np.asarray(gold) == np.asarray(pred)))


def train_student(train: pd.DataFrame, dev: pd.DataFrame, test: pd.DataFrame, names: list[str],
                  bert_cfg, seed: int, init: str | None = None, save: Path | None = None) -> dict:
    """MiniLM on `train` (build_targets rows); dev/test accuracy after every epoch. `init`: start
    from this saved student (epoch 0 = that student, so the gold phase can only be chosen when dev
    says it helps); `save`: write the best dev epoch's model there."""
    import copy

    import torch

    from lambert_ray.bert import (
        load_classifier,
        make_optimizer,
        predict_proba,
        steps_per_epoch,
        train_epoch,
    )
    from lambert_ray.models import resolve_encoder

    torch.manual_seed(seed)
    model, tok = load_classifier(init or resolve_encoder(bert_cfg.model), names)
    best_state, history = None, []

    def evaluate(epoch: int, loss: float) -> None:
        acc = {split: accuracy(rows["gold"], predict_proba(
            model, tok, rows["text"].tolist(), bert_cfg.max_length).argmax(-1))
               for split, rows in (("dev", dev), ("test", test))}
        history.append({"epoch": epoch, "loss": loss, **acc})

    if init:  # epoch 0: the starting student itself
        evaluate(0, float("nan"))
    per_epoch = steps_per_epoch(len(train), bert_cfg.batch_size)
    optimizer, scheduler = make_optimizer(model, bert_cfg, bert_cfg.epochs * per_epoch)
    rng = np.random.default_rng(seed)
    texts, targets = train["text"].tolist(), np.stack(train["target"].to_numpy())
    weights = train["weight"].to_numpy(np.float32)
    t0 = time.perf_counter()
    for epoch in range(bert_cfg.epochs):
        order = rng.permutation(len(train))
        bs = bert_cfg.batch_size
        batches = (([texts[i] for i in order[j:j + bs]], targets[order[j:j + bs]],
                    weights[order[j:j + bs]]) for j in range(0, len(order), bs))
        evaluate(epoch + 1, train_epoch(model, tok, optimizer, batches, bert_cfg.max_length,
                                        scheduler))
        print(f"    epoch {epoch + 1}: loss {history[-1]['loss']:.4f} dev {history[-1]['dev']:.4f} "
              f"test {history[-1]['test']:.4f}", flush=True)
        if save and max(history, key=lambda h: (h["dev"], -h["epoch"])) is history[-1]:
            best_state = copy.deepcopy(model.state_dict())
    best = max(history, key=lambda h: (h["dev"], -h["epoch"]))
    if save and best_state is not None:
        model.load_state_dict(best_state)
        model.save_pretrained(save)
        tok.save_pretrained(save)
    return {"test_best_dev": best["test"], "best_epoch": best["epoch"], "dev_best": best["dev"],
            "test_last": history[-1]["test"], "history": history,
            "train_s": round(time.perf_counter() - t0, 1)}


def plot(results: list[dict], teacher: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = {"llm": "LLM labels", "llm-then-gold": "LLM labels, then 500 gold",
             "llm+gold": "LLM labels + 500 gold, mixed", "gold-N": "true labels (ceiling)"}
    keys = sorted({(r["setting"], r["mode"]) for r in results if r["setting"] in names})
    for setting, mode in keys:
        pts = sorted((r["n_llm"], 100 * r["test_best_dev"]) for r in results
                     if r["setting"] == setting and r["mode"] == mode)
        label = f"student on {names[setting]}" + ("" if setting == "gold-N" else f" ({mode})")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "o",
                label=label)
    ax.axhline(100 * teacher, color="k", ls="--", lw=1, label="teacher (LLM + adapter)")
    base = [r for r in results if r["setting"] == "gold"]
    if base:
        ax.axhline(100 * base[0]["test_best_dev"], color="gray", ls=":", lw=1,
                   label="student on 500 gold")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["n_llm"] for r in results if r["n_llm"]})
    ax.set_xticks(ticks, [f"{n:,}" for n in ticks])
    ax.minorticks_off()
    ax.set_xlabel("LLM-labelled rows (true-label rows for the ceiling)")
    ax.set_ylabel("SST-2 test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(results: list[dict], teacher: dict, header: str) -> str:
    lines = [header, "",
             f"Teacher on the same {teacher['n_test']:,} SST-2 test rows: "
             f"**{100 * teacher['test']:.1f} %** "
             f"(dev {100 * teacher['dev']:.1f} %; labels on the pool agree with the true SST-2 "
             f"labels on {100 * teacher.get('pool', float('nan')):.1f} % of rows).", "",
             "| setting | targets | LLM rows | gold rows | test acc (best dev epoch) | gap to teacher "
             "| test acc (last epoch) | best epoch | train s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["setting"], r["mode"], r["n_llm"])):
        gap = 100 * (r["test_best_dev"] - teacher["test"])
        lines.append(f"| {r['setting']} | {r['mode']} | {r['n_llm']:,} | {r['n_gold']:,} | "
                     f"{100 * r['test_best_dev']:.1f} % | {gap:+.1f} | {100 * r['test_last']:.1f} % "
                     f"| {r['best_epoch']} | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "sst2_smollm2_tune.yaml"))
    ap.add_argument("--adapter", default=None, help="teacher adapter dir (default: 0-shot)")
    ap.add_argument("--pool", type=int, default=8000)
    ap.add_argument("--sizes", default="1000,2000,4000,8000")
    ap.add_argument("--modes", default="hard,soft,soft_cal",
                    help="hard; soft (raw probabilities); soft_cal (calibrated on gold dev)")
    ap.add_argument("--settings", default="llm,gold,llm+gold,gold-N",
                    help="llm: LLM rows; gold: the 500 gold rows; llm+gold (mixed); llm-then-gold "
                         "(the llm student, then gold, for bert.then_epochs); gold-N: true labels")
    ap.add_argument("--gold-mix-modes", default="soft_cal", help="target modes for llm+gold")
    ap.add_argument("--ceiling-sizes", default="4000", help="sizes that get a gold-N run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. bert.epochs=4 bert.temperature=0.5")
    ap.add_argument("--eval-limit", type=int, default=None,
                    help="first N dev and test rows only (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=os.environ.get("LAMBERT_DATA_DIR",
                                                         str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--cache", default="results/tmp/student_volume_labels")
    ap.add_argument("--out", default="results/student_volume")
    ap.add_argument("--report-only", action="store_true",
                    help="only render OUT.md / OUT.png from OUT.json (e.g. of a partial run)")
    args = ap.parse_args()
    if args.report_only:
        state = json.loads(Path(args.out).with_suffix(".json").read_text())
        write_report(state["results"], state["teacher"], state["args"], Path(args.out),
                     state.get("commands", []))
        return

    import torch

    from lambert_ray.calibration import fit_temperature_bias
    from lambert_ray.config import load_config
    from lambert_ray.distill import build_targets

    torch.set_num_threads(os.cpu_count() or 1)
    overrides = [*args.set] + ([f"llm.adapter={args.adapter}"] if args.adapter else [])
    cfg = load_config(args.config, overrides)
    names = cfg.labels.names
    rows = splits(Path(args.data_dir) / "sst2", args.pool, args.seed)
    if args.eval_limit:
        rows["dev"], rows["test"] = rows["dev"][:args.eval_limit], rows["test"][:args.eval_limit]
    lab = Labeller(cfg, Path(args.cache) / (Path(args.adapter).name if args.adapter else "0shot"))
    sizes = [int(x) for x in args.sizes.split(",")]

    def labelled_split(name: str, n: int | None = None) -> pd.DataFrame:
        df = label_split(lab, name, rows[name][:n] if n else rows[name])
        df["label"] = [names[i] for i in df["label_id"]]
        df["row_id"] = [f"{name}{i}" for i in range(len(df))]
        if "t" in calib:
            df["probs_cal"] = list(calib["t"].apply(np.stack(df["probs"])))
        return df

    calib: dict = {}
    labelled = {"test": labelled_split("test"), "dev": labelled_split("dev")}
    dev = labelled["dev"]
    test = labelled["test"]
    teacher = {k: accuracy(labelled[k]["gold"], labelled[k]["label_id"]) for k in ("dev", "test")}
    teacher["n_test"] = len(test)
    # soft_cal: the teacher's probabilities calibrated on gold dev (temperature + per-label bias)
    cal = fit_temperature_bias(np.stack(dev["probs"]), dev["gold"].to_numpy(), names,
                               fitted_on="gold dev")
    calib["t"] = cal
    teacher["calibration"] = {"temperature": cal.temperature, "bias": cal.bias}
    for df in labelled.values():
        df["probs_cal"] = list(cal.apply(np.stack(df["probs"])))
    teacher["test_calibrated"] = accuracy(test["gold"], np.stack(test["probs_cal"]).argmax(-1))
    gold = pd.DataFrame({"row_id": [f"g{i}" for i in range(500)],
                         "text": [t for t, _ in rows["gold"]],
                         "label": [names[y] for _, y in rows["gold"]]})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    results = state.get("results", [])
    # every invocation that added rows to OUT.json (a resumed benchmark grows over several)
    commands = [c for c in state.get("commands", []) if c != command_line(vars(args))]
    commands.append(command_line(vars(args)))
    bert_cfg = cfg.bert
    tag = json.dumps(bert_cfg.model_dump(), sort_keys=True)
    runs = []
    settings = args.settings.split(",")
    if "gold" in settings:
        runs.append(("gold", "hard", 0))
    for n in sizes:  # in the order given: put the most telling size first
        for mode in args.modes.split(","):
            runs.append(("llm", mode, n))
        if "gold-N" in settings and n in [int(x) for x in args.ceiling_sizes.split(",") if x]:
            runs.append(("gold-N", "hard", n))
        if "llm-then-gold" in settings:
            runs += [("llm-then-gold", mode, n) for mode in args.gold_mix_modes.split(",")]
        if "llm+gold" in settings:
            runs += [("llm+gold", mode, n) for mode in args.gold_mix_modes.split(",")]
    models = Path(args.cache).parent / "student_volume_models"

    def student_dir(mode: str, n: int) -> Path:  # the llm student, kept for llm-then-gold
        return models / f"{Path(args.adapter).name if args.adapter else '0shot'}_{mode}_{n}_{args.seed}"

    def ran(setting: str, mode: str, n: int) -> bool:
        return any(r["setting"] == setting and r["mode"] == mode and r["n_llm"] == n
                   and r["bert"] == tag for r in results)

    for setting, mode, n in runs:
        keep = student_dir(mode, n) if setting == "llm" and "llm-then-gold" in settings else None
        done = ran(setting, mode, n)
        # a finished llm run is repeated only when llm-then-gold still needs its model
        rerun_for_model = (keep is not None and not (keep / "config.json").exists()
                           and not ran("llm-then-gold", mode, n))
        if done and not rerun_for_model:
            continue
        if n:
            pool = labelled_split("pool", n)
            teacher["pool"] = accuracy(pool["gold"], pool["label_id"])
        if setting == "gold-N" and n:
            pool = pool.assign(label=[names[y] for y in pool["gold"]]).drop(columns=["probs",
                                                                                     "probs_cal"])
        llm_part = pool if n and setting != "llm-then-gold" else None
        gold_part = gold if setting in ("gold", "llm+gold", "llm-then-gold") else None
        if llm_part is not None and mode == "soft_cal":  # calibrated labels and probabilities
            cal = np.stack(llm_part["probs_cal"])
            llm_part = llm_part.assign(probs=list(cal), label=[names[i] for i in cal.argmax(-1)])
        b = bert_cfg
        train = build_targets(llm_part, gold_part, names, targets=mode.split("_")[0], temperature=b.temperature,
                              min_confidence=b.min_confidence,
                              confidence_weight=b.confidence_weight, gold_weight=b.gold_weight)
        print(f"== {setting} {mode} n_llm={n} rows={len(train)}", flush=True)
        if setting == "llm-then-gold":  # the gold phase: from the llm student, a few epochs
            init = student_dir(mode, n)
            if not (init / "config.json").exists():
                raise SystemExit(f"llm-then-gold needs the llm {mode} {n} student in {init}: "
                                 "list llm (and this mode) before it")
            r = train_student(train, dev, test, names,
                              b.model_copy(update={"epochs": b.then_epochs}), args.seed,
                              init=str(init))
        else:
            r = train_student(train, dev, test, names, b, args.seed, save=keep)
        if done:  # an llm run repeated only to keep its model for llm-then-gold
            continue
        r.update(setting=setting, mode=mode, n_llm=n if setting != "gold" else 0,
                 n_gold=len(gold) if setting in ("gold", "llm+gold", "llm-then-gold") else 0, bert=tag,
                 rows=len(train))
        results.append(r)
        print(f"   test {r['test_best_dev']:.4f} (epoch {r['best_epoch']}) last {r['test_last']:.4f}",
              flush=True)
        state = {"args": vars(args), "teacher": teacher, "results": results, "cpu_count": os.cpu_count(),
                 "commands": commands}
        out.with_suffix(".json").write_text(json.dumps(state, indent=1))
    write_report([r for r in results if r["bert"] == tag], teacher, vars(args), out, commands)


def command_line(args: dict) -> str:
    parts = []
    for k, v in args.items():
        if v in (None, False, [], "") or k in ("report_only", "cache", "data_dir"):
            continue
        for item in v if isinstance(v, list) else [v]:   # --set is repeated, once per item
            parts.append(f"--{k.replace('_', '-')} {item}")
    return "python benchmarks/student_volume.py " + " ".join(parts)


def write_report(results: list[dict], teacher: dict, args: dict, out: Path,
                 commands: list[str] | None = None) -> None:
    """OUT.md (table + the command) and OUT.png (accuracy against labelled rows)."""
    bert = json.loads(results[0]["bert"]) if results else {}
    adapter = args.get("adapter")
    sizes = sorted({r["n_llm"] for r in results if r["n_llm"]})
    planned = [int(x) for x in str(args.get("sizes", "")).split(",") if x]
    partial = [n for n in planned if n not in sizes]
    header = (f"MiniLM students on SST-2, teacher = SmolLM2-135M"
              f"{' + ' + Path(adapter).name + ' adapter (500 gold sentences)' if adapter else ' 0-shot'}; "
              f"bert: epochs {bert.get('epochs')}, lr {bert.get('lr')}, {bert.get('schedule')} "
              f"decay after {bert.get('warmup_ratio')} warm-up, best gold-dev epoch; seed "
              f"{args.get('seed')}")
    if partial:
        header += f"\n\n**Partial**: sizes {partial} of the planned {planned} did not run."
    cmds = commands or [command_line(args)]
    text = (markdown(results, teacher, header) + "\nCommands (the table holds the rows of all of "
            "them; the benchmark resumes from OUT.json):\n\n" + "".join(f"    {c}\n" for c in cmds))
    out.with_suffix(".md").write_text(text)
    plot(results, teacher["test"], out.with_suffix(".png"))
    print(text)

if __name__ == "__main__":
    main()
