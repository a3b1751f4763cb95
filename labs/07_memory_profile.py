"""Lab 07: where the memory of a training step goes - estimated term by term, measured, compared.

    python labs/07_memory_profile.py                                   # gpt-mini, ~1 minute on a CPU
    python labs/07_memory_profile.py --preset tiny --batch 4 --seq 32  # seconds
    torchrun --nproc_per_node=1 labs/07_memory_profile.py

What to look at: (1) each term of the estimate with its formula, and the paper's 16-bit count
next to what PyTorch really keeps; (2) measured vs estimated per component - on CPU the tensor
ledger counts every live tensor exactly, on CUDA the caching allocator's peak; (3) the moment
of the step where memory peaks (often the loss's backward: three fp32 batch x seq x vocab
buffers); (4) activations growing linearly with sequence length for SDPA and quadratically for
eager attention; (5) what dp/ZeRO/tp/pp/recompute do to GPT-2's memory per GPU.
Results: runs/07_memory_profile/{result.json,measured_vs_estimated.png}.
"""

# %% Setup: arguments, and whether the measured steps fit in this machine's memory
import os

from journey_dist.config import ConfigError, get_preset
from journey_dist.labkit import lab_parser, parse, positive_int, resolve_device
from journey_dist.memory.estimate import activation_bytes_per_layer, estimate_memory, fmt_bytes
from journey_dist.memory.measure import measure_config
from journey_dist.memory.report import compare, phases_table, plot, table, too_big_to_measure
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
for group, terms in est.terms.items():
    print0(f"\n{group}:")
    for t in terms:
        print0(f"  {fmt_bytes(t.nbytes):>12}  {t.name:<58} {t.formula}")
per_layer = sum(t.nbytes for t in est.terms["per layer"])
paper = activation_bytes_per_layer(seq, args.batch, cfg.n_embd, cfg.n_head, dropout=False,
                                   fused_attention=args.attn == "sdpa",
                                   bytes_per_value=4 if args.dtype == "fp32" else 2)
print0(f"\nper layer: PyTorch keeps {fmt_bytes(per_layer)}; Korthikanti et al.'s count for the same "
       f"config (16 values/token/channel, no dropout) is {fmt_bytes(paper)}. The gap is LayerNorm "
       "statistics, SDPA's log-sum-exp, the causal mask and, under autocast, the fp32 residual stream "
       "and 16-bit weight copies.")

# %% 2. Measure one step after a warm-up step (AdamW creates its state at the first step)
meas = measure_config(cfg, device=device, ledger=True, **kw)
print0(f"\nmeasured with: {meas.instrument}")
if meas.cuda:
    print0(f"CUDA max reserved {fmt_bytes(meas.cuda['max_reserved'])}; allocated outside tensors "
           f"(cuBLAS workspaces) {fmt_bytes(meas.cuda['workspace'])}")
print0(f"process RSS {fmt_bytes(meas.rss['rss'])} (the OS view: interpreter, libraries, allocator caches)")

# %% 3. Measured vs estimated per component; the moments of the step
rows = compare(est, meas)
print0("\n" + table(rows))
print0("\nmodelled moments of the step (the largest is the peak):")
print0(phases_table(est))
print0("measured at the peak: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in meas.at_peak.items() if v))
png = runs_dir("07_memory_profile") / "measured_vs_estimated.png"
if is_rank0():
    plot(rows, png, f"{args.preset} b{args.batch} s{seq} {args.dtype} {args.attn} on {device.type}")

# %% 4. Activations vs sequence length: linear for SDPA, quadratic for eager attention
print0("\nseq   attn   activations measured   estimated   peak error")
sweep = []
for s in SEQS:
    for attn in ("sdpa", "eager"):
        c = cfg.with_(attn_impl=attn)
        e = estimate_memory(c, batch_size=args.batch, seq_len=s, dtype=args.dtype, device=device.type)
        m = measure_config(c, batch_size=args.batch, seq_len=s, dtype=args.dtype, device=device,
                           ledger=True)
        err = 100 * (e.total - m.peak) / m.peak
        sweep.append({"seq": s, "attn": attn, "activations_measured": m.high_water["activations"],
                      "activations_estimated": e.activations, "peak_error_pct": err})
        print0(f"{s:<5} {attn:<6} {fmt_bytes(m.high_water['activations']):>20} "
               f"{fmt_bytes(e.activations):>11} {err:+10.2f}%")

# %% 5. Planning GPT-2 on GPUs: memory per rank (estimates; bf16 mixed precision, AdamW, 8 x 1024 tokens)
gpt2 = get_preset("gpt2-medium", vocab_size=50304)  # 50257 padded to a multiple of 128 (as nanoGPT does)
print0("\ngpt2-medium, global batch 8 x 1024, bf16-mixed AdamW, per rank (analytic estimates, not measured):")
plans = []
layouts = (dict(), dict(dp=2), dict(dp=2, zero=1), dict(dp=2, zero=3), dict(tp=2),
           dict(tp=2, sequence_parallel=True), dict(pp=2, microbatches=4), dict(recompute=True))
for layout in layouts:
    e = estimate_memory(gpt2, batch_size=8, seq_len=1024, dtype="bf16-mixed", **layout)
    name = ", ".join(f"{k}={v}" for k, v in layout.items()) or "one GPU"
    plans.append({"layout": name, "total": e.total, "activations": e.activations,
                  "model_states": e.params + e.grads + e.optimizer, "peak_phase": e.peak_phase})
    states = e.params + e.grads + e.optimizer
    print0(f"  {name:<30} {fmt_bytes(e.total):>12}  (model states {fmt_bytes(states)}, "
           f"activations {fmt_bytes(e.activations)}, peak at {e.peak_phase})")

# %% Save
path = save_json("07_memory_profile", "result", {
    "args": {**vars(args), "seq": seq}, "device": str(device), "rows": rows, "estimate": est,
    "measurement": meas,
    "sweep": sweep, "plans": plans,
})
print0(f"\nwrote {path} and {png}")
if under_torchrun():
    shutdown()
