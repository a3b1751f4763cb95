"""`journey plan`: size a dp x tp x pp training run before launching one (no process group).

Every number comes from the function the labs and tests check against a measurement:

    validation   ParallelConfig.validate (world size, head/vocab/layer divisibility, batch)
    layout       mesh.layout_text (capped for big worlds)
    memory       memory.estimate.estimate_memory, one pipeline stage at a time
    comm         parallel/compose.expected_comm_per_step (tp all-reduce, pp send, dp all-reduce, cp
                 k/v sends or all-to-alls and the dp x cp gradient all-reduce: context/accounting.py;
                 equal to the CommLedger in tests/test_three_d.py); sequence parallel (pp = 1):
                 parallel/tensor/parallelize.analytic_collectives; ZeRO: a reduce-scatter of the
                 gradients and an all-gather of the weights over dp (sharding/zero.py's flat buffer)
    wire bytes   comm.ring_factor: what one rank sends on a ring for the bytes it hands over
    bubble       parallel/pipeline/orders.bubble_formula ((p - 1) / (m + p - 1) for 1F1B; the
                 schedule's own for interleaved and zb-h1) and inflight_formula per stage
    experts      a mixture of experts (MoE presets, --ep): parallel/expert/parallelize.planned_comm
                 under an even load (ep all-to-alls, dp counts and dense gradients, edp experts)

Sits at the top of the import flow with cli (it reads memory/* and parallel/*).
"""

from __future__ import annotations

import re
from dataclasses import replace

from journey_dist.comm import ring_factor
from journey_dist.config import ConfigError, GPTConfig, ParallelConfig
from journey_dist.memory.estimate import (
    PRECISIONS,
    estimate_memory,
    fmt_bytes,
    model_state_bytes,
    param_count,
)
from journey_dist.memory.sizes import expert_param_count
from journey_dist.mesh import layout_text
from journey_dist.parallel.compose import expected_comm_per_step
from journey_dist.parallel.context.accounting import cp_plan_notes
from journey_dist.parallel.expert.accounting import planned_comm
from journey_dist.parallel.pipeline.orders import bubble_expression, bubble_formula, inflight_formula
from journey_dist.parallel.pipeline.stage import stage_layers
from journey_dist.parallel.sharding.zero import padded_numel
from journey_dist.parallel.tensor.parallelize import analytic_collectives, padded_vocab_size
from journey_dist.train import TrainConfig

_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> float:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30 (GB powers of 1000, GiB of 1024; a unit is required)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", str(text))
    if m is None or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"memory size {text!r}: write a number and a unit, e.g. 80GB (10^9 bytes) "
                          f"or 80GiB (2^30 bytes); units: {', '.join(u.replace('I', 'i') for u in _UNITS)}")
    return float(m.group(1)) * _UNITS[m.group(2).upper()]


def padded_for_tp(cfg: GPTConfig, tp: int) -> tuple[GPTConfig, str]:
    """The model with its vocabulary padded to a multiple of tp when tp does not divide it (as the
    package's tensor parallel does with pad_vocab=True), and a note saying so ('' if unchanged).
    A tp that does not divide the heads is left for ParallelConfig.validate to reject."""
    if tp == 1 or cfg.vocab_size % tp == 0 or cfg.n_head % tp:
        return cfg, ""
    padded = padded_vocab_size(cfg.vocab_size, tp)
    return cfg.with_(vocab_size=padded), (
        f"tp={tp} does not divide vocab_size={cfg.vocab_size}: planned with the vocabulary padded to "
        f"{padded} (a multiple of tp; padded logits are masked, ParallelConfig.pad_vocab)")


def comm_per_step(cfg: GPTConfig, pcfg: ParallelConfig, *, batch: int, seq: int, stage: int,
                  dtype: str = "fp32", grad_clip: float = 1.0) -> tuple[dict, dict[str, str]]:
    """Bytes a rank of pipeline `stage` hands to collectives per training step, by mesh dimension:
    ({dim: {op: {"bytes", "wire_bytes"}}}, {dim: why it is not modelled}).

    Activations cross tp and pp at the residual stream's width and gradients cross dp at the
    gradients' (fp32 for bf16-megatron's main grads; otherwise the residual stream's width).
    """
    v = PRECISIONS[dtype].residual
    g = int(model_state_bytes(1, dtype)["grads"])
    if cfg.n_experts:
        return _expert_comm(cfg, pcfg, batch=batch, seq=seq, v=v, g=g, grad_clip=grad_clip)
    m, sizes = pcfg.microbatches, {"tp": pcfg.tp, "dp": pcfg.dp, "pp": pcfg.pp, "cp": pcfg.cp,
                                   "dp_cp": pcfg.dp * pcfg.cp}
    train = TrainConfig(batch_size=batch, grad_accum=m, grad_clip=grad_clip)
    plain = replace(pcfg, zero=0, sequence_parallel=False, pad_vocab=False)  # vocab already padded
    raw = expected_comm_per_step(cfg, plain, train, {"pp": stage, "dp": 0, "tp": 0},
                                 bytes_per_value=v, seq_len=seq)
    if "dp" in raw:  # the dp all-reduce is every gradient of the slice (either family), at g bytes each
        raw["dp"]["all_reduce"] = param_count(cfg, pcfg.tp, pcfg.pp, stage) * g
    if pcfg.cp > 1:  # likewise over dp x cp (over cp when dp = 1, after the last stage's 8-byte loss sums)
        group, loss = ("dp_cp", 0) if pcfg.dp > 1 else ("cp", 8 * m * (stage == pcfg.pp - 1))
        raw[group]["all_reduce"] = loss + param_count(cfg, pcfg.tp, pcfg.pp, stage) * g
    missing: dict[str, str] = {}
    if pcfg.sequence_parallel:
        raw.pop("tp", None)
        if pcfg.pp == 1:
            tokens = batch // (pcfg.dp * m) * seq
            ops = analytic_collectives(cfg, pcfg.tp, tokens, sequence_parallel=True, grad_clip=grad_clip > 0,
                                       micro_steps=m, bytes_per_value=v)
            raw["tp"] = {op: int(row["bytes"]) for op, row in ops.items()}
        else:
            missing["tp"] = ("sequence parallel with pp > 1 is not modelled (the 3D run does not "
                             "implement it); plan it with pp=1 to see its tp volume")
    if pcfg.zero and pcfg.dp > 1:
        # ZeRO over dp: reduce-scatter the gradients (every backward from stage 2 on), all-gather the
        # updated weights (stage 3: before every microbatch's forward and again before its backward)
        flat = padded_numel(param_count(cfg, pcfg.tp, pcfg.pp, stage), pcfg.dp)
        raw["dp"] = {"reduce_scatter": flat * g * (m if pcfg.zero >= 2 else 1),
                     "all_gather": flat * PRECISIONS[dtype].weights * (2 * m if pcfg.zero == 3 else 1)}
        if grad_clip > 0:
            raw["dp"]["all_reduce"] = 4  # the norm² of the gradient shards (fp32 scalar)
    out = {dim: {op: {"bytes": b, "wire_bytes": ring_factor(op, sizes[dim]) * b} for op, b in ops.items()}
           for dim, ops in raw.items() if ops}
    return out, missing


def _expert_comm(cfg: GPTConfig, pcfg: ParallelConfig, *, batch: int, seq: int, v: int, g: int,
                 grad_clip: float) -> tuple[dict, dict[str, str]]:
    """comm_per_step for a mixture of experts (pp = 1), from planned_comm (an even load)."""
    experts = expert_param_count(cfg, pcfg.ep)
    dense = param_count(cfg, pcfg.tp, ep=pcfg.ep) - experts
    raw = planned_comm(cfg, pcfg, batch=batch, seq=seq, dense_numel=dense, expert_numel=experts,
                       bytes_per_value=v, grad_bytes=g, grad_clip=grad_clip)
    sizes = {"tp": pcfg.tp, "dp": pcfg.dp, "ep": pcfg.ep, "edp": pcfg.dp // pcfg.ep}
    missing = {"dp": "ZeRO with a mixture of experts is not modelled (the plan shows plain data parallel)"
               } if pcfg.zero else {}
    return {dim: {op: {"bytes": b, "wire_bytes": ring_factor(op, sizes[dim]) * b} for op, b in ops.items()}
            for dim, ops in raw.items()}, missing


def make_plan(cfg: GPTConfig, pcfg: ParallelConfig, *, batch: int, seq: int | None = None,
              dtype: str = "fp32", optimizer: str = "adamw", gpu_mem: float | None = None,
              world: int | None = None, device: str = "cuda", grad_clip: float = 1.0,
              layout_limit: int = 8, recompute: bool = False) -> dict:
    """Validate the run and size it per rank: layout, memory per pipeline stage, communication per
    step per group kind, bubble. A plain dict (JSON-ready). Raises ConfigError for a run that
    cannot work, naming the fix."""
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch={batch!r} must be a positive number of sequences per step; "
                          "use --batch >= 1")
    cfg, pad_note = padded_for_tp(cfg, pcfg.tp)
    pcfg.validate(cfg, world_size=world, global_batch=batch)
    seq = cfg.block_size if seq is None else seq
    notes = [pad_note] if pad_note else []
    if PRECISIONS.get(dtype) is not None and PRECISIONS[dtype].autocast:
        notes.append("autocast: tp volumes counted at 4 bytes per value; the row-parallel outputs "
                     "are 16-bit, so tp is an upper bound")
    stages = []
    for s in range(pcfg.pp):
        est = estimate_memory(cfg, batch_size=batch, seq_len=seq, dtype=dtype, optimizer=optimizer,
                              dp=pcfg.dp, zero=pcfg.zero, tp=pcfg.tp, pp=pcfg.pp,
                              microbatches=pcfg.microbatches, sequence_parallel=pcfg.sequence_parallel,
                              device=device, schedule=pcfg.schedule, stage=s, ep=pcfg.ep,
                              virtual_stages=pcfg.virtual_stages, recompute=recompute,
                              cp=pcfg.cp, cp_design=pcfg.cp_design)
        comm, missing = comm_per_step(cfg, pcfg, batch=batch, seq=seq, stage=s, dtype=dtype,
                                      grad_clip=grad_clip)
        row = {"stage": s, "layers": len(stage_layers(cfg.n_layer, pcfg.pp)[s]),
               "in_flight": inflight_formula(pcfg.schedule, pcfg.pp, pcfg.microbatches, s,
                                             pcfg.virtual_stages),
               "params": param_count(cfg, pcfg.tp, pcfg.pp, s, pcfg.ep),
               "memory": {"params": est.params, "grads": est.grads, "optimizer": est.optimizer,
                          "model_states": est.params + est.grads + est.optimizer,
                          "activations": est.activations, "logits": est.logits, "peak": est.total,
                          "peak_phase": est.peak_phase},
               "comm": comm, "comm_not_modelled": missing,
               "wire_bytes": {dim: sum(r["wire_bytes"] for r in ops.values()) for dim, ops in comm.items()}}
        if gpu_mem is not None:
            row["fits"] = est.total <= gpu_mem
        stages.append(row)
    micro = batch // (pcfg.dp * pcfg.microbatches)
    busiest = max(stages, key=lambda r: r["memory"]["peak"])
    return {
        "model": cfg.to_dict(), "parallel": {k: getattr(pcfg, k) for k in (
            "dp", "tp", "pp", "cp", "cp_design", "microbatches", "zero", "sequence_parallel", "schedule",
            "ep", "virtual_stages")},
        "world_size": pcfg.world_size, "batch": batch, "seq": seq, "dtype": dtype, "optimizer": optimizer,
        "device": device, "grad_clip": grad_clip,
        "notes": notes + cp_plan_notes(cfg, pcfg, batch=batch, seq=seq,
                                       bytes_per_value=PRECISIONS[dtype].residual),
        "layout": layout_text(pcfg, limit=layout_limit),
        "micro_batch": micro, "tokens_per_microbatch": micro * seq,
        "bubble": bubble_formula(pcfg.schedule, pcfg.pp, pcfg.microbatches, pcfg.virtual_stages),
        "gpu_mem": gpu_mem, "stages": stages, "busiest_stage": busiest["stage"],
        "fits": None if gpu_mem is None else all(r["fits"] for r in stages),
    }


def plan_text(plan: dict) -> str:
    """The plan as a learner reads it: checks passed, layout, memory and comm per stage, bubble."""
    p, m = plan["parallel"], plan["model"]
    fits_head = f"  fits {fmt_bytes(plan['gpu_mem'])}" if plan["gpu_mem"] else ""
    zero = (f" zero={p['zero']}" if p["zero"] else "") + (f" ep={p['ep']}" if p.get("ep", 1) > 1 else "")
    lines = [f"plan: {m['n_layer']} layers x {m['n_embd']} d_model, vocab {m['vocab_size']}; global batch "
             f"{plan['batch']} x {plan['seq']} tokens, {plan['dtype']}, {plan['optimizer']}; "
             f"dp={p['dp']} tp={p['tp']} pp={p['pp']}{zero}" + (" +sp" if p["sequence_parallel"] else "")
             + (f" cp={p['cp']} ({p['cp_design']})" if p["cp"] > 1 else ""),
             f"valid: world size {plan['world_size']} = dp*{'cp*' if p['cp'] > 1 else ''}tp*pp; batch "
             f"{plan['batch']} = dp "
             f"{p['dp']} x {p['microbatches']} microbatches x micro-batch {plan['micro_batch']} "
             f"({plan['tokens_per_microbatch']:,} tokens)"]
    lines += [f"note: {n}" for n in plan["notes"]]
    lines += ["", plan["layout"], "", f"memory per rank ({plan['device']}; model states = params + grads "
              f"+ optimizer; peak = the largest moment of a step):",
              f"{'stage':>5} {'layers':>6} {'params':>13} {'model states':>13} {'activations':>12} "
              f"{'logits':>11} {'peak':>11}" + fits_head]
    for r in plan["stages"]:
        mem = r["memory"]
        fits = "" if "fits" not in r else ("  yes" if r["fits"] else "  NO")
        lines.append(f"{r['stage']:>5} {r['layers']:>6} {r['params']:>13,} "
                     f"{fmt_bytes(mem['model_states']):>13} {fmt_bytes(mem['activations']):>12} "
                     f"{fmt_bytes(mem['logits']):>11} {fmt_bytes(mem['peak']):>11}{fits}")
    lines += ["", "communication per training step, per rank (handed to the collective; sent on a ring):",
              f"{'stage':>5} {'group':>5} {'op':<15} {'handed':>12} {'ring wire':>12}"]
    for r in plan["stages"]:
        for dim, ops in r["comm"].items():
            for op, c in ops.items():
                lines.append(f"{r['stage']:>5} {dim:>5} {op:<15} {fmt_bytes(c['bytes']):>12} "
                             f"{fmt_bytes(c['wire_bytes']):>12}")
        lines += [f"{r['stage']:>5} {d:>5} not modelled: {why}" for d, why in r["comm_not_modelled"].items()]
        if not r["comm"] and not r["comm_not_modelled"]:
            lines.append(f"{r['stage']:>5} none (a single rank)")
    if p["pp"] > 1:
        expr = bubble_expression(p["schedule"], p["pp"], p["microbatches"], p["virtual_stages"])
        held = ", ".join(f"{r['in_flight']}" for r in plan["stages"])
        lines.append(f"\npipeline bubble ({p['schedule']}): {expr} = {plan['bubble']:.1%} of each step idle; "
                     f"activation sets held per stage: {held}"
                     + (f" (chunks of 1/{p['virtual_stages']} stage)" if p["virtual_stages"] > 1 else ""))
    if plan["fits"] is not None:
        lines.append(f"fits in {fmt_bytes(plan['gpu_mem'])} per GPU: " + (
            "yes" if plan["fits"] else f"NO (stage {plan['busiest_stage']} peaks at "
            f"{fmt_bytes(plan['stages'][plan['busiest_stage']]['memory']['peak'])}); try more tp/pp, "
            "ZeRO, or fewer tokens per microbatch"))
    return "\n".join(lines)
