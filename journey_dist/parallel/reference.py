"""The single-process reference every parallel scheme is checked against.

A parallel run is correct when it ends where one process ends after training the same fresh
model on the same global batches: same loss every step, same gradients, same parameters.
This module is that one process, plus the helpers parity checks share. It uses the shared
train loop (train imports nothing from parallel/, so there is no cycle).
"""

from __future__ import annotations

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


def named_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name, detached; unwraps DDP-style `.module` wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return {name: p.detach() for name, p in model.named_parameters()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| over all tensors; the two must have the same names and shapes."""
    if a.keys() != b.keys():
        raise KeyError(f"different tensors: {sorted(a.keys() ^ b.keys())}")
    return max((a[k].float().cpu() - b[k].float().cpu()).abs().max().item() for k in a)


@dataclass
class ReferenceRun:
    losses: list[float]  # loss of every step, mean over the global batch
    params: dict[str, torch.Tensor]  # after the last step
    grads: dict[str, torch.Tensor] | None  # first step's gradients (before clipping), if asked


def reference_run(config: GPTConfig, data: TokenData, cfg: TrainConfig, *, seed: int = 0,
                  first_grads: bool = False, device: torch.device | None = None) -> ReferenceRun:
    """Train fresh_model(config, seed) for cfg.steps on the global batches in one process."""
    model = fresh_model(config, seed, device)
    grads: dict[str, torch.Tensor] = {}

    def capture() -> None:  # the sync_grads slot runs after backward, before clip and step
        if first_grads and not grads:
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    history = train(model, data, replace(cfg, log_every=1), verbose=False, sync_grads=capture)
    return ReferenceRun([row["loss"] for row in history.steps],
                        {k: v.clone() for k, v in named_params(model).items()},
                        grads if first_grads else None)
