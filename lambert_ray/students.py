"""The BERT student settings: the one place that knows each setting by name.

A setting says which labels a student learns from and what the report calls it:

    llm            the annotator's labels (the PEFT-tuned annotator's when the peft stage runs)
    gold           the gold train subset
    llm+gold       both, mixed in one training set (gold wins where a row is in both)
    llm-then-gold  the `llm` student, then fine-tuned on the gold rows for `bert.then_epochs`
                   (the LlamBERT paper's "LLM labels, then gold"; a few gold epochs, not a
                   second pass over the LLM rows)
    llm-0shot      always the 0-shot annotator's labels (with a peft stage: the baseline)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StudentSetting:
    name: str
    sources: tuple[str, ...]  # "llm" (tuned when a peft stage ran), "llm-0shot", "gold"
    title: str  # the report's row name
    init_from: str | None = None  # start from this setting's student instead of the encoder

    @property
    def uses_tuned_labels(self) -> bool:
        return "llm" in self.sources or self.init_from == "llm"


SETTINGS: dict[str, StudentSetting] = {s.name: s for s in [
    StudentSetting("llm", ("llm",), "BERT on LLM labels"),
    StudentSetting("gold", ("gold",), "BERT on gold"),
    StudentSetting("llm+gold", ("llm", "gold"), "BERT on LLM+gold"),
    StudentSetting("llm-then-gold", ("gold",), "BERT on LLM labels, then gold", init_from="llm"),
    StudentSetting("llm-0shot", ("llm-0shot",), "BERT on LLM 0-shot labels"),
]}


def student_epochs(setting: str, bert) -> int:
    """Epochs a student trains (`bert` is the BertConfig): a student that starts from another one
    trains `then_epochs`, the others `epochs`."""
    return bert.then_epochs if SETTINGS[setting].init_from else bert.epochs


def student_title(setting: str, tuned_method: str | None = None) -> str:
    """The report's name for a student; with a peft stage the LLM labels are the tuned ones."""
    s = SETTINGS[setting]
    if tuned_method and s.uses_tuned_labels:
        return s.title.replace("LLM", f"LLM+{tuned_method}")
    return s.title
