"""Calibration of the real 0-shot annotator (SmolLM2, packaged), before and after, no Ray.

    python benchmarks/calibration_real.py --task sst2 --n-fit 300 --n-eval 400 --out results/calibration
    python benchmarks/calibration_real.py --task ag6 --n-fit 150 --n-eval 200 --out results/calibration

Tasks:
  sst2  configs/demo-sst2.yaml's prompt (LlamBERT's); fit rows from SST-2 dev, eval rows from
        the labelled SST-2 test set.
  ag6   the issue-11 case: AG News with six labels, as a new user would write them by config
        (names = verbalisers: World, Sports, Business, Sci/Tech (3 tokens), Health,
        Entertainment). Gold has the first four. --title-only scores headlines only. Fit rows: AG News test.csv rows 1000+ (the
        shipped config's gold test is rows 0-999); eval rows: rows 0-999, sampled.

Methods, each scored on the eval rows (never used for fitting):
  raw                  the annotator's probabilities
  prior:content_free   divide out the mean distribution on "N/A", "[MASK]", "" (no gold)
  prior:mean           one step: divide out the mean distribution on the fit rows (labels unused)
  prior:mean_iterated  repeat the step until the fit rows' mean calibrated distribution is uniform
  temperature_bias     T + per-label bias by NLL on the fit rows' gold labels
Writes <out>/<task>.json (numbers, the command, load), <out>/<task>_reliability.png and the raw
probabilities (<out>/<task>_probs.npz).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lambert_ray.annotator import Annotator
from lambert_ray.calibration import (
    fit_prior,
    fit_temperature_bias,
    plot_reliability,
    summary,
)
from lambert_ray.config import load_config
from lambert_ray.metrics import classification_metrics

ROOT = Path(__file__).resolve().parent.parent
CONTENT_FREE = ["N/A", "[MASK]", ""]


def load() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def task_setup(task: str, data_dir: Path, n_fit: int, n_eval: int, seed: int,
               title_only: bool = False):
    """(config, fit texts, fit gold ids, eval texts, eval gold ids)."""
    if task == "sst2":
        cfg = load_config(ROOT / "configs" / "demo-sst2.yaml")
        dev = pd.read_csv(data_dir / "sst2" / "dev.tsv", sep="\t", quoting=3)
        test = pd.read_csv(data_dir / "sst2" / "test_labeled.tsv", sep="\t", quoting=3)
        fit = dev.sample(n=min(n_fit, len(dev)), random_state=seed)
        ev = test.sample(n=min(n_eval, len(test)), random_state=seed)
        return (cfg, fit["sentence"].str.strip().tolist(), fit["label"].to_numpy(),
                ev["sentence"].str.strip().tolist(), ev["label"].to_numpy())
    if task == "ag6":
        names = ["World", "Sports", "Business", "Sci/Tech", "Health", "Entertainment"]
        cfg = load_config(ROOT / "configs" / "ag_news_smollm2.yaml", [
            f"labels.names={json.dumps(names)}", "labels.verbalisers=null", "data.label_values=null",
            "labels.descriptions=null",
            "prompt.system=You classify news articles by topic. Answer with the topic only.",
        ])
        cfg.prompt.template = ("Which topic is this news article about?\n{labels}\nArticle: {text}\n"
                               "Answer with the topic.")
        df = pd.read_csv(data_dir / "ag_news" / "test.csv")
        df["text"] = df["title"].str.strip()
        if not title_only:
            df["text"] = df["text"] + "\n" + df["description"].str.strip()
        fit = df.iloc[1000:].sample(n=n_fit, random_state=seed)
        ev = df.iloc[:1000].sample(n=n_eval, random_state=seed)
        return (cfg, fit["text"].tolist(), fit["label"].to_numpy() - 1,
                ev["text"].tolist(), ev["label"].to_numpy() - 1)
    raise SystemExit(f"unknown task {task!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["sst2", "ag6"], required=True)
    ap.add_argument("--n-fit", type=int, default=300)
    ap.add_argument("--n-eval", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=os.environ.get("LAMBERT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--out", default="results/calibration")
    ap.add_argument("--title-only", action="store_true",
                    help="ag6: score the headline only (a quarter of the tokens; for a loaded box)")
    args = ap.parse_args()

    cfg, fit_x, fit_y, ev_x, ev_y = task_setup(args.task, Path(args.data_dir), args.n_fit,
                                               args.n_eval, args.seed, args.title_only)
    labels = cfg.labels.names
    load_before = load()
    t0 = time.perf_counter()
    ann = Annotator.from_config(cfg)
    cf = np.array(ann.score(CONTENT_FREE)["probs"])
    fit_p = np.array(ann.score(fit_x)["probs"])
    ev_p = np.array(ann.score(ev_x)["probs"])
    seconds = time.perf_counter() - t0

    cals = {"prior:content_free": fit_prior(cf, labels, "content-free inputs"),
            "prior:mean": fit_prior(fit_p, labels, "fit rows, labels unused"),
            "prior:mean_iterated": fit_prior(fit_p, labels, "fit rows, labels unused",
                                             iterations=100),
            "temperature_bias": fit_temperature_bias(fit_p, fit_y, labels, fitted_on="fit rows")}
    results = {"raw": {**summary(ev_p, ev_y, labels),
                       "macro_f1": classification_metrics(ev_y, ev_p.argmax(1), labels)["macro_f1"]}}
    curves = {"raw": (ev_p, ev_y)}
    for name, cal in cals.items():
        p = cal.apply(ev_p)
        results[name] = {**summary(p, ev_y, labels),
                         "macro_f1": classification_metrics(ev_y, p.argmax(1), labels)["macro_f1"],
                         "calibration": cal.to_dict()}
        curves[name] = (p, ev_y)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{args.task}_reliability.png"
    png.write_bytes(plot_reliability(curves, f"SmolLM2 0-shot, {args.task}: {len(ev_y)} eval rows"))
    record = {"command": "python " + " ".join(sys.argv), "task": args.task, "labels": labels,
              "n_fit": len(fit_y), "n_eval": len(ev_y), "content_free": CONTENT_FREE,
              "content_free_probs": cf.round(4).tolist(), "annotate_seconds": round(seconds, 1),
              "load_before": load_before, "load_after": load(), "results": results,
              "plot": str(png)}
    (out / f"{args.task}.json").write_text(json.dumps(record, indent=1))
    np.savez_compressed(out / f"{args.task}_probs.npz", cf=cf, fit_p=fit_p, fit_y=fit_y,
                        ev_p=ev_p, ev_y=ev_y)
    print(f"{'method':<20} {'acc':>6} {'F1':>6} {'ECE':>6}  predicted")
    for name, r in results.items():
        print(f"{name:<20} {r['accuracy']:6.1%} {r['macro_f1']:6.3f} {r['ece']:6.3f}  {r['predicted']}")


if __name__ == "__main__":
    main()
