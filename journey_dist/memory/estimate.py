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

from journey_dist.config import ConfigError, GPTConfig, LoRAConfig, ParallelConfig
from journey_dist.memory.activations import (  # noqa: F401 (re-exported: the estimator's public names)
    Shape,
    Term,
    activation_bytes_per_layer,
    attn_freed,
    attn_transient,
    layer_terms,
    logits_saved,
    logits_terms,
    lora_fractions,
    lora_layer_terms,
    lora_mlp_transient,
    lora_outer_terms,
    lora_param_count,
    mlp_saved,
    mlp_transient,
    optimizer_temporaries,
    outer_terms,
    rms_norm_transient,
    selective_terms,
    swiglu_freed,
    swiglu_transient,
)
from journey_dist.memory.sizes import (  # noqa: F401 (re-exported)
    BYTES_PER_PARAM,
    DTYPE_BYTES,
    DTYPES,
    PRECISIONS,
    Precision,
    kv_cache_bytes,
    layer_param_count,
    layer_tensors,
    model_state_bytes,
    model_tensors,
    norm_params,
    param_count,
    param_tensor_count,
)
from journey_dist.parallel.context.accounting import check_context_parallel
from journey_dist.parallel.pipeline.orders import inflight_formula
from journey_dist.parallel.pipeline.stage import stage_layers
from journey_dist.recompute import recompute_mode

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
                    sequence_parallel: bool = False, recompute: str | bool = "none", attn: str | None = None,
                    dropout: bool | None = None, device: str = "cuda",
                    schedule: str = "1f1b", lora: LoRAConfig | None = None,
                    stage: int | None = None, ep: int = 1, virtual_stages: int = 1, cp: int = 1,
                    cp_design: str = "ring") -> MemoryEstimate:
    """Estimate one training step's memory on the busiest rank (bytes), or on pipeline `stage`.

    batch_size is the global batch (sequences per optimizer step, as in TrainConfig); each
    data-parallel rank runs batch_size/dp of it in `microbatches` micro-batches. `attn`
    ("sdpa" or "eager") defaults to cfg.attn_impl, `dropout` to cfg.dropout > 0. `device`
    picks the few terms that differ between PyTorch on CPU and CUDA (dropout mask size, SDPA
    with dropout, softmax under autocast, optimizer scratch). `recompute` (recompute.py): "full"
    checkpoints every block (keeps only each block's input; True means "full"), "selective"
    recomputes the attention core (activations.selective_terms); "ops" (a per-op policy) is
    measured, not modelled. `schedule` and `virtual_stages`: the pipeline schedule, whose
    activation sets in flight per stage are orders.inflight_formula. `optimizer="none"`: forward
    and backward only. `trainable_params` (LoRA): only those get gradients and optimizer state;
    activations are still counted as if every weight were trained (an upper bound).
    `lora` (a LoRAConfig; tp = 1): the base is frozen and adapters are added: their weights,
    gradients and AdamW state (trainable_params defaults to their count), what they keep for
    backward, and what a frozen base no longer keeps (`lora_layer_terms`, `lora_outer_terms`).
    Exact vs the CPU tensor ledger when the first block's c_attn is adapted and LoRA dropout is 0;
    otherwise an upper bound (a first block whose attention needs no gradient keeps less).
    `stage` (0..pp-1): that stage's ranks instead of the busiest (the first or the last stage).
    A mixture of experts (cfg.n_experts > 0): `ep` ranks (inside dp) split the experts; model states
    are exact per rank; the MoE activations assume an even load (activations.moe_terms).
    `cp` > 1 (context parallel, `cp_design` ring, zigzag or ulysses): each rank holds seq_len/cp
    tokens, so every token term falls as 1/cp (parallel/context/; exact vs the CPU ledger).
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
    pcfg = ParallelConfig(dp=dp, tp=tp, pp=pp, cp=cp, microbatches=microbatches, zero=zero, ep=ep,
                          sequence_parallel=sequence_parallel, schedule=schedule, cp_design=cp_design,
                          virtual_stages=virtual_stages)
    pcfg.validate(cfg, global_batch=batch_size)
    check_context_parallel(pcfg, cfg, seq_len)
    if cp > 1 and attn != "sdpa":
        raise ConfigError(f"attn={attn!r} with cp={cp}: the context-parallel estimate models fused attention "
                          "(ring attention keeps what SDPA keeps); use attn='sdpa'")
    recompute = recompute_mode(recompute)
    if recompute == "ops":
        raise ConfigError("recompute='ops' (a per-op save list) is measured, not modelled by the estimate; "
                          "estimate with recompute 'none', 'selective' or 'full'")
    if cfg.positions == "alibi":
        raise ConfigError("positions='alibi' is not modelled by the estimate (its (a, s, s) score bias per "
                          "layer); estimate with positions 'learned', 'sinusoidal' or 'rope'")
    if lora is not None:
        if cfg.separate_qkv or cfg.mlp != "gelu" or cfg.n_experts:
            raise ConfigError("the LoRA estimate models GPT-2's layout (c_attn, c_proj, c_fc); the Llama "
                              "layout's q/k/v/o and gate/up/down adapters are not modelled yet")
        lora.validate(cfg)
        if tp > 1:
            raise ConfigError("the LoRA estimate models tp=1 only (adapters on tensor-parallel shards "
                              "are not modelled); use tp=1")
        trainable_params = lora_param_count(cfg, lora) if trainable_params is None else trainable_params
    prec = PRECISIONS[dtype]
    dropout = cfg.dropout > 0 if dropout is None else dropout
    x = Shape(b=batch_size // (dp * microbatches), s=seq_len // cp, h=cfg.n_embd, a=cfg.n_head,
               V=cfg.vocab_size, t=tp, sp=sequence_parallel, prec=prec, attn=attn, dropout=dropout,
               device=device, model=cfg, ep=ep, cp=cp, cp_design=cp_design)
    stages = [stage] if stage is not None else ([0] if pp == 1 else [0, pp - 1])
    results = [_Stage(cfg, x, dtype, optimizer, trainable_params, dp=dp, zero=zero, pp=pp, stage=s,
                      microbatches=microbatches, recompute=recompute, schedule=schedule,
                      lora=lora, ep=ep, virtual=virtual_stages).estimate() for s in stages]
    est = max(results, key=lambda e: e.total)
    est.inputs = dict(config=cfg.to_dict(), batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                      optimizer=optimizer, trainable_params=trainable_params, dp=dp, zero=zero, tp=tp,
                      pp=pp, microbatches=microbatches, sequence_parallel=sequence_parallel,
                      recompute=recompute, attn=attn, dropout=dropout, device=device, schedule=schedule,
                      virtual_stages=virtual_stages,
                      micro_batch=x.b, lora=None if lora is None else asdict(lora), ep=ep, cp=cp,
                      cp_design=cp_design)
    return est


@dataclass
class _Stage:
    """One pipeline stage's step, phase by phase: what its rank holds while it runs (bytes).

    The methods follow the step in order: model states; activations kept for backward; the loss;
    the backward of ln_f, of the stage's last and first blocks (the two extremes) and of the
    embeddings; the optimizer step. Each phase is {category: bytes}; the peak is the largest sum.
    """

    cfg: GPTConfig
    x: Shape
    dtype: str
    optimizer: str
    trainable: int | None  # LoRA: trainable parameters of the whole model (None: all)
    dp: int
    zero: int
    pp: int
    stage: int
    microbatches: int
    recompute: str  # recompute.RECOMPUTE_MODES but "ops"
    schedule: str
    lora: LoRAConfig | None = None
    ep: int = 1
    virtual: int = 1  # chunks per pipeline rank (interleaved)

    def __post_init__(self) -> None:
        self.first, self.last = self.stage == 0, self.stage == self.pp - 1
        self.frac = 1.0 if self.trainable is None else self.trainable / param_count(self.cfg)
        self.w = PRECISIONS[self.dtype].weights
        self.gw = BYTES_PER_PARAM[(self.dtype, "adamw" if self.optimizer == "none" else self.optimizer)][1]
        self.gdiv = self.dp if self.zero >= 2 else 1  # ZeRO-2/3: this rank keeps 1/dp of the gradients
        self.n_layers = len(stage_layers(self.cfg.n_layer, self.pp)[self.stage])
        self.phases: dict[str, dict[str, float]] = {}

    # ----------------------------------------------------------------- what is held all step
    def model_states(self) -> None:
        """Weights, gradients and optimizer state of this stage's parameters (and LoRA adapters),
        with AdamW's 4-byte step counter per tensor (a 512-byte block each on CUDA)."""
        cfg, x, lora = self.cfg, self.x, self.lora
        n_params = param_count(cfg, x.t, self.pp, self.stage, self.ep)
        states = model_state_bytes(n_params, self.dtype, self.optimizer, self.dp, self.zero,
                                   None if self.trainable is None else round(n_params * self.frac))
        if lora is not None:  # adapter weights on this stage (their share of the layers)
            n_adapters = lora_param_count(cfg, lora) * self.n_layers / cfg.n_layer
            states["params"] += n_adapters * self.w / (self.dp if self.zero >= 3 else 1)
        self.steps = 0
        if self.optimizer == "adamw" and self.zero == 0 and self.pp == 1:
            counters = 2 * len(lora.matched(cfg)) if lora is not None else param_tensor_count(cfg, self.ep)
            self.steps = (512 if x.device == "cuda" else 4) * counters  # LoRA: A and B per linear
        self.P, self.G = states["params"], states["grads"]
        self.O = states["optimizer"] + (self.steps if (self.trainable is None or lora is not None) else 0)

    def activations(self) -> None:
        """What forward keeps for backward: per block (full recompute: the block input only;
        selective: all but the attention core) times the microbatches in flight on this stage
        (orders.inflight_formula: GPipe m, 1F1B pp - stage, ...; interleaved counts chunks of
        1/v of the stage), plus outside the blocks."""
        cfg, x, lora = self.cfg, self.x, self.lora
        self.layer = layer_terms(x) + (lora_layer_terms(x, cfg, lora) if lora is not None else [])
        self.core = 0.0  # selective: the attention core's bytes, recomputed in its backward
        if self.recompute == "selective":
            self.layer, core = selective_terms(x, self.layer)
            self.core = sum(tm.nbytes for tm in core)
        self.a_layer = sum(tm.nbytes for tm in self.layer)
        self.a_stored = self.layer[0].nbytes if self.recompute == "full" else self.a_layer
        in_flight = 1 if self.pp == 1 else inflight_formula(
            self.schedule, self.pp, self.microbatches, self.stage, self.virtual) / self.virtual
        self.outer = outer_terms(x, cfg, self.first, self.last) + (
            lora_outer_terms(x, cfg, self.first, self.last) if lora is not None else [])
        self.A = in_flight * (self.n_layers * self.a_stored + sum(tm.nbytes for tm in self.outer))
        self.logit_terms = logits_terms(x) if self.last else []
        self.logits_hw = sum(tm.nbytes for tm in self.logit_terms)

    def phase(self, name: str, grads: float, acts: float, logits: float, temps: float) -> None:
        """Record one moment of the step. While accumulating micro-batches every gradient is alive."""
        self.phases[name] = {"params": self.P, "grads": self.G if self.microbatches > 1 else grads,
                             "optimizer": self.O, "activations": acts, "logits": logits,
                             "temporaries": temps}

    # ----------------------------------------------------------------- the moments of the step
    def loss(self) -> None:
        """The last stage's loss: logits, their fp32 copy and log-softmax; then its backward."""
        x = self.x
        self.phase("forward: loss (logits, fp32 copy, log-softmax)", 0, self.A, self.logits_hw, 0)
        self.phase("backward: log-softmax (two fp32 b·s·V gradients)", 0, self.A, logits_saved(x),
                   2 * 4 * x.b * x.s * x.V / x.t)

    def gradient_sizes(self) -> None:
        """Bytes of the gradients made by each part of the backward (this rank's share)."""
        cfg, x, scale = self.cfg, self.x, self.gw * self.frac / self.gdiv
        block = layer_tensors(cfg, x.t, self.ep)

        def grads_of(*prefixes: str) -> float:
            return sum(p.numel for p in block if p.name.startswith(prefixes)) * scale

        self.g_layer = layer_param_count(cfg, x.t, self.ep) * scale
        self.g_proj = grads_of("attn.c_proj", "attn.o_proj")  # attention's output projection
        self.g_mlp = grads_of("mlp.", "ln_2.")
        self.g_down = grads_of("mlp.down_proj")
        self.g_head = norm_params(cfg) * scale if self.last else 0.0  # ln_f
        if self.last and (not cfg.tie_embeddings or self.pp > 1):  # the head's own weight (untied, pp copy)
            self.g_head += cfg.vocab_size * x.h / x.t * scale
        # the tied head's gradient waits in autograd's buffer until the embedding's backward
        self.tied_tmp = (cfg.vocab_size * x.h / x.t * self.w * self.frac
                         if (cfg.tie_embeddings and self.pp == 1) else 0.0)
        # the gradient of the residual stream, alive through the whole backward
        self.dx = x.prec.residual * x.b * x.s * x.h * x.rep
        # ZeRO-3 all-gathers a block's full weights for its forward and backward (one block at a time)
        self.gathered = layer_param_count(cfg, x.t, self.ep) * self.w if self.zero >= 3 else 0.0

    def head_norm_backward(self) -> None:
        """RMSNorm's ln_f backward, right after the head's: every block's activations still kept."""
        x = self.x
        head_in = sum(tm.nbytes for tm in self.outer if tm.name.startswith("ln_f output"))
        self.phase("backward: ln_f (RMSNorm: two fp32 b·s·h buffers)", self.g_head, self.A - head_in, 0,
                   x.prec.residual * x.b * x.s * x.h * x.rep + rms_norm_transient(x) + self.tied_tmp)

    def block_backward(self) -> None:
        """The backward of the stage's last block, then of its first (the extremes): the MLP
        (its output projection, SwiGLU's product), then attention, with the gradients made so far."""
        x, lora = self.x, self.lora
        head_freed = sum(tm.nbytes for tm in self.outer if tm.name.startswith("ln_f")) if self.last else 0.0
        recomputed = (self.a_layer - self.a_stored) if self.recompute == "full" else 0.0
        a_top = self.A - head_freed + recomputed
        for name, k in (("last", 0), ("first", self.n_layers - 1)):
            if k and self.n_layers < 2:
                continue
            grads = self.g_head + k * self.g_layer
            acts = a_top - k * self.a_stored
            temps = self.dx + self.gathered + self.tied_tmp
            mlp_acts, mlp_temps = acts, mlp_transient(x)
            if lora is not None:  # the two input gradients are summed once A's backward freed its input
                f = lora_fractions(self.cfg, lora)["mlp.c_proj"] * (0.0 if lora.dropout else 1.0)
                mlp_acts -= f * x.prec.values * x.b * x.s * (4 * x.h + lora.rank)
                mlp_temps = lora_mlp_transient(x, self.cfg, lora)
            out_proj = "down_proj" if x.swiglu else "c_proj"
            self.phase(f"backward: {name} block's MLP ({out_proj} grads)", grads, mlp_acts, 0,
                       temps + mlp_temps)
            if x.swiglu:  # then the product's backward: down_proj's input freed, its grads made
                self.phase(f"backward: {name} block's MLP (SiLU(gate)·up grads)", grads + self.g_down,
                           mlp_acts - swiglu_freed(x), 0, temps + swiglu_transient(x))
            self.phase(f"backward: {name} block's attention", grads + self.g_mlp + self.g_proj,
                       acts + self.core - mlp_saved(x) - attn_freed(x), 0, temps + attn_transient(x))

    def embedding_backward(self) -> None:
        """wte's gradient = the head's (waiting in autograd's buffer) + the embedding's dense one,
        summed out of place: three V·h buffers at once next to every other gradient."""
        emb_acts = sum(tm.nbytes for tm in self.outer if tm.name.startswith("token ids"))
        self.phase("backward: embeddings", self.G - self.tied_tmp / self.gdiv, emb_acts, 0,
                   self.dx + self.gathered + 3 * self.tied_tmp)

    def optimizer_step(self) -> None:
        """Every state alive, plus the optimizer's scratch."""
        scratch = optimizer_temporaries(self.cfg, self.optimizer, self.x.device, self.w, self.x.t, self.ep)
        self.phases["optimizer step"] = {"params": self.P, "grads": self.G, "optimizer": self.O,
                                         "activations": 0.0, "logits": 0.0,
                                         "temporaries": scratch * self.frac / self.gdiv}

    # ----------------------------------------------------------------- the whole step
    def estimate(self) -> MemoryEstimate:
        self.model_states()
        self.activations()
        if self.last:
            self.loss()
        self.gradient_sizes()
        if self.last and self.cfg.norm == "rmsnorm":
            self.head_norm_backward()
        self.block_backward()
        if self.first:
            self.embedding_backward()
        if self.optimizer != "none":
            self.optimizer_step()
        return self.summary()

    def summary(self) -> MemoryEstimate:
        totals = {k: sum(v.values()) for k, v in self.phases.items()}
        peak = max(totals, key=totals.get)
        o_bytes = 0 if self.optimizer == "none" else BYTES_PER_PARAM[(self.dtype, self.optimizer)][2]
        zero = self.zero
        return MemoryEstimate(
            params=self.P, grads=self.G, optimizer=self.O, activations=self.A, logits=self.logits_hw,
            temporaries=self.phases[peak]["temporaries"], total=totals[peak], peak_phase=peak,
            phases=self.phases,
            terms={"model states": [
                Term("params", self.P, f"N·{self.w}" + (" / dp (ZeRO-3)" if zero >= 3 else "")),
                Term("grads", self.G, f"N_trainable·{self.gw}" + (" / dp (ZeRO-2)" if zero >= 2 else "")),
                Term("optimizer", self.O, f"N_trainable·{o_bytes}" + (" / dp (ZeRO-1)" if zero >= 1 else "")
                     + (" + 4 B step counter per tensor" if self.steps else "")),
            ], "per layer": self.layer, "outside the blocks": self.outer,
                "logits and loss": self.logit_terms},
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
