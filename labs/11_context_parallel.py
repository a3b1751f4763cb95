"""Lab 11: context parallel -- every sequence split over cp ranks: ring attention, zigzag, Ulysses.

    python labs/11_context_parallel.py                        # spawns 2 ranks: gpt-mini at 512 tokens
    python labs/11_context_parallel.py --ranks 4 --preset llama-mini
    torchrun --nproc_per_node=2 labs/11_context_parallel.py
    torchrun --nproc_per_node=8 labs/11_context_parallel.py --designs ring,zigzag --seq 8192

Each rank holds every weight and S/cp tokens of every sequence; only attention needs the other
tokens. Ring attention passes k/v blocks round the ring and merges partial softmaxes (its
backward sends the blocks again and their dK/dV home); zigzag gives rank r chunks r and 2cp-1-r
so causal work is even; Ulysses swaps the sequence split for a head split around attention
(4 all-to-alls per layer each way). What to look at: which tokens each rank holds; the causal
work per rank (FLOPs counted, time measured one rank at a time: plain is max/mean 2cp/(cp+1),
zigzag 1.0); the loss of every step, the first batch's logits and every first-step gradient next
to one process (within 1e-5), parameters after the AdamW steps next to the one-process rounding
floor; the collectives of one step measured by the CommLedger next to the formula; activation
memory per rank measured vs estimated (every token term falls as 1/cp); and PyTorch's own
context_parallel on the same q, k, v, or the exact error it raises (on CPU it cannot run).
Results: runs/11_context_parallel/result.json
"""

# %% Setup: arguments and every check that can fail, before any process starts
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from journey_dist.config import CP_DESIGNS, ConfigError, ParallelConfig, get_preset
from journey_dist.data import get_batch, load_tokens
from journey_dist.labkit import (
    check_data,
    check_memory,
    lab_parser,
    name_list,
    parse,
    positive_float,
    positive_int,
)
from journey_dist.memory.estimate import estimate_memory
from journey_dist.memory.measure import measure_step
from journey_dist.parallel.context.accounting import check_context_parallel
from journey_dist.parallel.context.balance import balance_table
from journey_dist.parallel.context.layout import SequenceLayout, imbalance
from journey_dist.parallel.context.parallelize import ContextParallel, ContextParallelGPT
from journey_dist.parallel.context.run import context_parallel_run
from journey_dist.parallel.context.torch_cp import compare_torch_context_parallel
from journey_dist.parity import fresh_model, max_abs_diff, reference_run, worst_diffs
from journey_dist.report import bytes_table, ledger_matches, ledger_table, losses_table, parity_table, table
from journey_dist.runtime import comm_device, gather_objects, launch, print0, requested_world_size, save_json
from journey_dist.train import TrainConfig, make_optimizer

LAB = "11_context_parallel"
parser = lab_parser(__doc__)
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--seq", type=positive_int, default=512, help="tokens per sequence (the preset's "
                    "block_size is set to it; gpt-mini's default is 128)")
parser.add_argument("--ranks", type=positive_int, default=2, help="cp ranks to spawn under plain python")
parser.add_argument("--data", default="handbook", help="embedded corpus name or a UTF-8 text file")
parser.add_argument("--steps", type=positive_int, default=3)
parser.add_argument("--batch-size", type=positive_int, default=2, help="global batch (sequences)")
parser.add_argument("--lr", type=positive_float, default=3e-3)
parser.add_argument("--repeats", type=positive_int, default=30, help="timing repeats of the balance cell "
                    "(the fastest counts: a busy machine slows some repeats, not the work)")
parser.add_argument("--designs", type=name_list(CP_DESIGNS), default=CP_DESIGNS,
                    help=f"comma-separated, from {','.join(CP_DESIGNS)} (Ulysses: cp must divide the heads)")
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

TOL = 1e-5  # fp32: loss, logits, first-step gradients
world = requested_world_size(args.ranks)
if world < 2:
    raise ConfigError(f"context parallel splits each sequence over at least 2 ranks, got {world}; use "
                      "--ranks 2 (or torchrun --nproc_per_node=2)")
config = get_preset(args.preset, block_size=args.seq)
for design in args.designs:  # the sequence splits, Ulysses splits the heads, the model is one cp splits
    check_context_parallel(ParallelConfig(cp=world, cp_design=design), config, args.seq)
data = load_tokens(args.data)
check_data(parser, data, args.batch_size, args.seq)
check_memory(args.force, config, args.batch_size, ranks=world)
cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=1, eval_batches=1)


# %% Which tokens each rank holds: plain chunks, or zigzag's early + late chunk
def layout_cell(n: int) -> None:
    rows = [{"rank": r, **{kind: ", ".join(f"{c.start}..{c.stop - 1}" for c in
                                           SequenceLayout(n, kind).chunks(args.seq, r))
                           for kind in ("plain", "zigzag")}} for r in range(n)]
    print0(f"cp={n} ranks, {args.seq} tokens per sequence -> {args.seq // n} per rank (global positions):")
    print0(table(rows, [("rank", "rank", str), ("plain", "plain", str), ("zigzag", "zigzag", str)]))


# %% Causal attention work per rank: FLOPs counted, time measured (rank 0 times every rank's blocks)
def balance_cell(n: int, runs: dict) -> dict:
    b = cfg.batch_size // cfg.grad_accum
    work = balance_table(n, args.seq, batch=b, heads=config.n_head, kv_heads=config.kv_heads,
                         head_dim=config.head_dim, repeats=args.repeats) if dist.get_rank() == 0 else None
    ring = [d for d in ("ring", "zigzag") if d in runs]
    in_run = gather_objects({d: runs[d].details["work"]["entries_per_forward"] for d in ring})
    if work is None:
        return {}
    rows = [{"rank": r, **{f"{k} {c}": work[k][r][c] for k in work for c in ("blocks", "flops", "seconds")},
             "run": " / ".join(f"{in_run[r][d]:.0f}" for d in ring)} for r in range(n)]
    cols = [("rank", "rank", str)]
    for k in work:
        cols += [(f"{k} blocks", f"{k} blocks", str), (f"{k} flops", "MFLOP", lambda x: f"{x / 1e6:,.0f}"),
                 (f"{k} seconds", "ms", lambda x: f"{x * 1e3:.1f}")]
    cols.append(("run", f"score entries in the run ({' / '.join(ring)})", str))
    print0(f"\nforward attention per rank, batch {b} x {config.n_head} heads (one thread, fastest of "
           f"{args.repeats}):")
    print0(table(rows, cols))
    ratios = {k: {"flops": imbalance(per_rank), "seconds": imbalance(per_rank, "seconds")}
              for k, per_rank in work.items()}
    print0("max/mean (the step waits for the busiest rank): " + "; ".join(
        f"{k} FLOPs {v['flops']:.2f} (formula {2 * n / (n + 1) if k == 'plain' else 1:.2f}), time "
        f"{v['seconds']:.2f}" for k, v in ratios.items()))
    return {"per_rank": work, "imbalance": ratios, "entries_in_run": in_run}


# %% Every design trained next to one process: loss, logits, gradients, parameters
def parity_cell(n: int) -> tuple[dict, dict]:
    ref = reference_run(config, data, cfg, first_grads=True)
    floor = max_abs_diff(reference_run(config, data, replace(cfg, grad_accum=2)).params, ref.params)
    x, _ = get_batch(data.train, cfg.batch_size, args.seq, 0, cfg.seed)
    with torch.no_grad():
        ref_logits = fresh_model(config)(x)[0]
    runs, diffs = {}, {}
    for design in args.designs:
        runs[design] = run = context_parallel_run(config, data, cfg, design=design)
        d = worst_diffs(run, ref)
        logits = torch.tensor((run.details["logits"].cpu() - ref_logits).abs().max().item())
        dist.all_reduce(logits, op=dist.ReduceOp.MAX)
        diffs[design] = {"loss": d["loss"], "logits": logits.item(), "grad": d["grad"], "param": d["param"]}
    print0(f"\nloss per step ({cfg.steps} AdamW steps, batch {cfg.batch_size} x {args.seq} tokens):")
    print0(losses_table(ref.losses, {k: r.losses for k, r in runs.items()}))
    print0(f"\nworst over all {n} ranks vs one process (fp32; the first batch's logits before training, "
           "first-step gradients):")
    print0(parity_table({k: {m: v[m] for m in ("loss", "logits", "grad")} for k, v in diffs.items()}, tol=TOL,
                        seconds={k: r.seconds for k, r in runs.items()}))
    print0("parameters after the steps: " + ", ".join(f"{k} {v['param']:.1e}" for k, v in diffs.items())
           + f"; the rounding floor (one process, the same batches in 2 micro-batches) {floor:.1e}: AdamW "
           "turns rounding noise in near-zero gradients into ~lr-sized steps")
    return runs, {"diffs": diffs, "reference_losses": ref.losses, "rounding_floor_param_diff": floor,
                  "losses": {k: r.losses for k, r in runs.items()}}


# %% The traffic of one step on the cp group: CommLedger next to the formula
def traffic_cell(runs: dict) -> dict:
    pairs = {k: (r.comm, r.analytic) for k, r in runs.items()}
    print0("\ncollectives of one training step on the cp group (rank 0): measured vs formula")
    print0(ledger_table(pairs))
    print0("ring/zigzag per layer and micro-step: cp-1 k/v blocks forward, then the blocks again (cp-1) and "
           "each block's dK/dV (cp hops) backward; Ulysses: 4 all-to-alls forward, 4 backward; all_reduce: "
           "the loss's [sum, count] per micro-step and every gradient once (summed over cp)")
    return {"match": ledger_matches(pairs), "per_design": {k: {"measured": m, "formula": a}
                                                           for k, (m, a) in pairs.items()}}


# %% Activation memory per rank: measured (tensor ledger, one step) vs estimated
def memory_cell(n: int) -> dict:
    x, y = get_batch(data.train, cfg.batch_size, args.seq, 0, cfg.seed)
    device = comm_device()  # the estimate's terms for the device the ranks measure on
    x, y = x.to(device), y.to(device)
    one = estimate_memory(config, batch_size=cfg.batch_size, seq_len=args.seq, device=device.type)
    cells, out = {"one process": {"activations": (None, one.activations), "peak": (None, one.total)}}, {}
    for design in args.designs:
        model = ContextParallelGPT(fresh_model(config), ContextParallel(None, design)).to(device)
        cp = model.cp
        meas = measure_step(model, make_optimizer(model, cfg), cp.shard(x), cp.shard(y))
        est = estimate_memory(config, batch_size=cfg.batch_size, seq_len=args.seq, device=device.type, cp=n,
                              cp_design=design)
        got = torch.tensor([meas.high_water["activations"], meas.peak], dtype=torch.float64)
        dist.all_reduce(got, op=dist.ReduceOp.MAX)
        cells[f"{design} (rank max)"] = {"activations": (got[0].item(), est.activations),
                                         "peak": (got[1].item(), est.total)}
        out[design] = {"activations": got[0].item(), "estimated_activations": est.activations,
                       "peak": got[1].item(), "estimated_peak": est.total}
    print0(f"\nmemory per rank, one training step, batch {cfg.batch_size} x {args.seq} tokens:")
    print0(bytes_table(cells))
    print0("activations per rank / one process: " + ", ".join(
        f"{k} {v['activations'] / one.activations:.3f}" for k, v in out.items()) + f" (1/cp = {1 / n:.3f}; "
        "Ulysses also keeps its head-layout output). Peak: ring attention's backward scratch (a score block, "
        "k/v and dK/dV buffers in flight) is not modelled")
    return {"one_process_activations": one.activations, "per_design": out}


# %% PyTorch's own context parallel on the same q, k, v (or the exact error it raises here)
def torch_cell(n: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, config.n_head, args.seq, config.head_dim, generator=gen) for _ in range(3))
    mesh = init_device_mesh(comm_device().type, (n,), mesh_dim_names=("cp",))
    got = compare_torch_context_parallel(q.to(comm_device()), k.to(comm_device()), v.to(comm_device()), mesh,
                                         ContextParallel(mesh.get_group(), "ring"))
    print0("\ntorch.distributed.tensor.experimental.context_parallel on the same causal attention:")
    for name, r in got.items():
        print0(f"  {name}: " + (f"ran; max |torch - ours| {r['max_diff']:.1e}" if r["ran"] else
                                f"cannot run here -> {r['error']}"))
    return got


# %% Launch: every rank runs the cells in order; under python this spawns --ranks ranks
def rank_main(data) -> dict:
    n = dist.get_world_size()
    layout_cell(n)
    runs, parity = parity_cell(n)
    result = {"cp": n, "preset": args.preset, "seq": args.seq, "config": config.to_dict(),
              "train": cfg.to_dict(), "tolerance": TOL, "parity": parity, "balance": balance_cell(n, runs),
              "traffic": traffic_cell(runs), "memory": memory_cell(n),
              "torch_context_parallel": torch_cell(n)}
    path = save_json(LAB, "result", result)
    print0(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    launch(rank_main, world, data)
