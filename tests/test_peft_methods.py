"""PEFT core without Ray: every registered method trains, checkpoints, resumes, saves and reloads
into the Annotator (tiny random Llama, SmolLM2 tokenizer)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft_tiny import GOLD, tiny_config
from safetensors.torch import load_file

from lambert_ray.annotator import Annotator
from lambert_ray.config import ConfigError
from lambert_ray.finetune import train_adapter
from lambert_ray.layout import ADAPTER_META
from lambert_ray.metrics import metrics_from_confusion
from lambert_ray.peft_methods import METHODS, method_of_adapter

ALL = list(METHODS)


@pytest.fixture(scope="module")
def tiny_path(tiny_llama) -> str:
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention on shared CPUs
    return tiny_llama


@pytest.fixture(scope="module")
def trained(tiny_path, tmp_path_factory) -> dict[str, tuple]:
    """One uninterrupted run per method: method -> (config, adapter dir, metadata)."""
    out = {}
    for m in ALL:
        cfg = tiny_config(tiny_path, m)
        d = tmp_path_factory.mktemp(m)
        out[m] = (cfg, d / "adapter", train_adapter(cfg, GOLD, GOLD, d / "adapter",
                                                     checkpoint_dir=d / "ckpt"))
    return out


@pytest.mark.parametrize("method", ALL)
def test_method_lowers_training_loss(trained, method):
    _, _, meta = trained[method]
    losses = [h["train_loss"] for h in meta["history"]]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("method", ALL)
def test_saved_adapter_has_peft_files_and_metadata(trained, method):
    cfg, adapter, meta = trained[method]
    assert (adapter / "adapter_model.safetensors").exists()
    on_disk = json.loads((adapter / ADAPTER_META).read_text())
    assert on_disk == meta
    assert meta["method"] == method and meta["base_model"] == cfg.llm.model
    assert 0 < meta["trainable_params"] < meta["total_params"]
    assert meta["adapter_mb"] > 0 and meta["peak_memory_mb"] > 0 and meta["wall_time_s"] > 0
    assert set(meta["dev_before"]) == {"accuracy", "macro_f1", "n"} and meta["n_dev"] == len(GOLD)
    from peft import PeftConfig

    assert method_of_adapter(PeftConfig.from_pretrained(str(adapter))).name == method


@pytest.mark.parametrize("method", ALL)
def test_adapter_reloads_into_annotator_and_changes_scores(trained, method):
    cfg, adapter, meta = trained[method]
    texts = [t for t, _ in GOLD]
    base = Annotator.from_config(cfg).score(texts)
    tuned_cfg = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"adapter": str(adapter)})})
    tuned = Annotator.from_config(tuned_cfg).score(texts)
    assert not np.allclose(base["logprobs"], tuned["logprobs"], atol=1e-4)
    # scored exactly as in training: the reloaded adapter reproduces the recorded dev accuracy
    acc = float(np.mean([p == y for p, (_, y) in zip(tuned["label_id"], GOLD, strict=True)]))
    assert acc == pytest.approx(meta["dev_after"]["accuracy"])


@pytest.mark.parametrize("method", ALL)
def test_merge_matches_unmerged_or_is_refused(trained, method):
    cfg, adapter, _ = trained[method]
    texts = [t for t, _ in GOLD[:4]]
    llm = cfg.llm.model_copy(update={"adapter": str(adapter)})
    unmerged = Annotator.from_config(cfg.model_copy(update={"llm": llm})).score(texts)
    merged_cfg = cfg.model_copy(update={"llm": llm.model_copy(update={"merge_adapter": True})})
    if not METHODS[method].supports_merge:
        with pytest.raises(ValueError, match="does not merge"):
            Annotator.from_config(merged_cfg)
        return
    merged = Annotator.from_config(merged_cfg).score(texts)
    np.testing.assert_allclose(merged["logprobs"], unmerged["logprobs"], atol=1e-4)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", ALL)
def test_resume_after_interruption_matches_uninterrupted_run(trained, tiny_path, tmp_path, method):
    cfg, adapter, meta = trained[method]
    ckpt = tmp_path / "ckpt"

    def stop_after_3(h: dict) -> None:
        if h["epoch"] == 3:
            raise _Stop

    with pytest.raises(_Stop):
        train_adapter(cfg, GOLD, GOLD, tmp_path / "a", checkpoint_dir=ckpt, on_epoch=stop_after_3)
    resumed_epochs = []
    meta2 = train_adapter(cfg, GOLD, GOLD, tmp_path / "b", checkpoint_dir=ckpt,
                          on_epoch=lambda h: resumed_epochs.append(h["epoch"]))
    assert resumed_epochs == [4, 5, 6, 7, 8]
    assert [h["epoch"] for h in meta2["history"]] == list(range(1, 9))
    want = load_file(str(adapter / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)


def test_unknown_method_is_a_config_error_naming_the_field(tiny_path):
    with pytest.raises(ConfigError, match=r"peft\.method: .*unknown PEFT method 'lorax'"):
        tiny_config(tiny_path, "lorax")


def test_ia3_feedforward_modules_must_be_targets(tiny_path):
    with pytest.raises(ConfigError, match=r"peft\.ia3"):
        tiny_config(tiny_path, "ia3", ia3={"target_modules": ["k_proj"],
                                           "feedforward_modules": ["down_proj"]})


def test_macro_f1_of_a_confusion_matrix():
    cm = np.array([[3, 1], [2, 4]])  # gold x predicted
    m = metrics_from_confusion(cm)
    assert m["accuracy"] == pytest.approx(0.7)
    f1_neg = 2 * 3 / (2 * 3 + 1 + 2)
    f1_pos = 2 * 4 / (2 * 4 + 1 + 2)
    assert m["macro_f1"] == pytest.approx((f1_neg + f1_pos) / 2)


def test_gold_pairs_keeps_clean_rows_with_known_labels():
    import pandas as pd

    from lambert_ray.data import gold_pairs

    df = pd.DataFrame({"text": ["good", "bad", "broken", "odd"],
                       "label": ["positive", "negative", "positive", "neutral"],
                       "error": [None, None, "too_short", None]})
    assert gold_pairs(df, ["negative", "positive"]) == [("good", 1), ("bad", 0)]
    assert gold_pairs(None, ["negative", "positive"]) == []


def test_every_config_method_section_has_a_registry_entry():
    from lambert_ray.config import peft_method_names

    assert peft_method_names() == list(METHODS)
