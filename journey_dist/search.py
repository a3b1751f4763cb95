"""`journey plan --search`: every layout of a model on a cluster that fits, ranked by predicted throughput.

    result = search_layouts(get_preset("llama3-70b"), get_cluster("h100"), gpus=64, seq=8192, batch=512)
    print(search_text(result, top=5))

A layout is dp x cp x tp x pp, for a mixture of experts an ep dividing
dp and the number of experts (inside dp: it adds no ranks), a ZeRO stage, a micro-batch size (so
m = batch / (dp x micro-batch) micro-batches), recompute (none or full), sequence parallel
(tp > 1, pp = 1) and the schedule (1F1B: GPipe takes the same time and holds more activations).
Each is validated (ParallelConfig.validate), sized by the memory estimator on every pipeline stage
(memory/estimate.py: the search keeps only layouts whose busiest stage fits the GPU) and timed by
steptime.predict_step. tp stays inside a node (a tp group across the network is never faster).
Context parallel is tried for long sequences (seq >= LONG_SEQ: cp in CP_SIZES dividing the GPUs,
zigzag and Ulysses; plain ring is zigzag's traffic with a busier last rank, so it is only timed when
asked for), dense models, ZeRO off (its dp x cp collectives are not in the time model); each cp
is checked by parallel/context/accounting.check_context_parallel (2cp chunks for zigzag, heads
for Ulysses). --cp and --cp-design fix it (cp = 1: none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import product

from journey_dist.cluster import Cluster
from journey_dist.config import ConfigError, GPTConfig, ParallelConfig
from journey_dist.flops import CP_DESIGNS
from journey_dist.memory.estimate import estimate_memory, fmt_bytes
from journey_dist.parallel.context.accounting import check_context_parallel
from journey_dist.parallel.context.layout import SequenceLayout
from journey_dist.plan import padded_for_tp
from journey_dist.steptime import StepTime, predict_step

MICRO_BATCHES = (1, 2, 4, 8)
RECOMPUTES = ("none", "full")  # the estimator models full recompute; selective joins with issue 21
LONG_SEQ = 16384  # from here on the search also splits the sequence (context parallel)
CP_SIZES = (2, 4, 8, 16)
CP_SEARCHED = ("zigzag", "ulysses")


@dataclass(frozen=True)
class Candidate:
    """One layout that fits, its busiest stage's peak memory and its predicted step."""

    pcfg: ParallelConfig
    micro_batch: int
    recompute: str
    peak: float
    step: StepTime

    def label(self) -> str:
        p = self.pcfg
        extras = [f"cp{p.cp} {p.cp_design}" if p.cp > 1 else "",
                  f"ep{p.ep}" if p.ep > 1 else "", f"zero{p.zero}" if p.zero else "",
                  "sp" if p.sequence_parallel else "",
                  f"rc={self.recompute}" if self.recompute != "none" else ""]
        return (f"dp{p.dp} tp{p.tp} pp{p.pp} mb{self.micro_batch} m{p.microbatches} "
                + " ".join(e for e in extras if e)).strip()


@dataclass
class SearchResult:
    ranked: list[Candidate]
    considered: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> layouts
    smallest: tuple[float, str] | None = None  # the lowest peak seen among layouts that did not fit


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search_layouts(cfg: GPTConfig, cluster: Cluster, *, gpus: int, seq: int, batch: int,
                   dtype: str = "bf16-mixed", optimizer: str = "adamw", overlap: bool = True,
                   tp: int | None = None, pp: int | None = None, dp: int | None = None,
                   zero: int | None = None, microbatches: int | None = None,
                   sequence_parallel: bool | None = None, recomputes: tuple[str, ...] | None = None,
                   micro_batches: tuple[int, ...] = MICRO_BATCHES, schedule: str = "1f1b",
                   device: str | None = None, ep: int | None = None, cp: int | None = None,
                   cp_design: str | None = None) -> SearchResult:
    """Every valid layout of `gpus` GPUs for `batch` sequences of `seq` tokens that fits in
    cluster.memory per GPU, ranked fastest first. tp, pp, dp, zero, microbatches,
    sequence_parallel, recomputes, ep, cp, cp_design: fix that choice (None: try every one; ep:
    every divisor of dp and n_experts for a mixture of experts, 1 for a dense model; cp: 1, and
    CP_SIZES for a dense model when seq >= LONG_SEQ; cp_design: CP_SEARCHED)."""
    if not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"gpus={gpus!r} must be a positive number of GPUs")
    if ep is not None and (not isinstance(ep, int) or ep < 1):
        raise ConfigError(f"ep={ep!r} must be a positive integer (1: no expert parallel)")
    if ep is not None and ep > 1 and not cfg.n_experts:
        raise ConfigError(f"ep={ep} splits the experts of a mixture of experts, but this model is dense "
                          "(n_experts=0); drop --ep or search an MoE preset (moe-mini, mixtral-mini)")
    if ep is not None and cfg.n_experts and cfg.n_experts % ep:
        raise ConfigError(f"ep={ep} does not divide n_experts={cfg.n_experts}: every ep rank holds the "
                          f"same number of experts; use an ep in {_divisors(cfg.n_experts)} (or drop --ep "
                          "to search)")
    if cp_design is not None and cp_design not in CP_DESIGNS:
        raise ConfigError(f"cp_design={cp_design!r}; use one of {', '.join(CP_DESIGNS)}")
    if cp is not None:
        if not isinstance(cp, int) or cp < 1 or gpus % cp:
            raise ConfigError(f"cp={cp!r} must be a positive integer dividing the {gpus} GPUs; use one of "
                              f"{_divisors(gpus)}")
        SequenceLayout(cp, "zigzag" if cp_design == "zigzag" else "plain").check(seq)
    if seq > cfg.block_size:
        raise ConfigError(f"seq={seq} is longer than the model's context block_size={cfg.block_size}; "
                          f"use --seq <= {cfg.block_size}")
    device = device or ("cpu" if cluster.shared_cores is not None else "cuda")
    recomputes = RECOMPUTES if recomputes is None else recomputes
    if microbatches is not None:  # the micro-batch size follows from it
        micro_batches = tuple(range(1, batch + 1))
    ranked: list[Candidate] = []
    skipped: dict[str, int] = {}
    smallest: tuple[float, str] | None = None
    considered = 0

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    tps = [t for t in _divisors(gpus) if t <= cluster.gpus_per_node] if tp is None else [tp]
    long = seq >= LONG_SEQ and not cfg.n_experts
    cps = [cp] if cp is not None else [1] + [c for c in CP_SIZES if long and gpus % c == 0]
    splits = [(t, c, des) for t in tps for c in cps
              for des in ((cp_design,) if cp_design else CP_SEARCHED if c > 1 else ("ring",))]
    for t, c, design in splits:
        for p in ([q for q in _divisors(gpus // t) if q <= cfg.n_layer] if pp is None else [pp]):
            if gpus % (t * c * p):
                continue
            d = gpus // (t * c * p)
            if dp is not None and d != dp:
                continue
            eps = [x for x in _divisors(d) if cfg.n_experts % x == 0] if cfg.n_experts else [1]
            sps = (False, True) if t > 1 and p == 1 else (False,)
            zs = (0, 1, 2, 3) if zero is None else (zero,)
            for e, z, sp, b, rc in product(eps if ep is None else [ep], zs,
                                           sps if sequence_parallel is None else (sequence_parallel,),
                                           micro_batches, recomputes):
                if microbatches is not None and d * b * microbatches != batch:
                    continue
                considered += 1
                if batch % (d * b):
                    skip(f"batch {batch} is not a multiple of dp x micro-batch")
                    continue
                if z and d == 1:
                    skip("ZeRO needs dp > 1")
                    continue
                if z and cfg.n_experts:
                    skip("ZeRO with a mixture of experts (not in the time model)")
                    continue
                if c > 1 and (z or cfg.n_experts):
                    skip("cp with ZeRO or a mixture of experts (not in the time model)")
                    continue
                if c > 1 and sp:
                    skip("cp with sequence parallel (both split the sequence)")
                    continue
                if z >= 2 and p > 1:
                    skip("ZeRO-2/3 with pp > 1 (unsupported)")
                    continue
                if sp and (p > 1 or t == 1):
                    skip("sequence parallel needs tp > 1 and (in the time model) pp = 1")
                    continue
                if p > 1 and batch // (d * b) < p:
                    skip("fewer micro-batches than pipeline stages")
                    continue
                pcfg = ParallelConfig(dp=d, tp=t, pp=p, microbatches=batch // (d * b), zero=z,
                                      sequence_parallel=sp, pad_vocab=True, schedule=schedule,
                                      ep=e, cp=c, cp_design=design)
                try:
                    model, _ = padded_for_tp(cfg, t)
                    pcfg.validate(model, world_size=gpus, global_batch=batch)
                    check_context_parallel(pcfg, model, seq)
                except ConfigError as err:  # tp vs heads/kv heads/MLP width, pp vs layers
                    skip(re.sub(r"\d+", "N", str(err).split(";")[0]))
                    continue
                peak = _peak(model, pcfg, b * d * pcfg.microbatches, seq, dtype, optimizer, rc,
                             device, cluster.memory)
                if peak > cluster.memory:
                    skip(f"does not fit {fmt_bytes(cluster.memory)}")
                    label = f"dp{d} cp{c} tp{t} pp{p} ep{e} mb{b} zero{z} rc={rc}"
                    if smallest is None or peak < smallest[0]:
                        smallest = (peak, label)
                    continue
                step = predict_step(cfg, pcfg, cluster, batch=batch, seq=seq, dtype=dtype,
                                    optimizer=optimizer, recompute=rc, overlap=overlap)
                ranked.append(Candidate(pcfg, b, rc, peak, step))
    if not ranked:
        worst = f"; the smallest peak was {fmt_bytes(smallest[0])} ({smallest[1]})" if smallest else ""
        reasons = "; ".join(f"{n} x {r}" for r, n in sorted(skipped.items(), key=lambda kv: -kv[1])[:3])
        raise ConfigError(f"no layout of {gpus} GPUs fits in {fmt_bytes(cluster.memory)} per GPU for a batch "
                          f"of {batch} x {seq} tokens ({reasons}){worst}: use more GPUs, a shorter --seq or "
                          "a smaller batch")
    ranked.sort(key=lambda c: (round(c.step.step_s, 6), c.pcfg.zero, c.peak))  # ties: less sharding
    return SearchResult(ranked, considered, skipped, smallest)


def dp_for(gpus: int, tp: int, pp: int) -> int:
    """dp = gpus / (tp x pp), or a ConfigError when the GPUs do not factor that way."""
    if not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"gpus={gpus!r} must be a positive number of GPUs")
    if gpus % (tp * pp):
        pps = [p for p in _divisors(gpus) if gpus % (tp * p) == 0] if gpus % tp == 0 else []
        fix = f"use pp in {pps}" if pps else f"use a tp dividing {gpus} (one of {_divisors(gpus)})"
        raise ConfigError(f"{gpus} GPUs do not factor as dp x tp x pp with tp={tp}, pp={pp}: {gpus} is not a "
                          f"multiple of {tp * pp}; {fix}")
    return gpus // (tp * pp)


def _peak(cfg: GPTConfig, pcfg: ParallelConfig, batch: int, seq: int, dtype: str, optimizer: str,
          recompute: str, device: str, limit: float) -> float:
    """The largest peak over the pipeline stages (stops at the first stage over `limit`)."""
    worst = 0.0
    for s in range(pcfg.pp):
        est = estimate_memory(cfg, batch_size=batch, seq_len=seq, dtype=dtype, optimizer=optimizer,
                              dp=pcfg.dp, zero=pcfg.zero, tp=pcfg.tp, pp=pcfg.pp,
                              microbatches=pcfg.microbatches, sequence_parallel=pcfg.sequence_parallel,
                              recompute=recompute == "full", device=device, schedule=pcfg.schedule, stage=s,
                              ep=pcfg.ep, cp=pcfg.cp, cp_design=pcfg.cp_design)
        worst = max(worst, est.total)
        if worst > limit:
            break
    return worst


_GROUPS = {"compute": ("forward", "backward"), "recompute": ("recompute",), "tp comm": ("tp ",),
           "cp comm": ("cp ",), "pp comm": ("pp ",), "bubble": ("pipeline bubble",),
           "dp comm": ("dp ", "dp_cp "),
           "ep comm": ("ep ",), "edp comm": ("edp ",), "optimizer": ("optimizer",)}


def breakdown(step: StepTime) -> dict[str, float]:
    """Seconds per kind of term: compute, recompute, tp/cp/pp/dp/ep/edp communication (dp: the
    gradients over dp x cp too), bubble, optimizer."""
    return {k: sum(step.term(prefix) for prefix in prefixes) for k, prefixes in _GROUPS.items()}


def why(best: Candidate, other: Candidate) -> str:
    """The terms that make `best` faster than `other`, largest first."""
    a, b = breakdown(best.step), breakdown(other.step)
    diffs = sorted(((b[k] - a[k], k) for k in a), reverse=True)
    parts = [f"{k} {d:+.3g} s" for d, k in diffs if abs(d) > 0.01 * other.step.step_s][:3]
    if parts:
        return ", ".join(parts)
    return (f"within 1% on every term; its peak memory is {fmt_bytes(other.peak)} "
            f"against {fmt_bytes(best.peak)}")


def search_text(result: SearchResult, cluster: Cluster, *, top: int = 5, gpus: int, seq: int, batch: int,
                train_tokens: float | None = None) -> str:
    """The ranked table, and why the winner wins."""
    lines = [f"{len(result.ranked)} of {result.considered} layouts fit in {fmt_bytes(cluster.memory)} "
             f"per GPU ({cluster.gpu}, {cluster.gpus_per_node} per node); fastest first:",
             f"{'#':>2} {'layout':<34} {'step s':>8} {'tok/s':>10} {'MFU':>6} {'bubble':>7} "
             f"{'exposed comm':>12} {'recompute':>9} {'peak mem':>10}"]
    for i, c in enumerate(result.ranked[:top], 1):
        br, st = breakdown(c.step), c.step
        comm = sum(v for k, v in br.items() if k.endswith(" comm"))
        lines.append(f"{i:>2} {c.label():<34} {st.step_s:>8.3f} {st.tokens_per_s:>10,.0f} {st.mfu:>6.1%} "
                     f"{br['bubble'] / st.step_s:>7.1%} {comm / st.step_s:>12.1%} "
                     f"{br['recompute'] / st.step_s:>9.1%} {fmt_bytes(c.peak):>10}")
    best = result.ranked[0]
    lines.append("")
    for i, other in enumerate(result.ranked[1:top], 2):
        lines.append(f"#1 vs #{i} ({other.label()}): {why(best, other)}")
    if train_tokens:
        st = best.step
        lines.append(f"\n#1 trains {train_tokens:.3g} tokens in {st.train_seconds(train_tokens) / 86400:.3g} "
                     f"days = {st.gpu_hours(train_tokens):,.0f} GPU-hours")
    if result.skipped:
        lines.append("skipped: " + "; ".join(f"{n} {r}" for r, n in sorted(result.skipped.items(),
                                                                           key=lambda kv: -kv[1])))
    return "\n".join(lines)
