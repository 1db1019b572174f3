"""Prompt building: config template + the model's chat template -> token ids.

A prompt is split into three token runs:

    prefix  (system + few-shot + instruction before {text})  -- identical for every row
    text    (the row, truncated to fit the model window)
    suffix  (instruction after {text} + the assistant header + answer_prefix)

so the annotator can compute the prefix's key/values once and reuse them for every batch.
The label is read at the answer position that follows the suffix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from lambert_ray.config import LabelsConfig, PromptConfig

_SENTINEL = "\u2063LAMBERT_TEXT\u2063"


@dataclass(frozen=True)
class EncodedRow:
    ids: list[int]  # text + suffix tokens (the prefix is shared and kept apart)
    truncated: bool


def _label_list(labels: LabelsConfig) -> str:
    if labels.descriptions:
        return "\n".join(f"- {a}: {d}" for a, d in zip(labels.answers, labels.descriptions, strict=True))
    return ", ".join(f"'{a}'" for a in labels.answers)


def render_prompt(tokenizer, prompt: PromptConfig, labels: LabelsConfig, text: str) -> str:
    """The full prompt string for one text (chat template applied when the tokenizer has one)."""
    fill = dict(labels=_label_list(labels))
    user = prompt.template.replace("{labels}", fill["labels"])
    messages = []
    if prompt.system:
        messages.append({"role": "system", "content": prompt.system.replace("{labels}", fill["labels"])})
    for shot in prompt.few_shot:
        if shot.label not in labels.names:
            raise ValueError(f"prompt.few_shot label {shot.label!r} is not in labels.names")
        answer = labels.answers[labels.names.index(shot.label)]
        messages.append({"role": "user", "content": user.replace("{text}", shot.text)})
        messages.append({"role": "assistant", "content": prompt.answer_prefix + answer})
    messages.append({"role": "user", "content": user.replace("{text}", text)})
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # base models without a chat template: plain turns
        rendered = "\n\n".join(m["content"] for m in messages) + "\n\nAnswer: "
    return rendered + prompt.answer_prefix


class PromptBuilder:
    """Tokenizes prompts as shared prefix + per-row (text + suffix) ids, and the verbalisers."""

    def __init__(self, tokenizer, prompt: PromptConfig, labels: LabelsConfig, max_length: int):
        self.tokenizer = tokenizer
        full = render_prompt(tokenizer, prompt, labels, _SENTINEL)
        prefix, sep, suffix = full.partition(_SENTINEL)
        assert sep, "chat template dropped the text placeholder"
        self.prefix_text, self.suffix_text = prefix, suffix
        self.prefix_ids = self._ids(prefix, first=True)
        self.suffix_ids = self._ids(suffix)
        self.verbalisers = [self._ids(a) for a in labels.answers]
        if any(len(v) == 0 for v in self.verbalisers):
            raise ValueError("a label verbaliser tokenizes to nothing")
        if len({tuple(v) for v in self.verbalisers}) != len(self.verbalisers):
            raise ValueError(f"labels.verbalisers tokenize identically: {labels.answers}")
        fixed = len(self.prefix_ids) + len(self.suffix_ids) + max(len(v) for v in self.verbalisers)
        self.max_text_tokens = max_length - fixed
        if self.max_text_tokens < 8:
            raise ValueError(f"llm.max_length={max_length} leaves {self.max_text_tokens} tokens for the "
                             f"text after the {fixed}-token prompt")
        self.hash = hashlib.sha256(
            "\x00".join([prefix, suffix, *labels.answers]).encode()).hexdigest()[:16]

    def _ids(self, text: str, first: bool = False) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        # Models without a chat template (or whose template omits BOS) still expect BOS first.
        if first and bos is not None and getattr(self.tokenizer, "add_bos_token", False) and (
                not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def encode(self, texts: list[str]) -> list[EncodedRow]:
        """Per-row ids (text + suffix); texts longer than the window are cut and flagged."""
        batch = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        rows = []
        for ids in batch:
            cut = len(ids) > self.max_text_tokens
            rows.append(EncodedRow(ids[: self.max_text_tokens] + self.suffix_ids, cut))
        return rows
