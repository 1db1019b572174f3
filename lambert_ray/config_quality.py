"""Config sections for label quality: calibration of the annotator's probabilities and the
disagreement review. Part of the one `PipelineConfig` (config.py imports them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationConfig(_Section):
    """How the annotator's label probabilities are calibrated before the students read them
    (lambert_ray/calibration.py; docs/calibration.md). Fitted once per annotator into
    <run_dir>/calibration.json and applied when labels are read (raw ones are kept)."""

    method: Literal["none", "prior", "temperature_bias", "auto"] = Field(
        default="auto", description="'prior': divide out the label prior (no gold); "
        "'temperature_bias': temperature + per-label bias fitted by NLL on gold dev rows the "
        "annotator labels; 'auto': temperature_bias when at least min_dev_rows gold dev rows "
        "exist, else prior; 'none': raw probabilities.")
    prior_source: Literal["annotated", "content_free"] = Field(
        default="annotated", description="Where 'prior' estimates the prior: the annotator's mean "
        "distribution on the annotated corpus rows, or on content_free_inputs.")
    prior_iterations: int = Field(
        default=100, ge=1, description="1: one step of contextual calibration; more: repeat until "
        "the annotated rows' mean calibrated distribution is prior_target (annotated source only).")
    prior_target: list[float] | None = Field(
        default=None, description="Class distribution the corpus is assumed to have, in "
        "labels.names order (None: uniform).")
    content_free_inputs: list[str] = Field(
        default_factory=lambda: ["N/A", "[MASK]", ""], min_length=1,
        description="Texts without content, scored in the prompt for prior_source=content_free.")
    dev_limit: int | None = Field(
        default=300, ge=1, description="Gold dev rows the annotator labels to fit temperature_bias "
        "(None: all).")
    min_dev_rows: int = Field(default=50, ge=2,
                              description="'auto' needs this many labelled dev rows for temperature_bias.")
    steps: int = Field(default=200, ge=1, description="LBFGS iterations for temperature_bias.")


class ReviewConfig(_Section):
    """Rows a person should label next: teacher and student disagree, or the teacher is unsure."""

    enabled: bool = Field(default=True, description="Write <run_dir>/review/ after classify.")
    min_confidence: float = Field(default=0.6, ge=0, le=1,
                                  description="Flag rows whose (calibrated) teacher confidence is below this.")
