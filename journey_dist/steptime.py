"""How long a training step takes, term by term: compute, each collective on its link, bubble, optimizer.

    st = predict_step(get_preset("llama3-70b"), ParallelConfig(dp=2, tp=8, pp=4, microbatches=64),
                      get_cluster("h100"), batch=128, seq=8192, dtype="bf16-mixed", recompute="full")
    st.step_s, st.tokens_per_s, st.mfu, st.table()

The model, per pipeline stage s and micro-batch (rank rate R = cluster.rank_flops(...)):

    compute      forward F_s / R, backward 2 F_s / R, recompute (flops.stage_flops)
    collectives  every collective of the stage (`stage_collectives`: bytes from plan.comm_per_step,
                 calls from the schemes' rules), each timed on the link its group crosses
                 (`group_span` over mesh.py's rank layout; `collective_time`: alpha-beta):
                     t = ring_factor(op, n) x bytes / (bandwidth x comm_efficiency)
                         + calls x ring_steps(op, n) x latency
                 tp (and cp, ep) inside every micro-batch are exposed: compute waits for them;
                 a mixture of experts (`expert_collectives`): the ep all-to-alls (router counts,
                 then dispatch and combine, forward and backward, per MoE layer and micro-batch)
                 on the link the ep group's placement gives (ep consecutive ranks of a dp group),
                 the dp all-gather of router counts; the dense gradients reduced over dp and the
                 experts' over edp = dp / ep after the flush;
                 pp sends sit between micro-batches (counted in each micro-batch's time)
    pipeline     t_s = compute + exposed per-micro-batch communication; GPipe and 1F1B take
                 (m - 1) max_s t_s + sum_s t_s (balanced: (m + p - 1) t, the bubble (p-1)/(m+p-1));
                 interleaved with v virtual stages shrinks the fill and drain v times
    after flush  dp gradient reduce (ZeRO: reduce-scatter + all-gather), exposed unless `overlap`
                 hides it behind compute (DDP / Megatron's overlap_grad_reduce: the last micro-batch's
                 backward; ZeRO-2: every backward; ZeRO-3's prefetched gathers: all compute; ZeRO-1's
                 weight gather: the next forward), never below one call's time; the tied-embedding
                 send and the clip-norm all-reduces; the optimizer step, memory-bound: it reads the
                 gradients (norm) and reads and writes every state once, at HBM bandwidth.

step = pipeline + the slowest stage's after-flush time; tokens/s = batch x seq / step;
MFU = model FLOPs (6 N_mm + attention, no recompute; an MoE's active matrices) x tokens /
(step x world x peak); HFU counts every rank at its stage's (under cp: the busiest cp rank's) FLOPs.

Context parallel (cp ranks split each sequence; `context_collectives`): compute is the busiest cp
rank's (flops.py: tokens / cp through the linears, its share of attention); the cp group is cp
ranks tp apart (mesh.py: pp x dp x cp x tp), its link from `group_span("cp")`. Ring and zigzag
pass a k/v block per ring step: cp - 1 sends forward, 2cp - 1 backward (the blocks again and each
block's dK/dV home) per layer and micro-batch, and the forward's cp - 1 again under recompute;
each send overlaps the attention of the block in hand, W = one layer's attention forward / cp
(backward: two sends against the step's 2W, so W each): exposed = max(0, send - W) per send.
Ulysses' 8 all-to-alls per layer (q, k, v, output forward and their reverses backward; the
forward's 4 again under recompute) are exposed: attention needs what they bring. The loss's
8-byte all-reduce over cp per micro-batch; the gradients are all-reduced once per step over the
dp x cp group ("dp_cp": every rank with the same weights; hides behind the last backward).

Where new parallelism plugs in: a group adds its rows to `stage_collectives` (when="microbatch",
exposed inside the stage like tp, as ep's and cp's), its link from `group_span`; a new pipeline
schedule adds its formula to `pipeline_time`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from journey_dist.cluster import Cluster, Link
from journey_dist.comm import ring_factor
from journey_dist.config import ConfigError, GPTConfig, ParallelConfig
from journey_dist.flops import layer_forward_flops, model_flops_per_token, stage_flops
from journey_dist.memory.estimate import PRECISIONS, model_state_bytes, param_count
from journey_dist.mesh import DIMS, coords_rank
from journey_dist.parallel.context.accounting import check_context_parallel
from journey_dist.parallel.pipeline.stage import stage_layers
from journey_dist.parallel.tensor.parallelize import analytic_collectives
from journey_dist.plan import comm_per_step, padded_for_tp

DDP_BUCKET_BYTES = 25 * 2**20  # DDP's bucket_cap_mb default: dp all-reduce calls = bytes / bucket
MICROBATCH_GROUPS = ("tp", "cp", "ep", "dp", "pp")  # groups that may communicate inside a micro-batch


def ring_steps(op: str, n: int) -> int:
    """Latency-bound steps of one call on a ring of n ranks: all-reduce 2(n-1) (reduce-scatter then
    all-gather), all-gather / reduce-scatter / all-to-all / broadcast n-1, a point-to-point send 1."""
    if op == "send":
        return 1
    if n <= 1:
        return 0
    return 2 * (n - 1) if op == "all_reduce" else n - 1


def collective_time(op: str, nbytes: float, n: int, link: Link, *, calls: int = 1,
                    efficiency: float = 1.0) -> float:
    """Alpha-beta time of handing `nbytes` in total to `op` over `calls` calls on a ring of n ranks:
    ring_factor(op, n) x nbytes / (bandwidth x efficiency) + calls x ring_steps(op, n) x latency.
    All-reduce: 2(n-1)/n x bytes / bandwidth + 2(n-1) x latency per call."""
    if n <= 1 and op != "send":
        return 0.0
    bandwidth_term = ring_factor(op, n) * nbytes / (link.bandwidth * efficiency)
    return bandwidth_term + calls * ring_steps(op, n) * link.latency


EXPERT_GROUPS = ("ep", "edp")  # expert parallel's groups inside dp (parallel/expert/layer.py)
GRAD_GROUPS = ("dp_cp",)  # context parallel's gradient group: every dp and cp rank of a (pp, tp) slot


def group_ranks_matrix(dim: str, pcfg: ParallelConfig) -> torch.Tensor:
    """(groups, size) global ranks of every group along `dim`: a mesh dimension (mesh.py's layout),
    expert parallel's "ep" (ep consecutive ranks of each dp group) and "edp" (the ranks of a dp group
    holding the same experts, one per ep group), as parallel/expert/layer.expert_group_ranks cuts them,
    or "dp_cp" (the dp x cp ranks of one (pp, tp) slot, where gradients are reduced under cp:
    parallel/context/parallelize.dp_cp_ranks; dp and cp are adjacent in the layout, so tp apart)."""
    if dim not in DIMS + EXPERT_GROUPS + GRAD_GROUPS:
        raise ConfigError(f"group {dim!r} is not a mesh dimension; mesh.py places {', '.join(DIMS)} "
                          f"(and expert parallel {', '.join(EXPERT_GROUPS)} inside dp, "
                          f"{', '.join(GRAD_GROUPS)} for context parallel's gradients)")
    if dim == "dp_cp":
        size, stride = pcfg.dp * pcfg.cp, pcfg.tp
    else:
        mesh_dim = "dp" if dim in EXPERT_GROUPS else dim
        size = getattr(pcfg, mesh_dim)
        unit = {d: 0 for d in DIMS}
        stride = coords_rank(**{**unit, mesh_dim: 1}, pcfg=pcfg) if size > 1 else 1
    ranks = torch.arange(pcfg.world_size)
    bases = ranks[(ranks // stride) % size == 0]  # the first rank of every group
    groups = bases[:, None] + stride * torch.arange(size)[None, :]  # (groups, size)
    if dim == "ep":
        return groups.reshape(-1, pcfg.ep)
    if dim == "edp":
        blocks = groups.reshape(len(bases), size // pcfg.ep, pcfg.ep)  # (dp groups, ep groups, ep)
        return blocks.transpose(1, 2).reshape(-1, size // pcfg.ep)
    return groups


def group_span(dim: str, pcfg: ParallelConfig, gpus_per_node: int) -> tuple[int, int]:
    """(ranks per node, nodes) of the worst-placed group along `dim`, by mesh.py's rank layout
    (global rank = coords_rank(...); node = rank // gpus_per_node). Placement decides the link:
    a tp group of adjacent ranks stays inside a node; dp and pp groups stride across nodes; an ep
    group takes ep consecutive ranks of a dp group, edp every ep-th; a cp group is cp ranks tp
    apart, the dp x cp gradient group dp x cp ranks tp apart."""
    groups = group_ranks_matrix(dim, pcfg)
    size = groups.size(1)
    if size == 1:
        return 1, 1
    nodes = groups // gpus_per_node
    distinct = (nodes.sort(dim=1).values.diff(dim=1) != 0).sum(dim=1) + 1  # nodes each group touches
    worst = int(distinct.max())
    return -(-size // worst), worst


def group_sizes(pcfg: ParallelConfig) -> dict[str, int]:
    """Ranks per group of every kind the time model times (edp = dp / ep, dp_cp = dp x cp)."""
    return {"tp": pcfg.tp, "cp": pcfg.cp, "pp": pcfg.pp, "dp": pcfg.dp, "ep": pcfg.ep,
            "edp": pcfg.dp // pcfg.ep, "dp_cp": pcfg.dp * pcfg.cp}


@dataclass(frozen=True)
class Collective:
    """One kind of collective a rank of a stage runs each step.

    when: "microbatch" (inside every micro-batch, compute waits: tp, cp, ep, pp sends) or "step"
    (once per step, after the pipeline flush: dp, the tied-embedding send, clip norms).
    hides_behind: the compute `overlap` may hide it behind ("last_backward", "backward",
    "compute", "next_forward"; inside a micro-batch "ring_block": each call behind the attention
    of the ring block in hand), or None (always exposed). what: a word telling apart rows of the
    same group and op (its own term in the table), e.g. an MoE's "counts" and "tokens"."""

    group: str
    op: str
    nbytes: float  # per step, handed to the collective (summed over calls)
    calls: int
    when: str
    hides_behind: str | None = None
    what: str = ""


def stage_collectives(cfg: GPTConfig, pcfg: ParallelConfig, *, batch: int, seq: int, stage: int,
                      dtype: str = "bf16-mixed", grad_clip: float = 1.0, dp_calls: int | None = None,
                      dp_bucket_bytes: float = DDP_BUCKET_BYTES, recompute: str = "none") -> list[Collective]:
    """Every collective of a rank of pipeline `stage` per step. Bytes: plan.comm_per_step (the
    numbers tests check against the CommLedger); calls: the schemes' rules —
    tp: 4 per layer per micro-batch (attention and MLP: g forward, f backward), the embedding on the
      first stage, the head input and 3 cross-entropy reductions on the last (sequence parallel:
      tensor/parallelize.analytic_collectives); pp: a send forward and one backward per boundary
      per micro-batch, the tied embedding's gradient once; dp: `dp_calls`, else one per
      `dp_bucket_bytes` bucket; ZeRO-1/2: bucketed reduce-scatters per step (ZeRO-2: per backward)
      and all-gathers of the updated weights; ZeRO-3 as FSDP: per block (and the root), an
      all-gather before every forward and backward and a reduce-scatter after every backward;
      clip: one 4-byte all-reduce per group. A mixture of experts: `expert_collectives`; context
      parallel: `context_collectives`."""
    if pcfg.cp > 1:
        check_context_parallel(pcfg, cfg, seq)
        if cfg.n_experts or pcfg.zero:
            raise ConfigError(f"cp={pcfg.cp} with {'a mixture of experts' if cfg.n_experts else 'ZeRO'}: "
                              "its collectives over the dp x cp group are not in the time model; time it "
                              "with cp=1 or with a dense model and zero=0")
    if cfg.n_experts and pcfg.zero:
        raise ConfigError(f"zero={pcfg.zero} with a mixture of experts: ZeRO's collectives over dp and edp "
                          "are not in the time model; time it with zero=0 (drop --zero) or drop --gpu")
    comm, missing = comm_per_step(cfg, pcfg, batch=batch, seq=seq, stage=stage, dtype=dtype,
                                  grad_clip=grad_clip)
    if missing:
        raise ConfigError("; ".join(f"{dim}: {why}" for dim, why in missing.items()))
    if cfg.n_experts:
        return expert_collectives(cfg, pcfg, comm, grad_clip=grad_clip, dp_calls=dp_calls,
                                  dp_bucket_bytes=dp_bucket_bytes)
    m, clip = pcfg.microbatches, 4 if grad_clip > 0 else 0
    first, last = stage == 0, stage == pcfg.pp - 1
    layers = len(stage_layers(cfg.n_layer, pcfg.pp)[stage])
    out: list[Collective] = []

    def bytes_of(dim: str, op: str) -> float:
        return comm.get(dim, {}).get(op, {}).get("bytes", 0)

    if "tp" in comm:
        if pcfg.sequence_parallel:  # pp = 1 (plan.comm_per_step models no other case)
            tokens = batch // (pcfg.dp * m) * seq
            ops = analytic_collectives(cfg, pcfg.tp, tokens, sequence_parallel=True, grad_clip=grad_clip > 0,
                                       micro_steps=m, bytes_per_value=PRECISIONS[dtype].residual)
            for op in ("all_gather", "reduce_scatter"):
                out.append(Collective("tp", op, bytes_of("tp", op), int(ops[op]["calls"]), "microbatch"))
            loss = 3 * m * tokens * 4  # the vocab-parallel cross-entropy's three fp32 reductions
            out.append(Collective("tp", "all_reduce", loss, 3 * m, "microbatch"))
            out.append(Collective("tp", "all_reduce", bytes_of("tp", "all_reduce") - loss,
                                  int(ops["all_reduce"]["calls"]) - 3 * m, "step"))  # LN/bias grads, clip
        else:
            out.append(Collective("tp", "all_reduce", bytes_of("tp", "all_reduce") - clip,
                                  m * (4 * layers + first + 4 * last), "microbatch"))
            if clip:
                out.append(Collective("tp", "all_reduce", clip, 1, "step"))
    if "pp" in comm:
        tied = cfg.tie_embeddings and (first or last)
        tied_bytes = tied * -(-cfg.vocab_size // pcfg.tp) * cfg.n_embd * PRECISIONS[dtype].residual
        out.append(Collective("pp", "send", bytes_of("pp", "send") - tied_bytes,
                              m * ((not last) + (not first)), "microbatch"))
        if tied:
            out.append(Collective("pp", "send", tied_bytes, 1, "step"))
        if clip:
            out.append(Collective("pp", "all_reduce", clip, 1, "step"))
        # this package's Pipeline broadcasts each step's loss from the last stage (for logging)
        out.append(Collective("pp", "broadcast", 4, 1, "step"))
    if pcfg.cp > 1:
        out += context_collectives(pcfg, comm, layers=layers, last=last, dp_calls=dp_calls,
                                   dp_bucket_bytes=dp_bucket_bytes, recompute=recompute)
    if "dp" in comm:
        if pcfg.zero:
            rs, ag = bytes_of("dp", "reduce_scatter"), bytes_of("dp", "all_gather")
            passes = m if pcfg.zero >= 2 else 1  # ZeRO-2/3 reduce-scatter every backward

            def buckets(nbytes: float, n: int) -> int:
                return n * max(1, math.ceil(nbytes / n / dp_bucket_bytes))

            units = layers + 1  # ZeRO-3 as FSDP shards it: a unit per block, plus the root's
            out.append(Collective("dp", "reduce_scatter", rs,
                                  passes * units if pcfg.zero == 3 else buckets(rs, passes), "step",
                                  "backward" if pcfg.zero >= 2 else "last_backward"))
            out.append(Collective("dp", "all_gather", ag, 2 * m * units if pcfg.zero == 3 else buckets(ag, 1),
                                  "step", "compute" if pcfg.zero == 3 else "next_forward"))
            if clip:
                out.append(Collective("dp", "all_reduce", clip, 1, "step"))
        else:
            nbytes = bytes_of("dp", "all_reduce")
            calls = dp_calls if dp_calls is not None else max(1, math.ceil(nbytes / dp_bucket_bytes))
            out.append(Collective("dp", "all_reduce", nbytes, calls, "step", "last_backward"))
    return out


def context_collectives(pcfg: ParallelConfig, comm: dict, *, layers: int, last: bool,
                        dp_calls: int | None = None, dp_bucket_bytes: float = DDP_BUCKET_BYTES,
                        recompute: str = "none") -> list[Collective]:
    """Context parallel's collectives per step of a stage's rank, bytes from plan.comm_per_step
    (context/accounting.step_comm), per layer (`layers`) and micro-batch (m):
      ring, zigzag  cp send, k/v blocks: cp - 1 forward, 2cp - 1 backward (the blocks again, each
                    block's dK/dV), each hidden behind the block in hand ("ring_block"); the
                    receives are the other end of the same sends (not timed twice)
      ulysses       cp all-to-all: 8 calls (q, k, v, output forward; their reverses backward), exposed
      recompute     (full or selective: attention's core runs again in backward) the forward's
                    traffic again: cp - 1 k/v sends, or Ulysses' 4 forward all-to-alls
      loss          cp all-reduce of [loss sum, tokens], 8 bytes per micro-batch on the last stage
      gradients     dp_cp all-reduce once per step (the cp group's when dp = 1), one per bucket."""
    m, cp = pcfg.microbatches, pcfg.cp
    loss = 8 * m if last else 0
    rows = comm["cp"]
    out: list[Collective] = []
    again = recompute != "none"
    if pcfg.cp_design == "ulysses":
        a2a = rows["all_to_all"]["bytes"]
        out.append(Collective("cp", "all_to_all", a2a, 8 * m * layers, "microbatch", what="q/k/v/out"))
        if again:  # the forward half (q, k, v, output) again
            out.append(Collective("cp", "all_to_all", a2a / 2, 4 * m * layers, "microbatch",
                                  what="q/k/v/out recompute"))
    else:
        block = rows["send"]["bytes"] / (m * layers * (3 * cp - 2))  # one k/v block
        passes = [(cp - 1, "k/v forward"), (2 * cp - 1, "k/v + dK/dV backward")]
        for hops, what in passes + ([(cp - 1, "k/v recompute")] if again else []):
            out.append(Collective("cp", "send", hops * m * layers * block, hops * m * layers, "microbatch",
                                  "ring_block", what=what))
    if loss:
        out.append(Collective("cp", "all_reduce", loss, m, "microbatch", what="loss"))
    grads = comm["dp_cp"]["all_reduce"]["bytes"] if pcfg.dp > 1 else rows["all_reduce"]["bytes"] - loss
    calls = dp_calls if dp_calls is not None else max(1, math.ceil(grads / dp_bucket_bytes))
    out.append(Collective("dp_cp", "all_reduce", grads, calls, "step", "last_backward", what="grads"))
    return out


def expert_collectives(cfg: GPTConfig, pcfg: ParallelConfig, comm: dict, *, grad_clip: float = 1.0,
                       dp_calls: int | None = None,
                       dp_bucket_bytes: float = DDP_BUCKET_BYTES) -> list[Collective]:
    """A mixture of experts' collectives per step (pp = 1), bytes from plan.comm_per_step (which
    takes parallel/expert/accounting.planned_comm: an even load, every token's k pairs kept), calls
    from expected_collectives' rules, per MoE layer (L) and micro-batch (m):
      ep all-to-all, inside every micro-batch (exposed: the experts wait for their rows):
        counts  L m calls of E int64 (how many rows each peer sends)
        tokens  4 L m calls: dispatch and combine forward (t k rows of C values each), their
                reverses backward
      dp all-gather of the router counts (the batch-wide load the balance loss and capacity need):
        L m calls, exposed; dp all-reduce of the dense gradients, once per step (hides behind the
        last backward, as DDP); edp all-reduce of this rank's expert gradients (dp / ep ranks hold
        the same experts), likewise; tp: 2L + 2 activation all-reduces and 3 of the cross-entropy
        per micro-batch (the MoE runs whole on every tp rank); the clip's scalar over ep and tp."""
    m, L, E = pcfg.microbatches, cfg.n_layer, cfg.n_experts
    clip = 4 if grad_clip > 0 else 0

    def bytes_of(dim: str, op: str) -> float:
        return comm.get(dim, {}).get(op, {}).get("bytes", 0)

    def buckets(nbytes: float) -> int:
        return dp_calls if dp_calls is not None else max(1, math.ceil(nbytes / dp_bucket_bytes))

    out: list[Collective] = []
    if "ep" in comm:
        counts = m * L * 8 * E
        out.append(Collective("ep", "all_to_all", counts, m * L, "microbatch", what="counts"))
        out.append(Collective("ep", "all_to_all", bytes_of("ep", "all_to_all") - counts, 4 * m * L,
                              "microbatch", what="tokens"))
        if clip:
            out.append(Collective("ep", "all_reduce", clip, 1, "step"))
    if "dp" in comm:
        out.append(Collective("dp", "all_gather", bytes_of("dp", "all_gather"), m * L, "microbatch",
                              what="counts"))
        dense = bytes_of("dp", "all_reduce")
        out.append(Collective("dp", "all_reduce", dense, buckets(dense), "step", "last_backward",
                              what="dense grads"))
    if "edp" in comm:
        experts = bytes_of("edp", "all_reduce")
        out.append(Collective("edp", "all_reduce", experts, buckets(experts), "step", "last_backward",
                              what="expert grads"))
    if "tp" in comm:
        out.append(Collective("tp", "all_reduce", bytes_of("tp", "all_reduce") - clip, m * (2 * L + 5),
                              "microbatch"))
        if clip:
            out.append(Collective("tp", "all_reduce", clip, 1, "step"))
    return out


def optimizer_seconds(n_params: float, dtype: str, optimizer: str, bandwidth: float) -> float:
    """The optimizer step is memory-bound: it reads the gradients once for the clip norm, then reads
    and writes every weight, gradient and optimizer state once (memory.estimate.model_state_bytes)."""
    states = model_state_bytes(n_params, dtype, optimizer)
    return (states["grads"] + 2 * sum(states.values())) / bandwidth


def pipeline_time(stage_times: list[float], m: int, schedule: str = "1f1b", virtual_stages: int = 1) -> float:
    """Time from the first micro-batch's forward to the last backward, for per-micro-batch stage
    times t_s: GPipe and 1F1B (m - 1) max t + sum t (balanced: (m + p - 1) t); interleaved 1F1B
    with v virtual stages per rank (Narayanan et al. 2021): m max t + (sum t - max t) / v."""
    if schedule not in ("gpipe", "1f1b", "interleaved"):
        raise ConfigError(f"schedule={schedule!r} has no time rule yet; use 'gpipe', '1f1b' or 'interleaved'")
    slowest = max(stage_times)
    return m * slowest + (sum(stage_times) - slowest) / virtual_stages


@dataclass(frozen=True)
class Term:
    """One row of the step's breakdown: seconds it adds to the step, and seconds hidden by overlap."""

    name: str
    seconds: float
    detail: str
    hidden: float = 0.0


@dataclass
class StepTime:
    """A step's predicted time, its terms (they add up to step_s) and the rates that follow."""

    step_s: float
    terms: list[Term]
    tokens_per_step: int
    world: int
    peak_flops: float
    model_flops: float  # per step, all ranks (no recompute)
    hardware_flops: float  # per step, all ranks, recompute included
    stages: list[dict] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_s * self.world * self.peak_flops)

    @property
    def hfu(self) -> float:
        """Hardware FLOPs utilization: recompute counted (Megatron 2021's 'achieved FLOP/s')."""
        return self.hardware_flops / (self.step_s * self.world * self.peak_flops)

    def train_seconds(self, tokens: float) -> float:
        return tokens / self.tokens_per_s

    def gpu_hours(self, tokens: float) -> float:
        return self.train_seconds(tokens) * self.world / 3600

    def term(self, name: str) -> float:
        """Seconds of the terms whose name starts with `name`."""
        return sum(t.seconds for t in self.terms if t.name.startswith(name))

    def table(self) -> str:
        """Every term, its share of the step and what it is made of."""
        lines = [f"{'term':<50} {'seconds':>10} {'share':>6}  how", "-" * 100]
        for t in self.terms:
            hidden = f" (+{t.hidden:.4g} s hidden by overlap)" if t.hidden > 0 else ""
            share = t.seconds / self.step_s
            lines.append(f"{t.name:<50} {t.seconds:>10.4g} {share:>6.1%}  {t.detail}{hidden}")
        lines.append(f"{'step':<50} {self.step_s:>10.4g} {1:>6.0%}")
        return "\n".join(lines)


def predict_step(cfg: GPTConfig, pcfg: ParallelConfig, cluster: Cluster, *, batch: int,
                 seq: int | None = None, dtype: str = "bf16-mixed", optimizer: str = "adamw",
                 recompute: str = "none",
                 grad_clip: float = 1.0, overlap: bool = True, virtual_stages: int = 1,
                 dp_calls: int | None = None, dp_bucket_bytes: float = DDP_BUCKET_BYTES) -> StepTime:
    """Predict one optimizer step of `batch` sequences of `seq` tokens (see the module docstring).
    `overlap`: the dp/ZeRO collectives hide behind compute as DDP, FSDP and Megatron do (False: a
    scheme that reduces after the flush, as this package's 3D run). `dp_calls`: the dp all-reduce
    calls per step when the scheme's buckets are known (default: one per DDP-sized bucket)."""
    unpadded = cfg
    cfg, _ = padded_for_tp(cfg, pcfg.tp)
    pcfg.validate(cfg, global_batch=batch)
    seq = cfg.block_size if seq is None else seq
    check_context_parallel(pcfg, cfg, seq)
    if not isinstance(virtual_stages, int) or virtual_stages < 1:
        raise ConfigError(f"virtual_stages={virtual_stages!r} must be a positive integer "
                          "(1: no interleaving)")
    m, world = pcfg.microbatches, pcfg.world_size
    tokens = batch // (pcfg.dp * m) * seq  # per micro-batch on one rank
    rate = cluster.rank_flops(min(world, cluster.gpus_per_node))
    sizes = group_sizes(pcfg)
    links = {dim: cluster.link_for(*group_span(dim, pcfg, cluster.gpus_per_node)) for dim in sizes}

    def seconds(c: Collective) -> float:
        return collective_time(c.op, c.nbytes, sizes[c.group], links[c.group], calls=c.calls,
                               efficiency=cluster.comm_efficiency)

    # a ring send hides behind the attention of the block in hand: one layer's forward / cp
    ring_block = layer_forward_flops(cfg, tokens, seq, pcfg.tp, pcfg.cp, pcfg.cp_design)["attention"] / (
        pcfg.cp * rate)

    def exposed(c: Collective) -> float:
        """A micro-batch collective's seconds compute waits for: all of them, or for a ring send
        max(0, send - ring_block) per call."""
        if c.hides_behind != "ring_block":
            return seconds(c)
        return c.calls * max(0.0, seconds(c) / c.calls - ring_block)

    stages = []
    for s in range(pcfg.pp):
        fl = stage_flops(cfg, tokens=tokens, seq=seq, tp=pcfg.tp, pp=pcfg.pp, stage=s, recompute=recompute,
                         cp=pcfg.cp, cp_design=pcfg.cp_design)
        comms = stage_collectives(cfg, pcfg, batch=batch, seq=seq, stage=s, dtype=dtype, grad_clip=grad_clip,
                                  dp_calls=dp_calls, dp_bucket_bytes=dp_bucket_bytes, recompute=recompute)
        row = {"stage": s, "forward": fl["forward"] / rate, "backward": fl["backward"] / rate,
               "recompute": fl["recompute"] / rate, "flops": fl}
        per_micro = {g: sum(exposed(c) for c in comms if c.when == "microbatch" and c.group == g) / m
                     for g in MICROBATCH_GROUPS}
        row.update({f"{g} per microbatch": t for g, t in per_micro.items()})
        row["t"] = row["forward"] + row["backward"] + row["recompute"] + sum(per_micro.values())
        row["after"] = _after_flush(comms, seconds, row, m, overlap)
        n_updated = param_count(cfg, pcfg.tp, pcfg.pp, s, pcfg.ep) / (pcfg.dp if pcfg.zero else 1)
        opt = optimizer_seconds(n_updated, dtype, optimizer, cluster.memory_bandwidth)
        row["after"].append(Term("optimizer step", opt,
                                 f"{opt * cluster.memory_bandwidth / 1e9:.3g} GB (grads read for the norm, "
                                 "every state read and written) / "
                                 f"{cluster.memory_bandwidth / 1e9:.4g} GB/s"))
        row["collectives"] = comms
        stages.append(row)

    pipe = pipeline_time([r["t"] for r in stages], m, pcfg.schedule, virtual_stages)
    busiest = max(stages, key=lambda r: r["t"])
    tail = max(stages, key=lambda r: sum(t.seconds for t in r["after"]))
    at = f"stage {busiest['stage']}, " if pcfg.pp > 1 else ""
    terms = [Term("forward", m * busiest["forward"],
                  f"{at}{m} x {busiest['flops']['forward']:.4g} FLOP / {rate:.4g} FLOP/s"),
             Term("backward", m * busiest["backward"], f"2 x forward ({m} micro-batches)")]
    if recompute != "none":
        terms.append(Term(f"recompute ({recompute})", m * busiest["recompute"],
                          f"{m} x {busiest['flops']['recompute']:.4g} FLOP again"))
    for g in MICROBATCH_GROUPS:
        rows = [c for c in busiest["collectives"] if c.group == g and c.when == "microbatch"]
        for what in dict.fromkeys(c.what for c in rows):  # rows with a `what`: a term each
            mine = [c for c in rows if c.what == what]
            t, whole = sum(exposed(c) for c in mine), sum(seconds(c) for c in mine)
            if whole > 0:
                ring = any(c.hides_behind == "ring_block" for c in mine)
                name = (f"{g} {'+'.join(c.op for c in mine)}{' ' + what if what else ''} "
                        f"({'exposed beyond the block in hand' if ring else 'exposed'})")
                how = _how(mine, sizes[g], links[g], cluster)
                if ring:
                    per_send = whole / sum(c.calls for c in mine)
                    how += (f"; max(0, {per_send * 1e6:.4g} us per send - {ring_block * 1e6:.4g} us of the "
                            "block's attention)")
                terms.append(Term(name, t, how, hidden=whole - t))
    if pcfg.pp > 1:
        terms.append(Term(f"pipeline bubble ({pcfg.schedule})", pipe - m * busiest["t"],
                          f"(m-1) max t + sum t - m max t; balanced: (p-1)/(m+p-1) = "
                          f"{(pcfg.pp - 1) / (m + pcfg.pp - 1):.1%} of the pipeline"
                          + (f", / v={virtual_stages}" if virtual_stages > 1 else "")))
    terms += tail["after"]
    step = pipe + sum(t.seconds for t in tail["after"])
    fpt = model_flops_per_token(unpadded, seq)  # MFU counts the real vocabulary
    hw = sum(r["flops"]["forward"] + r["flops"]["backward"] + r["flops"]["recompute"] for r in stages)
    return StepTime(step_s=step, terms=terms, tokens_per_step=batch * seq, world=world,
                    peak_flops=cluster.peak_flops, model_flops=fpt * batch * seq,
                    hardware_flops=hw * m * pcfg.dp * pcfg.cp * pcfg.tp, stages=stages)


def _how(rows: list[Collective], n: int, link: Link, cluster: Cluster) -> str:
    nbytes, calls = sum(c.nbytes for c in rows), sum(c.calls for c in rows)
    achievable = link.bandwidth * cluster.comm_efficiency / 1e9
    return (f"{calls} calls, {nbytes / 1e6:.4g} MB on {link.name} ({achievable:.3g} GB/s achievable, "
            f"{link.latency * 1e6:.3g} us/step), n={n}")


def _after_flush(comms: list[Collective], seconds, row: dict, m: int, overlap: bool) -> list[Term]:
    """The step's collectives after the flush, each minus the compute `overlap` hides it behind
    (never less than one call: the last bucket or the first gather cannot hide)."""
    windows = {"last_backward": row["backward"], "backward": m * row["backward"],
               "next_forward": row["forward"],
               "compute": m * (row["forward"] + row["backward"] + row["recompute"])}
    out = []
    for c in comms:
        if c.when != "step":
            continue
        t = seconds(c)
        exposed = t
        if overlap and c.hides_behind is not None:
            exposed = max(t - windows[c.hides_behind], t / c.calls)
        hidden = overlap and c.hides_behind is not None
        why = f"behind {c.hides_behind.replace('_', ' ')}" if hidden else "after the flush"
        calls = f"{c.calls} call{'s' if c.calls > 1 else ''}"
        what = f" {c.what}" if c.what else ""
        out.append(Term(f"{c.group} {c.op}{what} ({why})", exposed, f"{calls}, {c.nbytes / 1e6:.4g} MB",
                        hidden=t - exposed))
    return out


def time_summary(st: StepTime, train_tokens: float) -> dict:
    """The prediction as JSON-ready numbers."""
    return {"step_s": st.step_s, "tokens_per_step": st.tokens_per_step, "tokens_per_s": st.tokens_per_s,
            "tokens_per_s_per_gpu": st.tokens_per_s / st.world, "mfu": st.mfu, "hfu": st.hfu,
            "train_tokens": train_tokens, "train_days": st.train_seconds(train_tokens) / 86400,
            "gpu_hours": st.gpu_hours(train_tokens),
            "terms": [{"name": t.name, "seconds": t.seconds, "hidden": t.hidden, "detail": t.detail}
                      for t in st.terms]}


def time_text(st: StepTime, cluster: Cluster, pcfg: ParallelConfig, train_tokens: float,
              tokens_note: str = "") -> str:
    """Where the step's time goes, then what it means: tokens/s, MFU, days and GPU-hours."""
    eff = f"compute at {cluster.compute_efficiency:.0%} of {cluster.peak_flops / 1e12:.4g} TFLOP/s peak"
    lines = [f"step time on {pcfg.world_size} x {cluster.gpu} ({cluster.name}: {cluster.gpus_per_node} per "
             f"node; {eff}; links at {cluster.comm_efficiency:.0%} of their bandwidth):"]
    sizes = group_sizes(pcfg)
    dims = ("tp", "cp", "dp", "dp_cp", "pp") if pcfg.cp > 1 else ("tp", "dp", "pp")
    for dim in ("tp", "dp", "ep", "edp", "pp") if pcfg.ep > 1 else dims:
        n = sizes[dim]
        if n > 1:
            per_node, nodes = group_span(dim, pcfg, cluster.gpus_per_node)
            link = cluster.link_for(per_node, nodes)
            where = "inside one node" if nodes == 1 else f"across {nodes} nodes, {per_node} per node"
            lines.append(f"  {dim} group of {n}: {where} -> {link.name}, {link.bandwidth / 1e9:.4g} GB/s per "
                         f"GPU, {link.latency * 1e6:.3g} us per step")
    lines += ["", st.table(), "",
              f"{st.tokens_per_step:,} tokens per step -> {st.tokens_per_s:,.0f} tokens/s "
              f"({st.tokens_per_s / st.world:,.0f} per GPU); MFU {st.mfu:.1%} (model FLOPs "
              f"{st.model_flops / st.tokens_per_step:.4g} per token / peak), HFU {st.hfu:.1%} (recompute "
              "counted)",
              f"training {train_tokens:.4g} tokens{tokens_note}: "
              f"{st.train_seconds(train_tokens) / 86400:,.3g} days on {st.world} GPUs = "
              f"{st.gpu_hours(train_tokens):,.0f} GPU-hours"]
    return "\n".join(lines)
