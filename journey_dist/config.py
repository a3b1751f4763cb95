"""Model and parallelism configuration, presets, and validation.

Every check that can fail for a user lives here, so a bad run stops with a clear
message *before* any process group is created (a half-initialised job is the
usual source of silent hangs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the problem and the fix."""


NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi")
# MoE routers: "topk_softmax" (Mixtral) softmaxes the k chosen logits, so a token's weights sum to 1;
# "softmax_topk" (Switch, GShard, DeepSeek) softmaxes all E logits and keeps the k largest (sum < 1).
ROUTERS = ("topk_softmax", "softmax_topk")

# pipeline schedules (parallel/pipeline/orders.py lists each one's actions)
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")

CP_DESIGNS = ("ring", "zigzag", "ulysses")  # context parallel: parallel/context/


@dataclass(frozen=True)
class GPTConfig:
    """One decoder-only transformer, GPT-2 by default, the Llama family by switches.

    GPT-2: LayerNorm, GELU MLP (4 x n_embd), learned positions, multi-head attention with one
    fused c_attn, biases, tied head. Llama: norm="rmsnorm", mlp="swiglu" (gate/up/down),
    positions="rope", n_kv_head < n_head (grouped-query attention), bias=False, untied head.
    model.py documents the module names and shapes of both layouts.

    Mixture of experts (n_experts > 0): every block's MLP becomes model.MoE, a router and
    n_experts MLPs of the family's kind (GELU or SwiGLU) of width moe_hidden; each token goes
    through its moe_top_k experts. The moe_* fields mean nothing without experts, so setting one
    while n_experts=0 is an error.
    """

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    vocab_size: int = 256  # byte-level by default
    block_size: int = 128  # maximum context length
    dropout: float = 0.0
    bias: bool = True  # biases in every Linear and LayerNorm (RMSNorm has none)
    tie_embeddings: bool = True  # lm_head.weight is wte.weight, as in GPT-2
    attn_impl: str = "sdpa"  # "sdpa" (fused, F.scaled_dot_product_attention) or "eager"
    layer_norm_eps: float = 1e-5  # eps of every norm layer (LayerNorm or RMSNorm)
    norm: str = "layernorm"  # or "rmsnorm"
    mlp: str = "gelu"  # or "swiglu"
    mlp_hidden: int | None = None  # MLP width; None: see mlp_dim
    positions: str = "learned"  # "sinusoidal", "rope" or "alibi"
    rope_theta: float = 10000.0  # RoPE base: pair i turns by pos * rope_theta^(-2i/head_dim)
    # None: GPT-2's multi-head attention (fused c_attn). A number: separate q/k/v/o projections
    # with n_kv_head key/value heads, each shared by n_head / n_kv_head query heads (GQA; 1 is MQA).
    n_kv_head: int | None = None
    # Mixture of experts (model.MoE; journey_dist/moe.py has the routing rules). 0: a dense MLP.
    n_experts: int = 0
    moe_top_k: int = 2  # experts per token
    moe_hidden: int | None = None  # each expert's MLP width; None: mlp_dim
    # None: no token is dropped. A number cf: while training, each expert takes at most
    # ceil(cf * tokens * k / E) of the (token, expert) pairs of one forward (over the whole global
    # batch), first come first served in token order; the rest are dropped (the token keeps its
    # residual and its other experts). Evaluation and generation drop nothing.
    moe_capacity_factor: float | None = None
    moe_router: str = "topk_softmax"  # or "softmax_topk" (ROUTERS)
    moe_aux_coef: float = 0.01  # Switch/GShard load-balancing loss, added per MoE layer
    moe_z_coef: float = 0.0  # router z-loss (ST-MoE): mean of logsumexp(logits)^2, per MoE layer
    moe_shared_hidden: int = 0  # width of a shared expert every token also goes through (0: none)

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"GPTConfig.{name}={value!r} must be a positive integer; use {name} >= 1 "
                                  f"(the presets: journey presets)")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"pick n_embd as a multiple of n_head (e.g. {self.n_head * 32})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1); use 0.0 (off) or e.g. 0.1")
        if self.attn_impl not in ("sdpa", "eager"):
            raise ConfigError(f"attn_impl={self.attn_impl!r}; use 'sdpa' or 'eager'")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("positions", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is unknown; use one of "
                                  f"{', '.join(repr(a) for a in allowed)}")
        if self.mlp_hidden is not None and (not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1):
            raise ConfigError(f"mlp_hidden={self.mlp_hidden!r} must be a positive integer, or None for the "
                              "default width (4 x n_embd for gelu, Llama's rule for swiglu)")
        if self.n_kv_head is not None:
            if not isinstance(self.n_kv_head, int) or self.n_kv_head < 1:
                raise ConfigError(f"n_kv_head={self.n_kv_head!r} must be a positive integer (or None: "
                                  f"GPT-2's fused multi-head attention); use one of {_divisors(self.n_head)}")
            if self.n_head % self.n_kv_head:
                raise ConfigError(
                    f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}: every key/value "
                    f"head serves the same number of query heads; use n_kv_head in {_divisors(self.n_head)}"
                )
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"positions='rope' rotates pairs of channels, but head_dim = n_embd/n_head = "
                f"{self.n_embd}/{self.n_head} = {self.head_dim} is odd; pick n_embd as a multiple of "
                f"2*n_head (e.g. {2 * self.n_head * -(-self.head_dim // 2)})"
            )
        if self.positions == "sinusoidal" and self.n_embd % 2:
            raise ConfigError(f"positions='sinusoidal' pairs sin and cos channels, but n_embd={self.n_embd} "
                              f"is odd; use an even n_embd (e.g. {self.n_embd + self.n_head})")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta={self.rope_theta!r} must be > 0 (10,000 in the RoPE paper, "
                              "500,000 in Llama 3)")
        self._check_moe()

    def _check_moe(self) -> None:
        """The mixture-of-experts switches: only with experts, and each in its range."""
        if not isinstance(self.n_experts, int) or self.n_experts < 0:
            raise ConfigError(f"n_experts={self.n_experts!r} must be an integer >= 0 (0: a dense MLP; "
                              "Mixtral has 8)")
        if self.n_experts == 0:
            defaults = GPTConfig.__dataclass_fields__
            changed = [n for n in MOE_FIELDS if getattr(self, n) != defaults[n].default]
            if changed:
                raise ConfigError(f"{', '.join(changed)} set but n_experts=0 (a dense MLP): set n_experts "
                                  "(e.g. 8) for a mixture of experts, or leave the moe_* fields out")
            return
        if not isinstance(self.moe_top_k, int) or not 1 <= self.moe_top_k <= self.n_experts:
            raise ConfigError(f"moe_top_k={self.moe_top_k!r}: each token picks top-k of n_experts="
                              f"{self.n_experts} experts, so use 1 <= moe_top_k <= {self.n_experts} "
                              "(Mixtral: 2 of 8)")
        if self.moe_capacity_factor is not None and not (
                isinstance(self.moe_capacity_factor, (int, float)) and self.moe_capacity_factor > 0):
            raise ConfigError(f"moe_capacity_factor={self.moe_capacity_factor!r} must be > 0 (1.0: room for "
                              "a perfectly even load; 1.25 is common) or None (no token dropped)")
        if self.moe_router not in ROUTERS:
            raise ConfigError(f"moe_router={self.moe_router!r} is unknown; use one of "
                              f"{', '.join(repr(r) for r in ROUTERS)}")
        for name in ("moe_aux_coef", "moe_z_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{name}={value!r} must be >= 0 (0: off; typical 0.01 for the "
                                  "load-balancing loss, 0.001 for the z-loss)")
        if self.moe_hidden is not None and (not isinstance(self.moe_hidden, int) or self.moe_hidden < 1):
            raise ConfigError(f"moe_hidden={self.moe_hidden!r} must be a positive integer, or None (each "
                              f"expert as wide as the dense MLP, {self.mlp_dim})")
        if not isinstance(self.moe_shared_hidden, int) or self.moe_shared_hidden < 0:
            raise ConfigError(f"moe_shared_hidden={self.moe_shared_hidden!r} must be an integer >= 0 "
                              "(0: no shared expert)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head for GPT-2's multi-head attention."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def separate_qkv(self) -> bool:
        """Llama layout (q_proj, k_proj, v_proj, o_proj) rather than GPT-2's fused c_attn, c_proj."""
        return self.n_kv_head is not None

    @property
    def mlp_dim(self) -> int:
        """The MLP's hidden width: mlp_hidden, else 4 x n_embd (GELU) or, for SwiGLU, Llama's
        2/3 of that rounded up to a multiple of 32 (three matrices instead of two, about the
        same parameters)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 4 * self.n_embd if self.mlp == "gelu" else llama_ffn_dim(self.n_embd, multiple_of=32)

    @property
    def expert_dim(self) -> int:
        """Each expert's MLP width: moe_hidden, else the dense MLP's (mlp_dim)."""
        return self.mlp_dim if self.moe_hidden is None else self.moe_hidden

    def with_(self, **changes) -> GPTConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


MOE_FIELDS = ("moe_top_k", "moe_hidden", "moe_capacity_factor", "moe_router", "moe_aux_coef", "moe_z_coef",
              "moe_shared_hidden")


def llama_ffn_dim(n_embd: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Llama's SwiGLU width (meta-llama's model.py): 2/3 of 4 x n_embd, times
    ffn_dim_multiplier, rounded up to a multiple of multiple_of. Llama 3 8B: 4096, 1024, 1.3 ->
    14,336; 70B: 8192, 4096, 1.3 -> 28,672; 405B: 16384, 4096, 1.2 -> 53,248."""
    hidden = int(2 * 4 * n_embd / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return -(-hidden // multiple_of) * multiple_of  # round up


# The Llama family's switches; the real shapes add theirs (Llama 3: 128,256-token vocabulary,
# head_dim 128, 8 key/value heads, rope_theta 500,000, 8,192-token context; 405B shipped as
# Llama 3.1, whose 128K context also rescales RoPE: not modelled here).
_LLAMA = dict(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, tie_embeddings=False)
_LLAMA3 = dict(_LLAMA, vocab_size=128_256, block_size=8192, rope_theta=500_000.0, n_kv_head=8)
# Mixture of experts as Mixtral: 8 experts, each token through 2, no token dropped; Switch's
# load-balancing coefficient and ST-MoE's z-loss coefficient.
_MOE = dict(n_experts=8, moe_top_k=2, moe_aux_coef=0.01, moe_z_coef=0.001)

PRESETS: dict[str, GPTConfig] = {
    # Tests: builds and runs in milliseconds.
    "tiny": GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=256, block_size=32),
    # CPU-sized: about a minute of training on 2 cores reaches readable byte-level text.
    "gpt-mini": GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=256, block_size=128),
    "gpt2-small": GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, block_size=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280, vocab_size=50257, block_size=1024),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, block_size=1024),
    # gpt-mini's size as a Llama: RMSNorm, SwiGLU (352 = llama_ffn_dim(128, 32)), RoPE, 2 kv heads.
    "llama-mini": GPTConfig(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, vocab_size=256, block_size=128,
                            mlp_hidden=llama_ffn_dim(128, multiple_of=32), **_LLAMA),
    # gpt-mini with 8 experts per block, each half gpt-mini's MLP width (256 of 512), top-2: a token
    # goes through as many MLP weights as in gpt-mini, the model holds 4 times as many.
    "moe-mini": GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=256, block_size=128, moe_hidden=256,
                          **_MOE),
    # llama-mini with 8 SwiGLU experts (width 352) per block, top-2: Mixtral's layout, CPU-sized.
    "mixtral-mini": GPTConfig(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, vocab_size=256, block_size=128,
                              mlp_hidden=llama_ffn_dim(128, multiple_of=32), **_LLAMA, **_MOE),
    "llama3-8b": GPTConfig(n_layer=32, n_head=32, n_embd=4096, mlp_hidden=llama_ffn_dim(4096, 1024, 1.3),
                           **_LLAMA3),
    # Llama 3.1 8B: the same shapes with a 128K context (the long-context runs context parallel plans).
    "llama3.1-8b": GPTConfig(n_layer=32, n_head=32, n_embd=4096, mlp_hidden=llama_ffn_dim(4096, 1024, 1.3),
                             **{**_LLAMA3, "block_size": 131_072}),
    "llama3-70b": GPTConfig(n_layer=80, n_head=64, n_embd=8192, mlp_hidden=llama_ffn_dim(8192, 4096, 1.3),
                            **_LLAMA3),
    "llama3-405b": GPTConfig(n_layer=126, n_head=128, n_embd=16384,
                             mlp_hidden=llama_ffn_dim(16384, 4096, 1.2), **_LLAMA3),
}


def get_preset(name: str, **overrides) -> GPTConfig:
    """Return a preset by name, optionally with fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].with_(**overrides) if overrides else PRESETS[name]


@dataclass(frozen=True)
class ParallelConfig:
    """How the world is split: dp x cp x tp x pp ranks, microbatches for pp, ZeRO stage.

    Rank layout (as in Megatron): tp varies fastest, then cp, dp, pp, so the ranks of one
    tensor-parallel group are neighbours (same node, fastest links). cp (context parallel) splits
    every sequence over its ranks; 1 means not split. ep (expert parallel) splits a mixture of
    experts' experts over ep consecutive ranks of each dp group (inside dp, as Megatron and
    DeepSpeed-MoE): it adds no ranks, so ep divides dp.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    microbatches: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    schedule: str = "1f1b"  # pipeline schedule: one of PIPELINE_SCHEDULES
    virtual_stages: int = 1  # chunks of layers per pipeline rank (interleaved: v >= 2)
    pad_vocab: bool = False  # tp: pad the vocabulary to a multiple of tp (padded logits masked)
    ep: int = 1  # expert parallel, inside dp (parallel/expert)
    cp_design: str = "ring"  # cp > 1: "ring", "zigzag" (ring, load-balanced) or "ulysses" (all-to-all)

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    def _product(self) -> str:
        """'dp*tp*pp = 2*2*1' (with cp when it splits): how the world size is made."""
        names = ("dp", "cp", "tp", "pp") if self.cp > 1 else ("dp", "tp", "pp")
        return f"{'*'.join(names)} = {'*'.join(str(getattr(self, n)) for n in names)}"

    def _check_schedule(self) -> None:
        """What each pipeline schedule needs of pp, microbatches, virtual stages and the rest."""
        p, m, v, s = self.pp, self.microbatches, self.virtual_stages, self.schedule
        if v > 1 and s != "interleaved":
            raise ConfigError(f"virtual_stages={v} needs schedule='interleaved' (got {s!r}); use "
                              "virtual_stages=1 or the interleaved schedule")
        if s == "interleaved" and v < 2:
            raise ConfigError("schedule='interleaved' needs virtual_stages >= 2 chunks per rank (with 1 "
                              "it is 1F1B); use virtual_stages=2 or schedule='1f1b'")
        if p > 1 and s in ("1f1b", "zb-h1") and m < p:
            raise ConfigError(
                f"microbatches={m} < pp={p}: {s.upper()} needs at least one microbatch per stage to "
                f"fill the pipeline; use microbatches >= {p}")
        if p > 1 and s == "interleaved" and m % p:
            raise ConfigError(
                f"microbatches={m} is not a multiple of pp={p}: the interleaved schedule sends groups "
                f"of pp microbatches through each chunk in turn (as Megatron-LM requires); use "
                f"microbatches={-(-m // p) * p}")
        if s == "zb-h1" and (self.tp > 1 or self.cp > 1):
            raise ConfigError(
                f"schedule='zb-h1' with tp={self.tp}, cp={self.cp} is not supported: its weight-gradient "
                "pass W is split from the input gradient per module, which is not done for "
                "tensor/context-parallel modules; use schedule='1f1b' (or tp=cp=1)")

    def validate(
        self,
        model: GPTConfig | None = None,
        world_size: int | None = None,
        global_batch: int | None = None,
    ) -> ParallelConfig:
        """Raise ConfigError naming the problem and the fix; return self when valid."""
        for name in ("dp", "cp", "tp", "pp", "microbatches", "ep", "virtual_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer; "
                                  f"use {name} >= 1 (1: not split)")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"zero={self.zero} is not a ZeRO stage; use 0, 1, 2 or 3")
        if self.schedule not in PIPELINE_SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}; use one of "
                              f"{', '.join(map(repr, PIPELINE_SCHEDULES))}")
        self._check_schedule()
        if self.cp_design not in CP_DESIGNS:
            raise ConfigError(f"cp_design={self.cp_design!r}; use one of {', '.join(CP_DESIGNS)}")
        if world_size is not None and world_size != self.world_size:
            raise ConfigError(
                f"{self._product()} = {self.world_size} but the world "
                f"has {world_size} ranks; launch with --nproc_per_node={self.world_size} "
                f"or change dp/tp/pp so their product is {world_size}"
            )
        if self.dp % self.ep:
            raise ConfigError(f"ep={self.ep} does not divide dp={self.dp}: expert parallel splits the "
                              f"experts over ep ranks of each data-parallel group; use an ep in "
                              f"{_divisors(self.dp)} or dp a multiple of {self.ep}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("sequence_parallel needs tp > 1 (it splits the sequence over tp); use tp >= 2 "
                              "or turn sequence_parallel off")
        if self.zero and self.dp == 1:
            raise ConfigError(f"zero={self.zero} shards over data-parallel ranks and needs dp > 1; "
                              "use dp >= 2 or zero=0")
        if self.zero >= 2 and self.pp > 1:
            raise ConfigError(
                f"zero={self.zero} with pp={self.pp} is not supported: ZeRO-2/3 reduce-scatter "
                f"gradients every backward, but a pipeline accumulates them over {self.microbatches} "
                f"microbatches before its step (DeepSpeed refuses this too); use zero=1 or pp=1"
            )
        if model is not None:
            if model.n_head % self.tp:
                raise ConfigError(
                    f"tp={self.tp} does not divide n_head={model.n_head}; "
                    f"use a tp in {_divisors(model.n_head)}"
                )
            if model.kv_heads % self.tp:
                raise ConfigError(
                    f"tp={self.tp} does not divide n_kv_head={model.kv_heads}: each rank keeps whole "
                    f"key/value heads (k_proj and v_proj are split by kv heads); use a tp in "
                    f"{_divisors(model.kv_heads)} or more kv heads (n_kv_head a multiple of {self.tp})"
                )
            self._check_experts(model)
            if not model.n_experts and model.mlp_dim % self.tp:
                raise ConfigError(
                    f"tp={self.tp} does not divide the MLP width {model.mlp_dim} (its columns are split "
                    f"over tp); use a tp in {_divisors(model.mlp_dim)} or mlp_hidden a multiple of {self.tp}"
                )
            if model.vocab_size % self.tp and not self.pad_vocab:
                raise ConfigError(
                    f"tp={self.tp} does not divide vocab_size={model.vocab_size}; pad the "
                    f"vocabulary to {padded_vocab_size(model.vocab_size, self.tp)} (a multiple of tp, as "
                    f"Megatron does: pad_vocab=True, padded logits are masked out of the loss) "
                    f"or pick a tp in {_divisors(model.vocab_size)}"
                )
            if self.pp > model.n_layer:
                raise ConfigError(
                    f"pp={self.pp} is larger than n_layer={model.n_layer}; every stage needs "
                    f"at least one layer, so use pp <= {model.n_layer}"
                )
            v = self.virtual_stages
            if v > 1 and model.n_layer % (self.pp * v):
                fits = [d for d in _divisors(model.n_layer) if d % self.pp == 0 and d > self.pp]
                raise ConfigError(
                    f"interleaved: n_layer={model.n_layer} is not divisible by pp*virtual_stages = "
                    f"{self.pp}*{v} = {self.pp * v}; every chunk needs the same number of layers: use "
                    + (f"virtual_stages in {[d // self.pp for d in fits]}" if fits else
                       "a pp dividing n_layer with room for v >= 2, or schedule='1f1b'")
                )
            if self.sequence_parallel and model.block_size % self.tp:
                raise ConfigError(
                    f"sequence_parallel splits the sequence: tp={self.tp} must divide "
                    f"block_size={model.block_size}; use a tp in {_divisors(model.block_size)}"
                )
        if global_batch is not None:
            per_dp = self.dp * self.microbatches
            if not isinstance(global_batch, int) or global_batch < 1:
                raise ConfigError(
                    f"global batch {global_batch!r} must be a positive integer; use a multiple of "
                    f"dp*microbatches = {per_dp} (e.g. {per_dp})"
                )
            if global_batch % per_dp:
                raise ConfigError(
                    f"global batch {global_batch} is not divisible by dp*microbatches = "
                    f"{self.dp}*{self.microbatches} = {per_dp}; use a multiple of {per_dp}"
                )
        return self

    def _check_experts(self, model: GPTConfig) -> None:
        """What expert parallel needs from the model, and what a mixture of experts runs with."""
        if self.ep > 1 and not model.n_experts:
            raise ConfigError(f"ep={self.ep} splits the experts of a mixture of experts, but this model is "
                              "dense (n_experts=0); use ep=1 or an MoE preset (moe-mini, mixtral-mini)")
        if not model.n_experts:
            return
        if model.n_experts % self.ep:
            raise ConfigError(f"ep={self.ep} does not divide n_experts={model.n_experts}: every ep rank "
                              f"holds the same number of experts; use an ep in {_divisors(model.n_experts)}")
        unsupported = [(self.pp > 1, f"pp={self.pp}"), (self.cp > 1, f"cp={self.cp}"),
                       (self.sequence_parallel, "sequence_parallel")]
        for bad, what in unsupported:
            if bad:
                raise ConfigError(f"{what} with a mixture of experts (n_experts={model.n_experts}) is not "
                                  "implemented: MoE runs with dp, ep and tp (lab 12); use pp=1, cp=1 and "
                                  "sequence_parallel off, or a dense preset")


# The linear layers of a block (model.py), the names LoRA can target: GPT-2's (fused attention,
# GELU MLP; LoRAConfig's default) and the Llama family's (q/k/v/o, SwiGLU gate/up/down).
LORA_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LLAMA_LORA_LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def block_linears(model: GPTConfig) -> tuple[str, ...]:
    """The linear layers of one block of this model, by its switches: attention (c_attn, c_proj |
    q/k/v/o_proj), then the MLP (c_fc, c_proj | gate/up/down_proj)."""
    attn = LLAMA_LORA_LINEARS[:4] if model.separate_qkv else LORA_LINEARS[:2]
    mlp = LLAMA_LORA_LINEARS[4:] if model.mlp == "swiglu" else LORA_LINEARS[2:]
    return attn + mlp


def lora_linear_names(model: GPTConfig) -> list[str]:
    """Full names of the linear layers LoRA may adapt: transformer.h.<i>.<one of block_linears>.

    lm_head is left out on purpose: tied (GPT-2) it is the embedding matrix, so an adapter merged
    into it would change the input embeddings too; untied (Llama) adapters stay in the blocks too.
    """
    return [f"transformer.h.{i}.{s}" for i in range(model.n_layer) for s in block_linears(model)]


def lora_target_matches(target: str, name: str) -> bool:
    """PEFT's rule for a list of target names: the full name or any dotted suffix of it."""
    return name == target or name.endswith("." + target)


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters: W x + (alpha / rank) B A x, A (rank x in), B (out x rank), W frozen.

    `targets` are module names as PEFT matches them: a full name or any dotted suffix
    ("c_proj" means both attn.c_proj and mlp.c_proj in every block). The default is GPT-2's
    four; `LoRAConfig.for_model(config)` targets every linear of the model's blocks (Llama: q, k,
    v, o_proj and gate, up, down_proj).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_LINEARS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def for_model(cls, model: GPTConfig, **fields) -> LoRAConfig:
        """Adapters on every linear of the model's blocks (config.block_linears), either family."""
        return cls(targets=block_linears(model), **fields)

    def matched(self, model: GPTConfig) -> list[str]:
        """The full names of the layers these targets select (in model order)."""
        return [n for n in lora_linear_names(model) if any(lora_target_matches(t, n) for t in self.targets)]

    def validate(self, model: GPTConfig) -> LoRAConfig:
        """Raise ConfigError naming the problem and the fix; return self when valid."""
        if model.n_experts:
            raise ConfigError(f"LoRA on a mixture of experts (n_experts={model.n_experts}) is not "
                              "implemented: its MLP is E experts, not one c_fc/c_proj; use a dense preset "
                              "(gpt-mini)")
        if isinstance(self.targets, str) or not self.targets:
            raise ConfigError(f"targets={self.targets!r} must be a non-empty tuple of module names, "
                              f"e.g. {block_linears(model)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank={self.rank!r} must be a positive integer (typical: 4 to 64)")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha={self.alpha!r} must be > 0 (the update is scaled by alpha/rank; "
                              "alpha = 2 x rank is a common choice)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout={self.dropout} must be in [0, 1); use 0.0 (off) or e.g. 0.05")
        names, linears = lora_linear_names(model), block_linears(model)
        for t in self.targets:
            if any(lora_target_matches(t, n) for n in names):
                continue
            why = ""
            if t.split(".")[-1] in ("lm_head", "wte"):
                why = (" (lm_head is tied to the embedding wte: an adapter merged into it would change the "
                       "embeddings too)") if model.tie_embeddings else " (adapters go in the blocks' linears)"
            short = sorted({n.split(".")[-1] for n in linears}, key=[n.split(".")[-1] for n in linears].index)
            raise ConfigError(
                f"LoRA target {t!r} matches no linear layer of this GPT{why}. Valid targets (a full "
                f"name or any dotted suffix of one, as PEFT matches): {', '.join(linears)} (in every "
                f"block), {', '.join(short)} (each in every block), or one block's, e.g. "
                f"{names[0]} .. {names[-1]}"
            )
        if self.rank >= model.n_embd:  # every adapted linear has n_embd on one side
            raise ConfigError(
                f"LoRA rank={self.rank} >= n_embd={model.n_embd}: B A would be no cheaper than training "
                f"the full matrix; use rank < {model.n_embd}"
            )
        return self


def check_bucket_mb(bucket_mb: float) -> float:
    """A data-parallel gradient bucket size in MiB (as DDP's bucket_cap_mb); return it if valid."""
    if not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
        raise ConfigError(
            f"bucket_mb={bucket_mb!r} must be a positive number of MiB per gradient bucket "
            "(DDP's default is 25; smaller means more, earlier all-reduces)"
        )
    return float(bucket_mb)


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp, so each rank holds V/tp rows (padded logits
    are masked out of the loss). Megatron also rounds to 128 per rank for GPU efficiency."""
    return _round_up(vocab_size, tp)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
