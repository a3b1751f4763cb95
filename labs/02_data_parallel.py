"""Lab 02: data parallel three ways -- naive, bucketed (both from scratch) and DDP -- vs one process.

    python labs/02_data_parallel.py                          # spawns 2 ranks (gloo on CPU)
    torchrun --nproc_per_node=2 labs/02_data_parallel.py
    python labs/02_data_parallel.py --bucket-mb 0.25 --grad-accum 2

Each rank keeps a full GPT-mini and trains on its half of the same global batch; gradients are
averaged with all-reduce, so every rank takes the step one process would take on the whole batch.
What to look at: all three variants end with the parameters of the single-process run up to
float rounding (~1e-5 after 10 AdamW steps), and that is exactly what one process pays for cutting
its batch into the same shards (diff 0 between the two on CPU with 2 ranks). How the bucket size
sets the number of all-reduce calls. The ledger: every step hands each gradient byte to all-reduce
once (naive: one call per parameter; bucketed and DDP: one per bucket), a rank sends 2(n-1)/n of
it on a ring, and measured equals analytic.
Results: runs/02_data_parallel/result.json
"""

# %% Setup: arguments, model config, and every check that can fail, before any process starts
from dataclasses import replace

import torch
import torch.distributed as dist

from journey_dist.config import ConfigError, ParallelConfig, check_bucket_mb, get_preset
from journey_dist.data import load_tokens
from journey_dist.labkit import check_data, check_memory, lab_parser, parse, positive_float, positive_int
from journey_dist.model import GPT
from journey_dist.parallel.data.replicas import VARIANTS, planned_buckets, run_data_parallel
from journey_dist.parity import max_abs_diff, reference_run
from journey_dist.runtime import launch, print0, requested_world_size, save_json
from journey_dist.train import TrainConfig

LAB = "02_data_parallel"
parser = lab_parser(__doc__)
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--data", default="handbook", help="embedded corpus name or a UTF-8 text file")
parser.add_argument("--ranks", type=positive_int, default=2, help="ranks to spawn under plain python")
parser.add_argument("--steps", type=positive_int, default=10)
parser.add_argument("--batch-size", type=positive_int, default=16, help="global batch (sequences)")
parser.add_argument("--grad-accum", type=positive_int, default=1, help="micro-steps per step on each rank")
parser.add_argument("--bucket-mb", type=positive_float, default=1.0,
                    help="bucket size (MiB), bucketed and DDP")
parser.add_argument("--lr", type=positive_float, default=3e-3)
parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

world = requested_world_size(args.ranks)
variants = [v for v in args.variants.split(",") if v]
if not variants or set(variants) - set(VARIANTS):
    raise ConfigError(f"--variants {args.variants!r}: unknown or none; choose from {', '.join(VARIANTS)}, "
                      f"e.g. --variants {VARIANTS[0]}")
config = get_preset(args.preset)
ParallelConfig(dp=world, microbatches=args.grad_accum).validate(config, world, args.batch_size)
check_bucket_mb(args.bucket_mb)
data = load_tokens(args.data)
check_data(parser, data, args.batch_size, config.block_size)
check_memory(args.force, config, args.batch_size, ranks=world)
cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                  lr=args.lr, warmup_steps=max(1, args.steps // 5))


# %% What every rank runs
def rank_main(data) -> dict:
    n = dist.get_world_size()
    # gloo works on CPU tensors, NCCL on this rank's GPU (init_distributed picked the backend)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    model = GPT(config)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print0(f"{n} ranks ({dist.get_backend()}) | {args.preset}: {model.num_params():,} parameters "
           f"= {grad_bytes / 2**20:.2f} MiB of fp32 gradients | global batch {cfg.batch_size} x "
           f"{config.block_size} tokens, {cfg.batch_size // n} sequences per rank in "
           f"{cfg.grad_accum} micro-step(s) | {cfg.steps} AdamW steps")

    # Buckets: reverse parameter order (the order backward produces gradients), greedy up to the cap.
    sweep = {mb: len(planned_buckets(model, mb)) for mb in (0.05, 0.25, 0.5, 1.0, 2.0, 25.0)}
    chosen = planned_buckets(model, args.bucket_mb)
    print0("\nbucket size (MiB) -> all-reduce calls per step: "
           + ", ".join(f"{mb:g} -> {k}" for mb, k in sweep.items()))
    print0(f"--bucket-mb {args.bucket_mb:g}: {len(chosen)} buckets of "
           + ", ".join(f"{b / 2**20:.2f}" for b in chosen) + " MiB")

    # The reference: one process, fresh model from seed 0, the whole global batch every step.
    ref = reference_run(config, data, cfg, first_grads=True, device=device)
    print0(f"\nreference (1 process): loss {ref.losses[0]:.4f} -> {ref.losses[-1]:.4f}")
    # The same process with the batch cut into the ranks' shards (gradient accumulation, no
    # communication): how far float rounding alone moves the result when a batch is split.
    split = reference_run(config, data, replace(cfg, grad_accum=cfg.grad_accum * n), device=device)
    split_diff = max_abs_diff(split.params, ref.params)
    print0(f"1 process, batch in {n * cfg.grad_accum} micro-batches: max|param-ref| {split_diff:.1e} "
           "(the rounding floor any split of the batch pays)")

    # Each variant: same seed, same global batches, this rank's shard.
    rows, ledgers = {}, {}
    print0(f"\n{'variant':<9} {'loss first -> last':>18} {'max|loss-ref|':>14} {'max|grad-ref|':>14} "
           f"{'max|param-ref|':>15} {'vs 1-process split':>18} {'train s':>8}")
    for v in variants:
        run = run_data_parallel(v, config, data, cfg, bucket_mb=args.bucket_mb, device=device)
        diffs = torch.tensor([max(abs(a - b) for a, b in zip(run.losses, ref.losses)),
                              max_abs_diff(run.grads, ref.grads), max_abs_diff(run.params, ref.params),
                              max_abs_diff(run.params, split.params)], device=device)
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)  # the worst rank
        rows[v] = {"losses": run.losses, "loss_diff": diffs[0].item(), "grad_diff": diffs[1].item(),
                   "param_diff": diffs[2].item(), "param_diff_vs_split": diffs[3].item(),
                   "seconds": run.seconds, "buckets": run.buffers["all_reduce"],
                   "measured": run.comm.get("all_reduce", {}), "analytic": run.analytic["all_reduce"],
                   "ledger": run.details["ledger"], "ddp_buckets": run.details.get("ddp_buckets")}
        print0(f"{v:<9} {run.losses[0]:>8.4f} -> {run.losses[-1]:.4f} {diffs[0]:>14.1e} "
               f"{diffs[1]:>14.1e} {diffs[2]:>15.1e} {diffs[3]:>18.1e} {run.seconds:>8.1f}")
        ledgers[v] = (rows[v]["measured"], rows[v]["analytic"])
    if "ddp" in rows:
        ddp = rows["ddp"]["ddp_buckets"]
        print0(f"DDP's buckets: first iteration {[round(b / 2**20, 2) for b in ddp['first_iteration']]} "
               f"MiB (one bucket until it has seen the order grads arrive), rebuilt "
               f"{[round(b / 2**20, 2) for b in ddp['rebuilt']]} MiB")

    # The ledger of one more step (DDP has rebuilt its buckets by then), measured vs analytic.
    print0(f"\ncommunication in one step, per rank: all-reduce, ring sends 2(n-1)/n = "
           f"{2 * (n - 1) / n:g} x bytes")
    print0(f"{'variant':<9} {'calls meas/analytic':>20} {'bytes measured':>15} {'bytes analytic':>15} "
           f"{'sent (ring)':>12}  match")
    for v, (m, e) in ledgers.items():
        same = m.get("calls") == e["calls"] and m.get("bytes") == e["bytes"]
        print0(f"{v:<9} {m.get('calls', 0):>9} / {e['calls']:<8} {m.get('bytes', 0):>15,} "
               f"{e['bytes']:>15,} {m.get('wire_bytes', 0):>12,.0f}  {'yes' if same else 'NO'}")

    result = {"world_size": n, "preset": args.preset, "train": cfg.to_dict(), "bucket_mb": args.bucket_mb,
              "grad_bytes": grad_bytes, "buckets_by_mb": sweep, "buckets": chosen,
              "reference_losses": ref.losses, "split_param_diff": split_diff, "variants": rows}
    path = save_json(LAB, "result", result)
    print0(f"\nwrote {path}")
    return result


# %% Launch: under torchrun this process is one rank; under python it spawns --ranks ranks
if __name__ == "__main__":
    launch(rank_main, world, data)
