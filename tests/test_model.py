"""GPT-mini against Hugging Face GPT-2, parameter counts, KV cache, shape tracing."""

import math

import pytest
import torch

from journey_dist.config import get_preset
from journey_dist.model import GPT, KVCache, hf_config_from, trace_shapes

transformers = pytest.importorskip("transformers")

TINY = get_preset("tiny").with_(vocab_size=97, block_size=24)


def _hf_pair(attn_impl="eager"):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config_from(TINY)).eval()
    ours = GPT.from_hf(hf).eval()
    if attn_impl != "sdpa":
        ours = GPT(TINY.with_(attn_impl=attn_impl)).eval()
        ours.load_hf_state_dict(hf.state_dict())
    return hf, ours


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_logits_and_greedy_tokens_match_hf(attn_impl):
    hf, ours = _hf_pair(attn_impl)
    idx = torch.randint(0, TINY.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        got, _ = ours(idx)
    assert (got - ref).abs().max().item() < 1e-5
    ref_tokens = hf.generate(idx[:, :4], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(idx[:, :4], 12, greedy=True), ref_tokens)


def test_loss_matches_hf():
    hf, ours = _hf_pair()
    idx = torch.randint(0, TINY.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(idx, labels=idx).loss  # HF shifts labels inside
        _, got = ours(idx[:, :-1], idx[:, 1:])
    assert abs(ref.item() - got.item()) < 1e-5


def test_hf_state_dict_round_trip():
    _, ours = _hf_pair()
    again = GPT(TINY)
    again.load_hf_state_dict(ours.to_hf_state_dict())
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_gpt2_small_parameter_count():
    with torch.device("meta"):
        model = GPT(get_preset("gpt2-small"))
    assert model.num_params() == 124_439_808
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(hf_config_from(get_preset("gpt2-small")))
    assert hf.num_parameters() == 124_439_808


def test_tied_embeddings_share_storage():
    model = GPT(TINY)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_kv_cache_matches_full_forward(attn_impl):
    torch.manual_seed(0)
    model = GPT(TINY.with_(attn_impl=attn_impl)).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(TINY, 2, 20)
        parts = [model(idx[:, :7], cache=cache)[0],  # prefill
                 model(idx[:, 7:12], cache=cache)[0]]  # chunked prefill (masked)
        parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(12, 20)]  # decode
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5
    assert cache.nbytes() == 2 * TINY.n_layer * 2 * 20 * TINY.n_head * TINY.head_dim * 4


def test_generate_with_and_without_cache_identical():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 5))
    assert torch.equal(model.generate(idx, 15, greedy=True, use_cache=True),
                       model.generate(idx, 15, greedy=True, use_cache=False))


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


def test_initial_loss_near_uniform():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx, targets = torch.randint(0, TINY.vocab_size, (2, 4, 24))
    _, loss = model(idx, targets)  # small init: close to a uniform guess over the vocab
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.1
