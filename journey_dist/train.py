"""The one training step and loop every lab uses, and the contract a parallel scheme joins it by.

A scheme (data, tensor, pipeline parallel, ZeRO, ...) never copies the loop: it returns a
`StepHooks` (its loss, its gradient sync, its clipping, its own step for a pipeline schedule, which
slice of each batch this rank takes) and `train(model, data, cfg, hooks)` runs it. Every hook
defaults to what one process does, so `StepHooks()` is the single-process run.

The loop stops with NonFiniteLossError (a TrainingError) at the first step whose loss or
gradient norm is inf/NaN; autocast="fp16" trains through a torch.amp.GradScaler, which skips
(and logs) the steps whose scaled gradients overflow.
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
AUTOCAST = (None, "bf16", "fp16")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message names the step and what to change. Labs catch this
    (next to ConfigError) to print one `error:` line instead of a traceback."""


class NonFiniteLossError(TrainingError):
    """The loss or the gradient norm became inf or NaN: every later step would be garbage."""


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
        if self.autocast not in AUTOCAST:
            raise ConfigError(f"TrainConfig.autocast={self.autocast!r}: use one of {AUTOCAST}")

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


def make_grad_scaler(device: torch.device, autocast: str | None) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 autocast (fp16 gradients underflow to zero without one); None for
    bf16 (fp32's exponent range) and fp32."""
    return torch.amp.GradScaler(device.type) if autocast == "fp16" else None


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over micro-steps, detached; .item() only when logging
    grad_norm: torch.Tensor | None
    skipped: bool = False  # fp16: the scaled gradients overflowed, the optimizer step was skipped
    scale: float | None = None  # fp16: the loss scale this step used


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
                 grad_clip, autocast, scaler) -> StepResult (scaler: fp16's GradScaler or None)
    dp_rank, dp_size   this rank's slice of every global batch
    whole_grads  after sync_grads every rank holds the whole gradient (one process, DP, TP's
                 shards with their norm hook): a GradScaler's overflow check sees what one process
                 sees. False where gradients are sharded over ranks (ZeRO, FSDP): fp16 is refused
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
    whole_grads: bool = True

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
               hooks: StepHooks = StepHooks(), *, grad_clip: float = 0.0, autocast: str | None = None,
               scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """Forward/backward over the micro-batches, sync, clip, optimizer step, zero grads.

    Each micro-step's loss is divided by the number of micro-steps, so the
    accumulated gradient is the gradient of the mean loss over the whole batch. With a GradScaler
    (fp16) the loss is scaled before backward, the gradients unscaled before clipping, and a step
    whose gradients overflowed is skipped.
    """
    if autocast == "fp16" and scaler is None:
        raise ConfigError("autocast='fp16' needs a loss scaler or small gradients underflow to zero: "
                          "pass scaler=make_grad_scaler(device, 'fp16') (train() does), or use 'bf16'")
    micro = list(micro)
    device = micro[0][0].device
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro):
        last = i == len(micro) - 1
        ctx = hooks.no_sync() if (hooks.no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            with autocast_context(device, autocast):
                loss = hooks.loss(model, x, y) / len(micro)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    if hooks.sync_grads is not None:
        hooks.sync_grads()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip (and report) the true gradients, not the scaled ones
    grad_norm = None
    if grad_clip > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        clip = hooks.clip or torch.nn.utils.clip_grad_norm_  # one process: torch's own
        grad_norm = clip(params, grad_clip)
    if scaler is None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return StepResult(total, grad_norm)
    scale = scaler.get_scale()  # reads the device: fp16 steps cost a host sync or two
    scaler.step(optimizer)  # skipped when unscale_ found inf/NaN
    scaler.update()  # halves the scale after an overflow, doubles it after 2000 clean steps
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total, grad_norm, skipped=scaler.get_scale() < scale, scale=scale)


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


class FiniteCheck:
    """Raises NonFiniteLossError at the first step whose loss or gradient norm is inf/NaN.

    On CPU each step is checked as it ends: reading a CPU tensor waits for nothing. On an
    accelerator a read per step would stall the host until the device queue drains, so the
    first bad step is kept on the device (torch.where, no sync) and read where the loop syncs
    anyway (each logged step, and before an on_step callback): the run stops at most
    log_every - 1 steps late and still names the first bad step. An fp16 step the GradScaler
    skipped has an inf gradient norm by design and is not counted.
    """

    def __init__(self, device: torch.device, cfg: TrainConfig, *, eager: bool | None = None):
        self.eager = device.type == "cpu" if eager is None else eager
        self.cfg = cfg
        self.first_bad: torch.Tensor | None = None  # [step, loss, norm, has norm]; step -1: none yet

    def observe(self, step: int, result: StepResult) -> None:
        loss = result.loss.detach().float().reshape(())
        norm = result.grad_norm if result.grad_norm is not None and not result.skipped else None
        values = torch.stack([loss, loss.new_zeros(()) if norm is None else
                              norm.detach().float().reshape(()).to(loss.device)])
        bad = ~torch.isfinite(values).all()
        if self.eager:
            if bad:
                self._raise(step, *values.tolist(), norm is not None)
            return
        row = torch.cat([loss.new_full((1,), float(step)), values,
                         loss.new_full((1,), float(norm is not None))])
        if self.first_bad is None:
            self.first_bad = torch.full_like(row, -1.0)
        self.first_bad = torch.where(bad & (self.first_bad[0] < 0), row, self.first_bad)

    def check(self) -> None:
        """Read the device-side record (a host sync: call it where the loop syncs anyway)."""
        if self.first_bad is not None:
            step, loss, norm, has_norm = self.first_bad.tolist()
            if step >= 0:
                self._raise(int(step), loss, norm, bool(has_norm))

    def _raise(self, step: int, loss: float, norm: float, has_norm: bool) -> None:
        cfg = self.cfg
        what = f"the loss is {loss}" + (f" and the gradient norm {norm}" if has_norm else "")
        fp16 = " (or autocast='bf16': fp16 overflows above 65504)" if cfg.autocast == "fp16" else ""
        raise NonFiniteLossError(
            f"step {step}: {what}, not finite, so training stopped there; the learning rate at that "
            f"step was {lr_at(step, cfg):.3g} (lr={cfg.lr:g}): use a smaller learning rate, e.g. "
            f"lr={cfg.lr / 10:g}{fp16}")


@dataclass
class History:
    steps: list[dict] = field(default_factory=list)  # the logged steps
    evals: list[dict] = field(default_factory=list)  # {"step", "val_loss"} every cfg.eval_every steps
    val_loss: float | None = None  # after the last step
    tokens_per_s: float = 0.0
    skipped_steps: int = 0  # fp16: optimizer steps the GradScaler skipped (gradient overflow)

    @property
    def first_loss(self) -> float:
        return self.steps[0]["loss"]

    @property
    def last_loss(self) -> float:
        return self.steps[-1]["loss"]

    def to_dict(self) -> dict:
        return {"steps": self.steps, "evals": self.evals, "val_loss": self.val_loss,
                "tokens_per_s": self.tokens_per_s, "skipped_steps": self.skipped_steps}


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
    save a checkpoint). A non-finite loss or gradient norm raises NonFiniteLossError (FiniteCheck);
    autocast="fp16" hands the step a GradScaler (`scaler=`), and a logged row says its `scale` and
    whether the step was `skipped`.
    """
    hooks = hooks or StepHooks()
    device = device or next(model.parameters()).device
    block_size = block_size or model.config.block_size
    check_fits(data, cfg.batch_size, block_size)  # fail before the first step, not at eval
    optimizer = optimizer or make_optimizer(model, cfg)
    step_fn = hooks.step_fn or train_step
    if cfg.autocast == "fp16" and not hooks.whole_grads:
        raise ConfigError("autocast='fp16' needs a loss scaler whose overflow check sees the whole "
                          "gradient, but this scheme shards gradients over ranks (each would skip "
                          "steps on its own); use autocast='bf16', which needs no scaler")
    scaler = make_grad_scaler(device, cfg.autocast)
    finite = FiniteCheck(device, cfg)
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
                         grad_clip=cfg.grad_clip, autocast=cfg.autocast, scaler=scaler)
        finite.observe(step, result)
        history.skipped_steps += result.skipped
        last = step == cfg.steps - 1
        if step % cfg.log_every == 0 or last:
            finite.check()
            loss = hooks.reduce_loss(result.loss) if hooks.reduce_loss else result.loss
            now = time.perf_counter()
            steps_since = (step % cfg.log_every or cfg.log_every) if step > start_step else 1
            tps = tokens_per_step * steps_since / max(now - t_log, 1e-9)
            t_log = now
            row = {"step": step, "loss": loss.item(), "lr": lr_at(step, cfg), "tokens_per_s": tps}
            if result.grad_norm is not None and not result.skipped:  # a skipped step's norm is inf
                row["grad_norm"] = float(result.grad_norm)
            if result.scale is not None:
                row.update(scale=result.scale, skipped=result.skipped)
            history.steps.append(row)
            if verbose:
                clear = "\r\033[K" if sys.stdout.isatty() else ""
                fp16 = "" if result.scale is None else f" | scale {result.scale:g}" + (
                    " (overflow: step skipped)" if result.skipped else "")
                print0(f"{clear}step {step:4d}/{cfg.steps} | loss {row['loss']:.4f} | "
                       f"lr {row['lr']:.2e} | {tps / 1e3:6.1f}k tok/s{fp16}")
        elif verbose:
            _progress(step, cfg.steps)
        if cfg.eval_every and step and step % cfg.eval_every == 0 and not last:
            history.evals.append({"step": step, "val_loss": validation_loss()})
        if on_step is not None:
            finite.check()  # never hand non-finite weights to a callback (it may save a checkpoint)
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
