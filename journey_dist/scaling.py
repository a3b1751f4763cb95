"""Scaling arithmetic: training FLOPs, compute-optimal model and data size, the critical batch
size, and learning-rate scaling with the global batch (which data parallelism grows).

Every coefficient is a paper's fitted value, named with its source:
* Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", Chinchilla), eq. 10:
  L(N, D) = E + A/N^α + B/D^β with E = 1.69, A = 406.4, B = 410.7, α = 0.34, β = 0.28 as printed
  (the unrounded α = 0.3392, β = 0.2849 give the paper's a = 0.46; the printed ones 0.45);
* Besiroglu et al. 2024 ("Chinchilla Scaling: A Replication Attempt"), the same law refitted:
  E = 1.8172, A = 482.01, B = 2085.43, α = 0.3478, β = 0.3658;
* Kaplan et al. 2020 ("Scaling Laws for Neural Language Models"): N_opt = 1.3e9 · C_min^0.73
  non-embedding parameters, C_min in PF-days (Table 6, Fig. 14); B_crit(L) = 2e8 / L^(1/0.21)
  tokens, L in nats per token (eq. 1.4);
* McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"): steps and examples to
  a given loss, S = S_min (1 + B_noise/B) and E = E_min (1 + B/B_noise).

    n, d = HOFFMANN.optimal(5.76e23)   # Chinchilla's budget: parameters and tokens
    training_flops(70e9, 1.4e12)        # 6ND
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from journey_dist.config import ConfigError

FLOPS_PER_PARAM_TOKEN = 6  # forward 2 (a multiply and an add per weight), backward 4
PF_DAY = 1e15 * 24 * 3600  # FLOP in a petaflop/s-day, Kaplan's unit of compute
CHINCHILLA_TOKENS_PER_PARAM = 20  # Chinchilla itself: 70B parameters on 1.4T tokens


def _positive(**values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ConfigError(f"{name}={v} must be positive")


def training_flops(n_params: float, tokens: float) -> float:
    """Training compute ≈ 6·N·D FLOP (Kaplan et al. 2020 §2.1; attention's share left out)."""
    _positive(n_params=n_params, tokens=tokens)
    return FLOPS_PER_PARAM_TOKEN * n_params * tokens


@dataclass(frozen=True)
class LossFit:
    """A fitted loss surface L(N, D) = E + A/N^alpha + B/D^beta (nats per token)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str

    def loss(self, n_params: float, tokens: float) -> float:
        _positive(n_params=n_params, tokens=tokens)
        return self.E + self.A / n_params**self.alpha + self.B / tokens**self.beta

    def optimal(self, compute: float) -> tuple[float, float]:
        """(N, D) minimising L under 6ND = compute (Hoffmann et al. eq. 4):
        N = G (C/6)^(β/(α+β)), D = (C/6)/N, G = (αA/(βB))^(1/(α+β)). E does not move it."""
        _positive(compute=compute)
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (compute / FLOPS_PER_PARAM_TOKEN) ** (self.beta / (self.alpha + self.beta))
        return n, compute / FLOPS_PER_PARAM_TOKEN / n

    @property
    def param_exponent(self) -> float:
        """a in N_opt ∝ C^a: β/(α+β)."""
        return self.beta / (self.alpha + self.beta)


HOFFMANN = LossFit(1.69, 406.4, 410.7, 0.34, 0.28, "Hoffmann et al. 2022, eq. 10 (Approach 3)")
BESIROGLU = LossFit(1.8172, 482.01, 2085.43, 0.3478, 0.3658, "Besiroglu et al. 2024, refit of Approach 3")


def chinchilla_optimal(compute: float,
                       tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) with D = tokens_per_param · N and 6ND = compute: N = sqrt(C / (6 · ratio))."""
    _positive(compute=compute, tokens_per_param=tokens_per_param)
    n = (compute / (FLOPS_PER_PARAM_TOKEN * tokens_per_param)) ** 0.5
    return n, tokens_per_param * n


def kaplan_optimal_params(compute: float) -> float:
    """Kaplan et al.'s compute-efficient model size, 1.3e9 · (C_min / PF-day)^0.73 non-embedding
    parameters (C_min: the compute at the critical batch size)."""
    _positive(compute=compute)
    return 1.3e9 * (compute / PF_DAY) ** 0.73


def kaplan_critical_batch(loss: float) -> float:
    """Kaplan et al.'s critical batch size in tokens at a loss in nats per token:
    B_crit = 2e8 / L^(1/0.21). It grows as the loss falls."""
    _positive(loss=loss)
    return 2e8 / loss ** (1 / 0.21)


def steps_over_min(batch: float, noise_scale: float) -> float:
    """S / S_min = 1 + B_noise / B: how many more optimizer steps than the fewest possible."""
    _positive(batch=batch, noise_scale=noise_scale)
    return 1 + noise_scale / batch


def examples_over_min(batch: float, noise_scale: float) -> float:
    """E / E_min = 1 + B / B_noise: how many more examples (compute) than the fewest possible."""
    _positive(batch=batch, noise_scale=noise_scale)
    return 1 + batch / noise_scale


def noise_scale_from_norms(small_sq: float, big_sq: float, b_small: float, b_big: float) -> float:
    """B_simple = tr(Σ)/|G|² from the squared norms of a small-batch gradient (per rank, b_small)
    and a big-batch one (all-reduced over dp, b_big), McCandlish et al. App. A's unbiased
    estimates: |G|² = (b_big|G_big|² - b_small|G_small|²)/(b_big - b_small),
    tr(Σ) = (|G_small|² - |G_big|²)/(1/b_small - 1/b_big)."""
    _positive(small_sq=small_sq, big_sq=big_sq, b_small=b_small)
    if not b_big > b_small:
        raise ConfigError(f"b_big={b_big} must exceed b_small={b_small} (the all-reduced batch is larger)")
    g_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    return trace / g_sq


def scaled_lr(base_lr: float, base_batch: float, batch: float, rule: str = "linear") -> float:
    """Learning rate for a new global batch: linear (SGD, Goyal et al. 2017: lr ∝ B) or sqrt
    (Adam-style optimizers, Malladi et al. 2022: lr ∝ √B). Both hold only below the critical
    batch size, and a large lr needs warm-up."""
    _positive(base_lr=base_lr, base_batch=base_batch, batch=batch)
    if rule not in ("linear", "sqrt"):
        raise ConfigError(f"rule={rule!r}; use 'linear' (SGD) or 'sqrt' (Adam)")
    ratio = batch / base_batch
    return base_lr * (ratio if rule == "linear" else ratio**0.5)


def grad_sq_norms(model: torch.nn.Module,
                  batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(mean over batches of |g_i|², |mean of g_i|²) for the model's loss gradient on each batch:
    what data parallelism has for free, each rank's local gradient and the all-reduced mean.
    Feed them to noise_scale_from_norms with b_small = one batch, b_big = all of them."""
    grads = []
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.zero_grad(set_to_none=True)
    stacked = torch.stack(grads).double()
    return float((stacked**2).sum(1).mean()), float((stacked.mean(0) ** 2).sum())
