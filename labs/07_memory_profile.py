"""Lab 07: where the memory of a training step goes - estimated term by term, measured, compared.

    python labs/07_memory_profile.py                                   # gpt-mini, ~1 minute on a CPU
    python labs/07_memory_profile.py --preset tiny --batch 4 --seq 32  # seconds
    torchrun --nproc_per_node=1 labs/07_memory_profile.py

What to look at: (1) each term of the estimate with its formula, and the paper's 16-bit count
next to what PyTorch really keeps (the gap: LayerNorm statistics, SDPA's log-sum-exp, the causal
mask and, under autocast, the fp32 residual stream and 16-bit weight copies; notes/memory.md);
(2) measured vs estimated per component - on CPU the tensor ledger counts every live tensor
exactly, on CUDA the caching allocator's peak; the process RSS is the OS view (interpreter,
libraries, allocator caches), for context only; (3) the moment of the step where memory peaks
(often the loss's backward: three fp32 batch x seq x vocab buffers); (4) activations growing
linearly with sequence length for SDPA and quadratically for eager attention; (5) what
dp/ZeRO/tp/pp/recompute do to GPT-2's memory per GPU (analytic estimates, not measured);
(6) recomputation, measured: none, selective (Megatron's: only the attention core - scores,
softmax, dropout, probabilities @ v - is recomputed; with eager attention it drops the s x s
tensors, with SDPA only the log-sum-exp, which the fused kernel already keeps small), full (each
block keeps its input) and a per-op policy (torch's selective-checkpoint contexts: matmul outputs
saved, the rest recomputed), each next to the estimate, and the forward work each redoes in the
backward (matmul FLOPs, exact; seconds, noisy on a shared CPU; benchmarks/recompute.py).
Results: runs/07_memory_profile/{result.json,measured_vs_estimated.png}.
"""

# %% Setup: arguments, and whether the measured steps fit in this machine's memory
import os

from journey_dist.config import ConfigError, get_preset
from journey_dist.labkit import lab_parser, parse, positive_int, resolve_device
from journey_dist.memory.estimate import estimate_memory
from journey_dist.memory.measure import measure_config
from journey_dist.memory.report import (
    compare,
    layout_plans,
    measurement_text,
    peak_text,
    per_layer_vs_paper,
    plans_table,
    plot,
    recompute_rows,
    recompute_table,
    seq_sweep,
    sweep_table,
    table,
    terms_table,
    too_big_to_measure,
)
from journey_dist.runtime import (
    init_distributed,
    is_rank0,
    print0,
    runs_dir,
    save_json,
    shutdown,
    under_torchrun,
)

LAB = "07_memory_profile"
parser = lab_parser(__doc__)
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--batch", type=positive_int, default=8)
parser.add_argument("--seq", type=positive_int, default=None, help="sequence length (default: block_size)")
parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "bf16-autocast"])
parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
args = parse(parser, LAB)  # from here a ConfigError is one `error:` line and exit 2

cfg = get_preset(args.preset, attn_impl=args.attn)
seq = cfg.block_size if args.seq is None else args.seq
if seq > cfg.block_size:
    raise ConfigError(f"--seq {seq} is longer than {args.preset}'s block_size={cfg.block_size}; "
                      f"use --seq <= {cfg.block_size} (or leave it out)")
local_rank = int(os.environ.get("LOCAL_RANK", 0)) if under_torchrun() else 0
device = resolve_device(args.device, local_rank)
kw = dict(batch_size=args.batch, seq_len=seq, dtype=args.dtype)
est = estimate_memory(cfg, device=device.type, **kw)
# Section 4 measures three lengths with both attentions: the largest of them must fit, as
# `journey estimate` requires before it measures (same limit).
SEQS = sorted({max(1, seq // 4), max(1, seq // 2), seq})
largest = max(estimate_memory(cfg.with_(attn_impl=a), batch_size=args.batch, seq_len=s, dtype=args.dtype,
                              device=device.type).total for s in SEQS for a in ("sdpa", "eager"))
if (too_big := too_big_to_measure(largest, device.type)) and not args.force:
    raise ConfigError(f"{args.preset} at batch {args.batch} x {seq}: {too_big} on {device}; use a smaller "
                      "--preset, --batch or --seq (`journey estimate` gives the estimate alone), or pass "
                      "--force to measure anyway")
if under_torchrun():
    init_distributed()
print0(f"{args.preset}: batch {args.batch} x {seq} tokens, {args.dtype}, {args.attn}, AdamW, on {device}")


# %% 1. The estimate, term by term (bytes per layer; b micro-batch, s seq, h width, a heads)
print0("\n" + terms_table(est) + "\n\n" + per_layer_vs_paper(est))

# %% 2. Measure one step after a warm-up step (AdamW creates its state at the first step)
meas = measure_config(cfg, device=device, ledger=True, **kw)
print0("\n" + measurement_text(meas))

# %% 3. Measured vs estimated per component; the moments of the step
rows = compare(est, meas)
print0("\n" + table(rows) + "\n\n" + peak_text(est, meas))
png = runs_dir(LAB) / "measured_vs_estimated.png"
if is_rank0():
    plot(rows, png, f"{args.preset} b{args.batch} s{seq} {args.dtype} {args.attn} on {device.type}")

# %% 4. Activations vs sequence length: linear for SDPA, quadratic for eager attention
sweep = seq_sweep(cfg, SEQS, batch_size=args.batch, dtype=args.dtype, device=device)
print0("\n" + sweep_table(sweep))

# %% 5. Planning GPT-2 on GPUs: memory per rank (estimates; bf16 mixed precision, AdamW, 8 x 1024 tokens)
gpt2 = get_preset("gpt2-medium", vocab_size=50304)  # 50257 padded to a multiple of 128 (as nanoGPT does)
layouts = (dict(), dict(dp=2), dict(dp=2, zero=1), dict(dp=2, zero=3), dict(tp=2),
           dict(tp=2, sequence_parallel=True), dict(pp=2, microbatches=4), dict(recompute="full"),
           dict(attn="eager"), dict(attn="eager", recompute="selective"))  # selective drops eager's s x s
plans = layout_plans(gpt2, layouts, batch_size=8, seq_len=1024, dtype="bf16-mixed")
print0("\ngpt2-medium 8 x 1024, bf16-mixed AdamW, per rank (estimated, not measured):\n" + plans_table(plans))

# %% 6. Recomputation: what none / selective / full / a per-op policy keep (measured vs estimated) and redo
recompute = recompute_rows(cfg, batch_size=args.batch, seq_len=seq, dtype=args.dtype, device=device)
print0("\n" + recompute_table(recompute))

# %% Save
path = save_json(LAB, "result", {
    "args": {**vars(args), "seq": seq}, "device": str(device), "rows": rows, "estimate": est,
    "measurement": meas, "sweep": sweep, "plans": plans, "recompute": recompute,
})
print0(f"\nwrote {path} and {png}")
if under_torchrun():
    shutdown()
