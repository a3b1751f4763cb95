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
from journey_dist.parallel.pipeline.stage import stage_layers

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
    if cfg.positions == "alibi":
        raise ConfigError("positions='alibi' is not modelled by the estimate (its (a, s, s) score bias per "
                          "layer); estimate with positions 'learned', 'sinusoidal' or 'rope'")
    if lora is not None:
        if cfg.separate_qkv or cfg.mlp != "gelu":
            raise ConfigError("the LoRA estimate models GPT-2's layout (c_attn, c_proj, c_fc); the Llama "
                              "layout's q/k/v/o and gate/up/down adapters are not modelled yet")
        lora.validate(cfg)
        if tp > 1:
            raise ConfigError("the LoRA estimate models tp=1 only (adapters on tensor-parallel shards "
                              "are not modelled); use tp=1")
        trainable_params = lora_param_count(cfg, lora) if trainable_params is None else trainable_params
    prec = PRECISIONS[dtype]
    dropout = cfg.dropout > 0 if dropout is None else dropout
    x = Shape(b=batch_size // (dp * microbatches), s=seq_len, h=cfg.n_embd, a=cfg.n_head,
               V=cfg.vocab_size, t=tp, sp=sequence_parallel, prec=prec, attn=attn, dropout=dropout,
               device=device, model=cfg)
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


def _estimate_stage(cfg: GPTConfig, x: Shape, dtype: str, optimizer: str, trainable: int | None,
                    dp: int, zero: int, pp: int, stage: int, m: int, recompute: bool,
                    schedule: str, lora: LoRAConfig | None = None) -> MemoryEstimate:
    first, last = stage == 0, stage == pp - 1
    n_params = param_count(cfg, x.t, pp, stage)
    frac = 1.0 if trainable is None else trainable / param_count(cfg)
    states = model_state_bytes(n_params, dtype, optimizer, dp, zero,
                               None if trainable is None else round(n_params * frac))
    n_adapters = 0
    if lora is not None:  # adapter weights on this stage (their share of the layers)
        n_adapters = lora_param_count(cfg, lora) * len(stage_layers(cfg.n_layer, pp)[stage]) / cfg.n_layer
        states["params"] += n_adapters * PRECISIONS[dtype].weights / (dp if zero >= 3 else 1)
    w = PRECISIONS[dtype].weights
    gw = BYTES_PER_PARAM[(dtype, "adamw" if optimizer == "none" else optimizer)][1]  # Megatron bf16: 4
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
    n_layers = len(stage_layers(cfg.n_layer, pp)[stage])
    lt = layer_terms(x) + (lora_layer_terms(x, cfg, lora) if lora is not None else [])
    a_layer = sum(tm.nbytes for tm in lt)
    a_stored = lt[0].nbytes if recompute else a_layer  # full recompute keeps the block input only
    in_flight = 1 if pp == 1 else (min(pp - stage, m) if schedule == "1f1b" else m)
    outer = outer_terms(x, cfg, first, last) + (
        lora_outer_terms(x, cfg, first, last) if lora is not None else [])
    a_outer = sum(tm.nbytes for tm in outer)
    A = in_flight * (n_layers * a_stored + a_outer)
    lg = logits_terms(x) if last else []
    logits_hw = sum(tm.nbytes for tm in lg)

    n, h, r = x.b * x.s, x.h, x.prec.residual
    g_layer = layer_param_count(cfg, x.t) * gw * frac / gdiv
    block = layer_tensors(cfg, x.t)
    g_proj = sum(p.numel for p in block if p.name.startswith(("attn.c_proj", "attn.o_proj"))) \
        * gw * frac / gdiv  # attention's output projection
    g_mlp = sum(p.numel for p in block if p.name.startswith(("mlp.", "ln_2."))) * gw * frac / gdiv
    g_down = sum(p.numel for p in block if p.name.startswith("mlp.down_proj")) * gw * frac / gdiv
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
            0, A, logits_saved(x), 2 * 4 * n * x.V / x.t)
    # backward of the last block on this stage, then of its first block (the extremes)
    head_freed = sum(tm.nbytes for tm in outer if tm.name.startswith("ln_f")) if last else 0.0
    g_head = norm_params(cfg) * gw * frac / gdiv if last else 0.0  # ln_f
    if last and (not cfg.tie_embeddings or pp > 1):  # the head's own weight (untied or a pp copy)
        g_head += cfg.vocab_size * h / x.t * gw * frac / gdiv
    recomputed = (a_layer - a_stored) if recompute else 0.0
    a_top = A - head_freed + recomputed
    if last and cfg.norm == "rmsnorm":  # ln_f's backward, right after the head's: all blocks still kept
        head_in = sum(tm.nbytes for tm in outer if tm.name.startswith("ln_f output"))
        phases["backward: ln_f (RMSNorm: two fp32 b·s·h buffers)"] = phase(
            g_head, A - head_in, 0, r * n * h * x.rep + rms_norm_transient(x) + tied_tmp)
    for name, k in (("last", 0), ("first", n_layers - 1)):
        if k and n_layers < 2:
            continue
        grads = g_head + k * g_layer
        acts = a_top - k * a_stored
        temps = dx + gathered + tied_tmp
        mlp_acts, mlp_temps = acts, mlp_transient(x)
        if lora is not None:  # the two input gradients are summed once A's backward freed its input
            f = lora_fractions(cfg, lora)["mlp.c_proj"] * (0.0 if lora.dropout else 1.0)
            mlp_acts -= f * x.prec.values * x.b * x.s * (4 * h + lora.rank)
            mlp_temps = lora_mlp_transient(x, cfg, lora)
        out_proj = "down_proj" if x.swiglu else "c_proj"
        phases[f"backward: {name} block's MLP ({out_proj} grads)"] = phase(grads, mlp_acts, 0,
                                                                          temps + mlp_temps)
        if x.swiglu:  # then the product's backward: down_proj's input freed, its grads made
            phases[f"backward: {name} block's MLP (SiLU(gate)·up grads)"] = phase(
                grads + g_down, mlp_acts - swiglu_freed(x), 0, temps + swiglu_transient(x))
        phases[f"backward: {name} block's attention"] = phase(
            grads + g_mlp + g_proj, acts - mlp_saved(x) - attn_freed(x), 0, temps + attn_transient(x))
    if first:
        emb_acts = sum(tm.nbytes for tm in outer if tm.name.startswith("token ids"))
        # wte's gradient = the head's (waiting in autograd's buffer) + the embedding's dense one,
        # summed out of place: three V·h buffers at once next to every other gradient
        phases["backward: embeddings"] = phase(G - tied_tmp / gdiv, emb_acts, 0, dx + gathered + 3 * tied_tmp)
    if optimizer != "none":
        phases["optimizer step"] = {"params": P, "grads": G, "optimizer": O, "activations": 0.0,
                                    "logits": 0.0, "temporaries": optimizer_temporaries(
                                        cfg, optimizer, x.device, w, x.t) * frac / gdiv}
    o_bytes = 0 if optimizer == "none" else BYTES_PER_PARAM[(dtype, optimizer)][2]
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak_phase = max(totals, key=totals.get)
    return MemoryEstimate(
        params=P, grads=G, optimizer=O, activations=A, logits=logits_hw,
        temporaries=phases[peak_phase]["temporaries"], total=totals[peak_phase], peak_phase=peak_phase,
        phases=phases,
        terms={"model states": [
            Term("params", P, f"N·{w}" + (" / dp (ZeRO-3)" if zero >= 3 else "")),
            Term("grads", G, f"N_trainable·{gw}" + (" / dp (ZeRO-2)" if zero >= 2 else "")),
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
