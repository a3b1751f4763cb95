"""A training run that checkpoints, can be killed on purpose, and resumes where it stopped.

Lab 10 and the reliability tests use this one function, so what the lab shows is what the tests
check: a run killed after the checkpoint of step k and resumed ends with the parameters of a run
that was never interrupted (bitwise on CPU), one process or data parallel. The same holds for
`dp_run_with_a_dead_rank`, a run in which one rank dies in the middle of a step while the
others wait in the gradient all-reduce until the heartbeat names it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from journey_dist.checkpoint import Checkpointer, resume
from journey_dist.config import GPTConfig
from journey_dist.data import TokenData
from journey_dist.fault_tolerance import Heartbeat, PeerFailure, name_failed_peer
from journey_dist.parallel.data.replicas import make_data_parallel
from journey_dist.parity import fresh_model, named_params
from journey_dist.report import fixed, sci, table
from journey_dist.runtime import RankFailure, spawn
from journey_dist.train import TrainConfig, make_optimizer, train


class SimulatedCrash(Exception):
    """Raised (crash="raise") instead of killing the process, for in-process demos."""


@dataclass
class ResumableRun:
    params: dict[str, torch.Tensor]
    losses: list[float]  # of the steps this run executed
    start_step: int  # 0, or the step resumed from
    saved: dict[str, list[int]] = field(default_factory=dict)  # directory -> steps saved
    checkpoint_seconds: float = 0.0
    seconds: float = 0.0


def run_resumable(config: GPTConfig, data: TokenData, cfg: TrainConfig, *,
                  file_dir: str | Path | None = None, dcp_dir: str | Path | None = None,
                  resume_from: str | Path | None = None, every: int = 5, keep: int = 3,
                  crash_after: int | None = None, crash_ranks: tuple[int, ...] | None = None,
                  crash: str = "exit", exit_code: int = 1, dp: bool | None = None,
                  seed: int = 0, rng_seed: int = 1234) -> ResumableRun:
    """Train fresh_model(config, seed) for cfg.steps with the shared loop.

    file_dir / dcp_dir: save a one-file checkpoint (rank 0 writes) / DCP shards (every rank
    writes) after every `every` steps and the last. resume_from: first load the newest valid
    checkpoint there. crash_after=k: after the checkpoints of step k, the ranks in `crash_ranks`
    (default all) die with os._exit(exit_code) (crash="exit") or raise SimulatedCrash.
    dp (default: a process group of > 1 rank exists): wrap in DDP, each rank its batch shard.
    """
    if dp is None:
        dp = dist.is_initialized() and dist.get_world_size() > 1
    torch.manual_seed(rng_seed)  # the stream dropout draws from; resume restores its state
    model = fresh_model(config, seed)
    if dist.is_initialized() and dist.get_backend() == "nccl":
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    wrapper = make_data_parallel("ddp", model) if dp else None
    optimizer = make_optimizer(model, cfg)
    start_step = resume(resume_from, model, optimizer) if resume_from else 0
    savers = [Checkpointer(d, every, cfg.steps, keep=keep, sharded=d == dcp_dir)
              for d in (file_dir, dcp_dir) if d]
    rank = dist.get_rank() if dist.is_initialized() else 0

    def on_step(step: int, module, opt) -> None:
        for saver in savers:
            saver(step, module, opt)
        if crash_after is not None and step + 1 == crash_after and (
                crash_ranks is None or rank in crash_ranks):
            if crash == "exit":
                os._exit(exit_code)  # no cleanup, no flush: as a kill would leave things
            raise SimulatedCrash(f"rank {rank} crashed after step {crash_after}")

    t0 = time.perf_counter()
    history = train(wrapper.module if wrapper else model, data, cfg, wrapper.hooks() if wrapper else None,
                    optimizer=optimizer, verbose=False, block_size=config.block_size, start_step=start_step,
                    on_step=on_step)
    return ResumableRun({k: v.detach().cpu().clone() for k, v in named_params(model).items()},
                        [row["loss"] for row in history.steps], start_step,
                        {str(s.directory): s.saved for s in savers},
                        sum(s.seconds for s in savers), time.perf_counter() - t0)


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that differ in any bit (empty: identical)."""
    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    return [k for k in a if not torch.equal(a[k].cpu(), b[k].cpu())]


def resume_table(rows: dict[str, dict]) -> str:
    """Resumed runs by checkpoint kind: the step each started at, max |param - uninterrupted|,
    whether every bit is equal, and the seconds it took (fresh processes included)."""
    flat = [{"kind": kind, **r, "equal": "yes" if r["bitwise_equal"] else "NO"} for kind, r in rows.items()]
    return table(flat, [("kind", "resumed from", str), ("start_step", "at step", str),
                        ("max_abs_diff", "max|param - uninterrupted|", sci), ("equal", "bitwise equal", str),
                        ("seconds", "seconds", fixed(1))])


# ---------------------------------------------------------------------- a rank dies mid-step


def dp_run_with_a_dead_rank(config: GPTConfig, data: TokenData, cfg: TrainConfig,
                            marks: str | Path | None = None, *, die_at: int = 3, exit_code: int = 17,
                            stale_s: float = 1.0) -> None:
    """Naive data-parallel training watched by a Heartbeat, in which rank 1 dies
    (os._exit(exit_code)) inside the gradient sync of step `die_at`: after its backward, before
    its all-reduce, so the other ranks wait in that all-reduce. They raise PeerFailure naming
    rank 1 (name_failed_peer) once it has been silent for `stale_s`. With `marks`, rank 1 writes
    <marks>/died (time.time() as it dies) and each survivor <marks>/detected (its time, then the
    message), from which `time_to_name_a_dead_rank` measures the detection."""
    model = fresh_model(config)
    dp = make_data_parallel("naive", model)
    done = {"steps": 0}

    def sync_grads() -> None:
        if dist.get_rank() == 1 and done["steps"] == die_at:
            if marks is not None:
                Path(marks, "died").write_text(str(time.time()))
            os._exit(exit_code)
        done["steps"] += 1
        dp.sync_grads()

    hb = Heartbeat(interval_s=0.2, stale_s=stale_s, abort=False).start()
    try:
        with name_failed_peer(hb):
            train(model, data, cfg, dp.hooks().with_(sync_grads=sync_grads),
                  optimizer=make_optimizer(model, cfg), verbose=False, block_size=config.block_size,
                  on_step=lambda step, m, o: hb.beat(step))
    except PeerFailure as e:
        if marks is not None:
            Path(marks, "detected").write_text(f"{time.time()}\n{e}")
        raise


def time_to_name_a_dead_rank(config: GPTConfig, data: TokenData, cfg: TrainConfig, marks: str | Path, *,
                             ranks: int = 2, collective_timeout_s: float = 60.0) -> tuple[dict, float]:
    """Run dp_run_with_a_dead_rank on `ranks` fresh processes and measure: ({detection_s: seconds
    from rank 1's death to a survivor's PeerFailure, message: that error, launcher_report: the
    launcher's '--- rank r failed ---' lines}, seconds until the launcher reported, start-up
    included). `marks` is a directory for the two time stamps."""
    Path(marks).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        spawn(dp_run_with_a_dead_rank, ranks, (config, data, cfg, str(marks)), timeout_s=120,
              collective_timeout_s=collective_timeout_s, failure_grace_s=20)
    except RankFailure as e:
        launcher_s = time.perf_counter() - t0
        failed = [line for line in str(e).splitlines() if line.startswith("--- rank")]
    else:
        raise RuntimeError("rank 1 was to die mid-step, but every rank finished")
    died = float(Path(marks, "died").read_text())
    detected_at, message = Path(marks, "detected").read_text().split("\n", 1)
    report = {"detection_s": float(detected_at) - died, "message": message.strip(), "launcher_report": failed}
    return report, launcher_s
