"""KV cache: same tokens and logits as recomputing, linear work, bytes = formula, paging."""

import math

import pytest
import torch

from journey_dist.config import get_preset
from journey_dist.kv_cache import (
    cache_bytes_table,
    cached_logits_max_diff,
    compare_generation,
    kv_memory_table,
    measure_cache_bytes,
    paged_vs_preallocated,
    paging_table,
    sample_lengths,
    scale_table,
    speed_table,
    token_forwards,
)
from journey_dist.memory.estimate import fmt_bytes, kv_cache_bytes
from journey_dist.model import GPT
from tests.labs import run_lab

# GPT-2 layout, and Llama's at tiny size (4 query heads on 2 cached kv heads, RoPE, SwiGLU)
FAMILIES = {"gpt2": get_preset("tiny"),
            "llama": get_preset("llama-mini", n_layer=2, n_embd=32, mlp_hidden=64, block_size=32)}


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("tiny")).eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_identical_with_and_without_cache(family, batch):
    torch.manual_seed(0)
    model = GPT(FAMILIES[family]).eval()
    cmp = compare_generation(model, batch=batch, prompt_len=5, new_tokens=20, repeats=1)
    assert cmp.identical
    assert cmp.seconds_cache > 0 and cmp.seconds_no_cache > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_cached_logits_equal_full_forward(family, attn_impl):
    torch.manual_seed(0)
    model = GPT(FAMILIES[family].with_(attn_impl=attn_impl))
    ids = torch.randint(0, 256, (2, 30))
    assert cached_logits_max_diff(model, ids, prefill=7) < 1e-5  # fp32 rounding only


def test_cache_makes_generation_linear_not_quadratic(tiny):
    # count token positions fed through the model: the cache turns sum_t (P + t) into P + N - 1
    seen = []
    hook = tiny.transformer.wte.register_forward_hook(lambda m, inp, out: seen.append(inp[0].size(1)))
    prompt, new = torch.zeros(1, 4, dtype=torch.long), 20
    try:
        tiny.generate(prompt, new, greedy=True, use_cache=True)
        with_cache = sum(seen)
        seen.clear()
        tiny.generate(prompt, new, greedy=True, use_cache=False)
        without = sum(seen)
    finally:
        hook.remove()
    assert with_cache == 4 + new - 1
    assert without == sum(4 + t for t in range(new))
    assert token_forwards(4, new) == {"without_cache": without, "with_cache": with_cache}  # lab 09 prints it


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_cache_bytes_equal_formula(family, dtype):
    torch.manual_seed(0)
    model = GPT(FAMILIES[family]).to(dtype)
    m = measure_cache_bytes(model, batch=3, tokens=24)
    cfg = model.config
    heads = {"gpt2": 4, "llama": 2}[family]  # GQA caches its kv heads only
    by_hand = 2 * cfg.n_layer * 3 * 24 * heads * cfg.head_dim * (4 if dtype == torch.float32 else 2)
    assert m["measured_bytes"] == m["formula_bytes"] == by_hand
    assert m["filled"] == 24 and m["tensors"] == 2 * cfg.n_layer


def test_gpt2_small_kv_cache_at_scale():
    cfg = get_preset("gpt2-small")
    rows = kv_memory_table(cfg, batches=[1, 64], lengths=[1024, 8192], dtype="bf16")
    per_token = 2 * 12 * 768 * 2  # K and V, 12 layers, 768 channels, 2 bytes
    assert per_token == 36_864
    assert {(r["batch"], r["tokens"]): r["bytes"] for r in rows} == {
        (b, s): b * s * per_token for b in (1, 64) for s in (1024, 8192)}
    assert rows[-1]["bytes"] == 19_327_352_832  # 18 GiB: more than the weights (0.25 GB) x 70


def test_paged_vs_preallocated_by_hand():
    cfg = get_preset("gpt2-small")
    r = paged_vs_preallocated(cfg, [1, 16, 17, 100], max_len=128, block_size=16, dtype="bf16",
                              budget_bytes=1e9)
    per_token = kv_cache_bytes(cfg, 1, 1, "bf16")
    assert r["needed_bytes"] == 134 * per_token
    assert r["paged_bytes"] == (16 + 16 + 32 + 112) * per_token
    assert r["preallocated_bytes"] == 4 * 128 * per_token
    assert math.isclose(r["saving"], 1 - 176 / 512)
    assert r["fit_paged"] > r["fit_preallocated"] == int(1e9 // (128 * per_token))


def test_lab09_tables_carry_the_numbers(tiny):
    cfg = get_preset("gpt2-small")
    lengths = [1, 16, 17, 100]
    r = paged_vs_preallocated(cfg, lengths, max_len=128, block_size=16, dtype="bf16", budget_bytes=1e9)
    head, _, needed, pre, paged = paging_table(r, lengths).splitlines()
    assert needed.split()[-4:] == [*fmt_bytes(r["needed_bytes"]).split(), "-", "-"]
    assert head.startswith("4 requests (lengths: median 17, mean 34, max 100), window 128, bf16")
    assert pre.split()[-4:] == [*fmt_bytes(r["preallocated_bytes"]).split(), f"{r['preallocated_waste']:.1%}",
                                f"{r['fit_preallocated']:,}"]
    assert paged.split()[-3:] == [fmt_bytes(r["paged_bytes"]).split()[1], f"{r['paged_waste']:.1%}",
                                  f"{r['fit_paged']:,}"]
    rows = kv_memory_table(cfg, batches=[1], lengths=[1024, 8192], dtype="bf16")
    scale = scale_table(rows, weight_bytes=2**30).splitlines()
    assert scale[0] == "KV cache 36.00 KiB per token (bf16), weights 1.00 GiB"
    assert scale[-1].split()[-1] == f"{8192 * 36_864 / 2**30:.1f}"  # the cache over the weights
    m = measure_cache_bytes(tiny, batch=2, tokens=8)
    assert [line.split() for line in cache_bytes_table([m, {**m, "formula_bytes": 1}]).splitlines()[1:]] == [
        ["2", "8", f"{m['measured_bytes']:,}", f"{m['formula_bytes']:,}", "yes"],
        ["2", "8", f"{m['measured_bytes']:,}", "1", "NO"]]
    same = compare_generation(tiny, batch=1, prompt_len=3, new_tokens=4, repeats=1).to_dict()
    assert speed_table([same, {**same, "identical": False}]).split()[-1] == "NO"


def test_paging_wastes_under_one_block_per_request():
    lengths = sample_lengths(2000, 2048, seed=1)
    assert min(lengths) >= 1 and max(lengths) <= 2048 and lengths == sample_lengths(2000, 2048, seed=1)
    r = paged_vs_preallocated(get_preset("gpt2-small"), lengths, max_len=2048, block_size=16)
    wasted_slots = (r["paged_bytes"] - r["needed_bytes"]) / r["bytes_per_token"]
    assert wasted_slots < 16 * len(lengths)
    assert r["preallocated_waste"] > 0.6 and r["paged_waste"] < 0.1 and r["saving"] > 0.6


@pytest.mark.slow
def test_lab_09_runs(tmp_path):
    _, result = run_lab("09_kv_cache", "--preset", "tiny", "--batches", "1", "2", "--prompt", "4",
                        "--new", "12", "--repeats", "1", "--requests", "50", "--max-len", "256",
                        runs_dir=tmp_path, timeout_s=300)
    assert all(r["identical"] for r in result["speed"]) and result["logit_max_diff"] < 1e-4
    assert all(m["measured_bytes"] == m["formula_bytes"] for m in result["cache_bytes"])
    assert result["paged"]["paged_bytes"] < result["paged"]["preallocated_bytes"]
