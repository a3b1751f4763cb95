"""KV-cache generation on a tensor-parallel GPT: `TensorParallelGPT.generate` (= GPT.generate).

Each rank runs its H/t query heads and caches only the keys and values of its K/t kv heads (K =
n_kv_head with GQA, else H), so a rank's cache is 1/t of the single-process one
(model.kv_cache_bytes(cfg, B, tokens, kv_heads=K/t)). The logits
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

from journey_dist.model import GPT, KVCache, kv_cache_bytes, next_token
from journey_dist.parallel.tensor.mappings import gather_from_region

__all__ = ["compare_tp_generation", "full_last_logits", "sequence_parallel_off", "tp_generate"]


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


@torch.no_grad()
def compare_tp_generation(model: GPT, tp_model: nn.Module, prompt: torch.Tensor, new_tokens: int,
                          seed: int = 0) -> dict:
    """Check tp_model.generate against model.generate (the same weights, one process).

    Collective (every tp rank, same prompt). Returns: greedy tokens identical; the max |logit
    diff| over the prompt and every decode step with the KV cache; this rank's cache bytes vs
    kv_cache_bytes(..., kv_heads=K/t) and one process's (heads_per_rank: the K/t kv heads it caches);
    and whether sampling with a generator seeded differently on every rank still gives every rank
    the same tokens.
    """
    cfg, group = model.config, tp_model.group
    B, total = prompt.size(0), prompt.size(1) + new_tokens
    want = model.generate(prompt, new_tokens, greedy=True)
    got = tp_model.generate(prompt, new_tokens, greedy=True)
    model.eval()
    tp_model.eval()
    ref_cache, cache = KVCache(cfg, B, total, prompt.device, next(model.parameters()).dtype), \
        tp_model.kv_cache(B, total)
    diff, start = 0.0, 0
    for end in [prompt.size(1)] + list(range(prompt.size(1) + 1, total)):  # prefill, then 1 by 1
        step = want[:, start:end]
        full, _ = model(step, cache=ref_cache)
        local, _ = tp_model(step, cache=cache)
        local = gather_from_region(local.contiguous(), group)[..., :cfg.vocab_size]
        diff = max(diff, (local.float() - full.float()).abs().max().item())
        start = end
    gen = torch.Generator(device=prompt.device).manual_seed(seed + dist.get_rank())  # differs per rank
    sampled = tp_model.generate(prompt, new_tokens, top_k=50, generator=gen)
    everyone = [torch.empty_like(sampled) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, sampled, group=group)
    heads = tp_model.transformer.h[0].attn.n_kv_head  # the kv heads this rank caches
    return {"greedy_identical": bool(torch.equal(want, got)), "max_logit_diff": diff,
            "cache_bytes_per_rank": cache.nbytes(),
            "cache_bytes_formula": kv_cache_bytes(cfg, B, total, cache.k[0].element_size(), kv_heads=heads),
            "cache_bytes_one_process": ref_cache.nbytes(), "heads_per_rank": heads,
            "sampled_same_on_ranks": all(torch.equal(t, everyone[0]) for t in everyone)}
