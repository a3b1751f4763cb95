"""Tensor parallel (Megatron-LM, Shoeybi et al. 2019) on a plain GPT, from scratch.

    tp_model = parallelize(GPT(config), group, sequence_parallel=False)
    local_logits, loss = tp_model(idx, targets)   # logits (B, T, V/t); loss = full mean CE

Each block, in either family: attention split by heads (GPT-2: c_attn column-parallel, q, k and v
each sharded by heads; Llama: q_proj by query heads, k_proj and v_proj by kv heads; the output
projection row-parallel), the MLP column-then-row (c_fc | gate_proj and up_proj, then c_proj |
down_proj), so a block costs one all-reduce in forward (g) and one in backward (f) per sublayer:
the column-parallel layers of a sublayer share one input and one f. Norms are replicated. The
embedding is vocab-parallel and the output head (wte's shard when tied, its own vocab-parallel
shard when untied) keeps the logits split by vocabulary: the loss is vocab-parallel cross-entropy.
Sequence parallel (Korthikanti et al. 2022) keeps norm/dropout/residual activations split
along the sequence: each all-reduce becomes a reduce-scatter + all-gather pair (same bytes), and
the replicated parameters used there (norms, row biases, wpe) get partial grads that
`sync_sequence_parallel_grads` all-reduces (the model's `.sync_grads()`; call it after backward).
Dropout: call tp_rng.model_parallel_seed(seed, tp_rank) first; replicated regions then draw the
same masks on every rank, per-rank regions (own heads, SP shards) independent ones (tp_rng.py).
`tp_model.generate(idx, n)` is GPT.generate with a KV cache of this rank's kv heads (generate.py).

Parameter names are the plain GPT's, so `gather_params` / `gather_grads` rebuild full tensors
comparable with reference.max_abs_diff.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn

from journey_dist.comm import ledger_by_op
from journey_dist.config import GPTConfig, ParallelConfig, padded_vocab_size
from journey_dist.data import TokenData
from journey_dist.model import GPT, MLP, Block, KVCache, MoE, add_positions, moe_loss
from journey_dist.parallel.common import all_reduce_flat, clip_fn, tp_duplicate
from journey_dist.parallel.tensor.generate import tp_generate
from journey_dist.parallel.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelAttention,
    TensorParallelSwiGLU,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from journey_dist.parallel.tensor.mappings import (
    Group,
    copy_to_region,
    gather_from_sequence,
    tp_rank,
    tp_size,
)
from journey_dist.parallel.tensor.rng import ShardedDropout, model_parallel_seed
from journey_dist.parity import RunResult, fresh_model, measure_one_step, run_and_capture, storage_bytes
from journey_dist.train import StepHooks, TrainConfig, make_optimizer

__all__ = [
    "TensorParallelGPT", "parallelize", "parallelize_block", "gather_params", "gather_grads",
    "gather_tensors", "sync_sequence_parallel_grads",
    "padded_vocab_size", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
]


def _mark_sequence_parallel(module: nn.Module) -> None:
    for p in module.parameters():
        p.sequence_parallel = True


def parallelize_block(block: Block, group: Group = None, *, sequence_parallel: bool = False) -> nn.Module:
    """A tensor-parallel copy of a GPT Block (either family) holding this rank's shards; same forward(x).

    With sequence_parallel, x in and out is (B, S/t, C) and the norm weights (replicated) are
    tagged `sequence_parallel` (their grads need an all-reduce over tp after backward). Raises
    ConfigError when tp does not divide the query or key/value heads.
    """
    tp_block = copy.deepcopy(block)
    tp_block.attn = TensorParallelAttention(block.attn, group, sequence_parallel)
    if isinstance(block.mlp, MoE):  # a mixture of experts stays whole on every tp rank (parallel/expert)
        return tp_block
    if isinstance(block.mlp, MLP):
        mlp, sp = tp_block.mlp, sequence_parallel
        mlp.c_fc = ColumnParallelLinear.from_dense(block.mlp.c_fc, group, sequence_parallel=sp)
        mlp.c_proj = RowParallelLinear.from_dense(block.mlp.c_proj, group, sequence_parallel=sp)
        if sequence_parallel:  # the MLP's output is a sequence shard: per-rank dropout masks
            mlp.dropout = ShardedDropout(block.mlp.dropout.p)
    else:
        tp_block.mlp = TensorParallelSwiGLU(block.mlp, group, sequence_parallel)
    if sequence_parallel:
        _mark_sequence_parallel(tp_block.ln_1)
        _mark_sequence_parallel(tp_block.ln_2)
    return tp_block


class TensorParallelGPT(nn.Module):
    """A GPT whose blocks, embedding and head are split over a tp group (built by `parallelize`)."""

    def __init__(self, model: GPT, group: Group = None, *, sequence_parallel: bool = False,
                 pad_vocab: bool = False):
        super().__init__()
        cfg = model.config
        t = tp_size(group)
        ParallelConfig(tp=t, sequence_parallel=sequence_parallel and t > 1, pad_vocab=pad_vocab).validate(cfg)
        self.config: GPTConfig = cfg
        self.group, self.sequence_parallel = group, sequence_parallel and t > 1
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, t) if pad_vocab else cfg.vocab_size
        sp = self.sequence_parallel
        wte = VocabParallelEmbedding.from_dense(model.transformer.wte, group,
                                                padded_vocab=self.padded_vocab, sequence_parallel=sp)
        # learned positions (wpe) are replicated; RoPE and ALiBi live in the attention
        wpe = {"wpe": copy.deepcopy(model.transformer.wpe)} if "wpe" in model.transformer else {}
        ln_f = copy.deepcopy(model.transformer.ln_f)
        if sp:
            for module in (*wpe.values(), ln_f):
                _mark_sequence_parallel(module)
        # embedding dropout: replicated without SP (same mask on every rank), a shard with SP
        drop = ShardedDropout(model.transformer.drop.p) if sp else copy.deepcopy(model.transformer.drop)
        self.transformer = nn.ModuleDict(dict(
            wte=wte, **wpe, drop=drop,
            h=nn.ModuleList([parallelize_block(b, group, sequence_parallel=sp) for b in model.transformer.h]),
            ln_f=ln_f,
        ))
        if not cfg.tie_embeddings:  # an untied head is split by vocabulary like wte
            head = VocabParallelEmbedding.from_dense(nn.Embedding.from_pretrained(model.lm_head.weight),
                                                     group, padded_vocab=self.padded_vocab)
            self.lm_head = nn.Module()
            self.lm_head.weight = head.weight

    def head_weight(self) -> torch.Tensor:
        return self.transformer.wte.weight if self.config.tie_embeddings else self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """(B, T) ids -> (local logits (B, T, V/t), full mean CE identical on every tp rank).

        With a cache (`kv_cache`: this rank's heads only) the T tokens continue the cache.pos
        cached ones, as in GPT.forward; generation runs without sequence parallel (`generate`).
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than "
                             f"block_size={self.config.block_size}; crop the input to its last "
                             f"{self.config.block_size} tokens")
        if cache is not None and self.sequence_parallel:
            raise ValueError("a KV cache needs sequence parallel off: use generate(), which turns it off")
        tr = self.transformer
        x = tr.wte(idx)  # (B, T, C), or (B, T/t, C) with sequence parallel
        if self.sequence_parallel:
            n = tp_size(self.group)
            if T % n:
                raise ValueError(f"sequence parallel: T={T} tokens is not divisible by tp={n}; use a "
                                 f"sequence length that is a multiple of {n} or turn sequence parallel off")
            start = tp_rank(self.group) * (T // n)
            pos = torch.arange(start, start + T // n, device=idx.device)
        else:
            pos = torch.arange(start, start + T, device=idx.device)
        x = tr.drop(add_positions(x, pos, self.config, tr))
        for i, block in enumerate(tr.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        x = tr.ln_f(x)
        x = gather_from_sequence(x, self.group) if self.sequence_parallel else copy_to_region(x, self.group)
        logits = x @ self.head_weight().t()  # (B, T, V/t): this rank's vocabulary columns
        loss = None
        if targets is not None:
            loss = vocab_parallel_cross_entropy(logits, targets, self.group,
                                                vocab_size=self.config.vocab_size)
            if self.config.n_experts and self.training:  # as GPT.forward: the MoE layers' aux losses
                loss = loss + moe_loss(self)
        return logits, loss

    def kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A KVCache for this rank's K/t key/value heads (GQA: n_kv_head/t, else n_head/t): 1/t of
        the single-process cache's bytes."""
        p = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype,
                       n_head=self.transformer.h[0].attn.n_kv_head)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, greedy: bool = False, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """GPT.generate on the tp group: the same tokens on every tp rank (see tp_generate)."""
        return tp_generate(self, idx, max_new_tokens, temperature, top_k, greedy, use_cache, generator)

    def sync_grads(self) -> None:
        """After backward: all-reduce the partial grads of sequence-parallel params (no-op without SP)."""
        sync_sequence_parallel_grads(self, self.group)

    def hooks(self) -> StepHooks:
        """The loop's hooks: the SP grad sync after backward, and clipping by the norm of the whole
        model (shards' squares summed over tp, replicated parameters counted on tp rank 0 only)."""
        return StepHooks(sync_grads=self.sync_grads,
                         clip=clip_fn([self.group], tp_duplicate(tp_rank(self.group))))


def parallelize(model: GPT, group: Group = None, *, sequence_parallel: bool = False,
                pad_vocab: bool = False) -> TensorParallelGPT:
    """The tensor-parallel version of `model` on `group` (default: the world), this rank's shards.

    Raises ConfigError (config.py) when tp does not divide n_head, the kv heads, the MLP width, or
    vocab_size (unless pad_vocab: the vocabulary is padded to a multiple of tp, padded logits masked
    out of the loss).
    """
    return TensorParallelGPT(model, group, sequence_parallel=sequence_parallel, pad_vocab=pad_vocab)


# ---------------------------------------------------------------- grads, clipping, gathering


def sync_sequence_parallel_grads(module: nn.Module, group: Group = None) -> None:
    """All-reduce (sum, one flat call) the grads of params tagged `sequence_parallel`.

    Forward: nothing. Backward-side: one all-reduce of every such grad, flattened.
    """
    grads = [p.grad for p in module.parameters()
             if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if tp_size(group) > 1:
        all_reduce_flat(grads, group)


def _unshard(local: torch.Tensor, ref: nn.Parameter, group: Group) -> torch.Tensor:
    split = getattr(ref, "tp_split", None)
    if split is None:
        return local.detach().clone()
    dim, parts = split
    shards = [torch.empty_like(local) for _ in range(tp_size(group))]
    dist.all_gather(shards, local.detach().contiguous(), group=group)
    pieces = [s.chunk(parts, dim=dim) for s in shards]
    full = torch.cat([torch.cat([p[i] for p in pieces], dim=dim) for i in range(parts)], dim=dim)
    rows = getattr(ref, "tp_rows", None)
    return full.narrow(dim, 0, rows) if rows is not None else full


def gather_tensors(tp_model: nn.Module, tensors: dict[str, torch.Tensor],
                   group: Group = None) -> dict[str, torch.Tensor]:
    """Full tensors under the plain GPT's names from this rank's shards (collective on the group).

    `tensors` is keyed by tp_model's parameter names (e.g. a RunResult's params or grads). The
    group defaults to tp_model.group (a parallelize_block module has none: pass it).
    """
    group = group if group is not None else getattr(tp_model, "group", None)
    params = dict(tp_model.named_parameters())
    return {name: _unshard(t, params[name], group) for name, t in tensors.items()}


def shard_shapes(tp_model: nn.Module, prefixes: tuple[str, ...] = ("transformer.wte", "transformer.h.0."),
                 group: Group = None) -> dict[str, list[tuple[int, ...]]]:
    """{parameter name: [its shape on tp rank 0, 1, ...]} for the names starting with `prefixes`.

    Collective: an all-gather of the shapes (Python objects) over the tp group."""
    group = group if group is not None else getattr(tp_model, "group", None)
    mine = {k: tuple(p.shape) for k, p in tp_model.named_parameters() if k.startswith(prefixes)}
    everyone: list = [None] * tp_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return {k: [ranks[k] for ranks in everyone] for k in mine}


def gather_params(tp_model: nn.Module, group: Group = None) -> dict[str, torch.Tensor]:
    """Every parameter, full, under the plain GPT's names (collective on the tp group)."""
    return gather_tensors(tp_model, {n: p.detach() for n, p in tp_model.named_parameters()}, group)


def gather_grads(tp_model: nn.Module, group: Group = None) -> dict[str, torch.Tensor]:
    """Every gradient, full, under the plain GPT's names (collective; params without grad skipped)."""
    grads = {n: p.grad for n, p in tp_model.named_parameters() if p.grad is not None}
    return gather_tensors(tp_model, grads, group)


# ---------------------------------------------------------------- analytic comm, parity runs


def analytic_collectives(config: GPTConfig, tp: int, tokens: int, *, sequence_parallel: bool = False,
                         grad_clip: bool = True, micro_steps: int = 1,
                         bytes_per_value: int = 4) -> dict[str, dict[str, float]]:
    """Collectives one rank hands over per optimizer step: {op: {"calls", "bytes"}}.

    `tokens` = B*T of one micro-step. Per layer: 2 all-reduces (g) forward + 2 (f) backward of
    (tokens, C); with SP each becomes an all-gather + reduce-scatter pair (the same buffer). Plus
    the embedding (g fwd | RS fwd, AG bwd), the head input (f bwd | AG fwd, RS bwd), the loss
    (3 all-reduces of (tokens,) fp32), the SP grad sync and the clip norm (once per step). The
    same for both families: GQA and SwiGLU change the shards, not the activations that cross.
    """
    act = tokens * config.n_embd * bytes_per_value
    L, C = config.n_layer, config.n_embd
    out: dict[str, dict[str, float]] = {}

    def add(op: str, calls: int, nbytes: int) -> None:
        row = out.setdefault(op, {"calls": 0, "bytes": 0})
        row["calls"] += calls
        row["bytes"] += nbytes

    m = micro_steps
    if sequence_parallel:
        add("all_gather", m * (4 * L + 2), m * (4 * L + 2) * act)
        add("reduce_scatter", m * (4 * L + 2), m * (4 * L + 2) * act)
    else:
        add("all_reduce", m * (4 * L + 2), m * (4 * L + 2) * act)
    add("all_reduce", 3 * m, 3 * m * tokens * 4)  # vocab-parallel CE, fp32
    if sequence_parallel:  # the replicated params: ln_1, ln_2, both row biases, ln_f, wpe
        norm = 2 * C if config.norm == "layernorm" and config.bias else C  # weight (+ bias); RMSNorm: weight
        per_layer = 2 * norm + (2 * C if config.bias else 0)
        n = L * per_layer + norm + (config.block_size * C if config.positions == "learned" else 0)
        add("all_reduce", 1, n * 4)
    if grad_clip:
        add("all_reduce", 1, 4)
    return out


def run_tensor_parallel(config: GPTConfig, data: TokenData, cfg: TrainConfig, *, group: Group = None,
                        sequence_parallel: bool = False, pad_vocab: bool = False, seed: int = 0,
                        device: torch.device | None = None) -> RunResult:
    """Train parallelize(fresh_model(config, seed)) with the shared loop, then measure one more step.

    The RunResult holds full (gathered) params and first-step grads under the plain GPT's names,
    this rank's parameter bytes, the step's collectives on the tp group next to
    analytic_collectives, and the model (`.model`)."""
    model = parallelize(fresh_model(config, seed), group, sequence_parallel=sequence_parallel,
                        pad_vocab=pad_vocab)
    model_parallel_seed(cfg.seed, tp_rank(group))  # dropout: same default stream on every tp rank
    model = model.to(device) if device is not None else model
    optimizer = make_optimizer(model, cfg)
    hooks = model.hooks()
    run = run_and_capture(model, data, cfg, hooks, name="tp+sp" if model.sequence_parallel else "tp",
                          optimizer=optimizer)
    run.params = gather_tensors(model, run.params)
    run.grads = gather_tensors(model, run.grads)
    run.state_bytes = {"params": storage_bytes(model.parameters())}
    run.comm = ledger_by_op(measure_one_step(model, optimizer, data, cfg, hooks), group)
    tokens = cfg.batch_size // cfg.grad_accum * config.block_size
    run.analytic = analytic_collectives(config, tp_size(group), tokens, grad_clip=cfg.grad_clip > 0,
                                        sequence_parallel=model.sequence_parallel, micro_steps=cfg.grad_accum)
    run.model = model
    return run
