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
from journey_dist.data import TokenData, load_tokens
from journey_dist.labkit import check_data, check_memory, lab_parser, parse, positive_float, positive_int
from journey_dist.model import GPT
from journey_dist.parallel.data.replicas import VARIANTS, planned_buckets, run_data_parallel
from journey_dist.parity import RunResult, max_abs_diff, reference_run, worst_diffs
from journey_dist.report import buckets_table, ledger_table, losses_table, parity_table
from journey_dist.runtime import comm_device, launch, print0, requested_world_size, save_json
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
BUCKET_SWEEP_MB = (0.05, 0.25, 0.5, 1.0, 2.0, 25.0)


# %% 1. Buckets: gradients in the order backward produces them (reverse layers), greedy up to a cap
def buckets(model: GPT) -> dict[float, list[int]]:
    """The buckets (bytes each; one all-reduce per bucket and step) for each cap swept and --bucket-mb."""
    return {mb: planned_buckets(model, mb) for mb in sorted({*BUCKET_SWEEP_MB, args.bucket_mb})}


# %% 2. One process: the reference, and how far cutting its batch into the ranks' shards moves it
def reference(data: TokenData, device: torch.device, n: int) -> tuple[RunResult, RunResult]:
    """The fresh model on the whole global batch, and the same process taking it as the n ranks'
    shards (gradient accumulation, no communication): the rounding floor any split of the batch pays."""
    ref = reference_run(config, data, cfg, first_grads=True, device=device)
    split = reference_run(config, data, replace(cfg, grad_accum=cfg.grad_accum * n), device=device)
    return ref, split


# %% 3. Each variant on the ranks: same seed, same global batches, this rank's shard
def data_parallel(data: TokenData, device: torch.device) -> dict[str, RunResult]:
    return {v: run_data_parallel(v, config, data, cfg, bucket_mb=args.bucket_mb, device=device)
            for v in variants}


# %% 4. Parity: the worst rank against one process, and against the one process that split its batch
def parity(runs: dict[str, RunResult], ref: RunResult, split: RunResult) -> dict[str, dict]:
    return {v: {**worst_diffs(run, ref), "param vs split": worst_diffs(run, split)["param"]}
            for v, run in runs.items()}


# %% Every rank runs the steps in order and prints what to look at
def rank_main(data: TokenData) -> dict:
    device, n = comm_device(), dist.get_world_size()
    model = GPT(config)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print0(f"{n} ranks ({dist.get_backend()}), {args.preset}: {grad_bytes / 2**20:.2f} MiB of fp32 gradients;"
           f" {cfg.batch_size // n} of {cfg.batch_size} sequences per rank in {cfg.grad_accum} micro-step(s)")
    layouts = buckets(model)

    ref, split = reference(data, device, n)
    floor = max_abs_diff(split.params, ref.params)
    runs = data_parallel(data, device)
    diffs = parity(runs, ref, split)
    print0(losses_table(ref.losses, {v: run.losses for v, run in runs.items()}))
    print0(parity_table(diffs, seconds={v: run.seconds for v, run in runs.items()}))
    print0(f"rounding floor (one process, batch in {n * cfg.grad_accum} micro-batches): {floor:.1e}")

    ddp = runs["ddp"].details["ddp_buckets"] if "ddp" in runs else None  # DDP rebuilds after step 1
    print0(buckets_table(layouts, args.bucket_mb, ddp))
    # the ledger of one more step (DDP has rebuilt its buckets by then), measured vs the formula
    print0(ledger_table({v: (run.comm, run.analytic) for v, run in runs.items()}))

    rows = {v: {"losses": run.losses, "loss_diff": diffs[v]["loss"], "grad_diff": diffs[v]["grad"],
                "param_diff": diffs[v]["param"], "param_diff_vs_split": diffs[v]["param vs split"],
                "seconds": run.seconds, "buckets": run.buffers["all_reduce"],
                "measured": run.comm.get("all_reduce", {}), "analytic": run.analytic["all_reduce"],
                "ledger": run.details["ledger"], "ddp_buckets": run.details.get("ddp_buckets")}
            for v, run in runs.items()}
    result = {"world_size": n, "preset": args.preset, "train": cfg.to_dict(), "bucket_mb": args.bucket_mb,
              "grad_bytes": grad_bytes, "buckets_by_mb": {mb: len(layouts[mb]) for mb in BUCKET_SWEEP_MB},
              "buckets": layouts[args.bucket_mb], "reference_losses": ref.losses, "split_param_diff": floor,
              "variants": rows}
    print0(f"wrote {save_json(LAB, 'result', result)}")
    return result


# %% Launch: under torchrun this process is one rank; under python it spawns --ranks ranks
if __name__ == "__main__":
    launch(rank_main, world, data)
