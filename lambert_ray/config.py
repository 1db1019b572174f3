"""One pydantic config for the whole pipeline: YAML file + `a.b.c=value` CLI overrides.

Every stage receives the same `PipelineConfig`. Validation errors name the field path
(e.g. `annotate.batch_size: Input should be a valid integer`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lambert_ray.config_quality import CalibrationConfig, ReviewConfig
from lambert_ray.config_study import StudyConfig
from lambert_ray.students import SETTINGS

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo-sst2.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TableSource(_Section):
    """A labelled or unlabelled text table: a file (Parquet/CSV/TSV/JSONL) or an HF dataset name."""

    path: str = Field(description="File or directory; relative paths resolve against data.data_dir. "
                      "'hf://NAME[:SPLIT]' reads an HF dataset (needs network).")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    text_column: str | list[str] = "text"
    label_column: str | None = None
    id_column: str | None = None
    limit: int | None = Field(default=None, ge=1, description="Read only the first N rows.")


class DataConfig(_Section):
    data_dir: str = Field(default="${LAMBERT_DATA_DIR:../shared/data}", validate_default=True,
                          description="Root for relative data paths; ${ENV:default} is expanded "
                          "(the default too).")
    corpus: TableSource
    annotate_sample: int = Field(default=1000, ge=1, description="Rows of the corpus the LLM labels.")
    gold_train: TableSource | None = None
    gold_train_sample: int | None = Field(default=500, ge=1)
    gold_test: TableSource | None = None
    gold_dev: TableSource | None = None
    gold_extra: TableSource | None = Field(
        default=None, description="More gold rows for the 'gold' and 'llm+gold' students, e.g. "
        "the run's review/review.csv after a person filled its label column (text_column: text, "
        "label_column: label, id_column: row_id). Labels may be label names or data.label_values; "
        "rows without a label are skipped.")
    classify_limit: int | None = Field(default=None, ge=1,
                                       description="Classify only the first N corpus rows (None: all).")
    llm_eval_limit: int | None = Field(
        default=None, ge=1, description="Gold-test rows the LLM labels to score itself (None: all "
        "of them, the rows the students are scored on; a seeded sample for expensive LLMs).")
    label_values: list[Any] | None = Field(
        default=None, description="Raw gold label values, in the order of labels.names "
        "(e.g. [0, 1] or [1, 2, 3, 4]); None: the values are the label names.")

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_env(v)


class LabelsConfig(_Section):
    names: list[str] = Field(min_length=2)
    verbalisers: list[str] | None = Field(
        default=None, description="Answer text per label (default: the names).")
    descriptions: list[str] | None = None

    @model_validator(mode="after")
    def _lengths(self) -> LabelsConfig:
        for name in ("verbalisers", "descriptions"):
            val = getattr(self, name)
            if val is not None and len(val) != len(self.names):
                raise ValueError(f"labels.{name} has {len(val)} entries, labels.names has {len(self.names)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError("labels.names must be unique")
        return self

    @property
    def answers(self) -> list[str]:
        return self.verbalisers or self.names


class FewShot(_Section):
    text: str
    label: str


class PromptConfig(_Section):
    """Prompt = chat template(system, user). `{text}` marks the row; keep it late so the shared
    prefix (system + instruction) can be computed once and reused."""

    system: str | None = None
    template: str = Field(description="User message; must contain {text}. May use {labels}.")
    few_shot: list[FewShot] = Field(default_factory=list)
    answer_prefix: str = Field(default="", description="Text forced at the start of the answer.")

    @field_validator("template")
    @classmethod
    def _has_text(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("prompt.template must contain the placeholder {text}")
        return v


class LLMConfig(_Section):
    model: str = Field(default="smollm2", description="'smollm2' (packaged GGUF), an HF id, or a path.")
    gguf_file: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    max_length: int = Field(default=512, ge=16, description="Prompt tokens; longer rows are truncated.")
    token_budget: int = Field(default=4096, ge=64,
                              description="Max padded tokens per forward pass (batches are length-bucketed).")
    reuse_prefix: bool = Field(default=True, description="Compute the shared prompt prefix's KV once.")
    adapter: str | None = Field(default=None, description="PEFT adapter dir to load on the base.")
    merge_adapter: bool = False
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Several PEFT adapters, {name: dir or URI}, scored in "
        "one pass on one loaded base: the annotate stage also labels its rows with each of them "
        "into annotate_adapters/ (one row per row_id and adapter; multi_adapter.py). Never merged.")
    trust_remote_code: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [name for name in v if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name)]
        if bad:
            raise ValueError(f"adapter names {bad}: use letters, digits and _ . + - "
                             "(a name labels output rows)")
        if empty := [name for name, path in v.items() if not path]:
            raise ValueError(f"adapters {empty} have no path")
        return v


class ResourcesConfig(_Section):
    """Actor pool sizing for a Ray Data stage (autoscaler grows GPU workers up to max_actors)."""

    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.5, gt=0)
    num_gpus: float = Field(default=0, ge=0)
    accelerator_type: str | None = Field(
        default=None, description="Pin actors to a GPU type, e.g. 'L4' or 'A10G' (Ray resource).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per actor, e.g. {spot_gpu: 1}: "
        "only node types that declare them fit (cluster/*.yaml give the 1-GPU spot types "
        "spot_gpu, so a burst of pending actors never brings up the 8-GPU training node).")
    batch_size: int = Field(default=64, ge=1, description="Rows handed to each actor call.")
    max_restarts: int = Field(default=2, ge=0)
    max_task_retries: int = Field(
        default=2, ge=-1, description="Retries of a batch whose actor died or is unreachable "
        "(system failures only). -1: until the actor's max_restarts run out, what a pool on spot "
        "nodes needs: Ray uses up a small count while the lost node is not yet known dead.")
    torch_threads: int | None = Field(
        default=None, ge=1, description="Intra-op threads per actor on CPU. None: the node's cores "
        "divided by max_actors (Ray would otherwise pin a fractional-CPU actor to 1 thread).")

    @model_validator(mode="after")
    def _minmax(self) -> ResourcesConfig:
        if self.max_actors < self.min_actors:
            raise ValueError("max_actors must be >= min_actors")
        return self


class ClassifyConfig(ResourcesConfig):
    """The classify stage's actor pool, plus how the student runs."""

    int8: bool = Field(default=False, description="CPU only: int8 dynamic quantisation of the "
                       "student's nn.Linear layers (torch.ao quantize_dynamic) before classifying.")
    device: Literal["cpu", "cuda"] | None = Field(
        default=None, description="Where the student runs. None: cuda when num_gpus > 0, else cpu. "
        "'cpu' with num_gpus > 0 keeps the GPU request for placement but computes on CPU (an "
        "autoscaling rehearsal on fake GPU nodes, docs/autoscale.md).")

    @property
    def compute_device(self) -> str:
        return self.device or ("cuda" if self.num_gpus else "cpu")


# The student settings (students.py), as a type: `bert.settings` / `bert.classify_with`.
StudentSettingName = Literal[tuple(SETTINGS)]  # type: ignore[valid-type]


class BertConfig(_Section):
    model: str = Field(default="minilm", description="'minilm' (packaged), an HF id, or a path.")
    epochs: int = Field(default=3, ge=1)
    lr: float = Field(default=5e-5, gt=0)
    batch_size: int = Field(default=32, ge=1)
    max_length: int = Field(default=128, ge=8)
    weight_decay: float = 0.01
    num_workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1, gt=0)
    torch_threads: int | None = Field(default=None, ge=1,
                                      description="Threads per worker; None: cores / num_workers.")
    use_gpu: bool = False
    accelerator_type: str | None = Field(default=None, description="e.g. 'A100' for the workers.")
    device: Literal["cpu", "cuda"] | None = Field(
        default=None, description="Where the workers train. None: cuda with use_gpu, else cpu. "
        "'cpu' with use_gpu keeps the GPU request for placement but trains on CPU with gloo (an "
        "autoscaling rehearsal on fake GPU nodes, docs/autoscale.md).")
    settings: list[StudentSettingName] = Field(
        default_factory=lambda: ["llm", "gold", "llm+gold"],
        description="Students to train: on the LLM's labels (the PEFT-tuned annotator's when the "
        "peft stage runs), gold, both; 'llm-0shot' always uses the 0-shot labels (with a peft "
        "stage: the baseline the tuned labels are compared with).")
    classify_with: StudentSettingName = Field(
        default="llm", description="Which student classifies the corpus (must be in settings).")
    max_failures: int = Field(default=1, ge=0)
    trust_remote_code: bool = False
    # Distillation: what the student learns from the LLM rows (lambert_ray/distill.py).
    targets: Literal["hard", "soft"] = Field(
        default="soft", description="'hard': the LLM's argmax label (LlamBERT); 'soft': the "
        "annotator's (calibrated) label distribution, tempered by bert.temperature.")
    temperature: float = Field(default=1.0, gt=0, description="Soft targets p^(1/T), "
                               "renormalised: T < 1 sharpens the teacher's distribution.")
    min_confidence: float = Field(default=0.0, ge=0, le=1, description="Drop LLM-labelled rows "
                                  "whose top probability is below this (gold rows are kept).")
    confidence_weight: bool = Field(default=False, description="Weight each LLM row's loss by "
                                    "the teacher's margin over chance, (max p - 1/K)/(1 - 1/K).")
    gold_weight: float = Field(default=1.0, gt=0, description="Loss weight of gold rows.")
    then_epochs: int = Field(default=2, ge=1, description="Epochs of a student that starts from "
                             "another one (llm-then-gold: the LLM-label student, then the gold rows).")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        default="linear", description="LR after warm-up: linear or cosine decay to 0, or constant.")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1,
                                description="Fraction of all steps spent warming the LR up.")
    keep: Literal["best_dev", "last"] = Field(
        default="best_dev", description="Which epoch's student is kept: the best on the gold dev "
        "set (data.gold_dev; the last epoch when there is none) or the last.")

    @property
    def compute_device(self) -> str:
        return self.device or ("cuda" if self.use_gpu else "cpu")

    @model_validator(mode="after")
    def _classify_with(self) -> BertConfig:
        if self.classify_with not in self.settings:
            raise ValueError(f"bert.classify_with={self.classify_with!r} is not in bert.settings")
        for i, name in enumerate(self.settings):
            base = SETTINGS[name].init_from
            if base and base not in self.settings[:i]:
                raise ValueError(f"bert.settings: {name!r} starts from the {base!r} student, so "
                                 f"{base!r} must come before it in the list")
        return self


class ErrorsConfig(_Section):
    max_error_fraction: float = Field(default=0.05, ge=0, le=1,
                                      description="Fail a stage when more rows than this error.")
    min_chars: int = Field(default=1, ge=0)


class RunConfig(_Section):
    name: str = "demo"
    output_dir: str = Field(default="runs", description="Local dir or s3:// / gs:// URI.")
    seed: int = 0
    ray_address: str | None = Field(default=None,
                                    description="None: embedded local Ray; 'auto': join a cluster.")
    num_cpus: int | None = Field(default=None, description="CPUs for an embedded local Ray.")

    @field_validator("name")
    @classmethod
    def _stays_inside_output_dir(cls, v: str) -> str:
        """The run directory is output_dir/name: a name must not climb out of output_dir."""
        parts = v.replace("\\", "/").split("/")
        if not v.strip() or v.startswith(("/", "\\")) or (len(v) > 1 and v[1] == ":") or ".." in parts:
            raise ValueError(f"run.name {v!r} must be a relative name without '..' "
                             "(the run directory is run.output_dir/run.name)")
        return v


class _MethodParams(_Section):
    """A PEFT method's hyperparameters: `peft.<method>`. The sections of PeftStageConfig of this
    type name the methods a config may ask for (peft_methods.py registers how to build each)."""


class LoraParams(_MethodParams):
    """LoRA / DoRA: low-rank updates on the named linear layers."""

    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class PrefixTuningParams(_MethodParams):
    num_virtual_tokens: int = Field(default=20, ge=1)
    prefix_projection: bool = Field(default=False, description="Reparameterise through an MLP.")
    encoder_hidden_size: int = Field(default=256, ge=1, description="MLP width (with projection).")


class PTuningParams(_MethodParams):
    num_virtual_tokens: int = Field(default=20, ge=1)
    encoder_hidden_size: int = Field(default=256, ge=1)
    encoder_num_layers: int = Field(default=2, ge=1)
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"


class PromptTuningParams(_MethodParams):
    num_virtual_tokens: int = Field(default=20, ge=1)
    init: Literal["text", "random", "sample_vocab"] = "text"
    init_text: str | None = Field(default=None,
                                  description="Init text (init=text); None: the prompt's instruction.")


class IA3Params(_MethodParams):
    target_modules: list[str] = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
                                      min_length=1)
    feedforward_modules: list[str] = Field(default_factory=lambda: ["down_proj"])

    @model_validator(mode="after")
    def _ff_subset(self) -> IA3Params:
        extra = set(self.feedforward_modules) - set(self.target_modules)
        if extra:
            raise ValueError(f"feedforward_modules {sorted(extra)} must also be in target_modules")
        return self


class PeftStageConfig(_Section):
    """PEFT on the annotator LLM: train `method` on gold rows, then re-annotate with the adapter.

    Hyperparameters live per method (`peft.lora.r`, `peft.p_tuning.encoder_hidden_size`, ...);
    only the section named by `method` is used."""

    enabled: bool = True
    method: str = Field(default="lora", description="A PEFT method: one of the sections below "
                        "(registered in lambert_ray.peft_methods.METHODS).")
    lora: LoraParams = Field(default_factory=LoraParams)
    dora: LoraParams = Field(default_factory=LoraParams)
    prefix_tuning: PrefixTuningParams = Field(default_factory=PrefixTuningParams)
    p_tuning: PTuningParams = Field(default_factory=PTuningParams)
    prompt_tuning: PromptTuningParams = Field(default_factory=PromptTuningParams)
    ia3: IA3Params = Field(default_factory=IA3Params)
    epochs: int = Field(default=2, ge=1)
    lr: float | None = Field(default=None, gt=0, description="None: the method's default lr.")
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=8, ge=1, description="Rows per micro-batch per worker.")
    grad_accum: int = Field(default=1, ge=1)
    max_train: int | None = Field(default=None, ge=1,
                                  description="Gold train rows (None: data.gold_train_sample).")
    max_dev: int | None = Field(default=None, ge=1, description="Gold dev rows scored per epoch.")
    zero_stage: Literal[0, 1, 2, 3] = 2
    num_workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1, gt=0)
    torch_threads: int | None = Field(default=None, ge=1,
                                      description="Threads per worker; None: cores / num_workers.")
    use_gpu: bool = False
    quantization: Literal["none", "4bit"] = Field(
        default="none", description="'4bit': NF4 base via bitsandbytes (QLoRA; GPU only).")
    gradient_checkpointing: bool = Field(
        default=True, description="With a 4-bit base; always off for prompt-learning methods.")
    merge_adapter: bool = Field(default=False, description="Merge into the base for annotation "
                                "(weight adapters only).")
    zero_shot: bool = Field(
        default=True, description="Also label the corpus and test samples with the 0-shot LLM "
        "(the 'llm-0shot' student and the report's 0-shot rows need it). False: the annotate "
        "stage only draws the samples and the tuned LLM is the only one to label them, which "
        "saves one LLM pass; the 0-shot score is then the peft stage's dev score.")
    max_failures: int = Field(default=1, ge=0)
    seed: int = 0

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in peft_method_names():
            raise ValueError(f"unknown PEFT method {v!r}; known: {', '.join(peft_method_names())}")
        return v

    def params(self) -> _Section:
        """The hyperparameter section of the selected method."""
        return getattr(self, self.method)


class MethodSearchSpace(_Section):
    """One PEFT method's share of the Tune search space: a grid over `params` (hyperparameters of
    its `peft.<method>` section, e.g. {"r": [4, 8]}) times the learning rates."""

    lr: list[float] | None = Field(default=None, min_length=1,
                                   description="Grid of learning rates; None: the method's default lr "
                                   "(or lr_loguniform draws).")
    lr_loguniform: tuple[float, float] | None = Field(
        default=None, description="[low, high]: draw tune.num_samples lrs log-uniformly (seeded by "
        "tune.search_seed); the same draws are used for every seed, so seeds stay replicates.")
    params: dict[str, list[Any]] = Field(default_factory=dict,
                                         description="peft.<method> field -> grid of values.")

    @model_validator(mode="after")
    def _one_lr_source(self) -> MethodSearchSpace:
        if self.lr is not None and self.lr_loguniform is not None:
            raise ValueError("give lr or lr_loguniform, not both")
        if self.lr_loguniform is not None and not 0 < self.lr_loguniform[0] <= self.lr_loguniform[1]:
            raise ValueError("lr_loguniform must be [low, high] with 0 < low <= high")
        return self


def peft_method_names() -> list[str]:
    """The PEFT methods a config can name: one `peft.<method>` hyperparameter section each."""
    return [name for name, f in PeftStageConfig.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, _MethodParams)]


def _all_methods() -> dict[str, MethodSearchSpace]:
    return {name: MethodSearchSpace() for name in peft_method_names()}


class TuneStageConfig(_Section):
    """Ray Tune over PEFT methods: every method gets the same gold data and epochs; each trial is
    one Ray Train PEFT run (method x hyperparameters x seed), ASHA stops weak trials early, and
    `selection` picks the adapter that annotates."""

    enabled: bool = Field(default=False, description="The pipeline's peft stage tunes instead of "
                          "training peft.method alone.")
    methods: dict[str, MethodSearchSpace] = Field(default_factory=_all_methods)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    num_samples: int = Field(default=1, ge=1, description="lr draws per method with lr_loguniform.")
    search_seed: int = 0
    epochs: int | None = Field(default=None, ge=1, description="None: peft.epochs (ASHA's max_t).")
    metric: Literal["dev_accuracy", "dev_macro_f1"] = "dev_accuracy"
    mode: Literal["max"] = "max"
    grace_period: int = Field(default=1, ge=1, description="ASHA: epochs before a trial may stop.")
    reduction_factor: float = Field(default=2, gt=1)
    tie_break_loss: bool = Field(
        default=True, description="ASHA ranks by metric - 1e-6 * train_loss: on a small dev set "
        "accuracy ties are common and would keep every tied trial alive.")
    trial_cpus: float = Field(default=0.1, gt=0, description="The trial driver's own CPU request; "
                              "its Train workers request peft.cpus_per_worker each (whole-CPU "
                              "driver requests deadlock small nodes).")
    num_workers: int | None = Field(default=None, ge=1, description="Train workers per trial "
                                    "(None: peft.num_workers).")
    cpus_per_worker: float | None = Field(default=None, gt=0)
    use_gpu: bool | None = None
    max_concurrent_trials: int = Field(default=1, ge=1)
    max_failures: int = Field(default=0, ge=0, description="Retries of a failed trial; a trial "
                              "that still fails is reported, never fatal to the experiment.")
    storage_path: str | None = Field(default=None, description="Experiment dir parent (local dir "
                                     "or s3:// / gs:// URI); None: <run_dir>/tune.")
    name: str = "peft_tune"
    selection: Literal["mean_then_fewer_params"] = Field(
        default="mean_then_fewer_params", description="Highest mean metric over seeds (final epoch) "
        "of a method+hyperparameter config; ties within tie_tolerance -> fewer trainable params.")
    tie_tolerance: float = Field(default=0.0, ge=0)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: dict[str, MethodSearchSpace]) -> dict[str, MethodSearchSpace]:
        known = peft_method_names()
        unknown = set(v) - set(known)
        if unknown or not v:
            raise ValueError(f"tune.methods must name PEFT methods from {', '.join(known)}; "
                             f"unknown: {sorted(unknown)}")
        return v


def default_prompt(labels: LabelsConfig | None) -> PromptConfig:
    """The prompt for a label set when the config gives none: the whole instruction (with the
    label list) before {text}, so it is the shared prefix every row reuses."""
    return PromptConfig(
        system="Answer with exactly one of: {labels}.",
        template="Classify the following text as one of: {labels}.\nText: {text}")


class PipelineConfig(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig
    labels: LabelsConfig
    prompt: PromptConfig = Field(
        default_factory=lambda data: default_prompt(data.get("labels")),
        description="Leave out for the default prompt of the label set (`default_prompt`).")
    llm: LLMConfig = Field(default_factory=LLMConfig)
    annotate: ResourcesConfig = Field(default_factory=ResourcesConfig)
    bert: BertConfig = Field(default_factory=BertConfig)
    classify: ClassifyConfig = Field(default_factory=lambda: ClassifyConfig(batch_size=256))
    errors: ErrorsConfig = Field(default_factory=ErrorsConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    # Later stages (peft, tune) add their own sections; unknown top-level keys are rejected.
    peft: PeftStageConfig | None = None
    tune: TuneStageConfig | None = None
    study: StudyConfig | None = None  # the PEFT study (study.py), run by `lambert-ray study`

    @property
    def run_dir(self) -> str:
        return join_uri(self.run.output_dir, self.run.name)

    @model_validator(mode="after")
    def _label_values(self) -> PipelineConfig:
        lv = self.data.label_values
        if lv is not None and len(lv) != len(self.labels.names):
            raise ValueError(f"data.label_values has {len(lv)} entries, labels.names has "
                             f"{len(self.labels.names)}")
        pt = self.calibration.prior_target
        if pt is not None and len(pt) != len(self.labels.names):
            raise ValueError(f"calibration.prior_target has {len(pt)} entries, labels.names has "
                             f"{len(self.labels.names)}")
        if self.study is not None:
            unknown = sorted(set(self.study.methods) - set(peft_method_names()))
            if unknown:
                raise ValueError(f"study.methods: unknown PEFT methods {unknown}; known: "
                                 f"{', '.join(peft_method_names())}")
        if (self.peft is not None and self.peft.enabled and not self.peft.zero_shot
                and "llm-0shot" in self.bert.settings):
            raise ValueError("bert.settings has 'llm-0shot', which learns from the 0-shot labels, "
                             "but peft.zero_shot is false (the 0-shot LLM labels nothing)")
        return self


class ConfigError(ValueError):
    """A config that does not validate; the message names each bad field."""


def expand_env(value: str) -> str:
    """Expand `${VAR}` and `${VAR:default}`."""
    out, i = [], 0
    while (start := value.find("${", i)) != -1:
        end = value.find("}", start)
        if end == -1:
            break
        name, _, default = value[start + 2:end].partition(":")
        out.append(value[i:start] + os.environ.get(name, default))
        i = end + 1
    out.append(value[i:])
    return "".join(out)


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML scalars/lists)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. annotate.batch_size=32")
        node = raw
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = _parse_scalar(value)
    return raw


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<config>"
        lines.append(f"{loc}: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load YAML (default: the demo config), apply overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_message(path, e)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    return validate_config(raw)


def yaml_error_message(path: Path, err: yaml.YAMLError) -> str:
    """`<file>:<line>:<column>: <problem>` for a YAML syntax error (lines counted from 1)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(err, "problem", None) or str(err)
    context, cmark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and cmark is not None and cmark is not mark:
        problem += f" ({context} opened at line {cmark.line + 1})"
    return f"{where}: invalid YAML: {problem}"


def validate_config(raw: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
