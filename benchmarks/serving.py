"""Serving gpt-mini: continuous vs static batching on one trace, and weight-only quantization.

    python benchmarks/serving.py                     # the committed result (CPU, one thread)
    python benchmarks/serving.py --rounds 1 --train-steps 50    # quicker, noisier

A gpt-mini is trained here with the shared loop (--train-steps, seed 0) so perplexities mean
something; then:
* batching: one seeded trace (--requests, Poisson arrivals at --rate, lengths as lab 13) served
  by static batching (a batch runs to completion, each request reserves a 128-token window of the
  64 x 16-token pool: 8 at a time), continuous batching with the same cap of 8, and continuous
  batching with up to 32 requests in the same pool. Rounds alternate the three so a change in
  machine load hits all; medians over rounds, and the median of each round's ratio to static.
  Requests are timed on this process's CPU clock (--clock cpu, torch on one thread): on a shared
  machine it counts the work, not the waits for a core. Every run's tokens are checked against
  one-request-at-a-time GPT.generate.
* quantization: weight bytes measured vs formula and held-out perplexity, fp32 vs our int8
  (per channel) and int4 (groups of 32), and torchao's (when installed), with the agreement; for
  scale, the perplexity with Gaussian noise of 100% of each weight's std on the same layers.
Writes benchmarks/results/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

from journey_dist.config import get_preset
from journey_dist.data import load_tokens
from journey_dist.memory.estimate import fmt_bytes
from journey_dist.model import GPT
from journey_dist.serving.quant import quantization_report
from journey_dist.serving.scheduler import compare_batching, timed_reference
from journey_dist.serving.trace import make_trace
from journey_dist.train import TrainConfig, train

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--train-steps", type=int, default=300)
parser.add_argument("--requests", type=int, default=48)
parser.add_argument("--rate", type=float, default=200.0, help="arrivals per second")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(0)
config = get_preset("gpt-mini")
data = load_tokens("handbook")
model = GPT(config)
if args.train_steps:
    train(model, data, TrainConfig(steps=args.train_steps, batch_size=16, log_every=50), lab="bench_serving")
model.eval()

# ---- batching
trace = make_trace(data.val.tolist(), args.requests, config.block_size, rate=args.rate,
                   prompt_median=config.block_size / 5, output_median=config.block_size / 4)
reference, alone = timed_reference(model, trace, args.clock)
pool = dict(num_blocks=64, block_size=16, clock=args.clock)
variants = {
    "static, 8 seqs": dict(policy="static", max_seqs=8, **pool),
    "continuous, 8 seqs": dict(policy="continuous", max_seqs=8, max_batched_tokens=256, **pool),
    "continuous, 32 seqs": dict(policy="continuous", max_seqs=32, max_batched_tokens=256, **pool),
}
rounds = [compare_batching(model, trace, variants, reference) for _ in range(args.rounds)]
for r in rounds:
    for row in r.values():
        row.pop("kv_timeline")


def median(name: str, *path: str) -> float:
    values = []
    for r in rounds:
        value = r[name]
        for key in path:
            value = value[key]
        values.append(value)
    return statistics.median(values)


batching = {}
for name in variants:
    batching[name] = {
        "identical_every_round": all(r[name]["identical"] for r in rounds),
        "tokens_per_s": median(name, "tokens_per_s"),
        "ratio_to_static": statistics.median(r[name]["tokens_per_s"] / r["static, 8 seqs"]["tokens_per_s"]
                                             for r in rounds),
        "ttft_p50_s": median(name, "ttft_s", "p50"), "ttft_p90_s": median(name, "ttft_s", "p90"),
        "itl_p50_s": median(name, "itl_s", "p50"), "itl_p99_s": median(name, "itl_s", "p99"),
        "e2e_p50_s": median(name, "e2e_s", "p50"),
        **{k: rounds[0][name][k] for k in ("steps", "mean_requests_per_step", "mixed_steps", "preemptions",
                                           "prefill_tokens", "decode_tokens", "kv_pool_bytes",
                                           "kv_used_mean_bytes", "kv_reserved_mean_bytes",
                                           "kv_used_over_reserved", "generated_tokens")},
    }
    b = batching[name]
    print(f"{name:<20} {b['tokens_per_s']:6.0f} tok/s ({b['ratio_to_static']:.2f}x static), TTFT p50 "
          f"{b['ttft_p50_s']:.3f} s, ITL p50 {b['itl_p50_s'] * 1e3:.1f} ms, KV used/reserved "
          f"{b['kv_used_over_reserved']:.0%}, same tokens: {b['identical_every_round']}")

# ---- quantization
quant = quantization_report(model, data.val, group_size=32)
for name, r in quant["rows"].items():
    print(f"{name:<20} {fmt_bytes(r['weight_bytes']):>12} (formula {fmt_bytes(r['formula_bytes'])}), "
          f"perplexity {r['perplexity']:.3f} ({r['perplexity_vs_fp32']:+.2%})")

command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/serving.py", *sys.argv[1:]])
result = {
    "command": command, "torch": torch.__version__, "threads": torch.get_num_threads(),
    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
    "load_average": os.getloadavg(), "train_steps": args.train_steps, "clock": args.clock,
    "trace": {"requests": len(trace), "rate": args.rate, "generated_tokens": sum(r.max_tokens for r in trace),
              "mean_prompt": sum(len(r.prompt) for r in trace) / len(trace),
              "mean_output": sum(r.max_tokens for r in trace) / len(trace)},
    "rounds": args.rounds, "one_at_a_time": alone, "batching": batching, "quantization": quant,
}
out = Path(__file__).parent / "results" / "serving"
out.parent.mkdir(exist_ok=True)
out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
t = result["trace"]
lines = [
    "# Serving gpt-mini: continuous vs static batching, weight-only quantization (CPU)", "",
    f"Command: `{command}`", "",
    f"gpt-mini trained {args.train_steps} steps (seed 0), torch {torch.__version__}, threads: "
    f"{torch.get_num_threads()}, {os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f}. "
    f"Trace: {t['requests']} requests, Poisson arrivals at {args.rate:g}/s, mean prompt "
    f"{t['mean_prompt']:.0f} and output {t['mean_output']:.0f} tokens ({t['generated_tokens']} to generate). "
    f"KV pool 64 blocks x 16 tokens. Times on the {args.clock} clock, medians of {args.rounds} "
    f"alternating rounds. One request at a time (GPT.generate): {alone['tokens_per_s']:.0f} tokens/s.", "",
    "| run | tokens/s | vs static | TTFT p50 (s) | TTFT p90 (s) | ITL p50 (ms) | ITL p99 (ms) "
    "| requests/step | mixed steps | preemptions | KV used/reserved | same tokens |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
]
for name, b in batching.items():
    lines.append(f"| {name} | {b['tokens_per_s']:.0f} | {b['ratio_to_static']:.2f}x | "
                 f"{b['ttft_p50_s']:.3f} | {b['ttft_p90_s']:.3f} | {b['itl_p50_s'] * 1e3:.1f} | "
                 f"{b['itl_p99_s'] * 1e3:.1f} | "
                 f"{b['mean_requests_per_step']:.1f} | {b['mixed_steps']} | {b['preemptions']} | "
                 f"{b['kv_used_over_reserved']:.0%} | {b['identical_every_round']} |")
lines += ["", f"Quantization (held-out handbook, {quant['held_out_tokens']:,} tokens; "
          f"torchao {quant['torchao']}):", "",
          "| weights | bytes measured | formula | vs fp32 | perplexity | vs fp32 | |W - W_q| / |W| |",
          "|---|---:|---:|---:|---:|---:|---:|"]
for name, r in quant["rows"].items():
    err = f"{r['relative_weight_error']:.2%}" if "relative_weight_error" in r else ""
    lines.append(f"| {name} | {r['weight_bytes']:,} | {r['formula_bytes']:,} | {r['bytes_vs_fp32']:.1%} | "
                 f"{r['perplexity']:.3f} | {r['perplexity_vs_fp32']:+.2%} | {err} |")
noise = quant["noise"]
lines.append(f"\nFor scale: Gaussian noise of {noise['relative_std']:.0%} of each weight matrix's std on the "
             f"same layers gives perplexity {noise['perplexity']:.3f} ({noise['perplexity_vs_fp32']:+.2%}).")
for name, a in quant["agreement"].items():
    lines.append(f"\nOurs vs torchao, {name}: {a['codes_differ']:.1%} of codes differ, by at most "
                 f"{a['max_code_diff']} (torchao divides absmax by qmax + 0.5); logits within "
                 f"{a['max_logit_diff']:.4f}.")
out.with_suffix(".md").write_text("\n".join(lines) + "\n")
print(f"wrote {out}.json and {out}.md")
