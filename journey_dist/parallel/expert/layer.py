"""An MoE layer whose experts are split over the ranks of an expert-parallel group.

The groups (ep inside dp, as Megatron-LM and DeepSpeed-MoE lay them out): each data-parallel group
of D ranks is cut into D/ep expert-parallel groups of ep consecutive dp ranks; ep rank p holds
experts p·E/ep .. (p+1)·E/ep - 1. The ranks holding the same experts (the same ep rank in every ep
group of a dp group) form its expert-data-parallel group (edp, D/ep ranks), over which those
experts' gradients are reduced. With dp=4, ep=2: ep groups [0,1] [2,3], edp groups [0,2] [1,3].

One forward of ExpertParallelMoE, per layer (MoE.forward with two steps replaced):

    batch view   gather_counts over dp: every rank's pairs per expert, so the load balancing loss
                 and the capacity are the whole global batch's, as one process sees it (a pair's
                 place in its expert's queue counts the pairs of lower dp ranks first)
    dispatch     exchange_counts over ep (rows each peer will send), then all_to_all of the kept
                 rows, sorted by expert, to their experts' owners
    experts      the rows regrouped by local expert (source order kept within an expert), each
                 local expert run on its rows (zero rows if none came)
    combine      all_to_all back with the splits swapped; weighting and summing at the source

Backward: the two token all-to-alls run in reverse (combine's gradient to the owners, dispatch's
gradient back to the sources); the counts need none.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from journey_dist.model import MoE
from journey_dist.parallel.expert.dispatch import all_to_all, exchange_counts, gather_counts


@dataclass(frozen=True)
class ExpertGroups:
    """This rank's groups for expert parallel (see the module docstring)."""

    dp: dist.ProcessGroup
    ep: dist.ProcessGroup
    edp: dist.ProcessGroup
    dp_rank: int
    dp_size: int
    ep_rank: int
    ep_size: int

    @property
    def edp_size(self) -> int:
        return self.dp_size // self.ep_size


def expert_group_ranks(dp_group: list[int], ep: int) -> tuple[list[list[int]], list[list[int]]]:
    """(ep groups, edp groups) of one data-parallel group's global ranks (in dp order): ep groups are
    consecutive blocks of ep ranks, edp groups take one rank of each block (pure)."""
    eps = [dp_group[i:i + ep] for i in range(0, len(dp_group), ep)]
    edps = [dp_group[j::ep] for j in range(ep)]
    return eps, edps


def build_expert_groups(dp_groups: list[list[int]], ep: int) -> ExpertGroups:
    """Create the dp, ep and edp process groups of every dp group (collective: every rank calls it
    with the same `dp_groups`, each a list of global ranks in dp order) and return this rank's."""
    eps, edps = zip(*(expert_group_ranks(g, ep) for g in dp_groups))
    dp, _ = dist.new_subgroups_by_enumeration(dp_groups)
    ep_group, _ = dist.new_subgroups_by_enumeration([g for gs in eps for g in gs])
    edp, _ = dist.new_subgroups_by_enumeration([g for gs in edps for g in gs])
    return ExpertGroups(dp, ep_group, edp, dist.get_rank(dp), dist.get_world_size(dp),
                        dist.get_rank(ep_group), dist.get_world_size(ep_group))


def moe_layers(model: nn.Module) -> list[MoE]:
    """The model's MoE layers in block order."""
    return [block.mlp for block in model.transformer.h if isinstance(block.mlp, MoE)]


class ExpertParallelMoE(MoE):
    """`moe`'s router and shared expert, and only this rank's experts (named by their global index,
    so parameter names stay the plain GPT's: mlp.experts.<e>...). Local experts' parameters carry
    `expert_parallel = True` (their gradients are reduced over the edp group, not dp)."""

    def __init__(self, moe: MoE, groups: ExpertGroups):
        nn.Module.__init__(self)
        self.n_experts, self.top_k, self.router_kind = moe.n_experts, moe.top_k, moe.router_kind
        self.capacity_factor, self.aux_coef, self.z_coef = moe.capacity_factor, moe.aux_coef, moe.z_coef
        self.groups = groups
        per_rank = moe.n_experts // groups.ep_size
        self.local = range(groups.ep_rank * per_rank, (groups.ep_rank + 1) * per_rank)
        self.router = copy.deepcopy(moe.router)
        self.experts = nn.ModuleDict({str(e): copy.deepcopy(moe.experts[e]) for e in self.local})
        self.shared_expert = copy.deepcopy(moe.shared_expert)
        for p in self.experts.parameters():
            p.expert_parallel = True
        self.aux_loss, self.stats = None, None
        self.received = 0  # rows this rank's experts took in the last forward (all sources)

    def batch_view(self, counts: torch.Tensor,
                   n_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Every dp rank's counts (one all-gather over dp): the batch's counts, the counts of lower
        dp ranks (earlier tokens of the global batch), the batch's tokens."""
        g = self.groups
        if g.dp_size == 1:
            return counts, None, n_tokens
        everyone = gather_counts(torch.cat([counts, counts.new_tensor([n_tokens])]), g.dp)  # (D, E + 1)
        return everyone[:, :-1].sum(0), everyone[:g.dp_rank, :-1].sum(0), int(everyone[:, -1].sum())

    def run_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows sorted by expert (counts[e] for expert e, every expert of the model) -> their outputs,
        same order: rows go to their experts' owners and come back (dispatch, experts, combine)."""
        g = self.groups
        if g.ep_size == 1:  # every expert is here
            self.received = rows.size(0)
            chunks = rows.split(counts.tolist())
            return torch.cat([self.experts[str(e)](c) for e, c in zip(self.local, chunks)])
        from_peers = exchange_counts(counts, g.ep)  # (ep, E/ep): rows each source sends each local expert
        send = counts.view(g.ep_size, -1).sum(1).tolist()  # rows for each owner (contiguous blocks)
        recv = from_peers.sum(1).tolist()
        arrived = all_to_all(rows, recv, send, g.ep)  # source-major, expert-major within a source
        order = _expert_major(from_peers)
        x = arrived[order]  # expert-major, source order within an expert
        chunks = x.split(from_peers.sum(0).tolist())
        y = torch.cat([self.experts[str(e)](c) for e, c in zip(self.local, chunks)])
        self.received = x.size(0)
        back = y[torch.argsort(order)]  # source-major again
        return all_to_all(back, send, recv, g.ep)


def _expert_major(from_peers: torch.Tensor) -> torch.Tensor:
    """Indices that reorder rows laid out source-major ((ep, E/ep) chunk sizes from_peers, source s's
    chunk for local expert j at [s, j]) into expert-major order, sources in rank order within an
    expert (Megatron's sort_chunks_by_idxs)."""
    sizes = from_peers.flatten()
    starts = torch.cumsum(sizes, 0) - sizes
    n_src, n_local = from_peers.shape
    parts = [torch.arange(int(starts[s * n_local + j]), int(starts[s * n_local + j] + sizes[s * n_local + j]))
             for j in range(n_local) for s in range(n_src)]
    return torch.cat(parts).to(from_peers.device) if parts else from_peers.new_zeros(0)
