"""Tensor-parallel layers (Megatron-LM style): column/row parallel Linear, vocab-parallel
embedding and cross-entropy. Each is built from a dense layer's weights (`from_dense`), keeping
only this rank's shard, and tags its parameters so gather/clip helpers know how they are split:

    p.tp_split = (dim, parts)   sharded along `dim`; `parts` > 1 when a fused weight (qkv) is
                                sharded part by part, so the full tensor is a per-part concat
    p.tp_rows = n               the first n rows along the split dim are real (vocab padding)
    p.sequence_parallel = True  replicated, but under sequence parallel each rank sees only its
                                sequence shard, so its grad is partial: all-reduce over tp

Dropout on per-rank data (the attention probabilities of this rank's heads; with sequence
parallel the residual dropout on its shard) draws from the "tp" stream of tp_rng.py.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from journey_dist.config import ConfigError
from journey_dist.model import CausalSelfAttention, KVCache, SwiGLU
from journey_dist.parallel.tensor.mappings import (
    Group,
    copy_to_region,
    gather_from_region,
    gather_from_sequence,
    reduce_from_region,
    reduce_scatter_to_sequence,
    tp_rank,
    tp_size,
)
from journey_dist.parallel.tensor.rng import ShardedDropout, fork_if
from journey_dist.positions import alibi_slopes


def shard_tensor(full: torch.Tensor, dim: int, group: Group, parts: int = 1) -> torch.Tensor:
    """This rank's shard of `full` along `dim`; with parts > 1 each of the `parts` equal pieces
    (e.g. q, k, v of a fused weight) is sharded and the local pieces are concatenated."""
    n, r = tp_size(group), tp_rank(group)
    pieces = full.chunk(parts, dim=dim)
    return torch.cat([p.chunk(n, dim=dim)[r] for p in pieces], dim=dim).detach().clone()


def _param(t: torch.Tensor, *, split: tuple[int, int] | None = None, rows: int | None = None,
           sp: bool = False) -> nn.Parameter:
    p = nn.Parameter(t)
    if split is not None:
        p.tp_split = split
    if rows is not None:
        p.tp_rows = rows
    if sp:
        p.sequence_parallel = True
    return p


def enter_tp_region(x: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """The input of column-parallel layers: f (identity forward, all-reduce backward), or with
    sequence parallel the (B, S/t, C) shard all-gathered (reduce-scatter backward)."""
    return gather_from_sequence(x, group) if sequence_parallel else copy_to_region(x, group)


class ColumnParallelLinear(nn.Module):
    """Y = X A with A split by output columns: rank r holds A_r (out/t outputs).

    Input: full X (f before it: identity fwd, all-reduce bwd), or with sequence parallel the
    (B, S/t, C) shard (all-gather fwd, reduce-scatter bwd). With `input_prepared` the caller has
    done that once for several layers reading the same input (q/k/v, gate/up), so one collective
    serves them all. Output: this rank's out/t columns (or gathered, gather_output=True).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: Group, *,
                 parts: int = 1, gather_output: bool = False, sequence_parallel: bool = False,
                 input_prepared: bool = False):
        super().__init__()
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        self.input_prepared = input_prepared
        self.weight = _param(weight, split=(0, parts))  # (out/t, in)
        self.bias = None if bias is None else _param(bias, split=(0, parts))

    @classmethod
    def from_dense(cls, linear: nn.Linear, group: Group, *, parts: int = 1, **kwargs) -> ColumnParallelLinear:
        w = shard_tensor(linear.weight, 0, group, parts)
        b = None if linear.bias is None else shard_tensor(linear.bias, 0, group, parts)
        return cls(w, b, group, parts=parts, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_prepared:
            x = enter_tp_region(x, self.group, self.sequence_parallel)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X A with A split by input rows: rank r holds A_r and gets X_r (its in/t features).

    The partial products are summed by g (all-reduce fwd, identity bwd), or with sequence
    parallel reduce-scattered along the sequence (all-gather bwd). The bias is replicated and
    added after the sum (once, not t times).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: Group, *,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _param(weight, split=(1, 1))  # (out, in/t)
        self.bias = None if bias is None else _param(bias, sp=sequence_parallel)

    @classmethod
    def from_dense(cls, linear: nn.Linear, group: Group, **kwargs) -> RowParallelLinear:
        w = shard_tensor(linear.weight, 1, group)
        b = None if linear.bias is None else linear.bias.detach().clone()
        return cls(w, b, group, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sequence(y, self.group) if self.sequence_parallel \
            else reduce_from_region(y, self.group)
        return y if self.bias is None else y + self.bias


class TensorParallelAttention(CausalSelfAttention):
    """Causal self-attention on this rank's heads: the same `attend` as model.CausalSelfAttention,
    on H/t query heads and K/t key/value heads.

    GPT-2's fused c_attn is column-parallel with q, k and v each sharded by heads (parts=3), so rank r
    keeps [q_r; k_r; v_r], not rows r*3C/t.. of the fused weight (that would mix q with k). Llama's
    q_proj is split by query heads, k_proj and v_proj by kv heads (t must divide K): rank r's query
    heads r*H/t.. read kv heads r*K/t.., which are on the same rank. The input enters the tp region
    once for all of them (f, or SP's all-gather); the output projection is row-parallel. With
    sequence parallel the input is a (B, S/t, C) shard, gathered first, so attention always sees the
    whole sequence (RoPE and ALiBi read the same absolute positions as one process).
    """

    def __init__(self, attn: CausalSelfAttention, group: Group, sequence_parallel: bool):
        nn.Module.__init__(self)  # no fresh layers: the dense module's weights are sharded below
        t, sp = tp_size(group), sequence_parallel
        if attn.n_head % t or attn.n_kv_head % t:
            raise ConfigError(f"tp={t} must divide n_head={attn.n_head} and the kv heads ({attn.n_kv_head}): "
                              "each rank keeps whole heads; ParallelConfig.validate lists the tp that work")
        self.group, self.sequence_parallel = group, sp
        if hasattr(attn, "c_attn"):
            self.c_attn = ColumnParallelLinear.from_dense(attn.c_attn, group, parts=3, input_prepared=True)
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(self, name, ColumnParallelLinear.from_dense(getattr(attn, name), group,
                                                                    input_prepared=True))
        out = RowParallelLinear.from_dense(attn.out_proj, group, sequence_parallel=sp)
        setattr(self, "c_proj" if hasattr(attn, "c_proj") else "o_proj", out)
        self.n_head, self.n_kv_head, self.head_dim = attn.n_head // t, attn.n_kv_head // t, attn.head_dim
        self.first_head, self.global_heads = tp_rank(group) * self.n_head, attn.n_head
        self.recompute_core = attn.recompute_core  # selective recomputation of the attention core
        self.attn_dropout = copy.deepcopy(attn.attn_dropout)
        # after the output projection: replicated without SP (default stream, the same mask on every
        # rank), a sequence shard with SP (the per-rank "tp" stream); see rng.py
        self.resid_dropout = ShardedDropout(attn.resid_dropout.p) if sp else copy.deepcopy(attn.resid_dropout)
        self.dropout, self.attn_impl = attn.dropout, attn.attn_impl
        self.positions, self.rope_theta = attn.positions, attn.rope_theta

    def head_slopes(self) -> torch.Tensor:
        """ALiBi's slopes are per global head: this rank's slice of them."""
        return alibi_slopes(self.global_heads)[self.first_head:self.first_head + self.n_head]

    def enter_region(self, x: torch.Tensor) -> torch.Tensor:
        """The input's way into the tp region (f: identity forward, all-reduce of the gradient
        backward; with SP, g-bar: all-gather forward, reduce-scatter backward). A wrapper that
        replaces this module's core (context parallel) must enter the same way."""
        return enter_tp_region(x, self.group, self.sequence_parallel)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, T, C) (or (B, T/t, C) with SP) -> same shape. With a cache (model.KVCache holding
        this rank's K/t kv heads), the T new tokens attend to the cache.pos cached ones too."""
        x = self.enter_region(x)  # (B, T, C), T the full sequence
        p = self.dropout if self.training else 0.0
        with fork_if(p > 0, "tp", x.device):  # this rank's heads: its own dropout masks
            y = self.attend(x, cache, layer)  # (B, T, H/t * D)
        return self.resid_dropout(self.out_proj(y))  # (B, T, C), or (B, T/t, C) with SP


class TensorParallelSwiGLU(SwiGLU):
    """Llama's MLP on this rank's F/t hidden channels: gate_proj and up_proj column-parallel (one
    input, entering the tp region once), down_proj row-parallel. SiLU(gate) * up is elementwise,
    so each rank's channels need nothing from the others."""

    def __init__(self, mlp: SwiGLU, group: Group, sequence_parallel: bool):
        nn.Module.__init__(self)  # no fresh layers: the dense module's weights are sharded below
        self.group, self.sequence_parallel = group, sequence_parallel
        self.gate_proj = ColumnParallelLinear.from_dense(mlp.gate_proj, group, input_prepared=True)
        self.up_proj = ColumnParallelLinear.from_dense(mlp.up_proj, group, input_prepared=True)
        self.down_proj = RowParallelLinear.from_dense(mlp.down_proj, group,
                                                      sequence_parallel=sequence_parallel)
        # the output is a sequence shard with SP: per-rank dropout masks
        self.dropout = ShardedDropout(mlp.dropout.p) if sequence_parallel else copy.deepcopy(mlp.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(enter_tp_region(x, self.group, self.sequence_parallel))


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows: rank r holds ids [r*V/t, (r+1)*V/t).

    Ids outside this rank's range look up row 0 and are zeroed, so each rank outputs a partial
    sum; the full embedding is their sum: all-reduce fwd / identity bwd (g), or with sequence
    parallel reduce-scatter fwd / all-gather bwd. `padded_vocab` >= vocab: rows past the real
    vocabulary (zeros, never looked up) make the table divisible by t.
    """

    def __init__(self, weight: torch.Tensor, vocab_size: int, group: Group, *,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel, self.vocab_size = group, sequence_parallel, vocab_size
        self.weight = _param(weight, split=(0, 1), rows=vocab_size)  # (V_padded/t, C)
        self.per_rank = weight.size(0)
        self.start = tp_rank(group) * self.per_rank

    @classmethod
    def from_dense(cls, wte: nn.Embedding, group: Group, *, padded_vocab: int | None = None,
                   sequence_parallel: bool = False) -> VocabParallelEmbedding:
        full = wte.weight.detach()
        vocab = full.size(0)
        padded = padded_vocab or vocab
        if padded % tp_size(group):
            raise ValueError(f"vocab {padded} is not divisible by tp={tp_size(group)}; pad it "
                             "(parallelize(..., pad_vocab=True))")
        if padded > vocab:
            full = torch.cat([full, full.new_zeros(padded - vocab, full.size(1))])
        return cls(shard_tensor(full, 0, group), vocab, group, sequence_parallel=sequence_parallel)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # partial: only this rank's ids
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.group)
        return reduce_from_region(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token CE over logits split by vocabulary, never gathering them (Megatron).

    Forward: all-reduce MAX of the row max, all-reduce SUM of the target logit (held by one
    rank), all-reduce SUM of sum(exp). Backward: none: softmax - onehot is local to each shard.
    """

    @staticmethod
    def forward(ctx, logits, targets, group, start):
        logits = logits.float()
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        local = targets - start
        mine = (local >= 0) & (local < logits.size(-1))  # targets -1 (ignored) are nobody's
        local = local.masked_fill(~mine, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        dist.all_reduce(target_logit, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, mine)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local, mine = ctx.saved_tensors
        g = softmax.clone()
        rows = torch.arange(g.size(0), device=g.device)
        g[rows, local] -= mine.to(g.dtype)
        return g * grad.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, group: Group = None,
                                 *, vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy (targets == -1 ignored) from (..., V/t) logit shards, same on every rank.

    Three all-reduces of (tokens,) floats in forward (max, target logit, sum of exp); no
    communication in backward. Columns at or past `vocab_size` (padding) are masked out.
    """
    per_rank = local_logits.size(-1)
    start = tp_rank(group) * per_rank
    logits = local_logits.reshape(-1, per_rank)
    if vocab_size is not None and start + per_rank > vocab_size:
        padded = torch.arange(start, start + per_rank, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, float("-inf"))
    flat = targets.reshape(-1)
    losses = _VocabParallelCrossEntropy.apply(logits, flat, group, start)
    valid = flat != -1
    return (losses * valid).sum() / valid.sum().clamp(min=1)
