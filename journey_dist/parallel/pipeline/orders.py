"""Pipeline schedules as lists of actions, their bubble and memory formulas, and a simulator.

A schedule is, for every rank, the order of its actions (kind, microbatch, chunk):

    F  forward of one microbatch through one chunk of layers
    B  backward: the full backward, or (zero-bubble) only the gradient of the chunk's input
    W  (zero-bubble only) the weight gradients of a microbatch whose B has run

p ranks, m microbatches; a rank holds v chunks (virtual stages; v = 1 except interleaved). Rank r's
chunk c is virtual stage r + c·p of p·v, so activations go round the ranks v times (Megatron's
interleaving). One function per schedule lists the actions; `Pipeline` (schedules.py) executes
any of them. Sends never block and receives do, so an order runs exactly when `simulate` (every
rank taking its actions in order, each waiting for what it needs) finishes it; the tests run
every schedule through it.

    gpipe        F0..F(m-1) then B0..B(m-1)                                 bubble (p-1)/(m+p-1)
    1f1b         p-r-1 warm-up forwards, then F and B in turn (PipeDream)    same bubble, <= p held
    interleaved  Megatron's: v chunks, warm-up 2(p-r-1) + (v-1)p             (p-1)/(v·m+p-1)
    zb-h1        1F1B with B split into B and W; rank r defers its first r W's (Qi et al. 2023)
                 bubble (p-1)(F+B-W) time: a third of 1F1B's when F = B = W

This module is plain arithmetic (no torch): `journey plan` and the memory estimate use it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from journey_dist.config import PIPELINE_SCHEDULES, ConfigError, ParallelConfig

SCHEDULES = PIPELINE_SCHEDULES  # ("gpipe", "1f1b", "interleaved", "zb-h1")


class Action(NamedTuple):
    kind: str  # "F", "B" or "W"
    mb: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.mb}" + (f".{self.chunk}" if self.chunk else "")


def check_schedule(schedule: str, microbatches: int, num_stages: int, virtual: int = 1) -> None:
    """ConfigError for a schedule that cannot run (1F1B with m < p, interleaved with m % p, ...)."""
    ParallelConfig(pp=num_stages, microbatches=microbatches, schedule=schedule,
                   virtual_stages=virtual).validate()


# ----------------------------------------------------------------------------- the schedules


def gpipe_order(p: int, m: int, rank: int, v: int = 1) -> list[Action]:
    """All forwards, then all backwards: every microbatch's activations are held at once."""
    return [Action("F", j) for j in range(m)] + [Action("B", j) for j in range(m)]


def one_f_one_b_order(p: int, m: int, rank: int, v: int = 1) -> list[Action]:
    """p-rank-1 warm-up forwards, then one F and one B in turn, then the remaining B's: at most
    p - rank microbatches held. p=2, m=3, rank 0: F0 F1 B0 F2 B1 B2."""
    warmup = min(p - rank - 1, m)
    order = [Action("F", j) for j in range(warmup)]
    for k in range(m - warmup):
        order += [Action("F", warmup + k), Action("B", k)]
    return order + [Action("B", k) for k in range(m - warmup, m)]


def interleaved_order(p: int, m: int, rank: int, v: int = 2) -> list[Action]:
    """Megatron's interleaved 1F1B (Narayanan et al. 2021, schedules.py of Megatron-LM): the
    k-th forward of a rank runs microbatch (k // pv)·p + k % p through chunk (k // p) % v, so p
    microbatches go through chunk 0, then the same p through chunk 1, ...; backwards run the chunks
    in reverse. Warm-up: 2(p - rank - 1) + (v - 1)·p forwards, then F and B in turn."""
    total = m * v

    def mb(k: int) -> int:
        return (k // (p * v)) * p + k % p

    def chunk(k: int, forward: bool) -> int:
        c = (k // p) % v
        return c if forward else v - 1 - c

    warmup = min(2 * (p - rank - 1) + (v - 1) * p, total)
    order = [Action("F", mb(k), chunk(k, True)) for k in range(warmup)]
    for k in range(total - warmup):
        order += [Action("F", mb(warmup + k), chunk(warmup + k, True)), Action("B", mb(k), chunk(k, False))]
    return order + [Action("B", mb(k), chunk(k, False)) for k in range(total - warmup, total)]


def zb_h1_order(p: int, m: int, rank: int, v: int = 1) -> list[Action]:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", section 3.1; torch's
    ScheduleInterleavedZeroBubble with one stage per rank): 1F1B's F and B order, B being only
    the input gradient (what the previous stage waits for); each B is followed by the W of the
    oldest microbatch still waiting, except that rank r lets its first r W's wait, to run them
    at the end where 1F1B would idle. Rank r holds up to p microbatches (1F1B: p - r); the most
    any rank holds, p on rank 0, is 1F1B's."""
    order, waiting = [], []
    for action in one_f_one_b_order(p, m, rank):
        order.append(action)
        if action.kind == "B":
            waiting.append(action.mb)
            if len(waiting) > rank:
                order.append(Action("W", waiting.pop(0)))
    return order + [Action("W", j) for j in waiting]


ORDERS: dict[str, Callable[[int, int, int, int], list[Action]]] = {
    "gpipe": gpipe_order, "1f1b": one_f_one_b_order, "interleaved": interleaved_order, "zb-h1": zb_h1_order}


def schedule_order(schedule: str, microbatches: int, num_stages: int, stage: int,
                   virtual: int = 1) -> list[Action]:
    """The actions one rank runs, in order (checks the schedule first: a ConfigError if it cannot run)."""
    check_schedule(schedule, microbatches, num_stages, virtual)
    return ORDERS[schedule](num_stages, microbatches, stage, virtual)


def splits_backward(schedule: str) -> bool:
    """Whether the schedule runs B (input gradient) and W (weight gradient) separately."""
    return schedule == "zb-h1"


# ----------------------------------------------------------------------------- formulas


def bubble_formula(schedule: str, p: int, m: int, v: int = 1, *, t_f: float = 1.0, t_b: float = 1.0,
                   t_w: float = 1.0) -> float:
    """Idle fraction of a step on balanced stages: idle time / (idle + busy) per rank.

    gpipe, 1f1b: (p-1)/(m+p-1) (GPipe, Huang et al. 2019); interleaved: (p-1)/(v·m+p-1), the
    bubble time divided by v (Narayanan et al. 2021). zb-h1 (Qi et al. 2023): idle time
    (p-1)(t_f + t_b - t_w) against busy m(t_f + t_b + t_w), with t_b the input-gradient half of
    the backward and t_w the weight-gradient half (both 1: (p-1)/(3m+p-1)); the paper's
    expression holds while t_w <= t_b (a W fits in each slot a B leaves)."""
    check_schedule(schedule, m, p, v)
    if schedule == "zb-h1":
        if t_w > t_b:
            raise ConfigError(f"the ZB-H1 bubble expression assumes t_w <= t_b (got t_w={t_w}, t_b={t_b}): "
                              "a W must fit in the slot a B leaves; use simulate() for these times")
        idle = (p - 1) * (t_f + t_b - t_w)
        return idle / (m * (t_f + t_b + t_w) + idle)
    return (p - 1) / ((v if schedule == "interleaved" else 1) * m + p - 1)


def bubble_expression(schedule: str, p: int, m: int, v: int = 1) -> str:
    """bubble_formula written out with the numbers (equal F, B and W times for zb-h1)."""
    if schedule == "zb-h1":
        return f"(p-1)/(3m+p-1) = ({p}-1)/(3*{m}+{p}-1)"
    if schedule == "interleaved":
        return f"(p-1)/(v*m+p-1) = ({p}-1)/({v}*{m}+{p}-1)"
    return f"(p-1)/(m+p-1) = ({p}-1)/({m}+{p}-1)"


def inflight_formula(schedule: str, p: int, m: int, rank: int, v: int = 1) -> int:
    """Most (microbatch, chunk) activation sets rank `rank` holds at once (a chunk is 1/v of the
    rank's layers, so the rank's activation memory is this / v of a whole stage's per microbatch).

    gpipe m; 1f1b min(p - rank, m); interleaved min(2(p - rank - 1) + (v - 1)p + 1, v·m)
    (Megatron's warm-up plus the one in flight); zb-h1 min(p, m) on every rank (a microbatch is
    held from its F to its W)."""
    check_schedule(schedule, m, p, v)
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(p - rank, m)
    if schedule == "interleaved":
        return min(2 * (p - rank - 1) + (v - 1) * p + 1, v * m)
    return min(p, m)


def held_counts(order: list[Action], splits: bool) -> int:
    """Most activation sets an order holds at once, counted from the order (F takes one; B, or
    W when the backward is split, gives it back)."""
    held = peak = 0
    for a in order:
        held += 1 if a.kind == "F" else -1 if a.kind == ("W" if splits else "B") else 0
        peak = max(peak, held)
    return peak


# ----------------------------------------------------------------------------- simulation


def simulate(schedule: str, p: int, m: int, v: int = 1, *, t_f: float = 1.0, t_b: float = 1.0,
             t_w: float = 1.0) -> list[list[tuple[float, float, Action]]]:
    """Run every rank's order with fixed times per action (per chunk: t_f/v, t_b/v, t_w/v; a
    full backward is t_b + t_w) and free communication; each action starts when its rank is
    free and what it needs is done (F: the previous virtual stage's F; B: the next one's B; W:
    its own B). Returns each rank's (start, end, action); raises RuntimeError on a deadlock."""
    orders = [schedule_order(schedule, m, p, r, v) for r in range(p)]
    split, stages = splits_backward(schedule), p * v
    cost = {"F": t_f / v, "B": (t_b if split else t_b + t_w) / v, "W": t_w / v}
    done: dict[tuple[str, int, int], float] = {}  # (kind, mb, virtual stage) -> end time
    free, pos = [0.0] * p, [0] * p
    out: list[list[tuple[float, float, Action]]] = [[] for _ in range(p)]
    while any(pos[r] < len(orders[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            while pos[r] < len(orders[r]):
                a = orders[r][pos[r]]
                k = r + a.chunk * p
                need = {"F": ("F", a.mb, k - 1) if k > 0 else None,
                        "B": ("B", a.mb, k + 1) if k < stages - 1 else ("F", a.mb, k),
                        "W": ("B", a.mb, k)}[a.kind]
                if need is not None and need not in done:
                    break
                start = max(free[r], done[need] if need else 0.0)
                free[r] = start + cost[a.kind]
                done[a.kind, a.mb, k] = free[r]
                out[r].append((start, free[r], a))
                pos[r] += 1
                progressed = True
        if not progressed:
            stuck = {r: str(orders[r][pos[r]]) for r in range(p) if pos[r] < len(orders[r])}
            raise RuntimeError(f"{schedule} p={p} m={m} v={v} deadlocks: ranks wait at {stuck}")
    return out


def simulated_bubble(timeline: list[list[tuple[float, float, Action]]]) -> float:
    """Mean idle fraction over ranks of a simulated step (window: common start to the last end)."""
    window = max(end for rank in timeline for _, end, _ in rank)
    return sum(1 - sum(e - s for s, e, _ in rank) / window for rank in timeline) / len(timeline)


def stage_chunks(p: int, v: int, rank: int) -> list[int]:
    """The virtual stages rank `rank` holds: rank, rank + p, ..., rank + (v-1)p."""
    if not 0 <= rank < p:
        raise ConfigError(f"rank {rank} is not a pipeline rank of pp={p}; use 0..{p - 1}")
    return [rank + c * p for c in range(v)]
