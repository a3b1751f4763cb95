"""The single-process reference every parallel scheme is checked against, and one run's record.

A parallel run is correct when it ends where one process ends after training the same fresh
model on the same global batches: same loss every step, same gradients, same parameters.
This module is that one process (`reference_run`), the record every scheme's run returns
(`RunResult`), the two ways a run is measured (`run_and_capture`: train with the shared loop and
keep the first gradients; `measure_one_step`: one more step under a CommLedger) and the diff and
byte-counting helpers parity checks share. It sits above the loop (train.py) and below every
parallel scheme, which all import it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn as nn

from journey_dist.comm import CommLedger
from journey_dist.config import GPTConfig
from journey_dist.data import TokenData, get_batch, microbatches, shard
from journey_dist.model import GPT
from journey_dist.runtime import comm_device
from journey_dist.train import StepHooks, TrainConfig, train, train_step

Tensors = dict[str, torch.Tensor]


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


def named_params(model: nn.Module) -> Tensors:
    """Parameters by name, detached; unwraps DDP-style `.module` wrappers."""
    return {name: p.detach() for name, p in unwrap(model).named_parameters()}


def max_abs_diff(ours: Tensors, ref: Tensors, *, subset: bool = False,
                 cover: Iterable[str] | None = None) -> float:
    """Largest |ours - ref| over all tensors.

    By default both must hold the same names. With `subset`, `ours` may hold part of the
    model (a pipeline stage); its `lm_head.weight`, a copy of the tied embedding on the last
    stage, is compared with the reference's `transformer.wte.weight`. A subset must not be empty,
    and with `cover` (e.g. the stage's parameter names) it must hold every one of those names, so
    a comparison that silently compared nothing fails instead of returning 0.
    """
    if not subset and ours.keys() != ref.keys():
        raise KeyError(f"different tensors: {sorted(ours.keys() ^ ref.keys())}")
    if not ours:
        raise ValueError("nothing to compare: `ours` holds no tensors (were the gradients captured?)")
    missing = sorted(set(cover or ()) - ours.keys())
    if missing:
        raise KeyError(f"{len(missing)} tensor(s) not compared: {missing[:5]}")
    worst = 0.0
    for name, t in ours.items():
        key = "transformer.wte.weight" if name == "lm_head.weight" and name not in ref else name
        worst = max(worst, (t.float().cpu() - ref[key].float().cpu()).abs().max().item())
    return worst


def loss_diff(ours: list[float], ref: list[float]) -> float:
    """Largest |difference| between two runs' per-step losses."""
    if len(ours) != len(ref):
        raise ValueError(f"{len(ours)} losses vs {len(ref)}: the runs did not take the same steps")
    return max(abs(a - b) for a, b in zip(ours, ref))


@dataclass
class RunResult:
    """What one scheme's training run leaves on this rank, for parity checks and a lab's tables.

    losses       the global-batch mean loss of every step (the same on every rank)
    params       after the last step: full tensors under the plain GPT's names where the scheme can
                 gather them (DP, TP, ZeRO, FSDP, DeepSpeed), this rank's slice where it holds one
                 (pipeline stages, 3D)
    grads        the first step's gradients after the scheme's sync and before clipping (AdamW
                 hides a constant gradient scale, so parity compares them too); None if not kept
    grad_norm    the first step's global gradient norm, where the scheme reports only that
    state_bytes  this rank's persistent tensors: {"params", "grads", "optimizer", ...}
    comm         one more training step's collectives on the scheme's group: {op: {calls, bytes,
                 wire_bytes}} (measure_one_step); analytic: the same from the formula ({} if not
                 derived); buffers: bytes handed to each collective of one step, by op
    details      what only this scheme has (e.g. DDP's own bucket record)
    """

    name: str
    losses: list[float]
    params: Tensors
    grads: Tensors | None = None
    grad_norm: float | None = None
    val_loss: float | None = None
    seconds: float = 0.0  # wall time of the training steps
    state_bytes: dict[str, int] = field(default_factory=dict)
    comm: dict[str, dict[str, float]] = field(default_factory=dict)
    analytic: dict[str, dict[str, float]] = field(default_factory=dict)
    buffers: dict[str, list[int]] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)


def run_and_capture(module: nn.Module, data: TokenData, cfg: TrainConfig, hooks: StepHooks | None = None, *,
                    name: str = "one process", first_grads: bool = True,
                    capture_grads: Callable[[], Tensors] | None = None,
                    optimizer: torch.optim.Optimizer | None = None, device: torch.device | None = None,
                    block_size: int | None = None) -> RunResult:
    """Train `module` with the shared loop, logging every step; keep what parity checks compare.

    The first step's gradients are captured after the scheme's sync (hooks.then_sync) and before
    clipping and the optimizer step: by name from the unwrapped model, or by `capture_grads()`
    where a scheme keeps them elsewhere (ZeRO's flat shard, FSDP's DTensors).
    """
    model = unwrap(module)
    grads: Tensors = {}

    def capture() -> None:
        if grads:
            return
        grads.update(capture_grads() if capture_grads is not None else
                     {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    hooks = hooks or StepHooks()
    if first_grads:
        hooks = hooks.then_sync(capture)
    t0 = time.perf_counter()
    history = train(module, data, replace(cfg, log_every=1), hooks, optimizer=optimizer, device=device,
                    block_size=block_size, verbose=False)
    seconds = time.perf_counter() - t0
    return RunResult(name, [row["loss"] for row in history.steps],
                     {k: v.clone() for k, v in named_params(model).items()},
                     grads if first_grads else None, grad_norm=history.steps[0].get("grad_norm"),
                     val_loss=history.val_loss, seconds=seconds)


def measure_one_step(module: nn.Module, optimizer: torch.optim.Optimizer, data: TokenData, cfg: TrainConfig,
                     hooks: StepHooks | None = None, *, block_size: int | None = None) -> CommLedger:
    """The collectives of training step `cfg.steps` (the one after a run), in a CommLedger.

    This rank's shard of that step's global batch, the scheme's hooks (or its own step_fn); by then
    a scheme that adapts after its first steps (DDP's rebuilt buckets) is in its steady state.
    `comm.ledger_by_op(ledger, group)` gives {op: {calls, bytes, wire_bytes}} on one group.
    """
    hooks = hooks or StepHooks()
    block_size = block_size or unwrap(module).config.block_size
    x, y = get_batch(data.train, cfg.batch_size, block_size, cfg.steps, cfg.seed)
    device = next(unwrap(module).parameters()).device
    x = shard(x, hooks.dp_rank, hooks.dp_size).to(device)
    y = shard(y, hooks.dp_rank, hooks.dp_size).to(device)
    step = hooks.step_fn or train_step
    with CommLedger() as ledger:
        step(module, optimizer, microbatches(x, y, cfg.grad_accum), hooks, grad_clip=cfg.grad_clip,
             autocast=cfg.autocast)
    return ledger


def worst_diffs(run: RunResult, ref: RunResult, *, subset: bool = False, val_loss: bool = False,
                group: dist.ProcessGroup | None = None) -> dict[str, float | None]:
    """The worst |run - ref| over the group's ranks: per-step loss, first-step gradients (where the
    run kept them), parameters after the last step, and with `val_loss` the final validation loss;
    with `subset`, this rank holds part of the model (a pipeline stage) and every one of its
    parameters must have a gradient compared.

    Collective: one all-reduce (MAX) of three (four) floats, so every rank returns the same numbers.
    """
    grads = (max_abs_diff(run.grads, ref.grads, subset=subset, cover=run.params if subset else None)
             if run.grads and ref.grads else -1.0)
    diffs = [loss_diff(run.losses, ref.losses), grads, max_abs_diff(run.params, ref.params, subset=subset)]
    if val_loss:
        if run.val_loss is None or ref.val_loss is None:
            raise ValueError(f"val_loss=True but {run.name if run.val_loss is None else ref.name} has no "
                             "validation loss: train with cfg.eval_batches > 0")
        diffs.append(abs(run.val_loss - ref.val_loss))
    d = torch.tensor(diffs, device=comm_device(group))
    dist.all_reduce(d, op=dist.ReduceOp.MAX, group=group)
    loss, grad, param, *val = d.tolist()
    return {"loss": loss, "grad": None if grad < 0 else grad, "param": param,
            **({"val_loss": val[0]} if val_loss else {})}


def grad_check(run: RunResult, ref: RunResult) -> tuple[str, float | None]:
    """How `run`'s first-step gradients compare with `ref`'s, on this rank: ("max|g|", max |diff|)
    where the run kept them; ("rel norm", |norm - ref's norm| / ref's norm) where it reports only
    the global norm (DeepSpeed keeps partitions); ("-", None) where it has neither. AdamW undoes a
    constant gradient scale, so equal parameters alone do not prove equal gradients."""
    if run.grads:
        return "max|g|", max_abs_diff(run.grads, ref.grads)
    if run.grad_norm is not None:
        ref_norm = torch.sqrt(sum((g.float() ** 2).sum() for g in ref.grads.values())).item()
        return "rel norm", abs(run.grad_norm - ref_norm) / ref_norm
    return "-", None


def worst_over_ranks(values: dict[str, float | None],
                     group: dist.ProcessGroup | None = None) -> dict[str, float | None]:
    """Each value's maximum over the group's ranks, so every rank returns the same numbers; a value
    that is None (on every rank alike) stays None. Collective: one all-reduce (MAX) of len(values) floats."""
    d = torch.tensor([-1.0 if v is None else v for v in values.values()], device=comm_device(group))
    dist.all_reduce(d, op=dist.ReduceOp.MAX, group=group)
    return {k: None if values[k] is None else x for k, x in zip(values, d.tolist())}


def reference_run(config: GPTConfig, data: TokenData, cfg: TrainConfig, *, seed: int = 0,
                  first_grads: bool = False, device: torch.device | None = None) -> RunResult:
    """Train fresh_model(config, seed) for cfg.steps on the global batches in one process, on
    `device` (default: where this rank's collectives run, runtime.comm_device: its GPU under NCCL)."""
    model = fresh_model(config, seed, device or comm_device())
    return run_and_capture(model, data, cfg, first_grads=first_grads)


# ----------------------------------------------------------------------------- bytes a rank keeps


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def replicated_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Plain data parallel, per rank: every weight, every .grad, AdamW's two moments (the fp32
    `step` counters, 4 bytes per tensor, are left out here and in ZeroAdamW alike)."""
    model = unwrap(model)
    moments = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    return {"params": storage_bytes(model.parameters()),
            "grads": storage_bytes(p.grad for p in model.parameters() if p.grad is not None),
            "optimizer": storage_bytes(moments)}
