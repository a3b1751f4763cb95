"""The pp x dp x cp x tp process mesh: which ranks talk to which.

Layout (Megatron's order, tp fastest, then cp, dp, pp):
global rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank, so the ranks of one
tensor-parallel group are neighbours (the same node, the fastest links), then the context-parallel
ones. cp is 1 unless a run splits the sequence; with cp = 1 the rank is (pp_rank*dp + dp_rank)*tp +
tp_rank. With 8 ranks as pp=2, dp=2, tp=2:

    pp stage 0: dp0 -> ranks [0, 1]   dp1 -> ranks [2, 3]
    pp stage 1: dp0 -> ranks [4, 5]   dp1 -> ranks [6, 7]

A tp group is a row ([0,1]), a dp group a column within a stage ([0,2]), and a
pp group the same (dp, tp) position across stages ([0,4]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from journey_dist.config import ParallelConfig

DIMS = ("pp", "dp", "cp", "tp")  # slowest to fastest varying


def rank_coords(rank: int, pcfg: ParallelConfig) -> dict[str, int]:
    """{'pp': i, 'dp': j, 'cp': c, 'tp': k} of a global rank (pure; no process group needed)."""
    coords = {}
    for dim in reversed(DIMS):  # tp first: it varies fastest
        size = getattr(pcfg, dim)
        coords[dim] = rank % size
        rank //= size
    return {dim: coords[dim] for dim in DIMS}


def coords_rank(pp: int, dp: int, tp: int, pcfg: ParallelConfig, cp: int = 0) -> int:
    """Inverse of rank_coords."""
    return ((pp * pcfg.dp + dp) * pcfg.cp + cp) * pcfg.tp + tp


def group_ranks(rank: int, dim: str, pcfg: ParallelConfig) -> list[int]:
    """Global ranks in `rank`'s group along `dim`, ordered by their coordinate on it."""
    c = rank_coords(rank, pcfg)
    size = getattr(pcfg, dim)
    return [coords_rank(**{**c, dim: i}, pcfg=pcfg) for i in range(size)]


def all_groups(dim: str, pcfg: ParallelConfig) -> list[list[int]]:
    """Every group along `dim`, each as its global ranks, ordered by their smallest rank."""
    groups = {tuple(group_ranks(r, dim, pcfg)) for r in range(pcfg.world_size)}
    return [list(g) for g in sorted(groups)]


def layout_text(pcfg: ParallelConfig, limit: int | None = None) -> str:
    """Which global ranks form each tp, dp and pp group, and each rank's (pp, dp, tp) coordinates
    (pure: what a learner reads before any process starts). `limit`: show at most that many
    stages, dp rows, groups and ranks per list, and say how many more (for big worlds)."""
    def show(items: list, fmt=str) -> str:
        if limit is None or len(items) <= limit:
            return ", ".join(fmt(i) for i in items)
        return ", ".join(fmt(i) for i in items[:limit]) + f", ... (+{len(items) - limit} more)"

    def ranks(rs: list[int]) -> str:
        return f"[{show(rs)}]"

    if pcfg.cp == 1:
        lines = [f"mesh pp={pcfg.pp} x dp={pcfg.dp} x tp={pcfg.tp} = {pcfg.world_size} ranks "
                 f"(rank = (pp_rank*dp + dp_rank)*tp + tp_rank: a tp group is adjacent ranks)"]
    else:
        lines = [f"mesh pp={pcfg.pp} x dp={pcfg.dp} x cp={pcfg.cp} x tp={pcfg.tp} = {pcfg.world_size} ranks "
                 f"(rank = ((pp_rank*dp + dp_rank)*cp + cp_rank)*tp + tp_rank: tp groups are adjacent "
                 f"ranks, then cp)"]
    stages = range(pcfg.pp) if limit is None else range(min(pcfg.pp, limit))
    dps = range(pcfg.dp) if limit is None else range(min(pcfg.dp, limit))

    def dp_row(s: int, d: int) -> str:  # this dp slot's ranks: one tp group per cp position
        return " ".join(ranks([coords_rank(s, d, t, pcfg, cp=c) for t in range(pcfg.tp)])
                        for c in range(pcfg.cp))

    for s in stages:
        rows = "   ".join(f"dp{d}: {dp_row(s, d)}" for d in dps)
        more = f"   ... (+{pcfg.dp - len(dps)} more dp rows)" if len(dps) < pcfg.dp else ""
        lines.append(f"  pp stage {s}: {rows}{more}")
    if len(stages) < pcfg.pp:
        lines.append(f"  ... (+{pcfg.pp - len(stages)} more pp stages)")
    what = {"tp": "split each layer's weights; all-reduce activations every block",
            "cp": "split each sequence; exchange keys/values in attention",
            "dp": "same stage, other data; all-reduce gradients after the flush",
            "pp": "same (dp, tp) slot, consecutive stages; send activations/gradients"}
    for dim in ("tp", "cp", "dp", "pp") if pcfg.cp > 1 else ("tp", "dp", "pp"):
        lines.append(f"  {dim} groups ({what[dim]}): [{show(all_groups(dim, pcfg), ranks)}]")
    return "\n".join(lines)


@dataclass
class Mesh:
    """This rank's view of the mesh: its coordinates and process groups per dimension."""

    pcfg: ParallelConfig
    device_mesh: DeviceMesh
    rank: int

    @property
    def coords(self) -> dict[str, int]:
        return rank_coords(self.rank, self.pcfg)

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.device_mesh.get_group(dim)

    def ranks(self, dim: str) -> list[int]:
        return group_ranks(self.rank, dim, self.pcfg)

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.group("tp")

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self.group("cp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.group("dp")

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.group("pp")

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

    @property
    def cp_rank(self) -> int:
        return self.coords["cp"]

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def pp_rank(self) -> int:
        return self.coords["pp"]

    def sub(self, dim: str) -> DeviceMesh:
        """The 1-D DeviceMesh along `dim` (what DTensor/FSDP2 APIs take)."""
        return self.device_mesh[dim]

    def describe(self) -> str:
        c = self.coords
        return (
            f"rank {self.rank}: pp={c['pp']} dp={c['dp']} cp={c['cp']} tp={c['tp']} | "
            f"tp group {self.ranks('tp')} cp group {self.ranks('cp')} dp group {self.ranks('dp')} "
            f"pp group {self.ranks('pp')}"
        )


def build_mesh(pcfg: ParallelConfig, device_type: str = "cpu") -> Mesh:
    """Create the mesh's process groups (collective: every rank must call it)."""
    pcfg.validate(world_size=dist.get_world_size())
    device_mesh = init_device_mesh(
        device_type, tuple(getattr(pcfg, d) for d in DIMS), mesh_dim_names=DIMS
    )
    return Mesh(pcfg, device_mesh, dist.get_rank())
