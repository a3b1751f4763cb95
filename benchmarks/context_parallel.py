"""Context parallel step time and peak memory per rank: ring attention vs the all-gather-k/v baseline.

    python benchmarks/context_parallel.py                      # 2 gloo ranks, gpt-mini at 1024 tokens
    python benchmarks/context_parallel.py --ranks 4 --name context_parallel_cp4

Same fresh GPT (block_size = --seq), same batches, same AdamW; each rank holds seq/cp tokens.
Variants at the same cp: ring (k/v blocks round the ring, overlapped with compute), zigzag (the
same, load-balanced), ulysses (all-to-all to a head split) and allgather (every rank gathers the
whole sequence's k and v: the baseline). The rounds interleave the variants so drift in machine
speed hits all of them; a step's time is the slowest rank's mean, the median over rounds is
reported, and the ratio to allgather is from this one run. Peak memory: the exact tensor ledger
(memory.measure) of one step on every rank (max over ranks), next to memory.estimate_memory
(cp, cp_design) where it models the design. Bytes: the CommLedger of one step on rank 0.
Writes benchmarks/results/<--name>.{json,md} (default context_parallel).
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

from journey_dist.comm import CommLedger
from journey_dist.config import CP_DESIGNS, ParallelConfig, get_preset
from journey_dist.data import get_batch, load_tokens
from journey_dist.memory.estimate import estimate_memory
from journey_dist.memory.measure import measure_step
from journey_dist.parallel.context.accounting import check_context_parallel
from journey_dist.parallel.context.parallelize import ContextParallel, ContextParallelGPT
from journey_dist.parity import fresh_model
from journey_dist.runtime import launch
from journey_dist.train import TrainConfig, make_optimizer, train_step

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("ring", "zigzag", "ulysses", "allgather")


def rank_main(args, data) -> dict | None:
    n = dist.get_world_size()
    config = get_preset(args.preset, block_size=args.seq)
    cfg = TrainConfig(batch_size=args.batch, lr=1e-3)
    models = {v: ContextParallelGPT(fresh_model(config), ContextParallel(None, v)) for v in VARIANTS}
    hooks = {v: m.hooks() for v, m in models.items()}
    opts = {v: make_optimizer(m, cfg) for v, m in models.items()}
    step_no = [0]

    def one_step(name: str) -> None:
        x, y = get_batch(data.train, args.batch, args.seq, step_no[0], 0)
        train_step(models[name], opts[name], [(x, y)], hooks[name], grad_clip=1.0)
        step_no[0] += 1

    def run_steps(name: str, steps: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step(name)
        mean = torch.tensor((time.perf_counter() - t0) / steps)
        dist.all_reduce(mean, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        return mean.item()

    for name in VARIANTS:
        run_steps(name, args.warmup)
    times = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            times[name].append(run_steps(name, args.steps))
    rows = {}
    for name in VARIANTS:
        with CommLedger() as ledger:
            one_step(name)
        coll = {op: {"calls": r["calls"], "bytes": r["bytes"]} for (op, _), r in ledger.summary().items()}
        model = ContextParallelGPT(fresh_model(config), ContextParallel(None, name))
        cp = model.cp
        x, y = get_batch(data.train, args.batch, args.seq, 0, 0)
        meas = measure_step(model, make_optimizer(model, cfg), cp.shard(x), cp.shard(y))
        peak = torch.tensor([meas.peak, meas.high_water["activations"]], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        est = (estimate_memory(config, batch_size=args.batch, seq_len=args.seq, device="cpu", cp=n,
                               cp_design=name) if name in CP_DESIGNS else None)
        rows[name] = {"step_s": statistics.median(times[name]), "rounds_s": times[name],
                      "tokens_per_s": args.batch * args.seq / statistics.median(times[name]),
                      "collectives": coll, "peak_bytes": int(peak[0]), "activation_bytes": int(peak[1]),
                      "estimated_peak": None if est is None else est.total,
                      "estimated_activations": None if est is None else est.activations}
    if dist.get_rank() != 0:
        return None
    meta = {"command": "python benchmarks/context_parallel.py " + " ".join(sys.argv[1:]), "cp": n,
            "preset": args.preset, "batch": args.batch, "seq": args.seq, "steps_per_round": args.steps,
            "rounds": args.rounds, "torch": torch.__version__, "backend": dist.get_backend(),
            "machine": platform.processor() or platform.machine(),
            "threads_per_rank": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0]}
    base = rows["allgather"]
    ratios = {k: {"step_time": r["step_s"] / base["step_s"], "peak": r["peak_bytes"] / base["peak_bytes"],
                  "activations": r["activation_bytes"] / base["activation_bytes"]} for k, r in rows.items()}
    return {"meta": meta, "variants": rows, "vs_allgather": ratios}


def write(result: dict, name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["meta"]

    def mib(x):
        return "-" if x is None else f"{x / 2**20:.2f}"

    lines = [f"# Context parallel: ring attention vs all-gather k/v ({m['backend']}, cp={m['cp']})", "",
             f"Command: `{m['command']}`", "",
             f"{m['preset']}, batch {m['batch']} x seq {m['seq']} ({m['seq'] // m['cp']} tokens per rank), "
             f"fp32, AdamW + grad clip, torch {m['torch']}, {m['threads_per_rank']} thread(s) per rank; "
             f"median of {m['rounds']} interleaved rounds of {m['steps_per_round']} steps (slowest rank); "
             "memory: exact tensor ledger of one step, max over ranks, next to the estimate.", "",
             "| variant | step (ms) | vs allgather | peak MiB (est.) | activations MiB (est.) "
             "| peak vs allgather | collectives of one step (rank 0) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for k, r in result["variants"].items():
        ratio = result["vs_allgather"][k]
        coll = ", ".join(f"{op} {c['calls']} / {c['bytes']:,} B" for op, c in r["collectives"].items())
        lines.append(f"| {k} | {r['step_s'] * 1e3:.0f} | {ratio['step_time']:.2f}x | {mib(r['peak_bytes'])} "
                     f"({mib(r['estimated_peak'])}) | {mib(r['activation_bytes'])} "
                     f"({mib(r['estimated_activations'])}) | {ratio['peak']:.2f}x | {coll} |")
    lines += ["", f"Machine: {m['cpus']} CPUs, 1-minute load average {m['load_average_1min']:.1f} at the end "
              "(a shared box: absolute times are noisy; the ratios are from interleaved rounds of one run)."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-mini")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--name", default="context_parallel", help="results file stem under benchmarks/results")
    a = p.parse_args()
    if Path(a.name).name != a.name or not a.name:
        p.error(f"--name {a.name!r} must be a plain file stem (it is written under benchmarks/results)")
    cfg = get_preset(a.preset, block_size=a.seq)
    for design in CP_DESIGNS:
        check_context_parallel(ParallelConfig(cp=a.ranks, cp_design=design), cfg, a.seq)
    res = launch(rank_main, a.ranks, a, load_tokens("handbook"))[0]
    if res is not None:
        write(res, a.name)
        print((RESULTS / f"{a.name}.md").read_text())
