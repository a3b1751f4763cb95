"""The single-process reference every parallel scheme is checked against.

A parallel run is correct when it ends where one process ends after training the same fresh
model on the same global batches: same loss every step, same gradients, same parameters.
This module is that one process, plus the helpers parity checks share. It uses the shared
train loop (train imports nothing from parallel/, so there is no cycle).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from journey_dist.config import GPTConfig
from journey_dist.data import TokenData
from journey_dist.model import GPT
from journey_dist.train import TrainConfig, train


def fresh_model(config: GPTConfig, seed: int = 0, device: torch.device | None = None) -> GPT:
    """A GPT whose initial weights depend only on `seed` (identical on every rank and run)."""
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's RNG stream
        torch.manual_seed(seed)
        model = GPT(config)
    return model.to(device) if device is not None else model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP-style `.module` wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def named_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name, detached; unwraps DDP-style `.module` wrappers."""
    return {name: p.detach() for name, p in unwrap(model).named_parameters()}


def max_abs_diff(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], *,
                 subset: bool = False) -> float:
    """Largest |ours - ref| over all tensors.

    By default both must hold the same names. With `subset`, `ours` may hold part of the
    model (a pipeline stage); its `lm_head.weight`, a copy of the tied embedding on the last
    stage, is compared with the reference's `transformer.wte.weight`.
    """
    if not subset and ours.keys() != ref.keys():
        raise KeyError(f"different tensors: {sorted(ours.keys() ^ ref.keys())}")
    worst = 0.0
    for name, t in ours.items():
        key = "transformer.wte.weight" if name == "lm_head.weight" and name not in ref else name
        worst = max(worst, (t.float().cpu() - ref[key].float().cpu()).abs().max().item())
    return worst


@dataclass
class RunResult:
    losses: list[float]  # loss of every step, mean over the global batch
    params: dict[str, torch.Tensor]  # after the last step
    grads: dict[str, torch.Tensor] | None  # first step's gradients after any sync, before clipping
    val_loss: float | None = None
    seconds: float = 0.0  # wall time of the training steps


def run_and_capture(module: nn.Module, data: TokenData, cfg: TrainConfig, *, first_grads: bool = True,
                    **train_kwargs) -> RunResult:
    """Train `module` with the shared loop, logging every step; keep what parity checks compare.

    The first step's gradients are captured in the `sync_grads` slot, after any parallel
    sync (which runs first) and before clipping and the optimizer step.
    """
    model = unwrap(module)
    grads: dict[str, torch.Tensor] = {}
    sync = train_kwargs.pop("sync_grads", None)

    def sync_and_capture() -> None:
        if sync is not None:
            sync()
        if first_grads and not grads:  # AdamW ignores a constant grad scale: compare grads too
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.grad is not None})

    t0 = time.perf_counter()
    history = train(module, data, replace(cfg, log_every=1), verbose=False,
                    sync_grads=sync_and_capture, **train_kwargs)
    seconds = time.perf_counter() - t0
    return RunResult([row["loss"] for row in history.steps],
                     {k: v.clone() for k, v in named_params(model).items()},
                     grads if first_grads else None, history.val_loss, seconds)


def reference_run(config: GPTConfig, data: TokenData, cfg: TrainConfig, *, seed: int = 0,
                  first_grads: bool = False, device: torch.device | None = None) -> RunResult:
    """Train fresh_model(config, seed) for cfg.steps on the global batches in one process."""
    return run_and_capture(fresh_model(config, seed, device), data, cfg, first_grads=first_grads)
