"""Lab 06: ZeRO and sharding -- one GPT-mini trained with DDP, our ZeRO-1, DeepSpeed ZeRO-1/2/3, FSDP2.

    python labs/06_zero_and_fsdp.py                       # spawns 2 ranks (gloo on CPU)
    python labs/06_zero_and_fsdp.py --skip-deepspeed      # faster: DDP, ZeRO-1 (ours), FSDP2
    torchrun --nproc_per_node=2 labs/06_zero_and_fsdp.py
    deepspeed --num_gpus 2 labs/06_zero_and_fsdp.py --ds-config launch/deepspeed/zero2.json
    ACCELERATE_USE_CPU=1 accelerate launch --config_file launch/accelerate/cpu_2proc.yaml \
        labs/06_zero_and_fsdp.py

Every scheme trains the same fresh model on the same global batches, so they must log the same
losses and end with the same weights as DDP (fp32 on CPU: ~1e-6). What differs is what a rank
keeps: DDP every weight, gradient and AdamW moment; ZeRO-1 a 1/N slice of the moments; ZeRO-2
also of the gradients; ZeRO-3 / FSDP2 also of the weights. What to look at: the memory table,
measured bytes of this rank's tensors next to memory.estimate.model_state_bytes(zero=stage);
DeepSpeed's extra fp32 master partition (a copy it keeps even in fp32); and the communication of
one step: ZeRO-1 hands reduce-scatter + all-gather the same bytes DDP hands all-reduce.
Results: runs/06_zero_and_fsdp/result.json
"""

# %% Setup: arguments, model config, and every check that can fail, before any process starts
import argparse
import os

import torch
import torch.distributed as dist

from journey_dist.config import ParallelConfig, get_preset
from journey_dist.data import load_tokens
from journey_dist.labkit import (
    check_data,
    check_memory,
    int_list,
    lab_parser,
    note,
    parse,
    positive_float,
    positive_int,
)
from journey_dist.memory.estimate import model_state_bytes
from journey_dist.parallel.data.replicas import run_data_parallel
from journey_dist.parallel.sharding.accelerate import run_accelerate, under_accelerate
from journey_dist.parallel.sharding.deepspeed import choose_stages, load_config, run_deepspeed
from journey_dist.parallel.sharding.fsdp import run_fsdp2
from journey_dist.parallel.sharding.zero import run_zero1
from journey_dist.parity import fresh_model, max_abs_diff, reference_run
from journey_dist.runtime import launch, print0, requested_world_size, save_json
from journey_dist.train import TrainConfig

LAB = "06_zero_and_fsdp"
parser = lab_parser(__doc__)
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--data", default="handbook", help="embedded corpus name or a UTF-8 text file")
parser.add_argument("--ranks", type=positive_int, default=2, help="ranks to spawn under plain python")
parser.add_argument("--steps", type=positive_int, default=5)
parser.add_argument("--batch-size", type=positive_int, default=16, help="global batch (sequences)")
parser.add_argument("--lr", type=positive_float, default=3e-3)
parser.add_argument("--skip-deepspeed", action="store_true", help="leave out the DeepSpeed stages")
parser.add_argument("--stages", type=int_list, default=None,
                    help="DeepSpeed ZeRO stages to run (default 1,2,3 when DeepSpeed is installed)")
parser.add_argument("--ds-config", default=None, help="a DeepSpeed JSON (its stage replaces --stages)")
# the deepspeed launcher passes --local_rank (torch's older launcher --local-rank); the rank comes from env
parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

world = requested_world_size(args.ranks)
config = get_preset(args.preset)
ParallelConfig(dp=world, zero=1).validate(config, world, args.batch_size)
stages, missing = choose_stages(args.stages, args.ds_config, args.skip_deepspeed)
if missing:
    note(missing)
data = load_tokens(args.data)
check_data(parser, data, args.batch_size, config.block_size)
check_memory(args.force, config, args.batch_size, ranks=world)
cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=1)
ds_file = None
if args.ds_config:
    ds_file = load_config(args.ds_config, cfg, world)  # validated here, before any rank starts
    stages = [ds_file["zero_optimization"]["stage"]]


# %% What every rank runs
def rank_main(data) -> dict:
    n = dist.get_world_size()
    # gloo works on CPU tensors, NCCL on this rank's GPU (init_distributed picked the backend)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dtype = "bf16" if device is not None else "fp32"  # DeepSpeed: bf16 on GPUs, fp32 on CPU
    ds = None if ds_file is None else {**ds_file, "bf16": {"enabled": dtype == "bf16"}}
    N = fresh_model(config).num_params()
    print0(f"{n} ranks ({dist.get_backend()}) | {args.preset}: {N:,} parameters | global batch "
           f"{cfg.batch_size} x {config.block_size} tokens | {cfg.steps} AdamW steps | fp32 AdamW keeps "
           f"4 + 4 + 8 = 16 bytes per parameter = {16 * N / 2**20:.2f} MiB per rank under DDP")

    ref = reference_run(config, data, cfg, device=device)
    ddp = run_data_parallel("ddp", config, data, cfg, device=device)
    runs = {"ddp": ddp, "zero1 (ours)": run_zero1(config, data, cfg, device=device)}
    for stage in stages:
        runs[f"deepspeed zero-{stage}"] = run_deepspeed(stage, config, data, cfg, device=device,
                                                        ds_config=ds, dtype=dtype)
    runs["fsdp2 (zero-3)"] = run_fsdp2(config, data, cfg, device=device)
    accel_procs = None
    if under_accelerate():
        runs["accelerate (ddp)"] = run_accelerate(config, data, cfg, device=device)
        accel_procs = runs["accelerate (ddp)"].details["processes"]
        print0(f"accelerate launch: Accelerator sees {accel_procs} processes")

    # %% Parity: every scheme against DDP (and DDP against one process)
    tol = 1e-5 if dtype == "fp32" else 5e-2  # bf16 DeepSpeed on GPUs rounds every weight
    print0(f"\nreference (1 process): loss {ref.losses[0]:.4f} -> {ref.losses[-1]:.4f}")
    # AdamW undoes a constant gradient scale, so equal parameters do not prove equal gradients: also
    # compare the first step's gradients (or, where a scheme keeps only shards, its global norm)
    ddp_norm = torch.sqrt(sum((g.float() ** 2).sum() for g in ddp.grads.values())).item()
    print0(f"{'scheme':<20} {'loss first -> last':>18} {'max|loss-DDP|':>14} {'max|param-DDP|':>15} "
           f"{'grads vs DDP':>15} {'train s':>8}")
    rows = {}
    for name, run in runs.items():
        grads = getattr(run, "grads", None)
        norm = getattr(run, "grad_norm", None)
        grad_diff = (max_abs_diff(grads, ddp.grads) if grads else
                     abs(norm - ddp_norm) / ddp_norm if norm is not None else float("nan"))
        grad_kind = "max|g|" if grads else "rel norm" if norm is not None else "-"
        diffs = torch.tensor([max(abs(a - b) for a, b in zip(run.losses, ddp.losses)),
                              max_abs_diff(run.params, ddp.params), grad_diff], device=device)
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)  # the worst rank
        comm, expected = run.comm, run.analytic
        rows[name] = {"losses": run.losses, "loss_diff": diffs[0].item(), "param_diff": diffs[1].item(),
                      "grad_diff": None if grad_kind == "-" else diffs[2].item(), "grad_check": grad_kind,
                      "seconds": run.seconds, "comm": comm, "analytic": expected}
        grad_text = "-" if grad_kind == "-" else f"{diffs[2]:.1e} {grad_kind}"
        print0(f"{name:<20} {run.losses[0]:>8.4f} -> {run.losses[-1]:.4f} {diffs[0]:>14.1e} "
               f"{diffs[1]:>15.1e} {grad_text:>15} {run.seconds:>8.1f}")
    print0(f"DDP vs one process: max|param| {max_abs_diff(ddp.params, ref.params):.1e}; "
           f"tolerance for every row: {tol:g} ({dtype})")

    # %% Memory: this rank's tensors, measured, next to the formula for its ZeRO stage
    mem = {"ddp": (ddp.state_bytes, 0)}
    mem["zero1 (ours)"] = (runs["zero1 (ours)"].state_bytes, 1)
    for stage in stages:
        mem[f"deepspeed zero-{stage}"] = (runs[f"deepspeed zero-{stage}"].state_bytes, stage)
    mem["fsdp2 (zero-3)"] = (runs["fsdp2 (zero-3)"].state_bytes, 3)
    est_dtype = "fp32" if dtype == "fp32" else "bf16-mixed"
    print0(f"\nper-rank model states, MiB: measured (estimate = model_state_bytes(N, {est_dtype!r}, "
           f"dp={n}, zero=stage))")
    print0(f"{'scheme':<20} {'stage':>5} {'params':>15} {'grads':>15} {'optimizer':>15} {'+fp32 master':>13}")
    mib = 2**20
    table = {}
    for name, (measured, stage) in mem.items():
        mixed = name.startswith("deepspeed") and est_dtype == "bf16-mixed"
        est = model_state_bytes(N, "bf16-mixed" if mixed else "fp32", dp=n, zero=stage)
        master = measured.get("master")
        shown = {**measured, "optimizer": measured["optimizer"] + (master if mixed else 0)}  # 12 = 4 + 8
        cells = [f"{shown[k] / mib:6.3f} / {est[k] / mib:6.3f}" for k in ("params", "grads", "optimizer")]
        print0(f"{name:<20} {stage:>5} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
               f"{'' if master is None else f'{master / mib:.3f}':>13}")
        table[name] = {"stage": stage, "measured": measured, "estimate": est}
    print0(f"unsharded AdamW moments: {ddp.state_bytes['optimizer'] / mib:.3f} MiB; ZeRO-1 keeps 1/{n} "
           "(+ padding to a multiple of dp). DeepSpeed's stage 1 (0.19) also partitions the reduced "
           "gradients, and keeps an fp32 master partition next to the moments (counted in 'optimizer' "
           "under bf16, where the formula's 12 bytes include it; shown apart in fp32).")

    # %% Communication of one step, per rank (ledger vs analytic where derived)
    print0(f"\ncommunication of one step, per rank ({n} ranks; ring: all-reduce 2(n-1)/n, "
           "reduce-scatter and all-gather (n-1)/n of the buffer)")
    print0(f"{'scheme':<20} {'collective':<15} {'calls':>6} {'bytes':>12} {'analytic':>12} {'sent':>12}")
    for name, row in rows.items():
        for op, m in row["comm"].items():
            a = row["analytic"].get(op)
            print0(f"{name:<20} {op:<15} {m['calls']:>6} {m['bytes']:>12,} "
                   f"{'-' if a is None else format(a['bytes'], ','):>12} {m['wire_bytes']:>12,.0f}")
    print0("(DeepSpeed 0.19's stages 1 and 2 all-reduce gradient buckets and keep their slice; its "
           "stage 3 gathers the tied wte for both the embedding and the head; '-': not derived)")

    result = {"world_size": n, "preset": args.preset, "params": N, "dtype": dtype, "train": cfg.to_dict(),
              "reference_losses": ref.losses, "schemes": rows, "memory": table, "tolerance": tol,
              "accelerate_processes": accel_procs,
              # who started the ranks: a launcher (torchrun, accelerate, deepspeed) or this lab's spawn
              "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "lab spawn"}
    path = save_json(LAB, "result", result)
    print0(f"\nwrote {path}")
    return result


# %% Launch: under torchrun (or deepspeed / accelerate launch) this process is one rank; under
# python it spawns --ranks ranks
if __name__ == "__main__":
    launch(rank_main, world, data)
