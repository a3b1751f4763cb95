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
within 1e-5, float rounding of per-microbatch and per-shard sums; AdamW can grow it over many
steps, as it turns tiny gradient differences into full-size updates, so the tests hold tiny
configs to 1e-5 after 3 steps); and the bytes each rank hands to collectives per step, by group
kind, measured by the CommLedger next to the formula (compose.expected_comm_per_step): tp
all-reduces inside every block, pp sends of (micro_B, T, C) activations and gradients, and one
dp all-reduce of every gradient byte per step, after the pipeline flush. The formula term by
term: notes/parallelism.md, "3D parallel".
Results: runs/05_3d_parallel/result.json
"""

# %% Setup: arguments and every check that can fail, before any process starts
import torch.distributed as dist

from journey_dist.comm import CommLedger
from journey_dist.config import ParallelConfig, get_preset
from journey_dist.data import TokenData, load_tokens
from journey_dist.labkit import check_data, check_memory, lab_parser, parse, positive_float, positive_int
from journey_dist.mesh import Mesh, build_mesh, layout_text
from journey_dist.parallel.compose import check_3d, comm_matches, comm_per_rank, parity, three_d_run
from journey_dist.parallel.pipeline.stage import stage_layers
from journey_dist.parity import RunResult, reference_run
from journey_dist.report import losses_table, mesh_comm_table, parity_table
from journey_dist.runtime import comm_device, launch, print0, requested_world_size, save_json
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


# %% 1. The mesh: which global ranks form each tp, dp and pp group; the layers each stage holds
def mesh_and_stages() -> tuple[Mesh, list[str]]:
    layers = [f"{r.start}..{r.stop - 1}" for r in stage_layers(config.n_layer, pcfg.pp)]
    return build_mesh(pcfg, comm_device().type), layers


# %% 2. One process: the reference, the whole model on the whole batch
def reference(data: TokenData) -> RunResult:
    return reference_run(config, data, cfg, first_grads=True)


# %% 3. The same model on the mesh, same seed and batches; a ledger records the training steps, and
# compose.parity compares each rank's slice with the reference cut the same way (the worst rank)
def three_d(data: TokenData, mesh: Mesh) -> tuple[RunResult, CommLedger]:
    ledger = CommLedger()
    run, _pipeline = three_d_run(config, data, cfg, mesh, ledger=ledger)
    return run, ledger


# %% 4. Communication: bytes per step each rank hands to each group kind, ledger vs formula
def communication(ledger: CommLedger, mesh: Mesh) -> tuple[list[dict], bool]:
    rows = comm_per_rank(ledger, config, cfg, mesh)  # every rank's, on every rank
    return rows, comm_matches(rows, cfg.steps)


# %% Every rank runs the steps in order and prints what to look at
def rank_main(data: TokenData) -> dict:
    mesh, layers = mesh_and_stages()
    print0(layout_text(pcfg))
    print0(f"  ({dist.get_backend()}) {args.preset}: stages hold layers {layers}; {args.schedule}, "
           f"{cfg.grad_accum} microbatches of {cfg.batch_size // (pcfg.dp * cfg.grad_accum)} per dp replica")

    ref = reference(data)
    run, ledger = three_d(data, mesh)
    diffs = parity(run, ref, config, mesh)
    print0(losses_table(ref.losses, {"3D": run.losses}))
    print0(parity_table({f"3D, worst of {mesh.pcfg.world_size} ranks": diffs}, tol=TOL))

    rows, all_match = communication(ledger, mesh)
    print0(mesh_comm_table(rows, cfg.steps))

    result = {"pcfg": {"dp": pcfg.dp, "tp": pcfg.tp, "pp": pcfg.pp, "microbatches": cfg.grad_accum,
                       "schedule": args.schedule},
              "preset": args.preset, "train": cfg.to_dict(), "layout": layout_text(pcfg),
              "reference_losses": ref.losses, "losses": run.losses, "parity": diffs, "tolerance": TOL,
              "comm_per_step": rows, "comm_matches_expected": all_match}
    print0(f"wrote {save_json(LAB, 'result', result)}")
    return result


# %% Launch: under torchrun this process is one rank; under python it spawns dp*tp*pp ranks
if __name__ == "__main__":
    launch(rank_main, world, data)
