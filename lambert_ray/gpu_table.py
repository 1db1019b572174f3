"""GPU throughput and price assumptions for `lambert-ray plan` on a cluster config.

The numbers are the ones `docs/cluster.md` states and derives its sizing table from; change them
there and here together: dense bf16 tensor peak per GPU (datasheets), the fraction of it a stage
reaches (MFU: measured on one H200 for the annotator and the student's inference,
`results/gpu/2026-11-30/`; assumed for training), AWS us-east-1 list prices of the node types in
`cluster/aws-gpu.yaml`, and how long a node takes to boot and load its model (assumed).

    seconds of GPU = FLOPs / (peak_tflops * 1e12 * MFU)
    FLOPs per causal-LM item   = 2 * params * tokens       (forward; prefill only, no generation)
    FLOPs per training row     = 6 * params * tokens       (forward + backward)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeType:
    """One GPU node type: its GPU, how many per node, and what a node-hour costs."""

    gpu: str
    peak_tflops: float  # dense bf16 tensor peak per GPU
    gpus_per_node: int
    usd_per_node_hour: float  # the price the stage pays (spot where docs/cluster.md uses spot)
    pricing: str  # "spot" or "on-demand"
    instance: str
    boot_minutes: float  # node boot + image pull + model load (docs/cluster.md: 5-8, p4d 10-15)


NODE_TYPES: dict[str, NodeType] = {
    "L4": NodeType("L4", 121.0, 1, 0.40, "spot", "g6.2xlarge", 6.5),
    "A10G": NodeType("A10G", 70.0, 1, 0.45, "spot", "g5.2xlarge", 6.5),
    "A100": NodeType("A100", 312.0, 8, 32.77, "on-demand", "p4d.24xlarge", 12.5),
}

# MFU per kind of work (docs/cluster.md), counted on the tokens actually computed:
# - llm_annotate: Llama-2-7B shape in NF4, batched prefill through `Annotator` on one H200
#   (2026-11-30): 0.31 (SST-2 lengths, prefix reused) to 0.40 (no reuse); IMDb lengths 0.35-0.39.
#   The smaller of those is kept. Assumes a smaller GPU reaches at least the H200's fraction.
# - bert_classify: RoBERTa-large shape, bf16, `bert.predict_proba` on the same H200: 0.13 at
#   SST-2 lengths (23 tokens/row, batch 256), 0.17 at IMDb lengths (321 tokens/row, batch 64).
# - llm_train, bert_train: assumed, not measured (the GPU check trains SmolLM2-size adapters).
MFU = {"llm_annotate": 0.30, "llm_train": 0.30, "bert_train": 0.40, "bert_classify": 0.15}

# Where each stage lands when its config section names no accelerator_type (docs/cluster.md:
# annotate / classify actors on 1-GPU spot nodes, Train workers on the 8-GPU node).
DEFAULT_GPU = {"annotate": "L4", "peft": "A100", "train-bert": "A100", "classify": "L4"}

HEAD_USD_PER_HOUR = 0.38  # m6i.2xlarge head node, on for the whole run

# Tokens per item when no tokenizer is available to count them (docs/cluster.md's assumption).
DEFAULT_TOKENS_PER_ITEM = 100

# Parameter counts of models whose config may not be on this machine (offline).
KNOWN_PARAMS = {
    "llama-2-7b": 6.74e9, "llama-2-13b": 13.0e9, "llama-2-70b": 69.0e9, "mistral-7b": 7.24e9,
    "llama-3-8b": 8.03e9, "llama-3.1-8b": 8.03e9, "smollm2": 0.135e9,
    "roberta-large": 355e6, "roberta-base": 125e6, "bert-base": 110e6, "bert-large": 335e6,
    "deberta-v3-base": 184e6, "deberta-v3-large": 435e6, "minilm": 22.7e6,
}


def node_type(name: str | None, stage: str) -> NodeType:
    """The node type for a stage: its accelerator_type if the table knows it, else the default."""
    key = (name or DEFAULT_GPU[stage]).upper()
    for k, v in NODE_TYPES.items():
        if k.upper() == key:
            return v
    raise KeyError(f"no throughput entry for accelerator_type {name!r}; known: "
                   f"{', '.join(NODE_TYPES)} (lambert_ray/gpu_table.py)")
