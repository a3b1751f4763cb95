"""What expert parallel communicates: the routing of every step (RouterLog), the collectives a
ledger measured by group (group_names, comm_by_group) and the formula they must equal
(expected_collectives), for the routing a step had or for an even load (planned_comm, which
`journey plan` uses).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from journey_dist.comm import CommLedger
from journey_dist.config import GPTConfig, ParallelConfig
from journey_dist.model import MoE
from journey_dist.moe import imbalance
from journey_dist.parallel.expert.layer import ExpertGroups, moe_layers
from journey_dist.runtime import comm_device
from journey_dist.train import TrainConfig

# ----------------------------------------------------------------------------- routing, step by step


@dataclass
class RouterLog:
    """Every MoE layer's routing in each training forward (forward hooks), grouped by step.

    A record: {"layer", "counts" (pairs per expert before capacity), "kept" (after), "received"
    (rows this rank's experts took), "balance", "z"}, all of this rank.
    """

    model: nn.Module
    steps: list[list[dict]] = field(default_factory=list)
    current: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        layers = moe_layers(self.model)
        self.handles = [m.register_forward_hook(self._recorder(i)) for i, m in enumerate(layers)]

    def _recorder(self, layer: int):
        def record(module: MoE, _inputs, _output) -> None:
            if module.training:
                s = module.stats
                self.current.append({"layer": layer, "counts": s.counts.tolist(), "kept": s.kept.tolist(),
                                     "received": getattr(module, "received", int(s.kept.sum())),
                                     "balance": float(s.balance), "z": float(s.z)})
        return record

    def end_step(self) -> None:
        """Close the step (hooks.then_sync calls it once per step, after the gradient sync)."""
        self.steps.append(self.current)
        self.current = []

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def global_steps(self, group: dist.ProcessGroup | None, n_layers: int) -> list[dict]:
        """Per step, over the whole global batch (one all-reduce over `group`, the dp group):
        {"counts": [layer][expert] pairs, "dropped": pairs, "imbalance": mean over layers of
        max/mean, "balance" and "z": mean over layers (each the dp mean)}."""
        if not self.steps:
            return []
        rows = torch.tensor([[[*r["counts"], *r["kept"], r["balance"], r["z"]]
                              for r in _by_layer(step, n_layers)] for step in self.steps],
                            dtype=torch.float64, device=comm_device(group))
        size = dist.get_world_size(group) if dist.is_initialized() else 1
        if size > 1:
            dist.all_reduce(rows, group=group)
        rows = rows.cpu()
        n_e = (rows.size(-1) - 2) // 2
        out = []
        for step in rows:
            counts, kept = step[:, :n_e], step[:, n_e:2 * n_e]
            out.append({"counts": counts.long().tolist(), "dropped": int((counts - kept).sum()),
                        "imbalance": sum(imbalance(c) for c in counts) / len(counts),
                        "balance": float(step[:, -2].mean()) / size, "z": float(step[:, -1].mean()) / size})
        return out


def _by_layer(step: list[dict], n_layers: int) -> list[dict]:
    """A step's records summed per layer over its micro-steps (counts and kept added; balance and z
    averaged)."""
    out = []
    for layer in range(n_layers):
        rs = [r for r in step if r["layer"] == layer]
        out.append({"counts": [sum(c) for c in zip(*(r["counts"] for r in rs))],
                    "kept": [sum(c) for c in zip(*(r["kept"] for r in rs))],
                    "balance": sum(r["balance"] for r in rs) / len(rs),
                    "z": sum(r["z"] for r in rs) / len(rs)})
    return out


# ----------------------------------------------------------------------------- communication


Ranks = tuple[int, ...]
Comm = dict[str, dict[str, dict[str, float]]]  # {group name: {op: {calls, bytes, ...}}}


def group_names(groups: ExpertGroups, tp_group: dist.ProcessGroup | None = None) -> dict[Ranks, str]:
    """{global ranks: name} of this rank's groups of more than one rank; groups with the same ranks
    (ep = dp: the ep group is the dp group) share one name, e.g. "dp=ep"."""
    named: dict[Ranks, list[str]] = {}
    for name, g in (("dp", groups.dp), ("ep", groups.ep), ("edp", groups.edp), ("tp", tp_group)):
        if g is not None and dist.get_world_size(g) > 1:
            named.setdefault(tuple(dist.get_process_group_ranks(g)), []).append(name)
    return {ranks: "=".join(names) for ranks, names in named.items()}


def comm_by_group(ledger: CommLedger, names: dict[Ranks, str]) -> Comm:
    """The ledger's collectives by group name: {name: {op: {calls, bytes, wire_bytes}}}."""
    out: Comm = {}
    for (op, ranks), row in ledger.summary().items():
        if ranks in names:
            out.setdefault(names[ranks], {})[op] = dict(row)
    return out


def expected_collectives(config: GPTConfig, pcfg: ParallelConfig, cfg: TrainConfig,
                         forwards: Iterable[dict], *, dense_numel: int, expert_numel: int,
                         names: dict[str, str] | None = None, bytes_per_value: int = 4,
                         grad_bytes: int | None = None, seq_len: int | None = None) -> Comm:
    """What one rank hands to collectives in a training step: {group: {op: {"calls", "bytes"}}}.

    `forwards` are that step's RouterLog records on this rank (one per MoE layer per micro-step): the
    all-to-all volume depends on where the router sent the tokens. Per MoE layer and micro-step,
    with M = rows this rank dispatches (kept pairs), R = rows its experts receive, C = n_embd:
      ep (ep > 1): all-to-all 5 calls: the counts (E int64), dispatch M·C and combine R·C values
        forward, their reverses backward (combine's R·C... handed as M·C, dispatch's as R·C),
        so 8E + 2(M + R)·C·v bytes; the clip: all-reduce of one fp32 scalar per step;
      dp (dp > 1): all-gather of dp·(E + 1) int64 counts; per step one all-reduce of the dense
        gradients (dense_numel values);
      edp (dp/ep > 1): per step one all-reduce of the local expert gradients (expert_numel values);
      tp (tp > 1): per micro-step 2L + 2 all-reduces of the activations (attention's g and f per
        layer, the embedding, the head; the MoE layers are whole on every tp rank) and 3 of the
        cross-entropy's per-token fp32 values; per step the clip's fp32 scalar.
    `names` maps "dp", "ep", "edp", "tp" to the names group_names gave their ranks (merged groups).
    Activations are bytes_per_value per value, gradients grad_bytes (default the same); sequences
    seq_len tokens (default block_size).
    """
    E, C, v, m = config.n_experts, config.n_embd, bytes_per_value, cfg.grad_accum
    g = v if grad_bytes is None else grad_bytes
    names = names or {}
    out: Comm = {}

    def add(group: str, op: str, calls: int, nbytes: int) -> None:
        row = out.setdefault(names.get(group, group), {}).setdefault(op, {"calls": 0, "bytes": 0})
        row["calls"] += calls
        row["bytes"] += nbytes

    forwards = list(forwards)
    clip = cfg.grad_clip > 0
    if pcfg.ep > 1:
        for f in forwards:
            add("ep", "all_to_all", 5, 8 * E + 2 * (sum(f["kept"]) + f["received"]) * C * v)
        if clip:
            add("ep", "all_reduce", 1, 4)
    if pcfg.dp > 1:
        add("dp", "all_gather", len(forwards), len(forwards) * pcfg.dp * (E + 1) * 8)
        add("dp", "all_reduce", 1, dense_numel * g)
    if pcfg.dp // pcfg.ep > 1:
        add("edp", "all_reduce", 1, expert_numel * g)
    if pcfg.tp > 1:
        tokens = cfg.batch_size // (pcfg.dp * m) * (config.block_size if seq_len is None else seq_len)
        act = tokens * C * v
        per_micro = 2 * config.n_layer + 2  # activation all-reduces
        add("tp", "all_reduce", m * (per_micro + 3) + clip, m * (per_micro * act + 3 * tokens * 4) + 4 * clip)
    return out


def even_load_forwards(config: GPTConfig, tokens: int, micro_steps: int) -> list[dict]:
    """RouterLog-style records of a step whose routing is perfectly even: each of a micro-step's
    `tokens` tokens (on this rank) sends k pairs, nothing is dropped, and this rank's experts receive
    as many rows as it sends (what `journey plan` assumes: the real load varies step by step)."""
    k, E = config.moe_top_k, config.n_experts
    return [{"layer": layer, "kept": [tokens * k / E] * E, "received": tokens * k}
            for _ in range(micro_steps) for layer in range(config.n_layer)]


def planned_comm(config: GPTConfig, pcfg: ParallelConfig, *, batch: int, seq: int, dense_numel: int,
                 expert_numel: int, bytes_per_value: int = 4, grad_bytes: int = 4,
                 grad_clip: float = 1.0) -> dict[str, dict[str, float]]:
    """{group kind: {op: bytes}} one rank hands to collectives per step under an even load
    (expected_collectives with even_load_forwards; pure, for `journey plan`, which passes this
    rank's dense and expert parameter counts from memory.sizes). Kinds: ep, dp, edp, tp."""
    m = pcfg.microbatches
    tokens = batch // (pcfg.dp * m) * seq
    train = TrainConfig(batch_size=batch, grad_accum=m, grad_clip=grad_clip)
    comm = expected_collectives(config, pcfg, train, even_load_forwards(config, tokens, m),
                                dense_numel=dense_numel, expert_numel=expert_numel,
                                bytes_per_value=bytes_per_value, grad_bytes=grad_bytes, seq_len=seq)
    return {kind: {op: row["bytes"] for op, row in ops.items()} for kind, ops in comm.items()}


def same_calls_bytes(measured: Comm, formula: Comm) -> bool:
    """Every group and op in both, with equal calls and bytes."""
    return measured.keys() == formula.keys() and all(
        measured[g].keys() == formula[g].keys()
        and all(measured[g][op]["calls"] == formula[g][op]["calls"]
                and measured[g][op]["bytes"] == formula[g][op]["bytes"] for op in measured[g])
        for g in measured)
