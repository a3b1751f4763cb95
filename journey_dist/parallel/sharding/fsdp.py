"""PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) on GPT-mini: ZeRO-3 in the library.

Every parameter becomes a DTensor sharded on dim 0 over the data-parallel mesh (padded to a
multiple of N per tensor). Each transformer block is one FSDP unit, the root (embeddings,
ln_f, the tied head) another:

    forward    all-gather a unit's parameters just before it runs, free them after
               (reshard_after_forward)
    backward   all-gather the unit's parameters again, compute its gradients, reduce-scatter
               them (mean over the group): each rank keeps only the gradient of its shard
    step       the optimizer (plain torch AdamW on DTensors) updates local shards only

So per rank: weights 4N/n, gradients 4N/n, AdamW moments 8N/n (+ per-tensor padding): ZeRO-3.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from journey_dist.comm import analytic, ledger_by_op
from journey_dist.parallel.common import mean_over
from journey_dist.parity import RunResult, fresh_model, measure_one_step, run_and_capture, storage_bytes
from journey_dist.train import StepHooks, TrainConfig, make_optimizer


def shard_model(model: nn.Module, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard each block, then the root, over a 1-D mesh of all ranks (CPU: gloo, else NCCL)."""
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def full_tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather DTensors into plain full tensors (an all-gather per DTensor; every rank must call)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in named.items()}


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's shards: weights, gradients (after backward) and AdamW moments."""
    moments = [local(v) for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    return {"params": storage_bytes(local(p) for p in model.parameters()),
            "grads": storage_bytes(local(p.grad) for p in model.parameters() if p.grad is not None),
            "optimizer": storage_bytes(moments)}


def unit_bytes(model: nn.Module, world: int) -> list[int]:
    """Bytes FSDP2 all-gathers per unit (root first, then each block): every parameter padded on
    dim 0 to a multiple of the group size, as fully_shard lays it out."""
    def padded(p: torch.Tensor) -> int:
        return -(-p.shape[0] // world) * world * (p.numel() // max(p.shape[0], 1)) * p.element_size()

    blocks = [sum(padded(p) for p in b.parameters()) for b in model.transformer.h]
    return [sum(padded(p) for p in model.parameters()) - sum(blocks), *blocks]


def run_fsdp2(config, data, cfg: TrainConfig, *, seed: int = 0,
              device: torch.device | None = None) -> RunResult:
    """Train a fresh GPT under fully_shard for cfg.steps (this rank's shard of each global
    batch), then one more step under a CommLedger; bytes measured after its backward."""
    world = dist.get_world_size()
    units = unit_bytes(fresh_model(config, seed), world)
    model = shard_model(fresh_model(config, seed, device))
    optimizer = make_optimizer(model, cfg)  # torch AdamW on DTensors: updates the local shards
    # FSDP2 reduce-scatters the gradients in backward: nothing to sync, the loss averaged over dp
    hooks = StepHooks(reduce_loss=mean_over(), dp_rank=dist.get_rank(), dp_size=world, whole_grads=False)
    def full_grads() -> dict[str, torch.Tensor]:  # the mean gradient, gathered from the shards
        return full_tensors({n: p.grad for n, p in model.named_parameters()})

    run = run_and_capture(model, data, cfg, hooks, name="fsdp2", optimizer=optimizer,
                          block_size=config.block_size, capture_grads=full_grads)
    run.params = full_tensors(dict(model.named_parameters()))
    state: dict[str, int] = {}

    def record_state() -> None:  # after backward: this rank's gradient shards exist
        state.update(local_state_bytes(model, optimizer))

    ledger = measure_one_step(model, optimizer, data, cfg, hooks.then_sync(record_state),
                              block_size=config.block_size)
    run.comm, run.state_bytes = ledger_by_op(ledger), state
    # each unit: all-gather before forward and again before backward, reduce-scatter its grads
    run.buffers = {"all_gather": units * 2, "reduce_scatter": units}
    run.analytic = {op: analytic(op, b, world) for op, b in run.buffers.items()}
    return run
