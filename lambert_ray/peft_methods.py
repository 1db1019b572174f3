"""The PEFT method registry: the one place that knows each method by name.

    method = METHODS["lora"]
    peft_config = method.build(cfg.peft.lora, BuildContext(model_path, init_text))
    model = get_peft_model(base, peft_config)

Each entry turns the typed hyperparameters of its `peft.<name>` config section into a peft config
(task CAUSAL_LM) and states what the training loop and the annotator need to know about it:
whether it merges into the base weights, whether it is a prompt-learning method (peft owns the
forward and prepends virtual tokens / past key-values), whether gradient checkpointing must stay
off, and a default learning rate. Adding a method = one entry here + one config section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
)

from lambert_ray.config import (
    IA3Params,
    LoraParams,
    PrefixTuningParams,
    PromptTuningParams,
    PTuningParams,
)


@dataclass(frozen=True)
class BuildContext:
    """What some methods need besides their hyperparameters."""

    model_path: str = ""  # tokenizer location (prompt tuning's text init)
    init_text: str = ""  # default prompt-tuning init text (the prompt's instruction)


@dataclass(frozen=True)
class PeftMethod:
    name: str
    build: Callable[[Any, BuildContext], PeftConfig]
    supports_merge: bool  # a weight adapter that `merge_and_unload` folds into the base
    prompt_learning: bool  # virtual tokens / past key-values; no shared-prefix KV reuse
    needs_no_gradient_checkpointing: bool  # peft's prompt forward breaks with it (past kv)
    default_lr: float
    description: str
    peft_type: str  # peft's PeftType value, to recognise a saved adapter
    config_flags: tuple[tuple[str, Any], ...] = ()  # tells apart methods sharing a peft_type


def _lora(p: LoraParams, ctx: BuildContext, use_dora: bool = False) -> PeftConfig:
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=p.r, lora_alpha=p.alpha,
                      lora_dropout=p.dropout, target_modules=list(p.target_modules),
                      use_dora=use_dora, bias="none")


def _dora(p: LoraParams, ctx: BuildContext) -> PeftConfig:
    return _lora(p, ctx, use_dora=True)


def _prefix(p: PrefixTuningParams, ctx: BuildContext) -> PeftConfig:
    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=p.num_virtual_tokens,
                              prefix_projection=p.prefix_projection,
                              encoder_hidden_size=p.encoder_hidden_size)


def _p_tuning(p: PTuningParams, ctx: BuildContext) -> PeftConfig:
    return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=p.num_virtual_tokens,
                               encoder_hidden_size=p.encoder_hidden_size,
                               encoder_num_layers=p.encoder_num_layers,
                               encoder_reparameterization_type=p.encoder_reparameterization_type)


def _prompt_tuning(p: PromptTuningParams, ctx: BuildContext) -> PeftConfig:
    kwargs: dict[str, Any] = {}
    if p.init == "text":
        text = p.init_text or ctx.init_text
        if not text or not ctx.model_path:
            raise ValueError("peft.prompt_tuning.init=text needs init_text (or a prompt) and a "
                             "tokenizer path")
        kwargs = dict(prompt_tuning_init_text=text, tokenizer_name_or_path=ctx.model_path)
    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=p.num_virtual_tokens,
                              prompt_tuning_init=p.init.upper(), **kwargs)


def _ia3(p: IA3Params, ctx: BuildContext) -> PeftConfig:
    return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=list(p.target_modules),
                     feedforward_modules=list(p.feedforward_modules))


METHODS: dict[str, PeftMethod] = {m.name: m for m in [
    PeftMethod("lora", _lora, supports_merge=True, prompt_learning=False,
               needs_no_gradient_checkpointing=False, default_lr=5e-4,
               description="low-rank updates on attention projections",
               peft_type="LORA", config_flags=(("use_dora", False),)),
    PeftMethod("dora", _dora, supports_merge=True, prompt_learning=False,
               needs_no_gradient_checkpointing=False, default_lr=5e-4,
               description="weight-decomposed LoRA (magnitude + direction)",
               peft_type="LORA", config_flags=(("use_dora", True),)),
    PeftMethod("prefix_tuning", _prefix, supports_merge=False, prompt_learning=True,
               needs_no_gradient_checkpointing=True, default_lr=1e-2,
               description="trained key/value prefixes in every layer",
               peft_type="PREFIX_TUNING"),
    PeftMethod("p_tuning", _p_tuning, supports_merge=False, prompt_learning=True,
               needs_no_gradient_checkpointing=True, default_lr=1e-3,
               description="virtual input tokens from an MLP/LSTM prompt encoder",
               peft_type="P_TUNING"),
    PeftMethod("prompt_tuning", _prompt_tuning, supports_merge=False, prompt_learning=True,
               needs_no_gradient_checkpointing=True, default_lr=1e-2,
               description="trained soft-prompt embeddings",
               peft_type="PROMPT_TUNING"),
    PeftMethod("ia3", _ia3, supports_merge=True, prompt_learning=False,
               needs_no_gradient_checkpointing=False, default_lr=5e-3,
               description="learned rescaling vectors on keys, values and FFN inputs",
               peft_type="IA3"),
]}


def get_method(name: str) -> PeftMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown PEFT method {name!r}; known: {', '.join(METHODS)}") from None


def method_of_adapter(peft_config: PeftConfig) -> PeftMethod:
    """The registry entry matching a loaded adapter's config (peft type + distinguishing flags)."""
    kind = str(getattr(peft_config.peft_type, "value", peft_config.peft_type)).upper()
    for m in METHODS.values():
        if m.peft_type == kind and all(getattr(peft_config, k, None) == v for k, v in m.config_flags):
            return m
    raise ValueError(f"adapter type {kind} is not one of lambert_ray's PEFT methods")
