"""FLOPs of a training step from the model's shapes: per layer, per pipeline stage, per token.

One multiply-add is 2 FLOPs. For t tokens of sequence length s, one block's forward is

    linears      2 t x (its weight-matrix elements)  (GPT-2: 12 h^2; Llama: q, o a*d*h each, k, v
                 kv*d*h each (GQA), gate/up/down 3 f h)
    attention    4 t s a d  (q k^T: 2 t s a d, scores x v: 2 t s a d; every query against all s keys,
                 as Megatron and PaLM count it: the causal mask's zeros are counted too)

and the output head 2 t V h. A mixture of experts' block replaces the MLP's 2 t (its matrices) by

    router       2 t E h
    experts      2 t k x (one expert's matrices): each token's k pairs through one expert each
                 (no token dropped; under expert parallel each rank's experts take t k rows when the
                 load is even, so ep does not change a rank's FLOPs)
    shared       2 t x (the shared expert's matrices), if any

and the MoE runs whole on every tp rank (parallel/expert: only attention is split over tp).
A backward is twice its forward (a gradient for the input and one
for the weight per matmul); full recompute runs every block's forward again; selective recompute
(Korthikanti et al. 2022) only attention's q k^T, softmax and scores x v. The embedding lookup,
norms, activations, softmax and the optimizer are not counted (memory-bound, timed elsewhere).

So the model FLOPs of a step (forward + backward, no recompute) are 6 N_mm t + 12 L s a d t, with
N_mm the matrix parameters the tokens pass through (blocks + head): Kaplan's 6N plus attention.
For a mixture of experts N_mm counts a token's active parameters (the router, k experts, the shared
expert: memory.sizes.active_param_count without embeddings, norms and biases).
MFU divides these by peak; recompute counts in the time but not in MFU.

Under context parallel (cp ranks split each sequence, parallel/context/) a rank runs the linears
and the head on its t/cp tokens and its share of attention (`cp_attention_share`), counted as
above (4 t s a d in all, so cp changes who computes, not how much); the step waits for the
busiest rank. The share is the busiest rank's score entries over all ranks' (layout.py's
rank_blocks: the blocks ring attention computes, fully masked ones skipped):
    ring (plain)  rank r holds chunk r and computes r + 1 blocks: the last rank cp of the
                  cp (cp + 1) / 2, a share of 2 / (cp + 1) (imbalance 2cp / (cp + 1))
    zigzag        every rank the same 2cp + 1 half-chunk blocks: 1 / cp
    ulysses       all S tokens of a / cp heads: 1 / cp
"""

from __future__ import annotations

from journey_dist.config import ConfigError, GPTConfig
from journey_dist.memory.sizes import layer_matrix_params, moe_tensors
from journey_dist.parallel.context.layout import SequenceLayout, rank_blocks
from journey_dist.parallel.pipeline.stage import stage_layers

RECOMPUTE = ("none", "selective", "full")
CP_DESIGNS = ("ring", "zigzag", "ulysses")


def cp_attention_share(seq: int, cp: int = 1, design: str = "ring") -> float:
    """The busiest cp rank's share of a sequence's attention: its score entries over all ranks'
    (the blocks ring attention computes: layout.rank_blocks); Ulysses splits the heads: 1 / cp."""
    if design not in CP_DESIGNS:
        raise ConfigError(f"cp_design={design!r}; use one of {', '.join(CP_DESIGNS)}")
    if cp == 1 or design == "ulysses":
        return 1 / cp
    layout = SequenceLayout(cp, "zigzag" if design == "zigzag" else "plain")
    layout.check(seq)
    entries = [sum(len(q) * len(k) for q, k, _ in rank_blocks(layout, seq, r)) for r in range(cp)]
    return max(entries) / sum(entries)


def moe_matrix_params(cfg: GPTConfig) -> dict[str, int]:
    """A mixture of experts' matrix elements per block: {"router", "expert" (one expert), "shared"}
    (memory.sizes.moe_tensors' names; all zero for a dense model)."""
    out = {"router": 0, "expert": 0, "shared": 0}
    if not cfg.n_experts:
        return out
    prefixes = {"router": "mlp.router.", "expert": "mlp.experts.0.", "shared": "mlp.shared_expert."}
    for p in moe_tensors(cfg):
        for kind, prefix in prefixes.items():
            if p.matrix and p.name.startswith(prefix):
                out[kind] += p.numel
    return out


def active_layer_matrix_params(cfg: GPTConfig, tp: int = 1) -> float:
    """The block's matrix elements one token passes through on one tp rank: every matrix of a dense
    block (split over tp); attention's (split) plus the router, k experts and the shared expert
    (whole on every tp rank) for a mixture of experts."""
    if not cfg.n_experts:
        return layer_matrix_params(cfg, tp)
    moe = moe_matrix_params(cfg)
    all_moe = sum(p.numel for p in moe_tensors(cfg) if p.matrix)
    attention = layer_matrix_params(cfg, tp) - all_moe  # the MoE's matrices are not split over tp
    return attention + moe["router"] + cfg.moe_top_k * moe["expert"] + moe["shared"]


def layer_forward_flops(cfg: GPTConfig, tokens: float, seq: int, tp: int = 1, cp: int = 1,
                        cp_design: str = "ring") -> dict[str, float]:
    """One block's forward on one tensor-parallel rank: {"linears", "attention"} FLOPs (a mixture of
    experts adds {"router", "experts", "shared"}, counted in "linears" too). tp splits attention's
    matrices and heads evenly and a dense MLP's columns/rows; an MoE runs whole on every tp rank.
    `tokens` are the micro-batch's (whole sequences of `seq`); a cp rank takes tokens / cp of them
    through the linears and the busiest rank's share of attention (`cp_attention_share`)."""
    share = cp_attention_share(seq, cp, cp_design)
    out = {"linears": 2 * tokens / cp * active_layer_matrix_params(cfg, tp),
           "attention": 4 * tokens * seq * cfg.n_head * cfg.head_dim / tp * share}
    tokens = tokens / cp
    if cfg.n_experts:
        moe = moe_matrix_params(cfg)
        out.update(router=2 * tokens * moe["router"], experts=2 * tokens * cfg.moe_top_k * moe["expert"],
                   shared=2 * tokens * moe["shared"])
    return out


def head_forward_flops(cfg: GPTConfig, tokens: float, tp: int = 1) -> float:
    """The output head's forward: logits = x W^T, (V/t, h) per tp rank."""
    return 2 * tokens * cfg.vocab_size * cfg.n_embd / tp


def stage_flops(cfg: GPTConfig, *, tokens: float, seq: int, tp: int = 1, pp: int = 1, stage: int = 0,
                recompute: str = "none", cp: int = 1, cp_design: str = "ring") -> dict[str, float]:
    """FLOPs of one micro-batch of `tokens` tokens on one rank of pipeline `stage`:
    {"forward", "backward", "recompute"} (the head on the last stage); under cp the busiest rank's."""
    if recompute not in RECOMPUTE:
        raise ConfigError(f"recompute={recompute!r}; use one of {', '.join(RECOMPUTE)}")
    layers = len(stage_layers(cfg.n_layer, pp)[stage])
    per_layer = layer_forward_flops(cfg, tokens, seq, tp, cp, cp_design)
    blocks = layers * (per_layer["linears"] + per_layer["attention"])
    head = head_forward_flops(cfg, tokens / cp, tp) if stage == pp - 1 else 0.0
    again = {"none": 0.0, "selective": layers * per_layer["attention"], "full": blocks}[recompute]
    return {"forward": blocks + head, "backward": 2 * (blocks + head), "recompute": again}


def model_flops_per_token(cfg: GPTConfig, seq: int) -> float:
    """Forward + backward FLOPs per token of the whole model (no recompute):
    6 N_mm + 12 L s a d, N_mm = L x (a block's matrices a token passes through) + V h (the head)."""
    n_mm = cfg.n_layer * active_layer_matrix_params(cfg) + cfg.vocab_size * cfg.n_embd
    return 6 * n_mm + 12 * cfg.n_layer * seq * cfg.n_head * cfg.head_dim


def attention_share(cfg: GPTConfig, seq: int) -> float:
    """The part of model_flops_per_token spent in attention's two matmuls."""
    return 12 * cfg.n_layer * seq * cfg.n_head * cfg.head_dim / model_flops_per_token(cfg, seq)
