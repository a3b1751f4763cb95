"""Lab 13: serving: continuous batching over a paged KV cache, weight-only quantization, TP inference.

    python labs/13_serving.py                      # ~1 min on a busy 2-core CPU; less with lab 01's model
    python labs/13_serving.py --requests 16 --tp 0 # quicker: fewer requests, no TP ranks

What to look at:
* one trace of requests (prompts cut from the held-out text, log-normal lengths, Poisson arrivals)
  served three ways on the same kernels: static batching (a batch runs to completion, every
  request reserves a full context window), continuous batching with the same batch cap, and
  continuous batching with as many requests as the paged cache holds. Tokens/s, time to first
  token (TTFT), inter-token latency (ITL) and end-to-end percentiles, mixed steps (prefill chunks
  and decode tokens in one step), and the KV cache used vs reserved (cached tokens over the slots
  their blocks hold, summed over steps): static reserves the window, paging wastes under one
  block per request;
* every way gives exactly the tokens of one-request-at-a-time greedy decoding through
  GPT.generate and its contiguous KV cache, preempted requests included;
* weight-only int8 (per channel) and int4 (per group of 32) quantization: weight bytes measured
  = formula, held-out perplexity next to fp32, and the same through torchao when installed
  (agreement stated; `pip install torchao --no-deps`, or the [serving] extra; torchao divides
  absmax by qmax + 0.5, so some codes differ by one, and keeps int4 codes one per byte and an
  int8 zero point per scale: its formula counts them);
* tensor-parallel generation on 2 spawned ranks: each rank's weights and KV cache measured
  against param_count(cfg, tp) and kv_cache_bytes(..., kv_heads=H/t), same greedy tokens.
Weights: lab 01's checkpoint if present, else a brief training run (--train-steps).
Results: runs/13_serving/result.json and kv_memory.png.
"""

# %% Setup: arguments, and every check that can fail, before any work or rank starts
import torch

from journey_dist.config import ConfigError, GPTConfig, ParallelConfig, get_preset
from journey_dist.data import load_tokens
from journey_dist.labkit import lab_parser, nonnegative_int, parse, positive_float, positive_int
from journey_dist.memory.estimate import fmt_bytes
from journey_dist.model import GPT
from journey_dist.plots import kv_memory_plot
from journey_dist.runtime import launch, runs_dir, save_json, seed_everything, under_torchrun
from journey_dist.serving.blocks import check_pool
from journey_dist.serving.quant import check_quant, quantization_report, quantization_table
from journey_dist.serving.scheduler import batching_table, compare_batching, timed_reference
from journey_dist.serving.tp import tp_inference_rank, tp_table
from journey_dist.serving.trace import Request, make_trace, trace_summary
from journey_dist.train import TrainConfig, train

LAB = "13_serving"
parser = lab_parser(__doc__)
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--data", default="handbook", help="embedded corpus name or a UTF-8 text file")
parser.add_argument("--requests", type=positive_int, default=32)
parser.add_argument("--rate", type=positive_float, default=200.0, help="arrivals per second (Poisson)")
parser.add_argument("--block", type=int, default=16, help="KV block size in tokens")
parser.add_argument("--blocks", type=int, default=64, help="KV blocks in the pool (64 x 16: 8 windows)")
parser.add_argument("--max-seqs", type=positive_int, default=32,
                    help="request cap of the larger continuous run")
parser.add_argument("--max-batched-tokens", type=positive_int, default=256, help="tokens per continuous step")
parser.add_argument("--group-size", type=int, default=32, help="int4 quantization group")
parser.add_argument("--no-torchao", action="store_true", help="skip the torchao reference")
parser.add_argument("--tp", type=nonnegative_int, default=2, help="ranks for the TP inference step (0: skip)")
parser.add_argument("--train-steps", type=nonnegative_int, default=60,
                    help="if lab 01's checkpoint is absent")
parser.add_argument("--threads", type=positive_int, default=1,
                    help="torch CPU threads (timings on a shared CPU)")
parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time requests by wall clock, or by this process's CPU time (steady on a busy "
                         "machine with --threads 1)")
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

if under_torchrun():
    raise ConfigError("lab 13 is one process that spawns its own TP ranks; run it with plain python "
                      "(python labs/13_serving.py --tp 2), not under torchrun")
config = get_preset(args.preset)
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
STATIC_SEQS = args.blocks // window_blocks  # requests that fit when each reserves a whole window


# %% 1. A model: lab 01's trained checkpoint if it is --preset's, else a brief run of the shared loop
def served_model() -> tuple[GPT, str]:
    """The model in eval mode, and where its weights come from."""
    ckpt = runs_dir("01_single_device") / "model.pt"
    saved = torch.load(ckpt, map_location="cpu") if ckpt.is_file() else None
    model = GPT(config)
    if saved is not None and GPTConfig(**saved["config"]) == config:
        model.load_state_dict(saved["model"])
        return model.eval(), f"lab 01 checkpoint {ckpt}"
    if args.train_steps:
        train(model, data, TrainConfig(steps=args.train_steps, batch_size=16,
                                       log_every=max(1, args.train_steps // 3)), lab=LAB)
        return model.eval(), f"trained here for {args.train_steps} steps (run lab 01 for a better model)"
    return model.eval(), "untrained (perplexities are ~256; run lab 01)"


# %% 2. The trace: prompts cut from the held-out text, long-tailed lengths, Poisson arrivals
def request_trace() -> list[Request]:
    return make_trace(data.val.tolist(), args.requests, config.block_size, rate=args.rate,
                      prompt_median=config.block_size / 5, output_median=config.block_size / 4)


# %% 3. Static vs continuous batching on the same trace, kernels and KV pool, against the truth:
# every request alone through GPT.generate and its contiguous KV cache
def batching(model: GPT, trace: list[Request]) -> tuple[dict, dict[str, dict]]:
    """One request at a time (its tokens/s), and the three batched runs, each with its tokens checked."""
    reference, alone = timed_reference(model, trace, args.clock)
    pool = dict(num_blocks=args.blocks, block_size=args.block, clock=args.clock)
    continuous = dict(policy="continuous", max_batched_tokens=args.max_batched_tokens, **pool)
    runs = compare_batching(model, trace, {
        "static": dict(policy="static", max_seqs=STATIC_SEQS, **pool),
        f"continuous, {STATIC_SEQS} seqs": dict(max_seqs=STATIC_SEQS, **continuous),
        f"continuous, {args.max_seqs} seqs": dict(max_seqs=args.max_seqs, **continuous)}, reference)
    if not all(r["identical"] for r in runs.values()):
        raise RuntimeError("a batched run's tokens differ from one-request-at-a-time decoding")
    return alone, runs


# %% 4. Weight-only quantization: bytes measured vs formula, held-out perplexity, torchao as reference
def quantization(model: GPT) -> dict:
    quant = quantization_report(model, data.val, args.group_size, with_torchao=not args.no_torchao)
    if any(r["weight_bytes"] != r["formula_bytes"] for r in quant["rows"].values()):
        raise RuntimeError("measured weight bytes differ from the formula")
    return quant


# %% 5. Tensor-parallel inference: each rank holds 1/t of the split weights and its own heads' cache
def tensor_parallel(model: GPT) -> list[dict]:
    """One row per rank (none with --tp 0): two held-out prompts of block/8 tokens, block/4 more."""
    if not args.tp:
        return []
    prompt_len, new = config.block_size // 8, config.block_size // 4  # gpt-mini: 16 + 32 tokens
    prompt = data.val[:2 * prompt_len].view(2, prompt_len)
    return launch(tp_inference_rank, args.tp, model.state_dict(), model.config.to_dict(), prompt, new)


# %% The steps in order, in this one process (the TP step spawns its ranks, which rerun only the setup)
def main() -> dict:
    model, source = served_model()
    trace = request_trace()
    print(f"{args.preset}: {model.num_params():,} parameters, {source}\n{trace_summary(trace)}")
    alone, runs = batching(model, trace)
    png = kv_memory_plot(runs, runs_dir(LAB) / "kv_memory.png")  # KV cache reserved and used over time
    print(f"one request at a time: {alone['tokens_per_s']:.0f} tokens/s ({alone['seconds']:.1f} s). KV pool: "
          f"{args.blocks} blocks x {args.block} tokens = {fmt_bytes(runs['static']['kv_pool_bytes'])}; "
          f"static fits {STATIC_SEQS} requests of a {config.block_size}-token window\n{batching_table(runs)}")
    quant = quantization(model)
    print(f"\n{quantization_table(quant)}")
    tp_rows = tensor_parallel(model)
    print(f"\ntensor-parallel generation on {args.tp} ranks:\n{tp_table(tp_rows)}" if tp_rows else "")
    for r in runs.values():
        r.pop("kv_timeline")  # in the plot, not in the JSON
    path = save_json(LAB, "result", {
        "preset": args.preset, "weights": source, "threads": args.threads, "clock": args.clock,
        "trace": {"requests": len(trace), "rate": args.rate, "prompt_tokens": [len(r.prompt) for r in trace],
                  "max_tokens": [r.max_tokens for r in trace], "last_arrival_s": trace[-1].arrival_s},
        "one_at_a_time": alone, "batching": runs, "quantization": quant, "tp": tp_rows, "plot": str(png)})
    print(f"wrote {path} and {png.name}")
    return runs


# %% Launch
if __name__ == "__main__":
    main()
