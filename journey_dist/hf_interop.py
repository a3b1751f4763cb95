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

Mixtral (MixtralForCausalLM): Llama's names for everything but the MoE layer, whose experts HF
keeps as two 3-D tensors (transformers 5):

    transformer.h.<i>.mlp.router                      model.layers.<i>.mlp.gate
    transformer.h.<i>.mlp.experts.<e>.gate_proj (F, C)  model.layers.<i>.mlp.experts.gate_up_proj[e][:F]
    transformer.h.<i>.mlp.experts.<e>.up_proj (F, C)    model.layers.<i>.mlp.experts.gate_up_proj[e][F:]
    transformer.h.<i>.mlp.experts.<e>.down_proj (C, F)  model.layers.<i>.mlp.experts.down_proj[e]

HF's router takes softmax over all experts, the top k, and renormalises: the softmax over the k
chosen logits, our moe_router="topk_softmax". HF drops no tokens (no capacity factor).
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


_EXPERT = re.compile(r"transformer\.h\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_HF_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_MIXTRAL_NAMES = [("transformer.h.{i}.mlp.router.", "model.layers.{i}.mlp.gate.")] + _LLAMA_NAMES


def hf_family(config: GPTConfig) -> str:
    """'gpt2', 'llama' or 'mixtral': the transformers architecture that computes exactly this config."""
    llama_like = (config.separate_qkv and config.norm == "rmsnorm" and config.mlp == "swiglu"
                  and config.positions == "rope")
    if config.n_experts:
        if (llama_like and not config.bias and config.moe_router == "topk_softmax"
                and config.moe_capacity_factor is None and not config.moe_shared_hidden
                and config.moe_hidden is None):
            return "mixtral"
        raise ConfigError(
            "no Hugging Face architecture computes this mixture of experts; Mixtral needs the Llama "
            "layout (rmsnorm, swiglu, rope, n_kv_head set, bias=False), moe_router='topk_softmax', no "
            "capacity factor, no shared expert and moe_hidden=None (set mlp_hidden: the expert width), "
            "as the mixtral-mini preset")
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
    family = hf_family(config)
    if family == "gpt2":
        return {k: (v.t().contiguous() if k.endswith(_CONV1D) else v.clone()) for k, v in state_dict.items()}
    if family == "llama":
        return {_rename(k, _LLAMA_NAMES): v.clone() for k, v in state_dict.items()}
    out, experts = {}, {}
    for k, v in state_dict.items():
        m = _EXPERT.fullmatch(k)
        if m is None:
            out[_rename(k, _MIXTRAL_NAMES)] = v.clone()
        else:
            experts[(int(m.group(1)), int(m.group(2)), m.group(3))] = v
    for i in range(config.n_layer):
        prefix = f"model.layers.{i}.mlp.experts."
        out[prefix + "gate_up_proj"] = torch.stack([torch.cat([experts[(i, e, "gate_proj")],
                                                               experts[(i, e, "up_proj")]])
                                                    for e in range(config.n_experts)])
        out[prefix + "down_proj"] = torch.stack([experts[(i, e, "down_proj")]
                                                 for e in range(config.n_experts)])
    return out


def from_hf(config: GPTConfig, hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict -> our names and layouts (views where nothing changes)."""
    if hf_family(config) == "gpt2":
        sd = {k: v for k, v in hf_state_dict.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        return {k: (v.t() if k.endswith(_CONV1D) else v) for k, v in sd.items()}
    family = hf_family(config)
    back = [(hf, ours) for ours, hf in (_LLAMA_NAMES if family == "llama" else _MIXTRAL_NAMES)]
    out = {}
    for k, v in hf_state_dict.items():
        m = _HF_EXPERTS.fullmatch(k) if family == "mixtral" else None
        if m is None:
            out[_rename(k, back)] = v
            continue
        prefix = f"transformer.h.{m.group(1)}.mlp.experts."
        for e in range(v.size(0)):
            if m.group(2) == "down_proj":
                out[f"{prefix}{e}.down_proj.weight"] = v[e]
            else:
                gate, up = v[e].chunk(2)
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate, up
    return out


def config_from_hf(hf_config) -> GPTConfig:
    """GPTConfig from a transformers GPT2Config, LlamaConfig or MixtralConfig."""
    if hf_config.model_type == "mixtral":
        if hf_config.sliding_window is not None:
            raise ConfigError(f"sliding_window={hf_config.sliding_window} is not modelled; only full causal "
                              "attention (sliding_window=None)")
        if hf_config.router_jitter_noise:
            raise ConfigError("router_jitter_noise > 0 is not modelled; use 0")
        llama_like = _llama_config(hf_config, bias=False)
        return llama_like.with_(n_experts=hf_config.num_local_experts,
                                moe_top_k=hf_config.num_experts_per_tok,
                                moe_aux_coef=float(hf_config.router_aux_loss_coef))
    if hf_config.model_type == "llama":
        if hf_config.attention_bias != hf_config.mlp_bias:
            raise ConfigError("attention_bias != mlp_bias: this model has one bias switch for both")
        return _llama_config(hf_config, bias=hf_config.attention_bias)
    return GPTConfig(
        n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd,
        vocab_size=hf_config.vocab_size, block_size=hf_config.n_positions,
        dropout=0.0, bias=True, tie_embeddings=getattr(hf_config, "tie_word_embeddings", True),
        layer_norm_eps=hf_config.layer_norm_epsilon,
    )


def _llama_config(hf_config, *, bias: bool) -> GPTConfig:
    """The Llama layout's GPTConfig from a LlamaConfig or MixtralConfig (intermediate_size: the MLP
    width, each expert's for Mixtral)."""
    rope = hf_config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_type={rope['rope_type']!r} (RoPE scaling) is not modelled; only "
                          "plain RoPE ('default'), as in Llama 3 8B/70B")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and head_dim != hf_config.hidden_size // hf_config.num_attention_heads:
        raise ConfigError(f"head_dim={head_dim} != hidden_size / num_attention_heads; "
                          "this model derives head_dim from n_embd / n_head")
    return GPTConfig(
        n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
        n_kv_head=hf_config.num_key_value_heads, n_embd=hf_config.hidden_size,
        vocab_size=hf_config.vocab_size, block_size=hf_config.max_position_embeddings,
        mlp_hidden=hf_config.intermediate_size, dropout=0.0, bias=bias,
        tie_embeddings=hf_config.tie_word_embeddings, layer_norm_eps=hf_config.rms_norm_eps,
        norm="rmsnorm", mlp="swiglu", positions="rope", rope_theta=float(rope.get("rope_theta", 10000.0)),
    )


def _rotary_family_fields(config: GPTConfig) -> dict:
    """The fields LlamaConfig and MixtralConfig share: sizes, GQA heads, RMSNorm eps, RoPE, dropout."""
    return dict(vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                num_attention_heads=config.n_head, num_key_value_heads=config.kv_heads,
                max_position_embeddings=config.block_size, rms_norm_eps=config.layer_norm_eps,
                tie_word_embeddings=config.tie_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                attention_dropout=config.dropout)


def hf_config_from(config: GPTConfig, attn_implementation: str = "eager"):
    """transformers GPT2Config, LlamaConfig or MixtralConfig matching a GPTConfig."""
    # deferred: transformers is optional (the [test] extra) and takes seconds to import
    family = hf_family(config)
    if family == "mixtral":
        from transformers import MixtralConfig

        hf = MixtralConfig(
            **_rotary_family_fields(config), intermediate_size=config.expert_dim,
            num_local_experts=config.n_experts, num_experts_per_tok=config.moe_top_k,
            router_aux_loss_coef=config.moe_aux_coef, sliding_window=None, router_jitter_noise=0.0,
        )
    elif family == "llama":
        from transformers import LlamaConfig

        hf = LlamaConfig(
            **_rotary_family_fields(config), intermediate_size=config.mlp_dim,
            attention_bias=config.bias, mlp_bias=config.bias,
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
