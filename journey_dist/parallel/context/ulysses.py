"""Ulysses (DeepSpeed-Ulysses, Jacobs et al. 2023): trade the sequence split for a head split.

Attention needs the whole sequence but only one head at a time. So around attention each rank
swaps its S/n tokens of all H heads for all S tokens of H/n heads (one all-to-all per tensor),
runs ordinary causal attention on its heads, and swaps back:

    forward:  all-to-all q, k, v  (seq-sharded -> head-sharded), attention, all-to-all the output
              (head-sharded -> seq-sharded): 4 all-to-alls per layer
    backward: the adjoints, 4 all-to-alls per layer (the output's gradient to head-sharded, the
              gradients of q, k, v back to seq-sharded)

Each all-to-all moves (n-1)/n of a (B, heads, S/n, D) tensor per rank, independent of n in total
volume per rank, where ring attention's k/v traffic per rank is (n-1)/n of the sequence's k/v.
The constraint: n must divide the query heads; kv heads are split too, so n must divide them or,
with fewer kv heads than ranks (grouped-query attention), be a multiple of them: each kv head is
then repeated n/K times, so every rank still gets the kv head its query heads read.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from journey_dist.config import ConfigError
from journey_dist.model import attention


def check_ulysses(heads: int, kv_heads: int, cp: int) -> None:
    """ConfigError unless Ulysses can split these (this rank's) heads over cp ranks."""
    if heads % cp:
        raise ConfigError(
            f"Ulysses splits attention heads over the cp ranks, but cp={cp} does not divide the "
            f"{heads} query heads; use a cp in {[d for d in range(1, heads + 1) if heads % d == 0]}, "
            f"or the ring design (cp_design='ring' or 'zigzag'), which has no such limit")
    if kv_heads % cp and cp % kv_heads:
        raise ConfigError(
            f"Ulysses splits the {kv_heads} key/value heads over cp={cp} ranks: cp must divide them, "
            f"or be a multiple of them (each kv head then repeated); use such a cp, or the ring design")


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)  # like a contiguous x: the collective fills it in dim-0 parts
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(B, H, S/n, D) this rank's tokens -> (B, H/n, S, D) this rank's heads (one all-to-all)."""
    n = dist.get_world_size(group)
    B, H, T, D = x.shape
    parts = x.reshape(B, n, H // n, T, D).transpose(0, 1)  # part j: heads for rank j
    got = _all_to_all(parts, group)  # part i: rank i's tokens of my heads
    return got.permute(1, 2, 0, 3, 4).reshape(B, H // n, n * T, D)


def heads_to_seq(y: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(B, H/n, S, D) this rank's heads -> (B, H, S/n, D) this rank's tokens (one all-to-all)."""
    n = dist.get_world_size(group)
    B, h, S, D = y.shape
    parts = y.reshape(B, h, n, S // n, D).permute(2, 0, 1, 3, 4)  # part j: rank j's tokens
    got = _all_to_all(parts, group)  # part i: my tokens of rank i's heads
    return got.transpose(0, 1).reshape(B, n * h, S // n, D)


class _SeqToHeads(torch.autograd.Function):
    """Forward: all-to-all, seq-sharded -> head-sharded. Backward: all-to-all, head -> seq."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    """Forward: all-to-all, head-sharded -> seq-sharded. Backward: all-to-all, seq -> head."""

    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        return heads_to_seq(y, group)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_heads(grad, ctx.group), None


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None,
                      attn_impl: str = "sdpa") -> torch.Tensor:
    """Causal attention of this rank's S/n tokens (plain layout): q (B, H, S/n, D), k and v
    (B, K, S/n, D) -> (B, H, S/n, D). Forward: 4 all-to-alls (q, k, v, output); backward: 4."""
    n = dist.get_world_size(group)
    check_ulysses(q.size(1), k.size(1), n)
    if k.size(1) % n:  # fewer kv heads than ranks: repeat each so every rank gets the one it reads
        k, v = (t.repeat_interleave(n // t.size(1), dim=1) for t in (k, v))
    qh, kh, vh = (_SeqToHeads.apply(t, group) for t in (q, k, v))
    y = attention(qh, kh, vh, 0, attn_impl, 0.0, nn.Identity())  # whole sequence, this rank's heads
    return _HeadsToSeq.apply(y, group)
