"""Lab 05: 3D parallel -- data x tensor x pipeline parallel on one mesh, equal to one process.

    python labs/05_3d_parallel.py                           # spawns 4 ranks: dp=2 x tp=1 x pp=2
    python labs/05_3d_parallel.py --dp 1 --tp 2 --pp 2      # tensor parallel stages
    python labs/05_3d_parallel.py --dp 2 --tp 2 --pp 2      # 8 ranks (slow on 2 cores)
    torchrun --nproc_per_node=4 labs/05_3d_parallel.py --dp 2 --pp 2

The ranks form a pp x dp x tp grid (tp fastest, as Megatron lays it out). Each rank holds one
pipeline stage, split over its tp group; dp replicas of that slice each take part of the batch.
What to look at: the layout (which global ranks form each tp, dp and pp group); the loss of every
step next to the single-process run; the largest |diff| of gradients and parameters over all
ranks, each rank's slice compared with the single-process tensors cut the same way (fp32:
within 1e-5, float rounding); and the collective ledger per group kind: tp all-reduces inside
every block, pp sends of (micro_B, T, C) activations and gradients, and one dp all-reduce of
every gradient byte per step, after the pipeline flush.
Results: runs/05_3d_parallel/result.json
"""

# %% Setup: arguments and every check that can fail, before any process starts
import torch.distributed as dist

from journey_dist.comm import CommLedger
from journey_dist.config import ParallelConfig, get_preset
from journey_dist.data import load_tokens
from journey_dist.labkit import check_data, check_memory, lab_parser, parse, positive_float, positive_int
from journey_dist.mesh import build_mesh, layout_text
from journey_dist.parallel.compose import (
    check_3d,
    comm_by_dim,
    expected_comm_per_step,
    parity,
    three_d_run,
)
from journey_dist.parallel.pipeline.stage import stage_layers
from journey_dist.parity import reference_run
from journey_dist.runtime import comm_device, gather_objects, launch, print0, requested_world_size, save_json
from journey_dist.train import TrainConfig

LAB = "05_3d_parallel"
parser = lab_parser(__doc__)
parser.add_argument("--dp", type=positive_int, default=2, help="data-parallel replicas")
parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel ranks per stage")
parser.add_argument("--pp", type=positive_int, default=2, help="pipeline stages")
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--data", default="handbook", help="embedded corpus name or a UTF-8 text file")
parser.add_argument("--steps", type=positive_int, default=10)
parser.add_argument("--batch-size", type=positive_int, default=16, help="global batch (sequences)")
parser.add_argument("--microbatches", type=positive_int, default=4, help="per dp replica and step")
parser.add_argument("--schedule", default="1f1b", choices=("gpipe", "1f1b"))
parser.add_argument("--lr", type=positive_float, default=1e-3)
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

TOL = 1e-5  # fp32: what the tests hold every rank to
pcfg = ParallelConfig(dp=args.dp, tp=args.tp, pp=args.pp, microbatches=args.microbatches,
                      schedule=args.schedule)
world = requested_world_size(pcfg.world_size)
config = get_preset(args.preset)
check_3d(pcfg, config, world, args.batch_size)
data = load_tokens(args.data)
check_data(parser, data, args.batch_size, config.block_size)
check_memory(args.force, config, args.batch_size, ranks=world)
cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.microbatches, lr=args.lr,
                  warmup_steps=max(1, args.steps // 5), eval_batches=2)


# %% What every rank runs
def rank_main(data) -> dict:
    mesh = build_mesh(pcfg, comm_device().type)
    micro_b = cfg.batch_size // (pcfg.dp * cfg.grad_accum)
    print0(layout_text(pcfg))
    print0(f"  ({dist.get_backend()}) {args.preset}: stages hold layers "
           f"{[f'{r.start}..{r.stop - 1}' for r in stage_layers(config.n_layer, pcfg.pp)]}; each dp "
           f"replica takes {cfg.batch_size // pcfg.dp} of {cfg.batch_size} sequences as {cfg.grad_accum} "
           f"microbatches of {micro_b}; {args.schedule}")

    # %% The reference (one process, whole model, whole batch) and the 3D run, same seed and batches
    ref = reference_run(config, data, cfg, first_grads=True)
    ledger = CommLedger()  # records the training steps only
    run, pipe = three_d_run(config, data, cfg, mesh, ledger=ledger)
    diffs = parity(run, ref, config, mesh)
    print0(f"\nloss per step ({cfg.steps} AdamW steps, grad clip {cfg.grad_clip}):")
    print0(f"{'step':>4} {'1 process':>10} {'3D':>10} {'|diff|':>9}")
    for i, (a, b) in enumerate(zip(ref.losses, run.losses)):
        print0(f"{i:>4} {a:>10.4f} {b:>10.4f} {abs(a - b):>9.1e}")
    ok = all(v < TOL for v in diffs.values())
    print0(f"worst over all {dist.get_world_size()} ranks vs one process: loss {diffs['loss']:.1e}, "
           f"first-step grads {diffs['grad']:.1e}, params after {cfg.steps} steps {diffs['param']:.1e} "
           f"({'within' if ok else 'OUTSIDE'} {TOL:.0e}: float rounding of per-microbatch and per-shard "
           f"sums;\n AdamW can grow it over many steps, as it turns tiny gradient differences into "
           f"full-size updates; the tests hold tiny configs to {TOL:.0e} after 3 steps)")

    # %% The ledger per group kind, every rank: bytes handed to collectives per training step
    comm = comm_by_dim(ledger, mesh)
    expected = expected_comm_per_step(config, pcfg, cfg, mesh.coords)
    rows = gather_objects({"rank": mesh.rank, "coords": mesh.coords, "comm": comm, "expected": expected})
    cols = [("tp", "all_reduce"), ("dp", "all_reduce"), ("pp", "send")]
    print0("\nbytes per training step each rank hands to collectives: measured (ledger) / expected (formula)")
    print0(f"{'rank':>4} {'pp,dp,tp':>8} " + " ".join(f"{d + ' ' + op:>25}" for d, op in cols))
    all_match = True
    for r in rows:
        c, cells = r["coords"], []
        for d, op in cols:
            want = r["expected"].get(d, {}).get(op)
            got = r["comm"].get(d, {}).get(op, {}).get("bytes", 0) / cfg.steps
            all_match &= want is None or got == want
            cells.append(f"{got:>12,.0f} / {want:>10,}" if want is not None else f"{'-':>25}")
        print0(f"{r['rank']:>4} {c['pp']:>4},{c['dp']},{c['tp']} " + " ".join(cells))
        # every modelled (group, op), not only the columns shown (e.g. pp's 4-byte loss all-reduce)
        all_match &= all(r["comm"].get(d, {}).get(op, {}).get("bytes", 0) / cfg.steps == want
                         for d, ops in r["expected"].items() for op, want in ops.items())
    print0(f"measured {'==' if all_match else '!='} expected on every rank, every modelled collective "
           f"(not modelled: the pipeline's control messages, a schedule all-gather and a loss broadcast "
           f"of a few bytes per step). With a = one microbatch's "
           f"activations ({micro_b}, {config.block_size}, {config.n_embd}) fp32, per microbatch:"
           "\n  tp: 4a per layer (attention and MLP: g forward, f backward), + a for the embedding "
           "(first stage), + a and the cross-entropy's 3 per-token floats (last stage);"
           "\n  pp: a forward and a backward across each stage boundary (+ a 64-byte header each), "
           "and once per step the tied (V/tp, C) gradient swap between first and last stage"
           "\n      (each tp rank sends the whole activation: tp copies cross a boundary; Megatron sends "
           "1/tp each and all-gathers);"
           "\n  dp: every gradient byte of the rank's slice, once per step, after the pipeline flush."
           "\nA rank sends 2(n-1)/n of an all-reduce's bytes on a ring (n = group size).")

    # %% Save
    result = {"pcfg": {"dp": pcfg.dp, "tp": pcfg.tp, "pp": pcfg.pp, "microbatches": cfg.grad_accum,
                       "schedule": args.schedule},
              "preset": args.preset, "train": cfg.to_dict(), "layout": layout_text(pcfg),
              "reference_losses": ref.losses, "losses": run.losses, "parity": diffs, "tolerance": TOL,
              "comm_per_step": rows, "comm_matches_expected": all_match}
    path = save_json(LAB, "result", result)
    print0(f"\nwrote {path}")
    return result


# %% Launch: under torchrun this process is one rank; under python it spawns dp*tp*pp ranks
if __name__ == "__main__":
    launch(rank_main, world, data)
