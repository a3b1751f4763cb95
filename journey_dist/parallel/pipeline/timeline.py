"""Seeing the pipeline bubble: gather per-rank timelines, measure idle time, draw it.

The bubble is the part of a step a rank spends waiting: stage s cannot start microbatch 0
before s forwards ahead of it, and must wait at the end for the backwards behind it. For p equal
stages and m microbatches both GPipe and 1F1B idle (p-1)/(m+p-1) of the step; the interleaved
and zero-bubble schedules less (orders.bubble_formula). To compare a measurement with a formula
the stages must really be equal, so `SleepStage` is a synthetic stage whose forward, input
gradient and weight gradient sleep fixed times: balanced, and p ranks sleeping do not fight over
a 2-core CPU the way p ranks multiplying matrices do.

How the bubble is measured: every rank records the start and end of each F, B and W it runs
(perf_counter, from a start all ranks leave together: the schedule's plan all-gather); the
window is the step's common start to the last end on any rank, and a rank's idle fraction is
1 - (its busy time) / window. The mean over ranks is the measured bubble. Message latency and
timer jitter only add idle time.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from journey_dist.parallel.pipeline.orders import bubble_formula, inflight_formula, splits_backward
from journey_dist.parallel.pipeline.schedules import Pipeline, Timeline
from journey_dist.runtime import comm_device, gather_objects, save_figure

__all__ = ["SleepStage", "bubble", "bubble_formula", "bubble_row", "bubble_sweep", "gather_timelines",
           "measure_bubble", "plot_timelines", "render_text", "timelines_text"]


def gather_timelines(timeline: Timeline, group: dist.ProcessGroup | None = None) -> list[Timeline]:
    """Every stage's timeline of the last step, in stage order, on every rank (collective)."""
    return [Timeline(d["stage"], [tuple(iv) for iv in d["intervals"]])
            for d in gather_objects(timeline.to_dict(), group)]


def _window(timelines: list[Timeline]) -> float:
    return max(iv[1] for t in timelines for iv in t.intervals)


def bubble(timelines: list[Timeline]) -> dict:
    """Measured idle fraction per rank over the step (common start to the last backward's end).

    Times are relative to each rank's start of the step, which all ranks leave together (an
    all-gather), so the numbers compare across ranks and hosts without a shared clock.
    """
    window = _window(timelines)
    per_rank = [1.0 - t.busy / window for t in timelines]
    return {"window_s": window, "per_rank": per_rank, "mean": sum(per_rank) / len(per_rank)}


def render_text(timelines: list[Timeline], width: int = 72) -> str:
    """One line per rank: F forward, B backward (input gradient when split), W weight gradient,
    a digit where microbatch j starts, . idle."""
    window = _window(timelines)
    lines = []
    for t in timelines:
        row = ["."] * width
        for start, end, kind, mb, _ in t.intervals:
            a = min(width - 1, int(start / window * width))
            z = max(a + 1, min(width, int(end / window * width)))
            row[a:z] = kind * (z - a)
            if z - a >= 2:
                row[a] = str(mb % 10)
        idle = 1.0 - t.busy / window
        lines.append(f"stage {t.stage} |{''.join(row)}| idle {idle:5.1%}")
    lines.append(f"{'':8}one column = {window / width * 1e3:.1f} ms; step {window * 1e3:.0f} ms")
    return "\n".join(lines)


def order_text(timeline: Timeline) -> str:
    """The order a stage ran its work in, e.g. 'F0 F1 B0 F2 B1 B2' (chunk c > 0 as 'F0.1')."""
    return " ".join(f"{kind}{mb}" + (f".{c}" if c else "")
                    for _, _, kind, mb, c in sorted(timeline.intervals))


def timelines_text(panels: dict[str, list[Timeline]], *, orders: bool = False) -> str:
    """render_text of each panel under its title; with `orders`, the order each stage ran its work."""
    parts = []
    for title, timelines in panels.items():
        lines = [f"{title}:", render_text(timelines)]
        lines += [f"  stage {t.stage} order: {order_text(t)}" for t in timelines] if orders else []
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot_timelines(panels: dict[str, list[Timeline]], path: str | Path) -> Path:
    """A Gantt chart per panel (one row per stage) saved as PNG; returns the path."""
    import matplotlib  # deferred: matplotlib's import takes ~1 s and only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 1.1 + 0.6 * sum(len(t) for t in panels.values())),
                             squeeze=False)
    colors = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green"}
    for ax, (title, timelines) in zip(axes[:, 0], panels.items()):
        window = _window(timelines)
        for t in timelines:
            for start, end, kind, mb, _ in t.intervals:
                ax.broken_barh([(start * 1e3, (end - start) * 1e3)], (t.stage - 0.4, 0.8), color=colors[kind],
                               edgecolor="white", linewidth=0.6)
                if (end - start) / window > 0.015:
                    ax.text((start + end) / 2 * 1e3, t.stage, f"{kind}{mb}", ha="center", va="center",
                            fontsize=7, color="white")
        ax.set_yticks([t.stage for t in timelines], [f"stage {t.stage}" for t in timelines])
        ax.invert_yaxis()
        ax.set_xlim(0, window * 1e3)
        ax.set_title(f"{title}: measured bubble {bubble(timelines)['mean']:.1%}", fontsize=9)
    axes[-1, 0].set_xlabel("ms since the step started (white gaps: idle)")
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- synthetic stages


class _Sleep(torch.autograd.Function):
    """Identity whose forward sleeps f seconds and backward b seconds."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, f: float, b: float) -> torch.Tensor:
        time.sleep(f)
        ctx.b = b
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        time.sleep(ctx.b)
        return grad, None, None


class _SleepScale(nn.Module):
    """x * w, where the weight's gradient path sleeps `w_s`: autograd runs it only when the
    weight gradient is asked for (a full backward, or a zero-bubble W), not in an input-only B."""

    def __init__(self, width: int, w_s: float):
        super().__init__()
        self.w_s = w_s
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _Sleep.apply(self.weight, 0.0, self.w_s)


class SleepStage(nn.Module):
    """A balanced synthetic stage of `chunks` chunks: a forward of the whole stage sleeps `f` s,
    its input gradient `b` s and its weight gradient `w` s (a full backward: b + w), split evenly
    over the chunks."""

    def __init__(self, width: int = 16, f: float = 0.02, b: float = 0.02, w: float = 0.02, chunks: int = 1):
        super().__init__()
        self.width, self.f, self.b, self.w, self.num_chunks = width, f, b, w, chunks
        self.scales = nn.ModuleList(_SleepScale(width, w / chunks) for _ in range(chunks))

    def forward(self, x: torch.Tensor, chunk: int = 0) -> torch.Tensor:  # (B, width) -> (B, width)
        return _Sleep.apply(self.scales[chunk](x), self.f / self.num_chunks, self.b / self.num_chunks)

    def boundary_shape(self, micro_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        return (micro_shape[0], self.width)

    @staticmethod
    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out - target).pow(2).mean()


def measure_bubble(schedule: str, m: int, group: dist.ProcessGroup | None = None, f: float = 0.02,
                   b: float = 0.02, w: float = 0.02, width: int = 16, virtual: int = 1,
                   repeats: int = 3) -> dict:
    """Run a warm-up step and `repeats` measured steps of SleepStages and keep the shortest (a
    busy machine only ever lengthens a step: a late wake-up from a sleep, a descheduled rank);
    its timelines, idle fraction next to the schedule's formula, and the activation sets each
    stage held next to orders.inflight_formula."""
    device = comm_device(group)
    stage = SleepStage(width, f, b, w, virtual).to(device)
    pipe = Pipeline(stage, group, schedule)
    micro = [(torch.ones(2, width, device=device), torch.zeros(2, width, device=device)) for _ in range(m)]
    pipe.run(micro)
    steps = []
    for _ in range(repeats):
        pipe.run(micro)
        steps.append(gather_timelines(pipe.timeline, group))
    timelines = min(steps, key=_window)
    peaks = gather_objects(pipe.peak_inflight, group)
    t_b = b if splits_backward(schedule) else b + w  # 1F1B's B is the whole backward
    formula = bubble_formula(schedule, pipe.p, m, virtual, t_f=f, t_b=b, t_w=w)
    return {"schedule": schedule, "p": pipe.p, "m": m, "v": virtual, "f_s": f, "b_s": t_b,
            "w_s": w if splits_backward(schedule) else 0.0, "timelines": timelines,
            "bubble": bubble(timelines), "formula": formula, "peak_inflight": peaks,
            "inflight_formula": [inflight_formula(schedule, pipe.p, m, r, virtual) for r in range(pipe.p)]}


def runnable(schedule: str, p: int, m: int) -> bool:
    """Whether a schedule runs with m microbatches on p stages (1F1B and ZB-H1: m >= p;
    interleaved: m a multiple of p; GPipe: any m, idling more)."""
    if schedule in ("1f1b", "zb-h1"):
        return m >= p
    return m % p == 0 if schedule == "interleaved" else True


def bubble_sweep(schedules: tuple[str, ...] | list[str], microbatches: list[int], f: float, b: float,
                 w: float, group: dist.ProcessGroup | None = None,
                 virtual: int = 2) -> dict[tuple[str, int], dict]:
    """measure_bubble for every (schedule, m) that can run (`runnable`), by (schedule, m) in that
    order; the interleaved schedule with `virtual` chunks per rank."""
    p = dist.get_world_size(group)
    return {(s, m): measure_bubble(s, m, group, f, b, w, virtual=virtual if s == "interleaved" else 1)
            for s in schedules for m in microbatches if runnable(s, p, m)}


def bubble_row(result: dict) -> dict:
    """One measure_bubble result as a flat row: the mean idle fraction next to the schedule's
    formula, each stage's idle fraction, the activation sets each stage held at once next to
    their formula, the step time."""
    return {"schedule": result["schedule"], "m": result["m"], "v": result["v"],
            "measured": result["bubble"]["mean"], "per_rank": result["bubble"]["per_rank"],
            "formula": result["formula"], "peak_inflight": result["peak_inflight"],
            "inflight_formula": result["inflight_formula"], "step_s": result["bubble"]["window_s"]}
