"""ZeRO-1 from scratch: AdamW whose state is sharded over the data-parallel ranks.

Plain data parallel keeps the full AdamW state (two fp32 moments, 8 bytes per parameter) on
every rank. ZeRO stage 1 (Rajbhandari et al. 2020) keeps it once over the group: rank r owns a
contiguous 1/N slice of one flat fp32 buffer of all parameters, and only that slice's moments.

    layout     every trainable parameter is a view into one flat fp32 buffer (and its .grad into a
               second one), groups one after another (decay, then no-decay), padded with zeros to a
               multiple of N so every rank owns exactly `shard` elements: [r*shard, (r+1)*shard).
    backward   gradients accumulate into the flat gradient buffer (no communication).
    step       reduce-scatter(SUM) the flat gradients, / N = each rank gets the mean gradient of
               its own slice; clip with a norm summed over the slices (one scalar all-reduce);
               AdamW on the slice (torch.optim.AdamW's single-tensor math, element for element,
               with each parameter group's lr and weight decay); all-gather the updated slices
               into the flat parameter buffer, so every rank again holds the whole model.

Per step a rank hands reduce-scatter and all-gather one flat buffer each (4·N_padded bytes):
the same (n-1)/n + (n-1)/n on a ring as the all-reduce of plain data parallel (2(n-1)/n).
Memory per rank: weights 4N, gradients 4N, optimizer state 8N/n (+ the padding), which is
memory.estimate.model_state_bytes(N, "fp32", zero=1, dp=n).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from journey_dist.comm import analytic, ledger_by_op
from journey_dist.parallel.common import (
    all_gather_single,
    clip_by_total_norm,
    mean_over,
    reduce_scatter_single,
    total_norm,
)
from journey_dist.parity import RunResult, fresh_model, measure_one_step, run_and_capture
from journey_dist.train import StepHooks, TrainConfig


@dataclass(frozen=True)
class GroupSpan:
    """Where one parameter group lives in the flat buffer, and the part of it this rank owns."""

    start: int  # in the flat buffer
    end: int
    own_start: int  # intersection with this rank's shard, in shard coordinates (may be empty)
    own_end: int


def padded_numel(numel: int, world: int) -> int:
    """numel rounded up to a multiple of `world`, so every rank owns an equal slice."""
    return -(-numel // world) * world


def shard_range(numel: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's slice of a flat buffer of `numel` elements, padded to `world`."""
    shard = padded_numel(numel, world) // world
    return rank * shard, (rank + 1) * shard


def reduce_scatter_mean(shard_out: torch.Tensor, flat: torch.Tensor,
                        group: dist.ProcessGroup | None = None) -> None:
    """shard_out = the group mean of this rank's slice of `flat`.

    Communication: reduce-scatter(SUM) of `flat` (each rank receives its slice summed over the
    group), then a local / N (gloo has no AVG). No backward: it runs on gradients, outside autograd.
    """
    reduce_scatter_single(shard_out, flat, group=group)
    shard_out.div_(dist.get_world_size(group))


def all_gather_flat(flat_out: torch.Tensor, shard: torch.Tensor,
                    group: dist.ProcessGroup | None = None) -> None:
    """flat_out = every rank's `shard`, concatenated in rank order.

    Communication: all-gather of the shards (each rank receives the other N-1 slices).
    No backward: it runs on parameters after the optimizer step, outside autograd.
    """
    all_gather_single(flat_out, shard, group=group)


class ZeroAdamW(torch.optim.Optimizer):
    """AdamW with ZeRO-1 sharded state over a data-parallel group (see the module docstring).

    `param_groups` like torch.optim.AdamW's (e.g. make_optimizer's decay / no-decay split); the
    loop may change group["lr"] between steps. Use `hooks()` with train(): sync_grads
    runs the reduce-scatter, clip_fn clips the sharded gradient by the global norm. `step()`
    alone also works (it reduce-scatters if that has not happened yet).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01,
                 group: dist.ProcessGroup | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        params = [p for g in self.param_groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter appears twice in the parameter groups")
        if not params or any(p.dtype != torch.float32 for p in params):
            raise ValueError("ZeroAdamW keeps fp32 weights in one flat fp32 buffer: pass fp32 "
                             "parameters (for bf16 training use DeepSpeed, deepspeed_zero.py)")
        first = params[0]
        self.numel = sum(p.numel() for p in params)
        self.padded = padded_numel(self.numel, self.world)
        self.shard_numel = self.padded // self.world
        lo, hi = shard_range(self.numel, self.world, self.rank)
        kw = dict(dtype=torch.float32, device=first.device)
        self.flat_params = torch.zeros(self.padded, **kw)
        self.flat_grads = torch.zeros(self.padded, **kw)
        self.spans: list[GroupSpan] = []
        self.offsets: dict[int, int] = {}  # id(param) -> its offset in the flat buffers
        offset = 0
        with torch.no_grad():
            for g in self.param_groups:
                start = offset
                for p in g["params"]:
                    view = self.flat_params[offset: offset + p.numel()].view_as(p)
                    view.copy_(p)
                    p.data = view  # the model now reads its weights from the flat buffer
                    p.grad = self.flat_grads[offset: offset + p.numel()].view_as(p)
                    self.offsets[id(p)] = offset
                    offset += p.numel()
                self.spans.append(GroupSpan(start, offset, min(max(start, lo), hi) - lo,
                                            min(max(offset, lo), hi) - lo))
        self.params_shard = self.flat_params[lo:hi]  # a view: updated in place, then all-gathered
        # this rank's mean gradient slice lives in its own slice of the flat gradient buffer
        self.grad_shard = self.flat_grads[lo:hi]
        self.exp_avg = torch.zeros(self.shard_numel, **kw)
        self.exp_avg_sq = torch.zeros(self.shard_numel, **kw)
        self.steps = 0
        self._reduced = False
        self._params = params

    # ------------------------------------------------------------------ the three phases
    def reduce_gradients(self) -> None:
        """Backward is done: grad_shard = mean over ranks of this rank's slice (reduce-scatter)."""
        self._check_grads_are_views()
        mean = torch.empty_like(self.grad_shard)  # transient: the output may not alias the input
        reduce_scatter_mean(mean, self.flat_grads, self.group)
        self.grad_shard.copy_(mean)  # the rest of flat_grads is dead until zero_grad()
        self._reduced = True

    def clip_grad_norm_(self, _params=None, max_norm: float = 1.0) -> torch.Tensor:
        """Clip the sharded gradient by the norm of the whole (mean) gradient, as
        torch.nn.utils.clip_grad_norm_ would on the full one: scale by min(1, max/(norm+1e-6)).
        The first argument (train_step's parameter list) is ignored: the shard is the gradient."""
        if not self._reduced:
            self.reduce_gradients()
        norm = total_norm([self.grad_shard], [self.group])  # the slices partition the gradient
        clip_by_total_norm([self.grad_shard], max_norm, norm)
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        """AdamW on this rank's slice (torch's single-tensor AdamW, elementwise), then all-gather."""
        if closure is not None:
            raise ValueError("ZeroAdamW does not take a closure")
        if not self._reduced:
            self.reduce_gradients()
        self.steps += 1
        for g, span in zip(self.param_groups, self.spans):
            a, b = span.own_start, span.own_end
            if a >= b:
                continue  # this rank owns nothing of this group
            param, grad = self.params_shard[a:b], self.grad_shard[a:b]
            m, v = self.exp_avg[a:b], self.exp_avg_sq[a:b]
            lr, (beta1, beta2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
            param.mul_(1 - lr * wd)  # decoupled weight decay first, as torch does
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** self.steps
            bias_correction2_sqrt = math.sqrt(1 - beta2 ** self.steps)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(m, denom, value=-lr / bias_correction1)
        all_gather_flat(self.flat_params, self.params_shard.clone(), self.group)
        self._reduced = False
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffer. Gradients stay views of it (like DeepSpeed's contiguous
        gradients), so `set_to_none` is ignored: autograd accumulates into the views in place."""
        self.flat_grads.zero_()
        self._reduced = False

    def _check_grads_are_views(self) -> None:
        flat = self.flat_grads.untyped_storage().data_ptr()
        for p in self._params:
            if p.grad is None or p.grad.untyped_storage().data_ptr() != flat:
                raise RuntimeError("a .grad is no longer a view of the flat gradient buffer (was it "
                                   "set to None or replaced?); call optimizer.zero_grad() instead")

    # ------------------------------------------------------------------ accounting
    def hooks(self) -> StepHooks:
        """The loop's hooks: reduce-scatter after backward, clip the shard by the global norm; this
        rank's slice of every batch, the loss averaged over the group."""
        return StepHooks(sync_grads=self.reduce_gradients, clip=self.clip_grad_norm_,
                         reduce_loss=mean_over(self.group), dp_rank=self.rank, dp_size=self.world,
                         whole_grads=False)  # each rank holds the mean of its slice only

    def buffers(self) -> dict[str, list[int]]:
        """Bytes handed to each collective in one step, by op (the ledger's units)."""
        flat = self.padded * 4
        return {"reduce_scatter": [flat], "all_gather": [flat]}

    def state_bytes(self) -> dict[str, int]:
        """This rank's persistent bytes: full weights and gradients, its slice of the moments."""
        return {"params": self.flat_params.numel() * 4, "grads": self.flat_grads.numel() * 4,
                "optimizer": (self.exp_avg.numel() + self.exp_avg_sq.numel()) * 4}

    def gathered_grads(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The mean gradient by parameter name, gathered from every rank's slice (for checks).

        Communication: all-gather of the gradient slices (4·N_padded bytes). No backward."""
        flat = torch.empty(self.padded, dtype=torch.float32, device=self.grad_shard.device)
        all_gather_flat(flat, self.grad_shard.clone(), self.group)
        return {name: flat[self.offsets[id(p)]: self.offsets[id(p)] + p.numel()].view_as(p).clone()
                for name, p in model.named_parameters() if id(p) in self.offsets}


def zero_adamw(model: nn.Module, cfg: TrainConfig, group: dist.ProcessGroup | None = None) -> ZeroAdamW:
    """ZeroAdamW with make_optimizer's groups: weight decay on matrices, none on vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return ZeroAdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}],
                     lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, group=group)


def unsharded_adamw_state_bytes(model: nn.Module) -> int:
    """Bytes of torch.optim.AdamW's two fp32 moments for every trainable parameter (one rank, dp)."""
    return sum(2 * p.numel() * 4 for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------- a run, measured


def run_zero1(config, data, cfg: TrainConfig, *, seed: int = 0, device: torch.device | None = None,
              group: dist.ProcessGroup | None = None) -> RunResult:
    """Train a fresh GPT (weights from `seed`) with ZeroAdamW for cfg.steps on this rank's shard
    of every global batch, then measure one more step's collectives with a CommLedger."""
    world = dist.get_world_size(group)
    model = fresh_model(config, seed, device)
    opt = zero_adamw(model, cfg, group)
    hooks = opt.hooks()
    # the first mean gradient, gathered from the slices (AdamW hides a wrong gradient scale)
    run = run_and_capture(model, data, cfg, hooks, name="zero1 (ours)", optimizer=opt,
                          block_size=config.block_size, capture_grads=lambda: opt.gathered_grads(model))
    ledger = measure_one_step(model, opt, data, cfg, hooks, block_size=config.block_size)
    run.comm, run.state_bytes, run.buffers = ledger_by_op(ledger, group), opt.state_bytes(), opt.buffers()
    run.analytic = {op: analytic(op, b, world) for op, b in opt.buffers().items()}
    if cfg.grad_clip > 0:
        run.analytic["all_reduce"] = analytic("all_reduce", [4], world)  # the global grad norm²
    return run
