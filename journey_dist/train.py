"""The one training step and loop every lab uses, and the contract a parallel scheme joins it by.

A scheme (data, tensor, pipeline parallel, ZeRO, ...) never copies the loop: it returns a
`StepHooks` (its loss, its gradient sync, its clipping, its own step for a pipeline schedule, which
slice of each batch this rank takes) and `train(model, data, cfg, hooks)` runs it. Every hook
defaults to what one process does, so `StepHooks()` is the single-process run.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn

from journey_dist.config import ConfigError
from journey_dist.data import TokenData, check_fits, get_batch, microbatches, shard
from journey_dist.runtime import print0, save_json

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
ClipFn = Callable[[list[torch.Tensor], float], torch.Tensor]  # (params, max_norm) -> total norm
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16  # global batch in sequences (summed over data-parallel ranks)
    grad_accum: int = 1  # micro-steps per optimizer step (on each rank)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    schedule: str = "cosine"  # or "constant"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    autocast: str | None = None  # None, "bf16" or "fp16"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 4

    def __post_init__(self) -> None:
        # checked where the config is built (before any rank is spawned), not in the first step
        for name in ("steps", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"TrainConfig.{name}={value!r} must be a positive integer; use {name} >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or cfg.steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, LayerNorm, or 1-D params)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None,
    )


def default_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, y)[1]


def autocast_context(device: torch.device, dtype: str | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return torch.autocast(device_type=device.type, dtype=torch_dtype)


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over micro-steps, detached; .item() only when logging
    grad_norm: torch.Tensor | None


@dataclass(frozen=True)
class StepHooks:
    """How a parallel scheme joins the loop. Each field defaults to what one process does.

    loss         training loss of one micro-batch, loss(model, x, y) (e.g. vocab-parallel CE)
    eval_loss    the loss evaluate() uses; None: `loss` (a pipeline runs a forward-only schedule)
    sync_grads   after the last backward, before clipping (a DP all-reduce, a ZeRO reduce-scatter)
    no_sync      context manager for the non-final micro-steps (DP holds its communication back)
    clip         clip(params, max_norm) -> total norm, for a norm that spans ranks (parallel/common)
    reduce_loss  the logged loss, e.g. averaged over the data-parallel ranks
    step_fn      replaces train_step where the scheme owns forward and backward (a pipeline
                 schedule, DeepSpeed's engine): step_fn(model, optimizer, micro, hooks, *,
                 grad_clip, autocast) -> StepResult
    dp_rank, dp_size   this rank's slice of every global batch
    """

    loss: LossFn = default_loss
    eval_loss: LossFn | None = None
    sync_grads: Callable[[], None] | None = None
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None
    clip: ClipFn | None = None
    reduce_loss: Callable[[torch.Tensor], torch.Tensor] | None = None
    step_fn: Callable[..., StepResult] | None = None
    dp_rank: int = 0
    dp_size: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.dp_size, int) and self.dp_size >= 1 and 0 <= self.dp_rank < self.dp_size):
            raise ConfigError(f"dp_rank={self.dp_rank}, dp_size={self.dp_size}: need 0 <= dp_rank < dp_size")

    def with_(self, **changes) -> StepHooks:
        """A copy with some hooks replaced; a name StepHooks does not have is an error."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown hook(s) {unknown}; StepHooks has: "
                            f"{', '.join(f.name for f in fields(self))}")
        return replace(self, **changes)

    def then_sync(self, after: Callable[[], None]) -> StepHooks:
        """A copy whose sync_grads runs this scheme's sync, then `after` (e.g. capture gradients)."""
        before = self.sync_grads

        def sync() -> None:
            if before is not None:
                before()
            after()
        return replace(self, sync_grads=sync)

    @property
    def evaluation_loss(self) -> LossFn:
        return self.eval_loss or self.loss


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro: Iterable[Batch],
               hooks: StepHooks = StepHooks(), *, grad_clip: float = 0.0,
               autocast: str | None = None) -> StepResult:
    """Forward/backward over the micro-batches, sync, clip, optimizer step, zero grads.

    Each micro-step's loss is divided by the number of micro-steps, so the
    accumulated gradient is the gradient of the mean loss over the whole batch.
    """
    micro = list(micro)
    device = micro[0][0].device
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro):
        last = i == len(micro) - 1
        ctx = hooks.no_sync() if (hooks.no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            with autocast_context(device, autocast):
                loss = hooks.loss(model, x, y) / len(micro)
            loss.backward()
        total += loss.detach()
    if hooks.sync_grads is not None:
        hooks.sync_grads()
    grad_norm = None
    if grad_clip > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        clip = hooks.clip or torch.nn.utils.clip_grad_norm_  # one process: torch's own
        grad_norm = clip(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total, grad_norm)


@torch.no_grad()
def evaluate(model: nn.Module, tokens: torch.Tensor, batch_size: int, block_size: int,
             batches: int = 4, loss_fn: LossFn = default_loss, device: torch.device | None = None,
             autocast: str | None = None) -> float:
    """Mean loss over fixed validation batches (same batches every call)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    losses = []
    for i in range(batches):
        x, y = get_batch(tokens, batch_size, block_size, step=i, seed=12345)
        with autocast_context(device, autocast):
            losses.append(loss_fn(model, x.to(device), y.to(device)).float().item())
    model.train(was_training)
    return sum(losses) / len(losses)


@dataclass
class History:
    steps: list[dict] = field(default_factory=list)  # the logged steps
    evals: list[dict] = field(default_factory=list)  # {"step", "val_loss"} every cfg.eval_every steps
    val_loss: float | None = None  # after the last step
    tokens_per_s: float = 0.0

    @property
    def first_loss(self) -> float:
        return self.steps[0]["loss"]

    @property
    def last_loss(self) -> float:
        return self.steps[-1]["loss"]

    def to_dict(self) -> dict:
        return {"steps": self.steps, "evals": self.evals, "val_loss": self.val_loss,
                "tokens_per_s": self.tokens_per_s}


def train(
    model: nn.Module,
    data: TokenData,
    cfg: TrainConfig,
    hooks: StepHooks | None = None,
    *,
    lab: str | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | None = None,
    block_size: int | None = None,
    verbose: bool = True,
    start_step: int = 0,
    on_step: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
) -> History:
    """Train for cfg.steps on deterministic batches; log, evaluate, write runs/<lab>/train.json.

    `hooks` is how a parallel scheme joins (StepHooks; None: one process). Each data-parallel rank
    takes its slice (hooks.dp_rank of hooks.dp_size) of the same global batch. Resume:
    `start_step` skips the steps already taken (batches and lr are functions of the step, so
    nothing else needs replaying); `on_step(step, model, optimizer)` runs after each step (e.g. to
    save a checkpoint).
    """
    hooks = hooks or StepHooks()
    device = device or next(model.parameters()).device
    block_size = block_size or model.config.block_size
    check_fits(data, cfg.batch_size, block_size)  # fail before the first step, not at eval
    optimizer = optimizer or make_optimizer(model, cfg)
    step_fn = hooks.step_fn or train_step
    eval_batch = max(1, cfg.batch_size // hooks.dp_size)  # this rank's share, as in training

    def validation_loss() -> float:
        return evaluate(model, data.val, eval_batch, block_size, cfg.eval_batches, hooks.evaluation_loss,
                        device, cfg.autocast)

    history = History()
    tokens_per_step = cfg.batch_size * block_size
    model.train()
    t0 = t_log = time.perf_counter()
    for step in range(start_step, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = get_batch(data.train, cfg.batch_size, block_size, step, cfg.seed)
        r, n = hooks.dp_rank, hooks.dp_size
        x, y = shard(x, r, n).to(device), shard(y, r, n).to(device)
        result = step_fn(model, optimizer, microbatches(x, y, cfg.grad_accum), hooks,
                         grad_clip=cfg.grad_clip, autocast=cfg.autocast)
        last = step == cfg.steps - 1
        if step % cfg.log_every == 0 or last:
            loss = hooks.reduce_loss(result.loss) if hooks.reduce_loss else result.loss
            now = time.perf_counter()
            steps_since = (step % cfg.log_every or cfg.log_every) if step > start_step else 1
            tps = tokens_per_step * steps_since / max(now - t_log, 1e-9)
            t_log = now
            row = {"step": step, "loss": loss.item(), "lr": lr_at(step, cfg), "tokens_per_s": tps}
            if result.grad_norm is not None:
                row["grad_norm"] = float(result.grad_norm)
            history.steps.append(row)
            if verbose:
                clear = "\r\033[K" if sys.stdout.isatty() else ""
                print0(f"{clear}step {step:4d}/{cfg.steps} | loss {row['loss']:.4f} | "
                       f"lr {row['lr']:.2e} | {tps / 1e3:6.1f}k tok/s")
        elif verbose:
            _progress(step, cfg.steps)
        if cfg.eval_every and step and step % cfg.eval_every == 0 and not last:
            history.evals.append({"step": step, "val_loss": validation_loss()})
        if on_step is not None:
            on_step(step, model, optimizer)
    history.tokens_per_s = tokens_per_step * (cfg.steps - start_step) / (time.perf_counter() - t0)
    history.val_loss = validation_loss()
    history.evals.append({"step": cfg.steps - 1, "val_loss": history.val_loss})
    if lab:
        save_json(lab, "train", {"config": cfg.to_dict(), **history.to_dict()})
    return history


def _progress(step: int, total: int, width: int = 30) -> None:
    """A one-line progress bar between log lines, only on an interactive terminal."""
    if not sys.stdout.isatty():
        return
    done = int(width * (step + 1) / total)
    print0(f"\r[{'#' * done}{'.' * (width - done)}] {step + 1}/{total}", end="")
