"""`journey plan`'s time model against published throughput of large dense training runs.

    python benchmarks/plan_published.py

Each row is a run whose model, GPUs, layout and batch were published, predicted with the
cluster presets as they stand (journey_dist/cluster.py: one set of efficiency constants per GPU
type, chosen before this comparison and not fitted to it). Compared: the published per-GPU
rate in the unit the source uses (Megatron-LM 2021 counts recompute in its FLOPs: our HFU; Llama 3
and torchtitan report model FLOPs: our MFU). What the model leaves out, per row, is in `note`.
Writes benchmarks/results/plan_published.{json,md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from journey_dist.cluster import get_cluster
from journey_dist.config import GPTConfig, ParallelConfig, get_preset
from journey_dist.steptime import predict_step

RESULTS = Path(__file__).resolve().parent / "results"

MEGATRON_2021 = "Narayanan et al. 2021, arXiv:2104.04473, abstract and Table 1"
LLAMA3 = "Llama 3 Herd of Models, arXiv:2407.21783, Table 4"
TORCHTITAN = "torchtitan docs/performance.md (Llama 3 on 64 A100 80GB, FSDP2)"

# name, source, model, gpu, layout, global batch (sequences), seq, micro-batch, recompute, dtype,
# published value, its unit ("hfu_tflops": FLOP/s per GPU counting recompute, "mfu": model FLOPs
# utilization, "tokens_per_gpu": tokens/s per GPU), note
ROWS = [
    ("GPT 1T (Megatron-LM)", MEGATRON_2021,
     GPTConfig(n_layer=128, n_head=160, n_embd=25600, vocab_size=51200, block_size=2048),
     "a100", dict(dp=6, tp=8, pp=64), 3072, 2048, 1, "full", "fp16-mixed", 163e12, "hfu_tflops",
     "502 PFLOP/s on 3072 GPUs (52% of peak); micro-batch size not published (1 assumed); "
     "Megatron also overlaps the pipeline's sends"),
    ("Llama 3 8B (torchtitan)", TORCHTITAN, get_preset("llama3-8b"), "a100", dict(dp=64, zero=3), 64, 8192,
     1, "selective", "bf16-mixed", 2973, "tokens_per_gpu", "selective op AC; MFU 58.2% as published"),
    ("Llama 3 70B (torchtitan)", TORCHTITAN, get_preset("llama3-70b"), "a100", dict(dp=64, zero=3), 64,
     8192, 1, "full", "bf16-mixed", 331, "tokens_per_gpu", "full AC; MFU 51.7% as published"),
    ("Llama 3 405B, 8K GPUs", LLAMA3, get_preset("llama3-405b"), "h100", dict(dp=64, tp=8, pp=16), 2048,
     8192, 1, "none", "bf16-mixed", 430e12, "mfu_tflops",
     "published 43% BF16 MFU; Meta ran an interleaved 1F1B (virtual stages not published): predicted "
     "here with plain 1F1B, whose bubble interleaving divides by the number of virtual stages"),
    ("Llama 3 405B, 16K GPUs", LLAMA3, get_preset("llama3-405b"), "h100", dict(dp=128, tp=8, pp=16), 2048,
     8192, 1, "none", "bf16-mixed", 400e12, "mfu_tflops",
     "published 41% BF16 MFU; as above, and half the micro-batches"),
]
SKIPPED = [("Llama 3 405B, 16K GPUs, 131K context (CP 16)", LLAMA3,
            "context parallel's collectives are not in the time model yet (issue 19)")]


def predict(row: tuple) -> dict:
    name, source, cfg, gpu, layout, batch, seq, micro, recompute, dtype, published, unit, note = row
    dp = layout["dp"]
    pcfg = ParallelConfig(microbatches=batch // (dp * micro), **layout)
    cluster = get_cluster(gpu)
    st = predict_step(cfg, pcfg, cluster, batch=batch, seq=seq, dtype=dtype, recompute=recompute)
    value = {"hfu_tflops": st.hfu * cluster.peak_flops, "mfu_tflops": st.mfu * cluster.peak_flops,
             "tokens_per_gpu": st.tokens_per_s / st.world}[unit]
    return {"name": name, "source": source, "gpu": cluster.gpu, "gpus": pcfg.world_size,
            "layout": {k: getattr(pcfg, k) for k in ("dp", "tp", "pp", "microbatches", "zero")},
            "batch": batch, "seq": seq, "recompute": recompute, "dtype": dtype, "unit": unit,
            "published": published, "predicted": value, "ratio": value / published, "mfu": st.mfu,
            "hfu": st.hfu, "step_s": st.step_s, "terms": {t.name: t.seconds for t in st.terms},
            "compute_efficiency": cluster.compute_efficiency, "note": note}


def markdown(rows: list[dict], command: str) -> str:
    units = {"hfu_tflops": ("TFLOP/s/GPU (recompute counted)", 1e12),
             "mfu_tflops": ("TFLOP/s/GPU (model FLOPs)", 1e12), "tokens_per_gpu": ("tokens/s/GPU", 1)}
    lines = ["# Predicted vs published throughput of large dense training runs", "",
             f"Command: `{command}`. Efficiency constants (cluster.py, fixed before this comparison): "
             "compute_efficiency 0.60 (A100), 0.55 (H100); comm_efficiency 0.80; links from the spec sheets "
             "(notes/interconnects.md). Nothing below is fitted.", "",
             "| run | GPUs | layout | recompute | published | predicted | predicted / published | "
             "bubble | exposed comm | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label, scale = units[r["unit"]]
        lay = r["layout"]
        layout = f"dp{lay['dp']} tp{lay['tp']} pp{lay['pp']} m{lay['microbatches']}" + (
            f" zero{lay['zero']}" if lay["zero"] else "")
        bubble = sum(v for k, v in r["terms"].items() if k.startswith("pipeline bubble")) / r["step_s"]
        comm = sum(v for k, v in r["terms"].items() if k.split(" ")[0] in ("tp", "pp", "dp")) / r["step_s"]
        lines.append(f"| {r['name']} | {r['gpus']:,} x {r['gpu']} | {layout} | {r['recompute']} | "
                     f"{r['published'] / scale:,.0f} {label} | {r['predicted'] / scale:,.0f} | "
                     f"{r['ratio']:.2f} | "
                     f"{bubble:.1%} | {comm:.1%} | {r['note']} |")
    lines += ["", "Not compared: " + "; ".join(f"{n} ({why})" for n, _, why in SKIPPED) + ".", "",
              "Sources: " + "; ".join(sorted({r["source"] for r in rows})) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    rows = [predict(r) for r in ROWS]
    command = "python benchmarks/plan_published.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    record = {"command": command.strip(), "rows": rows}
    (RESULTS / "plan_published.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "plan_published.md").write_text(markdown(rows, command.strip()))
    print(markdown(rows, command.strip()))


if __name__ == "__main__":
    main()
