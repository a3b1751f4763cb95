"""Analytic memory of training GPT-mini, per rank: every term a formula you can read.

    est = estimate_memory(get_preset("gpt2-small"), batch_size=8, seq_len=1024, dtype="bf16-mixed",
                          tp=2, dp=2, zero=2)
    est.total, est.rows(), est.phases

Notation: b micro-batch size, s sequence length, h = n_embd, a = n_head, V vocab, L layers,
t tensor-parallel size, N parameters. Bytes per value: v for activations (4 fp32, 2 for 16-bit),
r for the residual stream (LayerNorm inputs; fp32 under autocast), w for weights and grads.

Model states (`model_state_bytes`): N·w weights, N·w grads, optimizer state per parameter
(AdamW: two moments, plus an fp32 master copy under mixed precision; SGD: one momentum buffer),
divided over dp by ZeRO stage (1: optimizer, 2: + grads, 3: + weights).

Activations per layer: the tensors autograd keeps for backward (`layer_terms`). The 16 values
per token and channel of Korthikanti et al. 2022 (`activation_bytes_per_layer`, the paper's
16-bit count sbh(34 + 5as/h)) are exactly what PyTorch keeps for this model; the real model
adds small terms the paper leaves out (LayerNorm statistics, SDPA's log-sum-exp, the causal
mask), keeps dropout masks at the value's size on CPU (1 byte on CUDA), keeps the residual
stream in fp32 under autocast, and under autocast keeps a 16-bit copy of every weight matrix.

Peak (`estimate_memory(...).total`): activations and gradients never peak together, so the
total is the largest of a few moments of a steady-state step (`phases`): the loss's backward
(three fp32 b·s·V buffers next to every activation), the last layer's backward (its MLP or
attention gradients), the embeddings' backward, the optimizer step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from journey_dist.config import LORA_LINEARS, ConfigError, GPTConfig, LoRAConfig, ParallelConfig

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
    "bf16-mixed": Precision(2, 2, 2),  # Megatron/DeepSpeed: 16-bit model, fp32 master in the optimizer
    "fp16-mixed": Precision(2, 2, 2),
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

    params = N·w / (dp if ZeRO-3); grads = N_trainable·w / (dp if ZeRO >= 2);
    optimizer = N_trainable·o / (dp if ZeRO >= 1), with (w, o) from the dtype and optimizer
    (AdamW mixed precision: w = 2, o = 12, so 2 + 2 + 12 = 16 bytes per parameter).
    Only `trainable_params` (default: all; LoRA: the adapters) get gradients and optimizer state.
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


# ---------------------------------------------------------------------- parameters


def layer_param_count(cfg: GPTConfig, tp: int = 1) -> int:
    """Parameters of one block on one tensor-parallel rank (Megatron split).

    c_attn and c_fc are column-parallel (weight and bias split by t), the two c_proj are
    row-parallel (weight split, bias replicated), LayerNorms are replicated:
    12h²/t + (3h + 4h)/t + 2h (c_proj biases) + 4h (two LayerNorms) with biases.
    """
    h, t = cfg.n_embd, tp
    if cfg.bias:
        return 12 * h * h // t + 7 * h // t + 2 * h + 4 * h
    return 12 * h * h // t + 2 * h


def param_count(cfg: GPTConfig, tp: int = 1, pp: int = 1, stage: int | None = None) -> int:
    """Exact parameter count (tied embeddings counted once); per tensor-parallel rank for tp > 1.

    N = Vh (wte, vocab-parallel: Vh/t) + (block_size)h (wpe) + L·layer + 2h (ln_f) [+ Vh/t lm_head
    if untied]. With pp > 1 pass `stage`: stage 0 holds the embeddings, the last stage ln_f and
    the output head (a copy of wte when tied, as Megatron does), each stage its share of layers.
    """
    h, t = cfg.n_embd, tp
    ln = 2 * h if cfg.bias else h
    emb = cfg.vocab_size * h // t + cfg.block_size * h
    head = ln + (0 if cfg.tie_embeddings else cfg.vocab_size * h // t)
    if pp == 1 or stage is None:
        return emb + cfg.n_layer * layer_param_count(cfg, t) + head
    n = stage_layers(cfg.n_layer, pp, stage) * layer_param_count(cfg, t)
    if stage == 0:
        n += emb
    if stage == pp - 1:
        n += head + (cfg.vocab_size * h // t if cfg.tie_embeddings else 0)
    return n


def param_tensor_count(cfg: GPTConfig) -> int:
    """Number of parameter tensors (AdamW keeps one fp32 step counter per tensor)."""
    per_layer = 12 if cfg.bias else 6
    return 2 + cfg.n_layer * per_layer + (2 if cfg.bias else 1) + (0 if cfg.tie_embeddings else 1)


def stage_layers(n_layer: int, pp: int, stage: int) -> int:
    """Layers on a pipeline stage: as even as possible, earlier stages take the remainder."""
    return n_layer // pp + (1 if stage < n_layer % pp else 0)


def kv_cache_bytes(cfg: GPTConfig, batch: int, tokens: int, dtype: str | int = "fp32",
                   kv_heads: int | None = None) -> int:
    """KV cache = 2 (K, V) x layers x batch x tokens x kv_heads x head_dim x bytes per value."""
    nbytes = dtype if isinstance(dtype, int) else DTYPE_BYTES[_base_dtype(dtype)]
    heads = cfg.n_head if kv_heads is None else kv_heads
    return 2 * cfg.n_layer * batch * tokens * heads * cfg.head_dim * nbytes


def _base_dtype(dtype: str) -> str:
    return dtype.split("-")[0] if dtype.split("-")[0] in DTYPE_BYTES else dtype


# ---------------------------------------------------------------------- activations


def activation_bytes_per_layer(seq_len: int, batch_size: int, hidden: int, heads: int, *, tp: int = 1,
                               sequence_parallel: bool = False, fused_attention: bool = False,
                               dropout: bool = True, bytes_per_value: int = 2, mask_bytes: int = 1) -> float:
    """Korthikanti et al. 2022 ("Reducing Activation Recomputation"), one layer, no recompute.

    16-bit with dropout: sbh(34 + 5as/h); tensor parallel: sbh(10 + 24/t + 5as/(ht)); with
    sequence parallel everything is divided by t: sbh(34/t + 5as/(ht)). Fused (flash) attention
    keeps no s x s matrix, which drops the 5as/h term.

    Where the numbers come from, in values per token and channel (v = bytes_per_value):
    4 replicated values (two LayerNorm inputs, the QKV and MLP inputs) and 12 split over t
    (Q, K, V, attention-projection input, 4h GELU input, 4h GELU output): 34 = 16·2 + 2 dropout
    masks of 1 byte. Per attention score: softmax output (v), dropout mask (1), dropout output (v):
    5 = 2 + 1 + 2. Scaling: fp32 is bytes_per_value=4 (64 + 2 masks); without dropout the masks
    and the dropout output go (sbh·16v + as²b·v); `mask_bytes` is the mask's size (1 on GPUs,
    bool; PyTorch's CPU dropout keeps a full-precision noise tensor, so v there).
    """
    s, b, h, a, t, v = seq_len, batch_size, hidden, heads, tp, bytes_per_value
    masks = 2 * mask_bytes if dropout else 0
    replicated = 4 * v + masks
    split = 12 * v
    per_token = (replicated + split) / t if sequence_parallel else replicated + split / t
    scores = 0.0 if fused_attention else (v + (mask_bytes + v if dropout else 0)) * a * s / (h * t)
    return s * b * h * (per_token + scores)


@dataclass(frozen=True)
class Term:
    """One line of the estimate: what it is, its bytes, and the formula that gave them."""

    name: str
    nbytes: float
    formula: str


@dataclass(frozen=True)
class _Shape:
    """Everything a term formula needs, per micro-batch and per rank."""

    b: int  # micro-batch size
    s: int
    h: int
    a: int
    V: int
    t: int
    sp: bool
    prec: Precision
    attn: str  # "sdpa" or "eager"
    dropout: bool
    device: str  # "cpu" or "cuda"

    @property
    def rep(self) -> float:  # LayerNorm-region tensors: split over t only with sequence parallel
        return 1 / self.t if self.sp else 1.0

    @property
    def fused(self) -> bool:  # PyTorch's CPU SDPA falls back to the unfused math kernel for dropout
        return self.attn == "sdpa" and not (self.dropout and self.device == "cpu")

    @property
    def mask(self) -> int:  # bytes per dropout-mask element: bool on CUDA, a noise tensor on CPU
        return 1 if self.device == "cuda" else self.prec.values

    @property
    def cpu_math(self) -> bool:  # CPU's math SDPA (used for dropout) computes 16-bit inputs in fp32
        return self.attn == "sdpa" and not self.fused

    @property
    def score_bytes(self) -> int:  # softmax / dropout output per score
        if self.cpu_math or (self.prec.autocast and self.device == "cuda"):  # CUDA autocast: fp32 softmax
            return 4
        return self.prec.values

    @property
    def attn_mask(self) -> int:  # attention-dropout mask per score
        return 1 if self.device == "cuda" else self.score_bytes

    @property
    def stat(self) -> int:  # LayerNorm mean/rstd: fp32, except pure 16-bit on CPU
        return 2 if (self.device == "cpu" and self.prec.residual == 2) else 4


def layer_terms(x: _Shape) -> list[Term]:
    """Bytes one transformer block keeps for backward (one micro-batch, one rank)."""
    b, s, h, a, t, v, r = x.b, x.s, x.h, x.a, x.t, x.prec.values, x.prec.residual
    n = b * s
    terms = [
        Term("ln_1 input (residual stream)", r * n * h * x.rep, "r·bsh [/t with SP]"),
        Term("ln_1 output (c_attn input)", v * n * h * x.rep, "v·bsh [/t with SP]"),
    ]
    if x.fused:
        terms += [
            Term("q, k, v (c_attn output, kept by SDPA)", 3 * v * n * h / t, "3v·bsh/t"),
            Term("attention output (SDPA output = c_proj input)", v * n * h / t, "v·bsh/t"),
            Term("SDPA log-sum-exp (fp32)", 4 * b * a * s / t, "4·bas/t"),
        ]
    else:
        sv, qv = x.score_bytes, (4 if x.cpu_math else v)
        scores = b * a * s * s / t
        terms += [
            Term("q, k^T, v copies for the two batched matmuls", 3 * qv * n * h / t,
                 "3v·bsh/t" + (" (fp32: CPU math SDPA)" if qv != v else "")),
            Term("attention output copy (c_proj input)", v * n * h / t, "v·bsh/t"),
            Term("softmax output (b·a·s·s scores)", sv * scores, f"{sv}·as²b/t"),
        ]
        if x.dropout:
            terms.append(Term("attention dropout mask", x.attn_mask * scores, f"{x.attn_mask}·as²b/t"))
        if sv != v and x.device == "cuda":  # attn @ v keeps its 16-bit copy, not the fp32 input
            terms.append(Term("16-bit copy of the probabilities for attn @ v", v * scores, "2·as²b/t"))
        elif x.dropout:
            terms.append(Term("attention dropout output", sv * scores, f"{sv}·as²b/t"))
        if x.attn == "eager":
            terms.append(Term("causal mask (bool, made per layer)", s * s, "s²"))
    terms += [
        Term("ln_2 input (residual stream)", r * n * h * x.rep, "r·bsh [/t with SP]"),
        Term("ln_2 output (c_fc input)", v * n * h * x.rep, "v·bsh [/t with SP]"),
        Term("LayerNorm mean and rstd (ln_1, ln_2)", 2 * 2 * n * x.stat * x.rep, "2·2·bs·4 bytes"),
        Term("c_fc output (GELU input)", 4 * v * n * h / t, "4v·bsh/t"),
        Term("GELU output (c_proj input)", 4 * v * n * h / t, "4v·bsh/t"),
    ]
    if x.dropout:
        terms.append(Term("residual dropout masks (attention, MLP)", 2 * x.mask * n * h * x.rep,
                          "2m·bsh [/t with SP]"))
    if x.prec.autocast:
        terms.append(Term("autocast 16-bit weight copies (kept by each Linear)", 2 * 12 * h * h / t,
                          "2·12h²/t"))
    return terms


def _mlp_saved(x: _Shape) -> float:
    """What a block's MLP half keeps (freed once the MLP's backward is done)."""
    n, h, t, v, r = x.b * x.s, x.h, x.t, x.prec.values, x.prec.residual
    saved = (r + v) * n * h * x.rep + 2 * n * x.stat * x.rep + 8 * v * n * h / t
    saved += (x.mask * n * h * x.rep) if x.dropout else 0
    return saved + (2 * 8 * h * h / t if x.prec.autocast else 0)


def _mlp_transient(x: _Shape) -> float:
    """c_proj's backward: the gradient of the GELU output (4v·bsh/t) and the weight gradient in the
    compute dtype (4h²·v/t), next to everything the block still keeps; under autocast also the
    16-bit copy of the fp32 residual gradient that c_proj's backward consumes (v·bsh)."""
    v, n = x.prec.values, x.b * x.s
    cast = v * n * x.h * x.rep if x.prec.residual != v else 0
    return 4 * v * n * x.h / x.t + 4 * x.h * x.h * v / x.t + cast


def _attn_freed(x: _Shape) -> float:
    """Unfused attention: by the softmax's backward, c_proj's input copy and the v copy are freed.
    Fused: SDPA still holds its output (c_proj's input), nothing is freed yet."""
    if x.fused:
        return 0.0
    n, v = x.b * x.s, x.prec.values
    return (v + (4 if x.cpu_math else v)) * n * x.h / x.t


def _attn_transient(x: _Shape) -> float:
    """Attention's backward. Fused: the output's gradient and dq, dk, dv (4v·bsh/t; on CUDA flash
    attention's fp32 dq accumulator, 4·bsh/t, assumed from its implementation). Unfused: the
    softmax's input and output gradients (2 score matrices) and dv; with dropout one score
    gradient next to the still-kept dropout output, dv and the output gradient's copy."""
    n, h, t, v = x.b * x.s, x.h, x.t, x.prec.values
    if x.fused:  # CUDA flash backward (16-bit) also accumulates dq in fp32
        return 4 * v * n * h / t + (4 * n * h / t if (x.device == "cuda" and v == 2) else 0)
    sv, scores, qv = x.score_bytes, x.b * x.a * x.s * x.s / t, (4 if x.cpu_math else v)
    extra = 2 * scores if (sv != v and x.device == "cuda") else 0  # CUDA autocast: 16-bit score grad
    if x.dropout:  # the dropout output's gradient appears while that output is still kept
        return sv * scores + 2 * qv * n * h / t + extra
    return 2 * sv * scores + qv * n * h / t + extra


def _outer_terms(x: _Shape, cfg: GPTConfig, first: bool, last: bool) -> list[Term]:
    """Kept outside the blocks: token ids, embedding dropout, ln_f."""
    n, h, v, r = x.b * x.s, x.h, x.prec.values, x.prec.residual
    terms = []
    if first:
        terms += [Term("token ids and positions (int64, kept by the embeddings)", 8 * n + 8 * x.s,
                       "8·bs + 8·s")]
        if x.dropout:
            terms.append(Term("embedding dropout mask", (r if x.device == "cpu" else 1) * n * h * x.rep,
                              "m·bsh"))
    if last:
        terms += [Term("ln_f input", r * n * h * x.rep, "r·bsh"),
                  Term("ln_f mean and rstd", 2 * n * x.stat * x.rep, "2·bs·4 bytes")]
        if not x.prec.autocast:
            terms.append(Term("ln_f output (lm_head input)", v * n * h * x.rep, "v·bsh"))
    return terms


def logits_terms(x: _Shape) -> list[Term]:
    """The output head and the loss in forward (model.py: F.cross_entropy(logits.float(), ...))."""
    n, h, V, t, v = x.b * x.s, x.h, x.V, x.t, x.prec.values
    terms = [Term("logits (b·s·V)", v * n * V / t, "v·bsV/t")]
    if v != 4:
        terms.append(Term("fp32 copy of the logits for the loss", 4 * n * V / t, "4·bsV/t"))
    terms += [Term("log-softmax (fp32, kept for backward)", 4 * n * V / t, "4·bsV/t"),
              Term("targets (int64)", 8 * n, "8·bs")]
    if x.prec.autocast:
        terms.append(Term("autocast 16-bit copies of the head's input and tied weight",
                          2 * n * h * x.rep + 2 * V * h / t, "2·bsh + 2·Vh/t"))
    return terms


def _logits_saved(x: _Shape) -> float:
    """Of the head's forward tensors, what survives into backward: log-softmax, targets, copies."""
    keep = ("log-softmax", "targets", "autocast")
    return sum(tm.nbytes for tm in logits_terms(x) if tm.name.startswith(keep))


def _optimizer_temporaries(cfg: GPTConfig, optimizer: str, device: str, w: int, tp: int) -> float:
    """Scratch of optimizer.step(). CUDA: fused AdamW (as train.make_optimizer picks) needs none.
    CPU: single-tensor AdamW computes denom = sqrt(v)/c + eps per parameter while the previous
    parameter's denom is still referenced: max over neighbours (n_prev + 2·n_i)·w, parameters in
    make_optimizer's order (matrices first, then vectors). SGD with momentum works in place."""
    if optimizer != "adamw" or device == "cuda":
        return 0.0
    h, t = cfg.n_embd, tp
    matrices = [cfg.vocab_size * h // t, cfg.block_size * h] + [3 * h * h // t, h * h // t, 4 * h * h // t,
                                                                 4 * h * h // t] * cfg.n_layer
    if not cfg.tie_embeddings:
        matrices.append(cfg.vocab_size * h // t)
    worst = max(prev + 2 * cur for prev, cur in zip([0] + matrices, matrices))
    return worst * w


# ---------------------------------------------------------------------- LoRA (frozen base)


def _lora_shapes(cfg: GPTConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adaptable linear of a block (config.LORA_LINEARS)."""
    h = cfg.n_embd
    return dict(zip(LORA_LINEARS, ((h, 3 * h), (h, h), (h, 4 * h), (4 * h, h))))


def _lora_fractions(cfg: GPTConfig, lora: LoRAConfig) -> dict[str, float]:
    """For each linear of a block, the fraction of blocks where LoRA adapts it."""
    matched = lora.matched(cfg)
    return {kind: sum(name.endswith("." + kind) for name in matched) / cfg.n_layer for kind in LORA_LINEARS}


def lora_param_count(cfg: GPTConfig, lora: LoRAConfig) -> int:
    """Adapter parameters: rank x (in + out) for every adapted linear (A: r x in, B: out x r)."""
    shapes = _lora_shapes(cfg)
    return sum(lora.rank * sum(shapes[kind]) for name in lora.matched(cfg)
               for kind in LORA_LINEARS if name.endswith("." + kind))


def lora_layer_terms(x: _Shape, cfg: GPTConfig, lora: LoRAConfig) -> list[Term]:
    """What LoRA changes in one block's kept activations (mean over blocks when only some are
    adapted). Adds A's output (kept by B) and, with LoRA dropout, the dropout output and mask
    (kept by A). Removes a linear's input when nothing reads it in backward any more: a frozen
    weight needs no input for its gradient, so only an adapter without dropout still keeps it
    (attention's c_proj input stays: fused SDPA keeps its output anyway)."""
    n, v, r = x.b * x.s, x.prec.values, lora.rank
    terms = []
    for kind, f in _lora_fractions(cfg, lora).items():
        fan_in = _lora_shapes(cfg)[kind][0]
        if f:
            terms.append(Term(f"LoRA {kind}: A's output (kept by B)", f * v * n * r, "v·bs·r"))
            if lora.dropout:
                terms.append(Term(f"LoRA {kind}: dropout output and mask (kept by A)",
                                  f * (v + x.mask) * n * fan_in, "(v + m)·bs·in"))
        kept = f * (0.0 if lora.dropout else 1.0)  # blocks where the linear's input is still read
        if kept < 1 and not (kind == "attn.c_proj" and x.fused):
            terms.append(Term(f"{kind} input no longer kept (frozen weight)", -(1 - kept) * v * n * fan_in,
                              "-v·bs·in"))
    return terms


def lora_outer_terms(x: _Shape, cfg: GPTConfig, first: bool, last: bool) -> list[Term]:
    """Frozen embeddings and head: the positions, the first block's ln_1 input and statistics
    (nothing before them needs a gradient) and the head's input (frozen lm_head) are not kept.
    The token ids stay: the caller's batch holds them."""
    n, h, v, r = x.b * x.s, x.h, x.prec.values, x.prec.residual
    terms = []
    if first:
        dropped = 8 * x.s + (r * n * h + 2 * n * x.stat) * x.rep
        if x.dropout:
            dropped += (r if x.device == "cpu" else 1) * n * h * x.rep
        terms.append(Term("frozen embeddings: positions, first ln_1 input and stats not kept", -dropped,
                          "-(8·s + r·bsh + 2·bs·4)"))
    if last and not x.prec.autocast:
        terms.append(Term("ln_f output no longer kept (frozen lm_head)", -v * n * h * x.rep, "-v·bsh"))
    return terms


def _lora_mlp_transient(x: _Shape, cfg: GPTConfig, lora: LoRAConfig) -> float:
    """The MLP c_proj's backward with a frozen weight: no weight gradient; with an adapter the
    input gradient arrives twice (through W and through B A) and is summed: 3 x v·bs·4h."""
    f = _lora_fractions(cfg, lora)["mlp.c_proj"]
    return (1 + 2 * f) * 4 * x.prec.values * x.b * x.s * x.h


# ---------------------------------------------------------------------- the estimate


@dataclass
class MemoryEstimate:
    """Bytes per rank. Each of params .. logits is that category's own high-water mark; `total`
    is the modelled peak of the step (the largest of `phases`), which is less than their sum
    because gradients and activations do not peak together. `temporaries` is the scratch
    alive at the peak (gradients flowing backward, optimizer scratch)."""

    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    temporaries: float
    total: float
    peak_phase: str
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    terms: dict[str, list[Term]] = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)

    def rows(self) -> list[tuple[str, float, str]]:
        """(component, bytes, formula) for tables."""
        return [
            ("params", self.params, self.terms["model states"][0].formula),
            ("grads", self.grads, self.terms["model states"][1].formula),
            ("optimizer", self.optimizer, self.terms["model states"][2].formula),
            ("activations", self.activations,
             "layers x in-flight micro-batches x per-layer terms + outside the blocks"),
            ("logits", self.logits, "logits, fp32 copy, log-softmax (see terms)"),
            ("temporaries", self.temporaries, f"scratch at the peak ({self.peak_phase})"),
            ("total", self.total, f"peak: {self.peak_phase}"),
        ]

    @property
    def at_peak(self) -> dict[str, float]:
        return self.phases[self.peak_phase]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["terms"] = {k: [asdict(t) for t in v] for k, v in self.terms.items()}
        return d


def estimate_memory(cfg: GPTConfig, *, batch_size: int, seq_len: int, dtype: str = "fp32",
                    optimizer: str = "adamw", trainable_params: int | None = None, dp: int = 1,
                    zero: int = 0, tp: int = 1, pp: int = 1, microbatches: int = 1,
                    sequence_parallel: bool = False, recompute: bool = False, attn: str | None = None,
                    dropout: bool | None = None, device: str = "cuda",
                    schedule: str = "1f1b", lora: LoRAConfig | None = None,
                    stage: int | None = None) -> MemoryEstimate:
    """Estimate one training step's memory on the busiest rank (bytes), or on pipeline `stage`.

    batch_size is the global batch (sequences per optimizer step, as in TrainConfig); each
    data-parallel rank runs batch_size/dp of it in `microbatches` micro-batches. `attn`
    ("sdpa" or "eager") defaults to cfg.attn_impl, `dropout` to cfg.dropout > 0. `device`
    picks the few terms that differ between PyTorch on CPU and CUDA (dropout mask size, SDPA
    with dropout, softmax under autocast, optimizer scratch). `recompute` is full activation
    checkpointing of every block (keeps only each block's input). `optimizer="none"`: forward
    and backward only. `trainable_params` (LoRA): only those get gradients and optimizer state;
    activations are still counted as if every weight were trained (an upper bound).
    `lora` (a LoRAConfig; tp = 1): the base is frozen and adapters are added: their weights,
    gradients and AdamW state (trainable_params defaults to their count), what they keep for
    backward, and what a frozen base no longer keeps (`lora_layer_terms`, `lora_outer_terms`).
    Exact vs the CPU tensor ledger when the first block's c_attn is adapted and LoRA dropout is 0;
    otherwise an upper bound (a first block whose attention needs no gradient keeps less).
    `stage` (0..pp-1): that stage's ranks instead of the busiest (the first or the last stage).
    Raises ConfigError (config.py's checks) for a layout that cannot work.
    """
    if stage is not None and not 0 <= stage < pp:
        raise ConfigError(f"stage={stage} is not a pipeline stage of pp={pp}; use 0..{pp - 1}")
    if dtype not in PRECISIONS:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if optimizer not in ("adamw", "sgd", "none"):
        raise ConfigError(f"unknown optimizer {optimizer!r}; use adamw, sgd or none")
    attn = cfg.attn_impl if attn is None else attn
    if attn not in ("sdpa", "eager"):
        raise ConfigError(f"attn={attn!r}; use 'sdpa' or 'eager'")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}; use 'cpu' or 'cuda'")
    if seq_len < 1 or seq_len > cfg.block_size:
        raise ConfigError(f"seq_len={seq_len} must be in 1..block_size={cfg.block_size}")
    ParallelConfig(dp=dp, tp=tp, pp=pp, microbatches=microbatches, zero=zero,
                   sequence_parallel=sequence_parallel, schedule=schedule).validate(
                       cfg, global_batch=batch_size)
    if lora is not None:
        lora.validate(cfg)
        if tp > 1:
            raise ConfigError("the LoRA estimate models tp=1 only (adapters on tensor-parallel shards "
                              "are not modelled); use tp=1")
        trainable_params = lora_param_count(cfg, lora) if trainable_params is None else trainable_params
    prec = PRECISIONS[dtype]
    dropout = cfg.dropout > 0 if dropout is None else dropout
    x = _Shape(b=batch_size // (dp * microbatches), s=seq_len, h=cfg.n_embd, a=cfg.n_head,
               V=cfg.vocab_size, t=tp, sp=sequence_parallel, prec=prec, attn=attn, dropout=dropout,
               device=device)
    stages = [stage] if stage is not None else ([0] if pp == 1 else [0, pp - 1])
    results = [_estimate_stage(cfg, x, dtype, optimizer, trainable_params, dp, zero, pp, stage,
                               microbatches, recompute, schedule, lora) for stage in stages]
    est = max(results, key=lambda e: e.total)
    est.inputs = dict(config=cfg.to_dict(), batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                      optimizer=optimizer, trainable_params=trainable_params, dp=dp, zero=zero, tp=tp,
                      pp=pp, microbatches=microbatches, sequence_parallel=sequence_parallel,
                      recompute=recompute, attn=attn, dropout=dropout, device=device, schedule=schedule,
                      micro_batch=x.b, lora=None if lora is None else asdict(lora))
    return est


def _estimate_stage(cfg: GPTConfig, x: _Shape, dtype: str, optimizer: str, trainable: int | None,
                    dp: int, zero: int, pp: int, stage: int, m: int, recompute: bool,
                    schedule: str, lora: LoRAConfig | None = None) -> MemoryEstimate:
    first, last = stage == 0, stage == pp - 1
    n_params = param_count(cfg, x.t, pp, stage)
    frac = 1.0 if trainable is None else trainable / param_count(cfg)
    states = model_state_bytes(n_params, dtype, optimizer, dp, zero,
                               None if trainable is None else round(n_params * frac))
    n_adapters = 0
    if lora is not None:  # adapter weights on this stage (their share of the layers)
        n_adapters = lora_param_count(cfg, lora) * stage_layers(cfg.n_layer, pp, stage) / cfg.n_layer
        states["params"] += n_adapters * PRECISIONS[dtype].weights / (dp if zero >= 3 else 1)
    w = PRECISIONS[dtype].weights
    # AdamW's per-tensor step counters: 4 bytes each (a 512-byte block each on CUDA)
    steps = 0
    if optimizer == "adamw" and zero == 0 and pp == 1:
        steps = (512 if x.device == "cuda" else 4) * param_tensor_count(cfg)
    if lora is not None and optimizer == "adamw" and zero == 0 and pp == 1:  # A and B: 2 per linear
        steps = (512 if x.device == "cuda" else 4) * 2 * len(lora.matched(cfg))
    P, G, O = states["params"], states["grads"], states["optimizer"] + (
        steps if (trainable is None or lora is not None) else 0)
    gdiv = dp if zero >= 2 else 1

    # activations kept per block; in-flight micro-batches on this stage (1F1B: pp - stage)
    n_layers = stage_layers(cfg.n_layer, pp, stage)
    lt = layer_terms(x) + (lora_layer_terms(x, cfg, lora) if lora is not None else [])
    a_layer = sum(tm.nbytes for tm in lt)
    a_stored = lt[0].nbytes if recompute else a_layer  # full recompute keeps the block input only
    in_flight = 1 if pp == 1 else (min(pp - stage, m) if schedule == "1f1b" else m)
    outer = _outer_terms(x, cfg, first, last) + (
        lora_outer_terms(x, cfg, first, last) if lora is not None else [])
    a_outer = sum(tm.nbytes for tm in outer)
    A = in_flight * (n_layers * a_stored + a_outer)
    lg = logits_terms(x) if last else []
    logits_hw = sum(tm.nbytes for tm in lg)

    n, h, r = x.b * x.s, x.h, x.prec.residual
    g_layer = layer_param_count(cfg, x.t) * w * frac / gdiv
    g_proj = (h * h / x.t + (h if cfg.bias else 0)) * w * frac / gdiv  # attention's c_proj
    g_mlp = (8 * h * h / x.t + (4 * h / x.t + h + 2 * h if cfg.bias else h)) * w * frac / gdiv
    tied_tmp = cfg.vocab_size * h / x.t * w * frac if (cfg.tie_embeddings and pp == 1) else 0.0
    dx = r * n * h * x.rep  # gradient of the residual stream, alive through the whole backward
    # ZeRO-3 all-gathers a block's full weights for its forward and backward (one block at a time)
    gathered = layer_param_count(cfg, x.t) * w if zero >= 3 else 0.0
    acc = m > 1  # accumulating: the grads of earlier micro-batches are alive during this one

    def phase(grads: float, acts: float, logits: float, temps: float) -> dict[str, float]:
        return {"params": P, "grads": G if acc else grads, "optimizer": O, "activations": acts,
                "logits": logits, "temporaries": temps}

    phases: dict[str, dict[str, float]] = {}
    if last:
        phases["forward: loss (logits, fp32 copy, log-softmax)"] = phase(0, A, logits_hw, 0)
        phases["backward: log-softmax (two fp32 b·s·V gradients)"] = phase(
            0, A, _logits_saved(x), 2 * 4 * n * x.V / x.t)
    # backward of the last block on this stage, then of its first block (the extremes)
    head_freed = sum(tm.nbytes for tm in outer if tm.name.startswith("ln_f")) if last else 0.0
    g_head = (2 * h if cfg.bias else h) * w * frac / gdiv if last else 0.0
    if last and (not cfg.tie_embeddings or pp > 1):  # the head's own weight (untied or a pp copy)
        g_head += cfg.vocab_size * h / x.t * w * frac / gdiv
    recomputed = (a_layer - a_stored) if recompute else 0.0
    a_top = A - head_freed + recomputed
    for name, k in (("last", 0), ("first", n_layers - 1)):
        if k and n_layers < 2:
            continue
        grads = g_head + k * g_layer
        acts = a_top - k * a_stored
        temps = dx + gathered + tied_tmp
        mlp_acts, mlp_temps = acts, _mlp_transient(x)
        if lora is not None:  # the two input gradients are summed once A's backward freed its input
            f = _lora_fractions(cfg, lora)["mlp.c_proj"] * (0.0 if lora.dropout else 1.0)
            mlp_acts -= f * x.prec.values * x.b * x.s * (4 * h + lora.rank)
            mlp_temps = _lora_mlp_transient(x, cfg, lora)
        phases[f"backward: {name} block's MLP (c_proj grads)"] = phase(grads, mlp_acts, 0, temps + mlp_temps)
        phases[f"backward: {name} block's attention"] = phase(
            grads + g_mlp + g_proj, acts - _mlp_saved(x) - _attn_freed(x), 0, temps + _attn_transient(x))
    if first:
        emb_acts = sum(tm.nbytes for tm in outer if tm.name.startswith("token ids"))
        # wte's gradient = the head's (waiting in autograd's buffer) + the embedding's dense one,
        # summed out of place: three V·h buffers at once next to every other gradient
        phases["backward: embeddings"] = phase(G - tied_tmp / gdiv, emb_acts, 0, dx + gathered + 3 * tied_tmp)
    if optimizer != "none":
        phases["optimizer step"] = {"params": P, "grads": G, "optimizer": O, "activations": 0.0,
                                    "logits": 0.0, "temporaries": _optimizer_temporaries(
                                        cfg, optimizer, x.device, w, x.t) * frac / gdiv}
    o_bytes = 0 if optimizer == "none" else _BYTES[(dtype, optimizer)][2]
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak_phase = max(totals, key=totals.get)
    return MemoryEstimate(
        params=P, grads=G, optimizer=O, activations=A, logits=logits_hw,
        temporaries=phases[peak_phase]["temporaries"], total=totals[peak_phase], peak_phase=peak_phase,
        phases=phases,
        terms={"model states": [
            Term("params", P, f"N·{w}" + (" / dp (ZeRO-3)" if zero >= 3 else "")),
            Term("grads", G, f"N_trainable·{w}" + (" / dp (ZeRO-2)" if zero >= 2 else "")),
            Term("optimizer", O, f"N_trainable·{o_bytes}" + (" / dp (ZeRO-1)" if zero >= 1 else "")
                 + (" + 4 B step counter per tensor" if steps else "")),
        ], "per layer": lt, "outside the blocks": outer,
            "logits and loss": lg},
    )


def fmt_bytes(n: float) -> str:
    """Human-readable bytes (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


__all__ = ["DTYPES", "MemoryEstimate", "Term", "activation_bytes_per_layer", "estimate_memory", "fmt_bytes",
           "kv_cache_bytes", "layer_param_count", "model_state_bytes", "param_count"]
