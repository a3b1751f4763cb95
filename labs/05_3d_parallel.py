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
import argparse

import torch.distributed as dist

from journey_dist.comm import CommLedger
from journey_dist.config import ParallelConfig, get_preset
from journey_dist.data import load_tokens
from journey_dist.mesh import build_mesh, layout_text
from journey_dist.parallel.pipeline_parallel import comm_device, single_process_run, stage_layers
from journey_dist.parallel.three_d import check_3d, comm_by_dim, grad_bytes, parity, three_d_run
from journey_dist.runtime import launch, print0, requested_world_size, save_json
from journey_dist.train import TrainConfig

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dp", type=int, default=2, help="data-parallel replicas")
parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
parser.add_argument("--pp", type=int, default=2, help="pipeline stages")
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--data", default="handbook", help="embedded corpus name or a UTF-8 text file")
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
parser.add_argument("--microbatches", type=int, default=4, help="per dp replica and step")
parser.add_argument("--schedule", default="1f1b", choices=("gpipe", "1f1b"))
parser.add_argument("--lr", type=float, default=1e-3)
args, _ = parser.parse_known_args()  # tolerate notebook kernels' own argv

LAB = "05_3d_parallel"
TOL = 1e-5  # fp32: what the tests hold every rank to
pcfg = ParallelConfig(dp=args.dp, tp=args.tp, pp=args.pp, microbatches=args.microbatches,
                      schedule=args.schedule)
world = requested_world_size(pcfg.world_size)
config = get_preset(args.preset)
check_3d(pcfg, config, world, args.batch_size)
cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.microbatches, lr=args.lr,
                  warmup_steps=max(1, args.steps // 5), eval_batches=2)


def gather(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


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
    ref = single_process_run(config, data, cfg)
    with CommLedger() as ledger:
        run, pipe = three_d_run(config, data, cfg, mesh)
    diffs = parity(run, ref, config, mesh)
    print0(f"\nloss per step ({cfg.steps} AdamW steps, grad clip {cfg.grad_clip}):")
    print0(f"{'step':>4} {'1 process':>10} {'3D':>10} {'|diff|':>9}")
    for i, (a, b) in enumerate(zip(ref.losses, run.losses)):
        print0(f"{i:>4} {a:>10.4f} {b:>10.4f} {abs(a - b):>9.1e}")
    ok = all(v < TOL for v in diffs.values())
    print0(f"worst over all {dist.get_world_size()} ranks vs one process: loss {diffs['loss']:.1e}, "
           f"first-step grads {diffs['grad']:.1e}, params after {cfg.steps} steps {diffs['param']:.1e} "
           f"({'within' if ok else 'OUTSIDE'} {TOL:.0e})")

    # %% The ledger per group kind, every rank (whole run: training steps and the final evaluation)
    comm = comm_by_dim(ledger, mesh)
    rows = gather({"rank": mesh.rank, "coords": mesh.coords, "comm": comm,
                   "grad_bytes": grad_bytes(pipe.stage)})
    print0("\ncollectives per rank and group kind (calls / bytes handed over), whole run:")
    cols = [("tp", "all_reduce"), ("dp", "all_reduce"), ("pp", "send"), ("pp", "recv")]
    print0(f"{'rank':>4} {'pp,dp,tp':>8} " + " ".join(f"{d + ' ' + op:>22}" for d, op in cols)
           + f" {'dp bytes/step':>14} {'expected':>10}")
    for r in rows:
        c = r["coords"]
        cells = []
        for d, op in cols:
            cell = r["comm"].get(d, {}).get(op)
            cells.append(f"{cell['calls']:>6} / {cell['bytes']:>13,}" if cell else f"{'-':>22}")
        dp_bytes = r["comm"].get("dp", {}).get("all_reduce", {}).get("bytes")
        measured = f"{dp_bytes / cfg.steps:,.0f}" if dp_bytes else "-"
        expected = f"{r['grad_bytes'] + 4:,}" if pcfg.dp > 1 else "-"
        print0(f"{r['rank']:>4} {c['pp']:>4},{c['dp']},{c['tp']} " + " ".join(cells)
               + f" {measured:>14} {expected:>10}")
    print0("dp: per step every gradient byte of the rank's slice + 4 bytes of logged loss; pp also "
           "carries the tied-embedding gradient swap and the pipeline's small plan/loss messages;"
           "\ntp: the Megatron all-reduces inside every block, forward and backward.")

    # %% Save
    result = {"pcfg": {"dp": pcfg.dp, "tp": pcfg.tp, "pp": pcfg.pp, "microbatches": cfg.grad_accum,
                       "schedule": args.schedule},
              "preset": args.preset, "train": cfg.to_dict(), "layout": layout_text(pcfg),
              "reference_losses": ref.losses, "losses": run.losses, "parity": diffs, "tolerance": TOL,
              "comm": rows}
    path = save_json(LAB, "result", result)
    print0(f"\nwrote {path}")
    return result


# %% Launch: under torchrun this process is one rank; under python it spawns dp*tp*pp ranks
if __name__ == "__main__":
    launch(rank_main, world, load_tokens(args.data))
