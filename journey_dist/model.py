"""GPT-mini: the GPT-2 architecture in one readable file.

Shapes: B batch, T sequence length, C = n_embd, H = n_head, D = C // H head size,
V vocab size. Names follow Hugging Face's GPT2LMHeadModel (transformer.h.0.attn.c_attn,
...), so its state dict loads after transposing its Conv1D weights.

The model knows nothing about parallelism; journey_dist.parallel.* wraps or
rewrites a plain GPT built from the same GPTConfig and state dict.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from journey_dist.config import GPTConfig


class KVCache:
    """Pre-allocated keys and values for incremental decoding.

    k[layer], v[layer]: (B, H, max_len, D). `pos` counts the tokens already cached.
    Bytes = 2 (K,V) x layers x B x max_len x H x D x element size.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 n_head: int | None = None):
        # n_head: heads cached here (default all; a tensor-parallel rank caches only its own)
        shape = (batch_size, config.n_head if n_head is None else n_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.pos = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.attn_impl = config.attn_impl

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_head * self.head_dim, dim=2)  # 3 x (B, T, H*D)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        # q, k, v: (B, H, T, D). H is the local head count, so a tensor-parallel copy
        # of this module (fewer heads per rank) runs the same code.
        start = 0
        if cache is not None:
            start = cache.pos
            cache.k[layer][:B, :, start:start + T] = k
            cache.v[layer][:B, :, start:start + T] = v
            k, v = cache.k[layer][:B, :, :start + T], cache.v[layer][:B, :, :start + T]
        y = attention(q, k, v, start, self.attn_impl, self.dropout if self.training else 0.0,
                      self.attn_dropout)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.resid_dropout(self.c_proj(y))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, impl: str,
              dropout_p: float, dropout: nn.Module) -> torch.Tensor:
    """Causal attention of T queries (positions start..start+T-1) over S = start+T keys."""
    T, S = q.size(-2), k.size(-2)
    mask = None
    if start > 0 and T > 1:  # chunked prefill: query i sees keys 0..start+i
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=start == 0 and T > 1
        )
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, S): the T x S matrix
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = dropout(F.softmax(att, dim=-1))
    return att @ v  # (B, H, T, D)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B,T,C)->(B,T,4C)->(B,T,C)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # one (V, C) matrix, two uses
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the residual
        # stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (tied weights once); optionally without position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C) final-LayerNorm output."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}; "
                f"crop the input to its last {self.config.block_size} tokens or use a larger block_size"
            )
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B,T,C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (logits (B, T, V), mean cross-entropy or None). targets == -1 are ignored."""
        logits = self.lm_head(self.hidden_states(idx, cache))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
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
        """State dict in GPT2LMHeadModel's layout (Conv1D weights are (in, out))."""
        return {k: (v.t().contiguous() if _is_conv1d(k) else v.clone())
                for k, v in self.state_dict().items()}

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a GPT2LMHeadModel state dict (HF names; Conv1D weights transposed)."""
        own = self.state_dict()
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise KeyError(f"HF state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k, v in sd.items():
                v = v.t() if _is_conv1d(k) else v
                if own[k].shape != v.shape:
                    raise ValueError(f"{k}: HF shape {tuple(v.shape)} != ours {tuple(own[k].shape)}")
                own[k].copy_(v)

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> GPT:
        """Build a GPT with the same config and weights as a transformers GPT2LMHeadModel."""
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


def _is_conv1d(key: str) -> bool:
    return key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


def config_from_hf(hf_config) -> GPTConfig:
    """GPTConfig from a transformers GPT2Config."""
    return GPTConfig(
        n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd,
        vocab_size=hf_config.vocab_size, block_size=hf_config.n_positions,
        dropout=0.0, bias=True, tie_embeddings=getattr(hf_config, "tie_word_embeddings", True),
        layer_norm_eps=hf_config.layer_norm_epsilon,
    )


def hf_config_from(config: GPTConfig, attn_implementation: str = "eager"):
    """transformers GPT2Config matching a GPTConfig (imports transformers lazily)."""
    from transformers import GPT2Config

    hf = GPT2Config(
        n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
        vocab_size=config.vocab_size, n_positions=config.block_size,
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_eps, activation_function="gelu_new",
        tie_word_embeddings=config.tie_embeddings,
    )
    hf._attn_implementation = attn_implementation
    return hf


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
