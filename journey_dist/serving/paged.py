"""The model's forward over a paged KV cache: many requests, prefill chunks and decode tokens
in one flat batch, attention reading each request's keys and values through its block table.

    batch = build_batch([(req_id, tokens, start), ...], blocks)   # start: tokens already cached
    logits = paged_forward(model, cache, batch)                  # (S, V): each request's last token

The step's tokens are concatenated into one stream of N tokens (request after request), so every
linear layer runs once on (N, C) whatever mix of prefill and decode the step holds; only attention
looks at requests separately. For layer l, each token's key and value are written to its pool
slot, then each request's K/V are gathered block by block through its table and its queries
attend causally: query at position p sees keys 0..p of its own request and nothing else.

The weights are the plain GPT's (`journey_dist.model.GPT`, either family): embeddings, norms, the
q/k/v projections (c_attn or q/k/v_proj, RoPE at each token's position), c_proj/o_proj and the MLP
are called as modules, so the numbers match `GPT.generate` with its
contiguous `KVCache` to fp32 rounding (tests/test_serving.py checks the greedy tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from journey_dist.config import ConfigError
from journey_dist.model import GPT, CausalSelfAttention, add_positions
from journey_dist.positions import apply_rope, rope_tables_at
from journey_dist.serving.blocks import BlockManager, PagedKVCache


@dataclass
class AttentionGroup:
    """Requests whose queries attend together: rows [start, end) of the N tokens, Q = longest chunk."""

    start: int
    end: int
    block_tables: torch.Tensor  # (S, max_blocks) block ids, padded with block 0 (masked)
    query_pos: torch.Tensor  # (S, Q) position of each request's queries (padding: 0)
    query_valid: torch.Tensor  # (S, Q) bool: a real query, not padding


@dataclass
class PagedBatch:
    """One step's inputs: N scheduled tokens of S requests, decode requests first."""

    tokens: torch.Tensor  # (N,) token ids, request after request
    positions: torch.Tensor  # (N,) position of each token in its request
    slots: torch.Tensor  # (N,) pool slot its K/V are written to
    last: torch.Tensor  # (S,) index into the N tokens of each request's last token
    groups: list[AttentionGroup]  # decode requests (one query each), then prefill chunks


def build_batch(plan: Sequence[tuple[int, Sequence[int], int]], blocks: BlockManager,
                device: torch.device | str = "cpu") -> PagedBatch:
    """plan: (request id, the tokens to run, position of the first of them) per request.

    The request's blocks must already hold start + len(tokens) tokens (BlockManager.ensure). Keep
    the plan's order in mind: rows of the result (`last`, logits) follow it, and the tokens are laid
    out in that order too; decode requests (one token) should come first so the attention groups
    are contiguous (ServingEngine orders them so). Prefill chunks attend in a second group, so a
    long chunk does not pad every decode query to its length.
    """
    bs = blocks.block_size
    tokens, positions, slots, lengths = [], [], [], []
    for req_id, chunk, start in plan:
        table = blocks.tables[req_id]
        pos = range(start, start + len(chunk))
        tokens.extend(chunk)
        positions.extend(pos)
        slots.extend(table[p // bs] * bs + p % bs for p in pos)
        lengths.append(len(chunk))
    n_decode = next((i for i, n in enumerate(lengths) if n > 1), len(lengths))
    if any(n == 1 for n in lengths[n_decode:]):
        raise ValueError("build_batch: put the one-token (decode) requests before the prefill chunks")
    groups, row = [], 0
    for members in (plan[:n_decode], plan[n_decode:]):
        if not members:
            continue
        tables = [blocks.tables[req_id] for req_id, _, _ in members]
        Q, width = max(len(c) for _, c, _ in members), max(len(t) for t in tables)
        query_pos = torch.zeros(len(members), Q, dtype=torch.long)
        query_valid = torch.zeros(len(members), Q, dtype=torch.bool)
        for s, (_, chunk, start) in enumerate(members):
            query_pos[s, :len(chunk)] = torch.arange(start, start + len(chunk))
            query_valid[s, :len(chunk)] = True
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        n = sum(len(c) for _, c, _ in members)
        groups.append(AttentionGroup(row, row + n, block_tables.to(device), query_pos.to(device),
                                     query_valid.to(device)))
        row += n
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    last = torch.tensor(lengths).cumsum(0) - 1
    return PagedBatch(as_tensor(tokens), as_tensor(positions), as_tensor(slots), last.to(device), groups)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """Causal attention of one group's queries over each request's gathered keys and values.

    q: (n, H, D) the group's flat queries; k, v: (S, K, kv_heads, D) from PagedKVCache.gather,
    K = max_blocks x block_size. Returns (n, H, D). Key j is visible to a query at position p iff
    j <= p, which also hides the unfilled end of the last block and padded table entries.
    Grouped-query attention: each of the kv_heads serves H / kv_heads query heads.
    """
    S, Q = group.query_pos.shape
    H, D = q.shape[1:]
    qs = q.new_zeros(S, Q, H, D)
    qs[group.query_valid] = q  # (S, Q, H, D): each request's chunk, padded
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (S, kv_heads, K, D)
    if k.size(1) != H:
        k, v = k.repeat_interleave(H // k.size(1), dim=1), v.repeat_interleave(H // v.size(1), dim=1)
    keys = torch.arange(k.size(2), device=q.device)
    mask = keys[None, None, :] <= group.query_pos[:, :, None]  # (S, Q, K)
    y = F.scaled_dot_product_attention(qs.transpose(1, 2), k, v, attn_mask=mask[:, None])  # (S, H, Q, D)
    return y.transpose(1, 2)[group.query_valid]  # (n, H, D), the flat order again


def check_model(model: nn.Module) -> None:
    """ConfigError unless paged_forward can run this model: either family's blocks with learned,
    sinusoidal or rotary positions (ALiBi's distance bias is not applied to paged attention).
    Called when an engine is built, before any request."""
    tr, config = getattr(model, "transformer", None), getattr(model, "config", None)
    attn = tr.h[0].attn if tr is not None and len(tr.h) else None
    if not isinstance(attn, CausalSelfAttention):
        raise ConfigError(f"paged serving runs the plain GPT's blocks; "
                          f"{type(attn).__name__ if attn is not None else type(model).__name__} is not one: "
                          "serve the model before wrapping it (tensor parallel serving: serving/tp.py)")
    if config.positions == "alibi":
        raise ConfigError("positions='alibi': paged attention here adds no distance bias; serve a model "
                          "with learned, sinusoidal or rope positions (or add the bias to paged_attention)")


def project_qkv(attn: CausalSelfAttention, x: torch.Tensor, positions: torch.Tensor,
                rope_theta: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, C) -> q (N, H, D), k and v (N, kv_heads, D) through the block's own projections (GPT-2's
    fused c_attn or Llama's q/k/v_proj); with rope_theta, q and k turned by each token's position."""
    q, k, v = attn.qkv(x[None])  # (1, H, N, D), (1, K, N, D): N tokens of many requests, one stream
    if rope_theta is not None:
        cos, sin = rope_tables_at(positions, attn.head_dim, rope_theta, q.dtype)  # (N, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)


@torch.no_grad()
def paged_forward(model: GPT, cache: PagedKVCache, batch: PagedBatch) -> torch.Tensor:
    """Run one step; fills the cache at batch.slots; returns (S, V) logits of each request's last token."""
    tr, config = model.transformer, model.config
    x = add_positions(tr.wte(batch.tokens), batch.positions, config, tr)  # (N, C)
    theta = config.rope_theta if config.positions == "rope" else None
    for layer, block in enumerate(tr.h):
        a = block.ln_1(x)
        q, k, v = project_qkv(block.attn, a, batch.positions, theta)
        cache.write(layer, batch.slots, k, v)
        y = torch.cat([paged_attention(q[g.start:g.end], *cache.gather(layer, g.block_tables), g)
                       for g in batch.groups])  # (N, H, D)
        x = x + block.attn.out_proj(y.flatten(1))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(tr.ln_f(x[batch.last]))  # (S, V)
