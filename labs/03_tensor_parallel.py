"""Lab 03: tensor parallel (Megatron-style, from scratch) vs one process and vs PyTorch DTensor TP.

    python labs/03_tensor_parallel.py                    # spawns 2 ranks (gloo on CPU)
    torchrun --nproc_per_node=2 labs/03_tensor_parallel.py
    python labs/03_tensor_parallel.py --ranks 4          # any tp dividing n_head (and vocab)
    torchrun --nproc_per_node=2 labs/03_tensor_parallel.py --preset llama-mini   # the Llama family

Every rank holds a slice of every layer: attention by heads (GPT-2: q, k and v each split by heads
from the fused c_attn; Llama: q_proj by query heads, k_proj and v_proj by kv heads, so a rank's
query heads find their shared kv heads on the same rank), the MLP column-then-row (SwiGLU: gate
and up by columns, down by rows), the embedding and the output head (tied or not) by vocabulary.
Logits never exist whole: the loss is vocab-parallel cross-entropy (3 all-reduces of one float
per token). What to look at: the shard shapes; the loss of every step next to the single-process
loss, and max |diff| of loss (~5e-7), first-step gradients (~1e-7) and parameters after the AdamW
steps (~3e-5, DTensor ~4e-5: the digits vary with the CPU). All are float rounding: the parameter
diff sits next to the rounding floor the lab prints first (~2e-5: one process, the same batch in
2 micro-batches, which sums in another order as TP does; AdamW's first steps, ≈ lr · sign of
the gradient, turn such tiny gradient differences into full steps). benchmarks/tp_parity.py
records one run with its CPU; per-rank parameter bytes against memory.estimate.param_count(cfg, tp);
the collectives of one step measured by the CommLedger against the analytic count, with
sequence parallel off (all-reduces: 4 per layer + embedding + head + 3 loss + 1 clip norm) and on
(each activation all-reduce becomes an all-gather + reduce-scatter pair of the same bytes, plus
one all-reduce of the LayerNorm/bias/wpe grads). PyTorch's DTensor TP (a torchtitan-style plan
of ColwiseParallel/RowwiseParallel) runs the same model for comparison. Last, generate(): each
rank caches only its K/t kv heads (1/t of the cache), greedy tokens identical to one process.
Results: runs/03_tensor_parallel/result.json
"""

# %% Setup: arguments, model config, and every check that can fail, before any process starts
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from journey_dist.comm import calls_and_bytes
from journey_dist.config import ConfigError, ParallelConfig, get_preset
from journey_dist.data import TokenData, get_batch, load_tokens
from journey_dist.labkit import check_data, check_memory, lab_parser, parse, positive_float, positive_int
from journey_dist.memory.estimate import param_count
from journey_dist.parallel.tensor.dtensor import run_dtensor_tp
from journey_dist.parallel.tensor.generate import compare_tp_generation
from journey_dist.parallel.tensor.parallelize import (
    TensorParallelGPT,
    parallelize,
    run_tensor_parallel,
    shard_shapes,
)
from journey_dist.parity import RunResult, fresh_model, max_abs_diff, reference_run, worst_diffs
from journey_dist.report import generation_line, ledger_table, losses_table, parity_table, table
from journey_dist.runtime import comm_device, launch, print0, requested_world_size, save_json
from journey_dist.train import TrainConfig

LAB = "03_tensor_parallel"
parser = lab_parser(__doc__)
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--data", default="handbook", help="embedded corpus name or a UTF-8 text file")
parser.add_argument("--ranks", type=positive_int, default=2, help="tp ranks to spawn under plain python")
parser.add_argument("--steps", type=positive_int, default=5)
parser.add_argument("--batch-size", type=positive_int, default=8, help="global batch (sequences)")
parser.add_argument("--lr", type=positive_float, default=3e-3)
parser.add_argument("--new-tokens", type=positive_int, default=32,
                    help="tokens to generate in the TP generate check")
parser.add_argument("--no-dtensor", action="store_true", help="skip the PyTorch DTensor comparison")
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

world = requested_world_size(args.ranks)
config = get_preset(args.preset)
for sp in (False, True):  # tp must divide heads and vocab; with SP also the sequence
    ParallelConfig(tp=world, sequence_parallel=sp and world > 1).validate(config, world, args.batch_size)
PROMPT_LEN = 16
TOL = 1e-5  # fp32 parity with one process: float rounding only
if not 1 <= args.new_tokens <= config.block_size - PROMPT_LEN:
    raise ConfigError(f"--new-tokens {args.new_tokens}: prompt ({PROMPT_LEN}) + new tokens must fit "
                      f"block_size={config.block_size}; use --new-tokens 1..{config.block_size - PROMPT_LEN}")
data = load_tokens(args.data)
check_data(parser, data, args.batch_size, config.block_size)
check_memory(args.force, config, args.batch_size, ranks=world)
cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  warmup_steps=max(1, args.steps // 5), eval_batches=1)


# %% 1. One process: the reference, and how far float rounding alone moves it
def reference(data: TokenData, device: torch.device) -> tuple[RunResult, float]:
    """The fresh model trained on the whole batch, and the parameter difference to one process
    that sums the same batch in 2 micro-batches (another summation order, as TP's partial sums)."""
    ref = reference_run(config, data, cfg, first_grads=True, device=device)
    split = reference_run(config, data, replace(cfg, grad_accum=2), device=device)
    return ref, max_abs_diff(split.params, ref.params)


# %% 2. The same model split over the tp ranks: ours (sequence parallel off and on) and DTensor's
def tensor_parallel(data: TokenData, device: torch.device) -> dict[str, RunResult]:
    runs = {}
    for sp in (False, True):
        run = run_tensor_parallel(config, data, cfg, sequence_parallel=sp, device=device)
        runs[run.name] = run
    if not args.no_dtensor:
        runs["dtensor"] = run_dtensor_tp(config, data, cfg, init_device_mesh(device.type, (world,)))
    return runs


# %% 3. What each rank holds: the embedding and layer 0, shard by shard
def shards_table(tp_model: TensorParallelGPT, ref: RunResult) -> str:
    shapes = shard_shapes(tp_model)
    rows = [{"name": k, "full": tuple(ref.params[k].shape), **{f"rank {r}": s for r, s in enumerate(v)}}
            for k, v in shapes.items()]
    return table(rows, [("name", "parameter", str), ("full", "full", str),
                        *((f"rank {r}", f"rank {r}", str) for r in range(world))])


# %% 4. generate(): the tp model decodes with a KV cache of its own heads
def generation(data: TokenData, device: torch.device) -> dict:
    prompt = get_batch(data.val, 2, PROMPT_LEN, 0, cfg.seed)[0].to(device)  # 2 prompts
    return compare_tp_generation(fresh_model(config, device=device),
                                 parallelize(fresh_model(config, device=device)), prompt, args.new_tokens)


# %% Every rank runs the steps in order and prints what to look at
def rank_main(data: TokenData) -> dict:
    device = comm_device()
    ref, floor = reference(data, device)
    runs = tensor_parallel(data, device)
    gqa = config.kv_heads != config.n_head
    kv = f" ({config.kv_heads // world} of {config.kv_heads} kv heads)" if gqa else ""
    print0(f"tp={world} ({dist.get_backend()}), {args.preset}: {config.n_head // world} of {config.n_head} "
           f"heads per rank{kv}; every rank sees the whole batch of {cfg.batch_size} x {config.block_size}")
    print0(shards_table(runs["tp"].model, ref))

    parity = {name: worst_diffs(run, ref) for name, run in runs.items()}  # the worst rank
    print0(losses_table(ref.losses, {name: run.losses for name, run in runs.items()}))
    print0(parity_table(parity, tol=TOL, seconds={n: r.seconds for n, r in runs.items()}))
    print0(f"rounding floor (one process, batch in 2 micro-batches): max|param| {floor:.1e}")

    mine, est = runs["tp"].state_bytes["params"], param_count(config, tp=world) * 4
    print0(f"parameter bytes per rank: measured {mine:,}, param_count(cfg, tp={world}) x 4 = {est:,}, "
           f"one process {param_count(config) * 4:,}")

    ledger = {name: (calls_and_bytes(run.comm), calls_and_bytes(run.analytic)) for name, run in runs.items()}
    print0(ledger_table(ledger, wire=False))

    gen = generation(data, device)
    print0(generation_line(gen, args.new_tokens))

    variants = {name: {"losses": run.losses, "loss_diff": parity[name]["loss"],
                       "grad_diff": parity[name]["grad"], "param_diff": parity[name]["param"],
                       "seconds": run.seconds, "param_bytes": run.state_bytes.get("params"),
                       "measured": ledger[name][0], "analytic": ledger[name][1]}
                for name, run in runs.items()}
    result = {"tp": world, "preset": args.preset, "config": config.to_dict(), "train": cfg.to_dict(),
              "reference_losses": ref.losses, "rounding_floor_param_diff": floor,
              "param_bytes_estimate": est, "variants": variants, "generate": gen}
    print0(f"wrote {save_json(LAB, 'result', result)}")
    return {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in variants.items()}


# %% Launch: under torchrun this process is one rank; under python it spawns --ranks ranks
if __name__ == "__main__":
    launch(rank_main, world, data)
