"""Bytes that communication-reduction schemes save, per GPU per step, next to comm.py's volumes:
ZeRO++ (Wang et al. 2023: quantized weights qwZ, hierarchical partitioning hpZ, quantized
gradients qgZ), PowerSGD low-rank gradients (Vogels et al. 2019; torch's DDP hook) and 1-bit Adam
(Tang et al. 2021).

ZeRO++ is counted as its paper counts ZeRO-3: each of the three collectives of a step (weights
all-gathered for forward, again for backward, gradients reduce-scattered) moves about the model
size M = N x 2 bytes per GPU, so ZeRO-3 moves 3M across nodes and ZeRO++ 0.75M.

    zero3_step_bytes(7e9, gpus_per_node=8, qwz=True, hpz=True, qgz=True)["cross_node"]
    powersgd_elements(shapes, rank=4)        # (elements sent, elements of the gradients)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable

from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

from journey_dist.config import ConfigError


def quantized_bytes(numel: float, bits: int, block: int | None = None, scale_bytes: int = 4) -> float:
    """Bytes of numel values at `bits` each, plus one scale per `block` values (block quantization;
    None: no scales counted, as the papers' volume figures do)."""
    if bits not in (1, 2, 4, 8, 16, 32):
        raise ConfigError(f"bits={bits}; use 1, 2, 4, 8, 16 or 32")
    return numel * bits / 8 + (math.ceil(numel / block) * scale_bytes if block else 0)


def zero3_step_bytes(n_params: float, *, gpus_per_node: int, qwz: bool = False, hpz: bool = False,
                     qgz: bool = False, param_bytes: int = 2, block: int | None = None) -> dict[str, float]:
    """One step of ZeRO-3 (+ ZeRO++'s options), bytes per GPU, split by where they travel.

    forward all-gather: M, or int8 with qwZ (M/2) — across nodes;
    backward all-gather: like forward; with hpZ from a secondary copy of the weights sharded
      inside the node only (M at 16 bits, intra-node), which costs M / gpus_per_node of memory;
    gradient reduce-scatter: M, or qgZ's int4 all-to-all (M/4 across nodes, after an intra-node
      int4 hop of the same size).
    Returns the three, their cross-node and intra-node sums, and hpZ's extra memory.
    """
    if n_params <= 0 or gpus_per_node < 1:
        raise ConfigError(f"n_params={n_params} and gpus_per_node={gpus_per_node} must be positive")
    m = n_params * param_bytes
    weights = quantized_bytes(n_params, 8, block) if qwz else m
    grads = quantized_bytes(n_params, 4, block) if qgz else m
    out = {"forward_all_gather": weights, "backward_all_gather": m if hpz else weights,
           "gradient_reduce": grads}
    out["cross_node"] = weights + (0 if hpz else weights) + grads
    out["intra_node"] = (m if hpz else 0) + (grads if qgz else 0)
    out["hpz_extra_memory"] = m / gpus_per_node if hpz else 0
    return out


def powersgd_elements(shapes: Iterable[tuple[int, ...]], rank: int,
                      min_compression_rate: float = 2) -> tuple[int, int]:
    """(elements all-reduced, elements of the gradients) under PowerSGD at `rank`, torch's rule
    (ddp_comm_hooks.powerSGD_hook): a gradient viewed as (shape[0], rest) is sent as P (n x r)
    and Q (m x r) when n·m > min_compression_rate · r(n + m), else whole (biases, LayerNorms)."""
    if rank < 1:
        raise ConfigError(f"rank={rank} must be at least 1")
    sent = total = 0
    for shape in shapes:
        n = shape[0]
        m = math.prod(shape[1:])
        r = min(n, m, rank)
        total += n * m
        sent += r * (n + m) if r * (n + m) * min_compression_rate < n * m else n * m
    return sent, total


def powersgd_defaults() -> dict[str, float]:
    """torch's PowerSGDState defaults, read from its signature: rank 1, plain all-reduce for the
    first start_powerSGD_iter steps, compress only above min_compression_rate."""
    params = inspect.signature(PowerSGDState.__init__).parameters
    return {k: params[k].default for k in ("matrix_approximation_rank", "start_powerSGD_iter",
                                           "min_compression_rate", "use_error_feedback")}


def one_bit_adam_volume(warmup_fraction: float, baseline_bits: int = 16) -> float:
    """1-bit Adam's gradient bytes over a run, as a fraction of plain Adam's at baseline_bits:
    full precision during the warm-up (while Adam's variance settles), then 1 bit per value
    (sign + error feedback; a scale per chunk left out) once the variance is frozen."""
    if not 0 <= warmup_fraction <= 1:
        raise ConfigError(f"warmup_fraction={warmup_fraction} must be within 0..1")
    return warmup_fraction + (1 - warmup_fraction) / baseline_bits
