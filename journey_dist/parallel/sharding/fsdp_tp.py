"""FSDP2 + tensor parallel on one 2-D DeviceMesh, the way torchtitan composes them.

    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    model: the DTensor TP plan (parallel/tensor/dtensor.py) on mesh["tp"], then fully_shard of every
           block and of the root on mesh["dp"]

A parameter the plan splits ends as one DTensor on the 2-D mesh, placements (dp's, tp's): tp
splits first (a column-parallel weight is Shard(0) over tp, a row-parallel one Shard(1)), then
FSDP2 shards what a tp rank holds on dim 0 again over dp (shown as _StridedShard(0) when both split
dim 0). What the plan leaves whole (LayerNorms, wpe) is a 1-D DTensor on the dp mesh. Per rank,
in fp32 AdamW: weights, gradients and moments are each 1/(dp*tp) of the split tensors and 1/dp of
what tp replicates: ZeRO-3 of each tp shard (memory.estimate with dp, tp and zero=3).

Communication of one step:
    tp group   the plan's activations (forward: all-reduce after each row-parallel layer; backward:
               the column-parallel input gradients), loss_parallel's three scalar all-reduces
    dp group   FSDP2: all-gather each unit's tp shard before forward and before backward,
               reduce-scatter its gradients (mean over dp) after backward
HSDP (`replicate` > 1): the dp dimension is itself 2-D, ("dp_replicate", "dp_shard"): fully_shard on
that pair replicates over the first and shards over the second; with tp that is a 3-D mesh.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from journey_dist.comm import CommLedger, analytic, ledger_by_op, ring_factor
from journey_dist.config import ConfigError, GPTConfig
from journey_dist.data import TokenData
from journey_dist.parallel.common import mean_over
from journey_dist.parallel.sharding.fsdp import local
from journey_dist.parallel.tensor.dtensor import (
    dtensor_analytic_collectives,
    dtensor_hooks,
    gather_dtensor_tensors,
    parallelize_with_dtensor,
)
from journey_dist.parity import RunResult, fresh_model, measure_one_step, run_and_capture, storage_bytes
from journey_dist.train import StepHooks, TrainConfig, make_optimizer


def check_layout(world: int, dp: int, tp: int, replicate: int = 1) -> None:
    """Raise ConfigError unless dp x tp (dp = replicate x shard under HSDP) fills the world."""
    if dp * tp != world:
        raise ConfigError(f"dp={dp} x tp={tp} = {dp * tp} ranks, but the world has {world}; "
                          f"pick dp and tp with dp*tp = {world}")
    if replicate < 1 or dp % replicate:
        raise ConfigError(f"HSDP replicate={replicate} must divide dp={dp}; use replicate in "
                          f"{[r for r in range(1, dp + 1) if dp % r == 0]}")


def make_mesh(device_type: str, dp: int, tp: int, replicate: int = 1) -> DeviceMesh:
    """The (dp, tp) mesh, tp fastest (adjacent ranks share a tp group, as in mesh.py); with
    replicate > 1 the dp dimension is split as ("dp_replicate", "dp_shard") for HSDP."""
    check_layout(dist.get_world_size(), dp, tp, replicate)
    if replicate == 1:
        return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return init_device_mesh(device_type, (replicate, dp // replicate, tp),
                            mesh_dim_names=("dp_replicate", "dp_shard", "tp"))


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The sub-mesh fully_shard runs on: "dp" (1-D, FSDP) or ("dp_replicate", "dp_shard") (HSDP)."""
    names = mesh.mesh_dim_names or ()
    return mesh["dp"] if "dp" in names else mesh["dp_replicate", "dp_shard"]


def dp_coords(mesh: DeviceMesh) -> tuple[int, int]:
    """(this rank's data-parallel index, dp size) over the whole dp dimension (HSDP: both parts)."""
    sub = dp_mesh(mesh)
    if sub.ndim == 1:
        return sub.get_local_rank(), sub.size()
    rep, shard = sub.get_local_rank(0), sub.get_local_rank(1)
    return rep * sub.size(1) + shard, sub.size()


def shard_tp_model(model: nn.Module, mesh: DeviceMesh, *, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard each block, then the root, over the dp sub-mesh of a model already split by tp
    (parallelize_with_dtensor on mesh["tp"] first, as torchtitan orders them: TP, then FSDP)."""
    shard_over = dp_mesh(mesh)
    for block in model.transformer.h:
        fully_shard(block, mesh=shard_over, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=shard_over, reshard_after_forward=reshard_after_forward)
    return model


def fsdp_tp_hooks(mesh: DeviceMesh) -> StepHooks:
    """The loop's hooks: the DTensor TP loss and step (loss_parallel), the global-norm clip (DTensor
    sums squares over the whole 2-D mesh), this rank's dp slice of every batch, the logged loss
    averaged over dp. No sync_grads: FSDP2 reduce-scatters the gradients inside backward."""
    rank, size = dp_coords(mesh)
    sub = dp_mesh(mesh)
    groups = [sub.get_group(i) for i in range(sub.ndim)]

    def reduce_loss(loss: torch.Tensor) -> torch.Tensor:  # mean over dp (HSDP: over both of its dims)
        for group in groups:
            loss = mean_over(group)(loss)
        return loss

    return dtensor_hooks().with_(reduce_loss=reduce_loss, dp_rank=rank, dp_size=size, whole_grads=False)


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's local shards of weights, gradients (after backward) and AdamW moments."""
    moments = [local(v) for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    return {"params": storage_bytes(local(p) for p in model.parameters()),
            "grads": storage_bytes(local(p.grad) for p in model.parameters() if p.grad is not None),
            "optimizer": storage_bytes(moments)}


def tp_unit_bytes(model: nn.Module, dp: int) -> list[int]:
    """Bytes FSDP2 all-gathers per unit (root first, then each block) on a model already split by
    tp: each parameter's tp-local tensor, dim 0 padded to a multiple of dp as fully_shard lays it
    out. Read before fully_shard, from the tp shards alone (FSDP's own bookkeeping is not used)."""
    def padded(p: torch.Tensor) -> int:
        t = local(p)
        return -(-t.shape[0] // dp) * dp * (t.numel() // max(t.shape[0], 1)) * t.element_size()

    blocks = [sum(padded(p) for p in b.parameters()) for b in model.transformer.h]
    return [sum(padded(p) for p in model.parameters()) - sum(blocks), *blocks]


def run_fsdp_tp(config: GPTConfig, data: TokenData, cfg: TrainConfig, *, dp: int, tp: int,
                replicate: int = 1, seed: int = 0) -> RunResult:
    """Train a fresh GPT on the 2-D (dp, tp) mesh for cfg.steps, then one more step under a
    CommLedger; params and first-step grads gathered to full plain tensors; state_bytes: this rank's
    local shards after that step's backward (weights, gradients, AdamW moments)."""
    cuda = torch.cuda.is_available() and dist.get_backend() == "nccl"
    mesh = make_mesh("cuda" if cuda else "cpu", dp, tp, replicate)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
    model = parallelize_with_dtensor(fresh_model(config, seed, device), mesh["tp"])
    shard_size = dp_mesh(mesh).size(dp_mesh(mesh).ndim - 1)  # HSDP: shards over dp_shard only
    units = tp_unit_bytes(model, shard_size)
    tokens = cfg.batch_size // (dp * cfg.grad_accum) * config.block_size  # one micro-step on this rank
    if tp > 1:
        tp_comm = dtensor_analytic_collectives(model, tokens, grad_clip=cfg.grad_clip > 0)
    else:  # a 1-rank tp mesh: DTensor skips every collective except loss_parallel's three per micro-step
        calls = 3 * cfg.grad_accum
        tp_comm = {"all_reduce": {"calls": calls, "bytes": calls * tokens * 4}}
    shard_tp_model(model, mesh)
    optimizer = make_optimizer(model, cfg)  # torch AdamW on 2-D DTensors: updates the local shards
    hooks = fsdp_tp_hooks(mesh)

    def full_grads() -> dict[str, torch.Tensor]:
        return gather_dtensor_tensors(model, {n: p.grad for n, p in model.named_parameters()})

    run = run_and_capture(model, data, cfg, hooks, name="fsdp2 x tp", optimizer=optimizer,
                          block_size=config.block_size, capture_grads=full_grads)
    run.params = gather_dtensor_tensors(model, run.params)
    state: dict[str, int] = {}
    ledger = measure_one_step(model, optimizer, data, cfg,
                              hooks.then_sync(lambda: state.update(local_state_bytes(model, optimizer))),
                              block_size=config.block_size)
    run.state_bytes = state
    run.comm = {"tp": ledger_on(ledger, mesh["tp"]), "dp": ledger_on(ledger, dp_mesh(mesh))}
    # each unit: all-gather (over the shard group) before forward and again before backward, then
    # reduce-scatter its gradients; HSDP adds an all-reduce of each gradient shard over dp_replicate
    run.buffers = {"all_gather": units * 2, "reduce_scatter": units}
    dp_comm = {op: analytic(op, b, shard_size) for op, b in run.buffers.items()}
    # the clip: one scalar all-reduce per parameter (all are Shard(0) over dp_shard), DTensor's norm
    clips = len(list(model.parameters())) if cfg.grad_clip > 0 else 0
    replicas = [b // shard_size for b in units] if replicate > 1 else []  # HSDP: each unit's grad shard
    dp_comm["all_reduce"] = {"calls": clips + len(replicas), "bytes": 4 * clips + sum(replicas),
                             "wire_bytes": ring_factor("all_reduce", shard_size) * 4 * clips
                             + ring_factor("all_reduce", replicate) * sum(replicas)}
    run.analytic = {"dp": dp_comm, "tp": tp_comm}
    run.details = {"mesh": mesh.mesh.tolist(), "dims": list(mesh.mesh_dim_names or ()),
                   "placements": {n: [str(pl) for pl in p.placements] for n, p in model.named_parameters()
                                  if isinstance(p, DTensor)}}
    run.model = model
    return run


def ledger_on(ledger: CommLedger, mesh: DeviceMesh) -> dict:
    """{op: {calls, bytes, wire_bytes}} of the collectives issued on this sub-mesh's groups."""
    groups = [mesh.get_group(i) for i in range(mesh.ndim)]
    out: dict = {}
    for g in groups:
        for op, row in ledger_by_op(ledger, g).items():
            acc = out.setdefault(op, {k: 0 for k in row})
            for k, v in row.items():
                acc[k] += v
    return out
