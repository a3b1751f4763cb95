"""Mixture of experts: lab 12's figures with the machine they came from, the step time of expert
parallel (ep=2) vs the same MoE on one process, and the dispatch bytes of top-1 vs top-2 routing.

    python benchmarks/moe.py                          # lab 12 (2 gloo ranks), then 3 timing rounds
    python benchmarks/moe.py --rounds 5 --steps 4 --batch 8

Part 1 runs labs/12_mixture_of_experts.py with its defaults and keeps what notes/moe.md quotes:
the parity table, each step's routing and rank 0's all-to-all bytes (ledger vs formula), the
per-rank model states and the imbalance with and without the balancing loss.
Part 2, on 2 ranks: each round times `--steps` AdamW steps of expert parallel (dp = ep = 2, one
thread per rank, each rank half the batch), then the same steps of one process on the whole batch
(rank 0 with two threads, then with one; rank 1 waiting at a barrier), from the same fresh model.
The ratio per round is one process / ep=2; the medians over rounds are reported with every round.
Then one step each of top-1 and top-2 routing under a CommLedger: the all-to-all bytes each rank
hands over, next to the formula for that step's routing and for an even load.
Writes benchmarks/results/moe.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tp_parity import cpu_model  # the sibling script: one way to name the CPU

from journey_dist.comm import CommLedger
from journey_dist.config import ParallelConfig, get_preset
from journey_dist.data import get_batch, load_tokens, microbatches, shard
from journey_dist.memory.sizes import expert_param_count, param_count
from journey_dist.mesh import build_mesh
from journey_dist.parallel.expert.accounting import RouterLog, expected_collectives, planned_comm
from journey_dist.parallel.expert.parallelize import expert_groups_of, expert_parallel, expert_parallel_hooks
from journey_dist.parity import fresh_model
from journey_dist.runtime import spawn
from journey_dist.train import StepHooks, TrainConfig, make_optimizer, train_step

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LAB = "12_mixture_of_experts"



def run_lab() -> tuple[dict, float]:
    """Lab 12 with its defaults, results in a temporary runs directory: its result.json and seconds."""
    with tempfile.TemporaryDirectory() as runs:
        env = dict(os.environ, JOURNEY_RUNS_DIR=runs, PYTHONPATH=str(ROOT))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "labs" / f"{LAB}.py")], env=env, check=True, cwd=ROOT)
        return json.loads((Path(runs) / LAB / "result.json").read_text()), time.perf_counter() - t0


def _timed_steps(model, optimizer, batches, hooks, group=None) -> float:
    """Seconds per step over `batches` (one warm-up step first), the slowest rank's if `group`."""
    train_step(model, optimizer, batches[0], hooks, grad_clip=1.0)
    if group is not None:
        dist.barrier(group)
    t0 = time.perf_counter()
    for micro in batches[1:]:
        train_step(model, optimizer, micro, hooks, grad_clip=1.0)
    seconds = torch.tensor((time.perf_counter() - t0) / (len(batches) - 1))
    if group is not None:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=group)
    return float(seconds)


def rank_main(args: argparse.Namespace) -> dict:
    config = get_preset(args.preset)
    pcfg = ParallelConfig(dp=2, ep=2)
    data = load_tokens("handbook")
    cfg = TrainConfig(batch_size=args.batch, lr=1e-3)
    rank = dist.get_rank()
    batches = [get_batch(data.train, args.batch, config.block_size, s) for s in range(args.steps + 1)]
    mesh = build_mesh(pcfg)
    groups = expert_groups_of(mesh)
    rounds = []
    for _ in range(args.rounds):
        torch.set_num_threads(1)
        model = expert_parallel(fresh_model(config), groups)
        hooks = expert_parallel_hooks(model, groups)
        local = [microbatches(shard(x, rank, 2), shard(y, rank, 2), 1) for x, y in batches]
        ep_s = _timed_steps(model, make_optimizer(model, cfg), local, hooks, dist.group.WORLD)
        one = {}
        if rank == 0:
            for threads in (2, 1):
                torch.set_num_threads(threads)
                model = fresh_model(config)
                one[threads] = _timed_steps(model, make_optimizer(model, cfg), [[b] for b in batches],
                                            StepHooks())
        dist.barrier()
        rounds.append({"ep2_s": ep_s, "one_process_s": one.get(2), "one_process_1thread_s": one.get(1)})
    torch.set_num_threads(1)
    dispatch = {}
    for k in (1, 2):
        cfg_k = config.with_(moe_top_k=k)
        model = expert_parallel(fresh_model(cfg_k), groups)
        hooks = expert_parallel_hooks(model, groups)
        log = RouterLog(model)
        x, y = batches[0]
        with CommLedger() as ledger:
            train_step(model, make_optimizer(model, cfg), [(shard(x, rank, 2), shard(y, rank, 2))], hooks,
                       grad_clip=1.0)
        log.close()
        measured = ledger.total_bytes("all_to_all")
        experts = expert_param_count(cfg_k, 2)
        numels = {"dense_numel": param_count(cfg_k, ep=2) - experts, "expert_numel": experts}
        formula = expected_collectives(cfg_k, pcfg, cfg, log.current, **numels)
        even = planned_comm(cfg_k, pcfg, batch=args.batch, seq=cfg_k.block_size, **numels)
        a2a = [ops["all_to_all"]["bytes"] for ops in formula.values() if "all_to_all" in ops]
        dispatch[f"top-{k}"] = {"measured": measured, "formula": sum(a2a),
                                "even_load": sum(ops.get("all_to_all", 0) for ops in even.values())}
    return {"rounds": rounds, "dispatch": dispatch}


def summarize(lab: dict, lab_seconds: float, parts: list[dict], args: argparse.Namespace) -> dict:
    rounds = [{**r, "ratio": r["one_process_s"] / r["ep2_s"],
               "ratio_1thread": r["one_process_1thread_s"] / r["ep2_s"]} for r in parts[0]["rounds"]]
    dispatch = {name: {**row, "by_rank": [p["dispatch"][name]["measured"] for p in parts]}
                for name, row in parts[0]["dispatch"].items()}
    steps = {name: [{"step": i, "counts_layer0": r["counts"][0], "imbalance": r["imbalance"],
                     "dropped": r["dropped"], "balance": r["balance"],
                     "a2a": next(ops["all_to_all"] for g, ops in s["comm"].items() if "all_to_all" in ops),
                     "a2a_formula": next(ops["all_to_all"] for g, ops in s["formula"].items()
                                         if "all_to_all" in ops)}
                    for i, (r, s) in enumerate(zip(run["routing"], run["steps"]))]
             for name, run in lab["runs"].items()}
    return {
        "meta": {"command": " ".join(["python benchmarks/moe.py", *sys.argv[1:]]), "preset": args.preset,
                 "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "torch": torch.__version__,
                 "cpu": cpu_model(), "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
                 "lab_seconds": lab_seconds},
        "lab": {"parity": lab["parity"], "router": lab["router"], "params": lab["params"], "steps": steps,
                "ledger_matches": {n: r["ledger_matches"] for n, r in lab["runs"].items()},
                "memory": lab["memory"], "balance": lab["balance"], "train": lab["train"],
                "balance_train": lab["balance_train"]},
        "step_time": {"rounds": rounds, **{f"median_{k}": statistics.median(r[k] for r in rounds) for k in (
            "ratio", "ratio_1thread", "ep2_s", "one_process_s", "one_process_1thread_s")}},
        "dispatch": {**dispatch, "ratio_top1_over_top2": dispatch["top-1"]["measured"]
                     / dispatch["top-2"]["measured"]},
    }


def markdown(s: dict) -> str:
    m, lab = s["meta"], s["lab"]
    lines = [f"# Mixture of experts: expert parallel on 2 gloo ranks ({m['preset']})", "",
             f"Command: `{m['command']}`", "",
             f"torch {m['torch']}; CPU: {m['cpu']} ({m['cpus']} cores, 1-minute load "
             f"{m['load_average_1min']:.1f} at the end); lab 12 took {m['lab_seconds']:.0f} s.", "",
             f"## Parity with one process (lab 12: dp = ep = 2, {lab['train']['steps']} AdamW steps, "
             f"global batch {lab['train']['batch_size']}, fp32)", "",
             f"Router logits at the start: max |diff| {lab['router']['router_logits']:.1e}, top-k choices "
             f"that differ: {lab['router']['choices_differ']}.", "",
             "| run | max abs loss diff | first-step grads | params after the steps |",
             "|---|---:|---:|---:|"]
    for name, d in lab["parity"].items():
        lines.append(f"| {name} | {d['loss']:.1e} | {d['grad']:.1e} | {d['param']:.1e} |")
    for name, rows in lab["steps"].items():
        lines += ["", f"### {name}: routing per step (whole batch) and rank 0's all-to-alls", "",
                  "| step | layer 0 pairs per expert | max/mean | dropped | balance loss | a2a calls | "
                  "a2a bytes | formula |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['step']} | {r['counts_layer0']} | {r['imbalance']:.2f} | {r['dropped']} | "
                         f"{r['balance']:.3f} | {r['a2a']['calls']} | {r['a2a']['bytes']:,} | "
                         f"{r['a2a_formula']['bytes']:,} |")
    matches = ", ".join(f"{n}: {'yes' if ok else 'NO'}" for n, ok in lab["ledger_matches"].items())
    states = "; ".join(f"{k} {v['measured']:,} / {v['estimated']:,.0f}" for k, v in lab["memory"].items())
    lines += ["", f"Every collective of every step on every rank equal to its formula: {matches}.", "",
              f"Rank 0's model states (bytes, measured / estimated): {states}.", "",
              f"## Load imbalance (max/mean), {lab['balance_train']['steps']} steps at lr "
              f"{lab['balance_train']['lr']:g}", "", "| step | " + " | ".join(lab["balance"]) + " |",
              "|---:|" + "---:|" * len(lab["balance"])]
    n = len(next(iter(lab["balance"].values())))
    for i in sorted(set(range(0, n, 5)) | {n - 1}):
        lines.append(f"| {i} | " + " | ".join(f"{v[i]:.2f}" for v in lab["balance"].values()) + " |")
    t = s["step_time"]
    lines += ["", f"## Step time: ep=2 (2 ranks x 1 thread, half the batch each) vs one process "
              f"(the whole batch, 2 threads or 1); global batch {m['batch']}, {m['steps']} steps per round",
              "",
              "| round | ep=2 s/step | one process, 2 threads | / ep=2 | one process, 1 thread | / ep=2 |",
              "|---:|---:|---:|---:|---:|---:|"]
    median = {k.removeprefix("median_"): v for k, v in t.items() if k != "rounds"}
    for i, r in enumerate([*t["rounds"], median]):
        name = i if i < len(t["rounds"]) else "median"
        lines.append(f"| {name} | {r['ep2_s']:.3f} | {r['one_process_s']:.3f} | {r['ratio']:.2f} | "
                     f"{r['one_process_1thread_s']:.3f} | {r['ratio_1thread']:.2f} |")
    lines += ["",
              "## Dispatch bytes: top-1 vs top-2 (one step, all-to-all bytes each rank hands over)", "",
              "| routing | rank 0 measured | formula (this routing) | even load | all ranks |",
              "|---|---:|---:|---:|---|"]
    for name in ("top-1", "top-2"):
        d = s["dispatch"][name]
        lines.append(f"| {name} | {d['measured']:,} | {d['formula']:,} | {d['even_load']:,.0f} | "
                     f"{', '.join(f'{b:,}' for b in d['by_rank'])} |")
    lines += ["", f"top-1 / top-2 (rank 0, measured): {s['dispatch']['ratio_top1_over_top2']:.3f}.", "",
              "Timings were taken on a shared machine: compare the ratio within a round, not seconds "
              "across runs.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="moe-mini")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    lab, lab_seconds = run_lab()
    parts = spawn(rank_main, 2, (args,), timeout_s=3600)
    summary = summarize(lab, lab_seconds, parts, args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "moe.json").write_text(json.dumps(summary, indent=1) + "\n")
    (RESULTS / "moe.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
