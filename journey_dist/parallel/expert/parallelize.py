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

import torch
import torch.distributed as dist
import torch.nn as nn

from journey_dist.comm import CommLedger
from journey_dist.config import GPTConfig, ParallelConfig
from journey_dist.data import TokenData, shard
from journey_dist.mesh import Mesh, all_groups, build_mesh
from journey_dist.model import MoE
from journey_dist.parallel.common import (
    ClipFn,
    all_reduce_flat,
    clip_by_total_norm,
    mean_over,
    squared_sum,
    tp_duplicate,
)
from journey_dist.parallel.expert.accounting import (
    RouterLog,
    comm_by_group,
    expected_collectives,
    group_names,
    same_calls_bytes,
)
from journey_dist.parallel.expert.layer import (
    ExpertGroups,
    ExpertParallelMoE,
    build_expert_groups,
    moe_layers,
)
from journey_dist.parallel.tensor.parallelize import gather_tensors, parallelize
from journey_dist.parallel.tensor.rng import model_parallel_seed
from journey_dist.parity import RunResult, fresh_model, run_and_capture, storage_bytes
from journey_dist.runtime import comm_device
from journey_dist.train import StepHooks, StepResult, TrainConfig, make_optimizer, train_step


def expert_groups_of(mesh: Mesh) -> ExpertGroups:
    """The ep, edp (and dp) groups of every data-parallel group of the mesh (collective)."""
    return build_expert_groups(all_groups("dp", mesh.pcfg), mesh.pcfg.ep)


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
        all_reduce_flat(grads, group)
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
    matches = torch.tensor(float(all(same_calls_bytes(s["comm"], s["formula"]) for s in steps)),
                           device=device)
    dist.all_reduce(matches, op=dist.ReduceOp.MIN)
    run.details = {"routing": log.global_steps(groups.dp, config.n_layer), "steps": steps,
                   "ledger_matches": bool(matches.item()), "groups": sorted(names.values())}
    run.model = model
    return run


def _moment_bytes(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Bytes of AdamW's two moments for `params` (the 4-byte step counters left out, as
    parity.replicated_state_bytes does)."""
    return storage_bytes(v for p in params for k, v in optimizer.state.get(p, {}).items() if k != "step")
