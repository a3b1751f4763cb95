"""The mixture-of-experts layer in one process: routing rules by hand, the layer against a
token-by-token computation, the auxiliary losses, Hugging Face Mixtral weight for weight, and the
memory estimate against the CPU tensor ledger."""

import json

import pytest
import torch
import torch.nn.functional as F

from journey_dist import moe
from journey_dist.cli import main as journey
from journey_dist.config import ConfigError, GPTConfig, ParallelConfig, get_preset
from journey_dist.memory.estimate import estimate_memory, param_count
from journey_dist.memory.measure import measure_config
from journey_dist.memory.sizes import active_param_count, expert_param_count, model_tensors
from journey_dist.model import GPT, MoE, hf_config_from
from journey_dist.parallel.compose import check_3d
from journey_dist.parity import fresh_model
from journey_dist.report import parity_table

# moe-mini's switches at tiny size: 4 GELU experts, top-2; and the Llama family's (SwiGLU experts)
TINY_MOE = get_preset("moe-mini").with_(n_layer=2, n_embd=32, block_size=16, n_experts=4, moe_hidden=64)
TINY_MIXTRAL = get_preset("mixtral-mini").with_(n_layer=2, n_embd=32, mlp_hidden=48, block_size=16,
                                                moe_z_coef=0.0)


def _naive_moe(layer: MoE, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Token by token: the gate-weighted sum of the token's chosen experts (kept pairs only)."""
    tokens = x.reshape(-1, x.size(-1))
    r = moe.route(layer.router(tokens), layer.top_k, layer.router_kind)
    out = torch.zeros_like(tokens)
    for t in range(tokens.size(0)):
        for j in range(layer.top_k):
            if keep is None or keep[t, j]:
                e = int(r.experts[t, j])
                out[t] += r.weights[t, j] * layer.experts[e](tokens[t:t + 1])[0]
    return out.view_as(x)


def test_routers_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 3.5, 1.0]])
    mixtral = moe.route(logits, 2, "topk_softmax")
    assert mixtral.experts.tolist() == [[0, 1], [2, 1]]
    top = logits.gather(1, mixtral.experts)
    assert torch.allclose(mixtral.weights, F.softmax(top, -1))  # softmax over the k chosen logits
    p = F.softmax(logits, -1)  # = HF: softmax over all, top-k, renormalise
    hf = p.gather(1, mixtral.experts) / p.gather(1, mixtral.experts).sum(1, keepdim=True)
    assert torch.allclose(mixtral.weights, hf)
    switch = moe.route(logits, 2, "softmax_topk")
    assert torch.allclose(switch.weights, p.gather(1, switch.experts))
    assert (switch.weights.sum(1) < 1).all()


def test_capacity_queues_pairs_in_token_order_after_earlier_ranks():
    experts = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])  # 4 tokens, top-2, 3 experts
    assert moe.capacity(4, 3, 2, 1.0) == 3  # ceil(1.0 * 4 * 2 / 3)
    keep = moe.keep_mask(experts, 3, cap=2)
    assert keep.tolist() == [[True, True], [True, True], [True, False], [False, False]]
    # 1 pair of expert 0 and 2 of expert 1 came from earlier tokens (a lower data-parallel rank)
    keep = moe.keep_mask(experts, 3, cap=2, offsets=torch.tensor([1, 2, 0]))
    assert keep.tolist() == [[True, False], [False, True], [False, False], [False, False]]
    d = moe.plan_dispatch(experts, 3, keep)
    assert d.counts.tolist() == [1, 0, 1] and d.token.tolist() == [0, 1] and d.slot.tolist() == [0, 1]


@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk"])
@pytest.mark.parametrize("capacity", [None, 0.5])
def test_moe_layer_is_the_token_by_token_sum(router, capacity):
    cfg = TINY_MOE.with_(moe_router=router, moe_capacity_factor=capacity, moe_shared_hidden=16)
    torch.manual_seed(0)
    layer = MoE(cfg)
    x = torch.randn(3, 8, cfg.n_embd)
    y = layer(x)
    keep = None
    if capacity is not None:
        r = moe.route(layer.router(x.reshape(-1, cfg.n_embd)), cfg.moe_top_k, router)
        cap = moe.capacity(24, cfg.n_experts, cfg.moe_top_k, capacity)
        keep = moe.keep_mask(r.experts, cfg.n_experts, cap)
        assert layer.stats.dropped == int((~keep).sum()) > 0
    want = _naive_moe(layer, x, keep) + layer.shared_expert(x)
    assert (y - want).abs().max() < 1e-6
    layer.eval()  # evaluation drops nothing
    assert (layer(x) - _naive_moe(layer, x) - layer.shared_expert(x)).abs().max() < 1e-6


def test_balance_and_z_loss_by_hand():
    E, k, n = 4, 2, 8
    even = torch.full((n, E), 1 / E)
    assert moe.balance_loss(even, torch.full((E,), n * k // E), n, k).item() == pytest.approx(1.0)
    one_expert = torch.zeros(n, E)
    one_expert[:, 0] = 1.0
    assert moe.balance_loss(one_expert, torch.tensor([n, 0, 0, 0]), n, 1).item() == pytest.approx(E)
    logits = torch.randn(n, E)
    assert moe.z_loss(logits).item() == pytest.approx((torch.logsumexp(logits, -1) ** 2).mean().item())


def test_training_loss_adds_every_layers_aux_loss_and_eval_loss_is_cross_entropy():
    model = fresh_model(TINY_MOE)
    x = torch.randint(0, 256, (2, 16))
    logits, loss = model(x, x)
    ce = F.cross_entropy(logits.view(-1, 256), x.view(-1))
    layers = [b.mlp for b in model.transformer.h]
    aux = sum(m.aux_coef * m.stats.balance + m.z_coef * m.stats.z for m in layers)
    assert (loss - ce - aux).abs() < 1e-6 and aux > 0
    loss.backward()  # every expert has a gradient, also one no token chose (zero rows)
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert (model(x, x)[1] - ce).abs() < 1e-6


def test_dense_configs_are_unchanged():
    dense = GPTConfig()
    assert dense.n_experts == 0 and "router" not in str([n for n, _ in GPT(dense).named_parameters()])
    with pytest.raises(ConfigError, match="moe_capacity_factor set but n_experts=0"):
        GPTConfig(moe_capacity_factor=1.25)


# ---------------------------------------------------------------------- Hugging Face Mixtral


def test_mixtral_logits_and_router_choices_match_hf():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(hf_config_from(TINY_MIXTRAL)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    ours = GPT.from_hf(hf).eval()
    assert ours.config == TINY_MIXTRAL
    router_logits = []
    for block in ours.transformer.h:
        block.mlp.router.register_forward_hook(lambda m, i, out: router_logits.append(out))
    idx = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        out = hf(idx, output_router_logits=True)
        logits, _ = ours(idx)
    assert (out.logits - logits).abs().max() < 1e-5
    for theirs, mine in zip(out.router_logits, router_logits, strict=True):
        assert (theirs - mine).abs().max() < 1e-5
        assert torch.equal(theirs.topk(2).indices, mine.topk(2).indices)  # the same experts chosen
        E = TINY_MIXTRAL.n_experts
        r = moe.route(mine, 2)  # HF's balance loss is k times ours (its fractions sum to k)
        ours_balance = moe.balance_loss(r.probs, moe.expert_counts(r.experts, E), mine.size(0), 2)
        assert load_balancing_loss_func((theirs,), E, 2).item() == pytest.approx(2 * ours_balance.item())
    back = ours.to_hf_state_dict()
    assert back.keys() == hf.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())


def test_no_hf_architecture_for_a_gpt2_moe():
    with pytest.raises(ConfigError, match="Mixtral needs the Llama layout"):
        hf_config_from(TINY_MOE)


# ---------------------------------------------------------------------- memory


@pytest.mark.parametrize("cfg", [TINY_MOE, TINY_MIXTRAL, TINY_MOE.with_(moe_shared_hidden=16)],
                         ids=["gelu", "swiglu", "shared"])
def test_moe_parameter_counts(cfg):
    with torch.device("meta"):
        model = GPT(cfg)
    named = [(k, p.numel()) for k, p in model.named_parameters()]
    assert [(p.name, p.numel) for p in model_tensors(cfg)] == named
    assert param_count(cfg) == model.num_params()
    one = sum(p.numel() for p in model.transformer.h[0].mlp.experts[0].parameters())
    assert active_param_count(cfg) == model.num_params() - cfg.n_layer * (cfg.n_experts - cfg.moe_top_k) * one
    assert expert_param_count(cfg, ep=2) == cfg.n_layer * cfg.n_experts // 2 * one
    assert param_count(cfg, ep=2) == model.num_params() - expert_param_count(cfg, ep=2)


@pytest.mark.parametrize("cfg,dtype", [
    (TINY_MOE, "fp32"),
    pytest.param(TINY_MIXTRAL, "bf16-autocast", marks=pytest.mark.slow),  # swiglu-shared covers it, and more
    (TINY_MIXTRAL.with_(moe_shared_hidden=16), "bf16-autocast")], ids=["gelu", "swiglu", "swiglu-shared"])
def test_moe_memory_estimate_is_the_cpu_ledger(cfg, dtype):
    kw = dict(batch_size=4, seq_len=16, dtype=dtype)
    meas = measure_config(cfg, device="cpu", ledger=True, **kw)
    est = estimate_memory(cfg, device="cpu", **kw)
    for k in ("params", "grads", "optimizer", "activations"):  # one process, no dropping: exact
        assert meas.high_water[k] == getattr(est, k), k
    assert abs(est.total - meas.peak) / meas.peak < 0.005


def test_parity_table_holds_each_key_to_its_own_tolerance():
    diffs = {"ep": {"loss": 1e-6, "grad": 2e-8, "param": 2e-5}}
    assert parity_table(diffs, tol=1e-5).splitlines()[1].endswith("NO")
    per_key = {"loss": 1e-5, "grad": 1e-5, "param": 1e-4}
    assert parity_table(diffs, tol=per_key).splitlines()[1].endswith("yes")


def test_journey_plan_and_estimate_take_moe_presets_and_ep(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("JOURNEY_RUNS_DIR", str(tmp_path))
    assert journey(["plan", "--preset", "moe-mini", "--dp", "4", "--ep", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    mm = get_preset("moe-mini")
    assert plan["stages"][0]["params"] == param_count(mm, ep=2) == param_count(mm) - expert_param_count(mm, 2)
    comm = plan["stages"][0]["comm"]
    tokens = 8 // 4 * 128  # the default batch 8 over dp 4, 128 tokens each
    a2a = mm.n_layer * (8 * 8 + 2 * 2 * tokens * 2 * 128 * 4)  # 8E + 2(M + R)·C·4, M = R = 2 tokens
    assert comm["ep"]["all_to_all"]["bytes"] == a2a
    assert comm["edp"]["all_reduce"]["bytes"] == expert_param_count(mm, 2) * 4  # two owners per expert
    assert journey(["estimate", "--preset", "moe-mini", "--ep", "2", "--measure", "no"]) == 0
    out = capsys.readouterr().out
    assert "assuming --dp 2" in out and f"{active_param_count(mm):,} active per token" in out
    with pytest.raises(ConfigError, match="3D run's stages have no mixture of experts"):
        check_3d(ParallelConfig(dp=2), mm)

