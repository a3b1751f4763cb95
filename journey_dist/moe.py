"""The routing rules of a mixture-of-experts layer, shared by the model's MoE (one process) and
expert parallel (parallel/expert), so both route, drop and balance by the same arithmetic.

Notation: N tokens in this forward on this rank, E experts, k = top_k, C = n_embd. A token's k
choices are (token, expert) *pairs*; the pairs are numbered token-major (token t's choices are
pairs t·k .. t·k + k - 1), which is "token order".

    route          router logits (N, E) -> chosen experts (N, k) and their gate weights (N, k)
    keep_mask      capacity: an expert takes at most `cap` pairs, first come first served in token
                   order over the whole batch (`offsets`: pairs of earlier ranks' tokens)
    plan_dispatch  the kept pairs sorted by expert (stable, so token order within an expert)
    combine        expert outputs back to their tokens, times the gate weights, summed
    balance_loss   Switch/GShard: E/(k·T) · sum_e count_e · P_e (1.0 when the load is even)
    z_loss         ST-MoE: mean over tokens of logsumexp(logits)^2 (keeps logits small)

Why the balance loss takes a global count and a local mean: count_e (pairs that chose expert e)
has no gradient; P_e (the mean router probability of e) has. With the batch spread over D
data-parallel ranks, rank r computes E/(k·T) · sum_e count_e · P_e(r), count_e and T over the whole
batch, P_e(r) over its own tokens. The mean over the D ranks (the logged loss) is the one-process
value, and the mean of their gradients (what data parallel applies) is the one-process gradient:
rank r's tokens enter P_e(r) with weight D/T, as they enter its cross-entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    """What the router decided for N tokens."""

    logits: torch.Tensor  # (N, E) the router's output
    probs: torch.Tensor  # (N, E) fp32 softmax over all experts (the balance loss's P)
    experts: torch.Tensor  # (N, k) chosen expert ids, best first
    weights: torch.Tensor  # (N, k) fp32 gate weights


def route(logits: torch.Tensor, top_k: int, router: str = "topk_softmax") -> Routing:
    """The top-k experts of every token and their gate weights, in fp32.

    "topk_softmax" (Mixtral): softmax over the k chosen logits, so the weights sum to 1 (equal to
    HF's softmax over all, top-k, renormalise). "softmax_topk" (Switch, GShard): softmax over all E
    logits, keep the k largest probabilities as they are (they sum to less than 1).
    """
    lf = logits.float()
    probs = F.softmax(lf, dim=-1)
    if router == "topk_softmax":
        top_logits, experts = lf.topk(top_k, dim=-1)
        weights = F.softmax(top_logits, dim=-1)
    else:
        weights, experts = probs.topk(top_k, dim=-1)
    return Routing(logits, probs, experts, weights)


def expert_counts(experts: torch.Tensor, n_experts: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) int64: pairs per expert (only the kept ones with `keep`)."""
    flat = experts.reshape(-1) if keep is None else experts.reshape(-1)[keep.reshape(-1)]
    return torch.bincount(flat, minlength=n_experts)


def capacity(tokens: int, n_experts: int, top_k: int, factor: float) -> int:
    """Pairs one expert may take from a forward of `tokens` tokens: ceil(factor · tokens · k / E)
    (factor 1: exactly an even share; Megatron's get_capacity)."""
    return math.ceil(factor * tokens * top_k / n_experts)


def keep_mask(experts: torch.Tensor, n_experts: int, cap: int,
              offsets: torch.Tensor | None = None) -> torch.Tensor:
    """(N, k) bool: which pairs fit their expert's capacity `cap`.

    A pair's place in its expert's queue is the number of pairs before it, in token order, that
    chose the same expert, plus `offsets[e]`: the pairs routed to e by tokens that come earlier in
    the global batch (on lower data-parallel ranks). Pairs at place >= cap are dropped.
    """
    flat = experts.reshape(-1)
    onehot = F.one_hot(flat, n_experts)  # (N·k, E)
    place = onehot.cumsum(0).gather(1, flat[:, None]).squeeze(1) - 1
    if offsets is not None:
        place = place + offsets[flat]
    return (place < cap).view_as(experts)


@dataclass
class Dispatch:
    """The kept (token, expert) pairs sorted by expert: rows of the experts' input, in order."""

    token: torch.Tensor  # (M,) token index of each pair
    slot: torch.Tensor  # (M,) which of the token's k choices it is
    counts: torch.Tensor  # (E,) int64 pairs per expert; M = counts.sum()


def plan_dispatch(experts: torch.Tensor, n_experts: int, keep: torch.Tensor | None = None) -> Dispatch:
    """Sort the kept pairs by expert, stably: expert 0's pairs in token order, then expert 1's..."""
    k = experts.size(1)
    flat = experts.reshape(-1)
    pairs = torch.arange(flat.numel(), device=flat.device)
    if keep is not None:
        pairs = pairs[keep.reshape(-1)]
    order = torch.sort(flat[pairs], stable=True).indices
    pairs = pairs[order]
    return Dispatch(pairs // k, pairs % k, torch.bincount(flat[pairs], minlength=n_experts))


def combine(expert_out: torch.Tensor, d: Dispatch, weights: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(M, C) expert outputs, in dispatch order -> (N, C): each token's sum of gate weight x output
    over its kept experts (a token with every pair dropped gets 0: only its residual goes on)."""
    w = weights[d.token, d.slot].to(expert_out.dtype)
    out = expert_out.new_zeros(n_tokens, expert_out.size(1))
    # index_put keeps only the indices for backward (index_add would keep the (M, C) products too)
    return out.index_put((d.token,), expert_out * w[:, None], accumulate=True)


def balance_loss(probs: torch.Tensor, counts: torch.Tensor, tokens: int, top_k: int) -> torch.Tensor:
    """Switch/GShard load balancing, E/(k·T) · sum_e count_e · P_e, P_e = this rank's mean of
    probs[:, e]; count_e = pairs that chose e (before capacity) over the T tokens of the whole batch.
    1.0 when every expert gets T·k/E pairs and 1/E of the probability; E/k when one expert takes
    every token (top-1). HF's load_balancing_loss_func gives k times this (its fractions sum to k)."""
    n_experts = probs.size(1)
    return n_experts / (top_k * tokens) * (counts.to(probs.dtype) * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2 (penalises large logits)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


@dataclass
class RouterStats:
    """One MoE layer's last forward on this rank, detached (for logging)."""

    counts: torch.Tensor  # (E,) pairs per expert before capacity, this rank's tokens
    kept: torch.Tensor  # (E,) pairs per expert after capacity
    balance: torch.Tensor  # the balance loss value (unscaled; this rank's share, see the docstring)
    z: torch.Tensor  # the z-loss value (unscaled)

    @property
    def dropped(self) -> int:
        return int((self.counts - self.kept).sum())


def imbalance(counts: torch.Tensor) -> float:
    """max / mean of pairs per expert: 1.0 is an even load; E means one expert takes everything."""
    c = counts.double()
    return float(c.max() / c.mean()) if c.sum() > 0 else 1.0
