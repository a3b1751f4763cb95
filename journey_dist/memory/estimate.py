"""Analytic memory estimates (model states). Extended with activations, logits and KV cache
by the memory issue; this core is what ZeRO and LoRA accounting use.
"""

from __future__ import annotations

from journey_dist.config import ConfigError

# bytes per parameter: (weights, gradients, optimizer state) before any sharding
_BYTES = {
    # fp32 training: fp32 weights and grads; AdamW keeps two fp32 moments
    ("fp32", "adamw"): (4, 4, 8),
    ("fp32", "sgd"): (4, 4, 4),  # one momentum buffer
    # mixed precision: 16-bit weights and grads; fp32 master copy + two fp32 moments
    ("bf16-mixed", "adamw"): (2, 2, 12),
    ("fp16-mixed", "adamw"): (2, 2, 12),
    ("bf16-mixed", "sgd"): (2, 2, 8),
    ("fp16-mixed", "sgd"): (2, 2, 8),
    # pure bf16: everything in bf16, moments too
    ("bf16", "adamw"): (2, 2, 4),
    ("bf16", "sgd"): (2, 2, 2),
}


def model_state_bytes(n_params: int, dtype: str = "fp32", optimizer: str = "adamw", dp: int = 1,
                      zero: int = 0, trainable_params: int | None = None) -> dict[str, float]:
    """Per-rank bytes of weights, gradients and optimizer state.

    ZeRO-1 shards optimizer state over dp ranks, ZeRO-2 also gradients, ZeRO-3 also weights.
    Only `trainable_params` (default: all) get gradients and optimizer state.
    """
    opt = "adamw" if optimizer == "none" else optimizer
    if (dtype, opt) not in _BYTES:
        raise ConfigError(f"unknown dtype/optimizer {dtype!r}/{optimizer!r}; dtype in "
                          f"{sorted({d for d, _ in _BYTES})}, optimizer in adamw, sgd, none")
    w, g, o = _BYTES[(dtype, opt)]
    trainable = n_params if trainable_params is None else trainable_params
    if optimizer == "none":
        o = 0
    return {
        "params": n_params * w / (dp if zero >= 3 else 1),
        "grads": trainable * g / (dp if zero >= 2 else 1),
        "optimizer": trainable * o / (dp if zero >= 1 else 1),
    }
