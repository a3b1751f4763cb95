"""Lab 03: tensor parallel (Megatron-style, from scratch) vs one process and vs PyTorch DTensor TP.

    python labs/03_tensor_parallel.py                    # spawns 2 ranks (gloo on CPU)
    torchrun --nproc_per_node=2 labs/03_tensor_parallel.py
    python labs/03_tensor_parallel.py --ranks 4          # any tp dividing n_head (and vocab)

Every rank holds a slice of every layer: attention by heads (q, k and v each split by heads from
the fused c_attn), the MLP column-then-row, the embedding and the tied output head by vocabulary.
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
rank caches only its H/t heads (1/t of the cache), greedy tokens identical to one process.
Results: runs/03_tensor_parallel/result.json
"""

# %% Setup: arguments, model config, and every check that can fail, before any process starts
import time
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from journey_dist.config import ConfigError, ParallelConfig, get_preset
from journey_dist.data import get_batch, load_tokens
from journey_dist.labkit import check_data, check_memory, lab_parser, parse, positive_float, positive_int
from journey_dist.memory.estimate import param_count
from journey_dist.parallel.tensor.dtensor import (
    run_dtensor_tp,
)
from journey_dist.parallel.tensor.generate import compare_tp_generation
from journey_dist.parallel.tensor.parallelize import (
    parallelize,
    run_tensor_parallel,
)
from journey_dist.parity import fresh_model, max_abs_diff, reference_run
from journey_dist.runtime import launch, print0, requested_world_size, save_json
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
if not 1 <= args.new_tokens <= config.block_size - PROMPT_LEN:
    raise ConfigError(f"--new-tokens {args.new_tokens}: prompt ({PROMPT_LEN}) + new tokens must fit "
                      f"block_size={config.block_size}; use --new-tokens 1..{config.block_size - PROMPT_LEN}")
data = load_tokens(args.data)
check_data(parser, data, args.batch_size, config.block_size)
check_memory(args.force, config, args.batch_size, ranks=world)
cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  warmup_steps=max(1, args.steps // 5), eval_batches=1)


# %% What every rank runs
def _calls_bytes(comm: dict) -> dict:
    """{op: {"calls", "bytes"}} of a ledger summary (what the table compares)."""
    return {op: {"calls": row["calls"], "bytes": row["bytes"]} for op, row in comm.items()}


def rank_main(data) -> dict:
    n = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    print0(f"tp={n} ranks ({dist.get_backend()}) | {args.preset}: n_head={config.n_head} -> "
           f"{config.n_head // n} heads per rank, vocab {config.vocab_size} -> {config.vocab_size // n} "
           f"per rank | global batch {cfg.batch_size} x {config.block_size} tokens (every rank sees "
           f"all of it) | {cfg.steps} AdamW steps")

    # The reference: one process, fresh model from seed 0, the whole batch every step.
    ref = reference_run(config, data, cfg, first_grads=True, device=device)
    # How far float rounding alone moves one process: the same batch in 2 micro-batches. AdamW
    # divides by sqrt(v), so grad entries that are ~rounding noise still move their param ~lr.
    floor = max_abs_diff(reference_run(config, data, replace(cfg, grad_accum=2), device=device).params,
                         ref.params)
    rows = {}
    for sp in (False, True):
        name = "tp+sp" if sp else "tp"
        run = run_tensor_parallel(config, data, cfg, sequence_parallel=sp, device=device)
        model = run.model
        if not sp:  # shard shapes, rank by rank
            shapes = {k: tuple(p.shape) for k, p in model.named_parameters()
                      if k.startswith(("transformer.wte", "transformer.h.0."))}
            everyone = [None] * n
            dist.all_gather_object(everyone, shapes)
            full = {k: tuple(v.shape) for k, v in ref.params.items()}
            print0(f"\n{'parameter (layer 0)':<32} {'full':>12}  " + "  ".join(f"{'rank ' + str(r):>12}"
                                                                         for r in range(n)))
            for k in shapes:
                print0(f"{k:<32} {str(full[k]):>12}  " + "  ".join(f"{str(s[k]):>12}" for s in everyone))
        rows[name] = {"run": run, "bytes": run.state_bytes["params"], "measured": _calls_bytes(run.comm),
                      "analytic": _calls_bytes(run.analytic)}
    if not args.no_dtensor:
        mesh = init_device_mesh("cuda" if device is not None else "cpu", (n,))
        run = run_dtensor_tp(config, data, cfg, mesh)
        rows["dtensor"] = {"run": run, "bytes": None, "measured": _calls_bytes(run.comm),
                           "analytic": _calls_bytes(run.analytic)}

    # Loss by step, and the worst difference from one process over all ranks.
    print0(f"\n{'step':>4} {'1 process':>10} " + " ".join(f"{k:>10}" for k in rows))
    for s in range(cfg.steps):
        losses = " ".join(f"{r['run'].losses[s]:>10.5f}" for r in rows.values())
        print0(f"{s:>4} {ref.losses[s]:>10.5f} {losses}")
    print0(f"\n1 process, batch in 2 micro-batches: max|param-ref| {floor:.1e} (the rounding floor: "
           "TP sums partial products in another order, a comparable change)")
    print0(f"{'variant':<8} {'max|loss-ref|':>14} {'max|grad-ref|':>14} {'max|param-ref|':>15} "
           f"{'train s':>8}   (fp32; float rounding only)")
    result_rows = {}
    for name, r in rows.items():
        run = r["run"]
        diffs = torch.tensor([max(abs(a - b) for a, b in zip(run.losses, ref.losses)),
                              max_abs_diff(run.grads, ref.grads), max_abs_diff(run.params, ref.params)],
                             device=device)
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)  # the worst rank
        print0(f"{name:<8} {diffs[0]:>14.1e} {diffs[1]:>14.1e} {diffs[2]:>15.1e} {run.seconds:>8.1f}")
        result_rows[name] = {"losses": run.losses, "loss_diff": diffs[0].item(), "grad_diff": diffs[1].item(),
                             "param_diff": diffs[2].item(), "seconds": run.seconds,
                             "param_bytes": r["bytes"], "measured": r["measured"], "analytic": r["analytic"]}

    # Memory: parameters per rank, measured vs the analytic count.
    est, whole = param_count(config, tp=n) * 4, param_count(config) * 4
    mine = rows["tp"]["bytes"]
    print0(f"\nparameter bytes per rank: measured {mine:,} | param_count(cfg, tp={n}) x 4 = {est:,} | "
           f"one process {whole:,} ({mine / whole:.2f}x; LayerNorms, row biases and wpe are replicated)")

    # Communication of one step: measured by the ledger vs analytic (ours; DTensor against ours).
    print0(f"\ncollectives in one step (rank 0, tp group of {n}); all-reduce sends 2(n-1)/n x bytes, "
           "all-gather/reduce-scatter (n-1)/n")
    print0(f"{'variant':<8} {'collective':<15} {'calls':>6} {'analytic':>9} {'bytes':>12} "
           f"{'analytic':>12}  match")
    for name, r in rows.items():
        for op, m in r["measured"].items():
            a = r["analytic"].get(op, {"calls": 0, "bytes": 0})
            print0(f"{name:<8} {op:<15} {m['calls']:>6} {a['calls']:>9} {m['bytes']:>12,} {a['bytes']:>12,}  "
                   f"{'yes' if m == a else 'NO'}")
    if "dtensor" in rows:
        print0("dtensor: the same activation and loss all-reduces as ours; its grad-norm (DTensor .norm() "
               "per parameter) adds one scalar all-reduce per sharded parameter where ours takes one in all")

    # Generation: the tp model's generate(), each rank caching only its own heads.
    t0 = time.perf_counter()
    prompt = get_batch(data.val, 2, PROMPT_LEN, 0, cfg.seed)[0].to(device or "cpu")  # 2 prompts
    gen = compare_tp_generation(fresh_model(config, device=device),
                                parallelize(fresh_model(config, device=device)), prompt, args.new_tokens)
    print0(f"\ngenerate ({args.new_tokens} new tokens, batch 2, KV cache; fresh seed-0 weights): "
           f"greedy tokens identical to one process: {'yes' if gen['greedy_identical'] else 'NO'} | "
           f"max|logit diff| {gen['max_logit_diff']:.1e} (tol 1e-5) | sampled with a different generator "
           f"per rank, same tokens on every rank: {'yes' if gen['sampled_same_on_ranks'] else 'NO'}")
    print0(f"KV cache per rank: {gen['cache_bytes_per_rank']:,} B = kv_cache_bytes(cfg, 2, "
           f"{prompt.size(1) + args.new_tokens}, kv_heads={gen['heads_per_rank']}) = "
           f"{gen['cache_bytes_formula']:,} B; one process {gen['cache_bytes_one_process']:,} B "
           f"({gen['cache_bytes_per_rank'] / gen['cache_bytes_one_process']:.2f}x = 1/tp) | "
           f"check took {time.perf_counter() - t0:.1f} s")

    result = {"tp": n, "preset": args.preset, "config": config.to_dict(), "train": cfg.to_dict(),
              "reference_losses": ref.losses, "rounding_floor_param_diff": floor,
              "param_bytes_estimate": est, "variants": result_rows, "generate": gen}
    path = save_json(LAB, "result", result)
    print0(f"\nwrote {path}")
    return {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in result_rows.items()}


# %% Launch: under torchrun this process is one rank; under python it spawns --ranks ranks
if __name__ == "__main__":
    launch(rank_main, world, data)
