"""The simple baseline: every rank all-gathers the whole sequence's k and v, then attends.

Llama 3's context parallelism works this way (k/v are small with grouped-query attention, and an
all-gather is one collective the network does well). Here it is the yardstick ring attention is
benchmarked against (benchmarks/context_parallel.py): the same result, more memory per rank
(the whole sequence's k and v are kept for backward), no overlap of traffic and compute.

    forward:  all-gather k and v over cp (2 per layer, each the full (b, kv_heads, S, d) buffer)
    backward: reduce-scatter dK and dV (2 per layer): each rank keeps the sum for its own tokens
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from journey_dist.parallel.common import all_gather_single, reduce_scatter_single


class _GatherSequence(torch.autograd.Function):
    """(B, K, S/n, D) -> (B, K, S, D), ranks' chunks in rank order. Forward: all-gather.
    Backward: reduce-scatter (sum the gradient every rank computed for this rank's chunk)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = dist.get_world_size(group)
        front = x.transpose(0, 2).contiguous()  # (S/n, K, B, D): the flat collective splits dim 0
        out = front.new_empty((n * front.size(0), *front.shape[1:]))
        all_gather_single(out, front, group=group)
        return out.transpose(0, 2)

    @staticmethod
    def backward(ctx, grad):
        n = dist.get_world_size(ctx.group)
        front = grad.transpose(0, 2).contiguous()
        out = front.new_empty((front.size(0) // n, *front.shape[1:]))
        reduce_scatter_single(out, front, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.transpose(0, 2), None


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None,
                        positions: torch.Tensor) -> torch.Tensor:
    """Causal attention of this rank's queries (plain layout, global `positions`) over the gathered
    k and v: q (B, H, T, D), k and v (B, K, T, D) -> (B, H, T, D)."""
    kf, vf = (_GatherSequence.apply(t, group) for t in (k, v))
    mask = positions[:, None] >= torch.arange(kf.size(2), device=q.device)[None, :]  # (T, S)
    gqa = {"enable_gqa": True} if q.size(1) != k.size(1) else {}
    return F.scaled_dot_product_attention(q, kf, vf, attn_mask=mask, **gqa)
