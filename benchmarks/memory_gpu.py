"""Memory on a GPU: the caching allocator's peak against the analytic estimate over a grid.

    python benchmarks/memory_gpu.py              # on a CUDA machine: benchmarks/results/memory_gpu.{json,md}
    python benchmarks/memory_gpu.py --dry-run    # anywhere: print the grid and the estimates only

Each config: a fresh model, one warm-up training step (AdamW state, cuBLAS workspaces), then
torch.cuda.reset_peak_memory_stats() and one measured step; measured peak =
torch.cuda.max_memory_allocated(). The cuBLAS workspaces are measured on their own
(measure.allocated_outside_tensors: allocated bytes after warm-up that belong to no parameter,
optimizer state or input) and added to the estimate, since the estimate does not model them;
both numbers are in the JSON. Optimizer: fused AdamW (train.make_optimizer on CUDA).
Target: |error| <= 5% per config.
Without CUDA (and without --dry-run) it prints why and exits 0, writing nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

from journey_dist.config import get_preset
from journey_dist.memory.estimate import estimate_memory
from journey_dist.memory.report import grid_markdown, grid_row, spec_label
from journey_dist.runtime import _json_default

GRID = [
    dict(preset="gpt-mini", batch=16, seq=128, dtype="fp32", attn="sdpa"),
    dict(preset="gpt-mini", batch=16, seq=128, dtype="bf16-autocast", attn="eager"),
    dict(preset="gpt2-small", batch=4, seq=512, dtype="fp32", attn="sdpa"),
    dict(preset="gpt2-small", batch=2, seq=1024, dtype="fp32", attn="eager"),
    dict(preset="gpt2-small", batch=8, seq=1024, dtype="bf16-autocast", attn="sdpa"),
    dict(preset="gpt2-small", batch=4, seq=512, dtype="bf16-autocast", attn="eager"),
    dict(preset="gpt2-small", batch=8, seq=1024, dtype="bf16", attn="sdpa"),
    dict(preset="gpt2-medium", batch=2, seq=512, dtype="fp32", attn="sdpa"),
    dict(preset="gpt2-medium", batch=4, seq=1024, dtype="bf16-autocast", attn="sdpa"),
    dict(preset="gpt2-medium", batch=2, seq=1024, dtype="bf16-autocast", attn="eager"),
    dict(preset="gpt2-medium", batch=8, seq=1024, dtype="bf16-autocast", attn="sdpa"),
    # a small vocabulary moves the peak from the loss into the blocks' backward
    dict(preset="gpt-mini", batch=32, seq=128, dtype="bf16-autocast", attn="eager",
         overrides=dict(vocab_size=64, n_head=16)),
]


def sdpa_kernels() -> dict[str, str]:
    """Which aten SDPA kernel PyTorch dispatches to per dtype here (flash, efficient, cudnn, math):
    the saved tensors and backward scratch depend on it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 4, 128, 64, device="cuda", dtype=dtype, requires_grad=True)
        with Record() as rec:
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        found[str(dtype)] = ", ".join(sorted({op for op in rec.ops if "attention" in op}))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="estimates only (no GPU needed)")
    parser.add_argument("--ledger", action="store_true",
                        help="also run the tensor ledger on CUDA (per-category bytes; slower)")
    parser.add_argument("--out", default="benchmarks/results/memory_gpu")
    args = parser.parse_args()
    if args.dry_run:
        for spec in GRID:
            cfg = get_preset(spec["preset"], attn_impl=spec["attn"], **spec.get("overrides", {}))
            est = estimate_memory(cfg, batch_size=spec["batch"], seq_len=spec["seq"], dtype=spec["dtype"],
                                  device="cuda")
            print(f"{spec_label(spec):<45} estimated peak {est.total / 2**30:7.2f} GiB  ({est.peak_phase})")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured, nothing written (use --dry-run for the estimates)")
        return 0
    results = []
    t0 = time.perf_counter()
    for spec in GRID:
        gc.collect()
        torch.cuda.empty_cache()
        r = grid_row(spec, device="cuda", ledger=args.ledger)
        results.append(r)
        ws = r["workspace_added"] / 2**20
        print(f"{r['label']:<45} allocated peak {r['peak_measured'] / 2**30:7.3f} GiB  estimated "
              f"{r['peak_estimated'] / 2**30:7.3f} GiB (incl. cuBLAS {ws:.1f} MiB)  "
              f"{r['peak_error_pct']:+6.2f}%", flush=True)
    worst = max(abs(r["peak_error_pct"]) for r in results)
    command = "python benchmarks/memory_gpu.py" + (" --ledger" if args.ledger else "")
    meta = {"command": command, "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(), "python": platform.python_version(),
            "seconds": time.perf_counter() - t0, "max_abs_peak_error_pct": worst, "configs": len(results),
            "sdpa_kernels": sdpa_kernels()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                                   default=_json_default) + "\n")
    md = ["# Memory on a GPU: allocator peak vs estimate\n",
          f"Command: `{command}` on {meta['gpu']} (torch {meta['torch']}, CUDA {meta['cuda']}).\n",
          "Measured: `torch.cuda.max_memory_allocated()` over one training step after a warm-up step. "
          "Estimated: `estimate_memory(..., device=\"cuda\")` + the measured cuBLAS workspace.\n",
          grid_markdown(results), "",
          f"SDPA kernels dispatched: {meta['sdpa_kernels']}.\n",
          f"Largest |peak error|: {worst:.2f}% over {len(results)} configs (target 5%).\n"]
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"max |peak error| {worst:.2f}%; wrote {out}.json/.md")
    return 0 if worst <= 5 else 1


if __name__ == "__main__":
    sys.exit(main())
