"""Lab 13: serving: continuous batching over a paged KV cache, weight-only quantization, TP inference.

    python labs/13_serving.py                      # ~1 min on a busy 2-core CPU; less with lab 01's model
    python labs/13_serving.py --requests 16 --tp 0 # quicker: fewer requests, no TP ranks

What to look at:
* one trace of requests (prompts cut from the held-out text, log-normal lengths, Poisson arrivals)
  served three ways on the same kernels: static batching (a batch runs to completion, every
  request reserves a full context window), continuous batching with the same batch cap, and
  continuous batching with as many requests as the paged cache holds. Tokens/s, time to first
  token (TTFT), inter-token latency (ITL) and end-to-end percentiles, and the KV cache used vs
  reserved: static reserves the window, paging wastes under one block per request;
* every way gives exactly the tokens of one-request-at-a-time greedy decoding through
  GPT.generate and its contiguous KV cache, preempted requests included;
* weight-only int8 (per channel) and int4 (per group of 32) quantization: weight bytes measured
  = formula, held-out perplexity next to fp32, and the same through torchao when installed
  (agreement stated; `pip install torchao --no-deps`, or the [serving] extra);
* tensor-parallel generation on 2 spawned ranks: each rank's weights and KV cache measured
  against param_count(cfg, tp) and kv_cache_bytes(..., kv_heads=H/t), same greedy tokens.
Weights: lab 01's checkpoint if present, else a brief training run (--train-steps).
Results: runs/13_serving/result.json and kv_memory.png.
"""

# %% Setup: arguments, and every check that can fail, before any work or rank starts
import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from journey_dist.config import ConfigError, GPTConfig, ParallelConfig, get_preset
from journey_dist.data import load_tokens
from journey_dist.memory.estimate import fmt_bytes
from journey_dist.model import GPT
from journey_dist.runtime import launch, runs_dir, save_json, seed_everything, under_torchrun
from journey_dist.serving.blocks import check_pool
from journey_dist.serving.quant import check_quant, quantization_report
from journey_dist.serving.scheduler import compare_batching, timed_reference
from journey_dist.serving.tp import tp_inference_rank
from journey_dist.serving.trace import make_trace
from journey_dist.train import TrainConfig, train

LAB = "13_serving"
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--data", default="handbook", help="embedded corpus name or a UTF-8 text file")
parser.add_argument("--requests", type=int, default=32)
parser.add_argument("--rate", type=float, default=200.0, help="arrivals per second (Poisson)")
parser.add_argument("--block", type=int, default=16, help="KV block size in tokens")
parser.add_argument("--blocks", type=int, default=64, help="KV blocks in the pool (64 x 16: 8 windows)")
parser.add_argument("--max-seqs", type=int, default=32, help="request cap of the larger continuous run")
parser.add_argument("--max-batched-tokens", type=int, default=256, help="tokens per continuous step")
parser.add_argument("--group-size", type=int, default=32, help="int4 quantization group")
parser.add_argument("--no-torchao", action="store_true", help="skip the torchao reference")
parser.add_argument("--tp", type=int, default=2, help="ranks for the TP inference cell (0: skip)")
parser.add_argument("--train-steps", type=int, default=60, help="if lab 01's checkpoint is absent")
parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (timings on a shared CPU)")
parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time requests by wall clock, or by this process's CPU time (steady on a busy "
                         "machine with --threads 1)")
args, _ = parser.parse_known_args()  # tolerate notebook kernels' own argv

if under_torchrun():
    raise ConfigError("lab 13 is one process that spawns its own TP ranks; run it with plain python "
                      "(python labs/13_serving.py --tp 2), not under torchrun")
config = get_preset(args.preset)
for name in ("requests", "max_seqs", "max_batched_tokens", "threads"):
    if getattr(args, name) < 1:
        raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
if args.train_steps < 0 or args.rate <= 0:
    raise ConfigError(f"--train-steps={args.train_steps} must be >= 0 and --rate={args.rate} > 0")
check_pool(args.blocks, args.block)
window_blocks = -(-config.block_size // args.block)
if args.blocks < window_blocks:
    raise ConfigError(f"--blocks {args.blocks} x --block {args.block} holds less than one context window "
                      f"({config.block_size} tokens); use --blocks >= {window_blocks}")
check_quant(4, args.group_size, config.n_embd)
if args.tp:
    ParallelConfig(tp=args.tp).validate(config)  # tp must divide heads and vocabulary
torch.set_num_threads(args.threads)
seed_everything(0)
data = load_tokens(args.data, level="byte")
# Spawned TP ranks re-import this file (multiprocessing's spawn start method) and must run only
# this setup cell, so every cell below runs in the launching process only.
MAIN = __name__ == "__main__"

# %% A model: lab 01's trained checkpoint if present, else a brief run of the shared loop
if MAIN:
    ckpt = runs_dir("01_single_device") / "model.pt"
    saved = torch.load(ckpt, map_location="cpu") if ckpt.is_file() else None
    if saved is not None and GPTConfig(**saved["config"]) == config:
        model = GPT(config)
        model.load_state_dict(saved["model"])
        source = f"lab 01 checkpoint {ckpt}"
    else:
        model = GPT(config)
        if args.train_steps:
            train(model, data, TrainConfig(steps=args.train_steps, batch_size=16,
                                           log_every=max(1, args.train_steps // 3)), lab=LAB)
        source = (f"trained here for {args.train_steps} steps (run lab 01 for a better model)"
                  if args.train_steps else "untrained (perplexities are ~256; run lab 01)")
    model.eval()
    print(f"{args.preset}: {model.num_params():,} parameters, {source}")

# %% The trace: prompts cut from the held-out text, long-tailed lengths, Poisson arrivals
if MAIN:
    trace = make_trace(data.val.tolist(), args.requests, config.block_size, rate=args.rate,
                       prompt_median=config.block_size / 5, output_median=config.block_size / 4)
    prompts, outputs = [len(r.prompt) for r in trace], [r.max_tokens for r in trace]
    print(f"\n{len(trace)} requests over {trace[-1].arrival_s:.2f} s: prompts {min(prompts)}.."
          f"{max(prompts)} tokens (mean {sum(prompts) / len(trace):.0f}), outputs {min(outputs)}.."
          f"{max(outputs)} (mean {sum(outputs) / len(trace):.0f}), {sum(outputs)} tokens to generate")

# %% The truth: every request alone through GPT.generate and its contiguous KV cache
if MAIN:
    reference, alone = timed_reference(model, trace, args.clock)
    print(f"one request at a time: {alone['tokens_per_s']:.0f} tokens/s ({alone['seconds']:.1f} s)")

# %% Static vs continuous batching on the same trace, the same kernels, the same KV pool
if MAIN:
    static_seqs = args.blocks // window_blocks  # requests that fit when each reserves a window
    pool = dict(num_blocks=args.blocks, block_size=args.block, clock=args.clock)
    variants = {
        "static": dict(policy="static", max_seqs=static_seqs, **pool),
        f"continuous, {static_seqs} seqs": dict(policy="continuous", max_seqs=static_seqs,
                                                max_batched_tokens=args.max_batched_tokens, **pool),
        f"continuous, {args.max_seqs} seqs": dict(policy="continuous", max_seqs=args.max_seqs,
                                                  max_batched_tokens=args.max_batched_tokens, **pool),
    }
    batching = compare_batching(model, trace, variants, reference)
    base = batching["static"]["tokens_per_s"]
    pool_bytes = fmt_bytes(batching["static"]["kv_pool_bytes"])
    print(f"\nKV pool: {args.blocks} blocks x {args.block} tokens = {pool_bytes}; static fits "
          f"{static_seqs} requests of a {config.block_size}-token window")
    print(f"{'':<20} {'tok/s':>6} {'vs static':>9} {'TTFT p50/p90 s':>15} {'ITL p50/p99 ms':>15} "
          f"{'req/step':>8} {'mixed':>5} {'preempt':>7} {'KV used/reserved':>16}  same tokens")
    for name, r in batching.items():
        print(f"{name:<20} {r['tokens_per_s']:6.0f} {r['tokens_per_s'] / base:8.2f}x "
              f"{r['ttft_s']['p50']:7.2f}/{r['ttft_s']['p90']:<7.2f} "
              f"{r['itl_s']['p50'] * 1e3:7.1f}/{r['itl_s']['p99'] * 1e3:<7.1f} "
              f"{r['mean_requests_per_step']:8.1f} {r['mixed_steps']:5d} {r['preemptions']:7d} "
              f"{r['kv_used_over_reserved']:15.0%}   {r['identical']}")
    if not all(r["identical"] for r in batching.values()):
        raise RuntimeError("a batched run's tokens differ from one-request-at-a-time decoding")
    print("mixed: steps that ran prefill chunks and decode tokens together; KV used/reserved: cached tokens "
          "over the slots their blocks hold, summed over steps")

# %% KV memory over time: what each policy reserves and what it uses
if MAIN:
    fig, axes = plt.subplots(1, len(batching), figsize=(4 * len(batching), 3), sharey=True)
    for ax, (name, r) in zip(axes, batching.items()):
        t, used, reserved = zip(*r["kv_timeline"])
        ax.step(t, reserved, where="post", label="reserved")
        ax.step(t, used, where="post", label="used")
        ax.set(title=name, xlabel="seconds")
    axes[0].set(ylabel="KV cache (tokens)")
    axes[0].legend()
    png = runs_dir(LAB) / "kv_memory.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    print(f"plot: {png}")

# %% Weight-only quantization: bytes measured vs formula, held-out perplexity, torchao as reference
if MAIN:
    quant = quantization_report(model, data.val, args.group_size, with_torchao=not args.no_torchao)
    print(f"\nweight-only quantization (held-out {quant['held_out_tokens']:,} tokens; "
          f"torchao: {quant['torchao']})")
    print(f"{'':<20} {'weights':>11} {'formula':>11} {'vs fp32':>8} {'perplexity':>11} {'vs fp32':>8} "
          f"{'|W-W_q|/|W|':>11}")
    for name, r in quant["rows"].items():
        err = f"{r['relative_weight_error']:11.2%}" if "relative_weight_error" in r else ""
        print(f"{name:<20} {fmt_bytes(r['weight_bytes']):>11} {fmt_bytes(r['formula_bytes']):>11} "
              f"{r['bytes_vs_fp32']:7.1%} {r['perplexity']:11.3f} {r['perplexity_vs_fp32']:+7.2%} {err}")
    noise = quant["noise"]
    print(f"for scale: Gaussian noise of {noise['relative_std']:.0%} of each weight's std on the same layers "
          f"gives perplexity {noise['perplexity']:.3f} ({noise['perplexity_vs_fp32']:+.2%}): how much this "
          f"model relies on its block linears at all")
    for name, a in quant["agreement"].items():
        print(f"ours vs torchao, {name}: {a['codes_differ']:.1%} of codes differ (by <= "
              f"{a['max_code_diff']}: torchao divides absmax by qmax + 0.5), weights within "
              f"{a['max_weight_diff_steps']:.2f} step, logits within {a['max_logit_diff']:.3f}")
    if any(r["weight_bytes"] != r["formula_bytes"] for r in quant["rows"].values()):
        raise RuntimeError("measured weight bytes differ from the formula")
    if quant["agreement"]:
        print("(torchao keeps int4 codes one per byte, unpacked, and an int8 zero point per scale: "
              "its formula counts them)")

# %% Tensor-parallel inference: each rank holds 1/t of the split weights and its own heads' cache
if MAIN:
    tp_rows = []
    if args.tp:
        P, N = config.block_size // 8, config.block_size // 4  # gpt-mini: 16 + 32 tokens
        prompt = data.val[:2 * P].view(2, P)  # two held-out prompts
        tp_rows = launch(tp_inference_rank, args.tp, model.state_dict(), model.config.to_dict(), prompt, N)
        print(f"\ntensor-parallel generation on {args.tp} ranks (batch 2, {P} + {N} tokens, greedy):")
        for r in tp_rows:
            print(f"  rank {r['rank']}: {r['heads_per_rank']} heads; weights {fmt_bytes(r['weight_bytes'])} "
                  f"(formula {fmt_bytes(r['weight_bytes_formula'])}, one process "
                  f"{fmt_bytes(r['weight_bytes_one_process'])}); KV cache "
                  f"{fmt_bytes(r['cache_bytes_per_rank'])} (formula {fmt_bytes(r['cache_bytes_formula'])}, "
                  f"one process {fmt_bytes(r['cache_bytes_one_process'])}); same tokens as one process: "
                  f"{r['greedy_identical']}, logits within {r['max_logit_diff']:.1e}")

# %% Save
if MAIN:
    for r in batching.values():
        r.pop("kv_timeline")
    path = save_json(LAB, "result", {
        "preset": args.preset, "weights": source, "threads": args.threads, "clock": args.clock,
        "trace": {"requests": len(trace), "rate": args.rate, "prompt_tokens": prompts, "max_tokens": outputs,
                  "last_arrival_s": trace[-1].arrival_s},
        "one_at_a_time": alone, "batching": batching, "quantization": quant, "tp": tp_rows, "plot": str(png),
    })
    print(f"wrote {path}")
