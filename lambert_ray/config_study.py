"""Config section of the PEFT study (`study:`): which PEFT method labels best, with error bars.
Part of the one `PipelineConfig` (config.py imports it); the study itself is `study.py`.

Phase 1 picks each method's learning rate on dev (`methods.<m>.lr`, at `select_budget` gold
rows, `select_seeds`); phase 2 trains every method at its chosen lr at each of `budgets` with
each of `seeds`. Every trial keeps its best dev epoch and is then scored once on test rows that
no selection saw.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudyMethod(_Section):
    """One method of the study: its phase-1 learning-rate grid and fixed hyperparameters."""

    lr: list[float] = Field(min_length=1, description="Phase-1 grid; one value: no sweep trials.")
    params: dict[str, Any] = Field(default_factory=dict, description="peft.<method> fields held "
                                   "fixed for every trial of the method (e.g. {r: 8}).")

    @model_validator(mode="after")
    def _positive(self) -> StudyMethod:
        if any(lr <= 0 for lr in self.lr):
            raise ValueError("learning rates must be > 0")
        return self


class StudySplit(_Section):
    """Cut one labelled table (data.gold_train) into pool / dev / test by a hash of row_id, for a
    task whose data ships as one file (AG News' test.csv here): deterministic, order-free."""

    dev_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    salt: str = "study-split"

    @model_validator(mode="after")
    def _room_for_a_pool(self) -> StudySplit:
        if self.dev_fraction + self.test_fraction >= 1:
            raise ValueError("dev_fraction + test_fraction must leave rows for the gold pool")
        return self


class StudyDownstream(_Section):
    """The downstream check (study_downstream.py): at one gold budget and seed, every method's
    kept adapter labels the same corpus sample in one pass, and a student trains on each."""

    budget: int | None = Field(default=None, ge=1, description="Whose adapters label: the phase-2 "
                               "trials at this budget (None: the smallest of study.budgets).")
    seed: int | None = Field(default=None, description="... and this seed (None: the first of "
                             "study.seeds).")
    corpus_rows: int = Field(default=2000, ge=1, description="Rows of data.corpus (else the gold "
                             "pool) the adapters label, none of them a study gold, dev or test "
                             "row.")
    sample_seed: int = Field(default=0, description="Seeds the corpus sample.")


class StudyConfig(_Section):
    name: str = Field(default="peft_study", description="Names the Tune experiments.")
    task: str | None = Field(default=None, description="The task's name in tables (None: run.name).")
    methods: dict[str, StudyMethod] = Field(min_length=1)
    select_budget: int = Field(default=300, ge=1, description="Gold rows of the phase-1 lr sweep.")
    select_seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    budgets: list[int] = Field(default_factory=lambda: [100, 300, 1000], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1,
                             description="Each seed draws its own gold rows (nested over budgets) "
                             "and its own init; methods share them, so comparisons are paired.")
    epochs: int = Field(default=3, ge=1, description="Every trial runs them all (no early stop); "
                        "the best dev epoch is kept.")
    dev_rows: int | None = Field(default=500, ge=1, description="Cached dev rows every trial is "
                                 "scored on after each epoch (None: all).")
    test_rows: int | None = Field(default=None, ge=1, description="Test rows (None: all).")
    max_length: int | None = Field(default=None, ge=16, description="Caps llm.max_length for the "
                                   "study's training and scoring (bounds cost).")
    split: StudySplit | None = None
    storage_path: str | None = Field(default=None, description="Study dir (local or bucket URI); "
                                     "None: <run_dir>/study.")
    trial_cpus: float = Field(default=0.1, gt=0, description="Tune trial driver's CPU request.")
    num_workers: int | None = Field(default=None, ge=1)
    cpus_per_worker: float | None = Field(default=None, gt=0)
    use_gpu: bool | None = None
    max_concurrent_trials: int = Field(default=1, ge=1)
    max_failures: int = Field(default=0, ge=0)
    keep_train_runs: bool = Field(default=False, description="Keep each finished trial's Ray "
                                  "Train checkpoints (the kept adapter is always kept).")
    downstream: StudyDownstream | None = Field(default=None, description="The student-vs-"
                                               "annotator check (`lambert-ray study --phase 3`).")

    @model_validator(mode="after")
    def _sorted_unique(self) -> StudyConfig:
        for name in ("budgets", "seeds", "select_seeds"):
            v = getattr(self, name)
            if len(set(v)) != len(v):
                raise ValueError(f"study.{name} has duplicates: {v}")
        if any(b < 1 for b in self.budgets):
            raise ValueError("study.budgets must be >= 1")
        self.budgets = sorted(self.budgets)
        d = self.downstream
        if d is not None:
            if d.budget is not None and d.budget not in self.budgets:
                raise ValueError(f"study.downstream.budget {d.budget} is not in study.budgets "
                                 f"{self.budgets}")
            if d.seed is not None and d.seed not in self.seeds:
                raise ValueError(f"study.downstream.seed {d.seed} is not in study.seeds {self.seeds}")
        return self
