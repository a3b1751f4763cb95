"""Training throughput and MFU: our GPT against Hugging Face GPT2LMHeadModel (SDPA), same run.

    # GPU (the issue's target config): gpt2-small, S=1024, batch 16, bf16 autocast, fused AdamW
    python benchmarks/throughput.py --preset gpt2-small --batch 16 --seq 1024 --dtype bf16
    # CPU (the committed CPU result): gpt-mini
    python benchmarks/throughput.py --preset gpt-mini --batch 16 --seq 128 --dtype fp32 \
        --modes eager compile --steps 10 --rounds 3

Both models get identical configs and weights, the same optimizer (AdamW, fused on CUDA),
the same batches and the same autocast; the rounds interleave ours and HF so drift in machine
speed hits both. Reports tokens/s (median of rounds), MFU = tokens/s x flops/token / peak with
flops/token = 6N + 12 L d S (N = parameters without position embeddings), the peak being a
measured matmul peak and (on H100) the 989 TFLOP/s bf16 datasheet figure, peak allocated
memory on CUDA, and the ours/HF ratio per mode. Writes benchmarks/results/throughput_<device>.*.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from journey_dist.config import get_preset
from journey_dist.model import GPT, hf_config_from
from journey_dist.train import TrainConfig, autocast_context, make_optimizer

DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best of several timed square matmuls: the practical peak this device reaches."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(10):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(5 if device.type == "cuda" else 1):
            a @ b
        _sync(device)
        reps = 5 if device.type == "cuda" else 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(impl: str, cfg, device: torch.device, compile_: bool):
    torch.manual_seed(0)
    ours = GPT(cfg)
    if impl == "ours":
        model = ours
        step_loss = lambda m, x, y: m(x, y)[1]  # noqa: E731
    else:
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel(hf_config_from(cfg, attn_implementation="sdpa"))
        model.load_state_dict({k: v for k, v in ours.to_hf_state_dict().items()}, strict=False)
        step_loss = lambda m, x, y: m(input_ids=x, labels=y).loss  # noqa: E731  (HF shifts labels)
    model.to(device).train()
    opt = make_optimizer(model if impl == "hf" else ours, TrainConfig(lr=1e-4))
    fwd = torch.compile(model) if compile_ else model
    return model, fwd, opt, step_loss


def run_steps(fwd, opt, step_loss, batches, device, dtype: str | None) -> None:
    for x, y in batches:
        with autocast_context(device, dtype):
            loss = step_loss(fwd, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--modes", nargs="+", choices=["eager", "compile"], default=["eager", "compile"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = get_preset(args.preset, block_size=max(args.seq, get_preset(args.preset).block_size))
    autocast = "bf16" if args.dtype == "bf16" else None
    g = torch.Generator().manual_seed(0)
    batches = [
        tuple(t.to(device) for t in torch.randint(0, cfg.vocab_size, (2, args.batch, args.seq), generator=g))
        for _ in range(4)
    ]
    with torch.device("meta"):
        n_params = GPT(cfg).num_params(non_embedding=True)
    flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * args.seq
    peak_dtype = torch.bfloat16 if (device.type == "cuda" and autocast) else torch.float32
    peak = measured_matmul_tflops(device, peak_dtype)
    gpu_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    datasheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in gpu_name), None)

    # Same weights, same function: check logits agree before timing anything.
    (_, ours_fwd, _, _), (_, hf_fwd, _, _) = (build(i, cfg, device, False) for i in ("ours", "hf"))
    with torch.no_grad():
        x0 = batches[0][0][:2]
        logits_diff = (ours_fwd(x0)[0].float() - hf_fwd(input_ids=x0).logits.float()).abs().max().item()
    del ours_fwd, hf_fwd

    results = []
    for mode in args.modes:
        runs = {impl: build(impl, cfg, device, mode == "compile") for impl in ("ours", "hf")}
        rates: dict[str, list[float]] = {"ours": [], "hf": []}
        mem: dict[str, int | None] = {}
        for _, fwd, opt, step_loss in runs.values():  # warm-up (and compile)
            run_steps(fwd, opt, step_loss, batches[: 1] * args.warmup, device, autocast)
        for _ in range(args.rounds):
            for impl, (_, fwd, opt, step_loss) in runs.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                _sync(device)
                t0 = time.perf_counter()
                run_steps(fwd, opt, step_loss, (batches * args.steps)[: args.steps], device, autocast)
                _sync(device)
                rates[impl].append(args.batch * args.seq * args.steps / (time.perf_counter() - t0))
                mem[impl] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        for impl in ("ours", "hf"):
            tps = statistics.median(rates[impl])
            results.append({
                "impl": impl, "mode": mode, "tokens_per_s": tps, "rounds": rates[impl],
                "mfu_measured_peak": tps * flops_per_token / (peak * 1e12),
                "mfu_datasheet": tps * flops_per_token / (datasheet * 1e12) if datasheet else None,
                "peak_allocated_bytes": mem[impl],
            })
        del runs

    ratios = {mode: _rate(results, "ours", mode) / _rate(results, "hf", mode) for mode in args.modes}
    report = {
        "command": "python " + " ".join(sys.argv),
        "device": str(device), "device_name": gpu_name, "torch": torch.__version__,
        "preset": args.preset, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
        "params_non_embedding": n_params, "logits_max_abs_diff_ours_vs_hf": logits_diff,
        "flops_per_token": flops_per_token,
        "measured_peak_tflops": peak, "datasheet_peak_tflops": datasheet,
        "results": results, "ratio_ours_over_hf": ratios,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"throughput_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def _rate(results: list[dict], impl: str, mode: str) -> float:
    return next(r["tokens_per_s"] for r in results if r["impl"] == impl and r["mode"] == mode)


def markdown(r: dict) -> str:
    lines = [
        f"# Training throughput: ours vs HF GPT2LMHeadModel ({r['device_name']})", "",
        f"Command: `{r['command']}`", "",
        f"{r['preset']}, batch {r['batch']} x seq {r['seq']}, {r['dtype']}, torch {r['torch']}; "
        f"flops/token = 6N + 12LdS = {r['flops_per_token']:,}; measured matmul peak "
        f"{r['measured_peak_tflops']:.1f} TFLOP/s" + (
            f", datasheet {r['datasheet_peak_tflops']:.0f} TFLOP/s" if r["datasheet_peak_tflops"] else "")
        + f"; same weights, logits max |ours - HF| = {r['logits_max_abs_diff_ours_vs_hf']:.1e}", "",
        "| model | mode | tokens/s | MFU (measured peak) | MFU (datasheet) | peak allocated |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for x in r["results"]:
        ds = f"{x['mfu_datasheet']:.1%}" if x["mfu_datasheet"] is not None else "n/a"
        mem = f"{x['peak_allocated_bytes'] / 2**30:.2f} GiB" if x["peak_allocated_bytes"] else "n/a (CPU)"
        lines.append(f"| {x['impl']} | {x['mode']} | {x['tokens_per_s']:,.0f} | "
                     f"{x['mfu_measured_peak']:.1%} | {ds} | {mem} |")
    lines += ["", "ours / HF: " + ", ".join(f"{m} {v:.2f}x" for m, v in r["ratio_ours_over_hf"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
