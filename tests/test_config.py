"""Config: YAML + overrides -> one validated PipelineConfig; errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from lambert_ray.config import ConfigError, load_config, validate_config


def test_demo_config_loads_with_defaults():
    cfg = load_config()
    assert cfg.labels.names == ["negative", "positive"]
    assert cfg.llm.model == "smollm2" and cfg.bert.model == "minilm"
    assert cfg.llm.trust_remote_code is False and cfg.bert.trust_remote_code is False
    assert cfg.run_dir.endswith("demo-sst2")


def test_override_sets_nested_field_with_yaml_typing():
    cfg = load_config(None, ["annotate.batch_size=7", "bert.settings=[llm]", "bert.lr=0.001"])
    assert cfg.annotate.batch_size == 7
    assert cfg.bert.settings == ["llm"] and cfg.bert.lr == 0.001


def test_wrong_type_error_names_the_field():
    with pytest.raises(ConfigError, match=r"annotate\.batch_size"):
        load_config(None, ["annotate.batch_size=many"])


def test_unknown_field_is_rejected_by_name():
    with pytest.raises(ConfigError, match=r"llm\.temprature"):
        load_config(None, ["llm.temprature=0.1"])


def test_template_without_text_placeholder_is_rejected():
    with pytest.raises(ConfigError, match=r"prompt\.template"):
        load_config(None, ["prompt.template=Classify this"])


def test_label_values_must_match_label_names():
    with pytest.raises(ConfigError, match="label_values"):
        load_config(None, ["data.label_values=[0, 1, 2]"])


def test_classify_with_must_be_a_trained_setting():
    with pytest.raises(ConfigError, match="classify_with"):
        load_config(None, ["bert.settings=[gold]"])


def test_a_student_that_starts_from_another_needs_that_one_first():
    with pytest.raises(ConfigError, match=r"bert.settings: 'llm-then-gold' starts from the 'llm'"):
        load_config(None, ["bert.settings=[gold,llm-then-gold]", "bert.classify_with=gold"])
    cfg = load_config(None, ["bert.settings=[llm,llm-then-gold]", "bert.then_epochs=1"])
    from lambert_ray.students import student_epochs
    assert [student_epochs(s, cfg.bert) for s in cfg.bert.settings] == [cfg.bert.epochs, 1]


def test_malformed_override_is_explained():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["annotate.batch_size"])


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_data_dir_expands_environment(monkeypatch):
    monkeypatch.setenv("LAMBERT_DATA_DIR", "/data/here")
    assert load_config().data.data_dir == "/data/here"


def test_minimal_multiclass_config_validates():
    cfg = validate_config({
        "data": {"corpus": {"path": "ag_news/test.csv", "text_column": ["title", "description"],
                            "label_column": "label"}, "label_values": [1, 2, 3, 4]},
        "labels": {"names": ["World", "Sports", "Business", "Sci/Tech"]},
        "prompt": {"template": "Topic of: {text}"},
    })
    assert cfg.data.corpus.text_column == ["title", "description"]


def test_left_out_data_dir_is_the_expanded_default(monkeypatch):
    minimal = {"data": {"corpus": {"path": "x.tsv"}}, "labels": {"names": ["a", "b"]}}
    monkeypatch.setenv("LAMBERT_DATA_DIR", "/data/here")
    assert validate_config(minimal).data.data_dir == "/data/here"
    monkeypatch.delenv("LAMBERT_DATA_DIR")
    assert validate_config(minimal).data.data_dir == "../shared/data"


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: x\ndata:\n  corpus: {path: a.tsv\nlabels: [a, b]\n")
    with pytest.raises(ConfigError, match=rf"^{path}:5:7: invalid YAML: .*opened at line 4"):
        load_config(path)


def test_left_out_prompt_is_the_label_sets_default_with_the_text_last(tiny_llama):
    from transformers import AutoTokenizer

    from lambert_ray.prompts import PromptBuilder

    cfg = validate_config({"data": {"corpus": {"path": "x.tsv"}},
                           "labels": {"names": ["World", "Sports", "Business", "Sci/Tech"]}})
    assert "{labels}" in cfg.prompt.template and cfg.prompt.template.endswith("{text}")
    tok = AutoTokenizer.from_pretrained(tiny_llama)  # SmolLM2's tokenizer and chat template
    builder = PromptBuilder(tok, cfg.prompt, cfg.labels, max_length=256)
    assert "'Sci/Tech'" in builder.prefix_text  # the label list is in the shared prefix


def test_an_llm_0shot_student_needs_the_0shot_labels():
    raw = {"data": {"corpus": {"path": "c.tsv"}}, "labels": {"names": ["a", "b"]},
           "prompt": {"template": "{text}"}, "peft": {"enabled": True, "zero_shot": False},
           "bert": {"settings": ["llm", "llm-0shot"]}}
    with pytest.raises(ConfigError, match="peft.zero_shot"):
        validate_config(raw)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    """A config in configs/ that no longer validates is a broken promise to its users."""
    cfg = load_config(path)
    assert cfg.labels.names and cfg.run.name
