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

from journey_dist.checkpoint import checkpoints_table, latest_valid, list_checkpoints
from journey_dist.config import ConfigError, ParallelConfig, get_preset
from journey_dist.data import load_tokens
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
from journey_dist.resumable import bitwise_equal, resume_table, run_resumable, time_to_name_a_dead_rank
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
from journey_dist.train import TrainConfig

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
if args.keep == 1 or args.keep < 0:  # step 3 truncates the newest and resumes from the one before
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


# %% What the ranks run: an uninterrupted run, a run that dies after --crash-at, a resumed run
def uninterrupted() -> dict:
    return run_resumable(config, data, cfg).params


def crashing(file_dir: str, dcp_dir: str) -> None:
    run_resumable(config, data, cfg, file_dir=file_dir, dcp_dir=dcp_dir, every=args.every,
                  keep=args.keep, crash_after=args.crash_at)


def resumed(directory: str) -> tuple:
    run = run_resumable(config, data, cfg, resume_from=directory)
    return run.params, run.start_step, run.losses


# %% 1. An uninterrupted run on fresh ranks: the parameters every resume must end with
def reference() -> tuple[dict, float]:
    t0 = time.perf_counter()
    return spawn(uninterrupted, world)[0], time.perf_counter() - t0


# %% 2. Train again, saving a one-file checkpoint and DCP shards every --every steps; die after --crash-at
def crash(file_dir: Path, dcp_dir: Path) -> str:
    """The launcher's first lines about the dead ranks."""
    try:
        spawn(crashing, world, (str(file_dir), str(dcp_dir)))
    except RankFailure as e:
        return " ".join(str(e).splitlines()[:2])
    raise SystemExit("the crashing run did not crash")


# %% 3. A crash mid-copy: cut the newest one-file checkpoint in half
def truncate_newest(directory: Path) -> tuple[str, str]:
    """The truncated checkpoint's name, and the one a resume will use instead."""
    newest = list_checkpoints(directory)[-1].path
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    return newest.name, latest_valid(directory, warn=False).path.name


# %% 4. Resume in fresh processes from each kind: the broken file is named and skipped
def resume_from(directory: Path, reference: dict) -> dict:
    t0 = time.perf_counter()
    params, start, losses = spawn(resumed, world, (str(directory),))[0]
    worst = max((params[k] - reference[k]).abs().max().item() for k in params)
    return {"start_step": start, "bitwise_equal": not bitwise_equal(params, reference), "max_abs_diff": worst,
            "seconds": time.perf_counter() - t0, "losses_after_resume": losses}


# %% 5. Rank 1 dies in the middle of a step, rank 0 waits in the gradient all-reduce: how soon is it named?
def dead_rank() -> tuple[dict, float]:
    return time_to_name_a_dead_rank(config, data, TrainConfig(steps=10, batch_size=args.batch_size),
                                    root / "dead_rank", collective_timeout_s=60)


# %% Plain python runs the steps in order, each phase a fresh set of processes as after a real crash
def main() -> dict:
    clear_owned(root, LAB, RUN_ENTRIES)  # only what an earlier run of this lab wrote
    file_dir, dcp_dir = root / "file", root / "dcp"
    print0(f"{world} data-parallel ranks | {args.preset} (dropout {args.dropout}) | {cfg.steps} steps, "
           f"checkpoint every {args.every}, crash after step {args.crash_at}\n")
    params, seconds = reference()
    print0(f"(1) uninterrupted run: {seconds:.1f}s")
    report = crash(file_dir, dcp_dir)
    print0(f"(2) crashed as planned after step {args.crash_at}: {report}\none file (rank 0 wrote it):\n"
           f"{checkpoints_table(file_dir)}\nDCP shards (each rank its part):\n{checkpoints_table(dcp_dir)}")
    truncated, fallback = truncate_newest(file_dir)
    print0(f"\n(3) truncated {truncated} to half; a resume will use {fallback}")
    rows = {"file": resume_from(file_dir, params), "dcp": resume_from(dcp_dir, params)}
    print0(f"(4) {resume_table(rows)}")
    dead, launcher_s = dead_rank()
    print0(f"\n(5) rank 1 killed mid-step (exit 17). Rank 0, waiting in its all-reduce, raised after "
           f"{dead['detection_s']:.2f}s (collective timeout 60s):\n    {dead['message']}\n    launcher "
           f"report ({launcher_s:.1f}s incl. start-up): {'; '.join(dead['launcher_report'])}")
    result = {"world_size": world, "preset": args.preset, "train": cfg.to_dict(), "every": args.every,
              "crash_at": args.crash_at, "truncated": truncated, "fallback": fallback, "resume": rows,
              "dead_rank": dead}
    print0(f"\nwrote {save_json(LAB, 'result', result)}; list checkpoints: `journey checkpoints {file_dir}`")
    return result


# %% Under torchrun: resume if a checkpoint exists, die once (the last rank), finish, compare
def torchrun_restartable() -> dict:
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


# %% Launch
if __name__ == "__main__":
    if under_torchrun():
        launch(torchrun_restartable, world)
    else:
        main()
