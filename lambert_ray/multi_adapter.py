"""Several PEFT adapters on one loaded base model: each batch scored under every adapter.

    ann = MultiAnnotator.from_config(cfg)     # cfg.llm.adapters: {name: adapter dir}
    out = ann.score(texts)                    # {name: Annotator.score's dict}, same rows

N adapters cost one model load and one read of the rows instead of N of each; the forward
passes are still one per adapter (every row is scored under every adapter). No Ray here.

How the adapters share the base (peft 0.21):
- peft keeps adapters of one type per PeftModel (`add_adapter` refuses to mix LoRA with IA3, or
  either with prompt tuning). Adapters are grouped by peft type: one PeftModel per group,
  `PeftModel.from_pretrained(..., adapter_name=...)` for the first and `load_adapter` for the
  rest; LoRA and DoRA share a group. Before a group scores, `set_adapter` makes the adapter
  active (a flag on each adapted layer, or which prompt encoder `get_prompt` reads).
- LoRA and IA3 inject their layers into the module tree they wrap, so each group wraps its own
  tree over the same weight tensors (`shared_weights_copy`, made before any injection): the base
  weights are held once, and no group sees another group's layers.
- Adapter names inside peft are `adapter_<i>`, not the config's names: peft warns that a name
  contained in its weight prefix ("lora" in "lora_", "ia3" in "ia3_") may re-initialise the
  weights on loading, and "lora" / "ia3" are the natural names of a method comparison.

Each adapter scores through its own `Annotator`, the code of a single-adapter run, so labels and
log-probs equal those of separate runs. Its prefix KV cache is its own, built while that
adapter is active: a LoRA / IA3 layer anywhere changes the hidden states of the prefix and so the
keys and values of every later layer, so no two adapters (nor the base) share one.
Prompt-learning adapters take no prefix cache, as in a single run.

peft's mixed-batch forward (`adapter_names=[...]`, rows of different adapters in one batch) is
not used: it exists for LoRA only (peft raises for DoRA; IA3 and prompt learning have none); it
runs the base layer on the whole batch and each adapter's A/B on its sub-batch, so with every
row under every adapter it does the same work as one forward per adapter at the same token
budget; each row would need its own adapter's prefix cache (a copied concatenation per batch
instead of a broadcast view); and it is reached only through PeftModel.forward, which the
scoring path bypasses (it runs the decoder and applies the head at the answer positions).
benchmarks/multi_adapter.py measures it against switching.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch

from lambert_ray.annotator import Annotator, adapter_local_path
from lambert_ray.config import LabelsConfig, LLMConfig, PipelineConfig, PromptConfig
from lambert_ray.models import load_causal_lm
from lambert_ray.peft_methods import PeftMethod, method_of_adapter

log = logging.getLogger(__name__)


def shared_weights_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same parameter and buffer tensors (no weight is copied):
    peft can inject adapter layers into it without touching `model`'s tree."""
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


@dataclass
class AdapterSlot:
    """One named adapter: the PeftModel of its group and its name inside it."""

    name: str
    path: str
    model: Any  # peft.PeftModel (its group's)
    peft_name: str
    method: PeftMethod


def load_adapter_set(llm: LLMConfig, adapters: dict[str, str]):
    """Load the base model once and every adapter of `adapters` ({name: dir / URI}) onto it.
    Returns ({name: AdapterSlot}, tokenizer)."""
    from peft import PeftConfig, PeftModel

    if not adapters:
        raise ValueError("load_adapter_set: no adapters")
    base, tok = load_causal_lm(llm.model, dtype=llm.dtype, quantization=llm.quantization,
                               device=llm.device, trust_remote_code=llm.trust_remote_code,
                               gguf_file=llm.gguf_file)
    paths = {name: adapter_local_path(path) for name, path in adapters.items()}
    groups: dict[str, list[str]] = {}
    methods = {}
    for name, path in paths.items():
        pc = PeftConfig.from_pretrained(path)
        methods[name] = method_of_adapter(pc)
        groups.setdefault(methods[name].peft_type, []).append(name)
    # Every tree is copied from the pristine base before any group injects into it.
    trees = [base] + [shared_weights_copy(base) for _ in range(len(groups) - 1)]
    peft_names = {name: f"adapter_{i}" for i, name in enumerate(adapters)}
    slots: dict[str, AdapterSlot] = {}
    for tree, names in zip(trees, groups.values(), strict=True):
        model = PeftModel.from_pretrained(tree, paths[names[0]], adapter_name=peft_names[names[0]])
        for name in names[1:]:
            model.load_adapter(paths[name], adapter_name=peft_names[name])
        model.eval()
        for name in names:
            slots[name] = AdapterSlot(name, adapters[name], model, peft_names[name], methods[name])
    log.info("%d adapters on one base, %d peft groups: %s", len(slots), len(groups),
             {t: names for t, names in groups.items()})
    return {name: slots[name] for name in adapters}, tok


class MultiAnnotator:
    """Scores texts under each of several adapters that share one base model."""

    def __init__(self, slots: dict[str, AdapterSlot], tokenizer, prompt: PromptConfig,
                 labels: LabelsConfig, *, model_id: str = "", **annotator_kwargs):
        self.slots = slots
        self._annotators: dict[str, Annotator] = {}
        for name, slot in slots.items():
            self._activate(name)  # Annotator reads the active adapter's type (prompt learning?)
            self._annotators[name] = Annotator(slot.model, tokenizer, prompt, labels,
                                               model_id=f"{model_id}+{slot.path}",
                                               **annotator_kwargs)

    @classmethod
    def from_config(cls, cfg: PipelineConfig, adapters: dict[str, str] | None = None) -> MultiAnnotator:
        """The adapters of `llm.adapters` (or `adapters`) on `llm.model`."""
        slots, tok = load_adapter_set(cfg.llm, adapters or cfg.llm.adapters)
        return cls(slots, tok, cfg.prompt, cfg.labels, model_id=cfg.llm.model,
                   max_length=cfg.llm.max_length, token_budget=cfg.llm.token_budget,
                   reuse_prefix=cfg.llm.reuse_prefix)

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def _activate(self, name: str) -> None:
        slot = self.slots[name]
        if slot.model.active_adapter != slot.peft_name:
            slot.model.set_adapter(slot.peft_name, inference_mode=True)

    def score(self, texts: list[str], names: list[str] | None = None) -> dict[str, dict[str, list]]:
        """{adapter name: `Annotator.score(texts)`} for `names` (default: every adapter)."""
        out = {}
        for name in names or self.names:
            self._activate(name)  # its prefix cache, too, is built (once) with it active
            out[name] = self._annotators[name].score(texts)
        return out

    @property
    def model_ids(self) -> dict[str, str]:
        return {name: a.model_id for name, a in self._annotators.items()}

    @property
    def prompt_hash(self) -> str:
        return next(iter(self._annotators.values())).prompt_hash

    @property
    def stats(self) -> dict[str, dict]:
        return {name: a.stats for name, a in self._annotators.items()}
