"""Memory on CPU: exact tensor accounting against the analytic estimate over a grid of configs.

    python benchmarks/memory_cpu.py                 # writes benchmarks/results/memory_cpu.{json,md}
    python benchmarks/memory_cpu.py --quick         # the first 8 configs only
    python benchmarks/memory_cpu.py --family llama  # llama-mini: benchmarks/results/memory_cpu_llama.*

Each config runs one warm-up training step (AdamW creates its state) and one measured step
under the TensorLedger (journey_dist/memory/measure.py): every tensor storage an op creates is
counted until it is freed, so the measured peak is exact bytes of live tensors (not RSS). The
estimate is journey_dist.memory.estimate.estimate_memory(..., device="cpu"). Targets: params,
grads and optimizer bytes exact; peak within 5% on every config.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from journey_dist.memory.report import grid_markdown, grid_row
from journey_dist.runtime import _json_default

GRID = [
    dict(preset="tiny", batch=4, seq=32, dtype="fp32", attn="sdpa"),
    dict(preset="gpt-mini", batch=8, seq=128, dtype="fp32", attn="sdpa"),
    dict(preset="gpt-mini", batch=8, seq=128, dtype="fp32", attn="eager"),
    dict(preset="gpt-mini", batch=8, seq=128, dtype="bf16-autocast", attn="sdpa"),
    dict(preset="gpt-mini", batch=4, seq=128, dtype="bf16-autocast", attn="eager", dropout=0.1),
    dict(preset="gpt-mini", batch=16, seq=64, dtype="bf16", attn="sdpa"),
    dict(preset="gpt-mini", batch=8, seq=128, dtype="fp32", attn="sdpa", dropout=0.1),
    dict(preset="gpt-mini", batch=2, seq=32, dtype="fp32", attn="sdpa", optimizer="sgd"),
    dict(preset="gpt-mini", batch=8, seq=128, dtype="fp32", attn="sdpa", microbatches=4),
    dict(preset="gpt-mini", batch=8, seq=128, dtype="fp32", attn="sdpa", recompute=True),
    dict(preset="gpt-mini", batch=8, seq=128, dtype="fp32", attn="eager",
         overrides=dict(vocab_size=64, n_head=16)),
    dict(preset="gpt-mini", batch=8, seq=128, dtype="bf16-autocast", attn="eager",
         overrides=dict(vocab_size=64, n_head=16, n_layer=2)),
    dict(preset="gpt2-small", batch=1, seq=64, dtype="fp32", attn="sdpa"),
    dict(preset="gpt2-small", batch=2, seq=64, dtype="bf16", attn="sdpa"),
]

# The Llama family (RMSNorm, SwiGLU, RoPE, GQA, untied head): the same kinds of configs, plus
# small-vocabulary ones whose peak is a block's backward or ln_f's, and MQA with a tied head.
LLAMA_GRID = [
    dict(preset="llama-mini", batch=8, seq=128, dtype="fp32", attn="sdpa"),
    dict(preset="llama-mini", batch=8, seq=128, dtype="fp32", attn="eager"),
    dict(preset="llama-mini", batch=8, seq=128, dtype="bf16-autocast", attn="sdpa"),
    dict(preset="llama-mini", batch=4, seq=128, dtype="bf16-autocast", attn="eager", dropout=0.1),
    dict(preset="llama-mini", batch=16, seq=64, dtype="bf16", attn="sdpa"),
    dict(preset="llama-mini", batch=8, seq=128, dtype="fp32", attn="sdpa", dropout=0.1),
    dict(preset="llama-mini", batch=2, seq=32, dtype="fp32", attn="sdpa", optimizer="sgd"),
    dict(preset="llama-mini", batch=8, seq=128, dtype="fp32", attn="sdpa", microbatches=4),
    dict(preset="llama-mini", batch=8, seq=128, dtype="fp32", attn="sdpa", recompute=True),
    dict(preset="llama-mini", batch=8, seq=128, dtype="fp32", attn="sdpa", overrides=dict(vocab_size=64)),
    dict(preset="llama-mini", batch=8, seq=128, dtype="bf16-autocast", attn="sdpa",
         overrides=dict(vocab_size=64)),
    dict(preset="llama-mini", batch=8, seq=128, dtype="fp32", attn="eager",
         overrides=dict(vocab_size=64, n_head=16, n_kv_head=4)),
    dict(preset="llama-mini", batch=8, seq=128, dtype="bf16-autocast", attn="eager",
         overrides=dict(vocab_size=64, n_head=16, n_kv_head=4, n_layer=2)),
    dict(preset="llama-mini", batch=8, seq=128, dtype="bf16", attn="sdpa",
         overrides=dict(vocab_size=64, n_kv_head=1, tie_embeddings=True)),
    dict(preset="llama-mini", batch=8, seq=128, dtype="fp32", attn="sdpa",
         overrides=dict(vocab_size=64, n_head=16, n_kv_head=2, mlp_hidden=64)),
    dict(preset="llama-mini", batch=4, seq=128, dtype="fp32", attn="sdpa", dropout=0.1,
         overrides=dict(vocab_size=64, n_head=16, n_kv_head=2, mlp_hidden=64)),
]
GRIDS = {"gpt2": GRID, "llama": LLAMA_GRID}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the first 8 configs")
    parser.add_argument("--family", default="gpt2", choices=list(GRIDS), help="which grid of configs")
    parser.add_argument("--out", default=None, help="results path without suffix (default: "
                        "benchmarks/results/memory_cpu, or memory_cpu_llama for --family llama)")
    args = parser.parse_args()
    grid = GRIDS[args.family][:8] if args.quick else GRIDS[args.family]
    suffix = "" if args.family == "gpt2" else f"_{args.family}"
    args.out = args.out or f"benchmarks/results/memory_cpu{suffix}"
    results = []
    t0 = time.perf_counter()
    for spec in grid:
        t = time.perf_counter()
        r = grid_row(spec, device="cpu")
        r["seconds"] = time.perf_counter() - t
        results.append(r)
        print(f"{r['label']:<70} measured {r['peak_measured'] / 2**20:9.2f} MiB  estimated "
              f"{r['peak_estimated'] / 2**20:9.2f} MiB  {r['peak_error_pct']:+6.2f}%  states exact: "
              f"{r['states_exact']}", flush=True)
    worst = max(abs(r["peak_error_pct"]) for r in results)
    exact = all(r["states_exact"] for r in results)
    command = "python benchmarks/memory_cpu.py" + (" --quick" if args.quick else "") + (
        f" --family {args.family}" if args.family != "gpt2" else "")
    meta = {"command": command, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0,
            "max_abs_peak_error_pct": worst, "model_states_exact": exact, "configs": len(results)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                                   default=_json_default) + "\n")
    md = ["# Memory on CPU: measured (tensor ledger) vs estimated\n",
          f"Command: `{command}` (torch {meta['torch']}, {meta['threads']} threads, "
          f"{meta['seconds']:.0f} s).\n",
          "Measured: exact bytes of live tensor storages at the step's peak (TensorLedger), after one "
          "warm-up step. Estimated: `estimate_memory(..., device=\"cpu\")`.\n",
          grid_markdown(results), "",
          f"Largest |peak error|: {worst:.2f}% over {len(results)} configs (target 5%); params, grads "
          f"and optimizer bytes exact on every config: {exact}.\n"]
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"max |peak error| {worst:.2f}%; model states exact: {exact}; wrote {out}.json/.md")
    return 0 if worst <= 5 and exact else 1


if __name__ == "__main__":
    sys.exit(main())
