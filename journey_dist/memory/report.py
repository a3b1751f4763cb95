"""Measured next to estimated: one table row per component, the error in percent, a bar chart.

Components are each category's own high-water mark (params, grads, optimizer state,
activations, logits); "temporaries" is the scratch alive at the peak; "total" is the peak of
the whole step, which is less than the sum of the rows because activations and gradients
never peak together.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import psutil
import torch

from journey_dist.config import ConfigError, GPTConfig, get_preset, padded_vocab_size
from journey_dist.memory.activations import activation_bytes_per_layer
from journey_dist.memory.estimate import DTYPES, MemoryEstimate, estimate_memory, fmt_bytes, param_count
from journey_dist.memory.measure import MEASURABLE, Measurement, measure_config
from journey_dist.memory.sizes import active_param_count, expert_param_count
from journey_dist.model import GPT
from journey_dist.recompute import RECOMPUTE_MODES, recompute_costs
from journey_dist.runtime import runs_dir, save_figure, save_json

COMPONENTS = ("params", "grads", "optimizer", "activations", "logits", "temporaries", "total")


def compare(est: MemoryEstimate, meas: Measurement | None = None) -> list[dict]:
    """Rows {component, estimated, measured, error_pct, formula}; measured None where not measured."""
    formulas = {name: formula for name, _, formula in est.rows()}
    rows = []
    for name in COMPONENTS:
        e = est.total if name == "total" else getattr(est, name)
        m = _measured(meas, name)
        err = _error_pct(e, m)
        rows.append({"component": name, "estimated": e, "measured": m, "error_pct": err,
                     "formula": formulas.get(name, "")})
    return rows


def _error_pct(estimated: float, measured: float | None) -> float | None:
    if measured is None or measured == 0:
        return 0.0 if measured == 0 and estimated == 0 else None
    return 100.0 * (estimated - measured) / measured


def _measured(meas: Measurement | None, name: str) -> float | None:
    if meas is None:
        return None
    if name == "total":
        return meas.peak
    if not meas.high_water:  # allocator only: no categories
        return None
    if name == "temporaries":
        return meas.at_peak.get("temporaries")
    return meas.high_water.get(name)


def table(rows: list[dict], markdown: bool = False) -> str:
    """A text (or Markdown) table of compare() rows."""
    head = ["component", "estimated", "measured", "error"]
    body = [[r["component"], fmt_bytes(r["estimated"]),
             "-" if r["measured"] is None else fmt_bytes(r["measured"]),
             "-" if r["error_pct"] is None else f"{r['error_pct']:+.2f}%"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head)] + [fmt.format(*row) for row in body])


def plot(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Grouped bars (MiB): estimated next to measured for every component."""
    import matplotlib  # deferred: matplotlib's import takes ~1 s and only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["component"] for r in rows]
    est = [r["estimated"] / 2**20 for r in rows]
    meas = [(r["measured"] or 0) / 2**20 for r in rows]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([i - 0.2 for i in xs], est, width=0.4, label="estimated")
    ax.bar([i + 0.2 for i in xs], meas, width=0.4, label="measured")
    for i, r in enumerate(rows):
        if r["error_pct"] is not None:
            err = r["error_pct"] if abs(r["error_pct"]) >= 0.05 else 0.0
            ax.annotate(f"{err:+.1f}%", (i, max(est[i], meas[i])), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def phases_table(est: MemoryEstimate) -> str:
    """The modelled moments of the step and their totals; the peak is marked."""
    lines = []
    for name, cats in est.phases.items():
        mark = "  <- peak" if name == est.peak_phase else ""
        lines.append(f"  {fmt_bytes(sum(cats.values())):>12}  {name}{mark}")
    return "\n".join(lines)



def terms_table(est: MemoryEstimate) -> str:
    """Every term of the estimate under its group (model states, per layer, ...): bytes, what the
    tensor is, its formula."""
    parts = []
    for group, terms in est.terms.items():
        parts.append("\n".join([f"{group}:"] + [f"  {fmt_bytes(t.nbytes):>12}  {t.name:<58} {t.formula}"
                                                for t in terms]))
    return "\n\n".join(parts)


def per_layer_vs_paper(est: MemoryEstimate) -> str:
    """The activation bytes one layer keeps in this estimate next to Korthikanti et al.'s count
    (memory.activations.activation_bytes_per_layer, no dropout) for the same micro-batch, sequence,
    width, heads, tp and attention; notes/memory.md explains the gap."""
    i, c = est.inputs, est.inputs["config"]
    mine = sum(t.nbytes for t in est.terms["per layer"])
    paper = activation_bytes_per_layer(i["seq_len"], i["micro_batch"], c["n_embd"], c["n_head"], tp=i["tp"],
                                       sequence_parallel=i["sequence_parallel"], dropout=False,
                                       fused_attention=i["attn"] == "sdpa",
                                       bytes_per_value=4 if i["dtype"] == "fp32" else 2)
    return (f"per layer: PyTorch keeps {fmt_bytes(mine)}; Korthikanti et al.'s count (16 values per token "
            f"and channel, no dropout) is {fmt_bytes(paper)}")


def measurement_text(meas: Measurement) -> str:
    """How a step was measured: the instrument, CUDA's allocator extras, the process RSS."""
    lines = [f"measured with: {meas.instrument}"]
    if meas.cuda:
        lines.append(f"CUDA max reserved {fmt_bytes(meas.cuda['max_reserved'])}; allocated outside tensors "
                     f"(cuBLAS workspaces) {fmt_bytes(meas.cuda['workspace'])}")
    lines.append(f"process RSS {fmt_bytes(meas.rss['rss'])} (the OS view: interpreter, libraries, allocator "
                 "caches)")
    return "\n".join(lines)


def peak_text(est: MemoryEstimate, meas: Measurement) -> str:
    """phases_table under a title, then what the measurement held at its peak, by category."""
    held = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in meas.at_peak.items() if v)
    return (f"modelled moments of the step (the largest is the peak):\n{phases_table(est)}\n"
            f"measured at the peak: {held}")


def seq_sweep(cfg: GPTConfig, seqs: Sequence[int], *, batch_size: int, dtype: str,
              device: torch.device) -> list[dict]:
    """Activations measured and estimated at each sequence length with SDPA and eager attention
    (linear vs quadratic in s), and the error of the estimated peak, one measured step each."""
    rows = []
    for s in seqs:
        for attn in ("sdpa", "eager"):
            c = cfg.with_(attn_impl=attn)
            e = estimate_memory(c, batch_size=batch_size, seq_len=s, dtype=dtype, device=device.type)
            m = measure_config(c, batch_size=batch_size, seq_len=s, dtype=dtype, device=device, ledger=True)
            rows.append({"seq": s, "attn": attn, "activations_measured": m.high_water["activations"],
                         "activations_estimated": e.activations,
                         "peak_error_pct": 100 * (e.total - m.peak) / m.peak})
    return rows


def sweep_table(rows: list[dict]) -> str:
    """seq_sweep rows as text."""
    lines = ["seq   attn   activations measured   estimated   peak error"]
    lines += [f"{r['seq']:<5} {r['attn']:<6} {fmt_bytes(r['activations_measured']):>20} "
              f"{fmt_bytes(r['activations_estimated']):>11} {r['peak_error_pct']:+10.2f}%" for r in rows]
    return "\n".join(lines)


def layout_plans(cfg: GPTConfig, layouts: Sequence[dict], *, batch_size: int, seq_len: int,
                 dtype: str) -> list[dict]:
    """The estimate per rank under each layout (estimate_memory keyword arguments: dp, zero, tp,
    pp, recompute, ...): total, activations, model states and the moment of the peak."""
    plans = []
    for layout in layouts:
        e = estimate_memory(cfg, batch_size=batch_size, seq_len=seq_len, dtype=dtype, **layout)
        name = ", ".join(f"{k}={v}" for k, v in layout.items()) or "one GPU"
        plans.append({"layout": name, "total": e.total,
                      "activations": e.activations, "model_states": e.params + e.grads + e.optimizer,
                      "peak_phase": e.peak_phase})
    return plans


def plans_table(plans: list[dict]) -> str:
    """layout_plans rows as text."""
    return "\n".join(f"  {p['layout']:<30} {fmt_bytes(p['total']):>12}  (model states "
                     f"{fmt_bytes(p['model_states'])}, activations {fmt_bytes(p['activations'])}, peak at "
                     f"{p['peak_phase']})" for p in plans)

def recompute_rows(cfg: GPTConfig, *, batch_size: int, seq_len: int, dtype: str, device: torch.device,
                   rounds: int = 3) -> dict[str, dict]:
    """Each recompute mode (recompute.RECOMPUTE_MODES) on one measured step: peak and activations
    measured next to the estimate (the per-op policy is measured only), and the work it redoes
    (recompute.recompute_costs: extra backward matmul FLOPs and seconds, on an fp32 copy)."""
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device)
    costs = recompute_costs(GPT(cfg).to(device), x, torch.roll(x, -1, 1), rounds=rounds)
    rows = {}
    for mode in RECOMPUTE_MODES:
        kw = dict(batch_size=batch_size, seq_len=seq_len, dtype=dtype, recompute=mode)
        m = measure_config(cfg, device=device, ledger=True, **kw)
        e = None if mode == "ops" else estimate_memory(cfg, device=device.type, **kw)
        rows[mode] = {"peak_measured": m.peak, "peak_estimated": None if e is None else e.total,
                      "activations_measured": m.high_water.get("activations"),
                      "activations_estimated": None if e is None else e.activations,
                      "states_exact": None if e is None or not m.high_water else all(
                          m.high_water[k] == getattr(e, k) for k in ("params", "grads", "optimizer")),
                      **costs[mode]}
    return rows


def recompute_table(rows: dict[str, dict]) -> str:
    """recompute_rows as text, then selective's redone work as a fraction of full's."""
    lines = [f"{'recompute':<10} {'peak measured':>14} {'estimated':>11} {'error':>7} {'activations':>12} "
             f"{'extra GFLOP':>12} {'extra s':>8}"]
    for mode, r in rows.items():
        est = r["peak_estimated"]
        err = "-" if est is None else f"{100 * (est - r['peak_measured']) / r['peak_measured']:+.2f}%"
        shown = "-" if est is None else fmt_bytes(est)
        lines.append(f"{mode:<10} {fmt_bytes(r['peak_measured']):>14} {shown:>11} {err:>7} "
                     f"{fmt_bytes(r['activations_measured'] or 0):>12} {r['extra_flops'] / 1e9:>12.3f} "
                     f"{r['extra_s']:>+8.3f}")
    sel, full = rows["selective"], rows["full"]
    lines.append(f"selective redoes {sel['extra_flops'] / full['extra_flops']:.2f} of full's extra matmul "
                 f"FLOPs ({sel['extra_s'] / full['extra_s']:.2f} of its extra seconds, least of a few steps)")
    return "\n".join(lines)

# ---------------------------------------------------------------------- `journey estimate`

_FLOP_LIMIT = {"cpu": 2e11, "cuda": 1e16}  # auto-measure only what finishes in seconds


def add_estimate_arguments(p) -> None:
    p.add_argument("--preset", default="gpt-mini")
    p.add_argument("--batch", type=int, default=8, help="global batch in sequences (split over dp)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: block_size)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES,
                   help="bf16 = pure bf16; bf16-mixed = 16-bit model + fp32 master weights "
                        "(ZeRO paper/DeepSpeed, 16 B/param with AdamW); bf16-megatron = the same with "
                        "fp32 main grads (18 B); bf16-autocast = torch.autocast over fp32 weights")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "none"])
    p.add_argument("--dp", type=int, default=None, help="data-parallel ranks (default 1; 2 with --zero)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--ep", type=int, default=1, help="expert parallel (MoE presets): experts split over ep "
                   "ranks inside dp (default dp = ep)")
    p.add_argument("--sp", action="store_true", help="sequence parallel (needs tp > 1)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel ranks: each holds seq/cp tokens")
    p.add_argument("--cp-design", default="ring", choices=["ring", "zigzag", "ulysses"],
                   help="with --cp: ring attention, ring with zigzag balance, or Ulysses all-to-all")
    p.add_argument("--recompute", nargs="?", const="full", default="none", choices=RECOMPUTE_MODES[:3],
                   help="activation recompute: selective (the attention core), full (every block; what a "
                        "bare --recompute means)")
    p.add_argument("--attn", default=None, choices=["sdpa", "eager"], help="default: the preset's")
    p.add_argument("--dropout", type=float, default=None, help="dropout probability (default: preset)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="estimate for this device and measure on it (default: cuda if available)")
    p.add_argument("--measure", default="auto", choices=["auto", "yes", "no"],
                   help="auto: measure single-device configs that fit in memory and run in seconds")
    p.add_argument("-v", "--verbose", action="store_true", help="list every term with its formula")


def estimate_command(args) -> dict:
    """Print estimated (and, for one device, measured) memory; write runs/estimate/<name>.{json,png}."""
    overrides = {k: v for k, v in (("attn_impl", args.attn), ("dropout", args.dropout)) if v is not None}
    cfg = get_preset(args.preset, **overrides)
    if args.tp > 1 and cfg.vocab_size % args.tp and cfg.n_head % args.tp == 0:
        padded = padded_vocab_size(cfg.vocab_size, args.tp)
        print(f"note: tp={args.tp} splits the vocabulary; estimating with vocab_size {cfg.vocab_size} "
              f"padded to {padded} (a multiple of tp, as ParallelConfig.pad_vocab does)")
        cfg = cfg.with_(vocab_size=padded)
    seq = cfg.block_size if args.seq is None else args.seq  # --seq 0 is an error, not the default
    dp = args.dp
    if dp is None:
        dp = max(2 if args.zero else 1, args.ep)
        if args.zero:
            print(f"note: ZeRO-{args.zero} shards over data-parallel ranks; assuming --dp {dp} (pass --dp N)")
        elif args.ep > 1:
            print(f"note: expert parallel runs inside data parallel; assuming --dp {dp} (pass --dp N)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and args.measure == "yes" and not torch.cuda.is_available():
        raise ConfigError("--device cuda --measure yes needs a CUDA GPU; use --device cpu or --measure no")
    est = estimate_memory(cfg, batch_size=args.batch, seq_len=seq, dtype=args.dtype,
                          optimizer=args.optimizer, dp=dp, tp=args.tp, pp=args.pp,
                          microbatches=args.microbatches, zero=args.zero, sequence_parallel=args.sp,
                          recompute=args.recompute, device=device, ep=args.ep,
                          cp=args.cp, cp_design=args.cp_design)
    single = dp == 1 and args.tp == 1 and args.pp == 1 and args.cp == 1
    why_not = _why_not_measure(args, est, cfg, single, device, seq, param_count(cfg))
    if args.measure == "yes" and why_not:
        raise ConfigError(f"cannot measure this config here: {why_not}; drop --measure yes (or pass "
                          "--measure no) for the estimate alone")
    meas = None
    if args.measure != "no" and not why_not and args.dtype in MEASURABLE:
        meas = measure_config(cfg, batch_size=args.batch, seq_len=seq, dtype=args.dtype,
                              optimizer=args.optimizer, device=device, microbatches=args.microbatches,
                              recompute=args.recompute, ledger=True)
    rows = compare(est, meas)
    layout = (f"dp={dp} tp={args.tp} pp={args.pp} zero={args.zero}" + (" sp" if args.sp else "")
              + (f" ep={args.ep}" if args.ep > 1 else "")
              + (f" cp={args.cp} ({args.cp_design})" if args.cp > 1 else ""))
    title = (f"{args.preset}: batch {args.batch} x {seq} tokens, {args.dtype}, {args.optimizer}, "
             f"{est.inputs['attn']}, {layout}, {device}")
    print(title)
    print(f"per rank (busiest): micro-batch {est.inputs['micro_batch']}; peak at: {est.peak_phase}")
    if cfg.n_experts:
        print(moe_params_line(cfg, args.ep))
    if args.cp > 1:
        print(f"context parallel: each rank holds {seq // args.cp} of the {seq} tokens (s below is per rank)")
    print(table(rows))
    if meas is None:
        print(f"measured: not run ({why_not})")
    else:
        print(f"measured with: {meas.instrument}; process RSS {fmt_bytes(meas.rss['rss'])} "
              "(OS view, includes the interpreter and libraries)")
        if meas.cuda:
            print(f"CUDA: max reserved {fmt_bytes(meas.cuda['max_reserved'])}; allocated outside "
                  f"tensors (cuBLAS workspaces) {fmt_bytes(meas.cuda['workspace'])}, inside the "
                  "measured total and not estimated")
    print("modelled moments of the step:")
    print(phases_table(est))
    if args.verbose:
        for group, terms in est.terms.items():
            print(f"{group}:")
            for t in terms:
                print(f"  {fmt_bytes(t.nbytes):>12}  {t.name}  [{t.formula}]")
    name = (f"{args.preset}_b{args.batch}_s{seq}_{args.dtype}_dp{dp}_tp{args.tp}_pp{args.pp}"
            f"_z{args.zero}" + (f"_ep{args.ep}" if args.ep > 1 else "")
            + (f"_cp{args.cp}{args.cp_design}" if args.cp > 1 else ""))
    result = {"title": title, "rows": rows, "estimate": est, "measurement": meas,
              "measured_skipped": why_not}
    path = save_json("estimate", name, result)
    png = plot(rows, runs_dir("estimate") / f"{name}.png", title)
    print(f"wrote {path} and {png}")
    return result


def moe_params_line(cfg, ep: int = 1) -> str:
    """A mixture of experts' parameters: total, active per token, and the experts an ep rank holds."""
    total, active = param_count(cfg), active_param_count(cfg)
    return (f"mixture of experts: {total:,} parameters, {active:,} active per token ({cfg.moe_top_k} of "
            f"{cfg.n_experts} experts: {active / total:.0%}); per ep rank (ep={ep}): "
            f"{param_count(cfg, ep=ep):,}, of them {expert_param_count(cfg, ep):,} in its "
            f"{cfg.n_experts // ep} experts per layer")


def too_big_to_measure(estimated_peak: int, device: str) -> str:
    """'' when a step estimated to peak at `estimated_peak` bytes may be measured on `device`, else why
    not. The limit: 90% of the GPU's free memory; on CPU a quarter of the available RAM, so that an
    estimate that is off, the interpreter and the rest of the machine stay clear of the OOM killer."""
    if device == "cuda":
        limit = 0.9 * (torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0)
    else:
        limit = 0.25 * psutil.virtual_memory().available
    if estimated_peak > limit:
        return f"estimated peak {fmt_bytes(estimated_peak)} is more than {fmt_bytes(limit)} free to use"
    return ""


def _why_not_measure(args, est, cfg, single: bool, device: str, seq: int, n_params: int) -> str:
    """'' when this process can measure the config, else the reason (and the fix)."""
    if not single:
        return ("dp/tp/pp/cp > 1 needs one process per rank: the data/tensor/pipeline/context-parallel "
                "and ZeRO labs measure per rank")
    if args.dtype.endswith("-mixed"):
        return f"{args.dtype} keeps fp32 master weights in the optimizer (DeepSpeed: the ZeRO lab)"
    if args.dtype.endswith("-megatron"):
        return f"{args.dtype} is Megatron-LM's optimizer (fp32 main params and grads): estimate only"
    if too_big := too_big_to_measure(est.total, device):
        return too_big
    flops = 6 * n_params * args.batch * seq * 2  # warm-up + measured step
    if args.measure == "auto" and flops > _FLOP_LIMIT[device]:
        return f"~{flops:.1e} FLOP would take long on {device}; pass --measure yes to run it anyway"
    return ""


# ---------------------------------------------------------------------- grids (benchmarks, lab)


def grid_row(spec: dict, device: str = "cpu", ledger: bool | None = None) -> dict:
    """Estimate and measure one config; spec keys: preset, batch, seq, dtype, attn, and optionally
    dropout, optimizer, microbatches, recompute, overrides (GPTConfig fields)."""
    cfg = get_preset(spec["preset"], attn_impl=spec["attn"], dropout=spec.get("dropout", 0.0),
                     **spec.get("overrides", {}))
    kw = dict(batch_size=spec["batch"], seq_len=spec["seq"], dtype=spec["dtype"],
              optimizer=spec.get("optimizer", "adamw"), microbatches=spec.get("microbatches", 1),
              recompute=spec.get("recompute", False))
    est = estimate_memory(cfg, device=device, **kw)
    meas = measure_config(cfg, device=device, ledger=ledger, **kw)
    extra = meas.cuda.get("workspace", 0)  # cuBLAS workspaces: allocated, but no tensor of ours
    peak_est = est.total + extra
    return {
        "spec": spec, "label": spec_label(spec), "estimate": est, "measurement": meas,
        "rows": compare(est, meas),
        "peak_measured": meas.peak, "peak_estimated": peak_est, "workspace_added": extra,
        "peak_error_pct": 100.0 * (peak_est - meas.peak) / meas.peak,
        "states_exact": (all(meas.high_water[k] == getattr(est, k) for k in ("params", "grads", "optimizer"))
                         if meas.high_water else None),
        "peak_phase_estimated": est.peak_phase,
    }


def spec_label(spec: dict) -> str:
    parts = [spec["preset"]] + [f"{k}={v}" for k, v in spec.get("overrides", {}).items()]
    parts += [f"b{spec['batch']}", f"s{spec['seq']}", spec["dtype"], spec["attn"]]
    if spec.get("dropout"):
        parts.append(f"dropout {spec['dropout']}")
    if spec.get("optimizer", "adamw") != "adamw":
        parts.append(spec["optimizer"])
    if spec.get("microbatches", 1) > 1:
        parts.append(f"{spec['microbatches']} microbatches")
    if spec.get("recompute") and spec["recompute"] != "none":
        parts.append("recompute" if spec["recompute"] is True else f"{spec['recompute']} recompute")
    return " ".join(parts)


def grid_markdown(results: list[dict]) -> str:
    """One line per config: measured and estimated peak, error, model states exact, peak moment."""
    lines = ["| config | measured peak | estimated peak | error | params/grads/optimizer exact | "
             "estimated peak moment |", "|---|---|---|---|---|---|"]
    for r in results:
        exact = {True: "yes", False: "NO", None: "-"}[r["states_exact"]]
        lines.append(f"| {r['label']} | {fmt_bytes(r['peak_measured'])} | {fmt_bytes(r['peak_estimated'])} | "
                     f"{r['peak_error_pct']:+.2f}% | {exact} | {r['peak_phase_estimated']} |")
    return "\n".join(lines)
