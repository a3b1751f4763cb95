"""3D (and 4D) parallelism: data x tensor x pipeline (x context) parallel on one mesh (journey_dist.mesh).

Every rank holds one pipeline stage (mesh pp coordinate), split `tp` ways inside its tensor
parallel group, and is one of `dp` replicas of that slice. A step is:

    1. each dp replica takes its 1/dp of the global batch, cut into m microbatches;
    2. the pipeline schedule (GPipe or 1F1B, pipeline/schedules.Pipeline) runs over the pp group:
       activations go to the same (dp, tp) slot on the next stage; inside a stage, the tensor
       parallel ops all-reduce over the tp group in forward and backward;
    3. after the flush: the tied embedding's two copies (first and last stage, one tp shard each)
       add their gradients over the pp group, then every gradient is averaged over the dp group;
    4. a clip by the global norm (tp shards summed, replicated tensors counted once, pp summed)
       and the optimizer step, identical on all dp replicas.

So the step equals one process training the whole model on the whole batch, up to float rounding
(tests: 1e-5 on loss, gradients and parameters, fp32, tiny configs).

With cp > 1 (4D) every stage is also split along the sequence (parallel/context/): each cp rank of
a (dp, tp) slot takes S/cp tokens of every microbatch, the stages pass (b, S/cp, C) activations,
attention talks over the cp group (ring, zigzag or Ulysses), the last stage's loss adds its sums
over cp, and step 3's gradient average runs over the dp x cp group (a sum over cp, / dp).

Kept simple on purpose: every tp rank of a stage sends the whole (B, T, C) activation to its
peer on the next stage, so t copies cross each boundary (Megatron sends 1/t each and all-gathers
on arrival); no interleaved stages, no sequence parallel, no ZeRO.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn

from journey_dist.comm import CommLedger
from journey_dist.config import ConfigError, GPTConfig, ParallelConfig
from journey_dist.data import TokenData
from journey_dist.memory.sizes import param_count  # the one per-rank count (no cycle: see _slice_param_bytes)
from journey_dist.mesh import DIMS, Mesh, group_ranks
from journey_dist.model import GPT
from journey_dist.parallel.common import ClipFn, clip_fn, mean_over, sync_dp_grads, tp_duplicate
from journey_dist.parallel.context.accounting import check_context_parallel, step_comm
from journey_dist.parallel.context.parallelize import (
    ContextParallel,
    ContextParallelGPT,
    dp_cp_group,
    dp_cp_ranks,
    sync_cp_grads,
)
from journey_dist.parallel.pipeline.schedules import Pipeline
from journey_dist.parallel.pipeline.stage import GPTStage, stage_layers
from journey_dist.parallel.tensor.layers import VocabParallelEmbedding, vocab_parallel_cross_entropy
from journey_dist.parallel.tensor.mappings import copy_to_region
from journey_dist.parallel.tensor.parallelize import padded_vocab_size, parallelize_block
from journey_dist.parallel.tensor.rng import model_parallel_seed
from journey_dist.parity import RunResult, fresh_model, named_params, run_and_capture
from journey_dist.runtime import comm_device, gather_objects
from journey_dist.train import StepHooks, StepResult, TrainConfig


def check_3d(pcfg: ParallelConfig, model: GPTConfig | None = None, world_size: int | None = None,
             global_batch: int | None = None) -> ParallelConfig:
    """ParallelConfig.validate plus what this 3D composition does not do; ConfigError before any spawn."""
    pcfg.validate(model, world_size, global_batch)
    if model is not None and model.n_experts:
        raise ConfigError(f"n_experts={model.n_experts}: the 3D run's stages have no mixture of experts (no "
                          "balance loss, no expert parallel); run MoE presets in lab 12 (parallel/expert)")
    if pcfg.cp > 1 and model is not None:  # sequences of block_size tokens split over cp
        check_context_parallel(pcfg, model, model.block_size)
    if pcfg.zero:
        raise ConfigError(
            f"zero={pcfg.zero}: the 3D run keeps full optimizer states on every dp replica; "
            f"ZeRO is the data-parallel lab's (zero.py). Use zero=0 here")
    if pcfg.sequence_parallel:
        raise ConfigError(
            "sequence_parallel is not supported by the 3D run (its stages pass whole (B, T, C) "
            "activations); use sequence_parallel=False here (lab 03 shows it with tensor parallel)")
    return pcfg


# ----------------------------------------------------------------------------- the stage


class VocabParallelHead(nn.Module):
    """The output head on rows [r*V/t, (r+1)*V/t) of the (V, C) matrix: local logits (B, T, V/t).

    Forward: f (identity) then x @ W_r^T. Backward: all-reduce (sum) of the input gradient over
    the tp group (f's backward: each rank's vocabulary slice contributes part of dL/dx).
    """

    def __init__(self, weight: nn.Parameter, group: dist.ProcessGroup):
        super().__init__()
        self.weight, self.group = weight, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_region(x, self.group) @ self.weight.t()


class TensorParallelStage(GPTStage):
    """A GPTStage whose modules are split over a tp group: Megatron blocks, a vocab-parallel
    embedding on the first stage, a vocab-parallel head and cross-entropy on the last.

    Names stay GPTStage's (so the plain GPT's). The tied matrix is split by the same vocabulary
    rows on the first stage (wte) and the last (its copy, lm_head), so tp rank r of both holds the
    same rows and `Pipeline.sync_tied_grads` (over the pp group) adds matching shards.
    """

    def __init__(self, model: GPT, stage_index: int, num_stages: int, group: dist.ProcessGroup, *,
                 pad_vocab: bool = False):
        super().__init__(model, stage_index, num_stages)  # plain modules; the last stage's copy of wte
        self.group = group
        vocab = model.config.vocab_size  # padded to a multiple of tp with zero rows if asked
        padded = padded_vocab_size(vocab, dist.get_world_size(group)) if pad_vocab else vocab
        for i in self.layers:
            self.transformer.h[str(i)] = parallelize_block(self.transformer.h[str(i)], group)
        if self.is_first:
            self.transformer["wte"] = VocabParallelEmbedding.from_dense(self.transformer.wte, group,
                                                                        padded_vocab=padded)
        if self.is_last:
            if self.is_first and model.config.tie_embeddings:  # one stage: one shared shard
                weight = self.transformer.wte.weight
            else:
                dense = nn.Embedding.from_pretrained(self.lm_head.weight.detach())  # (V, C), rows split
                weight = VocabParallelEmbedding.from_dense(dense, group, padded_vocab=padded).weight
            self.lm_head = VocabParallelHead(weight, group)

    def loss(self, local_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy from (B, T, V/t) logit shards (three all-reduces over tp, forward;
        padded vocabulary columns masked out)."""
        return vocab_parallel_cross_entropy(local_logits, targets, self.group,
                                            vocab_size=self.config.vocab_size)


def build_3d_stage(model: GPT, mesh: Mesh) -> nn.Module:
    """This rank's slice of `model`: stage mesh.pp_rank of pp, split over its tp group if tp > 1,
    its sequence over its cp group if cp > 1 (same parameter names in every case)."""
    if mesh.pcfg.tp == 1:
        stage = GPTStage(model, mesh.pp_rank, mesh.pcfg.pp)
    else:
        stage = TensorParallelStage(model, mesh.pp_rank, mesh.pcfg.pp, mesh.tp_group,
                                    pad_vocab=mesh.pcfg.pad_vocab)
    if mesh.pcfg.cp > 1:
        stage = ContextParallelGPT(stage, ContextParallel(mesh.cp_group, mesh.pcfg.cp_design))
    return stage


# ----------------------------------------------------------------------------- after the flush


def clip_3d(pipe: Pipeline, mesh: Mesh) -> ClipFn:
    """Clip by the norm of the whole model's gradient, as one process would (parallel/common.py).

    Forward: nothing. After the flush: all-reduce (sum) of one scalar over tp (the shards' squares;
    replicated tensors counted on tp rank 0 only), then of one scalar over pp (stages; the last
    stage's copy of the tied embedding left out). dp replicas hold equal gradients already.
    """
    groups = [g for g, n in ((mesh.tp_group, mesh.pcfg.tp), (mesh.pp_group, mesh.pcfg.pp)) if n > 1]
    tp_copy = tp_duplicate(mesh.tp_rank)
    return clip_fn(groups, lambda p: tp_copy(p) or pipe.is_duplicate(p))


def context_parallel_hooks(hooks: StepHooks, stage: ContextParallelGPT, grad_group: dist.ProcessGroup,
                           dp: int) -> StepHooks:
    """A pipeline's hooks with every cp rank taking its tokens of each microbatch (the schedule then
    passes (b, S/cp, C) activations) and the gradient sync over the dp x cp group (sum, / dp)."""
    step_fn, eval_loss, shard = hooks.step_fn, hooks.eval_loss, stage.cp.shard

    def step(model, optimizer, micro, hooks, **kwargs) -> StepResult:
        return step_fn(model, optimizer, [(shard(x), shard(y)) for x, y in micro], hooks, **kwargs)

    return hooks.with_(step_fn=step, eval_loss=lambda m, x, y: eval_loss(m, shard(x), shard(y)),
                       sync_grads=lambda: sync_cp_grads(stage, grad_group, dp))


# ----------------------------------------------------------------------------- a training run


def three_d_run(config: GPTConfig, data: TokenData, cfg: TrainConfig, mesh: Mesh, *, seed: int = 0,
                ledger: CommLedger | None = None) -> tuple[RunResult, Pipeline]:
    """Train fresh_model(config, seed) on the mesh; cfg.grad_accum is the microbatch count.

    Returns this rank's RunResult (losses: dp-mean per step, the same on every rank; params and
    first-step grads: this rank's slice, after the tied and dp syncs) and its Pipeline. A `ledger`
    records the collectives of the training steps only (not logging or evaluation).
    """
    pcfg = mesh.pcfg
    check_3d(replace(pcfg, microbatches=cfg.grad_accum), config, dist.get_world_size(), cfg.batch_size)
    stage = build_3d_stage(fresh_model(config, seed), mesh).to(comm_device(mesh.pp_group))
    # dropout streams (as Megatron): one default seed per stage (same across its tp group:
    # replicated regions draw the same masks), and a per-tp-rank stream for sharded regions
    model_parallel_seed(cfg.seed + 100 * mesh.pp_rank, mesh.tp_rank)
    pipe = Pipeline(stage, mesh.pp_group, pcfg.schedule)
    hooks = pipe.hooks().with_(sync_grads=lambda: sync_dp_grads(stage, mesh.dp_group),
                               reduce_loss=mean_over(mesh.dp_group), dp_rank=mesh.dp_rank, dp_size=pcfg.dp,
                               clip=clip_3d(pipe, mesh))
    if pcfg.cp > 1:
        hooks = context_parallel_hooks(hooks, stage, dp_cp_group(mesh), pcfg.dp)
    if ledger is not None:
        step_fn = hooks.step_fn

        def step_in_ledger(*args, **kwargs) -> StepResult:
            with ledger:
                return step_fn(*args, **kwargs)

        hooks = hooks.with_(step_fn=step_in_ledger)
    return run_and_capture(stage, data, cfg, hooks, name=f"3d dp{pcfg.dp} tp{pcfg.tp} pp{pcfg.pp}"), pipe


# ----------------------------------------------------------------------------- parity


def reference_slice(full: dict[str, torch.Tensor], config: GPTConfig, mesh: Mesh) -> dict[str, torch.Tensor]:
    """The single-process tensors `full` (GPT names) cut exactly as this rank holds them.

    Loads them into a GPT and builds this rank's stage from it, so the comparison uses the same
    split (layers, tied copy, tp shards) as the run; works for parameters and for gradients.
    """
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(full[name].to(p.device))
    return {k: v.clone() for k, v in named_params(build_3d_stage(model, mesh)).items()}


def parity(run: RunResult, ref: RunResult, config: GPTConfig, mesh: Mesh) -> dict[str, float]:
    """Worst |3D - one process| over all ranks: per-step loss, first-step grads, final params.

    Collective (all-reduce MAX over the world), so every rank gets the same numbers.
    """
    def worst(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
        if ours.keys() != theirs.keys():
            raise KeyError(f"different tensors: {sorted(ours.keys() ^ theirs.keys())}")
        return max((ours[k].float().cpu() - theirs[k].float().cpu()).abs().max().item() for k in ours)

    d = torch.tensor([max(abs(a - b) for a, b in zip(run.losses, ref.losses)),
                      worst(run.grads, reference_slice(ref.grads, config, mesh)),
                      worst(run.params, reference_slice(ref.params, config, mesh))],
                     device=comm_device(mesh.dp_group))
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    return dict(zip(("loss", "grad", "param"), d.cpu().tolist()))


# ----------------------------------------------------------------------------- communication


def comm_by_dim(ledger: CommLedger, mesh: Mesh) -> dict[str, dict[str, dict[str, float]]]:
    """This rank's ledger grouped by mesh dimension: {dim: {op: {calls, bytes, wire_bytes}}}.

    A group is named by the dimension whose ranks it holds ("world" for the whole world; "dp_cp" for
    the dp x cp gradient group of a 4D run). A group of one rank carries no traffic and is skipped.
    """
    dims = {tuple(group_ranks(mesh.rank, d, mesh.pcfg)): d for d in DIMS if getattr(mesh.pcfg, d) > 1}
    if mesh.pcfg.cp > 1 and mesh.pcfg.dp > 1:  # gradients are reduced over dp x cp at once
        dims[tuple(dp_cp_ranks(mesh.rank, mesh.pcfg))] = "dp_cp"
    world = tuple(range(mesh.pcfg.world_size))
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (op, group), row in ledger.summary().items():
        if len(group) == 1:
            continue
        kind = dims.get(group, "world" if group == world else str(list(group)))
        cell = out[kind].setdefault(op, {"calls": 0, "bytes": 0, "wire_bytes": 0.0})
        for key in cell:
            cell[key] += row[key]
    return dict(out)


def expected_comm_per_step(config: GPTConfig, pcfg: ParallelConfig, cfg: TrainConfig,
                           coords: dict[str, int], bytes_per_value: int = 4,
                           seq_len: int | None = None) -> dict[str, dict[str, int]]:
    """Bytes one rank should hand over per training step, {dim: {op: bytes}} (fp32, no autocast).

    Sequences are config.block_size tokens long unless `seq_len` says otherwise (pure: no process
    group, so `journey plan` sizes a run with it before launching one).

    With a = one microbatch's activations, (B/(dp*m), T, C), per microbatch:
      tp all-reduce: 4a per layer of the stage (g after attention and MLP forward, f before them
        backward), + a on the first stage (vocab-parallel embedding), + a and 3 x (B/(dp*m))*T
        fp32 on the last (head input backward, the cross-entropy's max, target logit, sum exp);
      pp send: a forward (not from the last stage), a backward (not from the first), each after a
        64-byte header;
    per step: tp and pp all-reduce 4 bytes each (the clip norm), pp send the tied (V/t, C) grad
    on the first and last stage, dp all-reduce every gradient of the rank's slice.
    With cp > 1 a rank holds T/cp tokens of each microbatch (so a and the cross-entropy's floats
    shrink by cp), the cp group carries context/accounting.step_comm's k/v traffic (and the
    loss's 8-byte all-reduce on the last stage), and the gradient all-reduce runs over dp x cp
    ("dp_cp"; the cp group itself when dp = 1).
    """
    m, tp, pp = cfg.grad_accum, pcfg.tp, pcfg.pp
    s, last = coords["pp"], pcfg.pp - 1
    seq = config.block_size if seq_len is None else seq_len
    tokens = cfg.batch_size // (pcfg.dp * m) * (seq // pcfg.cp)  # this rank's tokens of a microbatch
    a = tokens * config.n_embd * bytes_per_value
    layers = len(stage_layers(config.n_layer, pp)[s])
    clip = 4 if cfg.grad_clip > 0 else 0  # the norm is summed in fp32 (compose.clip_3d)
    out: dict[str, dict[str, int]] = {"tp": {}, "pp": {}, "dp": {}, "cp": {}, "dp_cp": {}}
    if tp > 1:
        per_micro = 4 * layers * a + (a if s == 0 else 0) + (a + 3 * tokens * 4 if s == last else 0)
        out["tp"]["all_reduce"] = m * per_micro + clip
    if pp > 1:
        boundary = (a + 64) * ((s != last) + (s != 0))
        tied = config.tie_embeddings and s in (0, last)
        out["pp"]["send"] = m * boundary + tied * _vocab_rows(config, pcfg) * config.n_embd * bytes_per_value
        out["pp"]["all_reduce"] = clip
    if pcfg.cp > 1:
        ops = step_comm(config, pcfg.cp_design, pcfg.cp, micro_batch=cfg.batch_size // (pcfg.dp * m),
                        seq_len=seq, micro_steps=m, layers=layers, loss=s == last, tp=tp,
                        bytes_per_value=bytes_per_value)
        out["cp"] = {op: row["bytes"] for op, row in ops.items()}
    if pcfg.dp > 1 or pcfg.cp > 1:
        grads = out["dp" if pcfg.cp == 1 else "dp_cp" if pcfg.dp > 1 else "cp"]
        slice_bytes = _slice_param_bytes(config, pcfg, s, bytes_per_value)
        grads["all_reduce"] = grads.get("all_reduce", 0) + slice_bytes
    return {dim: ops for dim, ops in out.items() if ops}


def comm_per_rank(ledger: CommLedger, config: GPTConfig, cfg: TrainConfig, mesh: Mesh) -> list[dict]:
    """Every rank's {"rank", "coords", "comm": comm_by_dim(ledger), "expected": expected_comm_per_step},
    in rank order, on every rank. Collective: one all_gather_object over the world."""
    return gather_objects({"rank": mesh.rank, "coords": mesh.coords, "comm": comm_by_dim(ledger, mesh),
                           "expected": expected_comm_per_step(config, mesh.pcfg, cfg, mesh.coords)})


def comm_matches(rows: list[dict], steps: int) -> bool:
    """True when every rank handed every modelled (group kind, op) exactly its formula's bytes per step
    (`rows` from comm_per_rank over a ledger of `steps` training steps). What the formula leaves out
    (the pipeline's control messages, a schedule all-gather, a loss broadcast) is not compared."""
    return all(r["comm"].get(dim, {}).get(op, {}).get("bytes", 0) / steps == want
               for r in rows for dim, ops in r["expected"].items() for op, want in ops.items())


def _slice_param_bytes(config: GPTConfig, pcfg: ParallelConfig, s: int, bytes_per_value: int) -> int:
    """Parameters held by a rank of stage s, either family: memory.sizes.param_count's split (tp
    shards, the last stage's copy of the tied matrix), the vocabulary padded if pad_vocab. The one
    count the estimator and `journey plan` use; memory/sizes.py is pure arithmetic on a GPTConfig
    importing only config and pipeline/stage, so reading it from here makes no import cycle."""
    padded = config.with_(vocab_size=_vocab_rows(config, pcfg) * pcfg.tp)
    return param_count(padded, pcfg.tp, pcfg.pp, s) * bytes_per_value


def _vocab_rows(config: GPTConfig, pcfg: ParallelConfig) -> int:
    """Rows of the (V, C) matrix on one tp rank (V padded to a multiple of tp if pad_vocab)."""
    vocab = config.vocab_size + (-config.vocab_size % pcfg.tp if pcfg.pad_vocab else 0)
    return vocab // pcfg.tp


def grad_bytes(stage: nn.Module) -> int:
    """Bytes of this rank's gradients (= its parameters): what one dp all-reduce step hands over."""
    return sum(p.numel() * p.element_size() for p in stage.parameters() if p.requires_grad)
