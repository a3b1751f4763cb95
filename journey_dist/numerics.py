"""Number formats in training: range and precision of fp32, bf16, fp16 and FP8, loss scaling,
FP8 per-tensor scaling (Transformer Engine style), and what summing in 16 bits loses.

Everything is computed from torch's own description of each format (torch.finfo) and torch's
own rounding (a cast), so notes/mixed_precision.md shows what the formats really do:

    format_info("fp16").min_subnormal          # 5.96e-08: smaller gradients become 0
    underflow_fraction(grads, "fp16", scale=2.0**16)
    fp8_scale(amax=3.0, fmt="fp8-e4m3")        # 448 / 3: amax lands on the largest E4M3 value
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from journey_dist.config import ConfigError

FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "fp8-e4m3": torch.float8_e4m3fn, "fp8-e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class FormatInfo:
    """A floating-point format: bits, the largest value, the smallest normal and subnormal
    values, and eps (the gap above 1.0, 2^-mantissa_bits)."""

    name: str
    bits: int
    exponent_bits: int
    mantissa_bits: int
    max: float
    min_normal: float
    min_subnormal: float
    eps: float

    @property
    def decades(self) -> float:
        """Dynamic range in powers of ten, from the smallest subnormal to the largest value."""
        return math.log10(self.max / self.min_subnormal)

    @property
    def max_relative_rounding(self) -> float:
        """Worst relative error of rounding a normal value to nearest: half an ulp, eps / 2."""
        return self.eps / 2


def _dtype(fmt: str) -> torch.dtype:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown number format {fmt!r}; use one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def format_info(fmt: str) -> FormatInfo:
    """The format's parameters, read from torch.finfo (E4M3 is the `fn` variant: no infinity,
    largest value 448, the one Transformer Engine and the OCP FP8 spec use for training)."""
    fi = torch.finfo(_dtype(fmt))
    mantissa = round(-math.log2(fi.eps))
    return FormatInfo(name=fmt, bits=fi.bits, exponent_bits=fi.bits - 1 - mantissa, mantissa_bits=mantissa,
                      max=fi.max, min_normal=fi.smallest_normal, min_subnormal=fi.smallest_normal * fi.eps,
                      eps=fi.eps)


def cast(x: torch.Tensor, fmt: str, scale: float = 1.0) -> torch.Tensor:
    """x · scale rounded to the format and back to fp32, divided by scale again (what a tensor
    stored in that format with that scale holds)."""
    return (x.float() * scale).to(_dtype(fmt)).float() / scale


def underflow_fraction(values: Iterable[torch.Tensor] | torch.Tensor, fmt: str, scale: float = 1.0) -> float:
    """Of the nonzero values, the fraction that become exactly 0 when x · scale is stored in fmt."""
    tensors = [values] if isinstance(values, torch.Tensor) else list(values)
    lost = nonzero = 0
    for t in tensors:
        t = t.detach().float().flatten()
        keep = t != 0
        nonzero += int(keep.sum())
        lost += int((cast(t[keep], fmt, scale) == 0).sum())
    return lost / nonzero if nonzero else 0.0


def overflow_fraction(x: torch.Tensor, fmt: str, scale: float = 1.0) -> float:
    """The fraction of values whose |x| · scale exceeds the format's largest value."""
    return float(((x.detach().float().abs() * scale) > format_info(fmt).max).float().mean())


def max_safe_scale(amax: float, fmt: str = "fp16") -> float:
    """The largest power of two that keeps amax · scale within the format (loss scaling)."""
    if amax <= 0:
        raise ConfigError(f"amax={amax} must be positive")
    return 2.0 ** math.floor(math.log2(format_info(fmt).max / amax))


def grad_scaler_defaults() -> dict[str, float]:
    """torch.amp.GradScaler's dynamic loss-scaling defaults, read from its signature: start at
    init_scale, halve (backoff) on an inf/nan step and skip it, double after growth_interval
    clean steps."""
    params = inspect.signature(torch.amp.GradScaler.__init__).parameters
    names = ("init_scale", "growth_factor", "backoff_factor", "growth_interval")
    return {k: params[k].default for k in names}


def fp8_scale(amax: float, fmt: str = "fp8-e4m3", margin: int = 0) -> float:
    """Per-tensor FP8 scale, Transformer Engine's rule: (fp8_max / amax) / 2^margin, so the
    tensor's largest |value| lands at the top of the format's range (less a safety margin)."""
    if amax <= 0:
        raise ConfigError(f"amax={amax} must be positive (TE keeps the previous scale for an all-zero "
                          "tensor)")
    return format_info(fmt).max / amax / 2.0 ** margin


def delayed_scale(amax_history: Iterable[float], fmt: str = "fp8-e4m3", margin: int = 0) -> float:
    """Delayed scaling: the scale for this step comes from the largest amax recorded over the
    previous steps' history (TE's amax_compute_algo="max"), not from the tensor being cast, so
    a tensor that grew since then overflows (`overflow_fraction`)."""
    return fp8_scale(max(amax_history), fmt, margin)


def sequential_sum(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Sum x along dim 0 one row at a time, rounding every partial sum to fmt: gradient
    accumulation over micro-batches, or a ring reduction over ranks, in that format."""
    dtype = _dtype(fmt)
    acc = torch.zeros_like(x[0], dtype=dtype)
    for row in x:
        acc = (acc.float() + row.float()).to(dtype)
    return acc.float()


def gaussian(shape: tuple[int, ...], seed: int = 0, std: float = 1.0) -> torch.Tensor:
    """fp32 normal samples made from uniform bits by Box-Muller in float64, so every CPU rounds
    them to the same fp32 values (torch.randn's vectorized kernels may differ in the last bit)."""
    gen = torch.Generator().manual_seed(seed)
    u1, u2 = torch.rand((2, *shape), generator=gen, dtype=torch.float64)
    return (std * torch.sqrt(-2 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2)).float()


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖ / ‖exact‖ (in float64)."""
    exact = exact.double()
    return float((approx.double() - exact).norm() / exact.norm())
