"""`journey calibrate`: measure this machine for the `cpu-gloo` cluster preset.

Four measurements, each the median of repeated timings:

    matmul       one thread's fp32 FLOP/s on a 1024 x 1024 x 1024 matmul: the "peak"
    memory       bytes/s of an in-place multiply over a 128 MB tensor (read + write): the rate
                 of the memory-bound optimizer step
    all-reduce   gloo on 2 local ranks, buffers of 4 KiB to 16 MiB; a least-squares line
                 t = 2 alpha + bytes / bandwidth (all-reduce on 2 ranks: 2(n-1) = 2 latency steps,
                 2(n-1)/n = 1 x the buffer on the wire) gives the latency alpha and the bandwidth
    efficiency   one process training GPT-mini (batch 8 x 128, fp32 AdamW, one thread): its
                 fwd + bwd FLOPs / ((step time - the modelled optimizer step) x matmul peak), the
                 fraction of the matmul rate a whole step reaches (the compute_efficiency constant)

A shared machine runs other jobs: a process that could run often waits for a CPU. Linux counts
that wait per thread (/proc/<pid>/task/*/schedstat: time on a CPU, time runnable but waiting), so
every timing here is taken as it would be on an idle machine: wall time x on-CPU / (on-CPU +
waiting) (`LoadClock`; plain wall time where schedstat does not exist). The preset then says what
this machine does unloaded, with its `os.cpu_count()` cores shared by the ranks.

None of the runs the plan is validated against (benchmarks/plan_validation_cpu.py: labs 02-05 on
2 and 4 ranks) is used here.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from journey_dist.cluster import CLUSTERS, Cluster, Link
from journey_dist.config import get_preset
from journey_dist.data import get_batch, load_tokens
from journey_dist.flops import model_flops_per_token
from journey_dist.memory.estimate import param_count
from journey_dist.parity import fresh_model
from journey_dist.runtime import spawn
from journey_dist.steptime import optimizer_seconds
from journey_dist.train import TrainConfig, make_optimizer

ALLREDUCE_BYTES = tuple(2**k for k in range(12, 25, 2))  # 4 KiB .. 16 MiB
_TASKS = Path("/proc/self/task")


@dataclass(frozen=True)
class Sample:
    """Wall seconds, and this process's seconds on a CPU and waiting for one (all threads)."""

    wall: float
    cpu: float
    wait: float


def sample() -> Sample:
    """Now: perf_counter and the schedstat sums over this process's threads (0, 0 without them)."""
    cpu = wait = 0
    try:
        for task in _TASKS.iterdir():
            on_cpu, waiting, _ = (task / "schedstat").read_text().split()
            cpu, wait = cpu + int(on_cpu), wait + int(waiting)
    except (OSError, ValueError):  # no schedstat (not Linux), or a thread exited while read
        pass
    return Sample(time.perf_counter(), cpu / 1e9, wait / 1e9)


def unloaded(start: list[Sample], end: list[Sample]) -> float:
    """The interval's wall time as on an idle machine, from one Sample per process at each end:
    the longest wall time x (seconds on a CPU) / (seconds on a CPU + seconds waiting for one)."""
    wall = max(e.wall - s.wall for s, e in zip(start, end))
    cpu = sum(e.cpu - s.cpu for s, e in zip(start, end))
    wait = sum(e.wait - s.wait for s, e in zip(start, end))
    return wall * cpu / (cpu + wait) if cpu + wait > 0 else wall


@contextmanager
def load_clock() -> Iterator[list[float]]:
    """`with load_clock() as t:` ... then t[0] is the block's unloaded seconds (this process)."""
    out: list[float] = []
    start = sample()
    yield out
    out.append(unloaded([start], [sample()]))


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median unloaded seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with load_clock() as t:
            fn()
        times.append(t[0])
    return statistics.median(times)


def matmul_flops(n: int = 1024, repeats: int = 15) -> float:
    """One thread's fp32 FLOP/s on an n x n x n matmul (2 n^3 FLOPs)."""
    with _threads(1):
        a, b = torch.randn(n, n), torch.randn(n, n)
        return 2 * n**3 / median_time(lambda: a @ b, repeats)


def reference_rate(bandwidth: float, repeats: int = 5) -> float | None:
    """Inside a running job (collective): the FLOP/s rank 0 reaches on the reference GPT-mini step
    (step_efficiency's, the modelled optimizer step taken out), measured alone while the other
    ranks wait, seconds before the job's own work and so under the same conditions. Rank 0 gets
    the rate, the others None."""
    dist.barrier()
    rate = None
    if dist.get_rank() == 0:
        step = step_efficiency(1.0, bandwidth, repeats=repeats)
        rate = step["flops"] / (step["step_s"] - step["optimizer_s"])
    dist.barrier()
    return rate


def memory_bandwidth(numel: int = 32 * 2**20, repeats: int = 15) -> float:
    """Bytes/s of x *= c in place over `numel` fp32 values (each read once and written once)."""
    with _threads(1):
        x = torch.ones(numel)
        return 2 * 4 * numel / median_time(lambda: x.mul_(1.0), repeats)


def _allreduce_samples(sizes: tuple[int, ...], repeats: int) -> list[list[tuple[Sample, Sample]]]:
    """On every rank: per buffer size, (start, end) Samples of each all-reduce (a barrier first)."""
    out = []
    for nbytes in sizes:
        buf = torch.zeros(nbytes // 4)
        dist.barrier()
        for _ in range(2):  # warm-up
            dist.all_reduce(buf)
        runs = []
        for _ in range(repeats):
            start = sample()
            dist.all_reduce(buf)
            runs.append((start, sample()))
        out.append(runs)
    return out


def allreduce_fit(sizes: tuple[int, ...] = ALLREDUCE_BYTES, repeats: int = 20, ranks: int = 2) -> dict:
    """gloo all-reduce on `ranks` local ranks: unloaded times and the alpha-beta line through them."""
    per_rank = spawn(_allreduce_samples, ranks, (sizes, repeats))
    times = []
    for i in range(len(sizes)):
        runs = [unloaded([r[i][k][0] for r in per_rank], [r[i][k][1] for r in per_rank])
                for k in range(repeats)]
        times.append(statistics.median(runs))
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(times) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, times)) / sum((x - mx) ** 2 for x in sizes)
    intercept = my - slope * mx
    steps, wire = 2 * (ranks - 1), 2 * (ranks - 1) / ranks
    return {"ranks": ranks, "bytes": list(sizes), "seconds": times,
            "latency": max(intercept, 0.0) / steps, "bandwidth": wire / slope}


def step_efficiency(peak: float, bandwidth: float, preset: str = "gpt-mini", batch: int = 8,
                    repeats: int = 10) -> dict:
    """One process, one thread, fp32 AdamW: a training step's time and the fraction of `peak` its
    forward + backward FLOPs reach once the modelled optimizer step is taken out."""
    cfg = get_preset(preset)
    with _threads(1):
        model = fresh_model(cfg, 0)
        optimizer = make_optimizer(model, TrainConfig())
        x, y = get_batch(load_tokens("handbook").train, batch, cfg.block_size, 0, 0)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(x, y)[1].backward()
            optimizer.step()

        seconds = median_time(step, repeats)
    flops = model_flops_per_token(cfg, cfg.block_size) * batch * cfg.block_size
    opt = optimizer_seconds(param_count(cfg), "fp32", "adamw", bandwidth)
    return {"preset": preset, "batch": batch, "seq": cfg.block_size, "step_s": seconds, "flops": flops,
            "optimizer_s": opt, "efficiency": flops / ((seconds - opt) * peak)}


def calibrate(repeats: int = 15) -> tuple[Cluster, dict]:
    """Measure this machine; return the cpu-gloo cluster it implies and the measurements."""
    peak = matmul_flops(repeats=repeats)
    bandwidth = memory_bandwidth(repeats=repeats)
    ar = allreduce_fit(repeats=repeats)
    eff = step_efficiency(peak, bandwidth, repeats=repeats)
    link = Link("gloo loopback", ar["bandwidth"], ar["latency"])
    cluster = replace(CLUSTERS["cpu-gloo"], peak_flops=peak, memory_bandwidth=bandwidth, intra=link,
                      inter=link, compute_efficiency=min(1.0, eff["efficiency"]),
                      shared_cores=float(os.cpu_count() or 1))
    return cluster, {"matmul_flops": peak, "memory_bandwidth": bandwidth, "allreduce": ar, "step": eff,
                     "torch": torch.__version__, "cpu_count": os.cpu_count(), "threads_per_rank": 1,
                     "schedstat": sample().cpu > 0}


class _threads:
    """Run a block with torch on n threads, then restore the previous count."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.before)
