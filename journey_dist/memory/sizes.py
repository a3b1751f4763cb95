"""Sizes the memory estimate builds on: bytes per parameter by precision and optimizer, model
states per rank under ZeRO, parameter counts (per tp rank, pipeline stage and ep rank; a mixture
of experts' total and active parameters), KV-cache bytes.

Pure arithmetic on a GPTConfig; `estimate.py` combines it with the activation terms."""

from __future__ import annotations

from dataclasses import dataclass

from journey_dist.config import ConfigError, GPTConfig
from journey_dist.model import kv_cache_bytes as model_kv_cache_bytes
from journey_dist.parallel.pipeline.stage import stage_layers

BYTES_PER_PARAM = {
    # fp32 training: fp32 weights and grads; AdamW keeps two fp32 moments
    ("fp32", "adamw"): (4, 4, 8),
    ("fp32", "sgd"): (4, 4, 4),  # one momentum buffer
    # mixed precision as the ZeRO paper counts it (and DeepSpeed's ZeRO keeps it): 16-bit weights
    # and grads; fp32 master copy + two fp32 moments (K = 12)
    ("bf16-mixed", "adamw"): (2, 2, 12),
    ("fp16-mixed", "adamw"): (2, 2, 12),
    ("bf16-mixed", "sgd"): (2, 2, 8),
    ("fp16-mixed", "sgd"): (2, 2, 8),
    # Megatron-LM (docs: "Distributed Optimizer"): bf16 weights, fp32 main grads accumulated and
    # reduced in fp32, fp32 main params + moments: 18 B (6 + 12/d with its distributed optimizer,
    # which is zero=1 here); fp16: fp16 grads, and the optimizer keeps fp32 main params and main
    # grads + moments: 20 B (4 + 16/d)
    ("bf16-megatron", "adamw"): (2, 4, 12),
    ("bf16-megatron", "sgd"): (2, 4, 8),
    ("fp16-megatron", "adamw"): (2, 2, 16),
    ("fp16-megatron", "sgd"): (2, 2, 12),
    # pure bf16: everything in bf16, moments too
    ("bf16", "adamw"): (2, 2, 4),
    ("bf16", "sgd"): (2, 2, 2),
    ("fp16", "adamw"): (2, 2, 4),
    ("fp16", "sgd"): (2, 2, 2),
    # torch.autocast: fp32 weights, grads and moments; 16-bit copies live with the activations
    ("bf16-autocast", "adamw"): (4, 4, 8),
    ("fp16-autocast", "adamw"): (4, 4, 8),
    ("bf16-autocast", "sgd"): (4, 4, 4),
    ("fp16-autocast", "sgd"): (4, 4, 4),
}


@dataclass(frozen=True)
class Precision:
    """Bytes per weight, per activation value and per residual-stream value; autocast or not."""

    weights: int
    values: int
    residual: int
    autocast: bool = False


PRECISIONS = {
    "fp32": Precision(4, 4, 4),
    "bf16-mixed": Precision(2, 2, 2),  # ZeRO paper/DeepSpeed: 16-bit model, fp32 master in the optimizer
    "fp16-mixed": Precision(2, 2, 2),
    "bf16-megatron": Precision(2, 2, 2),  # as bf16-mixed, with fp32 main grads (BYTES_PER_PARAM)
    "fp16-megatron": Precision(2, 2, 2),
    "bf16": Precision(2, 2, 2),  # model.to(bfloat16), optimizer state in bf16 too
    "fp16": Precision(2, 2, 2),
    "bf16-autocast": Precision(4, 2, 4, autocast=True),  # torch.autocast over fp32 weights
    "fp16-autocast": Precision(4, 2, 4, autocast=True),
}
DTYPES = tuple(PRECISIONS)
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1,
               "int8": 1}


def model_state_bytes(n_params: int, dtype: str = "fp32", optimizer: str = "adamw", dp: int = 1,
                      zero: int = 0, trainable_params: int | None = None) -> dict[str, float]:
    """Per-rank bytes of weights, gradients and optimizer state.

    params = N·w / (dp if ZeRO-3); grads = N_trainable·g / (dp if ZeRO >= 2);
    optimizer = N_trainable·o / (dp if ZeRO >= 1), with (w, g, o) from the dtype and optimizer
    (AdamW mixed precision: w = 2, o = 12, so 2 + 2 + 12 = 16 bytes per parameter; Megatron's
    bf16 keeps fp32 main grads: 2 + 4 + 12 = 18).
    Only `trainable_params` (default: all; LoRA: the adapters) get gradients and optimizer state.
    """
    opt = "adamw" if optimizer == "none" else optimizer
    if (dtype, opt) not in BYTES_PER_PARAM:
        raise ConfigError(f"unknown dtype/optimizer {dtype!r}/{optimizer!r}; dtype in "
                          f"{sorted({d for d, _ in BYTES_PER_PARAM})}, optimizer in adamw, sgd, none")
    w, g, o = BYTES_PER_PARAM[(dtype, opt)]
    trainable = n_params if trainable_params is None else trainable_params
    if optimizer == "none":
        o = 0
    return {
        "params": n_params * w / (dp if zero >= 3 else 1),
        "grads": trainable * g / (dp if zero >= 2 else 1),
        "optimizer": trainable * o / (dp if zero >= 1 else 1),
    }


# ---------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor of model.GPT on one tensor-parallel rank."""

    name: str
    numel: int
    matrix: bool  # 2-D (AdamW decays it; make_optimizer puts matrices first)


def _norm_tensors(cfg: GPTConfig, prefix: str) -> list[ParamTensor]:
    """LayerNorm: weight (+ bias); RMSNorm: weight only. Replicated over tp."""
    h = cfg.n_embd
    with_bias = cfg.norm == "layernorm" and cfg.bias
    bias = [ParamTensor(f"{prefix}.bias", h, False)] if with_bias else []
    return [ParamTensor(f"{prefix}.weight", h, False)] + bias


def norm_params(cfg: GPTConfig) -> int:
    """Parameters of one norm layer: LayerNorm h weights (+ h biases), RMSNorm h weights."""
    return sum(p.numel for p in _norm_tensors(cfg, "norm"))


def _linear(name: str, fan_in: int, fan_out: int, bias: bool, t: int, column: bool) -> list[ParamTensor]:
    """Column-parallel: weight rows and bias split by t; row-parallel: weight columns split, bias
    replicated (added once after the all-reduce)."""
    w = ParamTensor(f"{name}.weight", fan_in * fan_out // t, True)
    return [w] + ([ParamTensor(f"{name}.bias", fan_out // t if column else fan_out, False)] if bias else [])


def _mlp_tensors(cfg: GPTConfig, prefix: str, f: int, t: int) -> list[ParamTensor]:
    """An MLP of width f: GELU's c_fc (f, h) and c_proj, or SwiGLU's gate/up/down (split over t)."""
    h, b = cfg.n_embd, cfg.bias
    if cfg.mlp == "swiglu":
        return (_linear(f"{prefix}.gate_proj", h, f, b, t, True)
                + _linear(f"{prefix}.up_proj", h, f, b, t, True)
                + _linear(f"{prefix}.down_proj", f, h, b, t, False))
    return _linear(f"{prefix}.c_fc", h, f, b, t, True) + _linear(f"{prefix}.c_proj", f, h, b, t, False)


def moe_tensors(cfg: GPTConfig, ep: int = 1) -> list[ParamTensor]:
    """A mixture of experts' tensors on one ep rank (the router and the shared expert on every rank,
    E/ep experts; none split over tp): mlp.router (E, h), mlp.experts.<e>.* (the family's MLP of width
    expert_dim), mlp.shared_expert.* (moe_shared_hidden wide, if any)."""
    out = [ParamTensor("mlp.router.weight", cfg.n_experts * cfg.n_embd, True)]
    for e in range(cfg.n_experts // ep):
        out += _mlp_tensors(cfg, f"mlp.experts.{e}", cfg.expert_dim, 1)
    if cfg.moe_shared_hidden:
        out += _mlp_tensors(cfg, "mlp.shared_expert", cfg.moe_shared_hidden, 1)
    return out


def layer_tensors(cfg: GPTConfig, tp: int = 1, ep: int = 1) -> list[ParamTensor]:
    """A block's parameter tensors on one tensor-parallel rank, in model order (Megatron split).

    GPT-2: c_attn (3h, h) and c_fc (4h, h) column-parallel, the two c_proj row-parallel:
    12h²/t weights, (3h + 4h)/t + 2h biases, 4h in two LayerNorms. Llama: q_proj (a·d, h), k_proj
    and v_proj (kv·d, h) (split by kv heads), gate_proj and up_proj (f, h) column-parallel,
    o_proj and down_proj row-parallel, two RMSNorm weights. A mixture of experts replaces the MLP by
    `moe_tensors` (this ep rank's experts, whole on every tp rank).
    """
    h, t, b, f = cfg.n_embd, tp, cfg.bias, cfg.mlp_dim
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = _norm_tensors(cfg, "ln_1")
    if cfg.separate_qkv:
        out += (_linear("attn.q_proj", h, q, b, t, True) + _linear("attn.k_proj", h, kv, b, t, True)
                + _linear("attn.v_proj", h, kv, b, t, True) + _linear("attn.o_proj", q, h, b, t, False))
    else:
        out += _linear("attn.c_attn", h, 3 * h, b, t, True) + _linear("attn.c_proj", h, h, b, t, False)
    out += _norm_tensors(cfg, "ln_2")
    return out + (moe_tensors(cfg, ep) if cfg.n_experts else _mlp_tensors(cfg, "mlp", f, t))


def model_tensors(cfg: GPTConfig, tp: int = 1, ep: int = 1) -> list[ParamTensor]:
    """Every parameter tensor of GPT(cfg) on one tp (and ep) rank, in model.named_parameters() order
    (the tied head once, as wte): wte (vocab-parallel: V/t rows), wpe (learned positions only),
    the blocks, ln_f, lm_head when untied (vocab-parallel)."""
    h = cfg.n_embd
    out = [ParamTensor("transformer.wte.weight", cfg.vocab_size * h // tp, True)]
    if cfg.positions == "learned":
        out.append(ParamTensor("transformer.wpe.weight", cfg.block_size * h, True))
    for i in range(cfg.n_layer):
        out += [ParamTensor(f"transformer.h.{i}.{p.name}", p.numel, p.matrix)
                for p in layer_tensors(cfg, tp, ep)]
    out += _norm_tensors(cfg, "transformer.ln_f")
    if not cfg.tie_embeddings:
        out.append(ParamTensor("lm_head.weight", cfg.vocab_size * h // tp, True))
    return out


def layer_param_count(cfg: GPTConfig, tp: int = 1, ep: int = 1) -> int:
    """Parameters of one block on one tensor-parallel (and ep) rank (`layer_tensors`)."""
    return sum(p.numel for p in layer_tensors(cfg, tp, ep))


def layer_matrix_params(cfg: GPTConfig, tp: int = 1, ep: int = 1) -> int:
    """A block's weight-matrix elements on one tp rank: what autocast keeps a 16-bit copy of."""
    return sum(p.numel for p in layer_tensors(cfg, tp, ep) if p.matrix)


def expert_params(cfg: GPTConfig) -> int:
    """Parameters of one expert (one MLP of width expert_dim); 0 for a dense model."""
    return sum(p.numel for p in _mlp_tensors(cfg, "e", cfg.expert_dim, 1)) if cfg.n_experts else 0


def expert_param_count(cfg: GPTConfig, ep: int = 1) -> int:
    """The experts' parameters on one ep rank, all layers: L · E/ep · one expert's."""
    return cfg.n_layer * cfg.n_experts // ep * expert_params(cfg)


def active_param_count(cfg: GPTConfig) -> int:
    """Parameters one token's forward uses: all but the E - k experts per layer it does not go
    through (the router, a shared expert, attention and embeddings it does). Dense: param_count."""
    return param_count(cfg) - cfg.n_layer * (cfg.n_experts - cfg.moe_top_k) * expert_params(cfg)


def param_count(cfg: GPTConfig, tp: int = 1, pp: int = 1, stage: int | None = None, ep: int = 1) -> int:
    """Exact parameter count (tied embeddings counted once); per tensor-parallel rank for tp > 1.

    N = Vh (wte, vocab-parallel: Vh/t) [+ (block_size)h (wpe, learned positions)] + L·layer
    + ln_f [+ Vh/t lm_head if untied]. With pp > 1 pass `stage`: stage 0 holds the embeddings,
    the last stage ln_f and the output head (a copy of wte when tied, as Megatron does), each
    stage its share of layers. With ep > 1 a mixture of experts' rank holds E/ep experts per layer
    (the rest of the model whole).
    """
    h, t = cfg.n_embd, tp
    emb = cfg.vocab_size * h // t + (cfg.block_size * h if cfg.positions == "learned" else 0)
    head = norm_params(cfg) + (0 if cfg.tie_embeddings else cfg.vocab_size * h // t)
    if pp == 1 or stage is None:
        return emb + cfg.n_layer * layer_param_count(cfg, t, ep) + head
    n = len(stage_layers(cfg.n_layer, pp)[stage]) * layer_param_count(cfg, t, ep)
    if stage == 0:
        n += emb
    if stage == pp - 1:
        n += head + (cfg.vocab_size * h // t if cfg.tie_embeddings else 0)
    return n


def param_tensor_count(cfg: GPTConfig, ep: int = 1) -> int:
    """Number of parameter tensors (AdamW keeps one fp32 step counter per tensor) on one ep rank."""
    return len(model_tensors(cfg, ep=ep))


def kv_cache_bytes(cfg: GPTConfig, batch: int, tokens: int, dtype: str | int = "fp32",
                   kv_heads: int | None = None) -> int:
    """KV cache = 2 (K, V) x layers x batch x tokens x kv_heads x head_dim x bytes per value.

    kv_heads defaults to the model's (cfg.kv_heads: n_kv_head with GQA, else n_head); a
    tensor-parallel rank passes its own share."""
    nbytes = dtype if isinstance(dtype, int) else DTYPE_BYTES[_base_dtype(dtype)]
    return model_kv_cache_bytes(cfg, batch, tokens, nbytes, kv_heads)


def _base_dtype(dtype: str) -> str:
    return dtype.split("-")[0] if dtype.split("-")[0] in DTYPE_BYTES else dtype

