"""`journey plan`'s time model against measured step times of labs 02-05 on this CPU (gloo).

    python benchmarks/plan_validation_cpu.py                 # 3 rounds, 8 steps per run
    python benchmarks/plan_validation_cpu.py --rounds 3 --steps 8

Each round first calibrates the `cpu-gloo` cluster (journey_dist/calibrate.py: matmul FLOP/s,
memory bandwidth, gloo all-reduce latency and bandwidth, a one-process GPT-mini step's
efficiency), then runs every row: the lab's own parallel code (data/replicas, tensor/parallelize,
pipeline/schedules, compose) trained by the shared loop on gloo ranks, sampling every rank before
the first step and after each (train's on_step). This 2-core machine is shared with other jobs
whose load moves 2-4x within minutes, so every time here, calibration and rows alike, is taken as
on an idle machine with a core per rank: wall time x (seconds the ranks ran on a CPU) / (seconds
they ran + seconds they waited for one), from Linux's per-thread schedstat (calibrate.unloaded);
the raw wall times are kept next to them. Inside each row's job, just before training, rank 0
times the reference step alone (calibrate.reference_rate: the one-process GPT-mini batch-8 step
the efficiency constant comes from), so calibration and run see the same machine. A row's step
time is the median over steps (the first two dropped: warm-up, DDP's bucket rebuild), then the
median over rounds; the cpu-gloo preset is the median over rounds of each session calibration.
The prediction gives every rank its own core (the measurement removed the waits of 4 ranks on 2
cores too), the job's reference rate, and each scheme its own dp calls and overlap (naive, 3D:
one all-reduce per parameter after backward; bucketed, DDP: its buckets during backward).
Writes benchmarks/results/calibration_cpu.{json,md} and plan_validation_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from journey_dist.calibrate import Sample, calibrate, reference_rate, sample, unloaded
from journey_dist.cluster import Link, cluster_toml
from journey_dist.config import ParallelConfig, get_preset
from journey_dist.data import load_tokens
from journey_dist.mesh import build_mesh
from journey_dist.parallel.common import mean_over, sync_dp_grads
from journey_dist.parallel.compose import build_3d_stage, clip_3d
from journey_dist.parallel.data.replicas import make_data_parallel, planned_buckets
from journey_dist.parallel.pipeline.schedules import Pipeline
from journey_dist.parallel.pipeline.stage import build_stage
from journey_dist.parallel.tensor.parallelize import parallelize
from journey_dist.parity import fresh_model
from journey_dist.runtime import launch
from journey_dist.steptime import predict_step
from journey_dist.train import TrainConfig, make_optimizer, train

RESULTS = Path(__file__).resolve().parent / "results"
PRESET = "gpt-mini"
WARMUP_STEPS = 2

# (lab, scheme, layout, global batch, micro-batches per dp rank, extra)
ROWS = [
    ("02", "naive", dict(dp=2), 16, 1, {}),
    ("02", "bucketed", dict(dp=2), 16, 1, {"bucket_mb": 1.0}),
    ("02", "ddp", dict(dp=2), 16, 1, {"bucket_mb": 1.0}),
    ("02", "ddp", dict(dp=2), 32, 2, {"bucket_mb": 1.0}),
    ("03", "tp", dict(tp=2), 8, 1, {}),
    ("03", "tp", dict(tp=2), 16, 1, {}),
    ("03", "tp+sp", dict(tp=2, sequence_parallel=True), 8, 1, {}),
    ("04", "pp 1f1b", dict(pp=2), 8, 4, {"schedule": "1f1b"}),
    ("04", "pp gpipe", dict(pp=2), 16, 4, {"schedule": "gpipe"}),
    ("05", "3d", dict(dp=2, pp=2), 16, 4, {}),
    ("05", "3d", dict(tp=2, pp=2), 16, 4, {}),
]


def _pcfg(layout: dict, m: int, extra: dict) -> ParallelConfig:
    return ParallelConfig(microbatches=m, schedule=extra.get("schedule", "1f1b"), **layout)


def _build(scheme: str, pcfg: ParallelConfig, config, cfg: TrainConfig, extra: dict):
    """(module, hooks, dp calls per step) exactly as the lab's package code builds them."""
    model = fresh_model(config)
    if scheme in ("naive", "bucketed", "ddp"):
        dp = make_data_parallel(scheme, model, extra.get("bucket_mb", 25.0))
        calls = (len(list(model.parameters())) if scheme == "naive"
                 else len(planned_buckets(model, extra["bucket_mb"])))
        return dp.module, dp.hooks(), calls
    if scheme.startswith("tp"):
        tp_model = parallelize(model, sequence_parallel=pcfg.sequence_parallel)
        return tp_model, tp_model.hooks(), None
    if scheme.startswith("pp"):
        pipe = Pipeline(build_stage(model), None, pcfg.schedule)
        return pipe.stage, pipe.hooks(), None
    mesh = build_mesh(pcfg)
    stage = build_3d_stage(model, mesh)
    pipe = Pipeline(stage, mesh.pp_group, pcfg.schedule)
    hooks = pipe.hooks().with_(sync_grads=lambda: sync_dp_grads(stage, mesh.dp_group),
                               reduce_loss=mean_over(mesh.dp_group), dp_rank=mesh.dp_rank, dp_size=pcfg.dp,
                               clip=clip_3d(pipe, mesh))
    return stage, hooks, len(list(stage.parameters()))


def rank_main(row: tuple, steps: int, bandwidth: float) -> dict:
    """On every rank: the reference step's rate (rank 0 alone, calibrate.reference_rate), then
    train the row's scheme for `steps` steps; a Sample (wall, on-CPU and waiting-for-a-CPU
    seconds) before the first step and after each."""
    _, scheme, layout, batch, m, extra = row
    config = get_preset(PRESET)
    pcfg = _pcfg(layout, m, extra)
    cfg = TrainConfig(steps=steps, batch_size=batch, grad_accum=m, lr=1e-3, warmup_steps=1, log_every=10**6,
                      eval_batches=1)
    rate = reference_rate(bandwidth)
    module, hooks, calls = _build(scheme, pcfg, config, cfg, extra)
    samples: list[Sample] = []

    def stamp(*_) -> None:
        samples.append(sample())

    dist.barrier()
    samples.append(sample())
    train(module, load_tokens("handbook"), cfg, hooks, optimizer=make_optimizer(module, cfg), verbose=False,
          on_step=stamp, block_size=config.block_size)
    return {"samples": samples, "dp_calls": calls, "reference_rate": rate}


def measure(row: tuple, steps: int, bandwidth: float) -> dict:
    """Per step: the slowest rank's wall time, and that time as on an idle machine (every rank's
    waits for a CPU removed: calibrate.unloaded); medians over the steps after warm-up."""
    world = _pcfg(row[2], row[4], row[5]).world_size
    out = launch(rank_main, world, row, steps, bandwidth)
    ends = [[r["samples"][i] for r in out] for i in range(steps + 1)]
    wall = [max(e.wall - s.wall for s, e in zip(ends[i], ends[i + 1])) for i in range(steps)]
    idle = [unloaded(ends[i], ends[i + 1]) for i in range(steps)]
    return {"step_s": statistics.median(idle[WARMUP_STEPS:]),
            "wall_s": statistics.median(wall[WARMUP_STEPS:]),
            "steps_unloaded": idle, "steps_wall": wall, "dp_calls": out[0]["dp_calls"],
            "reference_rate": out[0]["reference_rate"]}


def _row_cluster(session, got: dict):
    """The session's cluster, a core per rank (the measurement removed every wait for a CPU), at
    the rate the reference step reached inside the row's own job just before it trained."""
    return replace(session, shared_cores=None,
                   compute_efficiency=min(1.0, got["reference_rate"] / session.peak_flops))


def predict(row: tuple, cluster, dp_calls: int | None):
    _, scheme, layout, batch, m, extra = row
    pcfg = _pcfg(layout, m, extra)
    overlap = scheme in ("bucketed", "ddp")  # they all-reduce buckets while backward runs
    return predict_step(get_preset(PRESET), pcfg, cluster, batch=batch, dtype="fp32", overlap=overlap,
                        dp_calls=dp_calls)


def _median_cluster(calibrations: list[tuple]) -> tuple:
    """The median over rounds of every calibrated number, as a cluster and a record."""
    def med(key):
        return statistics.median(key(m) for _, m in calibrations)

    link = Link("gloo loopback", med(lambda m: m["allreduce"]["bandwidth"]),
                med(lambda m: m["allreduce"]["latency"]))
    cluster = replace(calibrations[0][0], peak_flops=med(lambda m: m["matmul_flops"]),
                      memory_bandwidth=med(lambda m: m["memory_bandwidth"]), intra=link, inter=link,
                      compute_efficiency=med(lambda m: m["step"]["efficiency"]))
    return cluster, [m for _, m in calibrations]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10, help="timings per calibration measurement")
    args = p.parse_args()
    load_before = os.getloadavg()
    calibrations: list[tuple] = []
    runs: dict[int, list[dict]] = {i: [] for i in range(len(ROWS))}
    t0 = time.time()
    for r in range(args.rounds):
        calibrations.append(calibrate(repeats=args.repeats))
        session = calibrations[-1][0]
        print(f"round {r}: efficiency {session.compute_efficiency:.3f}", flush=True)
        for i, row in enumerate(ROWS):
            got = measure(row, args.steps, session.memory_bandwidth)
            got["predicted_s"] = predict(row, _row_cluster(session, got), got["dp_calls"]).step_s
            runs[i].append(got)
            print(f"  {row[0]} {row[1]} {row[2]} batch {row[3]}: {got['step_s'] * 1e3:.1f} ms unloaded "
                  f"({got['wall_s'] * 1e3:.1f} ms wall), predicted {got['predicted_s'] * 1e3:.1f} ms",
                  flush=True)
    cluster, rounds = _median_cluster(calibrations)
    rows = []
    for i, row in enumerate(ROWS):
        measured = statistics.median(g["step_s"] for g in runs[i])
        predicted = statistics.median(g["predicted_s"] for g in runs[i])
        preset = predict(row, replace(cluster, shared_cores=None), runs[i][0]["dp_calls"])
        rows.append({"lab": row[0], "scheme": row[1], "layout": row[2], "batch": row[3],
                     "microbatches": row[4],
                     "extra": row[5], "ranks": _pcfg(row[2], row[4], row[5]).world_size,
                     "measured_s": measured, "wall_s": statistics.median(g["wall_s"] for g in runs[i]),
                     "predicted_s": predicted, "error": predicted / measured - 1,
                     "preset_s": preset.step_s, "preset_error": preset.step_s / measured - 1,
                     "dp_calls": runs[i][0]["dp_calls"], "rounds": [
                         {k: v for k, v in g.items() if k != "dp_calls"} for g in runs[i]],
                     "terms": {t.name: t.seconds for t in preset.terms}})
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "python": platform.python_version(),
               "load_before": load_before, "load_after": os.getloadavg(), "wall_s": time.time() - t0}
    command = "python benchmarks/plan_validation_cpu.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    calib = {"command": command.strip(), "machine": machine, "cluster": cluster.to_dict(), "rounds": rounds,
             "toml": cluster_toml(cluster, "cpu-gloo")}
    (RESULTS / "calibration_cpu.json").write_text(json.dumps(calib, indent=1) + "\n")
    (RESULTS / "calibration_cpu.md").write_text(_calibration_md(calib))
    result = {"command": command.strip(), "machine": machine, "cluster": cluster.to_dict(), "rows": rows}
    (RESULTS / "plan_validation_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "plan_validation_cpu.md").write_text(_validation_md(result))
    print(_validation_md(result))


def _calibration_md(c: dict) -> str:
    cl, m = c["cluster"], c["machine"]
    lines = ["# cpu-gloo calibration", "",
             f"Command: `{c['command']}` (the same session as "
             "[plan_validation_cpu.md](plan_validation_cpu.md)); "
             f"torch {m['torch']}, {m['cores']} cores, load average {m['load_before'][0]:.1f} before and "
             f"{m['load_after'][0]:.1f} after (other jobs shared the machine). Every timing is as on an idle "
             "machine: wall x on-CPU / (on-CPU + waiting for a CPU), Linux schedstat "
             "(journey_dist/calibrate.py). "
             "Medians over rounds:", "",
             "| quantity | value | how |", "|---|---|---|",
             f"| matmul, 1 thread fp32 | {cl['peak_flops'] / 1e9:.2f} GFLOP/s | 1024^3 matmul |",
             f"| memory bandwidth | {cl['memory_bandwidth'] / 1e9:.2f} GB/s | in-place multiply, read + "
             "write |",
             f"| gloo all-reduce latency | {cl['intra']['latency'] * 1e6:.1f} us per ring step | 2 ranks, "
             "4 KiB..16 MiB, least squares |",
             f"| gloo all-reduce bandwidth | {cl['intra']['bandwidth'] / 1e9:.3f} GB/s | same fit |",
             f"| step efficiency | {cl['compute_efficiency']:.3f} | one-process GPT-mini step (batch 8): "
             "FLOPs / (time - optimizer) / matmul rate |",
             f"| cores | {cl['shared_cores']:.0f} | os.cpu_count(): ranks share them |", "",
             "Per round (matmul, efficiency, latency, bandwidth): " + "; ".join(
                 f"{r['matmul_flops'] / 1e9:.1f} GFLOP/s, {r['step']['efficiency']:.3f}, "
                 f"{r['allreduce']['latency'] * 1e6:.0f} us, {r['allreduce']['bandwidth'] / 1e9:.2f} GB/s"
                 for r in c["rounds"]),
             "", "As a cluster file (`journey plan --cluster cpu-gloo.toml`):", "", "```toml",
             c["toml"].rstrip(), "```", ""]
    return "\n".join(lines)


def _validation_md(r: dict) -> str:
    m = r["machine"]
    worst = max(abs(x["error"]) for x in r["rows"])
    worst_preset = max(abs(x["preset_error"]) for x in r["rows"])
    lines = ["# Step time: predicted (journey plan's time model) vs measured, CPU gloo", "",
             f"Command: `{r['command']}`; torch {m['torch']}, {m['cores']} cores shared with other jobs: "
             f"load average {m['load_before'][0]:.1f} before, {m['load_after'][0]:.1f} after; "
             f"{m['wall_s'] / 60:.0f} "
             "min. GPT-mini (fp32 AdamW, grad clip 1.0) trained by the labs' own parallel code.", "",
             "Measured: the slowest rank's step, as on an idle machine with a core per rank (wall x on-CPU / "
             "(on-CPU + waiting for a CPU), summed over the ranks' threads; the raw wall medians are in the "
             "`wall ms` column), median over steps and rounds. Predicted: `steptime.predict_step` with the "
             "session's gloo and memory numbers ([calibration_cpu.md](calibration_cpu.md)), a core per rank, "
             "and the compute rate of the reference step (a one-process GPT-mini batch-8 step, never the "
             "row's own workload) measured inside the row's job just before it trained, so both see the same "
             "machine; median over rounds. "
             f"Worst |error| {worst:.1%}. The `preset` column predicts with the session's median calibration "
             f"(the committed cpu-gloo preset) instead: worst {worst_preset:.1%}, the drift of a shared "
             "machine between a calibration and a run minutes later.", "",
             "| lab | scheme | layout | ranks | batch | m | measured ms | predicted ms | error "
             "| largest terms (ms) "
             "| preset ms | wall ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        layout = " ".join(f"{k}={v}" for k, v in x["layout"].items())
        top = sorted(x["terms"].items(), key=lambda kv: -kv[1])[:3]
        terms = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in top)
        lines.append(f"| {x['lab']} | {x['scheme']} | {layout} | {x['ranks']} | {x['batch']} | "
                     f"{x['microbatches']} | {x['measured_s'] * 1e3:.1f} | {x['predicted_s'] * 1e3:.1f} | "
                     f"{x['error']:+.1%} | {terms} | {x['preset_s'] * 1e3:.1f} ({x['preset_error']:+.0%}) | "
                     f"{x['wall_s'] * 1e3:.0f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
