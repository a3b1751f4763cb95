"""Lab 06: ZeRO and sharding -- one GPT-mini trained with DDP, our ZeRO-1, DeepSpeed ZeRO-1/2/3, FSDP2.

    python labs/06_zero_and_fsdp.py                       # spawns 2 ranks (gloo on CPU)
    python labs/06_zero_and_fsdp.py --skip-deepspeed      # faster: DDP, ZeRO-1 (ours), FSDP2
    torchrun --nproc_per_node=2 labs/06_zero_and_fsdp.py
    deepspeed --num_gpus 2 labs/06_zero_and_fsdp.py --ds-config launch/deepspeed/zero2.json
    ACCELERATE_USE_CPU=1 accelerate launch --config_file launch/accelerate/cpu_2proc.yaml \
        labs/06_zero_and_fsdp.py

Every scheme trains the same fresh model on the same global batches, so they must log the same
losses and end with the same weights as DDP (fp32 on CPU: ~1e-6), and take the same first step
(gradients compared where a scheme gathers them, else its global norm: DeepSpeed keeps partitions).
What differs is what a rank keeps: DDP every weight, gradient and AdamW moment; ZeRO-1 a 1/N
slice of the moments (+ padding to a multiple of N); ZeRO-2 also of the gradients; ZeRO-3 / FSDP2
also of the weights. What to look at: the memory table, measured bytes of this rank's tensors next
to memory.estimate.model_state_bytes(zero=stage). DeepSpeed 0.19 is not the textbook: its stage 1
also partitions the reduced gradients, and it keeps an fp32 master partition beside the moments
even in fp32 (its own column in fp32; in 'optimizer' under bf16, where the formula's 12 bytes
include it). And the communication of one step: ZeRO-1 hands reduce-scatter + all-gather the same
bytes DDP hands all-reduce; FSDP2 all-gathers each unit twice (forward, backward). DeepSpeed's
collectives are measured, not derived: stages 1 and 2 all-reduce gradient buckets and keep their
slice, stage 3 gathers the tied wte for both the embedding and the head. More: notes/zero.md.

The last section composes on a 2-D DeviceMesh the way torchtitan does (its own 4 ranks under
python): ("dp", "tp") = 2 x 2, the DTensor TP plan on mesh["tp"], then fully_shard on mesh["dp"];
and HSDP as the dp dimension, ("dp_replicate", "dp_shard") = 2 x 2 (tp = 1 on 4 ranks; --hsdp-tp 2
with --ranks-2d 8 makes it 3-D). Both against one process, and each rank's bytes next to
memory.estimate with dp (the shard group), tp and zero=3 (equal), the parameters next to the
rounding floor it prints (one process summing the batch in 2 micro-batches: the same float
rounding, which AdamW's first steps turn into parameter differences). Under a launcher the
section runs in the launched job when its world has --ranks-2d ranks.
Results: runs/06_zero_and_fsdp/result.json, runs/06_zero_and_fsdp/mesh_2d.json
"""

# %% Setup: arguments, model config, and every check that can fail, before any process starts
import argparse
import os
from dataclasses import replace

import torch
import torch.distributed as dist

from journey_dist.config import ParallelConfig, get_preset
from journey_dist.data import TokenData, load_tokens
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
from journey_dist.memory.estimate import estimate_memory, model_state_bytes
from journey_dist.parallel.data.replicas import run_data_parallel
from journey_dist.parallel.sharding.accelerate import run_accelerate, under_accelerate
from journey_dist.parallel.sharding.deepspeed import choose_stages, load_config, run_deepspeed
from journey_dist.parallel.sharding.fsdp import run_fsdp2
from journey_dist.parallel.sharding.fsdp_tp import check_layout, run_fsdp_tp
from journey_dist.parallel.sharding.zero import run_zero1
from journey_dist.parity import (
    RunResult,
    fresh_model,
    grad_check,
    loss_diff,
    max_abs_diff,
    reference_run,
    worst_diffs,
    worst_over_ranks,
)
from journey_dist.report import bytes_table, ledger_tables, losses_table, parity_table, table
from journey_dist.runtime import (
    comm_device,
    launch,
    print0,
    requested_world_size,
    save_json,
    under_torchrun,
)
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
parser.add_argument("--skip-2d", action="store_true", help="leave out the 2-D mesh section")
parser.add_argument("--ranks-2d", type=positive_int, default=4, help="ranks of the 2-D mesh section")
parser.add_argument("--tp-2d", type=positive_int, default=2, help="tp size of the (dp, tp) mesh")
parser.add_argument("--hsdp-tp", type=positive_int, default=1,
                    help="tp size beside HSDP's (dp_replicate=2, dp_shard) dimensions")
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
LAYOUTS_2D = {f"fsdp2 x tp ({args.ranks_2d // args.tp_2d} x {args.tp_2d})":
              {"dp": args.ranks_2d // args.tp_2d, "tp": args.tp_2d},
              f"hsdp (2 x {args.ranks_2d // (2 * args.hsdp_tp)}) x tp {args.hsdp_tp}":
              {"dp": args.ranks_2d // args.hsdp_tp, "tp": args.hsdp_tp, "replicate": 2}}
if not args.skip_2d:
    for layout in LAYOUTS_2D.values():  # before any process starts
        check_layout(args.ranks_2d, **layout)
        pcfg_2d = ParallelConfig(dp=layout["dp"], tp=layout["tp"], zero=3)
        pcfg_2d.validate(config, args.ranks_2d, args.batch_size)
    check_memory(args.force, config, args.batch_size, ranks=args.ranks_2d)
# loss and first gradients: rounding only; parameters after AdamW steps: next to the rounding floor
TOL_2D = {"loss": 1e-5, "grad": 1e-6, "param": 1e-4}
ZERO_STAGE = {"ddp": 0, "zero1 (ours)": 1, **{f"deepspeed zero-{s}": s for s in stages}, "fsdp2 (zero-3)": 3}


# %% 1. The references: one process, and DDP (every rank keeps every weight, gradient and moment)
def references(data: TokenData, device: torch.device) -> tuple[RunResult, RunResult]:
    return (reference_run(config, data, cfg, device=device),
            run_data_parallel("ddp", config, data, cfg, device=device))


# %% 2. The sharded schemes: our ZeRO-1, DeepSpeed's ZeRO stages, FSDP2 (accelerate under its launcher)
def sharded(data: TokenData, device: torch.device, dtype: str) -> dict[str, RunResult]:
    ds = None if ds_file is None else {**ds_file, "bf16": {"enabled": dtype == "bf16"}}
    runs = {"zero1 (ours)": run_zero1(config, data, cfg, device=device)}
    for stage in stages:
        runs[f"deepspeed zero-{stage}"] = run_deepspeed(stage, config, data, cfg, device=device,
                                                        ds_config=ds, dtype=dtype)
    runs["fsdp2 (zero-3)"] = run_fsdp2(config, data, cfg, device=device)
    if under_accelerate():
        runs["accelerate (ddp)"] = run_accelerate(config, data, cfg, device=device)
    return runs


# %% 3. Parity: every scheme against DDP, the worst rank: losses, parameters, first-step gradients
def parity(runs: dict[str, RunResult], ddp: RunResult) -> tuple[dict[str, dict], dict[str, str]]:
    """The worst |difference| per scheme, and how its gradients were compared (parity.grad_check):
    max |diff| where a scheme gathers them ("grad"), else the global norm's relative difference."""
    diffs, kinds = {}, {}
    for name, run in runs.items():
        kinds[name], grad = grad_check(run, ddp)
        diffs[name] = worst_over_ranks({"loss": loss_diff(run.losses, ddp.losses),
                                        "grad": grad if kinds[name] == "max|g|" else None,
                                        "rel grad norm": grad if kinds[name] == "rel norm" else None,
                                        "param": max_abs_diff(run.params, ddp.params)})
    return diffs, kinds


# %% 4. Memory: this rank's model states, measured, next to model_state_bytes for its ZeRO stage
def memory(runs: dict[str, RunResult], n_params: int, dtype: str) -> tuple[dict, dict]:
    """Per scheme its stage, measured bytes and the formula's (bf16-mixed for DeepSpeed on GPUs, whose
    12 optimizer bytes include the fp32 master: the master is then added to the measured optimizer)."""
    table, cells, n = {}, {}, dist.get_world_size()
    for name, stage in ZERO_STAGE.items():
        mixed = name.startswith("deepspeed") and dtype == "bf16"
        measured = runs[name].state_bytes
        est = model_state_bytes(n_params, "bf16-mixed" if mixed else "fp32", dp=n, zero=stage)
        table[name] = {"stage": stage, "measured": measured, "estimate": est}
        master = measured.get("master")
        cells[name] = {k: (measured[k], est[k]) for k in ("params", "grads")}
        cells[name]["optimizer"] = (measured["optimizer"] + (master if mixed else 0), est["optimizer"])
        if master is not None:
            cells[name]["+fp32 master"] = (master, None)
    return table, cells


# %% Every rank runs the steps in order and prints what to look at
def rank_main(data: TokenData) -> dict:
    device, n = comm_device(), dist.get_world_size()
    dtype = "bf16" if device.type == "cuda" else "fp32"  # DeepSpeed: bf16 on GPUs, fp32 on CPU
    n_params = fresh_model(config).num_params()
    print0(f"{n} ranks ({dist.get_backend()}), {args.preset}: {n_params:,} parameters, {dtype}; DDP keeps "
           f"4 + 4 + 8 = 16 bytes per parameter = {16 * n_params / 2**20:.2f} MiB per rank (fp32 AdamW)")

    ref, ddp = references(data, device)
    runs = {"ddp": ddp, **sharded(data, device, dtype)}
    accel_procs = runs["accelerate (ddp)"].details["processes"] if "accelerate (ddp)" in runs else None
    if accel_procs is not None:
        print0(f"accelerate launch: Accelerator sees {accel_procs} processes")

    tol = 1e-5 if dtype == "fp32" else 5e-2  # bf16 DeepSpeed on GPUs rounds every weight
    diffs, kinds = parity(runs, ddp)
    print0(losses_table(ref.losses, {name: run.losses for name, run in runs.items()}))
    print0(parity_table(diffs, tol=tol, against="DDP", seconds={k: r.seconds for k, r in runs.items()}))
    print0(f"DDP vs one process: max|param| {max_abs_diff(ddp.params, ref.params):.1e}")

    table, cells = memory(runs, n_params, dtype)
    print0(bytes_table(cells))
    print0(ledger_tables({name: (run.comm, run.analytic) for name, run in runs.items()}))

    rows = {name: {"losses": run.losses, "loss_diff": d["loss"], "param_diff": d["param"],
                   "grad_diff": d["grad"] if kinds[name] == "max|g|" else d["rel grad norm"],
                   "grad_check": kinds[name], "seconds": run.seconds, "comm": run.comm,
                   "analytic": run.analytic}
            for (name, run), d in zip(runs.items(), diffs.values())}
    result = {"world_size": n, "preset": args.preset, "params": n_params, "dtype": dtype,
              "train": cfg.to_dict(), "reference_losses": ref.losses, "schemes": rows, "memory": table,
              "tolerance": tol,
              "accelerate_processes": accel_procs,
              # who started the ranks: a launcher (torchrun, accelerate, deepspeed) or this lab's spawn
              "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "lab spawn"}
    print0(f"wrote {save_json(LAB, 'result', result)}")
    if under_torchrun() and not args.skip_2d:  # a launcher's job: the 2-D section runs in it if it fits
        if n == args.ranks_2d:
            rank_2d(data)
        else:
            note(f"the 2-D mesh section needs {args.ranks_2d} ranks and this job has {n}: launch "
                 f"--nproc_per_node={args.ranks_2d}, or run the lab under python (it spawns them)")
    return result


# %% 5. FSDP2 + TP on a 2-D DeviceMesh (and HSDP as the dp dimension): parity and bytes per rank
def rank_2d(data: TokenData) -> dict:
    """Each layout against one process; this rank's shards next to estimate_memory(dp=shard group,
    tp, zero=3); the collectives of one step on the dp and the tp groups."""
    ref = reference_run(config, data, cfg, first_grads=True)
    # rounding floor: one process summing the same batch in 2 micro-batches (another order, as dp
    # halves and tp partial sums do); AdamW's first steps (~lr * sign g) turn such rounding into steps
    floor = max_abs_diff(reference_run(config, data, replace(cfg, grad_accum=2)).params, ref.params)
    runs = {name: run_fsdp_tp(config, data, cfg, **layout) for name, layout in LAYOUTS_2D.items()}
    diffs = {name: worst_diffs(run, ref) for name, run in runs.items()}
    print0(f"2-D mesh on {dist.get_world_size()} ranks; mesh of {next(iter(runs))}: "
           f"{next(iter(runs.values())).details['mesh']} (rows: dp, columns: tp)")
    shown = {k: ", ".join(v) for k, v in next(iter(runs.values())).details["placements"].items()
             if ".h.0." in k or "wte" in k}  # a DTensor on (dp, tp), or on dp only where tp replicates
    print0(table([{"param": k, "placements": v} for k, v in shown.items()],
                 [("param", "parameter", str), ("placements", "placements", str)]))
    print0(parity_table(diffs, tol=TOL_2D, seconds={k: r.seconds for k, r in runs.items()}))
    print0(f"rounding floor (one process, the batch in 2 micro-batches): max|param| {floor:.1e}")
    cells, estimates = {}, {}
    for name, layout in LAYOUTS_2D.items():
        shard = layout["dp"] // layout.get("replicate", 1)
        est = estimate_memory(config, batch_size=cfg.batch_size, seq_len=config.block_size, dp=shard,
                              tp=layout["tp"], zero=3)
        estimates[name] = {"params": est.params, "grads": est.grads, "optimizer": est.optimizer}
        cells[name] = {k: (runs[name].state_bytes[k], estimates[name][k]) for k in estimates[name]}
    print0(bytes_table(cells))
    print0(ledger_tables({f"{name} [{group}]": (run.comm[group], run.analytic.get(group, {}))
                          for name, run in runs.items() for group in ("dp", "tp")}))
    layouts = {name: {**LAYOUTS_2D[name], "diffs": diffs[name], "state": runs[name].state_bytes,
                      "estimate": estimates[name], "comm": runs[name].comm, "analytic": runs[name].analytic,
                      "mesh": runs[name].details["mesh"]} for name in runs}
    result = {"world_size": dist.get_world_size(), "preset": args.preset, "train": cfg.to_dict(),
              "tolerance": TOL_2D, "rounding_floor_param_diff": floor, "layouts": layouts}
    print0(f"wrote {save_json(LAB, 'mesh_2d', result)}")
    return result


# %% Launch: under torchrun (or deepspeed / accelerate launch) this process is one rank; under
# python it spawns --ranks ranks
if __name__ == "__main__":
    launch(rank_main, world, data)
    if not args.skip_2d and not under_torchrun():
        launch(rank_2d, args.ranks_2d, data)
