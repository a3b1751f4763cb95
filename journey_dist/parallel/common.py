"""What every parallel scheme needs after backward: the global gradient norm, clipping, means.

One clipping rule for all of them (Megatron-LM's clip_grads.py is the model): each rank sums the
squares of the gradient elements it is responsible for, the scalar is all-reduced over the groups
across which the model is split (tp, then pp; a data-parallel replica already holds the full
mean gradient, so dp is never one of them), and the square root is the norm one process would
compute. A gradient another rank of the same group also holds (a replicated LayerNorm on tp rank >
0, the last stage's copy of the tied embedding) is a *duplicate* and is left out, so every element
is counted exactly once. Then every gradient is scaled by min(1, max_norm / (norm + 1e-6)),
torch.nn.utils.clip_grad_norm_'s rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

Group = dist.ProcessGroup | None
# torch 2.13 renamed the flat collectives; the old names (deprecated there) are all older torch has
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
ClipFn = Callable[[list[torch.Tensor], float], torch.Tensor]


def squared_sum(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of g^2 over every element, in fp32. A DTensor gradient reports its whole (all-ranks)
    square sum as DTensor computes it: its norm's full_tensor(), one scalar all-reduce per sharded
    tensor (the library's way), so DTensors count once and are never duplicates."""
    total = None
    for g in grads:
        sq = g.detach().float().pow(2).sum() if not isinstance(g, DTensor) else g.detach().norm() ** 2
        sq = sq.full_tensor() if isinstance(sq, DTensor) else sq
        total = sq if total is None else total + sq
    return total if total is not None else torch.zeros(())


def total_norm(grads: Iterable[torch.Tensor], groups: Sequence[Group] = ()) -> torch.Tensor:
    """The L2 norm of gradients split over `groups`: local square sum, one scalar all-reduce (sum)
    per group, square root. Forward: nothing; after backward: one fp32 scalar per group."""
    sq = squared_sum(grads)
    for group in groups:
        dist.all_reduce(sq, group=group)
    return sq.sqrt()


def global_grad_norm(params: Iterable[torch.Tensor], groups: Sequence[Group] = (),
                     is_duplicate: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
    """The norm of the whole model's gradient from this rank's parameters (see the module docstring):
    parameters without a gradient and duplicates are skipped, the rest summed over `groups`."""
    keep = [p.grad for p in params if p.grad is not None and not (is_duplicate and is_duplicate(p))]
    return total_norm(keep, groups)


def clip_by_total_norm(grads: Iterable[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)) in place (clip_grad_norm_'s rule)."""
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(device=g.device, dtype=g.dtype) if not isinstance(g, DTensor)
                        else coef.item())


def clip_grads(params: Iterable[torch.Tensor], max_norm: float, groups: Sequence[Group] = (),
               is_duplicate: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
    """Clip every gradient of `params` by the global norm; return that norm (before clipping)."""
    params = list(params)
    norm = global_grad_norm(params, groups, is_duplicate)
    clip_by_total_norm([p.grad for p in params if p.grad is not None], max_norm, norm)
    return norm


def clip_fn(groups: Sequence[Group] = (),
            is_duplicate: Callable[[torch.Tensor], bool] | None = None) -> ClipFn:
    """StepHooks.clip for a model split over `groups`: clip_grads(params, max_norm, groups, is_duplicate)."""
    return lambda params, max_norm: clip_grads(params, max_norm, groups, is_duplicate)


def tp_duplicate(tp_rank: int) -> Callable[[torch.Tensor], bool]:
    """On tp rank > 0 a parameter without a tp shard tag (tensor/layers.py's `tp_split`) is a copy
    of rank 0's: its gradient is the same (after the sequence-parallel sync), counted on rank 0."""
    return lambda p: tp_rank > 0 and not hasattr(p, "tp_split")


def mean_over(group: Group = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """StepHooks.reduce_loss: the mean of a scalar over the group's ranks (one all-reduce)."""
    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, group=group)
        return t / dist.get_world_size(group)
    return reduce


def all_reduce_flat(tensors: Sequence[torch.Tensor], group: Group = None) -> None:
    """Sum `tensors` over `group` in place with one all-reduce of their concatenation (one call
    instead of one per tensor: what DDP's buckets do)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def sync_dp_grads(module: nn.Module, group: Group) -> None:
    """Average gradients over a data-parallel group after backward (or a pipeline's flush).

    Forward: nothing. After backward: one all-reduce (sum, then / dp) per gradient.
    """
    n = dist.get_world_size(group)
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(n)
