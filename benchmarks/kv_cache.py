"""Generation with and without the KV cache: speedup at batch 1 and 8, same greedy tokens.

    python benchmarks/kv_cache.py                       # gpt-mini on CPU (the committed result)
    python benchmarks/kv_cache.py --device cuda --preset gpt2-small --prompt 64 --new 448

Untrained weights (the speed does not depend on them), a random prompt, greedy decoding.
Runs alternate (no cache, cache, ...) and the medians of --repeats are reported, so a change
in machine load hits both; wall time and this process's CPU time are both reported (with one
thread, the default, CPU time counts work, not the wait for a core on a shared machine).
Without a cache, making N tokens after a P-token prompt feeds sum_t (P + t) positions through
the model; with one, P + N - 1 (printed as the "work ratio": the speedup to expect when the
cost per position dominates; per-step overheads pull it down, most at batch 1).
Writes benchmarks/results/kv_cache.{json,md} (kv_cache_cuda.* on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from journey_dist.config import get_preset
from journey_dist.kv_cache import compare_generation, measure_cache_bytes
from journey_dist.memory.estimate import fmt_bytes
from journey_dist.model import GPT

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default="gpt-mini")
parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
parser.add_argument("--prompt", type=int, default=16)
parser.add_argument("--new", type=int, default=112)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: leave the default); 1 makes CPU time count work only")
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

if args.threads:
    torch.set_num_threads(args.threads)
device = torch.device(args.device)
torch.manual_seed(0)
model = GPT(get_preset(args.preset)).to(device).eval()
P, N = args.prompt, args.new
work_ratio = sum(P + t for t in range(N)) / (P + N - 1)
rows = []
for b in args.batches:
    cmp = compare_generation(model, b, P, N, repeats=args.repeats)
    mem = measure_cache_bytes(model, b, P + N)
    rows.append({**cmp.to_dict(), "cache_bytes_measured": mem["measured_bytes"],
                 "cache_bytes_formula": mem["formula_bytes"]})
    print(f"batch {b}: no cache {cmp.seconds_no_cache:.2f} s, cache {cmp.seconds_cache:.2f} s, "
          f"speedup {cmp.speedup:.1f}x (CPU time {cmp.cpu_seconds_no_cache:.2f} s -> "
          f"{cmp.cpu_seconds_cache:.2f} s, {cmp.cpu_speedup:.1f}x), identical tokens: {cmp.identical}, "
          f"cache {fmt_bytes(mem['measured_bytes'])} (formula {fmt_bytes(mem['formula_bytes'])})")

command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/kv_cache.py", *sys.argv[1:]])
result = {
    "command": command, "preset": args.preset, "device": str(device), "torch": torch.__version__,
    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
    "load_average": os.getloadavg(), "prompt": P, "new_tokens": N, "work_ratio": work_ratio,
    "rows": rows,
}
out = Path(__file__).parent / "results" / ("kv_cache" if device.type == "cpu" else f"kv_cache_{device.type}")
out.parent.mkdir(exist_ok=True)
out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
lines = [
    f"# Generation with vs without KV cache ({device.type})", "",
    f"Command: `{command}`", "",
    f"{args.preset}, untrained, greedy, prompt {P} + {N} new tokens, torch {torch.__version__}, "
    f"threads: {torch.get_num_threads()}, {os.cpu_count()} cores, load average at the end "
    f"{os.getloadavg()[0]:.1f}. "
    f"Positions fed through the model: {sum(P + t for t in range(N)):,} without a cache vs "
    f"{P + N - 1} with one (work ratio {work_ratio:.1f}x).", "",
    "Wall-clock times depend on what else the machine runs; CPU time (this process, "
    f"threads: {torch.get_num_threads()}) counts the work done and is the steadier figure "
    "on a shared CPU.", "",
    "| batch | no cache (s) | cache (s) | speedup | CPU s no cache | CPU s cache | CPU-time speedup "
    "| tokens/s cache | same tokens | cache bytes measured | formula |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
]
for r in rows:
    lines.append(f"| {r['batch']} | {r['seconds_no_cache']:.2f} | {r['seconds_cache']:.2f} | "
                 f"{r['speedup']:.1f}x | {r['cpu_seconds_no_cache']:.2f} | {r['cpu_seconds_cache']:.2f} | "
                 f"{r['cpu_speedup']:.1f}x | {r['tokens_per_s_cache']:,.0f} | "
                 f"{r['identical']} | {r['cache_bytes_measured']:,} | {r['cache_bytes_formula']:,} |")
out.with_suffix(".md").write_text("\n".join(lines) + "\n")
print(f"wrote {out}.json and {out}.md")
