"""KV-cache generation on a tensor-parallel GPT: `TensorParallelGPT.generate` (= GPT.generate).

Each rank runs its H/t heads and caches only their keys and values, so a rank's cache is 1/t of
the single-process one (memory.estimate.kv_cache_bytes(cfg, B, tokens, kv_heads=H/t)). The logits
of the last position are vocab-split, (B, V/t) per rank: one all-gather per step makes the full
(B, V) row, identical bytes on every rank, so greedy argmax agrees everywhere without more
communication. Sampling draws from a generator that may differ per rank (or have advanced
differently), so tp rank 0's token is broadcast: every rank appends the same token and the
ranks' caches stay consistent.

Sequence parallel is switched off while generating (decode steps feed T = 1 token, which cannot be
split over t ranks); the weights are the same, SP only changes which collectives run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from journey_dist.model import next_token
from journey_dist.parallel.tp_mappings import gather_from_region

__all__ = ["full_last_logits", "sequence_parallel_off", "tp_generate"]


@contextlib.contextmanager
def sequence_parallel_off(model: nn.Module) -> Iterator[None]:
    """Run the block with every module's `sequence_parallel` flag False (restored on exit)."""
    flagged = [m for m in model.modules() if getattr(m, "sequence_parallel", False)]
    for m in flagged:
        m.sequence_parallel = False
    try:
        yield
    finally:
        for m in flagged:
            m.sequence_parallel = True


def full_last_logits(local_logits: torch.Tensor, group, vocab_size: int) -> torch.Tensor:
    """(B, T, V/t) vocab-split logits -> the last position's full (B, V) row, fp32.

    Forward: one all-gather of (B, V/t) along the vocabulary; padded columns (>= vocab_size)
    dropped. Backward: splits the gradient (not used: generation runs under no_grad)."""
    return gather_from_region(local_logits[:, -1, :].contiguous(), group)[:, :vocab_size].float()


@torch.no_grad()
def tp_generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                top_k: int | None = None, greedy: bool = False, use_cache: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Append `max_new_tokens` tokens to idx (B, T) on every rank of model.group; (B, T + new).

    Collective: call on every tp rank with the same idx. Per step: one all-gather of the last
    logits, plus (sampling only) one broadcast of rank 0's (B, 1) tokens.
    """
    cfg, group = model.config, model.group
    was_training = model.training
    model.eval()
    B, T = idx.shape
    total = T + max_new_tokens
    cache = model.kv_cache(B, total) if use_cache and total <= cfg.block_size else None
    src = 0 if group is None else dist.get_global_rank(group, 0)
    step_input = idx
    with sequence_parallel_off(model):
        for _ in range(max_new_tokens):
            if cache is None:
                step_input = idx[:, -cfg.block_size:]
            local, _ = model(step_input, cache=cache)
            nxt = next_token(full_last_logits(local, group, cfg.vocab_size), temperature, top_k,
                             greedy, generator)
            if not greedy:  # ranks' generators may differ: rank 0 decides
                dist.broadcast(nxt, src=src, group=group)
            idx = torch.cat([idx, nxt], dim=1)
            step_input = nxt
    model.train(was_training)
    return idx
