"""PEFT on Ray Train + DeepSpeed (ZeRO-2, gloo, 2 workers) with the tiny random Llama: one run
whose first attempt fails after epoch 1, so Ray restarts the workers from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from peft_tiny import GOLD, tiny_config

from lambert_ray.annotator import Annotator
from lambert_ray.layout import ADAPTER_META
from lambert_ray.train_peft import train_peft

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def ray_run(ray_local, tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peft_ray")
    cfg = tiny_config(tiny_llama, "lora", epochs=3, num_workers=2, cpus_per_worker=0.5,
                      zero_stage=2, max_failures=1)
    def on_epoch(record: dict) -> None:
        """Logs which epochs each attempt trained; every rank fails once, after epoch 1's
        checkpoint (runs in the Train workers: pickled by value as a local function)."""
        rank = record["rank"]
        with open(tmp / f"rank{rank}.log", "a") as f:
            f.write(f"{record['epoch']}\n")
        failed = tmp / f"failed_once.rank{rank}"
        if record["epoch"] == 1 and not failed.exists():
            failed.touch()
            raise RuntimeError("injected failure after epoch 1")

    meta = train_peft(cfg, GOLD, GOLD, str(tmp / "peft" / "lora"), on_epoch=on_epoch)
    return cfg, tmp, meta


@pytest.mark.timeout(300)
def test_ray_deepspeed_lora_trains_and_saves_a_servable_adapter(ray_run):
    cfg, tmp, meta = ray_run
    out = tmp / "peft" / "lora"
    assert json.loads((out / ADAPTER_META).read_text()) == meta
    assert meta["training"]["num_workers"] == 2 and meta["training"]["zero_stage"] == 2
    losses = [h["train_loss"] for h in meta["history"]]
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]
    assert losses[-1] < losses[0], losses
    assert meta["dev_after"]["n"] == len(GOLD)
    texts = [t for t, _ in GOLD]
    base = Annotator.from_config(cfg).score(texts)
    llm = cfg.llm.model_copy(update={"adapter": str(out)})
    tuned = Annotator.from_config(cfg.model_copy(update={"llm": llm})).score(texts)
    assert not np.allclose(base["logprobs"], tuned["logprobs"], atol=1e-4)
    acc = float(np.mean([p == y for p, (_, y) in zip(tuned["label_id"], GOLD, strict=True)]))
    assert acc == pytest.approx(meta["dev_after"]["accuracy"])


@pytest.mark.timeout(300)
def test_ray_worker_failure_resumes_from_the_last_checkpoint(ray_run):
    _, tmp, _ = ray_run
    for rank in (0, 1):
        assert (tmp / f"failed_once.rank{rank}").exists()
        epochs = Path(tmp / f"rank{rank}.log").read_text().split()
        # attempt 1 trained epoch 1 then failed; attempt 2 resumed at epoch 2 (not from scratch)
        assert epochs == ["1", "2", "3"], epochs
