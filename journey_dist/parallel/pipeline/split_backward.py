"""A stage's backward in two passes, as zero-bubble schedules run it: B, then W later.

    B  the gradient of the stage's input: what the previous stage is waiting for
    W  the gradients of the stage's weights: needed only by the optimizer step, so it can wait

The split is per module. During a forward, a hook records the output of every module that owns
parameters (Linear, LayerNorm, Embedding, ...). B is one `torch.autograd.grad` from the stage's
output to its input *and* to those module outputs: autograd runs only the nodes on the way to
what is asked for, so no weight gradient is computed (a Linear's backward skips its dW matmul),
and the gradient arriving at each module's output is kept. W then runs, module by module,
`torch.autograd.backward(module output, that gradient, inputs=its parameters)`: one hop from
the output to the module's own weights (dW = grad_outputᵀ · input for a Linear), nothing
upstream again. The graph is kept (retain_graph) from B until W frees it, so a microbatch's
activations are held until its W: zero-bubble schedules trade that memory for the bubble.

torch.distributed.pipelining does the same with autograd-graph surgery (`stage_backward_input`
keeps the gradients at the graph nodes where weight subgraphs join); per-module hooks are the
readable version for models whose weights all live in leaf modules, which `BackwardSplit` checks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from journey_dist.config import ConfigError

Captured = list[tuple[nn.Module, torch.Tensor]]  # (module, its output) in forward order


def _owns_parameters(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


class BackwardSplit:
    """B and W for the microbatches of one stage module (see the module docstring)."""

    def __init__(self, stage: nn.Module):
        self.modules = [m for m in stage.modules() if _owns_parameters(m)]
        for m in self.modules:
            if any(_owns_parameters(child) for child in m.modules() if child is not m):
                raise ConfigError(
                    f"{type(m).__name__} uses parameters of its own and has submodules with parameters; "
                    "the zero-bubble split computes W per module from the module's output, so every "
                    "trained parameter must sit in a module without trained submodules; use "
                    "schedule='1f1b' for this stage")

    @contextlib.contextmanager
    def capture(self) -> Iterator[Captured]:
        """Record (module, output) of every parameter-owning module run inside the block."""
        captured: Captured = []
        handles = [m.register_forward_hook(lambda mod, _inp, out: captured.append((mod, out)))
                   for m in self.modules]
        try:
            yield captured
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def input_grad(out: torch.Tensor, grad: torch.Tensor | None, inp: torch.Tensor,
                   captured: Captured) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """B: the gradient of `inp` (None when it needs none, as token ids) and the gradient at each
        captured module output; no weight gradient is computed. Keeps the graph for W."""
        wants_input = inp.requires_grad
        targets = ([inp] if wants_input else []) + [o for _, o in captured]
        grads = torch.autograd.grad(out, targets, grad_outputs=grad, retain_graph=True, allow_unused=True)
        return (grads[0] if wants_input else None), list(grads[1:] if wants_input else grads)

    @staticmethod
    def weight_grad(captured: Captured, output_grads: list[torch.Tensor | None]) -> None:
        """W: accumulate each module's parameter gradients into .grad from its output's gradient;
        frees the graph's saved tensors as it goes."""
        for (module, out), g in zip(captured, output_grads):
            if g is not None:
                params = [p for p in module.parameters(recurse=False) if p.requires_grad]
                torch.autograd.backward(out, g, inputs=params)
