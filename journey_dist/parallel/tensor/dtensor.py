"""The same tensor parallel with PyTorch's library: DTensor + torch.distributed.tensor.parallel.

A declarative plan (module name -> ParallelStyle, as torchtitan writes it) handed to
`parallelize_module`; the loss is `loss_parallel()` cross-entropy on vocab-sharded logits.
The Llama family gets torchtitan's Llama plan: ColwiseParallel q/k/v_proj, gate_proj and up_proj
(torchtitan's wq/wk/wv, w1/w3), RowwiseParallel o_proj and down_proj (wo, w2), the untied output
ColwiseParallel by vocabulary, and PrepareModuleInput on the attention and the MLP so their
input becomes one Replicate DTensor: q, k and v (gate and up) then share one all-reduce of the
input gradient in backward, as our f does (three from_local conversions would make three).
Each rank's attention then runs on n_head/t query and n_kv_head/t kv heads.
GPT-2 needs two things the plan alone cannot say, done by hand here:
- c_attn is a fused (3C, C) q|k|v weight. ColwiseParallel shards rows contiguously, which would
  give rank 0 all of q; so rows are first permuted to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...].
  `gather_dtensor_params` undoes the permutation.
- lm_head is tied to wte: parallelize_module makes a new Parameter per module, so the tie is
  restored afterwards (both are Shard(0) over the vocabulary).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from journey_dist.comm import ledger_by_op
from journey_dist.config import ConfigError, GPTConfig, ParallelConfig
from journey_dist.data import TokenData
from journey_dist.model import GPT
from journey_dist.parallel.common import clip_fn
from journey_dist.parallel.tensor.parallelize import analytic_collectives
from journey_dist.parity import RunResult, fresh_model, measure_one_step, run_and_capture
from journey_dist.train import StepHooks, StepResult, TrainConfig, make_optimizer, train_step


def tp_plan(config: GPTConfig, *, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """The GPT's tensor-parallel plan (either family), torchtitan style."""
    seq = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {
        # vocab-sharded table: partial sums, all-reduced (or reduce-scattered along the sequence)
        "transformer.wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "transformer.ln_f": SequenceParallel() if sequence_parallel else None,
        # logits stay sharded by vocabulary for loss_parallel
        "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False),
    }
    if sequence_parallel and config.positions == "learned":  # this rank's slice (backward: all-gather)
        plan["transformer.wpe"] = PrepareModuleOutput(output_layouts=Replicate(),
                                                      desired_output_layouts=Shard(0))
    if config.separate_qkv:  # torchtitan's Llama: wq/wk/wv colwise, wo rowwise
        attn = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
                "o_proj": RowwiseParallel(output_layouts=seq)}
    else:
        attn = {"c_attn": ColwiseParallel(), "c_proj": RowwiseParallel(output_layouts=seq)}
    if config.mlp == "swiglu":  # torchtitan's w1 (gate), w3 (up) colwise, w2 (down) rowwise
        mlp = {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
               "down_proj": RowwiseParallel(output_layouts=seq)}
    else:
        mlp = {"c_fc": ColwiseParallel(), "c_proj": RowwiseParallel(output_layouts=seq)}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        plan |= {p + "attn." + k: v for k, v in attn.items()} | {p + "mlp." + k: v for k, v in mlp.items()}
        plan |= {  # one Replicate input per sublayer (all-gathered from the sequence shard with SP)
            p + "attn": PrepareModuleInput(input_layouts=(seq, None, None),  # (x, cache, layer)
                                           desired_input_layouts=(Replicate(), None, None)),
            p + "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
        }
        if sequence_parallel:
            plan |= {p + "ln_1": SequenceParallel(), p + "ln_2": SequenceParallel()}
    return {k: v for k, v in plan.items() if v is not None}


def _qkv_by_rank(n_embd: int, t: int) -> torch.Tensor:
    """Row order putting rank r's q, k, v head rows next to each other: [q_0 k_0 v_0 | q_1 ...]."""
    rows = torch.arange(3 * n_embd).view(3, t, n_embd // t)  # (q|k|v, rank, rows)
    return rows.transpose(0, 1).reshape(-1)


def parallelize_with_dtensor(model: GPT, mesh: DeviceMesh, *, sequence_parallel: bool = False) -> GPT:
    """Shard `model` in place over the 1-D `mesh` with the plan; returns it (a GPT of DTensors)."""
    cfg, t = model.config, mesh.size()
    ParallelConfig(tp=t, sequence_parallel=sequence_parallel and t > 1).validate(cfg)
    if cfg.positions == "alibi":  # the plan cannot hand each rank its slice of the per-head slopes
        raise ConfigError("the DTensor plan does not split ALiBi's per-head slopes; use positions 'learned', "
                          "'sinusoidal' or 'rope' here (ours, parallelize(), runs ALiBi)")
    order = _qkv_by_rank(cfg.n_embd, t)
    with torch.no_grad():
        for block in model.transformer.h:
            if not cfg.separate_qkv:
                c = block.attn.c_attn
                c.weight.copy_(c.weight[order])
                if c.bias is not None:
                    c.bias.copy_(c.bias[order])
            # local heads: the projections' outputs are local (B, T, heads/t * D) tensors
            block.attn.n_head //= t
            block.attn.n_kv_head //= t
    parallelize_module(model, mesh, tp_plan(cfg, sequence_parallel=sequence_parallel))
    if cfg.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # restore the tie (one Shard(0) DTensor)
    model.tp_size = t
    return model


_LOSS_PARALLEL = [0]  # open loss_parallel contexts (it cannot nest: the inner exit disables it)


@contextlib.contextmanager
def _loss_parallel_once():
    if _LOSS_PARALLEL[0]:
        yield
        return
    _LOSS_PARALLEL[0] += 1
    try:
        with loss_parallel():
            yield
    finally:
        _LOSS_PARALLEL[0] -= 1


def dtensor_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """train's loss_fn: the model's F.cross_entropy on vocab-sharded logits under loss_parallel."""
    with _loss_parallel_once():
        return model(x, y)[1].full_tensor()


def dtensor_step(*args, **kwargs) -> StepResult:
    """train's step_fn: train_step with forward and backward inside loss_parallel."""
    with _loss_parallel_once():
        return train_step(*args, **kwargs)


def dtensor_hooks() -> StepHooks:
    """The loop's hooks for the DTensor model: loss and steps inside loss_parallel, and clipping by
    the global norm, where DTensor sums a sharded gradient's squares over the mesh itself (one
    scalar all-reduce per sharded parameter, the library's way) and plain gradients count once."""
    return StepHooks(loss=dtensor_loss, step_fn=dtensor_step, clip=clip_fn())


def gather_dtensor_tensors(model: GPT, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full plain tensors from DTensors (collective), with c_attn's rows back in q|k|v order."""
    inverse = torch.argsort(_qkv_by_rank(model.config.n_embd, model.tp_size))
    out = {}
    for name, v in tensors.items():
        full = v.full_tensor() if isinstance(v, DTensor) else v
        full = full.detach().clone()
        out[name] = full[inverse] if name.endswith(("c_attn.weight", "c_attn.bias")) else full  # GPT-2
    return out


def gather_dtensor_params(model: GPT) -> dict[str, torch.Tensor]:
    return gather_dtensor_tensors(model, {n: p for n, p in model.named_parameters()})


def run_dtensor_tp(config: GPTConfig, data: TokenData, cfg: TrainConfig, mesh: DeviceMesh, *,
                   sequence_parallel: bool = False, seed: int = 0) -> RunResult:
    """Train the DTensor-parallel fresh model with the shared loop (RunResult with full tensors),
    then one more step's collectives next to dtensor_analytic_collectives."""
    cuda = mesh.device_type == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
    model = parallelize_with_dtensor(fresh_model(config, seed, device), mesh,
                                     sequence_parallel=sequence_parallel)
    optimizer = make_optimizer(model, cfg)
    hooks = dtensor_hooks()
    run = run_and_capture(model, data, cfg, hooks, name="dtensor", optimizer=optimizer)
    run.params = gather_dtensor_tensors(model, run.params)
    run.grads = gather_dtensor_tensors(model, run.grads)
    run.comm = ledger_by_op(measure_one_step(model, optimizer, data, cfg, hooks), mesh.get_group())
    if not sequence_parallel:
        tokens = cfg.batch_size // cfg.grad_accum * config.block_size
        run.analytic = dtensor_analytic_collectives(model, tokens, grad_clip=cfg.grad_clip > 0)
    run.model = model
    return run


def dtensor_analytic_collectives(model: GPT, tokens: int, *, grad_clip: bool = True) -> dict:
    """Collectives one DTensor TP step (no SP) should issue: ours (same activations, same 3 loss
    all-reduces) except the clip, which reduces one scalar per sharded (DTensor) gradient.

    Every sharded parameter has a sharded gradient but an untied wte: DTensor runs the embedding's
    backward from the replicated output gradient and returns the whole (V, C) gradient on every rank
    (Replicate; AdamW then takes the rank's rows locally), so its norm needs no all-reduce. Tied,
    the head's Shard(0) gradient is added to it and the sum is sharded."""
    out = analytic_collectives(model.config, model.tp_size, tokens, grad_clip=False)
    if grad_clip:
        sharded = sum(isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements)
                      for p in model.parameters())  # Replicate DTensors (row biases) need none
        sharded -= 0 if model.config.tie_embeddings else 1  # the untied wte's gradient is Replicate
        out["all_reduce"]["calls"] += sharded
        out["all_reduce"]["bytes"] += 4 * sharded
    return out
