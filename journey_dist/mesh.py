"""The dp x tp x pp process mesh: which ranks talk to which.

Layout (Megatron's order): global rank = (pp_rank * dp + dp_rank) * tp + tp_rank,
so tp varies fastest. With 8 ranks as pp=2, dp=2, tp=2:

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

DIMS = ("pp", "dp", "tp")


def rank_coords(rank: int, pcfg: ParallelConfig) -> dict[str, int]:
    """{'pp': i, 'dp': j, 'tp': k} of a global rank (pure; no process group needed)."""
    return {"pp": rank // (pcfg.dp * pcfg.tp), "dp": (rank // pcfg.tp) % pcfg.dp, "tp": rank % pcfg.tp}


def coords_rank(pp: int, dp: int, tp: int, pcfg: ParallelConfig) -> int:
    """Inverse of rank_coords."""
    return (pp * pcfg.dp + dp) * pcfg.tp + tp


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

    lines = [f"mesh pp={pcfg.pp} x dp={pcfg.dp} x tp={pcfg.tp} = {pcfg.world_size} ranks "
             f"(rank = (pp_rank*dp + dp_rank)*tp + tp_rank: a tp group is adjacent ranks)"]
    stages = range(pcfg.pp) if limit is None else range(min(pcfg.pp, limit))
    dps = range(pcfg.dp) if limit is None else range(min(pcfg.dp, limit))
    for s in stages:
        rows = "   ".join(f"dp{d}: {ranks([coords_rank(s, d, t, pcfg) for t in range(pcfg.tp)])}"
                         for d in dps)
        more = f"   ... (+{pcfg.dp - len(dps)} more dp rows)" if len(dps) < pcfg.dp else ""
        lines.append(f"  pp stage {s}: {rows}{more}")
    if len(stages) < pcfg.pp:
        lines.append(f"  ... (+{pcfg.pp - len(stages)} more pp stages)")
    what = {"tp": "split each layer's weights; all-reduce activations every block",
            "dp": "same stage, other data; all-reduce gradients after the flush",
            "pp": "same (dp, tp) slot, consecutive stages; send activations/gradients"}
    for dim in ("tp", "dp", "pp"):
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
    def dp_group(self) -> dist.ProcessGroup:
        return self.group("dp")

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.group("pp")

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

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
            f"rank {self.rank}: pp={c['pp']} dp={c['dp']} tp={c['tp']} | "
            f"tp group {self.ranks('tp')} dp group {self.ranks('dp')} pp group {self.ranks('pp')}"
        )


def build_mesh(pcfg: ParallelConfig, device_type: str = "cpu") -> Mesh:
    """Create the mesh's process groups (collective: every rank must call it)."""
    pcfg.validate(world_size=dist.get_world_size())
    device_mesh = init_device_mesh(
        device_type, (pcfg.pp, pcfg.dp, pcfg.tp), mesh_dim_names=DIMS
    )
    return Mesh(pcfg, device_mesh, dist.get_rank())
