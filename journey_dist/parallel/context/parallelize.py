"""A GPT (or a pipeline stage of one) whose sequence is split over a context-parallel group.

Every rank holds every weight and S/cp tokens of every sequence. Embeddings, norms, MLPs and the
head work token by token, so each rank runs them on its own tokens; only attention needs the
other tokens, and there the design talks over the cp group (ring or zigzag: ring.py; Ulysses:
ulysses.py). Positions are global: the learned / sinusoidal embeddings and RoPE use each token's
position in the full sequence (`ContextParallel.token_positions`), not its index on the rank.

The loss is the mean over every token of the full sequence: each rank sums its tokens' losses,
and one all-reduce over cp adds the sums and the token counts (forward; identity backward, so each
rank's gradient flows from its own tokens). Each rank's weight gradients are then its tokens'
share; `sync_grads` sums them over the cp group (and averages over dp: Megatron reduces weight
gradients over dp x cp in one group).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from journey_dist.config import CP_DESIGNS, ConfigError, GPTConfig, ParallelConfig
from journey_dist.mesh import Mesh, rank_coords
from journey_dist.model import SINUSOIDAL_SCALE, CausalSelfAttention, KVCache
from journey_dist.parallel.common import mean_over
from journey_dist.parallel.context.accounting import check_cp_model
from journey_dist.parallel.context.allgather import allgather_attention
from journey_dist.parallel.context.layout import SequenceLayout
from journey_dist.parallel.context.ring import Ring, ring_attention
from journey_dist.parallel.context.ulysses import ulysses_attention
from journey_dist.parallel.tensor.mappings import reduce_from_region
from journey_dist.positions import apply_rope, rope_tables_at, sinusoidal_table
from journey_dist.train import StepHooks

Group = dist.ProcessGroup | None
BASELINES = ("allgather",)  # benchmarks/context_parallel.py's yardstick (allgather.py), not a config choice


@dataclass
class ContextParallel:
    """The cp group and the design ('ring', 'zigzag' or 'ulysses'; 'allgather': the benchmark's
    baseline) every attention layer shares."""

    group: Group
    design: str = "ring"
    ring: Ring = field(init=False)

    def __post_init__(self) -> None:
        if self.design not in CP_DESIGNS + BASELINES:
            raise ConfigError(f"cp design {self.design!r} is unknown; use one of {', '.join(CP_DESIGNS)}")
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.layout = SequenceLayout(self.size, "zigzag" if self.design == "zigzag" else "plain")
        self.ring = Ring(self.group, self.layout)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a full-sequence tensor, sequence along `dim` (a copy, no communication)."""
        return self.layout.shard(x, self.rank, dim)

    def gather(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The full-sequence tensor from every rank's tokens (one all-gather; for checks)."""
        return self.layout.gather(local, self.group, dim)

    def token_positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        """(S/cp,) the global position of each of this rank's tokens (what embeddings and RoPE use)."""
        return self.layout.positions(local_len * self.size, self.rank, device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_impl: str) -> torch.Tensor:
        """Causal attention of this rank's tokens over the whole sequence, by the design."""
        if self.design == "ulysses":
            return ulysses_attention(q, k, v, self.group, attn_impl)
        if self.design == "allgather":
            return allgather_attention(q, k, v, self.group,
                                       self.layout.positions(q.size(2) * self.size, self.rank, q.device))
        return ring_attention(q, k, v, self.ring)


class ContextParallelAttention(nn.Module):
    """A block's attention with its projections (plain or tensor-parallel, the same modules under
    the same names) and its core replaced by the context-parallel design."""

    def __init__(self, attn: nn.Module, cp: ContextParallel, config: GPTConfig):
        super().__init__()
        for name, child in attn.named_children():  # c_attn/c_proj or q/k/v/o_proj, dropouts
            setattr(self, name, child)
        self.n_head, self.head_dim = attn.n_head, attn.head_dim  # this module's (tp-local) heads
        self.n_kv_head = getattr(attn, "n_kv_head", attn.n_head) if config.separate_qkv else attn.n_head
        self.cp, self.config = cp, config
        # a tensor-parallel attention's input mapping (f: its input gradient all-reduced over tp)
        self.enter_region = getattr(attn, "enter_region", lambda x: x)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        if cache is not None:
            raise ValueError("context parallel trains on split sequences; generate with the plain model")
        x = self.enter_region(x)
        B, T, _ = x.shape
        q, k, v = CausalSelfAttention.qkv(self, x)  # the model's projections and head split
        if self.config.positions == "rope":  # each token turned by its global position
            cos, sin = rope_tables_at(self.cp.token_positions(T, x.device), self.head_dim,
                                      self.config.rope_theta, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.cp.attend(q, k, v, self.config.attn_impl)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        out = self.c_proj if hasattr(self, "c_proj") else self.o_proj
        return self.resid_dropout(out(y))


class ContextParallelGPT(nn.Module):
    """`model` (a GPT, or a pipeline stage: GPTStage or its tensor-parallel form) on cp ranks.

    It takes `model` over: the same modules under the same names (parity compares them name for
    name), each block's attention swapped in place for its context-parallel form (a tensor-parallel
    stage holds process groups, which cannot be deep-copied). forward takes this rank's tokens:
    ids (B, S/cp) on the first stage, activations (B, S/cp, C) elsewhere; the last stage returns
    (B, S/cp, V) logits.
    """

    def __init__(self, model: nn.Module, cp: ContextParallel):
        super().__init__()
        check_cp_model(model.config)
        self.config, self.cp = model.config, cp
        self.transformer = model.transformer
        if hasattr(model, "lm_head"):
            self.lm_head = model.lm_head
        self.is_first, self.is_last = getattr(model, "is_first", True), getattr(model, "is_last", True)
        self._inner = (model,)  # a tuple: its modules are registered here already, under these names
        for block in self.blocks():
            block.attn = ContextParallelAttention(block.attn, cp, self.config)

    def blocks(self) -> list[nn.Module]:
        h = self.transformer.h
        return list(h.values()) if isinstance(h, nn.ModuleDict) else list(h)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, S/cp) ids of this rank's tokens -> (B, S/cp, C), positions global."""
        tr, kind = self.transformer, self.config.positions
        x = tr.wte(idx)
        if kind in ("learned", "sinusoidal"):
            pos = self.cp.token_positions(idx.size(1), idx.device)
            x = x + (tr.wpe(pos) if kind == "learned" else
                     SINUSOIDAL_SCALE * sinusoidal_table(pos, self.config.n_embd).to(x.dtype))
        return tr.drop(x)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        """This rank's tokens in, its (B, S/cp, ...) output out; with `targets` (this rank's, on
        the last stage) (logits, loss) as GPT.forward, the loss over the full sequence."""
        if self.is_first:
            if x.size(1) * self.cp.size > self.config.block_size:
                raise ValueError(f"{x.size(1)} tokens per rank x cp={self.cp.size} is longer than "
                                 f"block_size={self.config.block_size}; use shorter sequences")
            x = self.embed(x)
        for block in self.blocks():
            x = block(x)
        if not self.is_last:
            return x
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits if targets is None else (logits, self.loss(logits, targets))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every token of the full sequence (targets == -1 ignored), the
        same on every cp rank. Forward: one all-reduce (sum) of [this rank's loss sum, its token
        count] over cp. Backward: identity (each rank's logits get d(mean)/d(its own losses))."""
        count = (targets != -1).sum()
        inner = self._inner[0]
        if hasattr(inner, "loss") and not isinstance(self.lm_head, nn.Linear):  # e.g. vocab-parallel
            local = inner.loss(logits, targets) * count
        else:
            local = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                    ignore_index=-1, reduction="sum")
        both = reduce_from_region(torch.stack([local, count.to(local.dtype)]), self.cp.group)
        return both[0] / both[1]

    # a pipeline stage's interface, where `model` was one
    def boundary_shape(self, micro_shape) -> tuple[int, ...]:
        return (micro_shape[0], micro_shape[1], self.config.n_embd)

    def tied_weight(self):
        inner = self._inner[0]
        return inner.tied_weight() if hasattr(inner, "tied_weight") else None

    def unique_parameters(self) -> list[nn.Parameter]:
        inner = self._inner[0]
        return inner.unique_parameters() if hasattr(inner, "unique_parameters") else list(self.parameters())

    # the loop's contract, for a cp-only run
    def hooks(self, grad_group: Group = None, dp: int = 1, dp_rank: int = 0,
              dp_group: Group = None) -> StepHooks:
        """StepHooks for cp (x dp): each rank takes its tokens of its dp share of the batch; after
        backward every gradient is summed over `grad_group` (default: the cp group; with dp, the
        dp x cp group) and divided by dp; the logged loss is averaged over dp."""
        group = self.cp.group if grad_group is None else grad_group
        cp = self.cp
        return StepHooks(loss=lambda m, x, y: m(cp.shard(x), cp.shard(y))[1],
                         sync_grads=lambda: sync_cp_grads(self, group, dp),
                         reduce_loss=None if dp == 1 else mean_over(dp_group),
                         dp_rank=dp_rank, dp_size=dp)


def sync_cp_grads(module: nn.Module, group: Group, dp: int = 1) -> None:
    """After backward: all-reduce (sum) every gradient over `group` (cp, or dp x cp), then / dp.

    Forward: nothing. Each cp rank's gradient is its tokens' share of the full sequence's (the
    loss divides by all tokens), so the sum is the whole gradient; dp replicas are averaged.
    """
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            if dp > 1:
                p.grad.div_(dp)


def dp_cp_ranks(rank: int, pcfg: ParallelConfig) -> list[int]:
    """Global ranks holding the same (pp, tp) slice as `rank`: every cp rank of every dp replica."""
    c = rank_coords(rank, pcfg)
    return [r for r in range(pcfg.world_size)
            if rank_coords(r, pcfg)["pp"] == c["pp"] and rank_coords(r, pcfg)["tp"] == c["tp"]]


def dp_cp_group(mesh: Mesh) -> dist.ProcessGroup:
    """This rank's dp x cp group, where weight gradients are reduced (as Megatron does).
    Collective: every rank creates every such group, in the same order."""
    groups = sorted({tuple(dp_cp_ranks(r, mesh.pcfg)) for r in range(mesh.pcfg.world_size)})
    mine, _ = dist.new_subgroups_by_enumeration([list(g) for g in groups])
    return mine
