"""Lab 04: pipeline parallel -- GPT-mini cut into stages, four schedules, and the bubble.

    python labs/04_pipeline_parallel.py                    # spawns 2 stages (gloo on CPU)
    torchrun --nproc_per_node=2 labs/04_pipeline_parallel.py
    python labs/04_pipeline_parallel.py --ranks 4 --microbatches 8 --sweep 4,8 --schedules 1f1b,zb-h1
    python labs/04_pipeline_parallel.py --schedules 1f1b,zb-h1 --sleep-ms 40

Each rank holds a slice of the layers (the first also embeds, the last also runs the head and
loss, with its own copy of the tied wte) and passes (micro_B, T, C) activations forward and their
gradients back. The schedules (journey_dist/parallel/pipeline/orders.py, one function each):
GPipe (all forwards, then all backwards), 1F1B (one forward, one backward in turn), interleaved
1F1B (v chunks of layers per rank: rank r holds virtual stages r, r+p, ...; activations go round
the ranks v times) and ZB-H1 (the backward split into B, the input gradient the previous stage
waits for, and W, the weight gradient, which can wait and fills the idle slots at the end).

What to look at, in order: what each stage holds; every schedule, ours and
torch.distributed.pipelining's (ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B,
ScheduleInterleavedZeroBubble running the same stage modules), tracking the single-process run
(gradients ~1e-8, parameters ~1e-6 after 10 AdamW steps: float rounding); each stage's timeline of
the last step (real stages are unequal: the last also runs the head and loss, and ranks share the
CPU); so the bubble is measured on balanced sleeping stages (forward, input gradient and weight
gradient each --sleep-ms per stage), next to each schedule's formula: (p-1)/(m+p-1) for GPipe and
1F1B, divided by v interleaved, (p-1)/(3m+p-1) for ZB-H1 with equal F, B, W (Qi et al. 2023);
and the activation sets each stage holds at once, next to their formula: GPipe m, 1F1B p - stage,
interleaved more chunks (each 1/v of a stage), ZB-H1 p on every stage (a microbatch is held until
its W). The bubble is measured as 1 - busy/step per rank, the step from the common start to the
last end on any rank, the shortest of three steps. notes/parallelism.md § pipeline parallel.
Results: runs/04_pipeline_parallel/result.json and timeline.png
"""

# %% Setup: arguments and every check that can fail, before any process starts
import torch.distributed as dist

from journey_dist.config import PIPELINE_SCHEDULES, ConfigError, ParallelConfig, get_preset
from journey_dist.data import TokenData, load_tokens
from journey_dist.labkit import (
    check_data,
    check_memory,
    int_list,
    lab_parser,
    parse,
    positive_float,
    positive_int,
)
from journey_dist.parallel.pipeline.schedules import Pipeline, Timeline, pipeline_run
from journey_dist.parallel.pipeline.stage import rank_layers, stage_summary
from journey_dist.parallel.pipeline.timeline import (
    bubble_row,
    bubble_sweep,
    gather_timelines,
    plot_timelines,
    runnable,
    timelines_text,
)
from journey_dist.parity import RunResult, reference_run, worst_diffs
from journey_dist.report import bubble_table, losses_table, num, parity_table, table
from journey_dist.runtime import (
    gather_objects,
    is_rank0,
    launch,
    print0,
    requested_world_size,
    runs_dir,
    save_json,
)
from journey_dist.train import TrainConfig

LAB = "04_pipeline_parallel"
MAX_SWEEP_S = 600  # the bubble sweep sleeps; refuse settings that would sleep longer than this
parser = lab_parser(__doc__)
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--data", default="handbook", help="embedded corpus name or a UTF-8 text file")
parser.add_argument("--ranks", type=positive_int, default=2,
                    help="pipeline stages to spawn under plain python")
parser.add_argument("--steps", type=positive_int, default=10)
parser.add_argument("--batch-size", type=positive_int, default=8, help="global batch (sequences)")
parser.add_argument("--microbatches", type=positive_int, default=4)
parser.add_argument("--lr", type=positive_float, default=3e-3)
parser.add_argument("--schedules", default=",".join(PIPELINE_SCHEDULES),
                    help=f"comma-separated, of {', '.join(PIPELINE_SCHEDULES)}")
parser.add_argument("--virtual-stages", type=positive_int, default=2,
                    help="chunks of layers per rank for the interleaved schedule")
parser.add_argument("--sweep", type=int_list, default=[1, 2, 4, 8],
                    help="microbatch counts for the bubble measurement (comma-separated)")
parser.add_argument("--sleep-ms", type=positive_float, default=20.0,
                    help="synthetic forward, input-gradient and weight-gradient time per stage")
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

world = requested_world_size(args.ranks)
config = get_preset(args.preset)
schedules = [s for s in args.schedules.split(",") if s]
if not schedules or set(schedules) - set(PIPELINE_SCHEDULES):
    raise ConfigError(f"--schedules {args.schedules!r}: use a comma-separated list of "
                      f"{', '.join(PIPELINE_SCHEDULES)}")
if world < 2:
    raise ConfigError(f"a pipeline needs at least 2 stages, got {world} rank(s); use --ranks 2 "
                      "(or torchrun --nproc_per_node=2)")
V = {s: args.virtual_stages if s == "interleaved" else 1 for s in schedules}
for schedule in schedules:
    ParallelConfig(pp=world, microbatches=args.microbatches, schedule=schedule,
                   virtual_stages=V[schedule]).validate(config, world, args.batch_size)
sweep = [(s, m) for s in schedules for m in args.sweep if runnable(s, world, m)]
# each (schedule, m) of the sweep runs four steps of at most (m + p - 1) x (F + B + W)
sweep_s = sum(4 * (m + world - 1) * 3 * args.sleep_ms / 1e3 for _, m in sweep)
if sweep_s > MAX_SWEEP_S:
    raise ConfigError(f"--sleep-ms {args.sleep_ms:g} with --sweep {','.join(map(str, args.sweep))} would "
                      f"sleep about {sweep_s:,.0f} s; use a smaller --sleep-ms or --sweep (at most "
                      f"{MAX_SWEEP_S} s)")
m_show = args.microbatches if args.microbatches in args.sweep else args.sweep[-1]  # timelines shown
data = load_tokens(args.data)
check_data(parser, data, args.batch_size, config.block_size)
check_memory(args.force, config, args.batch_size, ranks=world)
cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.microbatches, lr=args.lr,
                  warmup_steps=max(1, args.steps // 5), eval_batches=2)


# %% 1. The cut: the layers each stage holds (v chunks when interleaved), and the ends of the model
def stages_table(pipes: dict[str, Pipeline]) -> str:
    """What every stage built, for one plain cut and the interleaved one (each under its name)."""
    shown = [s for s in schedules if V[s] == 1][:1] + [s for s in schedules if V[s] > 1]
    parts = []
    for s in shown:
        rows = gather_objects(stage_summary(pipes[s].stage))  # every stage describes what it built
        parts.append(f"{s}:\n" + table(rows, [("stage", "stage", str), ("layers", "layers", str),
                                              ("also", "also", str), ("parameters", "parameters", num)]))
    return "\n".join(parts)


# %% 2. One process, then every schedule (ours and torch.distributed.pipelining's) from the same seed
def train_all(data: TokenData) -> tuple[RunResult, dict[str, RunResult], dict[str, Pipeline]]:
    ref = reference_run(config, data, cfg, first_grads=True)
    runs, pipes = {}, {}
    for engine, prefix in (("ours", ""), ("torch", "torch ")):
        for s in schedules:
            runs[prefix + s], pipes[prefix + s] = pipeline_run(config, data, cfg, schedule=s, engine=engine,
                                                               virtual_stages=V[s])
    return ref, runs, pipes


# %% 3. Each stage's timeline of the last step: F, B (and W), and the idle gaps (the bubble)
def stage_timelines(pipes: dict[str, Pipeline]) -> tuple[dict[str, list[Timeline]], dict[str, list[int]]]:
    """Every stage's timeline, and the most activation sets each stage held at once."""
    return ({s: gather_timelines(pipes[s].timeline) for s in schedules},
            {s: gather_objects(pipes[s].peak_inflight) for s in schedules})


# %% 4. The bubble on balanced stages (F, B and W sleep the same), next to each schedule's formula
def balanced_bubble() -> dict[tuple[str, int], dict]:
    f = args.sleep_ms / 1e3
    return bubble_sweep(schedules, args.sweep, f=f, b=f, w=f, virtual=args.virtual_stages)


# %% 5. Save: the JSON, and a picture of the timelines
def save(ref: RunResult, runs: dict[str, RunResult], parity: dict, real: dict, peaks: dict,
         synthetic: dict) -> str:
    p = len(real[schedules[0]])
    result = {"world_size": p, "preset": args.preset, "train": cfg.to_dict(), "virtual_stages": V,
              "layers": {s: [[[r.start, r.stop] for r in rank_layers(config.n_layer, p, k, V[s])]
                             for k in range(p)] for s in schedules},
              "reference_losses": ref.losses, "losses": {s: runs[s].losses for s in runs},
              "parity": parity, "peak_inflight_gpt": peaks,
              "bubble": [bubble_row(r) for r in synthetic.values()],
              "timelines_gpt": {s: [t.to_dict() for t in ts] for s, ts in real.items()},
              "timelines_synthetic": {f"{s}_m{m}": [t.to_dict() for t in r["timelines"]]
                                      for (s, m), r in synthetic.items()}}
    path = save_json(LAB, "result", result)
    if not is_rank0():
        return ""
    panels = {f"balanced {s}, m={m_show}": synthetic[s, m_show]["timelines"]
              for s in schedules if (s, m_show) in synthetic}
    return f"wrote {path} and {plot_timelines(panels, runs_dir(LAB) / 'timeline.png')}"


# %% Every rank runs the steps in order and prints what to look at
def rank_main(data: TokenData) -> None:
    p, micro_b = dist.get_world_size(), cfg.batch_size // cfg.grad_accum
    ref, runs, pipes = train_all(data)
    print0(f"{p} stages ({dist.get_backend()}), {args.preset}: batch {cfg.batch_size} = {cfg.grad_accum} "
           f"microbatches; stages pass ({micro_b}, {config.block_size}, {config.n_embd}) activations")
    print0(stages_table(pipes))

    parity = {name: worst_diffs(run, ref, subset=True, val_loss=True) for name, run in runs.items()}
    print0("\n" + losses_table(ref.losses, {name: run.losses for name, run in runs.items()}, digits=4))
    print0(parity_table(parity))

    real, peaks = stage_timelines(pipes)
    print0("\n" + timelines_text({f"{s}, last step": real[s] for s in schedules}, orders=True))

    synthetic = balanced_bubble()
    print0("\n" + bubble_table([bubble_row(r) for r in synthetic.values()]))
    print0("\n" + timelines_text({f"{s}, balanced, m={m}": r["timelines"] for (s, m), r in synthetic.items()
                                  if m == m_show}))
    print0("\n" + save(ref, runs, parity, real, peaks, synthetic))


# %% Launch: under torchrun this process is one rank; under python it spawns --ranks stages
if __name__ == "__main__":
    launch(rank_main, world, data)
