"""Safe defaults and failure settings, without Ray: no remote code unless asked, safetensors-only
weights, no pickles, run directories that cannot climb out of output_dir, and the pools' actor
restart / task retry settings reaching Ray Data's map_batches."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from lambert_ray.config import BertConfig, ConfigError, LLMConfig, ResourcesConfig, validate_config

PKG = Path(__file__).resolve().parent.parent / "lambert_ray"


def _raw(**run: object) -> dict:
    return {"run": {"name": "ok", **run}, "data": {"corpus": {"path": "x.tsv"}},
            "labels": {"names": ["negative", "positive"]},
            "prompt": {"template": "Review: {text}"}}


class _Recorder:
    """Stands in for an HF Auto class: records from_pretrained kwargs, returns a dummy."""

    def __init__(self, calls: list, name: str):
        self.calls, self.name = calls, name

    def from_pretrained(self, path, **kwargs):
        self.calls.append((self.name, path, kwargs))
        return SimpleNamespace(pad_token="<pad>", eos_token="</s>", to=lambda *a: None,
                               eval=lambda: None)


@pytest.fixture
def hf_calls(monkeypatch) -> list:
    import transformers

    calls: list = []
    for name in ("AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(transformers, name, _Recorder(calls, name))
    return calls


def test_trust_remote_code_is_off_unless_configured():
    cfg = validate_config(_raw())
    assert cfg.llm.trust_remote_code is False and cfg.bert.trust_remote_code is False
    assert LLMConfig().trust_remote_code is False and BertConfig().trust_remote_code is False
    on = validate_config({**_raw(), "llm": {"trust_remote_code": True}})
    assert on.llm.trust_remote_code is True and on.bert.trust_remote_code is False


@pytest.mark.parametrize("trust", [False, True])
def test_llm_loader_passes_trust_remote_code_and_safetensors_only(hf_calls, trust):
    from lambert_ray.annotator import load_annotator_model

    load_annotator_model(LLMConfig(model="/models/some-llm", device="cpu", trust_remote_code=trust))
    assert {c[0] for c in hf_calls} == {"AutoTokenizer", "AutoModelForCausalLM"}
    for name, path, kwargs in hf_calls:
        assert path == "/models/some-llm"
        assert kwargs["trust_remote_code"] is trust, name
    model_kwargs = next(k for n, _, k in hf_calls if n == "AutoModelForCausalLM")
    assert model_kwargs["use_safetensors"] is True


@pytest.mark.parametrize("trust", [False, True])
def test_bert_loader_passes_trust_remote_code_and_safetensors_only(hf_calls, trust):
    from lambert_ray.bert import load_classifier

    load_classifier("/models/bert", ["a", "b"], trust)
    assert {c[0] for c in hf_calls} == {"AutoTokenizer", "AutoModelForSequenceClassification"}
    assert all(k["trust_remote_code"] is trust for _, _, k in hf_calls)
    model_kwargs = next(k for n, _, k in hf_calls if n == "AutoModelForSequenceClassification")
    assert model_kwargs["use_safetensors"] is True


def test_classify_stage_passes_bert_trust_remote_code_to_its_actors(monkeypatch):
    import lambert_ray.stage
    from lambert_ray import bert, classify

    seen: dict = {}
    monkeypatch.setattr(lambert_ray.stage, "run_pool_stage",
                        lambda ds, fn_cls, kwargs, *a, **k: seen.update(cls=fn_cls, kwargs=kwargs))
    cfg = validate_config({**_raw(), "bert": {"trust_remote_code": True}})
    classify.classify(cfg, None, "/models/student", "/tmp/out")
    assert seen["kwargs"]["trust_remote_code"] is True
    loaded: list = []
    monkeypatch.setattr(bert, "load_classifier", lambda path, labels, trust=False: (
        loaded.append(trust) or (SimpleNamespace(to=lambda d: SimpleNamespace(eval=lambda: None)),
                                 None)))
    import torch

    grad = torch.is_grad_enabled()
    try:
        seen["cls"](**seen["kwargs"])
    finally:  # ClassifyBatch turns autograd off for its actor process; not for this one
        torch.set_grad_enabled(grad)
    assert loaded == [True]


def _calls(tree: ast.AST, dotted: str):
    mod, _, fn = dotted.rpartition(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr == fn and isinstance(node.func.value, ast.Name) and \
                node.func.value.id == mod:
            yield node


def test_no_pickle_loading_anywhere_in_the_package():
    """torch.load only with weights_only=True; never pickle.load / torch.load without it."""
    offenders = []
    for path in sorted(PKG.glob("*.py")):
        tree = ast.parse(path.read_text())
        for call in _calls(tree, "torch.load"):
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                offenders.append(f"{path.name}:{call.lineno} torch.load without weights_only=True")
        for dotted in ("pickle.load", "pickle.loads", "cloudpickle.load"):
            offenders += [f"{path.name}:{c.lineno} {dotted}" for c in _calls(tree, dotted)]
    assert not offenders, offenders


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "..", "/etc/cron.d", "\\\\host\\x",
                                  "C:\\runs", "", "  "])
def test_run_name_that_escapes_the_output_dir_is_rejected(name):
    with pytest.raises(ConfigError, match=r"run\.name"):
        validate_config(_raw(name=name))


@pytest.mark.parametrize("name", ["demo", "sst2-2024_01", "team/sst2", "v1.2"])
def test_plain_run_names_are_accepted(name, tmp_path):
    cfg = validate_config({**_raw(), "run": {"name": name, "output_dir": str(tmp_path)}})
    assert Path(cfg.run_dir).resolve().is_relative_to(tmp_path.resolve())


def test_pool_restart_and_retry_settings_reach_map_batches(tmp_path):
    """run_pool_stage hands the configured actor restarts / task retries to map_batches."""
    from lambert_ray.stage import SHARD_BATCHES, run_pool_stage

    seen: dict = {}

    class FakeDataset:
        def count(self) -> int:
            return 0

        def repartition(self, target_num_rows_per_block: int):
            seen["rows_per_shard"] = target_num_rows_per_block
            return self

        def map_batches(self, fn, **kwargs):
            seen.update(kwargs, fn=fn)
            return SimpleNamespace(write_parquet=lambda path, filesystem=None: seen.update(
                    written=path, filesystem=filesystem))

    res = ResourcesConfig(max_restarts=5, max_task_retries=7, batch_size=3, min_actors=1,
                          max_actors=2, num_cpus=0.25, resources={"spot_gpu": 0.5})
    run_pool_stage(FakeDataset(), dict, {"x": 1}, res, str(tmp_path / "out"), rows_in=4)
    assert seen["max_restarts"] == 5 and seen["max_task_retries"] == 7
    assert seen["batch_size"] == 3 and seen["num_cpus"] == 0.25
    assert seen["resources"] == {"spot_gpu": 0.5}
    assert seen["fn_constructor_kwargs"] == {"x": 1}
    assert (seen["compute"].min_size, seen["compute"].max_size) == (1, 2)
    assert seen["written"] == str(tmp_path / "out")
    # shards are whole actor batches, at most SHARD_BATCHES of them (a crash loses little)
    assert seen["rows_per_shard"] % 3 == 0 and 3 <= seen["rows_per_shard"] <= 3 * SHARD_BATCHES


def test_pool_defaults_retry_failed_actors_and_tasks():
    res = ResourcesConfig()
    assert res.max_restarts >= 1 and res.max_task_retries >= 1


def test_rerun_of_a_complete_annotate_stage_skips_the_corpus_scan(tmp_path, monkeypatch):
    """annotate/ and llm_eval/ complete: stage_annotate returns their counts without reading
    the corpus (drawing the sample sorts the whole corpus, minutes at millions of rows)."""
    from lambert_ray import pipeline, storage

    raw = _raw(output_dir=str(tmp_path))
    raw["data"]["gold_test"] = {"path": "test.tsv"}
    cfg = validate_config(raw)
    counts = {"rows_in": 5, "rows_ok": 4, "rows_errored": 1, "resumed_rows": 0}
    for name in ("annotate", "llm_eval"):
        storage.write_json(storage.join(cfg.run_dir, name, "_COMPLETE.json"),
                           {"stage": name, "counts": counts})

    def no_reads(*a, **k):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(pipeline, "read_source", no_reads)
    out = pipeline.stage_annotate(cfg)
    assert out["annotate"].rows_in == 5 and out["llm_eval"].rows_errored == 1


def test_a_failing_row_errors_alone_and_rows_already_in_error_are_not_scored():
    import pandas as pd

    from lambert_ray.stage import map_clean_rows

    scored: list[list[str]] = []

    def fn(texts: list[str]) -> list[dict]:
        scored.append(list(texts))
        if any("BOOM" in t for t in texts):
            raise RuntimeError("kernel fell over")
        return [{"label": t.upper(), "n": len(t)} for t in texts]

    batch = pd.DataFrame({"row_id": list("abcd"), "text": ["ok", "BOOM", "", "fine"],
                          "label": [None] * 4, "error": [None, None, "empty_text", None]})
    cols, errors = map_clean_rows(batch, fn, ["label", "n"], "scoring_failed")
    assert cols == {"label": ["OK", None, None, "FINE"], "n": [2, None, None, 4]}
    assert errors[0] is None and errors[3] is None and errors[2] == "empty_text"
    assert errors[1] == "scoring_failed: RuntimeError: kernel fell over"
    assert scored[0] == ["ok", "BOOM", "fine"]  # the batch, then row by row
    assert scored[1:] == [["ok"], ["BOOM"], ["fine"]]


def test_students_learn_from_the_tuned_labels_and_llm_0shot_from_the_0shot_ones(tmp_path):
    import pandas as pd

    from lambert_ray import pipeline, storage

    raw = _raw(output_dir=str(tmp_path))
    raw["peft"] = {"enabled": True, "method": "ia3"}
    raw["bert"] = {"settings": ["llm-0shot", "llm", "llm+gold"]}
    cfg = validate_config(raw)
    for name, label in (("annotate", "negative"), ("annotate_peft", "positive")):
        storage.write_parquet(pd.DataFrame({"row_id": ["a", "b"], "text": ["x", "y"],
                                            "label": [label, label], "error": [None, None]}),
                              storage.join(cfg.run_dir, name, "0.parquet"))
    storage.write_parquet(pd.DataFrame({"row_id": ["b", "g"], "text": ["y", "z"],
                                        "label": ["negative", "negative"], "error": [None, None]}),
                          storage.join(cfg.run_dir, "gold_train.parquet"))
    assert set(pipeline.student_training_set(cfg, "llm-0shot")["label"]) == {"negative"}
    assert set(pipeline.student_training_set(cfg, "llm")["label"]) == {"positive"}
    both = pipeline.student_training_set(cfg, "llm+gold").set_index("row_id")["label"]
    assert both.to_dict() == {"a": "positive", "b": "negative", "g": "negative"}  # gold wins
