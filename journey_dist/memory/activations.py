"""Activation terms of the memory estimate: what autograd keeps per layer, around the blocks and
for the logits, and what a frozen base with LoRA adapters keeps instead (see estimate.py's
docstring for the notation and the sources)."""

from __future__ import annotations

from dataclasses import dataclass

from journey_dist.config import LORA_LINEARS, GPTConfig, LoRAConfig
from journey_dist.memory.sizes import Precision, layer_matrix_params, layer_tensors, model_tensors

# ---------------------------------------------------------------------- activations


def activation_bytes_per_layer(seq_len: int, batch_size: int, hidden: int, heads: int, *, tp: int = 1,
                               sequence_parallel: bool = False, fused_attention: bool = False,
                               dropout: bool = True, bytes_per_value: int = 2, mask_bytes: int = 1,
                               recompute: str = "none") -> float:
    """Korthikanti et al. 2022 ("Reducing Activation Recomputation"), one layer (their Table 2).

    16-bit with dropout: sbh(34 + 5as/h); tensor parallel: sbh(10 + 24/t + 5as/(ht)); with
    sequence parallel everything is divided by t: sbh(34/t + 5as/(ht)). Fused (flash) attention
    keeps no s x s matrix, which drops the 5as/h term, and so does selective recomputation
    (`recompute="selective"`: the attention core is recomputed, its inputs Q, K, V kept): sbh·34,
    sbh(10 + 24/t) with tensor parallel, sbh·34/t with sequence parallel too. Full recomputation
    keeps the layer's input only: v·sbh (/t with sequence parallel).

    Where the numbers come from, in values per token and channel (v = bytes_per_value):
    4 replicated values (two LayerNorm inputs, the QKV and MLP inputs) and 12 split over t
    (Q, K, V, attention-projection input, 4h GELU input, 4h GELU output): 34 = 16·2 + 2 dropout
    masks of 1 byte. Per attention score: softmax output (v), dropout mask (1), dropout output (v):
    5 = 2 + 1 + 2. Scaling: fp32 is bytes_per_value=4 (64 + 2 masks); without dropout the masks
    and the dropout output go (sbh·16v + as²b·v); `mask_bytes` is the mask's size (1 on GPUs,
    bool; PyTorch's CPU dropout keeps a full-precision noise tensor, so v there).
    """
    s, b, h, a, t, v = seq_len, batch_size, hidden, heads, tp, bytes_per_value
    if recompute == "full":
        return s * b * h * v / (t if sequence_parallel else 1)
    fused_attention = fused_attention or recompute == "selective"
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
class Shape:
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
    model: GPTConfig  # the switches: norm, mlp (width f), positions, kv heads, experts
    ep: int = 1  # expert-parallel ranks (a mixture of experts)
    cp: int = 1  # context parallel: s is then this rank's S/cp tokens
    cp_design: str = "ring"  # "ring", "zigzag" (keep what fused attention keeps) or "ulysses"

    @property
    def kv(self) -> int:  # key/value heads (GQA: fewer than a)
        return self.model.kv_heads

    @property
    def d(self) -> int:  # head dim
        return self.model.head_dim

    @property
    def f(self) -> int:  # MLP width (4h for GPT-2)
        return self.model.mlp_dim

    @property
    def swiglu(self) -> bool:
        return self.model.mlp == "swiglu"

    @property
    def mlp_readers(self) -> int:
        """Linears reading ln_2's output: c_fc, or gate_proj and up_proj; a mixture of experts' router
        (and a shared expert's first Linears: its experts read rows gathered from it)."""
        per_mlp = 2 if self.swiglu else 1
        if not self.model.n_experts:
            return per_mlp
        return 1 + (per_mlp if self.model.moe_shared_hidden else 0)

    @property
    def norm_stats(self) -> int:  # bytes per token one norm keeps: LayerNorm mean + rstd, RMSNorm rstd
        return 2 * self.stat if self.model.norm == "layernorm" else 4

    def copies(self, readers: int) -> int:
        """How many 16-bit copies of a norm's output are kept: one per Linear reading it under
        autocast (each casts its fp32 input itself), else the one output they share."""
        return readers if self.prec.autocast else 1

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
    def stat(self) -> int:  # LayerNorm mean/rstd: fp32, except pure 16-bit on CPU (RMSNorm: fp32)
        return 2 if (self.device == "cpu" and self.prec.residual == 2) else 4


def layer_terms(x: Shape) -> list[Term]:
    """Bytes one transformer block keeps for backward (one micro-batch, one rank).

    GPT-2 and Llama differ in: the norms' statistics (LayerNorm mean and rstd, RMSNorm rstd);
    the number of Linears reading a norm's output (c_attn: 1, q/k/v_proj: 3; c_fc: 1,
    gate/up_proj: 2), which matters under autocast only; fused attention's k and v (kv heads);
    RoPE's cos and sin tables; the MLP (GELU: 2 tensors of width f, SwiGLU: 4).
    """
    b, s, h, a, t, v, r = x.b, x.s, x.h, x.a, x.t, x.prec.values, x.prec.residual
    n, llama_attn = b * s, x.model.separate_qkv
    qkv_in = x.copies(3 if llama_attn else 1)
    out_proj = "o_proj" if llama_attn else "c_proj"
    terms = [
        Term("ln_1 input (residual stream)", r * n * h * x.rep, "r·bsh [/t with SP]"),
        Term("ln_1 output (" + ("q/k/v_proj" if llama_attn else "c_attn") + " input"
             + (f", {qkv_in} autocast copies" if qkv_in > 1 else "") + ")",
             qkv_in * v * n * h * x.rep, f"{qkv_in}v·bsh [/t with SP]".replace("1v", "v")),
    ]
    if x.cp > 1 and x.cp_design == "ulysses":
        terms += ulysses_terms(x, out_proj)
    elif x.fused:  # also ring attention (parallel/context/ring.py saves what SDPA saves)
        terms.append(qkv_term(x, "SDPA"))
        terms += [
            Term(f"attention output (SDPA output = {out_proj} input)", v * n * h / t, "v·bsh/t"),
            Term("SDPA log-sum-exp (fp32)", 4 * b * a * s / t, "4·bas/t"),
        ]
    else:
        sv, qv = x.score_bytes, (4 if x.cpu_math else v)
        scores = b * a * s * s / t
        repeated = " (k, v repeated to a heads)" if x.kv != a else ""
        terms += [
            Term("q, k^T, v copies for the two batched matmuls" + repeated, 3 * qv * n * h / t,
                 "3v·bsh/t" + (" (fp32: CPU math SDPA)" if qv != v else "")),
            Term(f"attention output copy ({out_proj} input)", v * n * h / t, "v·bsh/t"),
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
    if x.model.positions == "rope":
        terms.append(Term("RoPE cos and sin tables (made per layer)", 2 * v * s * x.d, "2v·s·d"))
    mlp_in = x.copies(x.mlp_readers)
    rms = x.model.norm == "rmsnorm"
    terms += [
        Term("ln_2 input (residual stream)", r * n * h * x.rep, "r·bsh [/t with SP]"),
        Term("ln_2 output (" + ("router" if x.model.n_experts else "gate/up_proj" if x.swiglu else "c_fc")
             + " input"
             + (f", {mlp_in} autocast copies" if mlp_in > 1 else "") + ")",
             mlp_in * v * n * h * x.rep, f"{mlp_in}v·bsh [/t with SP]".replace("1v", "v")),
        Term("RMSNorm 1/rms (ln_1, ln_2; fp32)" if rms else "LayerNorm mean and rstd (ln_1, ln_2)",
             2 * n * x.norm_stats * x.rep, "2·bs·4 bytes" if rms else "2·2·bs·4 bytes"),
    ]
    terms += mlp_terms(x)
    if x.dropout:
        terms.append(Term("residual dropout masks (attention, MLP)", 2 * x.mask * n * h * x.rep,
                          "2m·bsh [/t with SP]"))
    if x.prec.autocast:
        terms.append(Term("autocast 16-bit weight copies (kept by each Linear)",
                          2 * layer_matrix_params(x.model, t, x.ep), "2·(the block's weight matrices)/t"))
    return terms


def qkv_term(x: Shape, keeper: str) -> Term:
    """q, k, v as attention's inputs hold them (views of the projections' outputs; after RoPE new
    tensors): what fused SDPA keeps, and what a checkpointed attention core keeps as its inputs."""
    n, v, h, t = x.b * x.s, x.prec.values, x.h, x.t
    if x.model.separate_qkv:
        rope = "after RoPE, " if x.model.positions == "rope" else ""
        return Term(f"q, k, v ({rope}k and v with kv heads, kept by {keeper})",
                    v * n * (x.a + 2 * x.kv) * x.d / t, "v·bs(a + 2kv)d/t")
    if x.model.positions == "rope":  # v is a view of c_attn's output: the whole output stays
        return Term(f"q, k after RoPE and c_attn's whole output (v is a view of it), kept by {keeper}",
                    5 * v * n * h / t, "5v·bsh/t")
    return Term(f"q, k, v (c_attn output, kept by {keeper})", 3 * v * n * h / t, "3v·bsh/t")


# What the attention core (model.attention: scores, softmax, dropout, probabilities @ v) keeps;
# selective recomputation drops these and recomputes them in backward.
CORE_TERMS = ("q, k^T, v copies", "softmax output", "attention dropout", "16-bit copy of the probabilities",
              "causal mask", "SDPA log-sum-exp")


def selective_terms(x: Shape, terms: list[Term]) -> tuple[list[Term], list[Term]]:
    """(kept, recomputed) under selective recomputation: the attention core's own tensors are
    recomputed in backward; its inputs q, k, v are kept by the checkpoint (which fused SDPA kept
    anyway: same storages)."""
    recomputed = [tm for tm in terms if tm.name.startswith(CORE_TERMS)]
    kept = [tm for tm in terms if not tm.name.startswith(CORE_TERMS)]
    if not x.fused:  # unfused attention kept copies of q, k, v instead: now the inputs themselves
        at = next(i for i, tm in enumerate(kept) if tm.name.startswith("attention output copy"))
        kept.insert(at, qkv_term(x, "the checkpointed core"))
    return kept, recomputed


def ulysses_terms(x: Shape, out_proj: str) -> list[Term]:
    """Ulysses (parallel/context/ulysses.py), s = S/cp: fused attention on all S tokens of this
    rank's a/cp heads keeps the same bytes as on s tokens of all heads, but of its own q, k, v (the
    all-to-all outputs; fewer kv heads than cp are repeated to cp) and its output in head layout,
    next to the output projection's input (a new tensor from the all-to-all back)."""
    n, v, t, a = x.b * x.s, x.prec.values, x.t, x.a // x.t
    kv = x.kv // t if (x.kv // t) % x.cp == 0 else x.cp
    repeated = ", kv heads repeated to cp" if kv != x.kv // t else ""
    return [Term(f"q, k, v after the all-to-all (kept by SDPA{repeated})", v * n * (a + 2 * kv) * x.d,
                 "v·bs(a + 2kv)d/t"),
            Term("attention output, head layout (SDPA output)", v * n * x.h / t, "v·bsh/t"),
            Term(f"{out_proj} input (the all-to-all back)", v * n * x.h / t, "v·bsh/t"),
            Term("SDPA log-sum-exp (fp32)", 4 * x.b * x.a * x.s / t, "4·bas/t")]


def mlp_terms(x: Shape) -> list[Term]:
    """The MLP's own activations, each (b·s, f/t): GELU's input and output; SwiGLU's gate output
    (SiLU's input), SiLU's output, up_proj's output and their product (down_proj's input). A
    mixture of experts: `moe_terms`."""
    if x.model.n_experts:
        return moe_terms(x)
    one = x.prec.values * x.b * x.s * x.f / x.t
    if x.swiglu:
        return [Term("gate_proj output (SiLU input)", one, "v·bsf/t"), Term("SiLU output", one, "v·bsf/t"),
                Term("up_proj output", one, "v·bsf/t"),
                Term("SiLU(gate)·up (down_proj input)", one, "v·bsf/t")]
    return [Term("c_fc output (GELU input)", one, "v·bsf/t (f = 4h)"),
            Term("GELU output (c_proj input)", one, "v·bsf/t (f = 4h)")]


def moe_terms(x: Shape) -> list[Term]:
    """A mixture of experts' activations (model.MoE, journey_dist/moe.py) with an even load: each of
    the n = b·s tokens sends k pairs, and each rank's experts receive as many rows as it sends
    (M = n·k; exact with ep = 1 and no dropping, the mean otherwise: the load varies step by step).
    Experts are whole on every tp rank. Per layer:
    router logits and softmax (fp32 n·E each: the z-loss and the softmax keep them), the top-k ids
    (int64) and gate weights (fp32), the z-loss's logsumexp; the dispatch's token and slot indices
    (int64 per pair; with ep > 1 also the regrouping order and its inverse per received row); each
    expert's input rows and its MLP's activations at width f_e (GELU 2, SwiGLU 4 per row); the
    expert outputs and gate weights kept by their product; the balance loss's counts; a shared
    expert's MLP over every token."""
    cfg, v, n = x.model, x.prec.values, x.b * x.s
    E, k, h = cfg.n_experts, cfg.moe_top_k, x.h
    rows = n * k
    acts = 4 if cfg.mlp == "swiglu" else 2
    inputs = x.copies(2 if x.swiglu else 1)
    terms = [
        Term("router logits and probabilities (fp32, kept by the z-loss and the softmax)", 2 * 4 * n * E,
             "2·4·bsE"),
        Term("top-k expert ids (int64) and gate weights (fp32)", 12 * n * k, "12·bsk"),
        Term("z-loss logsumexp (fp32) and the balance loss's counts (fp32 E-vector)", 4 * n + 4 * E,
             "4·bs + 4E"),
        Term("dispatch indices (token and slot of every pair, int64)"
             + (", all-to-all regrouping order and inverse" if x.ep > 1 else ""),
             16 * rows * (2 if x.ep > 1 else 1), "16·bsk" + (" x 2" if x.ep > 1 else "")),
        Term("expert input rows (pairs sorted by expert"
             + (", an autocast copy per gate/up_proj" if inputs > 1 else "") + ")",
             inputs * v * rows * h, f"{inputs}v·bsk·h".replace("1v", "v")),
        Term(f"expert MLP activations ({acts} per row, width f_e)", acts * v * rows * cfg.expert_dim,
             f"{acts}v·bsk·f_e"),
        Term("expert outputs and gate weights (kept by their product)", v * rows * (h + 1), "v·bsk(h + 1)"),
    ]
    if cfg.moe_shared_hidden:
        terms.append(Term("shared expert MLP activations", acts * v * n * cfg.moe_shared_hidden,
                          f"{acts}v·bs·f_shared"))
    return terms


def mlp_saved(x: Shape) -> float:
    """What a block's MLP half keeps (freed once the MLP's backward is done)."""
    n, h, t, v, r = x.b * x.s, x.h, x.t, x.prec.values, x.prec.residual
    saved = (r + x.copies(x.mlp_readers) * v) * n * h * x.rep + n * x.norm_stats * x.rep
    saved += sum(tm.nbytes for tm in mlp_terms(x))
    saved += (x.mask * n * h * x.rep) if x.dropout else 0
    matrices = sum(p.numel for p in layer_tensors(x.model, t, x.ep) if p.matrix and p.name.startswith("mlp."))
    return saved + (2 * matrices if x.prec.autocast else 0)


def _mlp_rows_width(x: Shape) -> tuple[float, float]:
    """(rows, width) of one MLP whose backward runs: the dense MLP's (b·s, f/t), or one expert's
    under an even load (b·s·k/E rows, f_e wide)."""
    if x.model.n_experts:
        return x.b * x.s * x.model.moe_top_k / x.model.n_experts, x.model.expert_dim
    return x.b * x.s, x.f / x.t


def mlp_transient(x: Shape) -> float:
    """The MLP's output projection's backward (c_proj or down_proj; an expert's with MoE): the
    gradient of its input (v·bsf/t) and its weight gradient in the compute dtype (fh·v/t), next to
    everything the block still keeps; under autocast also the 16-bit copy of the fp32 residual
    gradient it consumes."""
    v, n = x.prec.values, x.b * x.s
    rows, width = _mlp_rows_width(x)
    cast = v * n * x.h * x.rep if x.prec.residual != v else 0
    return v * rows * width + width * x.h * v + cast


def swiglu_freed(x: Shape) -> float:
    """By the backward of SiLU(gate)·up, down_proj's input (their product) has been freed."""
    rows, width = _mlp_rows_width(x)
    return x.prec.values * rows * width


def swiglu_transient(x: Shape) -> float:
    """The backward of SiLU(gate)·up: its output's gradient and the gradients of both factors,
    three (b·s, f/t) tensors at once."""
    rows, width = _mlp_rows_width(x)
    return 3 * x.prec.values * rows * width


def rms_norm_transient(x: Shape) -> float:
    """RMSNorm's backward (model._RMSNormFunction): x̂ and g·x̂ (two fp32 (b·s, h) tensors) and
    the per-token mean of g w x̂ (two fp32 (b·s) vectors), next to the incoming gradient;
    LayerNorm's fused kernel makes only dx."""
    n = x.b * x.s * x.rep
    return 2 * 4 * n * x.h + 2 * 4 * n


def attn_freed(x: Shape) -> float:
    """Unfused attention: by the softmax's backward, c_proj's input copy and the v copy are freed.
    Fused: SDPA still holds its output (c_proj's input), nothing is freed yet."""
    if x.fused:
        return 0.0
    n, v = x.b * x.s, x.prec.values
    return (v + (4 if x.cpu_math else v)) * n * x.h / x.t


def attn_transient(x: Shape) -> float:
    """Attention's backward. Fused: the output's gradient and dq, dk, dv (v·bs(2a + 2kv)d/t, 4v·bsh/t
    without GQA; on CUDA flash attention's fp32 dq accumulator, 4·bsh/t, assumed from its
    implementation). Unfused (k and v already repeated to a heads, so GQA changes nothing): the
    softmax's input and output gradients (2 score matrices) and dv; with dropout one score
    gradient next to the still-kept dropout output, dv and the output gradient's copy."""
    n, h, t, v = x.b * x.s, x.h, x.t, x.prec.values
    if x.fused:  # CUDA flash backward (16-bit) also accumulates dq in fp32
        grads = v * n * (2 * x.a + 2 * x.kv) * x.d / t
        return grads + (4 * n * h / t if (x.device == "cuda" and v == 2) else 0)
    sv, scores, qv = x.score_bytes, x.b * x.a * x.s * x.s / t, (4 if x.cpu_math else v)
    extra = 2 * scores if (sv != v and x.device == "cuda") else 0  # CUDA autocast: 16-bit score grad
    if x.dropout:  # the dropout output's gradient appears while that output is still kept
        return sv * scores + 2 * qv * n * h / t + extra
    return 2 * sv * scores + qv * n * h / t + extra


def outer_terms(x: Shape, cfg: GPTConfig, first: bool, last: bool) -> list[Term]:
    """Kept outside the blocks: token ids (and learned positions), embedding dropout, ln_f."""
    n, h, v, r = x.b * x.s, x.h, x.prec.values, x.prec.residual
    terms = []
    if first:
        if cfg.positions == "learned":
            terms.append(Term("token ids and positions (int64, kept by the embeddings)", 8 * n + 8 * x.s,
                              "8·bs + 8·s"))
        else:  # sinusoidal tables are added (nothing kept); RoPE's are made in every layer
            terms.append(Term("token ids (int64, kept by the embedding)", 8 * n, "8·bs"))
        if x.dropout:
            terms.append(Term("embedding dropout mask", (r if x.device == "cpu" else 1) * n * h * x.rep,
                              "m·bsh"))
    if last:
        rms = cfg.norm == "rmsnorm"
        terms += [Term("ln_f input", r * n * h * x.rep, "r·bsh"),
                  Term("ln_f 1/rms (fp32)" if rms else "ln_f mean and rstd", n * x.norm_stats * x.rep,
                       "bs·4 bytes" if rms else "2·bs·4 bytes")]
        if not x.prec.autocast:
            terms.append(Term("ln_f output (lm_head input)", v * n * h * x.rep, "v·bsh"))
    return terms


def logits_terms(x: Shape) -> list[Term]:
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


def logits_saved(x: Shape) -> float:
    """Of the head's forward tensors, what survives into backward: log-softmax, targets, copies."""
    keep = ("log-softmax", "targets", "autocast")
    return sum(tm.nbytes for tm in logits_terms(x) if tm.name.startswith(keep))


def optimizer_temporaries(cfg: GPTConfig, optimizer: str, device: str, w: int, tp: int, ep: int = 1) -> float:
    """Scratch of optimizer.step(). CUDA: fused AdamW (as train.make_optimizer picks) needs none.
    CPU: single-tensor AdamW computes denom = sqrt(v)/c + eps per parameter while the previous
    parameter's denom is still referenced: max over neighbours (n_prev + 2·n_i)·w, parameters in
    make_optimizer's order (matrices first, then vectors). SGD with momentum works in place."""
    if optimizer != "adamw" or device == "cuda":
        return 0.0
    matrices = [p.numel for p in model_tensors(cfg, tp, ep) if p.matrix]
    worst = max(prev + 2 * cur for prev, cur in zip([0] + matrices, matrices))
    return worst * w


# ---------------------------------------------------------------------- LoRA (frozen base)


def lora_shapes(cfg: GPTConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adaptable linear of a block (config.LORA_LINEARS)."""
    h = cfg.n_embd
    return dict(zip(LORA_LINEARS, ((h, 3 * h), (h, h), (h, 4 * h), (4 * h, h))))


def lora_fractions(cfg: GPTConfig, lora: LoRAConfig) -> dict[str, float]:
    """For each linear of a block, the fraction of blocks where LoRA adapts it."""
    matched = lora.matched(cfg)
    return {kind: sum(name.endswith("." + kind) for name in matched) / cfg.n_layer for kind in LORA_LINEARS}


def lora_param_count(cfg: GPTConfig, lora: LoRAConfig) -> int:
    """Adapter parameters: rank x (in + out) for every adapted linear (A: r x in, B: out x r)."""
    shapes = lora_shapes(cfg)
    return sum(lora.rank * sum(shapes[kind]) for name in lora.matched(cfg)
               for kind in LORA_LINEARS if name.endswith("." + kind))


def lora_layer_terms(x: Shape, cfg: GPTConfig, lora: LoRAConfig) -> list[Term]:
    """What LoRA changes in one block's kept activations (mean over blocks when only some are
    adapted). Adds A's output (kept by B) and, with LoRA dropout, the dropout output and mask
    (kept by A). Removes a linear's input when nothing reads it in backward any more: a frozen
    weight needs no input for its gradient, so only an adapter without dropout still keeps it
    (attention's c_proj input stays: fused SDPA keeps its output anyway)."""
    n, v, r = x.b * x.s, x.prec.values, lora.rank
    terms = []
    for kind, f in lora_fractions(cfg, lora).items():
        fan_in = lora_shapes(cfg)[kind][0]
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


def lora_outer_terms(x: Shape, cfg: GPTConfig, first: bool, last: bool) -> list[Term]:
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


def lora_mlp_transient(x: Shape, cfg: GPTConfig, lora: LoRAConfig) -> float:
    """The MLP c_proj's backward with a frozen weight: no weight gradient; with an adapter the
    input gradient arrives twice (through W and through B A) and is summed: 3 x v·bs·4h."""
    f = lora_fractions(cfg, lora)["mlp.c_proj"]
    return (1 + 2 * f) * 4 * x.prec.values * x.b * x.s * x.h


