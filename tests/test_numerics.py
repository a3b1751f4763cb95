"""numerics.py: format parameters against IEEE/OCP values, loss and FP8 scaling, 16-bit sums."""

import math

import pytest
import torch

from journey_dist.config import ConfigError
from journey_dist.numerics import (
    FORMATS,
    cast,
    delayed_scale,
    format_info,
    fp8_scale,
    gaussian,
    grad_scaler_defaults,
    max_safe_scale,
    overflow_fraction,
    relative_error,
    sequential_sum,
    underflow_fraction,
)


@pytest.mark.parametrize("fmt,bits,exp,man,largest,min_sub", [
    ("fp32", 32, 8, 23, 3.4028234663852886e38, 2.0**-149),
    ("bf16", 16, 8, 7, 3.3895313892515355e38, 2.0**-133),
    ("fp16", 16, 5, 10, 65504.0, 2.0**-24),
    ("fp8-e4m3", 8, 4, 3, 448.0, 2.0**-9),
    ("fp8-e5m2", 8, 5, 2, 57344.0, 2.0**-16),
])
def test_formats_match_their_specifications(fmt, bits, exp, man, largest, min_sub):
    f = format_info(fmt)
    assert (f.bits, f.exponent_bits, f.mantissa_bits) == (bits, exp, man)
    assert (f.max, f.min_subnormal) == (largest, min_sub)
    assert f.eps == 2.0**-man and f.max_relative_rounding == 2.0 ** -(man + 1)
    assert torch.tensor(min_sub).to(FORMATS[fmt]).item() > 0  # the smallest subnormal exists,
    assert torch.tensor(min_sub / 2, dtype=torch.float64).to(FORMATS[fmt]).item() == 0  # half: 0
    assert math.isclose(f.decades, math.log10(largest / min_sub))


def test_underflow_and_loss_scaling():
    x = torch.tensor([1e-8, 1e-3, 0.0, -2e-8])
    assert underflow_fraction(x, "fp16") == 2 / 3  # the zero is not counted
    assert underflow_fraction(x, "fp16", scale=2.0**16) == 0.0
    assert underflow_fraction(x, "bf16") == 0.0  # fp32's exponent range
    assert underflow_fraction([x, torch.tensor([1.0])], "fp16") == 2 / 4
    assert max_safe_scale(1.0) == 2.0**15 and max_safe_scale(0.5) == 2.0**16  # 65504 = 2^16 - 32
    assert grad_scaler_defaults() == {"init_scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                      "growth_interval": 2000}


def test_fp8_per_tensor_and_delayed_scaling():
    x = gaussian((4096,), seed=1, std=1e-3)
    amax = x.abs().max().item()
    s = fp8_scale(amax)
    assert s == 448.0 / amax and fp8_scale(amax, margin=1) == s / 2
    assert underflow_fraction(x, "fp8-e4m3") > 0.5  # 2^-9 is the smallest E4M3 value
    assert underflow_fraction(x, "fp8-e4m3", s) == 0.0 and overflow_fraction(x, "fp8-e4m3", s) == 0.0
    err = relative_error(cast(x, "fp8-e4m3", s), x)
    assert 0.01 < err < format_info("fp8-e4m3").max_relative_rounding  # 3 mantissa bits: <= 6.25%
    assert delayed_scale([amax / 4, amax, amax / 2]) == s  # the history's largest amax
    assert overflow_fraction(2 * x, "fp8-e4m3", delayed_scale([amax])) > 0  # grew since: overflows


def test_sixteen_bit_running_sums_lose_small_addends():
    small = torch.full((1024, 1), 1e-3)
    assert sequential_sum(small, "bf16").item() == 0.5  # ulp(0.5) = 2^-8: half of it > 1e-3
    assert abs(sequential_sum(small, "fp32").item() - 1.024) < 1e-4
    ranks = gaussian((64, 512))
    exact = ranks.double().sum(0)
    errors = {f: relative_error(sequential_sum(ranks, f), exact) for f in ("fp32", "bf16", "fp16")}
    assert errors["fp32"] < 1e-6 < errors["fp16"] < errors["bf16"] < 0.05


def test_gaussian_is_a_standard_normal_and_repeatable():
    x = gaussian((20000,), seed=3)
    assert torch.equal(x, gaussian((20000,), seed=3)) and not torch.equal(x, gaussian((20000,), seed=4))
    assert abs(x.mean().item()) < 0.03 and abs(x.std().item() - 1) < 0.03


def test_bad_input_names_the_fix():
    with pytest.raises(ConfigError, match="fp8-e4m3"):
        format_info("fp4")
    with pytest.raises(ConfigError, match="positive"):
        fp8_scale(0.0)
    with pytest.raises(ConfigError, match="positive"):
        max_safe_scale(-1.0)
