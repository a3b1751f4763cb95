"""GPT-mini: one decoder-only transformer, the GPT-2 and Llama families by config switches.

Shapes: B batch, T sequence length, C = n_embd, H = n_head query heads, K = kv_heads key/value
heads, D = C // H head size, F = mlp_dim, V vocab size.

GPT-2 layout (the default; names as Hugging Face's GPT2LMHeadModel, whose state dict loads after
transposing its Conv1D weights):

    transformer.wte (V, C), transformer.wpe (block_size, C)     [positions="learned"]
    transformer.h.<i>.ln_1, .ln_2                               LayerNorm(C)
    transformer.h.<i>.attn.c_attn (3C, C): q, k, v fused; .attn.c_proj (C, C)
    transformer.h.<i>.mlp.c_fc (F, C), GELU, .mlp.c_proj (C, F)  F = 4C
    transformer.ln_f, lm_head (V, C) tied to wte

Llama layout (n_kv_head set; presets llama-mini, llama3-*): the same tree, with
norm="rmsnorm" (ln_1/ln_2/ln_f are RMSNorm(C)), positions="rope" (no wpe) and

    transformer.h.<i>.attn.q_proj (H·D, C), .k_proj (K·D, C), .v_proj (K·D, C), .o_proj (C, H·D)
    transformer.h.<i>.mlp.gate_proj (F, C), .up_proj (F, C), .down_proj (C, F)   SwiGLU
    lm_head (V, C) untied

Mixture of experts (n_experts = E > 0; presets moe-mini, mixtral-mini): every block's mlp is an
MoE, E experts of the family's MLP, width F_e = expert_dim, and a router:

    transformer.h.<i>.mlp.router (E, C)                          no bias
    transformer.h.<i>.mlp.experts.<e>.c_fc (F_e, C), .c_proj      GPT-2 family (GELU experts)
    transformer.h.<i>.mlp.experts.<e>.gate_proj, .up_proj, .down_proj    Llama family (Mixtral)
    transformer.h.<i>.mlp.shared_expert.*                        optional (moe_shared_hidden)

Query head h reads key/value head h // (H/K). Tensor parallel over t ranks therefore splits
q_proj's rows by query heads (H/t each), k_proj's and v_proj's rows by kv heads (K/t each, so t
must divide K), o_proj's columns by query heads; rank r's query heads r·H/t.. then find their
kv heads r·K/t.. on the same rank. gate_proj and up_proj split by rows (F/t), down_proj by
columns. Separate projections (not one fused (H+2K)·D matrix) keep these splits one slice each,
as in HF and torchtitan.

The model knows nothing about parallelism; journey_dist.parallel.* wraps or
rewrites a plain GPT built from the same GPTConfig and state dict. A wrapper that rebuilds the
first stage calls `GPT.embed` (token embeddings plus learned or sinusoidal positions); RoPE and
ALiBi live inside the attention (ALiBi's slopes are per global head: a tensor-parallel copy
needs its rank's slice of `alibi_slopes(n_head)`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from journey_dist import hf_interop, moe
from journey_dist.config import GPTConfig
from journey_dist.positions import alibi_bias, alibi_slopes, apply_rope, rope_tables, sinusoidal_table


def kv_cache_bytes(config: GPTConfig, batch: int, tokens: int, nbytes: int = 4,
                   kv_heads: int | None = None) -> int:
    """KV cache = 2 (K, V) x layers x batch x tokens x kv_heads x head_dim x bytes per value.

    kv_heads defaults to the model's (config.kv_heads: n_kv_head with GQA, else n_head); a
    tensor-parallel rank passes its own share."""
    heads = config.kv_heads if kv_heads is None else kv_heads
    return 2 * config.n_layer * batch * tokens * heads * config.head_dim * nbytes


class KVCache:
    """Pre-allocated keys and values for incremental decoding.

    k[layer], v[layer]: (B, K, max_len, D), K = config.kv_heads (grouped-query attention caches
    only its key/value heads). `pos` counts the tokens already cached.
    Bytes = 2 (K,V) x layers x B x max_len x K x D x element size.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 n_head: int | None = None):
        # n_head: kv heads cached here (default all; a tensor-parallel rank caches only its own)
        shape = (batch_size, config.kv_heads if n_head is None else n_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.pos = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class CausalSelfAttention(nn.Module):
    """Causal self-attention; GPT-2's fused c_attn or Llama's q/k/v/o projections with GQA.

    RoPE and ALiBi are applied here, from the absolute positions start..start+T-1 (start =
    cache.pos), so a copy of this module on another rank or stage needs nothing passed in.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        C, D, bias = config.n_embd, config.head_dim, config.bias
        if config.separate_qkv:
            self.q_proj = nn.Linear(C, self.n_head * D, bias=bias)
            self.k_proj = nn.Linear(C, self.n_kv_head * D, bias=bias)
            self.v_proj = nn.Linear(C, self.n_kv_head * D, bias=bias)
            self.o_proj = nn.Linear(self.n_head * D, C, bias=bias)
        else:
            self.c_attn = nn.Linear(C, 3 * C, bias=bias)  # q, k, v
            self.c_proj = nn.Linear(C, C, bias=bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.attn_impl = config.attn_impl
        self.positions, self.rope_theta = config.positions, config.rope_theta
        self.recompute_core = False  # recompute.set_recompute(model, "selective") sets it

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q (B, H, T, D), k and v (B, K, T, D), H and K this module's head counts."""
        B, T, _ = x.shape
        if hasattr(self, "c_attn"):  # three equal parts: k and v have H heads too
            q, k, v = self.c_attn(x).split(self.n_head * self.head_dim, dim=2)  # 3 x (B, T, H*D)
            kv_heads = self.n_head
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            kv_heads = self.n_kv_head
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, T, kv_heads, self.head_dim).transpose(1, 2) for t in (k, v))
        return q, k, v

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        return self.resid_dropout(self.out_proj(self.attend(x, cache, layer)))

    @property
    def out_proj(self) -> nn.Module:
        """The output projection: GPT-2's c_proj or Llama's o_proj."""
        return self.c_proj if hasattr(self, "c_proj") else self.o_proj

    def head_slopes(self) -> torch.Tensor:
        """ALiBi's slopes of this module's heads (a tensor-parallel copy holds a slice of them)."""
        return alibi_slopes(self.n_head)

    def attend(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """(B, T, C) -> (B, T, H*D): every head's output, before the output projection.

        H and K are the local head counts, so a tensor-parallel copy of this module (fewer heads per
        rank: n_head, and n_kv_head for the Llama layout, divided by t) runs the same code."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        start = cache.pos if cache is not None else 0
        if self.positions == "rope":
            cos, sin = rope_tables(start, T, self.head_dim, self.rope_theta, x.device, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.k[layer][:B, :, start:start + T] = k
            cache.v[layer][:B, :, start:start + T] = v
            k, v = cache.k[layer][:B, :, :start + T], cache.v[layer][:B, :, :start + T]
        bias = None
        if self.positions == "alibi":
            bias = alibi_bias(self.head_slopes().to(x.device), start, T, k.size(-2)).to(q.dtype)
        core = attention
        if self.recompute_core and torch.is_grad_enabled():  # keep q, k, v; recompute the rest in backward
            core = functools.partial(checkpoint, attention, use_reentrant=False)
        y = core(q, k, v, start, self.attn_impl, self.dropout if self.training else 0.0,
                 self.attn_dropout, bias)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, impl: str,
              dropout_p: float, dropout: nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of T queries (positions start..start+T-1) over S = start+T keys.

    q (B, H, T, D); k, v (B, K, S, D) with K dividing H: query head h reads kv head h // (H/K).
    `bias` (H, T, S), e.g. ALiBi's, is added to the scores before the causal mask.
    """
    T, S = q.size(-2), k.size(-2)
    group = q.size(1) // k.size(1)  # query heads per kv head (1: multi-head attention)
    mask = None
    if (start > 0 and T > 1) or bias is not None:  # chunked prefill: query i sees keys 0..start+i
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)
    if bias is not None:
        mask = bias.masked_fill(~mask, float("-inf"))  # (H, T, S) additive
    if impl == "sdpa":
        gqa = {"enable_gqa": True} if group > 1 else {}
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None and T > 1, **gqa
        )
    if group > 1:  # every kv head serves `group` consecutive query heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, S): the T x S matrix
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)
    if mask is not None:
        att = att + mask if mask.dtype != torch.bool else att.masked_fill(~mask, float("-inf"))
    att = dropout(F.softmax(att, dim=-1))
    return att @ v  # (B, H, T, D)


class MLP(nn.Module):
    """GPT-2's MLP: c_proj(GELU(c_fc(x))), (B,T,C) -> (B,T,F) -> (B,T,C). `hidden` overrides F
    (an expert's or a shared expert's width)."""

    def __init__(self, config: GPTConfig, hidden: int | None = None):
        super().__init__()
        F_ = config.mlp_dim if hidden is None else hidden
        self.c_fc = nn.Linear(config.n_embd, F_, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(F_, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B,T,C)->(B,T,F)->(B,T,C)


class SwiGLU(nn.Module):
    """Llama's MLP: down_proj(SiLU(gate_proj(x)) * up_proj(x)), (B,T,C) -> 2 x (B,T,F) -> (B,T,C).

    The gate multiplies the up projection channel by channel; three matrices of F x C, so Llama
    takes F about 2/3 of GPT-2's 4C for the same parameters (config.llama_ffn_dim).
    """

    def __init__(self, config: GPTConfig, hidden: int | None = None):
        super().__init__()
        C, F_, bias = config.n_embd, config.mlp_dim if hidden is None else hidden, config.bias
        self.gate_proj = nn.Linear(C, F_, bias=bias)
        self.up_proj = nn.Linear(C, F_, bias=bias)
        self.down_proj = nn.Linear(F_, C, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


def make_mlp(config: GPTConfig, hidden: int | None = None) -> nn.Module:
    """The family's MLP (GELU or SwiGLU) of width `hidden` (default mlp_dim)."""
    return SwiGLU(config, hidden) if config.mlp == "swiglu" else MLP(config, hidden)


class MoE(nn.Module):
    """Mixture of experts in place of a block's MLP (config.n_experts > 0); journey_dist/moe.py has
    the rules. (B, T, C) -> (B, T, C):

        router (E, C), no bias        logits per token; route(): top-k experts and gate weights
        experts.<e>                   E MLPs of the family's kind, width expert_dim (MLP or SwiGLU)
        shared_expert (optional)      one more MLP every token goes through (moe_shared_hidden)

    Each token's output is the gate-weighted sum of its k experts' outputs (+ the shared expert's).
    While training with a capacity factor, pairs beyond an expert's capacity are dropped (evaluation
    and generation drop nothing). Every expert runs every step, on zero rows if none chose it, so each
    has a gradient (zero) and AdamW treats all alike.

    After each forward, `aux_loss` holds moe_aux_coef x balance + moe_z_coef x z of this layer
    (GPT.forward adds the layers' sum to the training loss, see `moe_loss`) and `stats` the router's
    counts. Expert parallel (parallel/expert) subclasses this: the same forward, with the batch view
    (counts of every data-parallel rank) and the experts' run (all-to-all to their owners) replaced.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_experts, self.top_k, self.router_kind = config.n_experts, config.moe_top_k, config.moe_router
        self.capacity_factor = config.moe_capacity_factor
        self.aux_coef, self.z_coef = config.moe_aux_coef, config.moe_z_coef
        self.router = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.experts = nn.ModuleList([make_mlp(config, config.expert_dim) for _ in range(config.n_experts)])
        self.shared_expert = make_mlp(config, config.moe_shared_hidden) if config.moe_shared_hidden else None
        self.aux_loss: torch.Tensor | None = None
        self.stats: moe.RouterStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (N, C), token order: row-major over (B, T)
        n, E, k = tokens.size(0), self.n_experts, self.top_k
        r = moe.route(self.router(tokens), k, self.router_kind)
        counts = moe.expert_counts(r.experts, E)
        batch_counts, offsets, batch_tokens = self.batch_view(counts, n)
        keep = None
        if self.capacity_factor is not None and self.training:
            cap = moe.capacity(batch_tokens, E, k, self.capacity_factor)
            keep = moe.keep_mask(r.experts, E, cap, offsets)
        d = moe.plan_dispatch(r.experts, E, keep)
        y = moe.combine(self.run_experts(tokens[d.token], d.counts), d, r.weights, n)
        if self.shared_expert is not None:
            y = y + self.shared_expert(tokens)
        balance = moe.balance_loss(r.probs, batch_counts, batch_tokens, k)
        z = moe.z_loss(r.logits)
        self.aux_loss = self.aux_coef * balance + self.z_coef * z
        self.stats = moe.RouterStats(counts, d.counts, balance.detach(), z.detach())
        return y.view(shape)

    def batch_view(self, counts: torch.Tensor,
                   n_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(pairs per expert over the whole batch, pairs of earlier tokens per expert, tokens in the
        batch). One process sees the whole batch: its own counts, nothing earlier, its tokens."""
        return counts, None, n_tokens

    def run_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(M, C) rows sorted by expert, counts[e] of them for expert e -> their (M, C) outputs."""
        chunks = rows.split(counts.tolist())
        return torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])


def moe_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of every MoE layer's aux_loss from the last forward (each cleared once read); None
    for a dense model. Added once per forward to the training loss: Megatron's sum over layers."""
    total = None
    for module in model.modules():
        if isinstance(module, MoE) and module.aux_loss is not None:
            total = module.aux_loss if total is None else total + module.aux_loss
            module.aux_loss = None
    return total


class _RMSNormFunction(torch.autograd.Function):
    """y = w * x / rms(x), rms(x) = sqrt(mean(x^2) + eps) over channels, computed in fp32 (or fp64).

    Keeps only x and 1/rms (one fp32 value per token) for backward, as fused kernels do; the
    same four ops left to autograd would also keep x/rms (and an fp32 copy of a 16-bit x).
    Backward, with x̂ = x / rms and g the output's gradient:
        dw = sum over tokens of g x̂,   dx = (g w - x̂ mean(g w x̂)) / rms,
    holding at most two fp32 (b, s, C) tensors besides g (memory/activations.py counts them).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(_at_least_fp32(x))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)  # HF's LlamaRMSNorm: same ops, same order

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        w = weight.to(rstd.dtype)
        xhat = x * rstd  # mixed dtypes promote to rstd's fp32 without a copy of x
        g_xhat = grad * xhat
        dweight = g_xhat.flatten(0, -2).sum(0).to(weight.dtype)
        mean_gwx = (g_xhat @ w).unsqueeze(-1) / x.size(-1)  # mean over channels of g w x̂
        del g_xhat
        dx = (grad * w).sub_(xhat.mul_(mean_gwx)).mul_(rstd)
        del xhat
        return dx.to(x.dtype), dweight, None


def _at_least_fp32(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # 16-bit -> fp32; fp64 stays


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang and Sennrich 2019), Llama's: LayerNorm without the mean
    subtraction and without a bias; one weight per channel, initialised to 1."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.size(0)}, eps={self.eps}"


def make_norm(config: GPTConfig) -> nn.Module:
    """The config's norm layer over n_embd channels."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config) if config.n_experts else make_mlp(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


# The sinusoidal table's values have RMS 1/sqrt(2); scaled to RMS 0.02, the token embeddings'
# init std, so neither drowns the other at the start (the original Transformer instead scales the
# embeddings up by sqrt(n_embd), with embeddings initialised near RMS 1/sqrt(n_embd)).
SINUSOIDAL_SCALE = 0.02 * math.sqrt(2)
# Residual-stream output projections: initialised with std 0.02 / sqrt(2 * n_layer) (GPT-2).
RESIDUAL_PROJECTIONS = ("c_proj.weight", "o_proj.weight", "down_proj.weight")


def add_positions(x: torch.Tensor, pos: torch.Tensor, config: GPTConfig,
                  transformer: nn.ModuleDict) -> torch.Tensor:
    """Token embeddings x (B, T, C) at positions pos (T,) plus learned (transformer.wpe) or sinusoidal
    position embeddings; RoPE and ALiBi act inside attention, so for them x comes back as is.
    Wrappers that rebuild the first layer (a pipeline stage, a tensor-parallel model holding a
    sequence shard) call it with their own modules and positions."""
    if config.positions == "learned":
        return x + transformer.wpe(pos)
    if config.positions == "sinusoidal":
        return x + SINUSOIDAL_SCALE * sinusoidal_table(pos, config.n_embd).to(x.dtype)
    return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.positions == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                       ln_f=make_norm(config))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # one (V, C) matrix, two uses
        if not self.lm_head.weight.is_meta:  # on the meta device there are no values to set
            self.init_weights()

    def init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02) for Linear and Embedding weights, zero biases, norms at 1, and
        residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's variance does
        not grow with depth. A model built on the meta device calls it after to_empty()."""
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()  # weight 1, bias 0 (no random draws)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (tied weights once); optionally without position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, T) token ids at positions start..start+T-1 -> (B, T, C): token embeddings plus
        learned or sinusoidal positions (RoPE and ALiBi act inside attention), then dropout."""
        pos = torch.arange(start, start + idx.size(1), device=idx.device)  # (T,)
        tr = self.transformer
        return tr.drop(add_positions(tr.wte(idx), pos, self.config, tr))

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C) final-norm output."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}; "
                f"crop the input to its last {self.config.block_size} tokens or use a larger block_size"
            )
        x = self.embed(idx, start)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (logits (B, T, V), mean cross-entropy or None). targets == -1 are ignored.

        A mixture of experts in training mode adds its layers' auxiliary losses (moe_loss) to the
        cross-entropy; in eval mode the loss is the cross-entropy alone (a perplexity)."""
        logits = self.lm_head(self.hidden_states(idx, cache))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
            if self.config.n_experts and self.training:
                loss = loss + moe_loss(self)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, greedy: bool = False, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to idx (B, T); returns (B, T + new).

        With `use_cache`, the prompt is processed once and each step feeds one token
        against the KV cache; without it, every step re-runs the whole window.
        """
        was_training = self.training
        self.eval()
        B, T = idx.shape
        total = T + max_new_tokens
        cache = None
        if use_cache and total <= self.config.block_size:
            p = next(self.parameters())
            cache = KVCache(self.config, B, total, p.device, p.dtype)
        step_input = idx
        for _ in range(max_new_tokens):
            if cache is None:
                step_input = idx[:, -self.config.block_size:]
            logits, _ = self(step_input, cache=cache)
            nxt = next_token(logits[:, -1, :], temperature, top_k, greedy, generator)
            idx = torch.cat([idx, nxt], dim=1)
            step_input = nxt
        self.train(was_training)
        return idx

    # ------------------------------------------------------------ HF interop

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict under Hugging Face's names: GPT2LMHeadModel (Conv1D weights (in, out)) or
        LlamaForCausalLM (hf_interop.py has the mapping)."""
        return hf_interop.to_hf(self.config, self.state_dict())

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a GPT2LMHeadModel or LlamaForCausalLM state dict (HF names), weight for weight."""
        own = self.state_dict()
        sd = hf_interop.from_hf(self.config, sd)
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise KeyError(f"HF state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k, v in sd.items():
                if own[k].shape != v.shape:
                    raise ValueError(f"{k}: HF shape {tuple(v.shape)} != ours {tuple(own[k].shape)}")
                own[k].copy_(v)

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> GPT:
        """Build a GPT with the same config and weights as a transformers GPT2LMHeadModel or
        LlamaForCausalLM."""
        model = cls(config_from_hf(hf_model.config))
        model.load_hf_state_dict(hf_model.state_dict())
        return model


def next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               greedy: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) last-position logits -> (B, 1) next token ids: argmax, or a temperature/top-k sample."""
    logits = logits.float()
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / max(temperature, 1e-8)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


config_from_hf = hf_interop.config_from_hf  # transformers config -> GPTConfig
hf_config_from = hf_interop.hf_config_from  # GPTConfig -> transformers GPT2Config / LlamaConfig


# ------------------------------------------------------------ shape tracing


def trace_shapes(model: nn.Module, idx: torch.Tensor, depth: int = 5) -> list[tuple[str, tuple]]:
    """Run one forward and list (module name, output shape) for modules up to `depth` dots.

    Lets a learner see (B, T) ids become (B, T, C) activations and (B, T, V) logits.
    """
    rows: list[tuple[str, tuple]] = []
    hooks = []
    for name, module in _named_modules_upto(model, depth):
        def hook(_m, _inp, out, name=name):
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(out, torch.Tensor):
                rows.append((name, tuple(out.shape)))
        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for h in hooks:
            h.remove()
    return rows


def _named_modules_upto(model: nn.Module, depth: int) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if name and name.count(".") < depth and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            yield name, module
