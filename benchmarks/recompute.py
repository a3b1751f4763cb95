"""Activation recomputation on CPU: what each mode keeps (measured vs estimated) and what it costs.

    python benchmarks/recompute.py                 # writes benchmarks/results/recompute.{json,md}
    python benchmarks/recompute.py --rounds 3      # quicker, noisier times

For gpt-mini (batch 8 x 128 tokens, fp32) with SDPA and with eager attention, each recompute mode
(journey_dist/recompute.py: none, selective = the attention core, full = whole blocks, ops = a
per-op policy saving matmul outputs):
* memory: one measured training step under the exact tensor ledger (peak, activations kept)
  next to estimate_memory(..., recompute=mode) (the per-op policy is measured only);
* cost: the backward's matmul FLOPs under FlopCounterMode (a recomputed forward runs inside the
  backward), exact, and the forward + backward wall time, the least of --rounds rounds taking
  the modes in turn; extra = the mode's minus none's. The headline: selective's extra forward
  work as a fraction of full's, in FLOPs and in seconds.
Times are taken with one thread (ranks and tests share this machine); the load average is saved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from journey_dist.config import get_preset
from journey_dist.memory.estimate import estimate_memory, fmt_bytes
from journey_dist.memory.measure import measure_config
from journey_dist.model import GPT
from journey_dist.recompute import RECOMPUTE_MODES, recompute_costs
from journey_dist.runtime import _json_default

PRESET, BATCH, SEQ, DTYPE = "gpt-mini", 8, 128, "fp32"


def memory_rows(attn: str) -> dict[str, dict]:
    cfg = get_preset(PRESET, attn_impl=attn)
    rows = {}
    for mode in RECOMPUTE_MODES:
        kw = dict(batch_size=BATCH, seq_len=SEQ, dtype=DTYPE, recompute=mode)
        meas = measure_config(cfg, device="cpu", ledger=True, **kw)
        est = None if mode == "ops" else estimate_memory(cfg, device="cpu", **kw)
        rows[mode] = {"peak_measured": meas.peak, "activations_measured": meas.high_water["activations"],
                      "peak_estimated": None if est is None else est.total,
                      "activations_estimated": None if est is None else est.activations,
                      "peak_error_pct": None if est is None else 100 * (est.total - meas.peak) / meas.peak}
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (each runs every mode once)")
    parser.add_argument("--out", default="benchmarks/results/recompute", help="results path without suffix")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0, load = time.perf_counter(), os.getloadavg()
    results = {}
    for attn in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = GPT(get_preset(PRESET, attn_impl=attn))
        x = torch.randint(0, 256, (BATCH, SEQ))
        costs = recompute_costs(model, x, torch.roll(x, -1, 1), rounds=args.rounds)
        sel, full = costs["selective"], costs["full"]
        results[attn] = {"memory": memory_rows(attn), "cost": costs,
                         "selective_over_full_flops": sel["extra_flops"] / full["extra_flops"],
                         "selective_over_full_seconds": sel["extra_s"] / full["extra_s"]}
        r = results[attn]
        print(f"{attn}: selective's extra work / full's: FLOPs {r['selective_over_full_flops']:.3f}, "
              f"seconds {r['selective_over_full_seconds']:.3f}", flush=True)
    command = f"python benchmarks/recompute.py --rounds {args.rounds}"
    meta = {"command": command, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_average_before": load, "load_average_after": os.getloadavg(),
            "seconds": time.perf_counter() - t0, "config": f"{PRESET} b{BATCH} s{SEQ} {DTYPE}"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                                   default=_json_default) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, results))
    print(f"wrote {out}.json/.md")
    return 0


def markdown(meta: dict, results: dict) -> str:
    lines = ["# Activation recomputation on CPU: memory kept and work redone\n",
             f"Command: `{meta['command']}` (torch {meta['torch']}, {meta['threads']} thread, "
             f"{meta['cpus']} CPUs, load average {meta['load_average_before'][0]:.1f} before and "
             f"{meta['load_average_after'][0]:.1f} after; {meta['seconds']:.0f} s). "
             f"Config: {meta['config']}.\n",
             "Memory: measured with the exact tensor ledger (one step after a warm-up) vs "
             "`estimate_memory(..., recompute=mode)`. Cost: backward matmul FLOPs (FlopCounterMode; the "
             "recomputed forward runs inside the backward) and forward+backward seconds (least of the "
             "rounds); extra = the mode's minus none's.\n"]
    for attn, r in results.items():
        lines += [f"## {attn}\n", "| mode | peak measured | peak estimated | error | activations kept | "
                  "backward GFLOP | extra GFLOP | step s | extra s |", "|---" * 9 + "|"]
        for mode, mem in r["memory"].items():
            c = r["cost"][mode]
            est = "-" if mem["peak_estimated"] is None else fmt_bytes(mem["peak_estimated"])
            err = "-" if mem["peak_error_pct"] is None else f"{mem['peak_error_pct']:+.2f}%"
            lines.append(f"| {mode} | {fmt_bytes(mem['peak_measured'])} | {est} | {err} | "
                         f"{fmt_bytes(mem['activations_measured'])} | {c['backward_flops'] / 1e9:.3f} | "
                         f"{c['extra_flops'] / 1e9:.3f} | {c['step_s']:.3f} | {c['extra_s']:+.3f} |")
        lines += ["", f"Selective's extra work as a fraction of full's: {r['selective_over_full_flops']:.3f} "
                  f"in FLOPs, {r['selective_over_full_seconds']:.3f} in seconds.\n"]
    lines.append("The per-op policy (ops) redoes no matmul, only the cheap ops between them; the "
                 "ledger files what it saves as temporaries (checkpoint's hooks hide them), so its "
                 "'activations kept' reads like full's.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
