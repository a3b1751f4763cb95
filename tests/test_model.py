"""The one model, both families: against Hugging Face GPT-2 and Llama, parameter counts, KV cache,
GQA, RMSNorm, position encodings, shape tracing."""

import math

import pytest
import torch

from journey_dist.config import get_preset
from journey_dist.model import GPT, KVCache, RMSNorm, hf_config_from, trace_shapes
from journey_dist.positions import alibi_slopes, rope_demo_text, rope_shift_invariance, sinusoidal_table
from journey_dist.report import shapes_table

transformers = pytest.importorskip("transformers")

TINY = get_preset("tiny").with_(vocab_size=97, block_size=24)
# llama-mini's switches at tiny size: RMSNorm, SwiGLU, RoPE, 4 query heads sharing 2 kv heads
TINY_LLAMA = get_preset("llama-mini").with_(n_layer=2, n_embd=32, n_kv_head=2, mlp_hidden=48, vocab_size=97,
                                            block_size=24)
FAMILIES = {"gpt2": TINY, "llama": TINY_LLAMA}
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def _hf_pair(family="gpt2", attn_impl="sdpa"):
    """A random HF model (norm weights and biases perturbed: HF initialises them to 1 and 0) and
    our model loaded from it weight for weight."""
    torch.manual_seed(0)
    cfg = FAMILIES[family]
    hf = getattr(transformers, HF_CLASS[family])(hf_config_from(cfg)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
    ours = GPT.from_hf(hf).eval()
    if attn_impl != "sdpa":
        ours = GPT(cfg.with_(attn_impl=attn_impl)).eval()
        ours.load_hf_state_dict(hf.state_dict())
    return hf, ours


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_logits_and_greedy_tokens_match_hf(family, attn_impl):
    hf, ours = _hf_pair(family, attn_impl)
    cfg = FAMILIES[family]
    idx = torch.randint(0, cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        got, _ = ours(idx)
    assert (got - ref).abs().max().item() < 1e-5
    ref_tokens = hf.generate(idx[:, :4], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(idx[:, :4], 12, greedy=True, use_cache=True), ref_tokens)
    assert torch.equal(ours.generate(idx[:, :4], 12, greedy=True, use_cache=False), ref_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_matches_hf(family):
    hf, ours = _hf_pair(family)
    idx = torch.randint(0, FAMILIES[family].vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(idx, labels=idx).loss  # HF shifts labels inside
        _, got = ours(idx[:, :-1], idx[:, 1:])
    assert abs(ref.item() - got.item()) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_state_dict_round_trip(family):
    hf, ours = _hf_pair(family)
    saved = ours.to_hf_state_dict()
    hf_sd = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert set(saved) == set(hf_sd)  # HF's names, every one of them
    for k, v in hf_sd.items():
        assert torch.equal(saved[k], v), k  # and HF's layouts and values
    again = GPT(FAMILIES[family])
    again.load_hf_state_dict(saved)
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("preset,expected", [("gpt2-small", 124_439_808), ("llama3-8b", 8_030_261_248)])
def test_reference_parameter_counts(preset, expected):
    with torch.device("meta"):
        model = GPT(get_preset(preset))
        hf = transformers.AutoModelForCausalLM.from_config(hf_config_from(get_preset(preset)))
    assert model.num_params() == expected
    assert hf.num_parameters() == expected


def test_tied_and_untied_heads():
    model = GPT(TINY)
    assert model.lm_head.weight is model.transformer.wte.weight
    llama = GPT(TINY_LLAMA)
    assert llama.lm_head.weight is not llama.transformer.wte.weight
    assert llama.num_params() == GPT(TINY_LLAMA.with_(tie_embeddings=True)).num_params() + 97 * 32


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_kv_cache_matches_full_forward(family, attn_impl):
    torch.manual_seed(0)
    cfg = FAMILIES[family].with_(attn_impl=attn_impl)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(cfg, 2, 20)
        parts = [model(idx[:, :7], cache=cache)[0],  # prefill
                 model(idx[:, 7:12], cache=cache)[0]]  # chunked prefill (masked)
        parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(12, 20)]  # decode
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5
    # GQA caches the kv heads only: 2 (K, V) x layers x batch x tokens x kv_heads x head_dim x 4 bytes
    assert cache.nbytes() == 2 * cfg.n_layer * 2 * 20 * cfg.kv_heads * cfg.head_dim * 4
    assert cfg.kv_heads == (4 if family == "gpt2" else 2)


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rope", "alibi"])
def test_every_position_scheme_trains_caches_exactly_and_sees_order(positions):
    torch.manual_seed(0)
    cfg = TINY_LLAMA.with_(positions=positions)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert ("wpe" in model.transformer) == (positions == "learned")
    model.eval()
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(cfg, 2, 20)
        parts = [model(idx[:, :9], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0]
                                                       for t in range(9, 20)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5
    # One layer without positions sees the earlier tokens as a set: swapping two of them leaves
    # the last logits alone (the control: learned positions zeroed, 2e-8). Every scheme breaks that.
    one = GPT(cfg.with_(n_layer=1)).eval()
    swapped = idx.clone()
    swapped[:, [0, 10]] = idx[:, [10, 0]]

    def change() -> float:
        with torch.no_grad():
            return (one(swapped)[0][:, -1] - one(idx)[0][:, -1]).abs().max().item()

    assert change() > 5e-5  # 1.7e-4 (rope) to 2.8e-3 (alibi) at this seed
    if positions == "learned":
        with torch.no_grad():
            one.transformer.wpe.weight.zero_()
        assert change() < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_and_without_cache_identical(family):
    torch.manual_seed(0)
    model = GPT(FAMILIES[family]).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 5))
    assert torch.equal(model.generate(idx, 15, greedy=True, use_cache=True),
                       model.generate(idx, 15, greedy=True, use_cache=False))


def test_gqa_is_multi_head_attention_with_each_kv_head_repeated_for_its_query_group():
    """4 query heads on 2 kv heads = 4 kv heads where kv head h is a copy of kv head h // 2."""
    torch.manual_seed(0)
    gqa = GPT(TINY_LLAMA).eval()
    mha = GPT(TINY_LLAMA.with_(n_kv_head=4)).eval()
    sd = gqa.state_dict()
    D = TINY_LLAMA.head_dim
    for k, v in list(sd.items()):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            sd[k] = v.view(2, D, -1).repeat_interleave(2, dim=0).reshape(4 * D, -1)
    mha.load_state_dict(sd)
    idx = torch.randint(0, TINY_LLAMA.vocab_size, (2, 16))
    with torch.no_grad():
        assert (gqa(idx)[0] - mha(idx)[0]).abs().max().item() < 1e-5


def test_rmsnorm_gradients_and_what_it_keeps():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.add_(torch.randn(8, dtype=torch.double))
    x = torch.randn(3, 5, 8, dtype=torch.double, requires_grad=True)
    torch.autograd.gradcheck(norm, (x,))
    plain = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(norm(x), plain, atol=1e-12, rtol=0)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        norm(x.float().detach().requires_grad_())
    assert sorted(kept) == sorted([(3, 5, 8), (8,), (3, 5, 1)])  # x, weight, 1/rms per token


def test_position_encodings_by_hand():
    r = rope_shift_invariance(head_dim=8, m=3, n=7, shift=100)
    assert abs(r["dot"] - r["dot_shifted"]) < 1e-4  # q.k depends on m - n only
    assert abs(r["dot"] - r["dot_unrotated"]) > 1e-2  # but rotation does change it
    assert r["norm_kept"] < 1e-5  # a rotation keeps lengths
    text = rope_demo_text(r).splitlines()  # what lab 01 prints
    assert text[1] == f"  q at position 3       {[round(v, 3) for v in r['q_at_m'].tolist()]}"
    assert f"q at 3, k at 7: {r['dot']:.4f}; q at 103, k at 107: {r['dot_shifted']:.4f}" in text[3]
    assert alibi_slopes(8).tolist() == [2 ** -(k + 1) for k in range(8)]
    assert len(alibi_slopes(6)) == 6
    pe = sinusoidal_table(torch.arange(3), 4)
    assert torch.allclose(pe[2], torch.tensor([math.sin(2), math.cos(2), math.sin(0.02), math.cos(0.02)]))


def test_too_long_sequence_is_a_clear_error():
    model = GPT(TINY)
    with pytest.raises(ValueError, match="longer than block_size=24"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_trace_shapes():
    model = GPT(TINY)
    rows = dict(trace_shapes(model, torch.zeros(2, 10, dtype=torch.long)))
    C = TINY.n_embd
    assert rows["transformer.wte"] == (2, 10, C)
    assert rows["transformer.h.0.mlp.c_fc"] == (2, 10, 4 * C)
    assert rows["transformer.h.0.attn.c_attn"] == (2, 10, 3 * C)
    assert rows["lm_head"] == (2, 10, TINY.vocab_size)
    printed = shapes_table(list(rows.items())[:2], "module").splitlines()  # as lab 01 prints them
    assert printed[0].split() == ["module", "output", "shape"] and printed[1].split(maxsplit=1) == [
        "transformer.wte", f"(2, 10, {C})"]
    rows = dict(trace_shapes(GPT(TINY_LLAMA), torch.zeros(2, 10, dtype=torch.long)))
    D = TINY_LLAMA.head_dim
    assert rows["transformer.h.0.attn.q_proj"] == (2, 10, 4 * D)
    assert rows["transformer.h.0.attn.k_proj"] == rows["transformer.h.0.attn.v_proj"] == (2, 10, 2 * D)
    assert rows["transformer.h.0.mlp.gate_proj"] == rows["transformer.h.0.mlp.up_proj"] == (2, 10, 48)
    assert rows["transformer.h.0.mlp.down_proj"] == (2, 10, C)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_reaches_every_parameter_and_steps_lower_the_loss(family):
    torch.manual_seed(0)
    cfg = FAMILIES[family]
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, cfg.vocab_size, (4, 17))
    losses = []
    for _ in range(15):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5  # memorising one batch


@pytest.mark.parametrize("family", FAMILIES)
def test_initial_loss_near_uniform(family):
    torch.manual_seed(0)
    cfg = FAMILIES[family]
    model = GPT(cfg)
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 4, 24))
    _, loss = model(idx, targets)  # small init: close to a uniform guess over the vocab
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
