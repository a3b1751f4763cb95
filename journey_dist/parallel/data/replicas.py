"""Data parallel three ways: naive all-reduce and bucketed async all-reduce (from scratch), and DDP.

Every rank holds a full replica and takes its shard of the same global batch. After backward,
rank r holds the gradient of the mean loss over its own shard; the mean of those over the N
ranks is the gradient of the mean loss over the global batch (equal shards), so every replica
takes the identical optimizer step and stays identical to a single process on the global batch.

    naive     after backward, one all-reduce per parameter. Simple; many small calls; no overlap.
    bucketed  as backward produces gradients (reverse parameter order), copy them into flat
              buffers of ~bucket_mb; each full buffer is all-reduced asynchronously while
              backward goes on; the step waits for all of them. Few large calls, overlapped.
    ddp       torch's DistributedDataParallel: the same idea in C++. Its first backward uses one
              bucket for everything, then it rebuilds buckets in the order gradients arrived.

Communication per optimizer step, any variant: forward none; backward all-reduce(SUM) of every
gradient byte once, divided by N (= the mean). With gradient accumulation only the last
micro-step communicates: the others run under `no_sync` and just accumulate into .grad.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from journey_dist.comm import analytic, ddp_allreduce_hook, ledger_by_op
from journey_dist.config import GPTConfig, check_bucket_mb
from journey_dist.data import TokenData
from journey_dist.parallel.common import mean_over
from journey_dist.parity import (
    RunResult,
    fresh_model,
    measure_one_step,
    replicated_state_bytes,
    run_and_capture,
)
from journey_dist.train import StepHooks, TrainConfig, make_optimizer

VARIANTS = ("naive", "bucketed", "ddp")
MB = 2**20  # bucket sizes are MiB, as DDP's bucket_cap_mb


def grad_bytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def bucket_layout(nbytes: Sequence[int], cap_bytes: int,
                  first_cap_bytes: int | None = None) -> list[list[int]]:
    """Greedy buckets over tensors in the given order, DDP's rule: a bucket closes as soon as
    it holds >= its cap (so a bucket may exceed the cap by its last tensor). `first_cap_bytes`
    caps the first bucket alone (DDP's 1 MiB first bucket when bucket_cap_mb is left unset)."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, n in enumerate(nbytes):
        current.append(i)
        size += n
        if size >= (first_cap_bytes if first_cap_bytes is not None and not buckets else cap_bytes):
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once


def planned_buckets(model: nn.Module, bucket_mb: float, first_bucket_mb: float | None = None) -> list[int]:
    """Bytes per bucket for this model and bucket size: greedy over reverse parameter order.

    DDP lays its buckets out so from the second iteration on (the first all-reduces everything in
    one bucket while it learns the order gradients arrive in). With bucket_cap_mb passed, every
    bucket has that cap (what lab 02 does); left unset, the first closes at
    `torch.distributed._DEFAULT_FIRST_BUCKET_BYTES` (1 MiB): pass first_bucket_mb=1, bucket_mb=25.
    """
    sizes = [grad_bytes(p) for p in _trainable(model)[::-1]]
    first = None if first_bucket_mb is None else int(check_bucket_mb(first_bucket_mb) * MB)
    layout = bucket_layout(sizes, int(check_bucket_mb(bucket_mb) * MB), first)
    return [sum(sizes[i] for i in b) for b in layout]


class NaiveDP:
    """One all-reduce per parameter after backward; backward: all-reduce(SUM) / N per grad."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None):
        self.module = model
        self.params = _trainable(model)
        self.group = group
        self.world = dist.get_world_size(group)

    def sync_grads(self) -> None:
        for p in self.params:
            if p.grad is None:  # unused this step: every rank must still join the call
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.group)
            p.grad.div_(self.world)

    def hooks(self) -> StepHooks:
        # Accumulation needs no no_sync: nothing is sent until sync_grads after the last micro-step.
        return _dp_hooks(self.group, sync_grads=self.sync_grads)

    def buffers(self) -> list[int]:
        """Bytes handed to each all-reduce in one step."""
        return [grad_bytes(p) for p in self.params]


@dataclass
class Bucket:
    params: list[nn.Parameter]  # in the order backward produces their gradients
    offsets: list[int]  # element offset of each param in `flat`
    flat: torch.Tensor  # one contiguous gradient buffer, all-reduced in one call
    arrived: list[bool]
    handle: dist.Work | None = None

    @property
    def full(self) -> bool:
        return all(self.arrived)

    @property
    def nbytes(self) -> int:
        return grad_bytes(self.flat)


class BucketedDP:
    """Gradients packed into ~bucket_mb flat buffers, each all-reduced asynchronously as soon as
    backward has filled it (a post-accumulate-grad hook per parameter).

    Backward: for each bucket, async all-reduce(SUM) of the flat buffer; `sync_grads` waits for
    all of them, divides by N and copies the means back into .grad. Buckets are launched strictly
    in bucket order, so every rank issues the same sequence of collectives.
    """

    def __init__(self, model: nn.Module, bucket_mb: float = 25.0,
                 group: dist.ProcessGroup | None = None):
        self.module = model
        self.group = group
        self.world = dist.get_world_size(group)
        params = _trainable(model)[::-1]  # backward produces the last layer's grads first
        self.buckets: list[Bucket] = []
        self._hooks = []
        cap = int(check_bucket_mb(bucket_mb) * MB)
        for indices in bucket_layout([grad_bytes(p) for p in params], cap):
            ps = [params[i] for i in indices]
            offsets = [sum(p.numel() for p in ps[:k]) for k in range(len(ps))]
            flat = torch.zeros(sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device)
            self.buckets.append(Bucket(ps, offsets, flat, [False] * len(ps)))
            for slot, p in enumerate(ps):
                # Fires once per backward, after the (summed) grad is in p.grad: a tied weight
                # used twice still fires once, when both uses have contributed.
                hook = partial(self._grad_ready, len(self.buckets) - 1, slot)
                self._hooks.append(p.register_post_accumulate_grad_hook(hook))
        self._next = 0  # next bucket to launch
        self._sync = True

    def _grad_ready(self, b: int, slot: int, p: torch.Tensor) -> None:
        if not self._sync:  # a non-final micro-step: keep accumulating locally
            return
        bucket = self.buckets[b]
        if bucket.arrived[slot]:
            raise RuntimeError("a gradient arrived twice before sync_grads(); run one backward per "
                               "step, or wrap the earlier micro-steps in no_sync()")
        off = bucket.offsets[slot]
        bucket.flat[off: off + p.numel()].copy_(p.grad.reshape(-1))
        bucket.arrived[slot] = True
        self._launch_full_buckets()

    def _launch_full_buckets(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].full:
            bucket = self.buckets[self._next]
            bucket.handle = dist.all_reduce(bucket.flat, group=self.group, async_op=True)
            self._next += 1

    def sync_grads(self) -> None:
        """Launch what backward left unlaunched (unused params count as zero), wait, unpack."""
        for bucket in self.buckets[self._next:]:
            for slot, p in enumerate(bucket.params):
                if not bucket.arrived[slot]:
                    off = bucket.offsets[slot]
                    bucket.flat[off: off + p.numel()].zero_()
                    bucket.arrived[slot] = True
        self._launch_full_buckets()
        for bucket in self.buckets:
            bucket.handle.wait()
            bucket.flat.div_(self.world)
            for p, off in zip(bucket.params, bucket.offsets):
                mean = bucket.flat[off: off + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)
            bucket.arrived = [False] * len(bucket.params)
            bucket.handle = None
        self._next = 0

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside this block only accumulates into .grad; nothing is sent."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def hooks(self) -> StepHooks:
        return _dp_hooks(self.group, sync_grads=self.sync_grads, no_sync=self.no_sync)

    def buffers(self) -> list[int]:
        return [b.nbytes for b in self.buckets]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


class DDP:
    """torch DistributedDataParallel with a bucket cap in MiB, its buckets recorded in ledgers."""

    def __init__(self, model: nn.Module, bucket_mb: float = 25.0,
                 group: dist.ProcessGroup | None = None):
        device = next(model.parameters()).device
        self.ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            process_group=group, bucket_cap_mb=check_bucket_mb(bucket_mb))
        self.ddp.register_comm_hook(group, ddp_allreduce_hook)
        self.module = self.ddp  # forward through the wrapper: it arms the reducer
        self.bucket_mb, self.group = bucket_mb, group

    def hooks(self) -> StepHooks:
        return _dp_hooks(self.group, no_sync=self.ddp.no_sync)

    def buffers(self) -> list[int]:
        """Predicted steady-state buckets (DDP rebuilds them in the order grads arrived, which
        reverse parameter order predicts; the ledger and DDP's own record check it)."""
        return planned_buckets(self.ddp.module, self.bucket_mb)

    def bucket_sizes(self) -> dict[str, list[int]]:
        """DDP's own record: first-iteration buckets and the rebuilt ones (bytes)."""
        data = self.ddp._get_ddp_logging_data()

        def parse(key: str) -> list[int]:
            return [int(s) for s in str(data.get(key, "")).split(",") if s.strip()]

        return {"first_iteration": parse("bucket_sizes"), "rebuilt": parse("rebuilt_bucket_sizes")}


def make_data_parallel(variant: str, model: nn.Module, bucket_mb: float = 25.0,
                       group: dist.ProcessGroup | None = None) -> NaiveDP | BucketedDP | DDP:
    if variant == "naive":
        return NaiveDP(model, group)
    if variant == "bucketed":
        return BucketedDP(model, bucket_mb, group)
    if variant == "ddp":
        return DDP(model, bucket_mb, group)
    raise ValueError(f"variant={variant!r}; use one of {', '.join(VARIANTS)}")


def _dp_hooks(group: dist.ProcessGroup | None, **hooks) -> StepHooks:
    """A data-parallel scheme's hooks: this rank's slice of each batch, the loss averaged over the group."""
    return StepHooks(dp_rank=dist.get_rank(group), dp_size=dist.get_world_size(group),
                     reduce_loss=mean_over(group), **hooks)


def run_data_parallel(variant: str, config: GPTConfig, data: TokenData, cfg: TrainConfig, *,
                      bucket_mb: float = 25.0, seed: int = 0, device: torch.device | None = None,
                      group: dist.ProcessGroup | None = None) -> RunResult:
    """Train a fresh GPT (weights from `seed`) for cfg.steps under one DP variant, then measure
    one more step's collectives (DDP has rebuilt its buckets by then) and this rank's state bytes."""
    model = fresh_model(config, seed, device)
    dp = make_data_parallel(variant, model, bucket_mb, group)
    optimizer = make_optimizer(model, cfg)
    hooks = dp.hooks()
    run = run_and_capture(dp.module, data, cfg, hooks, name=variant, optimizer=optimizer,
                          block_size=config.block_size)
    state: dict[str, int] = {}  # measured after backward, when every gradient exists

    def record_state() -> None:
        state.update(replicated_state_bytes(model, optimizer))

    ledger = measure_one_step(dp.module, optimizer, data, cfg, hooks.then_sync(record_state),
                              block_size=config.block_size)
    run.comm, run.state_bytes = ledger_by_op(ledger, group), state
    run.details["ledger"] = ledger.to_dict()
    run.buffers = {"all_reduce": dp.buffers()}
    run.analytic = {"all_reduce": analytic("all_reduce", dp.buffers(), dist.get_world_size(group))}
    if isinstance(dp, DDP):
        run.details["ddp_buckets"] = dp.bucket_sizes()
    return run
