"""Lab 09: the KV cache: same tokens, far less work, and the memory it costs.

    python labs/09_kv_cache.py                    # ~1 minute on a 2-core CPU
    python labs/09_kv_cache.py --batches 1 --new 48   # quicker look

What to look at:
* generation with and without the cache gives the same greedy tokens (logits equal to fp32
  rounding), and the cache turns sum_t (P + t) token-forwards into P + N - 1 (kv_cache.token_forwards;
  tests/test_kv_cache.py counts them with a hook): the speedup, larger at batch 8 than at batch 1
  (per-step overheads are shared by the batch);
* the cache's bytes, summed over its tensors, equal 2 x layers x batch x tokens x heads x
  head_dim x bytes (memory.estimate.kv_cache_bytes);
* at GPT-2 small size the cache for a long context and a large batch outgrows the weights
  (positions beyond 1024 need a longer-context variant: this is the estimate);
* pre-allocating max_len per request wastes most of that memory for a realistic (long-tailed,
  log-normal around max_len / 8) mix of request lengths; a paged cache with 16-token blocks wastes
  under one block each, so more requests fit in the 40 GiB left for the cache on an 80 GB GPU.
notes/kv_cache.md has the arithmetic.
Results: runs/09_kv_cache/result.json.
"""

# %% Setup: arguments, and whether the largest generation fits in memory
import torch

from journey_dist.config import ConfigError, GPTConfig, get_preset
from journey_dist.kv_cache import (
    cache_bytes_table,
    cached_logits_max_diff,
    compare_generation,
    kv_memory_table,
    measure_cache_bytes,
    paged_vs_preallocated,
    paging_table,
    sample_lengths,
    scale_table,
    speed_table,
    token_forwards,
)
from journey_dist.labkit import lab_parser, parse, positive_int, resolve_device
from journey_dist.memory.estimate import estimate_memory, param_count
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


# %% 1. A model: lab 01's trained checkpoint if present (speed does not depend on the weights)
def load_model() -> tuple[GPT, str]:
    ckpt = runs_dir("01_single_device") / "model.pt"
    if args.preset == "gpt-mini" and ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu")
        model = GPT(GPTConfig(**saved["config"]))
        model.load_state_dict(saved["model"])
        return model.to(device).eval(), f"lab 01 checkpoint {ckpt}"
    return GPT(config).to(device).eval(), "untrained (run lab 01 for trained weights)"


model, source = load_model()
print(f"{args.preset} on {device}: {model.num_params():,} parameters, {source}")

# %% 2. Same logits: prefill, then one token at a time through the cache, vs one full forward
ids = torch.randint(0, config.vocab_size, (2, args.prompt + args.new), device=device)
logit_diff = cached_logits_max_diff(model, ids, prefill=args.prompt)
print(f"\nmax |logits cached - logits full forward| = {logit_diff:.1e} (fp32 rounding; tolerance 1e-4)")
if logit_diff > 1e-4:
    raise RuntimeError("cached logits differ from the full forward: the cache is wrong")

# %% 3. Speed: greedy generation with and without the cache (positions through the model by formula)
P, N = args.prompt, args.new
work = token_forwards(P, N)
speed = [compare_generation(model, b, P, N, repeats=args.repeats).to_dict() for b in args.batches]
print(f"\nprompt {P} + {N} new tokens: {work['without_cache']:,} positions through the model without a "
      f"cache, {work['with_cache']} with one\n{speed_table(speed)}")

# %% 4. Bytes: the cache's tensors vs the formula
mem = [measure_cache_bytes(model, b, P + N) for b in args.batches]
print("\n" + cache_bytes_table(mem))

# %% 5. At scale: GPT-2 small in bf16, long contexts and large batches (estimate)
gpt2 = get_preset("gpt2-small")
scale = kv_memory_table(gpt2, batches=[1, 8, 64], lengths=[1024, 8192, 32768], dtype="bf16")
print("\nGPT-2 small (estimate): " + scale_table(scale, weight_bytes=param_count(gpt2) * 2))

# %% 6. Paged vs pre-allocated: a realistic (long-tailed) mix of request lengths, GPT-2 small in bf16
lengths = sample_lengths(args.requests, args.max_len)
budget = 40 * 2**30  # 40 GiB of an 80 GB GPU left for the cache
paged = paged_vs_preallocated(gpt2, lengths, args.max_len, block_size=args.block, dtype="bf16",
                              budget_bytes=budget)
print("\n" + paging_table(paged, lengths))

# %% Save
path = save_json(LAB, "result", {
    "preset": args.preset, "device": str(device), "weights": source, "logit_max_diff": logit_diff,
    "speed": speed, "cache_bytes": mem, "gpt2_small_scale": scale, "paged": paged,
})
print(f"wrote {path}")
