"""Every parallel scheme on one preset (default llama-mini) against one process: the parity table.

    python benchmarks/scheme_parity.py                        # llama-mini, 3 AdamW steps, batch 8
    python benchmarks/scheme_parity.py --preset gpt-mini      # the same table for GPT-2's family
    python benchmarks/scheme_parity.py --skip-deepspeed       # without the DeepSpeed stages

On 2 gloo ranks: data parallel (naive, bucketed, DDP), tensor parallel (ours, ours + sequence
parallel, DTensor with torchtitan's plan), pipeline parallel (GPipe and 1F1B, ours and
torch.distributed.pipelining), ZeRO-1 (ours), FSDP2, DeepSpeed ZeRO-1/2/3, LoRA + DDP (adapters on
every linear of every block, against one process fine-tuning the same adapters), and TP generate
(greedy tokens, logits with the KV cache); on 4 ranks: dp x tp x pp (1x2x2, 2x2x1, 2x1x2). Each row
is the worst |difference| over all ranks from one process training the same fresh model on the
same global batches (fp32): per-step loss, first-step gradients (DeepSpeed: the relative difference
of its gradient norm, the one it keeps), parameters after the steps; and whether the CommLedger's
collectives of a step equal the scheme's formula where one exists. Pipeline and 3D rows use a
reference that sums the same microbatches. Float rounding only: the digits depend on the CPU.
Writes benchmarks/results/scheme_parity_<preset>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from tp_parity import cpu_model  # the sibling script: one way to name the CPU

from journey_dist.comm import CommLedger, calls_and_bytes
from journey_dist.config import LoRAConfig, ParallelConfig, get_preset
from journey_dist.data import get_batch, load_tokens
from journey_dist.lora import apply_peft_lora, finetune
from journey_dist.mesh import build_mesh
from journey_dist.parallel.compose import comm_by_dim, expected_comm_per_step, parity, three_d_run
from journey_dist.parallel.data.replicas import run_data_parallel
from journey_dist.parallel.pipeline.schedules import pipeline_run
from journey_dist.parallel.sharding.deepspeed import STAGES, installed, run_deepspeed
from journey_dist.parallel.sharding.fsdp import run_fsdp2
from journey_dist.parallel.sharding.zero import run_zero1
from journey_dist.parallel.tensor.dtensor import run_dtensor_tp
from journey_dist.parallel.tensor.generate import compare_tp_generation
from journey_dist.parallel.tensor.parallelize import parallelize, run_tensor_parallel
from journey_dist.parity import fresh_model, max_abs_diff, reference_run, worst_diffs
from journey_dist.runtime import spawn
from journey_dist.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MICRO = 4  # microbatches of the pipeline and 3D rows


def _ledger_ok(run) -> bool | None:
    """The step's measured collectives equal the scheme's formula (None: no formula)."""
    return calls_and_bytes(run.comm) == calls_and_bytes(run.analytic) if run.analytic else None


def _deepspeed_rows(config, data, cfg, ddp) -> dict:
    """DeepSpeed ZeRO-1/2/3 against DDP (DeepSpeed keeps only the gradient norm of the first step)."""
    norms = torch.stack([torch.linalg.vector_norm(g) for g in ddp.grads.values()])
    ref_norm = torch.linalg.vector_norm(norms).item()
    rows = {}
    for stage in STAGES:
        run = run_deepspeed(stage, config, data, cfg)
        rows[f"deepspeed zero-{stage} (vs DDP)"] = {**worst_diffs(run, ddp), "ledger": None,
                                                   "grad": abs(run.grad_norm - ref_norm) / ref_norm,
                                                   "grad_check": "rel norm"}
    return rows


def two_ranks(preset: str, cfg: TrainConfig, skip_deepspeed: bool) -> dict:
    """Every 2-rank scheme's worst diffs from one process (collective: the same on every rank)."""
    config, data = get_preset(preset), load_tokens("handbook")
    ref = reference_run(config, data, cfg, first_grads=True)
    split = reference_run(config, data, replace(cfg, grad_accum=2))  # the same batch, summed in 2 halves
    rows: dict[str, dict] = {}

    def add(name: str, run, against=ref, ledger: bool | None = None, **kw) -> None:
        rows[name] = {**worst_diffs(run, against, **kw), "ledger": ledger}

    runs = {}
    for variant in ("naive", "bucketed", "ddp"):
        runs[variant] = run_data_parallel(variant, config, data, cfg, bucket_mb=0.5)
        add(f"dp {variant}", runs[variant], ledger=_ledger_ok(runs[variant]))
    for sp in (False, True):
        run = run_tensor_parallel(config, data, cfg, sequence_parallel=sp)
        add("tp + sp" if sp else "tp", run, ledger=_ledger_ok(run))
    run = run_dtensor_tp(config, data, cfg, init_device_mesh("cpu", (2,)))
    add("tp dtensor (torchtitan plan)", run, ledger=_ledger_ok(run))
    pp_cfg = replace(cfg, grad_accum=MICRO)
    pp_ref = reference_run(config, data, pp_cfg, first_grads=True)
    for engine in ("ours", "torch"):
        for schedule in ("gpipe", "1f1b"):
            run, _ = pipeline_run(config, data, pp_cfg, schedule=schedule, engine=engine)
            add(f"pp {schedule} ({engine})", run, pp_ref, subset=True)
    run = run_zero1(config, data, cfg)
    add("zero-1 (ours)", run, ledger=_ledger_ok(run))
    run = run_fsdp2(config, data, cfg)
    add("fsdp2", run, ledger=all(calls_and_bytes(run.comm)[op] == calls_and_bytes(run.analytic)[op]
                                for op in run.analytic))
    if not skip_deepspeed:
        rows.update(_deepspeed_rows(config, data, cfg, runs["ddp"]))  # main() checked it is installed
    spec = LoRAConfig.for_model(config, rank=8)
    lora_ddp = finetune(apply_peft_lora(fresh_model(config), spec), data, cfg)
    lora_one = finetune(apply_peft_lora(fresh_model(config), spec), data, cfg, ddp=False)
    rows["lora + ddp"] = {**worst_diffs(lora_ddp, lora_one), "ledger": None}  # grads: the adapters
    prompt = get_batch(data.val, 2, 16, 0, 0)[0]
    gen = compare_tp_generation(fresh_model(config), parallelize(fresh_model(config)), prompt, 16)
    return {"rows": rows, "generate": gen, "reference_losses": ref.losses, "lora_targets": list(spec.targets),
            "rounding_floor_param_diff": max_abs_diff(split.params, ref.params)}


def four_ranks(preset: str, cfg: TrainConfig) -> dict:
    """dp x tp x pp on 4 ranks: worst diffs over all ranks, and the ledger against the formula."""
    config, data = get_preset(preset), load_tokens("handbook")
    pp_cfg = replace(cfg, grad_accum=MICRO)
    ref = reference_run(config, data, pp_cfg, first_grads=True)
    rows = {}
    for dp, tp, pp in ((1, 2, 2), (2, 2, 1), (2, 1, 2)):
        pcfg = ParallelConfig(dp=dp, tp=tp, pp=pp, microbatches=MICRO)
        mesh, ledger = build_mesh(pcfg), CommLedger()
        run, _ = three_d_run(config, data, pp_cfg, mesh, ledger=ledger)
        diffs = parity(run, ref, config, mesh)
        comm = comm_by_dim(ledger, mesh)
        expected = expected_comm_per_step(config, pcfg, pp_cfg, mesh.coords)
        ok = torch.tensor([float(all(comm.get(d, {}).get(op, {}).get("bytes", 0) / cfg.steps == want
                                     for d, ops in expected.items() for op, want in ops.items()))])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        rows[f"3d dp{dp} x tp{tp} x pp{pp}"] = {**diffs, "ledger": bool(ok.item())}
    return {"rows": rows}



def markdown(s: dict) -> str:
    m = s["meta"]
    lines = [f"# Every parallel scheme vs one process: {m['preset']}", "",
             f"Command: `{m['command']}`", "",
             f"{m['preset']}, global batch {m['batch']}, {m['steps']} AdamW steps (lr {m['lr']}, clip "
             f"{m['grad_clip']}), fp32, gloo; pipeline and 3D rows: {MICRO} microbatches; "
             f"torch {m['torch']}; "
             f"CPU: {m['cpu']} ({m['cpus']} cores, 1-minute load {m['load_average_1min']:.1f}); "
             f"{m['seconds']:.0f} s.", "",
             "| scheme | ranks | max abs loss diff | first-step grads | params after the steps | "
             "ledger = formula |", "|---|---:|---:|---:|---:|---|"]
    for name, r in s["rows"].items():
        grad = "-" if r["grad"] is None else f"{r['grad']:.1e}"
        grad += " (rel. norm)" if r.get("grad_check") else ""
        ledger = {True: "yes", False: "NO", None: "-"}[r["ledger"]]
        lines.append(f"| {name} | {r['ranks']} | {r['loss']:.1e} | {grad} | {r['param']:.1e} | {ledger} |")
    g = s["generate"]
    lines += ["", f"TP generate (tp=2, 16 new tokens): greedy tokens identical to one process: "
              f"{g['greedy_identical']}; max |logit diff| with the KV cache {g['max_logit_diff']:.1e}; KV "
              f"cache per rank {g['cache_bytes_per_rank']:,} B = formula {g['cache_bytes_formula']:,} B "
              f"({g['heads_per_rank']} kv heads) = "
              f"{g['cache_bytes_per_rank'] / g['cache_bytes_one_process']:.2f} x one process's.", "",
              f"LoRA targets: {', '.join(s['lora_targets'])} (every block; rank 8), against one process "
              "fine-tuning the same adapters (the frozen base stays bitwise equal).", "",
              f"Rounding floor (one process, the same batch summed as 2 micro-batches): max |param diff| "
              f"{s['rounding_floor_param_diff']:.1e} after the same steps.", "",
              "Float rounding only (AdamW's first steps, about lr x sign of the gradient, turn tiny gradient "
              "differences into full steps, so parameters differ more than gradients); the digits differ "
              "on another CPU.", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-mini")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--skip-deepspeed", action="store_true")
    a = p.parse_args(argv)
    if not a.skip_deepspeed and not installed():
        p.error('DeepSpeed is not installed: pip install -e ".[deepspeed]", or pass --skip-deepspeed')
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch, lr=3e-3, warmup_steps=1, grad_clip=1.0,
                      eval_batches=1)
    t0 = time.perf_counter()
    two = spawn(two_ranks, 2, (a.preset, cfg, a.skip_deepspeed), timeout_s=3600)[0]
    four = spawn(four_ranks, 4, (a.preset, cfg), timeout_s=3600)[0]
    rows = {k: {**v, "ranks": 2} for k, v in two["rows"].items()} | \
        {k: {**v, "ranks": 4} for k, v in four["rows"].items()}
    command = " ".join(["python benchmarks/scheme_parity.py", *argv])
    meta = {"command": command, "preset": a.preset, "steps": a.steps, "batch": a.batch, "lr": cfg.lr,
            "grad_clip": cfg.grad_clip, "torch": torch.__version__, "cpu": cpu_model(),
            "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
            "seconds": time.perf_counter() - t0}
    summary = {"meta": meta, "rows": rows, **{k: two[k] for k in (
        "generate", "lora_targets", "reference_losses", "rounding_floor_param_diff")}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"scheme_parity_{a.preset}"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main(sys.argv[1:])
