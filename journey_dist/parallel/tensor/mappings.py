"""Megatron's communication ops for tensor parallel, as conjugate autograd functions.

Each op is a pair: what the forward does on the tp group, and what the backward must then do
so the gradient is the one a single device would compute. Names follow Megatron-LM's
mappings.py: f = copy_to_region, g = reduce_from_region (Shoeybi et al. 2019, fig. 3).

    copy_to_region         fwd: identity         bwd: all-reduce        (f, before a column layer)
    reduce_from_region     fwd: all-reduce       bwd: identity          (g, after a row layer)
    scatter_to_region      fwd: split last dim   bwd: all-gather last dim
    gather_from_region     fwd: all-gather last  bwd: split last dim
    gather_from_sequence   fwd: all-gather seq   bwd: reduce-scatter seq (SP, before a column layer)
    reduce_scatter_to_sequence fwd: reduce-scatter seq  bwd: all-gather seq (SP, after a row layer)
    scatter_to_sequence    fwd: split seq        bwd: all-gather seq

Sequence ops work on (B, S, C) tensors along dim 1 (our layout, not Megatron's (S, B, C)); they
move the sequence dim to the front so each is one contiguous collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from journey_dist.parallel.common import Group, all_gather_single, reduce_scatter_single


def tp_size(group: Group) -> int:
    return dist.get_world_size(group)


def tp_rank(group: Group) -> int:
    return dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def _split_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = tp_size(group)
    if x.size(-1) % n:
        raise ValueError(f"last dim {x.size(-1)} is not divisible by tp={n}; use a tp that divides it "
                         "(heads, 4*n_embd and the padded vocabulary must all split evenly)")
    return x.chunk(n, dim=-1)[tp_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = tp_size(group)
    # the flat all-gather concatenates along dim 0: put the last dim first, gather, move back.
    front = x.movedim(-1, 0).contiguous()
    out = front.new_empty((n * front.size(0), *front.shape[1:]))
    all_gather_single(out, front, group=group)
    return out.movedim(0, -1).contiguous()


def _gather_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = tp_size(group)
    front = x.transpose(0, 1).contiguous()  # (S/t, B, C)
    out = front.new_empty((n * front.size(0), *front.shape[1:]))
    all_gather_single(out, front, group=group)
    return out.transpose(0, 1).contiguous()  # (B, S, C)


def _reduce_scatter_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = tp_size(group)
    if x.size(1) % n:
        raise ValueError(f"sequence length {x.size(1)} is not divisible by tp={n} (sequence parallel)")
    front = x.transpose(0, 1).contiguous()  # (S, B, C)
    out = front.new_empty((front.size(0) // n, *front.shape[1:]))
    reduce_scatter_single(out, front, op=dist.ReduceOp.SUM, group=group)
    return out.transpose(0, 1).contiguous()  # (B, S/t, C)


def _split_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    n = tp_size(group)
    if x.size(1) % n:
        raise ValueError(f"sequence length {x.size(1)} is not divisible by tp={n} (sequence parallel)")
    return x.chunk(n, dim=1)[tp_rank(group)].contiguous()


class _CopyToRegion(torch.autograd.Function):
    """f: forward identity; backward all-reduce (sum the partial input grads of the shards)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """g: forward all-reduce (sum partial outputs); backward identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dim; backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    """Forward: all-gather the last dim; backward: keep this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    """SP: forward all-gather along the sequence; backward reduce-scatter along the sequence."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """SP: forward reduce-scatter along the sequence; backward all-gather along the sequence."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    """SP: forward keep this rank's sequence slice; backward all-gather along the sequence."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


def copy_to_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """f. Forward: identity. Backward: all-reduce(sum) of the gradient over the tp group."""
    return _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """g. Forward: all-reduce(sum) over the tp group. Backward: identity."""
    return _ReduceFromRegion.apply(x, group)


def scatter_to_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Forward: split the last dim, keep this rank's chunk. Backward: all-gather the last dim."""
    return _ScatterToRegion.apply(x, group)


def gather_from_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Forward: all-gather the last dim. Backward: split the last dim (no communication)."""
    return _GatherFromRegion.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """(B, S/t, C) -> (B, S, C). Forward: all-gather on dim 1. Backward: reduce-scatter on dim 1."""
    return _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """(B, S, C) partial sums -> (B, S/t, C). Forward: reduce-scatter on dim 1. Backward: all-gather."""
    return _ReduceScatterToSequence.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """(B, S, C) -> (B, S/t, C). Forward: split dim 1 (no comm). Backward: all-gather on dim 1."""
    return _ScatterToSequence.apply(x, group)
