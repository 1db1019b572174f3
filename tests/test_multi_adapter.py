"""Several adapters on one base model (multi_adapter.py) score every row exactly as separate
single-adapter runs do; tiny random Llama + random adapters of every method, no Ray (one short
Ray test of the annotate_adapters stage at the end)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from peft_tiny import save_random_adapter, tiny_config
from transformers import AutoModelForCausalLM

from lambert_ray.annotate import AnnotateAdaptersBatch, adapter_output, annotate_adapters
from lambert_ray.annotator import Annotator
from lambert_ray.config import ConfigError, validate_config
from lambert_ray.multi_adapter import MultiAnnotator, load_adapter_set

# Named like a method comparison would name them: "lora" / "ia3" are contained in peft's
# weight prefixes ("lora_", "ia3_"), which is why peft gets names of its own.
ADAPTERS = {"lora": ("lora", 1), "lora_b": ("lora", 2), "dora": ("dora", 3), "ia3": ("ia3", 4),
            "prompt_tuning": ("prompt_tuning", 5), "prompt_tuning_b": ("prompt_tuning", 6),
            "p_tuning": ("p_tuning", 7), "prefix_tuning": ("prefix_tuning", 8)}
TEXTS = ["a wonderful film", "I hated it", "x " * 40, "boring and lifeless, a mess",
         "truly great", "an ok movie with some very long words in it"]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama, tmp_path_factory) -> dict[str, str]:
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_random_adapter(tiny_llama, method, root / name, seed)
            for name, (method, seed) in ADAPTERS.items()}


def _cfg(tiny_llama, adapters: dict[str, str], **llm):
    cfg = tiny_config(tiny_llama)
    labels = cfg.labels.model_copy(update={"verbalisers": ["negative", "Sci/Tech"]})  # 1 + 3 tokens
    return cfg.model_copy(update={"labels": labels, "peft": None, "llm": cfg.llm.model_copy(
        update={"adapters": adapters, "token_budget": 96, **llm})})


def _single(cfg, path: str) -> dict:
    """A separate single-adapter run: its own base model load, the adapter as llm.adapter."""
    one = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"adapter": path, "adapters": {}})})
    return Annotator.from_config(one).score(TEXTS)


@pytest.fixture(scope="module", params=[True, False], ids=["prefix_reuse", "no_prefix_reuse"])
def runs(request, tiny_llama, adapter_dirs):
    cfg = _cfg(tiny_llama, adapter_dirs, reuse_prefix=request.param)
    single = {name: _single(cfg, path) for name, path in adapter_dirs.items()}
    return cfg, MultiAnnotator.from_config(cfg), single


def _assert_same(got: dict, want: dict) -> None:
    torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(want["logprobs"]), **TOL)
    assert got["label"] == want["label"] and got["truncated"] == want["truncated"]


def test_every_adapter_scores_as_in_its_own_single_adapter_run(runs):
    _, multi, single = runs
    out = multi.score(TEXTS)
    assert list(out) == list(ADAPTERS)
    for name in ADAPTERS:
        _assert_same(out[name], single[name])


def test_switching_order_and_cached_prefixes_do_not_leak_between_adapters(runs):
    """Reverse order, one adapter at a time, twice: each adapter's prefix cache (built on its
    first call) stays its own after the others ran."""
    _, multi, single = runs
    for _ in range(2):
        for name in reversed(list(ADAPTERS)):
            _assert_same(multi.score(TEXTS[::-1], [name])[name],
                         {k: v[::-1] for k, v in single[name].items()})


def test_adapters_really_differ_from_each_other(runs):
    """A switch that did nothing would give every adapter of a peft group the same scores."""
    _, multi, _ = runs
    out = multi.score(TEXTS[:2])
    logps = {name: torch.tensor(o["logprobs"]) for name, o in out.items()}
    names = list(logps)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(logps[a], logps[b], atol=1e-3), (a, b)


def test_one_base_weight_copy_for_all_groups(tiny_llama, adapter_dirs):
    cfg = _cfg(tiny_llama, adapter_dirs)
    slots, _ = load_adapter_set(cfg.llm, adapter_dirs)
    groups = {id(s.model): s.model for s in slots.values()}
    assert len(groups) == 5  # LORA (lora, lora_b, dora), IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING
    q = [m.get_base_model().model.layers[0].self_attn.q_proj for m in groups.values()]
    q = [getattr(m, "base_layer", m).weight for m in q]  # LoRA wraps q_proj, the others do not
    assert len({w.data_ptr() for w in q}) == 1
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for m in groups.values() for p in m.parameters()}
    base = sum(p.untyped_storage().nbytes() for p in
               AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    assert sum(storages.values()) < 1.2 * base  # held once (5 copies would be 5x), adapters small


def test_adapter_names_and_paths_are_checked(tiny_llama):
    raw = {"data": {"corpus": {"path": "x.tsv"}}, "labels": {"names": ["a", "b"]}}
    for bad in ({"a/b": "x"}, {"": "x"}, {"ok": ""}):
        with pytest.raises(ConfigError, match="llm.adapters"):
            validate_config({**raw, "llm": {"adapters": bad}})
    assert validate_config({**raw, "llm": {"adapters": {"lora-1.v2": "d"}}}).llm.adapters


def _batch(texts: list[str], errors: list[str | None]) -> pd.DataFrame:
    return pd.DataFrame({"row_id": [f"r{i}" for i in range(len(texts))], "text": texts,
                         "label": [0] * len(texts), "error": errors})


def test_actor_batch_has_one_row_per_row_id_and_adapter_and_keeps_failures_apart(
        tiny_llama, adapter_dirs, monkeypatch):
    names = ["lora", "ia3", "prompt_tuning"]
    cfg = _cfg(tiny_llama, {n: adapter_dirs[n] for n in names})
    actor = AnnotateAdaptersBatch(cfg.model_dump())
    ia3 = actor.ann._annotators["ia3"]
    real = ia3.score

    def flaky(texts):  # the IA3 adapter fails on one row only
        if "I hated it" in texts:
            raise RuntimeError("boom")
        return real(texts)

    monkeypatch.setattr(ia3, "score", flaky)
    texts = TEXTS[:4]
    out = actor(_batch(texts, [None, None, "parse: bad line", None]))
    assert len(out) == 3 * 4 and list(out["adapter"].unique()) == names
    for name in names:
        rows = out[out["adapter"] == name]
        assert list(rows["row_id"]) == ["r0", "r1", "r2", "r3"]
        assert rows["error"].iloc[2] == "parse: bad line" and pd.isna(rows["label"].iloc[2])
        failed = rows["error"].iloc[1]
        if name == "ia3":
            assert failed.startswith("scoring_failed: RuntimeError: boom")
        else:
            assert pd.isna(failed)
    ok = out[(out["adapter"] == "lora") & out["error"].isna()]
    want = _single(cfg, adapter_dirs["lora"])
    assert list(ok["label"]) == [want["label"][i] for i in (0, 1, 3)]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_annotate_adapters_stage_counts_each_adapter_and_resumes(ray_local, tiny_llama,
                                                                adapter_dirs, tmp_path):
    """One pass into one stage dir: each adapter's rows in = ok + errored, the same row_id set;
    a lost shard is redone once for every adapter; the report lists each adapter's counts."""
    import ray.data

    from lambert_ray import layout
    from lambert_ray.pipeline import annotate_with_adapters
    from lambert_ray.report import _counts
    from lambert_ray.stage import COMPLETE, read_output

    names = ["lora", "prompt_tuning"]
    cfg = _cfg(tiny_llama, {n: adapter_dirs[n] for n in names})
    cfg = cfg.model_copy(update={
        "run": cfg.run.model_copy(update={"output_dir": str(tmp_path)}),
        "annotate": cfg.annotate.model_copy(update={"batch_size": 4, "num_cpus": 0.25}),
        "errors": cfg.errors.model_copy(update={"max_error_fraction": 0.5})})
    texts = [f"film number {i}, {'great' if i % 2 else 'awful'}" for i in range(12)]
    rows = _batch(texts, [None] * 11 + ["empty_text"])
    # The 0-shot annotate stage's output, as annotate_with_adapters reads it.
    annotate_dir = tmp_path / cfg.run.name / layout.ANNOTATE
    annotate_dir.mkdir(parents=True)
    rows.rename(columns={"label": "gold"}).to_parquet(annotate_dir / "part-0.parquet")

    counts = annotate_with_adapters(cfg)["annotate" + layout.ADAPTERS_SUFFIX]
    out_dir = layout.run_path(cfg, "annotate" + layout.ADAPTERS_SUFFIX)
    for name in names:
        c = counts[name]
        assert (c.rows_in, c.rows_ok, c.rows_errored) == (12, 11, 1)
        df = adapter_output(out_dir, name, ["row_id", "label", "error"])
        assert sorted(df["row_id"]) == sorted(rows["row_id"]) and df["row_id"].is_unique
    assert _counts(cfg)[f"annotate_adapters[{names[0]}]"]["rows_ok"] == 11
    before = read_output(out_dir).sort_values(["adapter", "row_id"]).reset_index(drop=True)

    # Lose one shard (and the completion marker): the rerun redoes those rows, once each.
    shards = sorted(p for p in (tmp_path / cfg.run.name / "annotate_adapters").glob("*.parquet"))
    assert len(shards) > 1
    shards[0].unlink()
    (shards[0].parent / COMPLETE).unlink()
    again = annotate_adapters(cfg, ray.data.from_pandas(rows), out_dir, rows_in=len(rows))
    assert all(again[n].balanced and again[n].resumed_rows > 0 for n in names)
    after = read_output(out_dir).sort_values(["adapter", "row_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(after[["adapter", "row_id", "label", "error"]],
                                  before[["adapter", "row_id", "label", "error"]])
    record = json.loads((shards[0].parent / COMPLETE).read_text())
    assert record["fan_out"] == "adapter" and set(record["counts"]) == set(names)
