"""Label-count-independent batches: each row once, then a token tree of the label continuations.

A verbaliser `v` is scored as log p(v[0] | prompt) + sum_k log p(v[k] | prompt, v[:k]). The first
term is read at the row's answer position. The others need the continuation tokens v[:k] as
inputs; rather than copying the row once per label, every row carries one *label tree* after its
own tokens: a trie of the verbalisers' proper prefixes (one node per distinct v[:k], k >= 1,
holding the token v[k-1]), shared by all labels. A tree node attends to the whole row (and the
prefix KV cache) plus its own ancestors, and sits at position len(row) + depth, so its hidden
state is exactly that of v[:k] appended to the row. A row's cost is len(row) + K tokens for K
tree nodes (K = 0 for single-token verbalisers; 2 for one 3-token label), not len(row) x L.

    batch = make_batch(rows, verbalisers, pad_id, prefix=None)   # no model needed
    mask = batch.attention_bias(past=cache_len, dtype=model.dtype)  # [B, 1, S, past+S] or None

No torch model, no Ray here: only the layout. `scoring.label_logprobs` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LabelTree:
    """The trie of verbaliser prefixes. Node i holds `token[i]` at depth `depth[i]` (0 = right
    after the row) under `parent[i]` (-1 = the row). Label l's score is the sum over
    j < len(v_l) of log p(`label_tok[l][j]`) at slot `label_slot[l][j]`, where slot 0 is the
    answer position and slot 1 + i is node i."""

    token: tuple[int, ...]
    parent: tuple[int, ...]
    depth: tuple[int, ...]
    label_slot: tuple[tuple[int, ...], ...]
    label_tok: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, verbalisers: list[list[int]]) -> LabelTree:
        index: dict[tuple[int, ...], int] = {}
        token, parent, depth, slots = [], [], [], []
        for v in verbalisers:
            if not v:
                raise ValueError("a verbaliser has no tokens")
            slot = [0]
            for k in range(1, len(v)):
                key = tuple(v[:k])
                if key not in index:
                    index[key] = len(token)
                    token.append(v[k - 1])
                    parent.append(index[key[:-1]] if k > 1 else -1)
                    depth.append(k - 1)
                slot.append(1 + index[key])
            slots.append(tuple(slot))
        return cls(tuple(token), tuple(parent), tuple(depth), tuple(slots),
                   tuple(tuple(v) for v in verbalisers))

    @property
    def n_nodes(self) -> int:
        return len(self.token)

    def ancestors(self) -> torch.Tensor:
        """[K, K] bool: node i may attend to node j (j is i or one of its ancestors)."""
        K = self.n_nodes
        anc = torch.eye(K, dtype=torch.bool)
        for i in range(K):
            j = self.parent[i]
            while j >= 0:
                anc[i, j] = True
                j = self.parent[j]
        return anc


@dataclass
class Batch:
    """Right-padded rows, each = (optional prefix) + row tokens + the label tree's K tokens.

    Positions are relative to the first token of the batch (add the KV cache length, if any).
    `score_pos[b]` holds the answer position then each tree node's position in row b; the
    label scores gather slots `tree.label_slot` / tokens `tree.label_tok` from there.
    `allowed` ([B, S, S] bool, None when K = 0) is the in-batch attention pattern."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S] 1 = row or tree token, 0 = padding
    position_ids: torch.Tensor  # [B, S]
    score_pos: torch.Tensor  # [B, 1 + K]
    label_slot: torch.Tensor  # [L, J] index into score_pos' second dim
    label_tok: torch.Tensor  # [L, J] token scored at that slot
    label_mask: torch.Tensor  # [L, J] real (j < len(verbaliser))
    allowed: torch.Tensor | None  # [B, S, S] query may attend key (in-batch part)
    n_rows: int
    n_labels: int

    def attention_bias(self, past: int, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> torch.Tensor | None:
        """[B, 1, S, past + S] additive mask (0 = attend, dtype min = not) for a tree batch whose
        rows follow `past` shared cached tokens (prefix / virtual tokens); None when K = 0 (the
        model's own causal + padding mask is then exact)."""
        if self.allowed is None:
            return None
        B, S = self.input_ids.shape
        allowed = self.allowed.to(device)
        ok = torch.cat([allowed.new_ones(B, S, past), allowed], dim=2)
        bias = torch.zeros(ok.shape, dtype=dtype, device=device)
        bias.masked_fill_(~ok, torch.finfo(dtype).min)
        return bias.unsqueeze(1)


def tree_tokens(verbalisers: list[list[int]]) -> int:
    """K: the extra tokens a row carries for the label tree (0 when all are single-token)."""
    return LabelTree.build(verbalisers).n_nodes


def make_batch(rows: list[list[int]], verbalisers: list[list[int]], pad_id: int,
               prefix: list[int] | None = None) -> Batch:
    """Build a Batch. `prefix` is prepended here (training / no cache) or left out (KV-cached)."""
    tree = LabelTree.build(verbalisers)
    prefix = prefix or []
    K = tree.n_nodes
    seqs = [prefix + ids for ids in rows]
    S = max(len(s) for s in seqs) + K
    B = len(seqs)
    ids_t = torch.full((B, S), pad_id, dtype=torch.long)
    mask_t = torch.zeros((B, S), dtype=torch.long)
    pos_t = torch.arange(S).repeat(B, 1)
    score_pos = torch.zeros((B, 1 + K), dtype=torch.long)
    allowed = torch.eye(S, dtype=torch.bool).repeat(B, 1, 1) if K else None
    node_tok = torch.tensor(tree.token, dtype=torch.long)
    node_depth = torch.tensor(tree.depth, dtype=torch.long)
    anc = tree.ancestors() if K else None
    for b, s in enumerate(seqs):
        n = len(s)
        ids_t[b, :n] = torch.tensor(s)
        mask_t[b, : n + K] = 1
        score_pos[b, 0] = n - 1
        if K:
            ids_t[b, n: n + K] = node_tok
            pos_t[b, n: n + K] = n + node_depth
            score_pos[b, 1:] = torch.arange(n, n + K)
            allowed[b, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            allowed[b, n: n + K, :n] = True
            allowed[b, n: n + K, n: n + K] = anc
    J = max(len(v) for v in verbalisers)
    L = len(verbalisers)
    slot = torch.zeros((L, J), dtype=torch.long)
    tok = torch.zeros((L, J), dtype=torch.long)
    lmask = torch.zeros((L, J), dtype=torch.bool)
    for i, (sl, tk) in enumerate(zip(tree.label_slot, tree.label_tok, strict=True)):
        slot[i, : len(sl)] = torch.tensor(sl)
        tok[i, : len(tk)] = torch.tensor(tk)
        lmask[i, : len(tk)] = True
    return Batch(ids_t, mask_t, pos_t, score_pos, slot, tok, lmask, allowed, B, L)
