"""GPT-mini through Hugging Face accelerate: `Accelerator.prepare` wraps it in DDP.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file launch/accelerate/cpu_2proc.yaml \
        labs/06_zero_and_fsdp.py

(accelerate 1.15, measured: a MULTI_CPU config starts ONE process, so cpu_2proc.yaml asks for the
torchrun launcher; launch/accelerate/cpu_2proc.yaml says why.)

Under `accelerate launch` the ranks come from the launcher (torchrun-style env variables); the
process group is already up (runtime.init_distributed), and Accelerator joins it. On CPU it must
be told so (`cpu=True`, or ACCELERATE_USE_CPU=1): otherwise it sees no accelerator and runs
as one process. Communication is DDP's: all-reduce (mean) of the gradient buckets in backward.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from accelerate import Accelerator

from journey_dist.data import TokenData
from journey_dist.parallel.common import mean_over
from journey_dist.parity import RunResult, fresh_model, replicated_state_bytes, run_and_capture
from journey_dist.train import StepHooks, TrainConfig, make_optimizer


def under_accelerate() -> bool:
    """True when started by `accelerate launch` (it exports ACCELERATE_* settings)."""
    return any(key.startswith("ACCELERATE_") for key in os.environ)


def run_accelerate(config, data: TokenData, cfg: TrainConfig, *, seed: int = 0,
                   device: torch.device | None = None) -> RunResult:
    """Train a fresh GPT prepared by accelerate for cfg.steps. The run's details["processes"] is the
    number of processes Accelerator saw: the check that the launcher really made a multi-rank job."""
    cpu = device is None or device.type == "cpu"
    accelerator = Accelerator(cpu=cpu)
    model = fresh_model(config, seed, device)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, cfg))
    n = accelerator.num_processes
    if n != dist.get_world_size():
        raise RuntimeError(f"Accelerator sees {n} processes but the job has {dist.get_world_size()}; on CPU "
                           "set ACCELERATE_USE_CPU=1 (see launch/README.md)")
    hooks = StepHooks(reduce_loss=mean_over(), dp_rank=accelerator.process_index, dp_size=n)
    run = run_and_capture(model, data, cfg, hooks, name="accelerate (DDP)", first_grads=False,
                          optimizer=optimizer, block_size=config.block_size, device=accelerator.device)
    run.state_bytes = replicated_state_bytes(accelerator.unwrap_model(model),
                                             getattr(optimizer, "optimizer", optimizer))
    run.details["processes"] = n
    return run
