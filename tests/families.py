"""The two model families every parallel scheme's tests run, at test size.

gpt2: the `tiny` preset (LayerNorm, GELU MLP, learned positions, fused multi-head attention,
biases, tied head). llama: llama-mini's switches at tiny's size (RMSNorm, SwiGLU of width 64,
RoPE, grouped-query attention with 2 kv heads for 4 query heads, no biases, untied head), so
tp=2 splits the kv heads too.
"""

from __future__ import annotations

from journey_dist.config import GPTConfig, get_preset

FAMILIES = ("gpt2", "llama")


def tiny(family: str, **overrides) -> GPTConfig:
    """The family's test-size config (2 layers, 4 heads, width 32, bytes, 32 tokens), with overrides."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}; use one of {FAMILIES}")
    base = get_preset("tiny") if family == "gpt2" else \
        get_preset("llama-mini", n_layer=2, n_embd=32, mlp_hidden=64, block_size=32)
    return base.with_(**overrides) if overrides else base
