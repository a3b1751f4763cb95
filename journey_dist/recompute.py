"""Activation recomputation: keep less for backward, and recompute the rest when backward needs it.

    none       every block keeps what autograd saves (memory/activations.layer_terms lists it)
    selective  Megatron's "selective" (Korthikanti et al. 2022): only the attention core (scores,
               softmax, attention dropout, probabilities @ v) is recomputed; it is the part that
               grows with s² and costs few FLOPs to redo. The per-layer count drops from
               sbh(34 + 5as/h) to sbh·34 (16-bit, dropout; /t with tensor and sequence parallel).
    full       each block keeps only its input and reruns its whole forward in backward
    ops        a per-op policy (torch's selective activation checkpointing, as torchtitan's
               op-level "selective"): each block is checkpointed, but the outputs of its matmuls
               and of fused attention are saved; everything cheap (norms, GELU, softmax, adds)
               is recomputed

All four give the same gradients (dropout masks are recomputed from the saved RNG state); they
differ in the activations kept (memory/estimate.py models none, selective and full) and in the
extra forward work (benchmarks/recompute.py measures it).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from journey_dist.config import ConfigError
from journey_dist.model import Block, CausalSelfAttention

RECOMPUTE_MODES = ("none", "selective", "full", "ops")

# The ops the per-op policy saves (MUST_SAVE); every other op in a block is recomputed.
SAVED_OPS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
}


def check_recompute(mode: str) -> str:
    """The mode if it is one of RECOMPUTE_MODES, else a ConfigError naming them."""
    if mode not in RECOMPUTE_MODES:
        raise ConfigError(f"recompute={mode!r}; use one of {', '.join(map(repr, RECOMPUTE_MODES))} "
                          "(selective: the attention core, Megatron's default)")
    return mode


def recompute_mode(value: str | bool) -> str:
    """A recompute setting as a mode: True is "full" and False "none" (the older switch)."""
    if isinstance(value, bool):
        return "full" if value else "none"
    return check_recompute(value)


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward: Callable, per_op: bool) -> Callable:
    """forward under torch.utils.checkpoint (non-reentrant) while gradients are recorded."""
    context_fn = (functools.partial(create_selective_checkpoint_contexts, _save_matmuls) if per_op
                  else None)

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation, generation: nothing to keep anyway
            return forward(*args, **kwargs)
        extra = {"context_fn": context_fn} if context_fn else {}
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return run


def set_recompute(model: nn.Module, mode: str) -> nn.Module:
    """Make every transformer block of `model` (a GPT, a pipeline stage, ...) recompute as `mode`
    says; "none" undoes it. Returns the model."""
    check_recompute(mode)
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.recompute_core = mode == "selective"
        if isinstance(module, Block):
            module.__dict__.pop("forward", None)  # back to Block.forward
            if mode in ("full", "ops"):
                module.forward = _checkpointed(module.forward, per_op=mode == "ops")
    return model


# ---------------------------------------------------------------------- what recomputation costs


def _cpu_flash_flops(query, key, value, *args, **kwargs) -> int:  # shapes (shape_wrapper passes them)
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels; PyTorch's CPU flash kernel gets the same formula
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
}


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model(x, y)[1].backward()
    model.zero_grad(set_to_none=True)
    if x.is_cuda:  # wall time of the kernels, not of their launch
        torch.cuda.synchronize(x.device)


def recompute_costs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, modes=RECOMPUTE_MODES, *,
                    rounds: int = 5) -> dict[str, dict]:
    """Forward + backward of `model` on (x, y) under each recompute mode: matmul FLOPs of the
    backward (FlopCounterMode: a recomputed forward runs inside it) and the step's wall time, the
    least of `rounds` rounds that take the modes in turn (so load hits every mode alike). Extra =
    the mode's minus "none"'s: the price of recomputing."""
    flops, best = {}, dict.fromkeys(modes, float("inf"))
    for mode in modes:
        set_recompute(model, mode)
        _step(model, x, y)  # warm-up
        loss = model(x, y)[1]
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            loss.backward()
        model.zero_grad(set_to_none=True)
        flops[mode] = counter.get_total_flops()
    for _ in range(rounds):
        for mode in modes:
            set_recompute(model, mode)
            start = time.perf_counter()
            _step(model, x, y)
            best[mode] = min(best[mode], time.perf_counter() - start)
    set_recompute(model, "none")
    base = modes[0]
    return {m: {"backward_flops": flops[m], "extra_flops": flops[m] - flops[base], "step_s": best[m],
                "extra_s": best[m] - best[base]} for m in modes}
