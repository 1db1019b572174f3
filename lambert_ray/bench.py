"""Throughput measurement pieces shared by `benchmarks/` and the GPU kit (`scripts/gpu/`).

Ray-free: the hardware peak, the model FLOP count, the LlamBERT-style sampled-generation loop
(the baseline lambert_ray replaces) and the timed runs of an `Annotator` / a BERT student.

FLOP count (forward only, useful work: real tokens, padding not counted), per causal-LM token
that sees `c` key/value positions (itself included):

    2 * N  +  4 * L * d_attn * c          N: non-embedding parameters, L: layers,
                                          d_attn: heads * head_dim (QK^T and AV, 2 FLOPs/MAC)

plus `2 * d * V` for every position where the output head is applied (d: hidden, V: vocab).
With prefix reuse the prefix is counted once, and each row's tokens attend over P + j positions.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lambert_ray.scoring import causal_lm


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32,
                       device: str = "cpu") -> float:
    """Best-of-`repeats` GFLOP/s of an n x n x n matmul: the machine's practical dense peak."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.matmul(a, b)  # warm-up: thread pool / kernel selection
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


@dataclass(frozen=True)
class LMShape:
    """What the FLOP count needs to know about a decoder."""

    non_embedding_params: int
    layers: int
    d_attn: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, model) -> LMShape:
        cfg = model.config
        emb = model.get_input_embeddings().weight
        total = sum(logical_numel(p) for p in model.parameters())
        # Tied heads share the embedding matrix, so it is subtracted once; an untied head is
        # counted apart (applied only at the answer positions), so it is subtracted as well.
        head = model.get_output_embeddings()
        untied = head is not None and head.weight.data_ptr() != emb.data_ptr()
        n = total - emb.numel() - (logical_numel(head.weight) if untied else 0)
        if n <= 0:
            n = _llama_non_embedding(cfg)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(int(n), cfg.num_hidden_layers, heads * head_dim, cfg.hidden_size, cfg.vocab_size)


def logical_numel(p: torch.Tensor) -> int:
    """Weights a parameter stands for. A bitsandbytes 4-bit `Params4bit` stores two weights per
    uint8 element (numel is half the matrix); its `quant_state.shape` is the matrix's shape."""
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(np.prod(tuple(shape))) if shape is not None else p.numel()


def _llama_non_embedding(cfg) -> int:
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q = d * cfg.num_attention_heads * head_dim
    kv = 2 * d * cfg.num_key_value_heads * head_dim
    return L * (2 * q + kv + 3 * d * f + 2 * d) + d  # q,o + k,v + MLP + 2 norms; final norm


def _causal_tokens_flops(shape: LMShape, n_tokens: int, context_before: int) -> float:
    """FLOPs for `n_tokens` consecutive tokens after `context_before` cached positions."""
    # sum_{j=1..n} (context_before + j) positions attended
    attended = n_tokens * context_before + n_tokens * (n_tokens + 1) / 2
    return 2.0 * shape.non_embedding_params * n_tokens + 4.0 * shape.layers * shape.d_attn * attended


def annotator_flops(shape: LMShape, n_prefix: int, row_lengths: list[int], reuse_prefix: bool,
                    head_positions_per_row: int = 1) -> float:
    """Useful forward FLOPs of one `Annotator.score` call (see the module docstring)."""
    head = 2.0 * shape.hidden * shape.vocab * head_positions_per_row * len(row_lengths)
    if reuse_prefix:
        rows = sum(_causal_tokens_flops(shape, r, n_prefix) for r in row_lengths)
        return _causal_tokens_flops(shape, n_prefix, 0) + rows + head
    return sum(_causal_tokens_flops(shape, n_prefix + r, 0) for r in row_lengths) + head


def generate_flops(shape: LMShape, prompt_len: int, new_tokens: int) -> float:
    """Prefill + `new_tokens` decode steps with a KV cache; the head on every decode step's
    input position (the prefill's last position and each generated token but the final one)."""
    steps = max(new_tokens, 1)
    return (_causal_tokens_flops(shape, prompt_len, 0)
            + _causal_tokens_flops(shape, steps - 1, prompt_len)
            + 2.0 * shape.hidden * shape.vocab * steps)


_WORD = re.compile(r"[a-z]+")


def parse_answer(text: str, answers: list[str]) -> int | None:
    """Index of the one answer word the generated `text` contains, else None (dropped).
    LlamBERT keeps only answers it can map to exactly one label; 'positive or negative',
    an empty or an off-topic answer are dropped."""
    words = set(_WORD.findall(text.lower()))
    hits = [i for i, a in enumerate(answers) if a.lower() in words]
    return hits[0] if len(hits) == 1 else None


@dataclass
class RunResult:
    """One timed labelling run: predictions (None = dropped) and the work it did."""

    preds: list[int | None]
    seconds: float
    prompt_tokens: int  # prompt tokens covered (prefix counted for every row)
    computed_tokens: int  # tokens actually run through the decoder
    flops: float
    extra: dict = field(default_factory=dict)

    def summary(self, gold: list[int]) -> dict:
        n = len(self.preds)
        kept = [(p, g) for p, g in zip(self.preds, gold, strict=True) if p is not None]
        correct = sum(p == g for p, g in kept)
        return {
            "n": n,
            "seconds": round(self.seconds, 3),
            "items_per_s": n / self.seconds,
            "prompt_tokens_per_s": self.prompt_tokens / self.seconds,
            "computed_tokens_per_s": self.computed_tokens / self.seconds,
            "gflop_per_s": self.flops / self.seconds / 1e9,
            "accuracy": correct / n if n else float("nan"),  # dropped rows count as wrong
            "accuracy_parsed": correct / len(kept) if kept else float("nan"),
            "drop_rate": 1 - len(kept) / n if n else float("nan"),
            **self.extra,
        }


def llambert_generate_loop(model, tokenizer, prompt_ids: list[list[int]], answers: list[str], *,
                           max_new_tokens: int = 10, temperature: float = 0.6, top_p: float = 0.9,
                           seed: int = 0) -> RunResult:
    """The LlamBERT labelling loop: one prompt at a time, sampled `generate`, parse the text.
    (Llama-2-chat's generation defaults: temperature 0.6, top_p 0.9.)"""
    shape = LMShape.of(model)
    device = model.get_input_embeddings().weight.device
    torch.manual_seed(seed)
    preds: list[int | None] = []
    new_total = flops = 0
    texts = []
    t0 = time.perf_counter()
    for ids in prompt_ids:
        x = torch.tensor([ids], device=device)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                             temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[0, len(ids):].tolist()
        text = tokenizer.decode(new, skip_special_tokens=True)
        texts.append(text)
        preds.append(parse_answer(text, answers))
        new_total += len(new)
        flops += generate_flops(shape, len(ids), len(new))
    seconds = time.perf_counter() - t0
    prompt = sum(len(i) for i in prompt_ids)
    return RunResult(preds, seconds, prompt, prompt + new_total, flops,
                     {"new_tokens": new_total, "sample_answers": texts[:5]})


def timed_annotate(ann, texts: list[str], chunk: int) -> tuple[RunResult, np.ndarray]:
    """`ann.score` over `texts` in calls of `chunk` rows (as an actor receives them); returns
    the run and the [n, n_labels] probabilities."""
    shape = LMShape.of(causal_lm(ann.model))
    n_prefix = len(ann.builder.prefix_ids)
    probs, lengths, seconds = [], [], 0.0
    for i in range(0, len(texts), chunk):
        t0 = time.perf_counter()
        out = ann.score(texts[i:i + chunk])
        seconds += time.perf_counter() - t0
        probs.extend(out["probs"])
        lengths.extend(n - n_prefix for n in out["n_tokens"])
    p = np.asarray(probs)
    flops = annotator_flops(shape, n_prefix, lengths, ann.reuse_prefix, ann.expansion)
    computed = sum(lengths) + (n_prefix if ann.reuse_prefix else n_prefix * len(lengths))
    run = RunResult(p.argmax(-1).tolist(), seconds, sum(lengths) + n_prefix * len(lengths),
                    computed, flops)
    return run, p


def timed_classify(model, tok, texts: list[str], max_length: int, batch_size: int = 64,
                   repeats: int = 1) -> tuple[float, np.ndarray]:
    """(items/s best of `repeats`, probabilities) of `bert.predict_proba` over `texts`."""
    from lambert_ray.bert import predict_proba

    best, probs = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        probs = predict_proba(model, tok, texts, max_length, batch_size)
        best = min(best, time.perf_counter() - t0)
    return len(texts) / best, probs


def interleaved_annotate(anns: dict, texts: list[str], chunk: int,
                         before_chunk: Callable[[int, int], None] | None = None,
                         ) -> dict[str, tuple[RunResult, np.ndarray]]:
    """`timed_annotate` for several annotators, alternating chunk by chunk, so a load change
    on a shared machine hits every variant alike. `before_chunk(k, n_chunks)` runs before
    chunk k (e.g. a slice of a slower baseline, to interleave it too).
    Returns name -> (run, probabilities)."""
    parts: dict[str, list] = {name: [] for name in anns}
    starts = range(0, len(texts), chunk)
    for k, i in enumerate(starts):
        if before_chunk is not None:
            before_chunk(k, len(starts))
        for name, ann in anns.items():
            parts[name].append(timed_annotate(ann, texts[i:i + chunk], chunk))
    out = {}
    for name, runs in parts.items():
        r = [x[0] for x in runs]
        ann = anns[name]
        prefix = len(ann.builder.prefix_ids) if ann.reuse_prefix else 0
        # the shared prefix runs once per annotator (its KV is kept), not once per chunk
        prefix_flops = _causal_tokens_flops(LMShape.of(causal_lm(ann.model)), prefix, 0)
        merged = RunResult([p for x in r for p in x.preds], sum(x.seconds for x in r),
                           sum(x.prompt_tokens for x in r),
                           sum(x.computed_tokens for x in r) - prefix * (len(r) - 1),
                           sum(x.flops for x in r) - prefix_flops * (len(r) - 1))
        out[name] = (merged, np.concatenate([x[1] for x in runs]))
    return out
