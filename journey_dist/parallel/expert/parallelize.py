"""Expert parallel for a mixture-of-experts GPT: experts split over ep ranks inside data parallel,
the dense parts (attention, embeddings, router) data parallel, optionally tensor parallel over tp.

    groups = expert_groups_of(build_mesh(ParallelConfig(dp=4, ep=2)))
    model = expert_parallel(fresh_model(config), groups)       # or a TensorParallelGPT (tp > 1)
    hooks = expert_parallel_hooks(model, groups)

A step equals one process training the whole model on the whole global batch (float rounding
apart; tests: 1e-5 in fp32), with and without token dropping, because (layer.py, moe.py) the
capacity and the load-balancing loss are taken over the global batch, tokens are queued at an
expert in global token order, and the gradients are reduced as below. With gradient accumulation
the "batch" of a forward is micro-step i of every dp rank together: the one process it equals
takes those rows as its micro-batch i (not reference_run's rows i·B/m..: capacity and the balance
loss depend on which tokens share a forward).

After backward (`sync_expert_parallel_grads`): each rank's gradient is that of its own mean loss,
D = dp times the one-process gradient of its tokens. Dense gradients: all-reduce (sum) over dp, /D.
An expert's gradient on its owner already sums the tokens of its ep group's ranks: all-reduce (sum)
over the edp group (the owners of the same experts in the other ep groups), /D. The clip norm
sums the dense squares once and the experts' over ep (each ep rank holds different experts).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from journey_dist.comm import CommLedger
from journey_dist.config import GPTConfig, ParallelConfig
from journey_dist.data import TokenData, shard
from journey_dist.mesh import Mesh, all_groups, build_mesh
from journey_dist.model import MoE
from journey_dist.moe import imbalance
from journey_dist.parallel.common import ClipFn, clip_by_total_norm, mean_over, squared_sum, tp_duplicate
from journey_dist.parallel.expert.layer import ExpertGroups, ExpertParallelMoE, build_expert_groups
from journey_dist.parallel.tensor.parallelize import gather_tensors, parallelize
from journey_dist.parallel.tensor.rng import model_parallel_seed
from journey_dist.parity import RunResult, fresh_model, run_and_capture, storage_bytes
from journey_dist.runtime import comm_device
from journey_dist.train import StepHooks, StepResult, TrainConfig, make_optimizer, train_step


def expert_groups_of(mesh: Mesh) -> ExpertGroups:
    """The ep, edp (and dp) groups of every data-parallel group of the mesh (collective)."""
    return build_expert_groups(all_groups("dp", mesh.pcfg), mesh.pcfg.ep)


def moe_layers(model: nn.Module) -> list[MoE]:
    """The model's MoE layers in block order."""
    return [block.mlp for block in model.transformer.h if isinstance(block.mlp, MoE)]


def expert_parallel(model: nn.Module, groups: ExpertGroups) -> nn.Module:
    """Replace, in place, every MoE of `model` (a GPT, or a TensorParallelGPT whose blocks kept their
    MoE whole) by an ExpertParallelMoE holding this rank's experts; return the model."""
    for block in model.transformer.h:
        if isinstance(block.mlp, MoE):
            block.mlp = ExpertParallelMoE(block.mlp, groups)
    return model


def is_expert(p: torch.Tensor) -> bool:
    return getattr(p, "expert_parallel", False)


def _all_reduce_mean(grads: list[torch.Tensor], group: dist.ProcessGroup, size: int, divide_by: int) -> None:
    """Sum the gradients over `group` (one flat all-reduce; none on a group of one) and divide by
    `divide_by` (the data-parallel size: the mean over the global batch)."""
    if not grads:
        return
    if size > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    for g in grads:
        g.div_(divide_by)


def sync_expert_parallel_grads(model: nn.Module, groups: ExpertGroups) -> None:
    """After backward. Forward: nothing. Backward side: one all-reduce (sum) of every dense gradient
    over dp and one of every local expert gradient over edp, both then divided by dp."""
    params = [p for p in model.parameters() if p.grad is not None]
    _all_reduce_mean([p.grad for p in params if not is_expert(p)], groups.dp, groups.dp_size, groups.dp_size)
    _all_reduce_mean([p.grad for p in params if is_expert(p)], groups.edp, groups.edp_size, groups.dp_size)


def expert_parallel_clip(groups: ExpertGroups, tp_group: dist.ProcessGroup | None = None) -> ClipFn:
    """StepHooks.clip: the whole model's gradient norm, as one process computes it.

    Squares of the local experts' gradients are summed over ep (one fp32 scalar all-reduce); with
    tp, the dense shards' squares (replicated tensors and the experts counted on tp rank 0 only) are
    summed over tp (one more). dp and edp replicas hold equal gradients after the sync: not summed.
    """
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    duplicate = tp_duplicate(tp_rank)

    def clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        grads = [p for p in params if p.grad is not None]
        experts = squared_sum(p.grad for p in grads if is_expert(p))
        if groups.ep_size > 1:
            dist.all_reduce(experts, group=groups.ep)
        dense = squared_sum(p.grad for p in grads if not is_expert(p) and not duplicate(p))
        total = dense + (experts if tp_rank == 0 else torch.zeros_like(experts))
        if tp_group is not None:
            dist.all_reduce(total, group=tp_group)
        norm = total.sqrt()
        clip_by_total_norm([p.grad for p in grads], max_norm, norm)
        return norm
    return clip


def expert_parallel_hooks(model: nn.Module, groups: ExpertGroups,
                          tp_group: dist.ProcessGroup | None = None) -> StepHooks:
    """The loop's hooks: this rank's dp slice of every batch, the gradient sync and clip above, the
    logged loss averaged over dp. Gradients of experts live on their owners only: whole_grads=False
    (fp16's loss scaler is refused; use bf16)."""
    return StepHooks(sync_grads=lambda: sync_expert_parallel_grads(model, groups),
                     clip=expert_parallel_clip(groups, tp_group), reduce_loss=mean_over(groups.dp),
                     dp_rank=groups.dp_rank, dp_size=groups.dp_size, whole_grads=False)


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


@torch.no_grad()
def router_parity(model: nn.Module, reference: nn.Module, x: torch.Tensor,
                  groups: ExpertGroups) -> dict[str, float]:
    """This rank's dp shard of the global batch `x` through `model` (expert parallel) and the whole
    batch through `reference` (one process, the same weights), in eval mode: the worst |router logit
    difference| over every layer and rank, and how many (token, layer) top-k choices differ in all.
    Collective: the forward's own collectives, then one all-reduce (MAX) and one (SUM) over the world."""
    mine: list[torch.Tensor] = []
    theirs: list[torch.Tensor] = []

    def keep(into: list[torch.Tensor]):
        return lambda _module, _inputs, out: into.append(out)

    handles = [layer.router.register_forward_hook(keep(into))
               for m, into in ((model, mine), (reference, theirs)) for layer in moe_layers(m)]
    modes = model.training, reference.training
    model.eval()
    reference.eval()
    try:
        reference(x)
        model(shard(x, groups.dp_rank, groups.dp_size))
    finally:
        for h in handles:
            h.remove()
        model.train(modes[0])
        reference.train(modes[1])
    k, worst, differ = moe_layers(reference)[0].top_k, 0.0, 0
    for ours, full in zip(mine, theirs, strict=True):
        rows = full.view(groups.dp_size, -1, full.size(-1))[groups.dp_rank]  # this shard's tokens
        worst = max(worst, (ours.float() - rows.float()).abs().max().item())
        same = ours.topk(k).indices.sort(-1).values == rows.topk(k).indices.sort(-1).values
        differ += int((~same.all(-1)).sum())
    out = torch.tensor([worst, float(differ)], device=comm_device(groups.dp))
    dist.all_reduce(out[:1], op=dist.ReduceOp.MAX)
    dist.all_reduce(out[1:], op=dist.ReduceOp.SUM)
    return {"router_logits": out[0].item(), "choices_differ": int(out[1].item())}


# ----------------------------------------------------------------------------- a training run


def run_expert_parallel(config: GPTConfig, data: TokenData, cfg: TrainConfig, pcfg: ParallelConfig, *,
                        seed: int = 0) -> RunResult:
    """Train fresh_model(config, seed) with dp x tp ranks, experts split over ep inside dp, with the
    shared loop, every training step inside a CommLedger.

    The RunResult holds: losses (the dp mean, every step); params and first-step grads of this rank
    (dense ones full, tp shards gathered; its own experts) under the plain GPT's names; state_bytes
    {"params", "optimizer", "expert_params", "expert_optimizer"} of this rank; comm: the last step's
    collectives by group name (group_names), analytic: expected_collectives for that step's routing;
    details: "routing" (per step, the whole batch's: RouterLog.global_steps), "steps" (per step, this
    rank's measured collectives and their formula), "ledger_matches" (measured == formula for every
    collective of every step on every rank), "groups"; the model.
    """
    pcfg.validate(config, dist.get_world_size(), cfg.batch_size)
    device = comm_device()
    mesh = build_mesh(pcfg, device.type)
    groups = expert_groups_of(mesh)
    tp_group = mesh.tp_group if pcfg.tp > 1 else None
    model = fresh_model(config, seed)
    if tp_group is not None:
        model = parallelize(model, tp_group)
        model_parallel_seed(cfg.seed, mesh.tp_rank)
    model = expert_parallel(model, groups).to(device)
    optimizer = make_optimizer(model, cfg)
    log = RouterLog(model)
    ledgers: list[CommLedger] = []

    def step_in_ledger(*args, **kwargs) -> StepResult:
        with CommLedger() as ledger:
            result = train_step(*args, **kwargs)
        ledgers.append(ledger)
        return result

    hooks = expert_parallel_hooks(model, groups, tp_group)
    hooks = hooks.then_sync(log.end_step).with_(step_fn=step_in_ledger)
    name = f"dp{pcfg.dp} ep{pcfg.ep}" + (f" tp{pcfg.tp}" if pcfg.tp > 1 else "")
    run = run_and_capture(model, data, cfg, hooks, name=name, optimizer=optimizer)
    log.close()
    if tp_group is not None:
        run.params, run.grads = gather_tensors(model, run.params), gather_tensors(model, run.grads)
    experts = [p for p in model.parameters() if is_expert(p)]
    run.state_bytes = {"params": storage_bytes(model.parameters()),
                       "optimizer": _moment_bytes(optimizer, model.parameters()),
                       "expert_params": storage_bytes(experts),
                       "expert_optimizer": _moment_bytes(optimizer, experts)}
    names = group_names(groups, tp_group)
    by_kind = {kind: name for name in names.values() for kind in name.split("=")}
    sizes = {"expert_numel": sum(p.numel() for p in experts),
             "dense_numel": sum(p.numel() for p in model.parameters() if not is_expert(p))}
    steps = [{"comm": comm_by_group(ledger, names),
              "formula": expected_collectives(config, pcfg, cfg, forwards, names=by_kind, **sizes)}
             for ledger, forwards in zip(ledgers, log.steps, strict=True)]
    run.comm, run.analytic = steps[-1]["comm"], steps[-1]["formula"]
    matches = torch.tensor(float(all(_same_calls_bytes(s["comm"], s["formula"]) for s in steps)),
                           device=device)
    dist.all_reduce(matches, op=dist.ReduceOp.MIN)
    run.details = {"routing": log.global_steps(groups.dp, config.n_layer), "steps": steps,
                   "ledger_matches": bool(matches.item()), "groups": sorted(names.values())}
    run.model = model
    return run


def _same_calls_bytes(measured: Comm, formula: Comm) -> bool:
    """Every group and op in both, with equal calls and bytes."""
    return measured.keys() == formula.keys() and all(
        measured[g].keys() == formula[g].keys()
        and all(measured[g][op]["calls"] == formula[g][op]["calls"]
                and measured[g][op]["bytes"] == formula[g][op]["bytes"] for op in measured[g])
        for g in measured)


def _moment_bytes(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Bytes of AdamW's two moments for `params` (the 4-byte step counters left out, as
    parity.replicated_state_bytes does)."""
    return storage_bytes(v for p in params for k, v in optimizer.state.get(p, {}).items() if k != "step")
