"""Hugging Face names and configs for the one model (model.GPT.from_hf / to_hf_state_dict).

GPT-2 (GPT2LMHeadModel): the same names; HF's Conv1D keeps c_attn, c_proj and c_fc weights as
(in, out), ours are nn.Linear (out, in), so those are transposed both ways.

Llama (LlamaForCausalLM), ours <-> HF:

    transformer.wte                   model.embed_tokens
    transformer.h.<i>.ln_1            model.layers.<i>.input_layernorm
    transformer.h.<i>.attn.q_proj     model.layers.<i>.self_attn.q_proj   (k_proj, v_proj, o_proj)
    transformer.h.<i>.ln_2            model.layers.<i>.post_attention_layernorm
    transformer.h.<i>.mlp.gate_proj   model.layers.<i>.mlp.gate_proj      (up_proj, down_proj)
    transformer.ln_f                  model.norm
    lm_head                           lm_head

No weight changes shape or layout: both apply RoPE with rotate_half (positions.apply_rope), so
the q_proj/k_proj row permutation HF's converter applies to Meta's checkpoints is already in
HF's weights. transformers is imported only when a config is built (an optional dependency).
"""

from __future__ import annotations

import re

import torch

from journey_dist.config import ConfigError, GPTConfig

_CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
_LLAMA_NAMES = [  # (ours, HF) name prefixes; {i} is the layer number
    ("transformer.wte.", "model.embed_tokens."),
    ("transformer.h.{i}.ln_1.", "model.layers.{i}.input_layernorm."),
    ("transformer.h.{i}.ln_2.", "model.layers.{i}.post_attention_layernorm."),
    ("transformer.h.{i}.attn.", "model.layers.{i}.self_attn."),
    ("transformer.h.{i}.mlp.", "model.layers.{i}.mlp."),
    ("transformer.ln_f.", "model.norm."),
]


def hf_family(config: GPTConfig) -> str:
    """'gpt2' or 'llama': the transformers architecture that computes exactly this config."""
    if (not config.separate_qkv and config.norm == "layernorm" and config.mlp == "gelu"
            and config.positions == "learned" and config.mlp_dim == 4 * config.n_embd and config.bias):
        return "gpt2"
    if (config.separate_qkv and config.norm == "rmsnorm" and config.mlp == "swiglu"
            and config.positions == "rope"):
        return "llama"
    raise ConfigError(
        f"no Hugging Face architecture computes this config (norm={config.norm!r}, mlp={config.mlp!r}, "
        f"positions={config.positions!r}, n_kv_head={config.n_kv_head}); GPT-2 needs layernorm, gelu "
        "(mlp_hidden 4 x n_embd), learned positions, bias=True and n_kv_head=None; Llama needs "
        "rmsnorm, swiglu, rope and n_kv_head set (e.g. the llama-mini preset)"
    )


def _rename(name: str, pairs: list[tuple[str, str]]) -> str:
    """Replace the first matching source prefix of `name` by its target ({i} carried over)."""
    for src, dst in pairs:
        m = re.match(re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)"), name)
        if m:
            return dst.replace("{i}", m.groupdict().get("i") or "") + name[m.end():]
    return name


def to_hf(config: GPTConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF's names and layouts (copies, so the result can be saved or edited)."""
    if hf_family(config) == "gpt2":
        return {k: (v.t().contiguous() if k.endswith(_CONV1D) else v.clone()) for k, v in state_dict.items()}
    return {_rename(k, _LLAMA_NAMES): v.clone() for k, v in state_dict.items()}


def from_hf(config: GPTConfig, hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict -> our names and layouts (views where nothing changes)."""
    if hf_family(config) == "gpt2":
        sd = {k: v for k, v in hf_state_dict.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        return {k: (v.t() if k.endswith(_CONV1D) else v) for k, v in sd.items()}
    back = [(hf, ours) for ours, hf in _LLAMA_NAMES]
    return {_rename(k, back): v for k, v in hf_state_dict.items()}


def config_from_hf(hf_config) -> GPTConfig:
    """GPTConfig from a transformers GPT2Config or LlamaConfig."""
    if hf_config.model_type == "llama":
        rope = hf_config.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_type={rope['rope_type']!r} (RoPE scaling) is not modelled; only "
                              "plain RoPE ('default'), as in Llama 3 8B/70B")
        if hf_config.head_dim != hf_config.hidden_size // hf_config.num_attention_heads:
            raise ConfigError(f"head_dim={hf_config.head_dim} != hidden_size / num_attention_heads; "
                              "this model derives head_dim from n_embd / n_head")
        if hf_config.attention_bias != hf_config.mlp_bias:
            raise ConfigError("attention_bias != mlp_bias: this model has one bias switch for both")
        return GPTConfig(
            n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
            n_kv_head=hf_config.num_key_value_heads, n_embd=hf_config.hidden_size,
            vocab_size=hf_config.vocab_size, block_size=hf_config.max_position_embeddings,
            mlp_hidden=hf_config.intermediate_size, dropout=0.0, bias=hf_config.attention_bias,
            tie_embeddings=hf_config.tie_word_embeddings, layer_norm_eps=hf_config.rms_norm_eps,
            norm="rmsnorm", mlp="swiglu", positions="rope", rope_theta=float(rope.get("rope_theta", 10000.0)),
        )
    return GPTConfig(
        n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd,
        vocab_size=hf_config.vocab_size, block_size=hf_config.n_positions,
        dropout=0.0, bias=True, tie_embeddings=getattr(hf_config, "tie_word_embeddings", True),
        layer_norm_eps=hf_config.layer_norm_epsilon,
    )


def hf_config_from(config: GPTConfig, attn_implementation: str = "eager"):
    """transformers GPT2Config or LlamaConfig matching a GPTConfig."""
    # deferred: transformers is optional (the [test] extra) and takes seconds to import
    if hf_family(config) == "llama":
        from transformers import LlamaConfig

        hf = LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.mlp_dim,
            num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
            num_key_value_heads=config.kv_heads, max_position_embeddings=config.block_size,
            rms_norm_eps=config.layer_norm_eps, tie_word_embeddings=config.tie_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            attention_bias=config.bias, mlp_bias=config.bias, attention_dropout=config.dropout,
        )
    else:
        from transformers import GPT2Config  # deferred, as above

        hf = GPT2Config(
            n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
            vocab_size=config.vocab_size, n_positions=config.block_size,
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            layer_norm_epsilon=config.layer_norm_eps, activation_function="gelu_new",
            tie_word_embeddings=config.tie_embeddings,
        )
    hf._attn_implementation = attn_implementation
    return hf
