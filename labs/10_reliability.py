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
(6) A desync on purpose, each case a fresh 2-rank job in a subprocess (--desync): rank 1 calls a
different collective ("op"), a different shape ("shape"), skips an all-reduce ("skip") or
arrives late ("straggler"); what each rank sees without and with TORCH_DISTRIBUTED_DEBUG=DETAIL;
(7) the skip again with the flight recorder on: every rank's collectives compared, and torch's
torchfrtrace on the same dumps. More: notes/debugging.md.
What to look at: 'bitwise equal: yes' for both checkpoint kinds; which checkpoint the resume
used and why; the detection time, far below the collective timeout; in (6) the skip, which
returns a wrong loss on rank 1 without any error, and DETAIL naming the mismatch or the absent
rank; in (7) the first collective whose call sites differ.
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
from journey_dist.desync import (
    SCENARIOS,
    first_divergence,
    load_traces,
    pair_by_order,
    repair_gloo_dump,
    run_desync,
    short_error,
    step_calls,
    torchfrtrace,
)
from journey_dist.labkit import (
    check_data,
    check_memory,
    claim_dir,
    clear_owned,
    lab_parser,
    parse,
    positive_float,
    positive_int,
    probability,
)
from journey_dist.report import table
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
parser.add_argument("--desync", default="op,skip",
                    help=f"desync scenarios to provoke in (6), from {', '.join(SCENARIOS)}; 'none' for none")
parser.add_argument("--desync-timeout", type=positive_float, default=3.0,
                    help="collective timeout (s) of the desync jobs")
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
DESYNC = [] if args.desync == "none" else args.desync.split(",")
unknown = sorted(set(DESYNC) - set(SCENARIOS))
if unknown:
    raise ConfigError(f"--desync {','.join(unknown)}: no such scenario; use some of "
                      f"{','.join(SCENARIOS)}, or none")
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
RUN_ENTRIES = ("file", "dcp", "dead_rank", "flight_recorder")  # plain python: checkpoints, marks, dumps
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


# %% 6. A desync on purpose: what each rank sees, without and with TORCH_DISTRIBUTED_DEBUG=DETAIL
def desync_cases() -> list[dict]:
    """One row per (scenario, debug level, rank): its error in one line, or the loss it returned next
    to the loss the intended program returns (pair_by_order models the skip's wrong sum)."""
    intended = pair_by_order(step_calls("none"))
    rows = []
    for scenario in DESYNC:
        for debug in ("OFF", "DETAIL"):
            run = run_desync(scenario, debug=debug, collective_timeout_s=args.desync_timeout)
            for r in run.get("ranks", []):
                saw = short_error(r["error_text"]) if r["error"] else (
                    f"no error; loss {r['result'][-1]:g} (intended {intended[r['rank']]['loss']:g})")
                rows.append({"scenario": scenario, "debug": debug, "rank": r["rank"], "saw": saw,
                             "seconds": run["seconds"]})
            if "job_error" in run:  # gloo's C++ check killed a rank: its stderr has the reason
                rows.append({"scenario": scenario, "debug": debug, "rank": "job", "seconds": run["seconds"],
                             "saw": " ".join(run["job_error"].split()) + " | " + " ".join(run["aborts"])})
    return rows


# %% 7. The flight recorder on the skipped all-reduce: every rank's collectives compared
def flight_recorder(trace_dir: Path) -> dict:
    """Run the skip with TORCH_FR_BUFFER_SIZE set; compare the dumps (first_divergence) and hand them
    to torchfrtrace, as dumped (torch 2.13's gloo dump stops it) and repaired."""
    run_desync("skip", trace_dir=trace_dir, collective_timeout_s=args.desync_timeout)
    found = first_divergence(load_traces(trace_dir))
    raw = torchfrtrace(trace_dir)
    fixed = torchfrtrace(repair_gloo_dump(trace_dir, trace_dir.parent / "repaired"))
    return {"first_divergence": found,
            "torchfrtrace_raw": (raw.stdout + raw.stderr).strip().splitlines()[-1],
            "torchfrtrace": [line for line in (fixed.stdout + fixed.stderr).splitlines()
                             if line and "tabulate" not in line][:6]}


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
    desync, recorder = [], None
    if DESYNC:
        desync = desync_cases()
        print0(f"\n(6) desync, rank 1 the buggy rank (collective timeout {args.desync_timeout:g}s):\n"
               + table(desync, [("saw", "what the rank saw", str), ("scenario", "case", str),
                                ("debug", "DEBUG", str), ("rank", "rank", str)]))
        recorder = flight_recorder(root / "flight_recorder" / "dumps")
        where = "\n".join(f"    rank {r}: {w}" for r, w in recorder["first_divergence"]["ranks"].items())
        print0(f"\n(7) flight recorder, skip: first difference at collective "
               f"#{recorder['first_divergence']['seq']} ({recorder['first_divergence']['kind']}):\n{where}\n"
               f"    torchfrtrace on gloo's dump: {recorder['torchfrtrace_raw']}\n    torchfrtrace, "
               f"repaired: " + " | ".join(recorder["torchfrtrace"]))
    result = {"world_size": world, "preset": args.preset, "train": cfg.to_dict(), "every": args.every,
              "crash_at": args.crash_at, "truncated": truncated, "fallback": fallback, "resume": rows,
              "dead_rank": dead, "desync": desync, "flight_recorder": recorder}
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
