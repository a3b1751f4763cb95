"""Pipeline schedules on gloo ranks: measured bubble and held activations next to their formulas.

    python benchmarks/pipeline_schedules.py                 # p in {2, 4}, m in {4, 8}, 40 ms per pass
    python benchmarks/pipeline_schedules.py --sleep-ms 20 --ranks 2

Every schedule (journey_dist/parallel/pipeline/orders.py: gpipe, 1f1b, interleaved with v = 2,
zb-h1) runs balanced SleepStages (timeline.measure_bubble): a stage's forward, input gradient
and weight gradient each sleep --sleep-ms (split evenly over the chunks when interleaved), so
ranks do not compete for the CPU. Each rank records its F, B and W intervals; the bubble is
1 - busy / step per rank, averaged over ranks, the step from the common start to the last end on
any rank, the shortest of three measured steps after a warm-up. Formula: orders.bubble_formula;
held activation sets per stage: counted while running vs orders.inflight_formula.
Writes benchmarks/results/pipeline_schedules.{json,md}.
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

from journey_dist.config import PIPELINE_SCHEDULES
from journey_dist.parallel.pipeline.timeline import bubble_row, bubble_sweep
from journey_dist.runtime import launch

RESULTS = Path(__file__).resolve().parent / "results"


def rank_main(ms: list[int], sleep_s: float) -> list[dict]:
    sweep = bubble_sweep(PIPELINE_SCHEDULES, ms, f=sleep_s, b=sleep_s, w=sleep_s)
    return [bubble_row(r) for r in sweep.values()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="2,4", help="pipeline sizes p to run (comma-separated)")
    parser.add_argument("--microbatches", default="4,8", help="microbatch counts m (comma-separated)")
    parser.add_argument("--sleep-ms", type=float, default=40.0, help="F, B and W time per stage")
    parser.add_argument("--out", default=str(RESULTS / "pipeline_schedules"),
                        help="results path without suffix")
    args = parser.parse_args()
    ms = [int(m) for m in args.microbatches.split(",")]
    t0, load = time.perf_counter(), os.getloadavg()
    rows = []
    for p in (int(x) for x in args.ranks.split(",")):
        for row in launch(rank_main, p, ms, args.sleep_ms / 1e3)[0]:
            rows.append({"p": p, **row})
            print(f"p={p} {row['schedule']:<12} m={row['m']}: measured {row['measured']:.3f} formula "
                  f"{row['formula']:.3f}; held {row['peak_inflight']} formula {row['inflight_formula']}",
                  flush=True)
    command = "python benchmarks/pipeline_schedules.py" + (
        f" --sleep-ms {args.sleep_ms:g}" if args.sleep_ms != 40 else "") + (
        f" --ranks {args.ranks}" if args.ranks != "2,4" else "") + (
        f" --microbatches {args.microbatches}" if args.microbatches != "4,8" else "")
    meta = {"command": command, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "sleep_ms": args.sleep_ms,
            "load_average_before": load, "load_average_after": os.getloadavg(),
            "seconds": time.perf_counter() - t0,
            "max_abs_diff": max(abs(r["measured"] - r["formula"]) for r in rows),
            "held_equal_formula": all(r["peak_inflight"] == r["inflight_formula"] for r in rows)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(f"largest |measured - formula| {meta['max_abs_diff']:.3f}; held = formula everywhere: "
          f"{meta['held_equal_formula']}; wrote {out}.json/.md")
    return 0


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# Pipeline schedules: measured bubble and held activations vs their formulas\n",
             f"Command: `{meta['command']}` (torch {meta['torch']}, gloo on {meta['cpus']} CPUs, load "
             f"average {meta['load_average_before'][0]:.1f} before and {meta['load_average_after'][0]:.1f} "
             f"after; {meta['seconds']:.0f} s). Balanced sleeping stages: forward, input gradient and weight "
             f"gradient {meta['sleep_ms']:g} ms each per stage (a full backward: both).\n",
             "| p | schedule | m | measured bubble | formula | diff | held per stage | formula | step ms |",
             "|---" * 9 + "|"]
    for r in rows:
        name = r["schedule"] + (f" (v={r['v']})" if r["v"] > 1 else "")
        lines.append(f"| {r['p']} | {name} | {r['m']} | {r['measured']:.3f} | {r['formula']:.3f} | "
                     f"{r['measured'] - r['formula']:+.3f} | {r['peak_inflight']} | "
                     f"{r['inflight_formula']} | "
                     f"{r['step_s'] * 1e3:.0f} |")
    lines += ["", f"Largest |measured - formula|: {meta['max_abs_diff']:.3f} (message latency and timer "
              f"jitter only add idle time); held activation sets equal their formula everywhere: "
              f"{meta['held_equal_formula']}.\n"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
