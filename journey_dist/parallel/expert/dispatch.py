"""The collectives of expert parallel: token rows to the ranks that own their experts and back.

    all_to_all          fwd: all-to-all of rows, uneven splits   bwd: the reverse all-to-all
                        (each gradient row goes back to the rank that sent the row)
    exchange_counts     fwd: all-to-all of E int64 counts (how many rows each peer will send me,
                        per local expert); no gradient
    gather_counts       fwd: all-gather of this rank's (E + 1) int64 counts over the data-parallel
                        group (the whole batch's load); no gradient

A dispatch is exchange_counts, then all_to_all of the rows (sorted by expert, so the rows for
peer p's experts are one contiguous block); a combine is all_to_all with the splits swapped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from journey_dist.parallel.common import Group, all_gather_single


class _AllToAll(torch.autograd.Function):
    """Forward: rows [sum(in_splits[:p]), +in_splits[p]) go to rank p of the group; the result holds
    out_splits[s] rows from each rank s, in rank order. Backward: the same with the splits swapped,
    so each row's gradient returns to the rank that sent the row."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: Group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Group) -> torch.Tensor:
    """(sum(in_splits), ...) rows -> (sum(out_splits), ...) rows. Forward: all-to-all (this rank hands
    over x). Backward: the reverse all-to-all of the gradient (hands over sum(out_splits) rows)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def exchange_counts(counts: torch.Tensor, group: Group) -> torch.Tensor:
    """counts (E,): rows this rank sends to each expert, experts in owner order (E/ep per rank).
    Returns (ep, E/ep): row s holds how many rows rank s sends to each of this rank's experts.
    Forward: one all-to-all of E int64 (E/ep to each peer); no backward."""
    n = dist.get_world_size(group)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received.view(n, -1)


def gather_counts(counts: torch.Tensor, group: Group) -> torch.Tensor:
    """counts (E + 1,) of this rank -> (D, E + 1), every data-parallel rank's, in dp-rank order.
    Forward: one all-gather of (E + 1) int64 per rank; no backward."""
    n = dist.get_world_size(group)
    out = counts.new_empty(n * counts.numel())
    all_gather_single(out, counts.contiguous(), group=group)
    return out.view(n, -1)
