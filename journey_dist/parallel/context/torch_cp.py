"""PyTorch's own context parallel (torch.distributed.tensor.experimental.context_parallel), run on
the same q, k, v as ours, or the exact error it raises here.

torch's context_parallel shards the given buffers along the sequence and replaces
F.scaled_dot_product_attention by its ring attention, which is written for the fused SDPA
kernels' ops (flash, memory-efficient, cuDNN attention). On CPU, SDPA dispatches to another op
(torch 2.13: aten._scaled_dot_product_flash_attention_for_cpu) that has no context-parallel
rule, so the call fails there; forcing SDPA's math backend fails too (its decomposition mixes
plain tensors into the DTensor ops). `compare_torch_context_parallel` tries both and reports each
error instead of skipping silently, and the comparison where torch can run it (CUDA with NCCL).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.experimental import context_parallel
from torch.distributed.tensor.experimental._attention import context_parallel_unshard
from torch.nn.attention import SDPBackend, sdpa_kernel

from journey_dist.parallel.context.parallelize import ContextParallel


def compare_torch_context_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesh: DeviceMesh,
                                   cp: ContextParallel) -> dict[str, dict]:
    """Causal attention of full-sequence q, k, v (B, H, S, D) by torch's context_parallel on the 1-D
    `mesh`, with SDPA's default kernel and with its math backend, next to ours on `cp` (the same
    ranks). Per attempt: {"ran": True, "max_diff": |torch - ours| over the gathered outputs} or
    {"ran": False, "error": "<exception type>: <message>"}. Collective: every mesh rank calls it."""
    ours = cp.gather(cp.attend(*(cp.shard(t, dim=2) for t in (q, k, v)), "sdpa"), dim=2)
    out = {}
    for name, kernel in (("default SDPA", contextlib.nullcontext), ("math backend",
                                                                    lambda: sdpa_kernel([SDPBackend.MATH]))):
        buffers = [t.clone() for t in (q, k, v)]
        try:
            with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2]), kernel():
                local = F.scaled_dot_product_attention(*buffers, is_causal=True)
            theirs = context_parallel_unshard(mesh, [local], [2])[0]
        except (NotImplementedError, RuntimeError) as e:  # what torch raises for an op it cannot shard
            out[name] = {"ran": False, "error": f"{type(e).__name__}: {e}"}
            continue
        out[name] = {"ran": True, "max_diff": (theirs - ours).abs().max().item()}
    return out
