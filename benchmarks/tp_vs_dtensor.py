"""Tensor parallel step time and bytes communicated: ours (from scratch) vs PyTorch DTensor TP.

    python benchmarks/tp_vs_dtensor.py                     # 2 gloo ranks on CPU, gpt-mini
    python benchmarks/tp_vs_dtensor.py --ranks 2 --batch 8 --steps 5 --rounds 3 --warmup 2

Same fresh GPT, same batches, same AdamW, grad clip 1.0. Variants: ours (SP off), ours (SP on),
DTensor (torchtitan-style plan + loss_parallel). The rounds interleave the variants so drift in
machine speed hits all of them; the step time is the median over rounds of the slowest rank's
mean step time. Bytes per step come from the CommLedger on one extra step (rank 0's view; "sent"
is per rank on a ring). The ratio ours/DTensor is from this one run.
Writes benchmarks/results/tp_vs_dtensor.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from journey_dist.comm import CommLedger
from journey_dist.config import ParallelConfig, get_preset
from journey_dist.data import get_batch, load_tokens
from journey_dist.parallel.tensor.dtensor import dtensor_hooks, parallelize_with_dtensor
from journey_dist.parallel.tensor.parallelize import parallelize
from journey_dist.parity import fresh_model
from journey_dist.runtime import launch
from journey_dist.train import TrainConfig, make_optimizer, train_step

RESULTS = Path(__file__).resolve().parent / "results"


def _variants(config, n: int, device_type: str) -> dict:
    out = {}
    for sp in (False, True):
        m = parallelize(fresh_model(config), sequence_parallel=sp)
        out["ours+sp" if sp else "ours"] = (m, m.hooks())
    m = parallelize_with_dtensor(fresh_model(config), init_device_mesh(device_type, (n,)))
    out["dtensor"] = (m, dtensor_hooks())
    return out


def rank_main(args, data) -> dict | None:
    n = dist.get_world_size()
    config = get_preset(args.preset)
    cfg = TrainConfig(batch_size=args.batch, lr=1e-3)
    variants = _variants(config, n, "cpu")
    opts = {k: make_optimizer(m, cfg) for k, (m, _) in variants.items()}
    step_no = [0]

    def one_step(name: str) -> None:
        model, hooks = variants[name]
        x, y = get_batch(data.train, args.batch, config.block_size, step_no[0], 0)
        (hooks.step_fn or train_step)(model, opts[name], [(x, y)], hooks, grad_clip=1.0)
        step_no[0] += 1

    def run_steps(name: str, steps: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step(name)
        mean = torch.tensor((time.perf_counter() - t0) / steps)
        dist.all_reduce(mean, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        return mean.item()

    for name in variants:
        run_steps(name, args.warmup)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            times[name].append(run_steps(name, args.steps))
    rows = {}
    for name in variants:
        with CommLedger() as ledger:
            one_step(name)
        coll = {op: {"calls": r["calls"], "bytes": r["bytes"], "sent": r["wire_bytes"]}
                for (op, _), r in ledger.summary().items()}
        rows[name] = {"step_s": statistics.median(times[name]), "rounds_s": times[name],
                      "tokens_per_s": args.batch * config.block_size / statistics.median(times[name]),
                      "collectives": coll, "calls": sum(c["calls"] for c in coll.values()),
                      "bytes": sum(c["bytes"] for c in coll.values()),
                      "sent": sum(c["sent"] for c in coll.values())}
    if dist.get_rank() != 0:
        return None
    meta = {"command": "python benchmarks/tp_vs_dtensor.py " + " ".join(sys.argv[1:]), "tp": n,
            "preset": args.preset, "batch": args.batch, "seq": config.block_size,
            "steps_per_round": args.steps, "rounds": args.rounds, "torch": torch.__version__,
            "backend": dist.get_backend(), "machine": platform.processor() or platform.machine(),
            "threads_per_rank": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0]}
    ratio = {k: rows[k]["step_s"] / rows["dtensor"]["step_s"] for k in rows}
    return {"meta": meta, "variants": rows, "step_time_vs_dtensor": ratio}


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tp_vs_dtensor.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["meta"]
    lines = [f"# Tensor parallel: ours vs PyTorch DTensor TP ({m['backend']}, {m['tp']} ranks)", "",
             f"Command: `{m['command']}`", "",
             f"{m['preset']}, batch {m['batch']} x seq {m['seq']}, fp32, AdamW + grad clip, "
             f"torch {m['torch']}, {m['threads_per_rank']} thread(s) per rank; median of {m['rounds']} "
             f"interleaved rounds of {m['steps_per_round']} steps; collectives of one step (rank 0), "
             "'sent' = per-rank ring volume.", "",
             "| variant | step (ms) | tokens/s | vs DTensor | collective calls | bytes handed | sent/rank |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k, r in result["variants"].items():
        lines.append(f"| {k} | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:,.0f} | "
                     f"{result['step_time_vs_dtensor'][k]:.2f}x | {r['calls']} | {r['bytes']:,} | "
                     f"{r['sent']:,.0f} |")
    lines += ["", f"Machine: {m['cpus']} CPUs, 1-minute load average {m['load_average_1min']:.1f} at the end "
              "(a shared box: absolute times are noisy; the ratio is from interleaved rounds of one run).",
              "", "Per collective:", ""]
    for k, r in result["variants"].items():
        parts = ", ".join(f"{op} {c['calls']} calls / {c['bytes']:,} B" for op, c in r["collectives"].items())
        lines.append(f"- {k}: {parts}")
    (RESULTS / "tp_vs_dtensor.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-mini")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    ParallelConfig(tp=a.ranks, sequence_parallel=True).validate(get_preset(a.preset))
    res = launch(rank_main, a.ranks, a, load_tokens("handbook"))[0]
    if res is not None:
        write(res)
        print((RESULTS / "tp_vs_dtensor.md").read_text())
