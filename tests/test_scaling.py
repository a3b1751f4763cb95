"""scaling.py: 6ND, compute-optimal N and D against the papers' own numbers, the noise scale."""

import math

import pytest
import torch
from torch import nn

from journey_dist.config import ConfigError
from journey_dist.scaling import (
    BESIROGLU,
    HOFFMANN,
    PF_DAY,
    chinchilla_optimal,
    examples_over_min,
    grad_sq_norms,
    kaplan_critical_batch,
    kaplan_optimal_params,
    noise_scale_from_norms,
    scaled_lr,
    steps_over_min,
    training_flops,
)

CHINCHILLA = training_flops(70e9, 1.4e12)  # 70B parameters on 1.4T tokens


def test_training_flops_and_the_20_tokens_rule():
    assert CHINCHILLA == pytest.approx(5.88e23)
    n, d = chinchilla_optimal(CHINCHILLA)
    assert n == pytest.approx(70e9) and d == pytest.approx(1.4e12)


@pytest.mark.parametrize("fit,exponent", [(HOFFMANN, 0.45), (BESIROGLU, 0.51)])  # paper: 0.46 unrounded
def test_fitted_laws_optimum_is_a_minimum_on_the_budget(fit, exponent):
    n, d = fit.optimal(CHINCHILLA)
    assert training_flops(n, d) == pytest.approx(CHINCHILLA)
    for k in (1.1, 2.0):  # moving along 6ND = C either way raises the loss
        assert fit.loss(n, d) < fit.loss(n * k, d / k) and fit.loss(n, d) < fit.loss(n / k, d * k)
    assert round(fit.param_exponent, 2) == exponent  # the papers' reported a = β/(α+β)


def test_refit_agrees_with_chinchilla_and_the_printed_fit_does_not():
    n_refit, d_refit = BESIROGLU.optimal(CHINCHILLA)
    n_printed, d_printed = HOFFMANN.optimal(CHINCHILLA)
    assert 60e9 < n_refit < 80e9 and 15 < d_refit / n_refit < 25
    assert n_printed < 40e9 and d_printed / n_printed > 80  # the rounded coefficients' bias


def test_kaplan_allocation_and_critical_batch():
    assert kaplan_optimal_params(PF_DAY) == pytest.approx(1.3e9)
    assert kaplan_optimal_params(10 * PF_DAY) / kaplan_optimal_params(PF_DAY) == pytest.approx(10**0.73)
    assert kaplan_critical_batch(1.0) == pytest.approx(2e8)
    assert kaplan_critical_batch(2.0) > kaplan_critical_batch(3.0)  # larger as the loss falls


def test_steps_and_examples_tradeoff():
    assert steps_over_min(1000, 1000) == examples_over_min(1000, 1000) == 2  # B = B_noise
    assert steps_over_min(100, 1000) == pytest.approx(11)
    assert examples_over_min(100, 1000) == pytest.approx(1.1)


class _Linear(nn.Module):
    """loss = p·v for the batch's v: its gradient is exactly v."""

    def __init__(self, n: int):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(n))

    def forward(self, v, _):
        return None, (self.p * v).sum()


def test_noise_scale_recovers_a_known_one():
    n, sigma, b_small, k = 50, 0.3, 4, 1000
    gen = torch.Generator().manual_seed(0)
    mean = torch.ones(n) / math.sqrt(n)  # |G|² = 1, per-example covariance σ² I: B_noise = nσ²
    batches = [(mean + sigma * torch.randn(n, generator=gen) / math.sqrt(b_small), None) for _ in range(k)]
    small, big = grad_sq_norms(_Linear(n), batches)
    vs = torch.stack([v for v, _ in batches]).double()
    assert small == pytest.approx(float((vs**2).sum(1).mean()))
    assert big == pytest.approx(float(vs.mean(0).pow(2).sum()))
    assert noise_scale_from_norms(small, big, b_small, b_small * k) == pytest.approx(n * sigma**2, rel=0.1)


def test_lr_scaling_rules_and_bad_input():
    assert scaled_lr(0.1, 256, 8192) == pytest.approx(3.2)  # Goyal et al.: 0.1 per 256 images
    assert scaled_lr(3e-4, 256, 1024, "sqrt") == pytest.approx(6e-4)
    with pytest.raises(ConfigError, match="sqrt"):
        scaled_lr(0.1, 256, 512, "cubic")
    with pytest.raises(ConfigError, match="b_big"):
        noise_scale_from_norms(1.0, 0.5, 8, 8)
    with pytest.raises(ConfigError, match="compute"):
        HOFFMANN.optimal(0)
