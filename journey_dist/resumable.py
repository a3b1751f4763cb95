"""A training run that checkpoints, can be killed on purpose, and resumes where it stopped.

Lab 10 and the reliability tests use this one function, so what the lab shows is what the tests
check: a run killed after the checkpoint of step k and resumed ends with the parameters of a run
that was never interrupted (bitwise on CPU), one process or data parallel.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from journey_dist.checkpoint import Checkpointer, resume
from journey_dist.config import GPTConfig
from journey_dist.data import TokenData
from journey_dist.parallel.data.replicas import make_data_parallel
from journey_dist.parity import fresh_model, named_params
from journey_dist.train import TrainConfig, make_optimizer, train


class SimulatedCrash(Exception):
    """Raised (crash="raise") instead of killing the process, for in-process demos."""


@dataclass
class ResumableRun:
    params: dict[str, torch.Tensor]
    losses: list[float]  # of the steps this run executed
    start_step: int  # 0, or the step resumed from
    saved: dict[str, list[int]] = field(default_factory=dict)  # directory -> steps saved
    checkpoint_seconds: float = 0.0
    seconds: float = 0.0


def run_resumable(config: GPTConfig, data: TokenData, cfg: TrainConfig, *,
                  file_dir: str | Path | None = None, dcp_dir: str | Path | None = None,
                  resume_from: str | Path | None = None, every: int = 5, keep: int = 3,
                  crash_after: int | None = None, crash_ranks: tuple[int, ...] | None = None,
                  crash: str = "exit", exit_code: int = 1, dp: bool | None = None,
                  seed: int = 0, rng_seed: int = 1234) -> ResumableRun:
    """Train fresh_model(config, seed) for cfg.steps with the shared loop.

    file_dir / dcp_dir: save a one-file checkpoint (rank 0 writes) / DCP shards (every rank
    writes) after every `every` steps and the last. resume_from: first load the newest valid
    checkpoint there. crash_after=k: after the checkpoints of step k, the ranks in `crash_ranks`
    (default all) die with os._exit(exit_code) (crash="exit") or raise SimulatedCrash.
    dp (default: a process group of > 1 rank exists): wrap in DDP, each rank its batch shard.
    """
    if dp is None:
        dp = dist.is_initialized() and dist.get_world_size() > 1
    torch.manual_seed(rng_seed)  # the stream dropout draws from; resume restores its state
    model = fresh_model(config, seed)
    if dist.is_initialized() and dist.get_backend() == "nccl":
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    wrapper = make_data_parallel("ddp", model) if dp else None
    optimizer = make_optimizer(model, cfg)
    start_step = resume(resume_from, model, optimizer) if resume_from else 0
    savers = [Checkpointer(d, every, cfg.steps, keep=keep, sharded=d == dcp_dir)
              for d in (file_dir, dcp_dir) if d]
    rank = dist.get_rank() if dist.is_initialized() else 0

    def on_step(step: int, module, opt) -> None:
        for saver in savers:
            saver(step, module, opt)
        if crash_after is not None and step + 1 == crash_after and (
                crash_ranks is None or rank in crash_ranks):
            if crash == "exit":
                os._exit(exit_code)  # no cleanup, no flush: as a kill would leave things
            raise SimulatedCrash(f"rank {rank} crashed after step {crash_after}")

    t0 = time.perf_counter()
    history = train(wrapper.module if wrapper else model, data, cfg, wrapper.hooks() if wrapper else None,
                    optimizer=optimizer, verbose=False, block_size=config.block_size, start_step=start_step,
                    on_step=on_step)
    return ResumableRun({k: v.detach().cpu().clone() for k, v in named_params(model).items()},
                        [row["loss"] for row in history.steps], start_step,
                        {str(s.directory): s.saved for s in savers},
                        sum(s.seconds for s in savers), time.perf_counter() - t0)


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that differ in any bit (empty: identical)."""
    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    return [k for k in a if not torch.equal(a[k].cpu(), b[k].cpu())]
