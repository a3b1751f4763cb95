"""Pipeline parallel: GPT-mini cut into p stages that pass activations forward, gradients back.

Stage s of p holds a contiguous run of blocks (or, interleaved, v chunks of them); stage 0 also
embeds the tokens, stage p-1 also runs ln_f, the head and the loss. A batch is split into m
microbatches and a schedule (orders.py: one function per schedule) lists each rank's actions:
F (forward of a microbatch through a chunk), B (its backward; zero-bubble: the input gradient
only) and W (zero-bubble: the weight gradient, split_backward.py). `Pipeline` is the one executor
of every schedule: it runs the actions in order, receiving what each needs from its neighbours.

Every schedule computes the exact gradient of the mean loss over the batch, so parameters match
a single process; they differ in the bubble (the idle part of a step) and in the activations a
stage holds at once (orders.bubble_formula, orders.inflight_formula).

The schedule knows a stage only as an nn.Module with `boundary_shape(micro_shape)` (what it
sends and receives), `loss(output, target)` on the last stage and, with v chunks,
`num_chunks` and forward(x, chunk): what a stage computes (plain blocks, tensor-parallel blocks,
a sleep) is its own business (stage.py builds the GPT's), and a data-parallel group plugs in
after the flush through StepHooks.sync_grads (common.sync_dp_grads).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from journey_dist.config import ConfigError, GPTConfig
from journey_dist.data import TokenData
from journey_dist.parallel.common import clip_fn, mean_over, sync_dp_grads
from journey_dist.parallel.pipeline.orders import (
    SCHEDULES,
    Action,
    check_schedule,
    schedule_order,
    splits_backward,
)
from journey_dist.parallel.pipeline.p2p import P2P, WIRE_DTYPES, ShapeMismatchError
from journey_dist.parallel.pipeline.split_backward import BackwardSplit
from journey_dist.parallel.pipeline.stage import build_stage
from journey_dist.parity import RunResult, fresh_model, run_and_capture
from journey_dist.train import Batch, StepHooks, StepResult, TrainConfig, autocast_context, default_loss

__all__ = ["SCHEDULES", "Pipeline", "Timeline", "check_schedule", "pipeline_run", "schedule_order"]
PLAN_CODES = (*SCHEDULES, "eval")  # what _check_plan sends for a schedule


@dataclass
class Timeline:
    """One rank's compute intervals in a step, in seconds from the step's common start."""

    stage: int
    # start, end, kind (F, B or W), microbatch, chunk
    intervals: list[tuple[float, float, str, int, int]] = field(default_factory=list)
    t0: float = 0.0

    @contextlib.contextmanager
    def span(self, kind: str, mb: int, chunk: int = 0) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.intervals.append((start - self.t0, time.perf_counter() - self.t0, kind, mb, chunk))

    @property
    def busy(self) -> float:
        return sum(iv[1] - iv[0] for iv in self.intervals)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "intervals": self.intervals}


class Pipeline:
    """Runs one stage's part of a pipeline schedule and the step that follows the flush.

    engine="ours" runs `schedule_order` with `P2P`; engine="torch" runs the same stage module
    (one PipelineStage per chunk) with torch.distributed.pipelining's schedule of the same name
    for comparison: ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B, and for zb-h1
    ScheduleInterleavedZeroBubble with one stage per rank (its ZB-H1 case).
    """

    def __init__(self, stage: nn.Module, group: dist.ProcessGroup | None = None, schedule: str = "1f1b",
                 engine: str = "ours", device: torch.device | None = None):
        if schedule not in SCHEDULES or engine not in ("ours", "torch"):
            raise ConfigError(f"schedule={schedule!r}, engine={engine!r}; use {SCHEDULES} and 'ours'/'torch'")
        self.stage, self.group, self.schedule, self.engine = stage, group, schedule, engine
        self.device = device or next(stage.parameters()).device
        self.p2p = P2P(group, self.device)
        self.s, self.p = self.p2p.stage, self.p2p.num_stages
        self.v = getattr(stage, "num_chunks", 1)
        check_schedule(schedule, max(self.p, 1), self.p, self.v)  # the layout (m is checked per step)
        self.is_first, self.is_last = self.s == 0, self.s == self.p - 1
        self.split = BackwardSplit(stage) if splits_backward(schedule) and engine == "ours" else None
        self.timeline = Timeline(self.s)
        self.peak_inflight = 0  # most (microbatch, chunk) activation sets held at once, last step
        self._torch: tuple | None = None

    def first_chunk(self, chunk: int) -> bool:  # virtual stage 0: takes token ids
        return self.is_first and chunk == 0

    def last_chunk(self, chunk: int) -> bool:  # the last virtual stage: computes the loss
        return self.is_last and chunk == self.v - 1

    def _run_stage(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        return self.stage(x, chunk=chunk) if self.v > 1 else self.stage(x)

    # -------------------------------------------------------------- the schedule

    def run(self, micro: list[Batch], autocast: str | None = None,
            forward_only: bool = False) -> torch.Tensor:
        """Forward (and backward) every microbatch; return the mean loss on every stage."""
        m = len(micro)
        if not forward_only:
            check_schedule(self.schedule, m, self.p, self.v)  # e.g. 1F1B with m < p: on every rank
        if self.engine == "torch" and not forward_only:
            return self._run_torch(micro)
        schedule = "eval" if forward_only else self.schedule
        shape = tuple(self.stage.boundary_shape(micro[0][0].shape))
        dtype = next(self.stage.parameters()).dtype  # of activations and gradients between stages
        self._check_plan(schedule, m, shape, dtype)
        order = ([Action("F", j, c) for c in range(self.v) for j in range(m)] if forward_only
                 else schedule_order(schedule, m, self.p, self.s, self.v))
        timeline = Timeline(self.s, t0=time.perf_counter())
        if not forward_only:  # evaluation passes leave the last training step's record alone
            self.timeline, self.peak_inflight = timeline, 0
        saved: dict[tuple[int, int], tuple] = {}  # (mb, chunk) -> what its B (and W) need
        total = torch.zeros((), device=self.device)
        receive = self._receiver(order, shape, dtype)
        for kind, j, c in order:
            if kind == "F":
                x, y = micro[j]
                inp = x if self.first_chunk(c) else receive("F", c).requires_grad_(not forward_only)
                keep = self.split and not forward_only  # the module outputs W will start from
                capture = self.split.capture() if keep else contextlib.nullcontext([])
                with timeline.span("F", j, c), autocast_context(self.device, autocast), capture as captured:
                    out = self._run_stage(inp, c)
                    if self.last_chunk(c):
                        out = self.stage.loss(out, y) / m  # gradient of the mean over microbatches
                        total += out.detach()
                if not self.last_chunk(c):
                    self.p2p.send(out.detach(), "F", j, shape, dtype, c + (self.s == self.p - 1))
                if not forward_only:
                    saved[j, c] = (inp, out, captured)
                    self.peak_inflight = max(self.peak_inflight, len(saved))
            elif kind == "B":
                inp, out, captured = saved[j, c] if self.split else saved.pop((j, c))
                grad = None if self.last_chunk(c) else receive("B", c)
                with timeline.span("B", j, c):
                    if self.split:  # the input gradient only; the weights wait for W
                        dinp, at_outputs = self.split.input_grad(out, grad, inp, captured)
                        saved[j, c] = (captured, at_outputs)
                    else:
                        torch.autograd.backward(out, grad)
                        dinp = inp.grad
                if not self.first_chunk(c):
                    self.p2p.send(dinp, "B", j, shape, dtype, c - (self.s == 0))
            else:
                captured, at_outputs = saved.pop((j, c))
                with timeline.span("W", j, c):
                    self.split.weight_grad(captured, at_outputs)
        self.p2p.wait_sends()
        return self._broadcast_loss(total)

    def _receiver(self, order: list[Action], shape: tuple[int, ...],
                  dtype: torch.dtype) -> Callable[[str, int], torch.Tensor]:
        """receive(kind, chunk) -> the next message of that channel, keeping the one after it posted."""
        todo: dict[tuple[str, int], list[int]] = {}
        for kind, j, c in order:
            if (kind == "F" and not self.first_chunk(c)) or (kind == "B" and not self.last_chunk(c)):
                todo.setdefault((kind, c), []).append(j)
        posted: dict[tuple[str, int], tuple] = {}

        def prefetch() -> None:
            for (kind, c), queue in todo.items():
                if queue and (kind, c) not in posted:
                    posted[kind, c] = self.p2p.post(kind, queue.pop(0), shape, dtype, c)

        def receive(kind: str, chunk: int) -> torch.Tensor:
            prefetch()
            buf = self.p2p.take(posted.pop((kind, chunk)))
            prefetch()
            return buf

        prefetch()
        return receive

    def _check_plan(self, schedule: str, m: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """All stages must agree on schedule, chunks, microbatch count, boundary shape and dtype
        (fails on all)."""
        mine = torch.tensor([PLAN_CODES.index(schedule), self.v, m, WIRE_DTYPES.index(dtype), len(shape),
                             *shape, *[0] * (4 - len(shape))], device=self.device)
        plans = [torch.empty_like(mine) for _ in range(self.p)]
        dist.all_gather(plans, mine, group=self.group)  # also lines the stages up for the timeline
        if any(not torch.equal(plan, mine) for plan in plans):
            rows = enumerate(t.tolist() for t in plans)
            desc = "; ".join(f"stage {s}: {PLAN_CODES[q[0]]}" + (f" with {q[1]} chunks" if q[1] > 1 else "")
                             + f", {q[2]} microbatches, activations {tuple(q[5:5 + q[4]])} "
                             + f"{WIRE_DTYPES[q[3]]}"
                             for s, q in rows)
            raise ShapeMismatchError(
                f"pipeline stages disagree ({desc}); build every stage from the same GPTConfig and run "
                f"the same schedule on the same batch split")

    def _broadcast_loss(self, total: torch.Tensor) -> torch.Tensor:
        dist.broadcast(total, self.p2p.ranks[-1], group=self.group)  # for logging on every stage
        return total

    def _run_torch(self, micro: list[Batch]) -> torch.Tensor:
        # deferred: importing torch.distributed.pipelining costs ~1 s and only this comparison uses it
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
            ScheduleInterleavedZeroBubble,
        )

        m = len(micro)
        if self._torch is None or self._torch[0] != m:
            if self.schedule in ("gpipe", "1f1b"):
                stage = PipelineStage(self.stage, self.s, self.p, self.device, group=self.group)
                cls = ScheduleGPipe if self.schedule == "gpipe" else Schedule1F1B
                sched = cls(stage, n_microbatches=m, loss_fn=self.stage.loss)  # grads scaled 1/m
            else:
                chunks = [self.stage.chunk_module(c) if self.v > 1 else self.stage for c in range(self.v)]
                stages = [PipelineStage(chunk, self.s + c * self.p, self.p * self.v, self.device,
                                        group=self.group) for c, chunk in enumerate(chunks)]
                interleaved = self.schedule == "interleaved"
                cls = ScheduleInterleaved1F1B if interleaved else ScheduleInterleavedZeroBubble
                sched = cls(stages, n_microbatches=m, loss_fn=self.stage.loss)
            self._torch = (m, sched)
        sched = self._torch[1]
        x, y = torch.cat([b[0] for b in micro]), torch.cat([b[1] for b in micro])
        losses: list[torch.Tensor] = []
        if self.is_first:
            sched.step(x)
        elif self.is_last:
            sched.step(target=y, losses=losses)
        else:
            sched.step()
        total = torch.stack(losses).mean().detach() if self.is_last else torch.zeros((), device=self.device)
        return self._broadcast_loss(total)

    # -------------------------------------------------------------- after the flush

    def sync_tied_grads(self) -> None:
        """Add the first stage's wte grad and the last stage's head-copy grad, on both.

        Forward: nothing. After the flush: first and last stage swap their (V, C) gradients (an
        all-reduce of two); a + b == b + a bit for bit, so both copies take the same step.
        """
        weight = self.stage.tied_weight() if hasattr(self.stage, "tied_weight") else None
        if weight is None:
            return
        peer = self.p2p.ranks[-1] if self.is_first else self.p2p.ranks[0]
        grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        other = torch.empty_like(grad)
        ops = [dist.P2POp(dist.isend, grad, peer, self.group),
               dist.P2POp(dist.irecv, other, peer, self.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        weight.grad = grad + other

    def is_duplicate(self, p: torch.Tensor) -> bool:
        """The last stage's copy of the tied embedding: its gradient is counted on the first stage."""
        tied = self.stage.tied_weight() if hasattr(self.stage, "tied_weight") else None
        return tied is not None and self.is_last and not self.is_first and p is tied

    # -------------------------------------------------------------- the loop's contract

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro: list[Batch],
                   hooks: StepHooks, *, grad_clip: float = 0.0, autocast: str | None = None,
                   scaler: torch.amp.GradScaler | None = None) -> StepResult:
        """StepHooks.step_fn for a pipeline: the schedule (the last stage's own loss), the tied-grad
        sync, hooks.sync_grads (e.g. a dp all-reduce), clip (default: the norm over the pipeline
        group), optimizer step, zero grads."""
        if hooks.loss is not default_loss:
            raise ConfigError("a pipeline computes its training loss on the last stage (stage.loss); "
                              "StepHooks.loss is not used: give the stage the loss instead")
        if scaler is not None:  # each stage would find (and skip on) its own overflows
            raise ConfigError("fp16 loss scaling is not implemented for pipeline stages; "
                              "use autocast='bf16' (or None)")
        loss = self.run(list(micro), autocast)
        self.sync_tied_grads()
        if hooks.sync_grads is not None:
            hooks.sync_grads()
        norm = None
        if grad_clip > 0:
            clip = hooks.clip or clip_fn([self.group], self.is_duplicate)
            norm = clip(list(model.parameters()), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, norm)

    def eval_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A forward-only pass through every stage; the loss on every stage (StepHooks.eval_loss)."""
        return self.run([(x, y)], forward_only=True)

    def hooks(self) -> StepHooks:
        """The loop's hooks: this pipeline's step and its evaluation loss."""
        return StepHooks(step_fn=self.train_step, eval_loss=self.eval_loss)


# ----------------------------------------------------------------------------- parity runs


def pipeline_run(config: GPTConfig, data: TokenData, cfg: TrainConfig, *, schedule: str = "1f1b",
                 engine: str = "ours", group: dist.ProcessGroup | None = None,
                 dp_group: dist.ProcessGroup | None = None, seed: int = 0,
                 virtual_stages: int | None = None) -> tuple[RunResult, Pipeline]:
    """The same training, this rank holding one stage; cfg.grad_accum is the microbatch count.

    With `dp_group`, each data-parallel replica of the pipeline takes its share of the global
    batch and gradients are averaged over the replicas after the flush (pp x dp).
    `virtual_stages`: chunks per rank (default: 2 for the interleaved schedule, else 1).
    """
    v = virtual_stages if virtual_stages is not None else (2 if schedule == "interleaved" else 1)
    check_schedule(schedule, cfg.grad_accum, dist.get_world_size(group), v)
    stage = build_stage(fresh_model(config, seed), group, v)
    pipe = Pipeline(stage, group, schedule, engine)
    hooks = pipe.hooks()
    if dp_group is not None:
        hooks = hooks.with_(sync_grads=lambda: sync_dp_grads(stage, dp_group),
                            reduce_loss=mean_over(dp_group), dp_rank=dist.get_rank(dp_group),
                            dp_size=dist.get_world_size(dp_group))
    return run_and_capture(stage, data, cfg, hooks, name=f"pipeline {schedule} ({engine})"), pipe
