"""Weight-only quantization from scratch (int8 per channel, int4 per group), and torchao as reference.

    q8 = quantize_model(model, bits=8)                   # every block linear -> QuantLinear
    q4 = quantize_model(model, bits=4, group_size=32)
    model_bytes(q8), quantized_weight_bytes(cfg, 8)      # measured vs formula
    ref = torchao_quantize(model, bits=8)                # the same through torchao (optional extra)

Symmetric absmax: for each output channel (int8) or each group of `group_size` consecutive input
weights of a channel (int4), scale = max |w| / qmax with qmax = 2^(bits-1) - 1 (127, 7), and the
stored code is round(w / scale) in [-qmax, qmax] (symmetric: no zero point). Dequantized
w' = code x scale is within scale / 2 of w. Activations stay fp32 (weight-only): the matmul
dequantizes, so what shrinks is the memory (and, on a GPU, the bytes a memory-bound decode step
reads), not the FLOPs. int4 codes are packed two per byte. Quantized: the linear layers of the
blocks (c_attn, c_proj, c_fc, mlp.c_proj; Llama: q/k/v/o_proj, gate/up/down_proj); kept fp32: embeddings,
norms, biases.

torchao's int8 weight-only (Int8WeightOnlyConfig) is per channel too but divides absmax by 127.5
and keeps codes in [-128, 127] (the extreme positive weight rounds to 128 and is clipped by half
a step), so some codes differ by one from ours; torchao's int4 path here is
IntxWeightOnlyConfig(int4, PerGroup) with the same convention (absmax / 7.5, codes in [-8, 7]).
With full_range=True we use that convention and match torchao code for code (tested);
`compare_with_torchao` states the agreement: codes, weights, logits (perplexity: the lab).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from journey_dist.config import ConfigError, GPTConfig, block_linears
from journey_dist.memory.estimate import fmt_bytes, param_count
from journey_dist.model import GPT
from journey_dist.ngram import model_stream_nll
from journey_dist.report import Column, fixed, table


def check_quant(bits: int, group_size: int | None, in_features: int | None = None) -> None:
    """ConfigError for an unsupported width or a group size that does not divide the rows."""
    if bits not in (8, 4):
        raise ConfigError(f"bits={bits!r}: weight-only quantization here is int8 (per channel) or int4 "
                          f"(per group); use bits=8 or bits=4")
    if bits == 4 and not group_size:
        raise ConfigError("int4 needs a group_size (e.g. 32 or 128): one scale per channel loses too much")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 2 or group_size % 2):
        raise ConfigError(f"group_size={group_size!r} must be an even integer >= 2 (e.g. 32, 64, 128)")
    if group_size and in_features is not None and in_features % group_size:
        raise ConfigError(f"group_size={group_size} does not divide the layer's {in_features} input "
                          f"features; use a divisor of {in_features} (e.g. 32)")


def quantize_absmax(w: torch.Tensor, bits: int, group_size: int | None = None,
                    full_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (int8 codes (out, in), fp32 scales (out, in // group)); group None: per channel.

    full_range: torchao's convention instead (scale = absmax / (qmax + 0.5), codes clipped to
    [-qmax - 1, qmax]), to check our layout against torchao code for code.
    """
    out_f, in_f = w.shape
    g = group_size or in_f
    check_quant(bits, group_size, in_f)
    qmax = 2 ** (bits - 1) - 1
    groups = w.detach().float().reshape(out_f, in_f // g, g)
    absmax = groups.abs().amax(dim=-1, keepdim=True)
    scale = (absmax / (qmax + 0.5 if full_range else qmax)).clamp(min=torch.finfo(torch.float32).eps)
    codes = torch.round(groups * (1.0 / scale)).clamp(-qmax - full_range, qmax).to(torch.int8)
    return codes.reshape(out_f, in_f), scale.squeeze(-1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) int8 codes in [-8, 7] -> (out, in / 2) uint8, element 2i in the low nibble."""
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4 (sign-extends each nibble)."""
    low, high = (packed & 0xF).to(torch.int8), (packed >> 4).to(torch.int8)
    both = torch.stack([low, high], dim=-1).flatten(-2)  # (out, in)
    return torch.where(both > 7, both - 16, both)


class QuantLinear(nn.Module):
    """y = x W'^T + b with W' = codes x scales: int8 codes (int4: two per byte) and fp32 scales
    stored as buffers; the bias stays fp32. Inference only."""

    def __init__(self, linear: nn.Linear, bits: int = 8, group_size: int | None = None,
                 full_range: bool = False):
        super().__init__()
        self.bits, self.in_features, self.out_features = bits, linear.in_features, linear.out_features
        self.group_size = group_size or linear.in_features
        codes, scales = quantize_absmax(linear.weight, bits, group_size, full_range)
        self.register_buffer("codes", pack_int4(codes) if bits == 4 else codes)
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)

    def int_codes(self) -> torch.Tensor:
        return unpack_int4(self.codes) if self.bits == 4 else self.codes

    def dequantized(self) -> torch.Tensor:
        """The dequantized (out, in) fp32 weight."""
        codes = self.int_codes().float().view(self.out_features, -1, self.group_size)
        return (codes * self.scales[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, int{self.bits}, group {self.group_size}"


def block_linear_shapes(cfg: GPTConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear of one block, by family: GPT-2's fused c_attn (h -> 3h),
    c_proj, c_fc, mlp.c_proj; Llama's q/k/v/o_proj (k and v with the kv heads) and gate/up/down."""
    h, d, f = cfg.n_embd, cfg.head_dim, cfg.mlp_dim
    q, kv = cfg.n_head * d, (cfg.n_kv_head or cfg.n_head) * d
    if cfg.separate_qkv:
        attn = {"attn.q_proj": (h, q), "attn.k_proj": (h, kv), "attn.v_proj": (h, kv), "attn.o_proj": (q, h)}
    else:
        attn = {"attn.c_attn": (h, q + 2 * kv), "attn.c_proj": (q, h)}
    mlp = ({"mlp.gate_proj": (h, f), "mlp.up_proj": (h, f), "mlp.down_proj": (f, h)} if cfg.mlp == "swiglu"
           else {"mlp.c_fc": (h, f), "mlp.c_proj": (f, h)})
    shapes = attn | mlp
    assert tuple(shapes) == block_linears(cfg), (tuple(shapes), block_linears(cfg))
    return shapes


def block_linear_names(model: GPT) -> list[str]:
    suffixes = block_linears(model.config)
    return [f"transformer.h.{i}.{s}" for i in range(len(model.transformer.h)) for s in suffixes]


def quantize_model(model: GPT, bits: int = 8, group_size: int | None = None, full_range: bool = False) -> GPT:
    """A copy of `model` whose block linears are QuantLinear (the original is untouched)."""
    check_quant(bits, group_size)
    q = copy.deepcopy(model).eval()
    for name in block_linear_names(q):
        parent, child = name.rsplit(".", 1)
        owner = q.get_submodule(parent)
        setattr(owner, child, QuantLinear(getattr(owner, child), bits, group_size, full_range))
    return q


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized weights) is summed over its parts."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> int:
    """Measured: bytes of every parameter and buffer, tied tensors once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def quantized_weight_bytes(cfg: GPTConfig, bits: int, group_size: int | None = None, scale_bytes: int = 4,
                           code_bytes: float | None = None, zero_point_bytes: int = 0) -> int:
    """Formula: block linears at bits/8 bytes per weight plus one scale per channel (int8) or per
    group; everything else (embeddings, norms, biases) fp32. GPT-2 blocks hold 12 h^2 linear
    weights (q, k, v: 3h^2; attention output h^2; MLP 4h^2 + 4h^2) with 9h output channels; the
    Llama family's come from block_linear_shapes (GQA's smaller k, v; SwiGLU's three matrices).

    code_bytes overrides bits/8 for a layout that stores codes wider than they are (torchao keeps
    int4 codes one per int8 byte); zero_point_bytes adds a zero point per scale (torchao stores an
    int8 one even for symmetric quantization)."""
    shapes, L = block_linear_shapes(cfg).values(), cfg.n_layer
    quantized = sum(i * o for i, o in shapes) * L
    scales = quantized // group_size if group_size else sum(o for _, o in shapes) * L
    codes = quantized * (bits / 8 if code_bytes is None else code_bytes)
    return int((param_count(cfg) - quantized) * 4 + codes + scales * (scale_bytes + zero_point_bytes))


# ---------------------------------------------------------------- torchao, the reference


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def torchao_quantize(model: GPT, bits: int = 8, group_size: int | None = None) -> GPT:
    """The same layers quantized by torchao's weight-only configs (a copy; needs the [serving] extra)."""
    check_quant(bits, group_size)
    # deferred: torchao is an optional, heavy dependency (seconds to import)
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup, quantize_

    config = (Int8WeightOnlyConfig() if bits == 8 and not group_size else
              IntxWeightOnlyConfig(weight_dtype=torch.int8 if bits == 8 else torch.int4,
                                   granularity=PerGroup(group_size)))
    q = copy.deepcopy(model).eval()
    targets = set(block_linear_names(q))
    quantize_(q, config, filter_fn=lambda module, fqn: fqn in targets)
    return q


@torch.no_grad()
def compare_with_torchao(ours: GPT, theirs: GPT, ids: torch.Tensor) -> dict:
    """Codes, dequantized weights and logits of our quantized model against torchao's.

    Returns the fraction of codes that differ and the largest difference (in steps of our scale),
    the max |weight diff| relative to our scale, and the max |logit diff| on `ids` (B, T).
    """
    differ, total, max_code, max_w = 0, 0, 0, 0.0
    for name in block_linear_names(ours):
        mine: QuantLinear = ours.get_submodule(name)
        ref = theirs.get_submodule(name).weight
        ref_codes = ref.qdata.to(torch.int16)
        codes = mine.int_codes().to(torch.int16)
        differ += int((codes != ref_codes).sum())
        total += codes.numel()
        max_code = max(max_code, int((codes - ref_codes).abs().max()))
        step = mine.scales.repeat_interleave(mine.group_size, dim=1)
        max_w = max(max_w, float(((mine.dequantized() - ref.dequantize()).abs() / step).max()))
    logits = (ours(ids)[0] - theirs(ids)[0]).abs().max().item()
    return {"codes_differ": differ / total, "max_code_diff": max_code, "max_weight_diff_steps": max_w,
            "max_logit_diff": logits}


@torch.no_grad()
def quantization_report(model: GPT, held_out: torch.Tensor, group_size: int = 32,
                        with_torchao: bool = True, noise: float = 1.0) -> dict:
    """fp32 vs int8 (per channel) vs int4 (per group): weight bytes measured and by formula, held-out
    perplexity per token (`model_stream_nll`); the same through torchao when installed and asked
    for (its formula: codes one per byte, an int8 zero point per scale), with
    `compare_with_torchao`'s agreement. held_out: a 1-D token stream.

    For scale, `noise`: the perplexity when the same layers get seeded Gaussian noise of `noise` x
    each weight matrix's std instead (how much this model relies on those layers at all), and the
    quantization error of each scheme in the same unit (|W' - W| / |W|, Frobenius)."""
    cfg, n = model.config, len(held_out) - 1
    variants = {"fp32": (model, None, None), "int8": (quantize_model(model, 8), 8, None),
                f"int4-g{group_size}": (quantize_model(model, 4, group_size), 4, group_size)}
    if with_torchao and torchao_available():
        variants["torchao int8"] = (torchao_quantize(model, 8), 8, None)
        variants[f"torchao int4-g{group_size}"] = (torchao_quantize(model, 4, group_size), 4, group_size)
    rows = {}
    for name, (m, bits, group) in variants.items():
        layout = dict(code_bytes=1, zero_point_bytes=1) if name.startswith("torchao") else {}
        ppl = math.exp(model_stream_nll(m, held_out) / n)
        rows[name] = {"bits": bits or 32, "group_size": group, "weight_bytes": model_bytes(m),
                      "formula_bytes": (param_count(cfg) * 4 if bits is None else
                                        quantized_weight_bytes(cfg, bits, group, **layout)),
                      "perplexity": ppl}
    fp32 = rows["fp32"]
    for row in rows.values():
        row["bytes_vs_fp32"] = row["weight_bytes"] / fp32["weight_bytes"]
        row["perplexity_vs_fp32"] = row["perplexity"] / fp32["perplexity"] - 1
    for name, (m, bits, _) in variants.items():
        if bits is not None and not name.startswith("torchao"):
            rows[name]["relative_weight_error"] = relative_weight_error(model, m)
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    for name in block_linear_names(noisy):
        w = noisy.get_submodule(name).weight.detach()
        w.add_(torch.randn(w.shape, generator=gen) * w.std() * noise)
    noise_row = {"relative_std": noise, "perplexity": math.exp(model_stream_nll(noisy, held_out) / n)}
    noise_row["perplexity_vs_fp32"] = noise_row["perplexity"] / rows["fp32"]["perplexity"] - 1
    agreement = {}
    if "torchao int8" in variants:
        ids = held_out[: cfg.block_size][None]
        agreement = {"int8": compare_with_torchao(variants["int8"][0], variants["torchao int8"][0], ids),
                     f"int4-g{group_size}": compare_with_torchao(
                         variants[f"int4-g{group_size}"][0], variants[f"torchao int4-g{group_size}"][0], ids)}
    return {"rows": rows, "agreement": agreement, "held_out_tokens": n, "noise": noise_row,
            "torchao": torchao_version() if with_torchao else "not asked for"}


def relative_weight_error(model: GPT, quantized: GPT) -> float:
    """|W' - W| / |W| (Frobenius) over all quantized block linears together."""
    err = ref = 0.0
    for name in block_linear_names(model):
        w = model.get_submodule(name).weight.detach()
        err += float((quantized.get_submodule(name).dequantized() - w).pow(2).sum())
        ref += float(w.pow(2).sum())
    return math.sqrt(err / ref)


def torchao_version() -> str:
    """torchao's version, or why it is missing (the lab prints it instead of failing)."""
    if not torchao_available():
        return "not installed (pip install 'journey-dist[serving]' or pip install torchao --no-deps)"
    return importlib.metadata.version("torchao")


def quantization_table(quant: dict) -> str:
    """quantization_report as a table (weight bytes measured and by formula, perplexity, each
    against fp32, |W - W_q| / |W|), then the noise baseline and the agreement with torchao."""
    rows = [{"name": name, **r, "error": r.get("relative_weight_error")} for name, r in quant["rows"].items()]
    cols: list[Column] = [("name", "", str), ("weight_bytes", "weights", fmt_bytes),
                          ("formula_bytes", "formula", fmt_bytes),
                          ("bytes_vs_fp32", "vs fp32", _percent("1")), ("perplexity", "perplexity", fixed(3)),
                          ("perplexity_vs_fp32", "vs fp32", _percent("+2")),
                          ("error", "|W-W_q|/|W|", _percent("2"))]
    noise = quant["noise"]
    lines = [f"weight-only quantization (held-out {quant['held_out_tokens']:,} tokens; "
             f"torchao: {quant['torchao']})", table(rows, cols),
             f"for scale: Gaussian noise of {noise['relative_std']:.0%} of each weight's std on the same "
             f"layers gives perplexity {noise['perplexity']:.3f} ({noise['perplexity_vs_fp32']:+.2%})"]
    lines += [f"ours vs torchao, {name}: {a['codes_differ']:.1%} of codes differ (by <= "
              f"{a['max_code_diff']}), weights within {a['max_weight_diff_steps']:.2f} step, logits within "
              f"{a['max_logit_diff']:.3f}" for name, a in quant["agreement"].items()]
    return "\n".join(lines)


def _percent(spec: str):
    """A table format: x as a percentage with format spec `spec` ("+2": signed, 2 digits); '' for None."""
    sign, digits = (spec[0], spec[1:]) if spec[0] == "+" else ("", spec)
    return lambda x: "" if x is None else f"{x:{sign}.{digits}%}"
