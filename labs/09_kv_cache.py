"""Lab 09: the KV cache: same tokens, far less work, and the memory it costs.

    python labs/09_kv_cache.py                    # ~1 minute on a 2-core CPU
    python labs/09_kv_cache.py --batches 1 --new 48   # quicker look

What to look at:
* generation with and without the cache gives the same greedy tokens (logits equal to fp32
  rounding), and the cache turns sum_t (P + t) token-forwards into P + N - 1: the speedup,
  larger at batch 8 than at batch 1 (per-step overheads are shared by the batch);
* the cache's bytes, summed over its tensors, equal 2 x layers x batch x tokens x heads x
  head_dim x bytes (memory.estimate.kv_cache_bytes);
* at GPT-2 small size the cache for a long context and a large batch outgrows the weights;
* pre-allocating max_len per request wastes most of that memory for a realistic (long-tailed)
  mix of request lengths; a paged cache with 16-token blocks wastes under one block each.
Results: runs/09_kv_cache/result.json.
"""

# %% Setup: arguments, and whether the largest generation fits in memory
import torch

from journey_dist.config import ConfigError, GPTConfig, get_preset
from journey_dist.kv_cache import (
    cached_logits_max_diff,
    compare_generation,
    kv_memory_table,
    measure_cache_bytes,
    paged_vs_preallocated,
    sample_lengths,
)
from journey_dist.labkit import lab_parser, parse, positive_int, resolve_device
from journey_dist.memory.estimate import estimate_memory, fmt_bytes, kv_cache_bytes, param_count
from journey_dist.memory.report import too_big_to_measure
from journey_dist.model import GPT
from journey_dist.runtime import runs_dir, save_json, seed_everything

LAB = "09_kv_cache"
MAX_REQUESTS = 1_000_000  # the paging estimate draws one length per request
parser = lab_parser(__doc__)
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8])
parser.add_argument("--prompt", type=positive_int, default=16)
parser.add_argument("--new", type=positive_int, default=112)
parser.add_argument("--repeats", type=positive_int, default=2)
parser.add_argument("--max-len", type=positive_int, default=2048,
                    help="serving window for the paging estimate")
parser.add_argument("--requests", type=positive_int, default=1000, help=f"at most {MAX_REQUESTS:,}")
parser.add_argument("--block", type=positive_int, default=16, help="paged-cache block size in tokens")
parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

config = get_preset(args.preset)
if args.prompt + args.new > config.block_size:
    raise ConfigError(f"--prompt {args.prompt} + --new {args.new} must fit block_size={config.block_size} of "
                      f"{args.preset}; use --prompt + --new <= {config.block_size}")
if args.max_len < args.block:
    raise ConfigError(f"--max-len {args.max_len} is shorter than one --block of {args.block} tokens; "
                      f"use --max-len >= --block")
if args.requests > MAX_REQUESTS:
    raise ConfigError(f"--requests {args.requests:,}: the paging estimate draws one length per request; "
                      f"use --requests <= {MAX_REQUESTS:,}")
device = resolve_device(args.device)
# A training step's estimated peak bounds what generating without a cache holds at once.
peak = estimate_memory(config, batch_size=max(args.batches), seq_len=args.prompt + args.new,
                       optimizer="none", device=device.type).total
if too_big := too_big_to_measure(peak, device.type):
    raise ConfigError(f"--batches {max(args.batches)} x {args.prompt + args.new} tokens: {too_big}; "
                      "use smaller --batches")
seed_everything(0)


# %% A model: lab 01's trained checkpoint if present (speed does not depend on the weights)
ckpt = runs_dir("01_single_device") / "model.pt"
if args.preset == "gpt-mini" and ckpt.is_file():
    saved = torch.load(ckpt, map_location="cpu")
    model = GPT(GPTConfig(**saved["config"]))
    model.load_state_dict(saved["model"])
    source = f"lab 01 checkpoint {ckpt}"
else:
    model = GPT(config)
    source = "untrained (run lab 01 for trained weights)"
model = model.to(device).eval()
print(f"{args.preset} on {device}: {model.num_params():,} parameters, {source}")

# %% Same logits, same tokens: prefill + one token at a time vs one full forward
ids = torch.randint(0, config.vocab_size, (2, args.prompt + args.new), device=device)
logit_diff = cached_logits_max_diff(model, ids, prefill=args.prompt)
print(f"\nmax |logits cached - logits full forward| = {logit_diff:.1e} (fp32 rounding; tolerance 1e-4)")
if logit_diff > 1e-4:
    raise RuntimeError("cached logits differ from the full forward: the cache is wrong")

# %% Speed: greedy generation with and without the cache
P, N = args.prompt, args.new
print(f"\nprompt {P} + {N} new tokens: {sum(P + t for t in range(N)):,} positions through the model "
      f"without a cache, {P + N - 1} with one (by formula; tests/test_kv_cache.py counts them with a hook)")
speed = []
for b in args.batches:
    cmp = compare_generation(model, b, P, N, repeats=args.repeats)
    speed.append(cmp.to_dict())
    print(f"  batch {b}: {cmp.seconds_no_cache:.2f} s -> {cmp.seconds_cache:.2f} s, "
          f"speedup {cmp.speedup:.1f}x (CPU time {cmp.cpu_speedup:.1f}x), "
          f"{cmp.tokens_per_s_cache:,.0f} tokens/s, same tokens: {cmp.identical}")

# %% Bytes: the cache's tensors vs the formula
mem = [measure_cache_bytes(model, b, P + N) for b in args.batches]
print("\ncache bytes (sum over its K and V tensors) vs 2 x L x B x S x H x D x bytes:")
for m in mem:
    verdict = "equal" if m["measured_bytes"] == m["formula_bytes"] else "DIFFER"
    print(f"  batch {m['batch']} x {m['tokens']} tokens: measured {m['measured_bytes']:,} "
          f"formula {m['formula_bytes']:,} ({verdict})")

# %% At scale: GPT-2 small in bf16, long contexts and large batches (estimate)
gpt2 = get_preset("gpt2-small")
weights = param_count(gpt2) * 2
scale = kv_memory_table(gpt2, batches=[1, 8, 64], lengths=[1024, 8192, 32768], dtype="bf16")
print(f"\nGPT-2 small, bf16: {fmt_bytes(kv_cache_bytes(gpt2, 1, 1, 'bf16'))} per token; weights "
      f"{fmt_bytes(weights)} (positions beyond 1024 need a longer-context variant)")
for r in scale:
    print(f"  batch {r['batch']:3d} x {r['tokens']:6d} tokens: {fmt_bytes(r['bytes']):>10}"
          f"  = {r['bytes'] / weights:6.1f} x the weights")

# %% Paged vs pre-allocated: a realistic mix of request lengths
lengths = sample_lengths(args.requests, args.max_len)
budget = 40 * 2**30  # 40 GiB of an 80 GB GPU left for the cache
paged = paged_vs_preallocated(gpt2, lengths, args.max_len, block_size=args.block, dtype="bf16",
                              budget_bytes=budget)
print(f"\n{args.requests} requests, log-normal lengths drawn around median {args.max_len // 8} (sample: "
      f"median {sorted(lengths)[len(lengths) // 2]}, mean {paged['mean_len']:.0f}, max {max(lengths)}), "
      f"window {args.max_len}, GPT-2 small bf16:")
print(f"  needed (tokens actually held)  {fmt_bytes(paged['needed_bytes']):>10}")
print(f"  pre-allocated max_len each     {fmt_bytes(paged['preallocated_bytes']):>10}  "
      f"waste {paged['preallocated_waste']:.0%}")
print(f"  paged, {args.block}-token blocks         {fmt_bytes(paged['paged_bytes']):>10}  "
      f"waste {paged['paged_waste']:.1%}  (saves {paged['saving']:.0%})")
print(f"  requests that fit in {fmt_bytes(budget)} of cache: {paged['fit_preallocated']} pre-allocated, "
      f"{paged['fit_paged']} paged")

# %% Save
path = save_json("09_kv_cache", "result", {
    "preset": args.preset, "device": str(device), "weights": source, "logit_max_diff": logit_diff,
    "speed": speed, "cache_bytes": mem, "gpt2_small_scale": scale, "paged": paged,
})
print(f"wrote {path}")
