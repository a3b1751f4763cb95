"""A context-parallel training run on the shared loop, measured, as one RunResult.

`context_parallel_run` trains fresh_model(config, seed) split over the cp group by one design,
keeps what parity checks compare (losses, parameters, first-step gradients, the first batch's
logits gathered over cp), then measures one more step under a CommLedger next to the formula
(accounting.py) and the attention work each rank did.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from journey_dist.comm import ledger_by_op
from journey_dist.config import GPTConfig, ParallelConfig
from journey_dist.data import TokenData, get_batch
from journey_dist.parallel.context.accounting import check_context_parallel, grad_sync, step_comm
from journey_dist.parallel.context.parallelize import ContextParallel, ContextParallelGPT
from journey_dist.parity import RunResult, fresh_model, measure_one_step, run_and_capture
from journey_dist.runtime import comm_device
from journey_dist.train import TrainConfig, make_optimizer


def expected_comm(model: ContextParallelGPT, cfg: TrainConfig, seq_len: int) -> dict[str, dict[str, int]]:
    """The formula for one step of a cp-only run on the cp group: {op: {calls, bytes}} (fp32)."""
    cp, config = model.cp, model.config
    out = step_comm(config, cp.design, cp.size, micro_batch=cfg.batch_size // cfg.grad_accum,
                    seq_len=seq_len, micro_steps=cfg.grad_accum, layers=len(model.blocks()))
    sync = grad_sync([p.numel() * p.element_size() for p in model.parameters()])
    row = out.setdefault("all_reduce", {"calls": 0, "bytes": 0})
    row["calls"] += sync["calls"]
    row["bytes"] += sync["bytes"]
    return out


def context_parallel_run(config: GPTConfig, data: TokenData, cfg: TrainConfig, *, design: str = "ring",
                         group: dist.ProcessGroup | None = None, seed: int = 0) -> RunResult:
    """Train fresh_model(config, seed) on the cp group (default: the world) with `design`; every
    rank holds every weight and 1/cp of every sequence (sequences of config.block_size tokens).

    RunResult: losses (the full-sequence mean, the same on every rank), params and first-step
    grads (full, the plain GPT's names), comm (one more step on the cp group) next to analytic,
    details: the first batch's logits at initialisation gathered over cp ("logits") and the
    attention work of this rank's forwards ("work": score entries and compute seconds per forward).
    """
    cp_size = dist.get_world_size(group)
    check_context_parallel(ParallelConfig(cp=cp_size, cp_design=design), config, config.block_size)
    cp = ContextParallel(group, design)
    model = ContextParallelGPT(fresh_model(config, seed), cp).to(comm_device(group))
    x, _ = get_batch(data.train, cfg.batch_size, config.block_size, 0, cfg.seed)
    with torch.no_grad():
        logits = cp.gather(model(cp.shard(x.to(comm_device(group)))))
    optimizer = make_optimizer(model, cfg)
    hooks = model.hooks()
    stats = cp.ring.stats
    stats.update(entries=0, seconds=0.0, forwards=0)
    run = run_and_capture(model, data, cfg, hooks, name=design, optimizer=optimizer)
    run.comm = ledger_by_op(measure_one_step(model, optimizer, data, cfg, hooks), group)
    run.analytic = expected_comm(model, cfg, config.block_size)
    forwards = max(1, stats["forwards"])  # attention forwards: one per layer per micro-step
    run.details = {"logits": logits, "work": {"entries_per_forward": stats["entries"] / forwards,
                                              "seconds_per_forward": stats["seconds"] / forwards}}
    run.model = model
    return run
