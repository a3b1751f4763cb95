"""Activation recomputation: none, selective (the attention core), full (whole blocks) and a
per-op policy give the same gradients; what each keeps is what the estimate says (measured with
the exact CPU tensor ledger), and the estimate's selective count is Korthikanti et al.'s."""

import pytest
import torch

from journey_dist.config import ConfigError, get_preset
from journey_dist.memory.estimate import activation_bytes_per_layer, estimate_memory
from journey_dist.memory.measure import measure_config
from journey_dist.model import GPT
from journey_dist.recompute import RECOMPUTE_MODES, recompute_costs, set_recompute

S, B, H, A = 2048, 1, 12288, 96  # the paper's GPT-3 175B row (Korthikanti et al. 2022, Table 3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_mode_gives_the_same_gradients(attn):
    torch.manual_seed(0)
    model = GPT(get_preset("tiny", attn_impl=attn, dropout=0.1))
    x, y = torch.randint(0, 256, (2, 2, 16))
    grads = {}
    for mode in RECOMPUTE_MODES:
        set_recompute(model, mode)
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks; recomputation replays them
        model(x, y)[1].backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    set_recompute(model, "none")
    assert "forward" not in model.transformer.h[0].__dict__ and not model.transformer.h[0].attn.recompute_core
    for mode in RECOMPUTE_MODES[1:]:
        for name, g in grads[mode].items():
            assert torch.allclose(g, grads["none"][name], atol=1e-6, rtol=0), (mode, name)


# (preset, overrides, batch, seq, dtype, attn, dropout): the peak in the loss's backward, and in a
# block's attention backward (vocabulary 64, 16 heads), where selective has recomputed the core
CONFIGS = [
    ("tiny", {}, 4, 32, "fp32", "eager", 0.1),
    ("tiny", {}, 4, 32, "fp32", "sdpa", 0.0),
    pytest.param("gpt-mini", dict(vocab_size=64, n_head=16, n_layer=2), 2, 64, "fp32", "eager", 0.0,
                 marks=pytest.mark.slow),
    pytest.param("llama-mini", dict(vocab_size=64, n_layer=2), 2, 64, "bf16-autocast", "eager", 0.0,
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("preset,overrides,batch,seq,dtype,attn,dropout", CONFIGS)
def test_measured_memory_per_mode_is_the_estimate(preset, overrides, batch, seq, dtype, attn, dropout):
    cfg = get_preset(preset, attn_impl=attn, dropout=dropout, **overrides)
    kept = {}
    for mode in ("none", "selective", "full"):
        kw = dict(batch_size=batch, seq_len=seq, dtype=dtype, recompute=mode)
        meas = measure_config(cfg, device="cpu", ledger=True, **kw)
        est = estimate_memory(cfg, device="cpu", **kw)
        for k in ("params", "grads", "optimizer"):
            assert meas.high_water[k] == getattr(est, k), (mode, k)  # exact
        if mode != "full":  # full: checkpoint's own hooks hide the recomputed tensors from the ledger
            assert meas.high_water["activations"] == est.activations, mode  # exact
        # peak within 2% (the estimate's own error without recompute: <= 1.2% on these configs)
        assert est.total == pytest.approx(meas.peak, rel=0.02), (mode, est.peak_phase)
        kept[mode] = est.activations
    assert kept["full"] < kept["selective"] <= kept["none"]


@pytest.mark.parametrize("tp,sp", [(1, False), (8, False), (8, True)])
def test_selective_per_layer_is_korthikantis_formula(tp, sp):
    """16-bit, dropout, unfused attention, CUDA (the paper's setting): with selective recompute our
    per-layer terms are the paper's sbh·34 (sbh(10 + 24/t) with tp, sbh·34/t with sp too) plus the
    LayerNorm statistics it leaves out."""
    cfg = get_preset("gpt2-medium").with_(dropout=0.1, block_size=S, n_embd=H, n_head=A, vocab_size=51200)
    est = estimate_memory(cfg, batch_size=B, seq_len=S, dtype="bf16-mixed", attn="eager", tp=tp,
                          sequence_parallel=sp, device="cuda", recompute="selective")
    terms = {t.name: t.nbytes for t in est.terms["per layer"]}
    extras = terms.pop("LayerNorm mean and rstd (ln_1, ln_2)")
    assert extras < 0.0002 * sum(terms.values())
    paper = activation_bytes_per_layer(S, B, H, A, tp=tp, sequence_parallel=sp, recompute="selective")
    assert sum(terms.values()) == paper == S * B * H * (34 / tp if sp else 10 + 24 / tp)
    none = activation_bytes_per_layer(S, B, H, A, tp=tp, sequence_parallel=sp)
    assert none - paper == S * B * H * 5 * A * S / (H * tp)  # what selective saves: the 5as/(ht) term
    assert activation_bytes_per_layer(S, B, H, A, recompute="full") == 2 * S * B * H


def test_recompute_modes_are_checked():
    with pytest.raises(ConfigError, match=r"recompute='some'; use one of 'none', 'selective', 'full', 'ops'"):
        set_recompute(GPT(get_preset("tiny")), "some")
    with pytest.raises(ConfigError, match=r"recompute='ops' .* is measured, not modelled"):
        estimate_memory(get_preset("tiny"), batch_size=2, seq_len=16, recompute="ops")
    a = estimate_memory(get_preset("tiny"), batch_size=2, seq_len=16, recompute=True)  # the older switch
    full = estimate_memory(get_preset("tiny"), batch_size=2, seq_len=16, recompute="full")
    assert a.activations == full.activations


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_recompute_costs_count_the_redone_forward(attn):
    """The backward's extra matmul FLOPs are the forward work each mode redoes. Non-reentrant
    checkpointing stops recomputing once it has every tensor backward needs, so what no backward
    reads is not redone: eager attention's probabilities @ v, the MLP's output projection."""
    torch.manual_seed(0)
    cfg = get_preset("tiny", attn_impl=attn)
    b, s, h, a, L = 2, 16, cfg.n_embd, cfg.n_head, cfg.n_layer
    x = torch.randint(0, 256, (b, s))
    costs = recompute_costs(GPT(cfg), x, x, rounds=1)
    scores = 2 * b * a * s * s * cfg.head_dim  # q @ k^T (and as much again for probabilities @ v)
    core = 2 * scores if attn == "sdpa" else scores  # SDPA is one op: recomputed whole
    assert costs["none"]["extra_flops"] == costs["ops"]["extra_flops"] == 0  # ops saves every matmul
    assert costs["selective"]["extra_flops"] == L * core
    assert costs["full"]["extra_flops"] == L * (16 * b * s * h * h + 2 * scores)  # c_attn, c_proj, c_fc
    assert all(c["step_s"] > 0 for c in costs.values())
