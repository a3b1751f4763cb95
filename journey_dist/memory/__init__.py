"""Memory of training: analytic estimate (estimate.py), measurement (measure.py: exact tensor
ledger on CPU, the caching allocator on CUDA, RSS), measured vs estimated (report.py)."""

from journey_dist.memory.estimate import (
    MemoryEstimate,
    activation_bytes_per_layer,
    estimate_memory,
    kv_cache_bytes,
    model_state_bytes,
    param_count,
)

__all__ = ["MemoryEstimate", "activation_bytes_per_layer", "estimate_memory", "kv_cache_bytes",
           "model_state_bytes", "param_count"]
