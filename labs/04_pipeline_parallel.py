"""Lab 04: pipeline parallel -- GPT-mini cut into stages, GPipe vs 1F1B, and the bubble.

    python labs/04_pipeline_parallel.py                    # spawns 2 stages (gloo on CPU)
    torchrun --nproc_per_node=2 labs/04_pipeline_parallel.py
    python labs/04_pipeline_parallel.py --microbatches 8 --steps 20

Each rank holds a slice of the layers (the first also embeds, the last also runs the head and
loss) and passes (micro_B, T, C) activations forward and their gradients back. What to look at:
both schedules (ours and torch.distributed.pipelining's) track the single-process run (gradients
within ~1e-8, parameters ~1e-5 after 10 AdamW steps: float rounding); each stage's timeline,
where the idle gaps are the bubble; the measured bubble of balanced (sleeping) stages next to
(p-1)/(m+p-1), shrinking as microbatches grow; and the activations each stage holds at once:
GPipe all m, 1F1B at most p - stage.
Results: runs/04_pipeline_parallel/result.json and timeline.png
"""

# %% Setup: arguments and every check that can fail, before any process starts
import torch
import torch.distributed as dist

from journey_dist.config import ConfigError, ParallelConfig, get_preset
from journey_dist.data import load_tokens
from journey_dist.labkit import (
    check_data,
    check_memory,
    int_list,
    lab_parser,
    parse,
    positive_float,
    positive_int,
)
from journey_dist.parallel.pipeline.schedules import SCHEDULES, pipeline_run
from journey_dist.parallel.pipeline.stage import stage_layers
from journey_dist.parallel.pipeline.timeline import (
    gather_timelines,
    measure_bubble,
    order_text,
    plot_timelines,
    render_text,
)
from journey_dist.parity import max_abs_diff, reference_run
from journey_dist.runtime import gather_objects, launch, print0, requested_world_size, runs_dir, save_json
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
parser.add_argument("--sweep", type=int_list, default=[1, 2, 4, 8],
                    help="microbatch counts for the bubble measurement (comma-separated)")
parser.add_argument("--sleep-ms", type=positive_float, default=20.0,
                    help="synthetic forward time (backward: 2x)")
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

world = requested_world_size(args.ranks)
config = get_preset(args.preset)
if world < 2:
    raise ConfigError(f"a pipeline needs at least 2 stages, got {world} rank(s); use --ranks 2 "
                      "(or torchrun --nproc_per_node=2)")
for schedule in SCHEDULES:
    ParallelConfig(pp=world, microbatches=args.microbatches, schedule=schedule).validate(
        config, world, args.batch_size)
# each (schedule, m) of the sweep runs twice; a step takes (m + p - 1) x (forward + backward)
sweep_s = sum(2 * (m + world - 1) * 3 * args.sleep_ms / 1e3 for m in args.sweep) * len(SCHEDULES)
if sweep_s > MAX_SWEEP_S:
    raise ConfigError(f"--sleep-ms {args.sleep_ms:g} with --sweep {','.join(map(str, args.sweep))} would "
                      f"sleep about {sweep_s:,.0f} s; use a smaller --sleep-ms or --sweep (at most "
                      f"{MAX_SWEEP_S} s)")
sweep = args.sweep
data = load_tokens(args.data)
check_data(parser, data, args.batch_size, config.block_size)
check_memory(args.force, config, args.batch_size, ranks=world)
cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.microbatches, lr=args.lr,
                  warmup_steps=max(1, args.steps // 5), eval_batches=2)


# %% What every rank runs
def rank_main(data) -> dict:
    p = dist.get_world_size()
    layers = stage_layers(config.n_layer, p)
    micro_b = cfg.batch_size // cfg.grad_accum
    print0(f"{p} stages ({dist.get_backend()}) | {args.preset}, {config.n_layer} layers | batch "
           f"{cfg.batch_size} = {cfg.grad_accum} microbatches of {micro_b} x {config.block_size} tokens")
    for s, r in enumerate(layers):
        extra = (["embedding"] if s == 0 else []) + (["ln_f, head, loss"] if s == p - 1 else [])
        print0(f"  stage {s}: layers {r.start}..{r.stop - 1}" + (f" + {', '.join(extra)}" if extra else ""))
    print0(f"  between stages: activations/gradients of shape ({micro_b}, {config.block_size}, "
           f"{config.n_embd}); the last stage keeps a copy of wte for the tied head")

    # %% The reference (one process) and both schedules, from the same seed on the same batches
    ref = reference_run(config, data, cfg, first_grads=True)
    runs, pipes, rows = {}, {}, {}
    for schedule in SCHEDULES:
        runs[schedule], pipes[schedule] = pipeline_run(config, data, cfg, schedule=schedule)
    torch_runs = {s: pipeline_run(config, data, cfg, schedule=s, engine="torch")[0] for s in SCHEDULES}
    for name, run in [*runs.items(), *((f"torch {s}", r) for s, r in torch_runs.items())]:
        d = torch.tensor([max(abs(a - b) for a, b in zip(run.losses, ref.losses)),
                          max_abs_diff(run.grads, ref.grads, subset=True, cover=run.params),
                          max_abs_diff(run.params, ref.params, subset=True),
                          abs(run.val_loss - ref.val_loss)])
        dist.all_reduce(d, op=dist.ReduceOp.MAX)  # the worst stage
        rows[name] = dict(zip(("loss", "grad", "param", "val_loss"), d.tolist()))
    print0(f"\nloss per step: 1 process vs pipeline ({cfg.steps} AdamW steps, grad clip {cfg.grad_clip})")
    print0(f"{'step':>4} {'1 process':>10} {'gpipe':>10} {'1f1b':>10}")
    for i in range(cfg.steps):
        print0(f"{i:>4} {ref.losses[i]:>10.4f} {runs['gpipe'].losses[i]:>10.4f} "
               f"{runs['1f1b'].losses[i]:>10.4f}")
    print0(f"\n{'vs 1 process':<12} {'max|loss|':>10} {'max|grad|':>10} {'max|param|':>11} "
           f"{'|val loss|':>11}")
    for name, r in rows.items():
        print0(f"{name:<12} {r['loss']:>10.1e} {r['grad']:>10.1e} {r['param']:>11.1e} "
               f"{r['val_loss']:>11.1e}")
    print0("(torch = the same stage modules run by torch.distributed.pipelining's ScheduleGPipe and "
           "Schedule1F1B)")

    # %% Timelines of the last training step: compute (F, B) and idle (.) per stage
    real = {s: gather_timelines(pipes[s].timeline) for s in SCHEDULES}
    real_peaks = {s: gather_objects(pipes[s].peak_inflight) for s in SCHEDULES}
    for s in SCHEDULES:
        print0(f"\n{s}, GPT-mini, m={cfg.grad_accum} (last step; digits mark where microbatch j starts):")
        print0(render_text(real[s]))
        for t in real[s]:
            print0(f"  stage {t.stage} order: {order_text(t)}")
    print0("Real stages are not equal (the last one also runs the head and loss), and ranks share the CPU,"
           "\nso the bubble is measured below on stages that are equal by construction.")

    # %% The bubble, measured on balanced synthetic stages (forward sleeps f, backward 2f)
    f = args.sleep_ms / 1e3
    synthetic, table = {}, []
    print0(f"\nbubble = idle / step time, balanced stages (F {f * 1e3:.0f} ms, B {2 * f * 1e3:.0f} ms), "
           f"p={p}:")
    print0(f"{'schedule':<9} {'m':>3} {'measured':>9} {'(p-1)/(m+p-1)':>14} {'diff':>7}   "
           f"peak activations held per stage (measured)")
    for s in SCHEDULES:
        for m in sweep:
            if s == "1f1b" and m < p:
                continue  # 1F1B needs m >= p (ConfigError); GPipe just idles more
            r = measure_bubble(s, m, f=f, b=2 * f)
            synthetic[s, m] = r
            row = {"schedule": s, "m": m, "measured": r["bubble"]["mean"],
                   "per_rank": r["bubble"]["per_rank"], "formula": r["formula"],
                   "peak_inflight": r["peak_inflight"], "step_s": r["bubble"]["window_s"]}
            table.append(row)
            print0(f"{s:<9} {m:>3} {row['measured']:>9.3f} {row['formula']:>14.3f} "
                   f"{row['measured'] - row['formula']:>+7.3f}   {row['peak_inflight']}")
    print0(f"GPipe holds all m microbatches' activations on every stage; 1F1B at most p - stage "
           f"({[p - s for s in range(p)]}), whatever m is. Same bubble, less memory.")
    m_show = args.microbatches if ("gpipe", args.microbatches) in synthetic else sweep[-1]
    for s in SCHEDULES:
        if (s, m_show) in synthetic:
            print0(f"\n{s}, synthetic, m={m_show}:\n" + render_text(synthetic[s, m_show]["timelines"]))

    # %% Save: JSON and the timeline picture
    result = {"world_size": p, "preset": args.preset, "train": cfg.to_dict(),
              "layers": [[r.start, r.stop] for r in layers], "reference_losses": ref.losses,
              "losses": {s: r.losses for s, r in runs.items()}, "parity": rows,
              "peak_inflight_gpt": real_peaks, "bubble": table,
              "timelines_gpt": {s: [t.to_dict() for t in ts] for s, ts in real.items()},
              "timelines_synthetic": {f"{s}_m{m}": [t.to_dict() for t in r["timelines"]]
                                      for (s, m), r in synthetic.items()}}
    path = save_json(LAB, "result", result)
    if dist.get_rank() == 0:
        panels = {f"GPT-mini {s}, m={cfg.grad_accum}": real[s] for s in SCHEDULES}
        panels.update({f"balanced synthetic {s}, m={m_show}": synthetic[s, m_show]["timelines"]
                       for s in SCHEDULES if (s, m_show) in synthetic})
        png = plot_timelines(panels, runs_dir(LAB) / "timeline.png")
        print0(f"\nwrote {path} and {png}")
    return result


# %% Launch: under torchrun this process is one rank; under python it spawns --ranks stages
if __name__ == "__main__":
    launch(rank_main, world, data)
