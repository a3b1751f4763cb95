"""Seeing the pipeline bubble: gather per-rank timelines, measure idle time, draw it.

The bubble is the part of a step a rank spends waiting: stage s cannot start microbatch 0
before s forwards ahead of it, and must wait at the end for the backwards behind it. For p equal
stages and m microbatches both GPipe and 1F1B idle (p-1)/(m+p-1) of the step. To compare a
measurement with that formula the stages must really be equal, so `SleepStage` is a synthetic
stage whose forward and backward sleep a fixed time: balanced, and p ranks sleeping do not fight
over a 2-core CPU the way p ranks multiplying matrices do.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from journey_dist.parallel.pipeline.schedules import Pipeline, Timeline
from journey_dist.runtime import comm_device, gather_objects, save_figure


def bubble_formula(p: int, m: int) -> float:
    """Idle fraction of a balanced p-stage pipeline with m microbatches (GPipe and 1F1B)."""
    return (p - 1) / (m + p - 1)


def gather_timelines(timeline: Timeline, group: dist.ProcessGroup | None = None) -> list[Timeline]:
    """Every stage's timeline of the last step, in stage order, on every rank (collective)."""
    return [Timeline(d["stage"], [tuple(iv) for iv in d["intervals"]])
            for d in gather_objects(timeline.to_dict(), group)]


def bubble(timelines: list[Timeline]) -> dict:
    """Measured idle fraction per rank over the step (common start to the last backward's end).

    Times are relative to each rank's start of the step, which all ranks leave together (an
    all-gather), so the numbers compare across ranks and hosts without a shared clock.
    """
    window = max(end for t in timelines for _, end, _, _ in t.intervals)
    per_rank = [1.0 - t.busy / window for t in timelines]
    return {"window_s": window, "per_rank": per_rank, "mean": sum(per_rank) / len(per_rank)}


def render_text(timelines: list[Timeline], width: int = 72) -> str:
    """One line per rank: F forward, B backward, a digit where microbatch j starts, . idle."""
    window = max(end for t in timelines for _, end, _, _ in t.intervals)
    lines = []
    for t in timelines:
        row = ["."] * width
        for start, end, kind, mb in t.intervals:
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
    """The order a stage ran its work in, e.g. 'F0 F1 B0 F2 B1 B2'."""
    return " ".join(f"{kind}{mb}" for _, _, kind, mb in sorted(timeline.intervals))


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
    colors = {"F": "tab:blue", "B": "tab:orange"}
    for ax, (title, timelines) in zip(axes[:, 0], panels.items()):
        window = max(end for t in timelines for _, end, _, _ in t.intervals)
        for t in timelines:
            for start, end, kind, mb in t.intervals:
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


class SleepStage(nn.Module):
    """A balanced synthetic stage: every forward takes `f` s and every backward `b` s."""

    def __init__(self, width: int = 16, f: float = 0.02, b: float = 0.04):
        super().__init__()
        self.width, self.f, self.b = width, f, b
        self.w = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, width) -> (B, width)
        return _Sleep.apply(x * self.w, self.f, self.b)

    def boundary_shape(self, micro_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        return (micro_shape[0], self.width)

    @staticmethod
    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out - target).pow(2).mean()


def measure_bubble(schedule: str, m: int, group: dist.ProcessGroup | None = None, f: float = 0.02,
                   b: float = 0.04, width: int = 16) -> dict:
    """Run one warm-up and one measured step of SleepStages; timelines and idle vs the formula."""
    device = comm_device(group)
    pipe = Pipeline(SleepStage(width, f, b).to(device), group, schedule)
    micro = [(torch.ones(2, width, device=device), torch.zeros(2, width, device=device)) for _ in range(m)]
    for _ in range(2):
        pipe.run(micro)
    timelines = gather_timelines(pipe.timeline, group)
    peaks = gather_objects(pipe.peak_inflight, group)
    return {"schedule": schedule, "p": pipe.p, "m": m, "f_s": f, "b_s": b, "timelines": timelines,
            "bubble": bubble(timelines), "formula": bubble_formula(pipe.p, m), "peak_inflight": peaks}


def bubble_sweep(schedules: tuple[str, ...] | list[str], microbatches: list[int], f: float, b: float,
                 group: dist.ProcessGroup | None = None) -> dict[tuple[str, int], dict]:
    """measure_bubble for every (schedule, m) that can run, by (schedule, m) in that order: 1F1B
    needs m >= p (its schedule raises a ConfigError otherwise), GPipe runs any m (and idles more)."""
    p = dist.get_world_size(group)
    return {(s, m): measure_bubble(s, m, group, f, b) for s in schedules for m in microbatches
            if not (s == "1f1b" and m < p)}


def bubble_row(result: dict) -> dict:
    """One measure_bubble result as a flat row: the mean idle fraction next to (p-1)/(m+p-1), each
    stage's idle fraction, the most microbatch activations each stage held at once, the step time."""
    return {"schedule": result["schedule"], "m": result["m"], "measured": result["bubble"]["mean"],
            "per_rank": result["bubble"]["per_rank"], "formula": result["formula"],
            "peak_inflight": result["peak_inflight"], "step_s": result["bubble"]["window_s"]}
