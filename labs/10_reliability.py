"""Lab 10: reliability -- checkpoints, a crash, a bitwise-exact resume, and a dead rank named.

    python labs/10_reliability.py                      # spawns 2 data-parallel ranks (gloo on CPU)
    python labs/10_reliability.py --steps 40 --every 10 --crash-at 30
    MAX_RESTARTS=1 launch/torchrun_single_node.sh labs/10_reliability.py --crash-once
                                                       # torchrun restarts the job; it resumes
(Plain `torchrun --max-restarts=1` without --standalone and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
which the script sets, fails the restarted round in Gloo connectFullMesh; see launch/README.md.)

Under plain python: (1) train 2-rank DP without interruption; (2) train again saving a one-file
checkpoint and DCP shards every --every steps, and kill both ranks (os._exit) after the
checkpoint of --crash-at; (3) truncate the newest checkpoint, as a crash mid-copy would; (4)
resume in fresh processes: the broken checkpoint is named and skipped, the run continues from
the previous good one, and ends with *bitwise* the parameters of run (1) -- from the file and
from the DCP shards; (5) kill rank 1 in the middle of a step and time how long rank 0 takes to
name it. Under torchrun with --crash-once: the last rank dies once after --crash-at (a marker file
says it already did), torchrun restarts every rank, they resume from the checkpoint and check
the result against an uninterrupted run computed in the same process.
What to look at: 'bitwise equal: yes' for both checkpoint kinds; which checkpoint the resume
used and why; the detection time, far below the collective timeout.
Results: runs/10_reliability/result.json
"""

# %% Setup: arguments and every check that can fail, before any process starts
import os
import time
from pathlib import Path

import torch.distributed as dist

from journey_dist.checkpoint import latest_valid, list_checkpoints
from journey_dist.config import ConfigError, ParallelConfig, get_preset
from journey_dist.data import load_tokens
from journey_dist.fault_tolerance import Heartbeat, PeerFailure, name_failed_peer
from journey_dist.labkit import (
    check_data,
    check_memory,
    claim_dir,
    clear_owned,
    lab_parser,
    parse,
    positive_int,
    probability,
)
from journey_dist.parallel.data.replicas import make_data_parallel
from journey_dist.parity import fresh_model
from journey_dist.resumable import bitwise_equal, run_resumable
from journey_dist.runtime import (
    RankFailure,
    launch,
    print0,
    requested_world_size,
    runs_dir,
    save_json,
    spawn,
    under_torchrun,
)
from journey_dist.train import TrainConfig, make_optimizer, train

LAB = "10_reliability"
parser = lab_parser(__doc__)
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--data", default="handbook", help="embedded corpus name or a UTF-8 text file")
parser.add_argument("--ranks", type=positive_int, default=2, help="ranks to spawn under plain python")
parser.add_argument("--steps", type=positive_int, default=20)
parser.add_argument("--batch-size", type=positive_int, default=8, help="global batch (sequences)")
parser.add_argument("--every", type=positive_int, default=5, help="checkpoint every N steps")
parser.add_argument("--crash-at", type=positive_int, default=15,
                    help="die right after this step's checkpoint")
parser.add_argument("--keep", type=int, default=3, help="checkpoints kept (newest valid ones; 0: all)")
parser.add_argument("--dropout", type=probability, default=0.1, help="> 0 so resume must restore the RNG")
parser.add_argument("--dir", default=None, help="checkpoint directory (default <out>/10_reliability/ckpt); "
                    "must be new, empty or one this lab created: the lab deletes only what it wrote there")
parser.add_argument("--crash-once", action="store_true", help="torchrun --max-restarts demo")
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

world = requested_world_size(args.ranks)
config = get_preset(args.preset, dropout=args.dropout)
ParallelConfig(dp=world).validate(config, world, args.batch_size)
if not args.crash_at < args.steps:
    raise ConfigError(f"--crash-at {args.crash_at} must be between 1 and --steps - 1 = {args.steps - 1}; "
                      f"use --crash-at < --steps")
if not args.every <= args.crash_at:
    raise ConfigError(f"--every {args.every} must be in [1, --crash-at] so a checkpoint exists before the "
                      f"crash; use --every <= {args.crash_at}")
if args.keep == 1 or args.keep < 0:  # step (3) truncates the newest and resumes from the one before
    raise ConfigError(f"--keep {args.keep}: the truncated-checkpoint step needs a previous checkpoint to "
                      "fall back to; use --keep >= 2 (or 0 to keep all)")
data = load_tokens(args.data)
check_data(parser, data, args.batch_size, config.block_size)
check_memory(args.force, config, args.batch_size, ranks=world)
cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=3e-3,
                  warmup_steps=max(1, args.steps // 5), log_every=1)
# The lab empties these entries of its checkpoint directory at each run, and nothing else in it.
root = claim_dir(args.dir or runs_dir(LAB) / "ckpt", LAB, "--dir")
RUN_ENTRIES = ("file", "dcp", "dead_rank")  # plain python: one-file checkpoints, DCP shards, marks
TORCHRUN_ENTRY = "torchrun"  # under torchrun: the restartable job's checkpoints


def show_checkpoints(directory: Path) -> None:
    for c in list_checkpoints(directory):
        status = "ok" if c.valid else f"INVALID ({c.reason})"
        print0(f"  {c.path.name:<20} step {c.step:>3}  {c.nbytes / 2**20:6.2f} MiB  {status}")


# %% Ranks: an uninterrupted run, a run that dies after --crash-at, and the resumed run
def uninterrupted() -> dict:
    return run_resumable(config, data, cfg).params


def crashing(file_dir: str, dcp_dir: str) -> None:
    run_resumable(config, data, cfg, file_dir=file_dir, dcp_dir=dcp_dir, every=args.every,
                  keep=args.keep, crash_after=args.crash_at)


def resumed(directory: str) -> tuple:
    run = run_resumable(config, data, cfg, resume_from=directory)
    return run.params, run.start_step, run.losses


# %% Rank 1 dies in the middle of a step; rank 0 is waiting in the gradient all-reduce
def dead_rank(marks: str) -> None:
    model = fresh_model(config)
    dp = make_data_parallel("naive", model)
    done = {"steps": 0}

    def sync_grads() -> None:
        if dist.get_rank() == 1 and done["steps"] == 3:  # after backward, before the all-reduce
            Path(marks, "died").write_text(str(time.time()))
            os._exit(17)
        done["steps"] += 1
        dp.sync_grads()

    hb = Heartbeat(interval_s=0.2, stale_s=1.0, abort=False).start()
    try:
        with name_failed_peer(hb):
            train(model, data, TrainConfig(steps=10, batch_size=args.batch_size),
                  dp.hooks().with_(sync_grads=sync_grads), optimizer=make_optimizer(model, cfg),
                  verbose=False, block_size=config.block_size, on_step=lambda step, m, o: hb.beat(step))
    except PeerFailure as e:
        Path(marks, "detected").write_text(f"{time.time()}\n{e}")
        raise


def torchrun_restartable() -> dict:
    """Under torchrun: resume if a checkpoint exists, die once (rank 1), finish, compare."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    job = root / TORCHRUN_ENTRY
    if restart == 0 and dist.get_rank() == 0:
        clear_owned(root, LAB, [TORCHRUN_ENTRY])  # a fresh job: no checkpoints from an older one
    dist.barrier()
    reference = uninterrupted()
    marker = job / "crashed_once"
    crash = args.crash_once and not marker.exists()
    victim = dist.get_world_size() - 1
    if crash and dist.get_rank() == victim:
        job.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"rank {victim} died here once\n")
    dist.barrier()
    run = run_resumable(config, data, cfg, file_dir=job, resume_from=job, every=args.every,
                        keep=args.keep, crash_after=args.crash_at if crash else None,
                        crash_ranks=(victim,))
    diff = bitwise_equal(run.params, reference)
    print0(f"attempt {restart}: started at step {run.start_step}, ran {len(run.losses)} steps; "
           f"bitwise equal to the uninterrupted run: {'yes' if not diff else f'NO {diff}'}")
    result = {"world_size": dist.get_world_size(), "restart_count": restart,
              "start_step": run.start_step, "bitwise_equal": not diff, "differing": diff}
    save_json(LAB, "torchrun_result", result)
    return result


# %% Main (plain python): the crash, the resume, the comparison, the dead rank. Each phase is a
# fresh set of spawned processes, as after a real crash.
def main() -> dict:
    clear_owned(root, LAB, RUN_ENTRIES)  # only what an earlier run of this lab wrote
    file_dir, dcp_dir = root / "file", root / "dcp"
    print0(f"{world} data-parallel ranks | {args.preset} (dropout {args.dropout}) | {cfg.steps} steps, "
           f"checkpoint every {args.every}, crash after step {args.crash_at}\n")
    t0 = time.perf_counter()
    reference = spawn(uninterrupted, world)[0]
    print0(f"(1) uninterrupted run: {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    try:
        spawn(crashing, world, (str(file_dir), str(dcp_dir)))
        raise SystemExit("the crashing run did not crash")
    except RankFailure as e:
        first = str(e).splitlines()[:2]
        print0(f"(2) crashed as planned after step {args.crash_at} ({time.perf_counter() - t0:.1f}s): "
               + " ".join(first))
    print0("checkpoints on disk (one file, rank 0 wrote):")
    show_checkpoints(file_dir)
    print0("DCP shards (every rank wrote its part):")
    show_checkpoints(dcp_dir)

    newest = list_checkpoints(file_dir)[-1].path
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    fallback = latest_valid(file_dir, warn=False)
    print0(f"\n(3) truncated {newest.name} to half; a resume will use {fallback.path.name}")

    rows = {}
    for kind, directory in (("file", file_dir), ("dcp", dcp_dir)):
        t0 = time.perf_counter()
        params, start, losses = spawn(resumed, world, (str(directory),))[0]
        diff = bitwise_equal(params, reference)
        worst = max((params[k] - reference[k]).abs().max().item() for k in params)
        rows[kind] = {"start_step": start, "bitwise_equal": not diff, "max_abs_diff": worst,
                      "seconds": time.perf_counter() - t0, "losses_after_resume": losses}
        print0(f"(4) resumed from {kind:<4} at step {start:>3}: max|param - uninterrupted| = {worst:.1e}, "
               f"bitwise equal: {'yes' if not diff else f'NO {diff}'}")

    marks = root / "dead_rank"
    marks.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        spawn(dead_rank, 2, (str(marks),), timeout_s=120, collective_timeout_s=60, failure_grace_s=20)
    except RankFailure as e:
        launcher_s = time.perf_counter() - t0
        failed = [line for line in str(e).splitlines() if line.startswith("--- rank")]
    died = float((marks / "died").read_text())
    detected_at, message = (marks / "detected").read_text().split("\n", 1)
    detection = float(detected_at) - died
    print0(f"\n(5) rank 1 killed mid-step (exit 17). Rank 0, waiting in its all-reduce, raised after "
           f"{detection:.2f}s (collective timeout 60s):\n    {message.strip()}\n"
           f"    launcher report ({launcher_s:.1f}s incl. start-up): {'; '.join(failed)}")

    result = {"world_size": world, "preset": args.preset, "train": cfg.to_dict(), "every": args.every,
              "crash_at": args.crash_at, "truncated": newest.name, "fallback": fallback.path.name,
              "resume": rows, "dead_rank": {"detection_s": detection, "message": message.strip(),
                                            "launcher_report": failed}}
    path = save_json(LAB, "result", result)
    print0(f"\nwrote {path}; inspect checkpoints with `journey checkpoints {file_dir}`")
    return result


if __name__ == "__main__":
    if under_torchrun():
        launch(torchrun_restartable, world)
    else:
        main()
