"""The BERT-student and Ray Data parts of `annotate_throughput.py` (imported from there)."""

from __future__ import annotations

import os
import random
import tempfile
import time

import numpy as np
import pandas as pd
import torch

from lambert_ray.config import PipelineConfig


def bert_speed(names: list[str], texts: list[str], max_length: int, repeats: int = 3) -> dict:
    """MiniLM classification items/s over `texts` (untrained head: speed does not depend on it)."""
    from lambert_ray.bench import timed_classify
    from lambert_ray.bert import load_classifier
    from lambert_ray.models import resolve_encoder

    model, tok = load_classifier(resolve_encoder("minilm"), names)
    ips, _ = timed_classify(model, tok, texts, max_length, repeats=repeats)
    return {"model": "minilm", "n": len(texts), "items_per_s": ips, "max_length": max_length}


def train_student(names: list[str], train: list[tuple[str, int]], max_length: int, epochs: int,
                  seed: int):
    """A quick MiniLM student on gold rows (plain loop, no Ray): enough to compare fp32/int8."""
    from lambert_ray.bert import load_classifier, train_epoch
    from lambert_ray.models import resolve_encoder

    torch.manual_seed(seed)
    model, tok = load_classifier(resolve_encoder("minilm"), names)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    rng = random.Random(seed)
    for _ in range(epochs):
        rows = train[:]
        rng.shuffle(rows)
        batches = [([t for t, _ in rows[i:i + 32]], [y for _, y in rows[i:i + 32]])
                   for i in range(0, len(rows), 32)]
        train_epoch(model, tok, opt, batches, max_length)
    return model.eval(), tok


def int8_vs_fp32(model, tok, texts: list[str], gold: list[int], max_length: int,
                 repeats: int = 2) -> dict:
    """The student in fp32 and int8-dynamic (classify.int8) on the same texts, interleaved."""
    from lambert_ray.bench import timed_classify
    from lambert_ray.classify import quantize_int8

    q = quantize_int8(model)  # a copy: `model` stays fp32
    best = {"fp32": 0.0, "int8": 0.0}
    probs = {}
    for _ in range(repeats):
        for name, m in (("fp32", model), ("int8", q)):
            ips, probs[name] = timed_classify(m, tok, texts, max_length)
            best[name] = max(best[name], ips)
    y = np.asarray(gold)
    acc = {k: float((p.argmax(-1) == y).mean()) for k, p in probs.items()}
    return {"n": len(texts), "fp32_items_per_s": best["fp32"], "int8_items_per_s": best["int8"],
            "speedup": best["int8"] / best["fp32"], "fp32_accuracy": acc["fp32"],
            "int8_accuracy": acc["int8"], "accuracy_delta_points": 100 * (acc["int8"] - acc["fp32"]),
            "label_agreement": float((probs["fp32"].argmax(-1) == probs["int8"].argmax(-1)).mean())}


def _frame(texts: list[str], gold: list[int], names: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"row_id": [f"r{i:06d}" for i in range(len(texts))], "text": texts,
                         "label": [names[g] for g in gold], "error": [None] * len(texts)})


def _with_actors(cfg: PipelineConfig, actors: int, cpus: int) -> PipelineConfig:
    raw = cfg.model_dump()
    # Ray CPUs for the actors leave one CPU to the read/repartition/write tasks (an actor
    # holding every CPU deadlocks the Write step); torch threads still use all cores / actors.
    raw["annotate"].update(min_actors=actors, max_actors=actors, num_cpus=(cpus - 1) / actors,
                           torch_threads=None)
    return PipelineConfig.model_validate(raw)


def ray_pool_vs_bare(cfg: PipelineConfig, texts: list[str], gold: list[int], actors: list[int],
                     cpus: int = 2) -> dict:
    """The annotate stage (Ray Data actor pool -> Parquet) against a bare loop of the same
    `AnnotateBatch` over the same `annotate.batch_size` batches (model load + scoring + Parquet
    write in both). Ray itself is started before the clock; pool start-up is counted."""
    import ray
    import ray.data

    from lambert_ray.annotate import AnnotateBatch, annotate
    from lambert_ray.stage import read_output

    names, bs = cfg.labels.names, cfg.annotate.batch_size
    df = _frame(texts, gold, names)
    out: dict = {"n": len(texts), "batch_size": bs, "cpus": cpus}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench_pool_") as tmp:
        t0 = time.perf_counter()
        fn = AnnotateBatch(_with_actors(cfg, 1, cpus).model_dump())
        load_s = time.perf_counter() - t0
        res = pd.concat([fn(df.iloc[i:i + bs]) for i in range(0, len(df), bs)], ignore_index=True)
        res.to_parquet(os.path.join(tmp, "bare.parquet"))
        bare_s = time.perf_counter() - t0
        torch.set_num_threads(threads)
        del fn
        bare_labels = dict(zip(res["row_id"], res["label"], strict=True))
        out["bare"] = {"seconds": bare_s, "load_s": load_s, "items_per_s": len(df) / bare_s,
                       "items_per_s_excl_load": len(df) / (bare_s - load_s)}
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for a in actors:
            # one block per batch, so every actor gets work
            ds = ray.data.from_pandas([df.iloc[i:i + bs] for i in range(0, len(df), bs)])
            t0 = time.perf_counter()
            counts = annotate(_with_actors(cfg, a, cpus), ds, os.path.join(tmp, f"pool{a}"),
                              rows_in=len(df))
            secs = time.perf_counter() - t0
            got = read_output(os.path.join(tmp, f"pool{a}"), ["row_id", "label"])
            agree = float(np.mean([bare_labels[r] == lab for r, lab in zip(got["row_id"], got["label"],
                                                                           strict=True)]))
            out[f"pool_{a}_actors"] = {
                "seconds": secs, "items_per_s": len(df) / secs, "rows_ok": counts.rows_ok,
                "overhead_vs_bare_pct": 100 * (secs - bare_s) / bare_s,
                "label_agreement_with_bare": agree}
    return out


def steady_state(runs: list[dict], actors: list[int]) -> dict:
    """Fixed start-up cost and per-row cost of the bare loop and each pool, from the smallest and
    largest run (seconds = fixed + n * per_row). The per-row overhead is what a large corpus pays."""
    small, large = runs[0], runs[-1]
    dn = large["n"] - small["n"]
    bare_row = (large["bare"]["seconds"] - small["bare"]["seconds"]) / dn
    out = {}
    for a in actors:
        k = f"pool_{a}_actors"
        row = (large[k]["seconds"] - small[k]["seconds"]) / dn
        out[k] = {"n_small": small["n"], "n_large": large["n"], "bare_s_per_row": bare_row,
                  "pool_s_per_row": row, "marginal_overhead_pct": 100 * (row - bare_row) / bare_row,
                  "bare_fixed_s": small["bare"]["seconds"] - bare_row * small["n"],
                  "pool_fixed_s": small[k]["seconds"] - row * small["n"]}
    return out
