"""Serving: paged attention reads K/V through block tables, continuous and static batching give
one-request-at-a-time greedy tokens (with preemption), bad requests are refused, quantization."""

import copy
import random

import pytest
import torch

from journey_dist.config import ConfigError, get_preset
from journey_dist.data import load_tokens
from journey_dist.model import GPT, KVCache
from journey_dist.plots import kv_memory_plot
from journey_dist.serving.blocks import BlockManager, PagedKVCache
from journey_dist.serving.paged import AttentionGroup, build_batch, paged_attention, paged_forward
from journey_dist.serving.quant import (
    QuantLinear,
    model_bytes,
    pack_int4,
    quantization_table,
    quantize_absmax,
    quantize_model,
    quantized_weight_bytes,
    relative_weight_error,
    unpack_int4,
)
from journey_dist.serving.scheduler import ServingEngine, batching_table, reference_outputs
from journey_dist.serving.tp import tp_table
from journey_dist.serving.trace import Request, make_trace, trace_summary
from tests.families import FAMILIES
from tests.families import tiny as tiny_config

TINY = get_preset("tiny")  # 2 layers, 4 heads, head_dim 8, context 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matmuls gain nothing from threads, and on a busy 2-core machine two threads ran these
    # tests 7x slower than one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


@pytest.fixture(scope="module")
def trace() -> list[Request]:
    ids = load_tokens("handbook").val.tolist()
    return make_trace(ids, 12, TINY.block_size, rate=2000.0, prompt_median=6, output_median=8, seed=1)


@pytest.fixture(scope="module")
def reference(tiny, trace) -> dict[int, list[int]]:
    return reference_outputs(tiny, trace)


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_forward_equals_contiguous_cache_in_chunks(family):
    # three requests of different lengths, prefilled in chunks then decoded, blocks interleaved
    # in the pool; every step's last-token logits equal GPT.forward with its contiguous KVCache
    # (llama: q/k/v_proj with 2 kv heads for 4 query heads, RoPE at each token's own position)
    config = tiny_config(family)
    torch.manual_seed(0)
    tiny = GPT(config).eval()
    torch.manual_seed(1)
    seqs = {0: torch.randint(0, 256, (20,)), 1: torch.randint(0, 256, (9,)), 2: torch.randint(0, 256, (14,))}
    cuts = {0: [7, 15, 16, 17, 18, 19, 20], 1: [3, 9], 2: [14]}
    blocks, cache = BlockManager(32, 4), PagedKVCache(config, 32, 4)
    caches = {r: KVCache(config, 1, 32) for r in seqs}
    done, worst = {r: 0 for r in seqs}, 0.0
    for step in range(max(len(c) for c in cuts.values())):
        plan = []
        for r, c in cuts.items():
            if step < len(c):
                assert blocks.ensure(r, c[step])
                plan.append((r, seqs[r][done[r]:c[step]].tolist(), done[r]))
        plan.sort(key=lambda p: len(p[1]) > 1)
        logits = paged_forward(tiny, cache, build_batch(plan, blocks))
        for (r, chunk, start), row in zip(plan, logits):
            want, _ = tiny(torch.tensor([chunk]), cache=caches[r])
            worst = max(worst, (want[0, -1] - row).abs().max().item())
            done[r] = start + len(chunk)
    assert worst < 1e-5
    assert len({b for t in blocks.tables.values() for b in t}) == sum(len(t) for t in blocks.tables.values())


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_paged_attention_reads_through_the_block_table(kv_heads):
    # the pool is shuffled: request s's tokens sit in scattered blocks named by its table
    torch.manual_seed(0)
    H, D, bs, n_blocks = 4, 8, 4, 12
    lengths, chunk = [10, 5, 7], [1, 5, 3]  # context after this step; queries run now
    pool_k, pool_v = torch.randn(n_blocks, bs, kv_heads, D), torch.randn(n_blocks, bs, kv_heads, D)
    order = random.Random(0).sample(range(n_blocks), n_blocks)
    tables, used = [], 0
    for n in lengths:
        need = -(-n // bs)
        tables.append(order[used:used + need])
        used += need
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    group = AttentionGroup(0, sum(chunk), padded, torch.zeros(3, max(chunk), dtype=torch.long),
                           torch.zeros(3, max(chunk), dtype=torch.bool))
    for s, (n, c) in enumerate(zip(lengths, chunk)):
        group.query_pos[s, :c] = torch.arange(n - c, n)
        group.query_valid[s, :c] = True
    q = torch.randn(sum(chunk), H, D)
    gathered = lambda pk, pv: (pk.index_select(0, group.block_tables.flatten()).view(3, -1, kv_heads, D),  # noqa: E731
                               pv.index_select(0, group.block_tables.flatten()).view(3, -1, kv_heads, D))
    got = paged_attention(q, *gathered(pool_k, pool_v), group)
    want, row = [], 0
    for s, (n, c) in enumerate(zip(lengths, chunk)):  # each request alone, its K/V made contiguous
        k = torch.cat([pool_k[b] for b in tables[s]])[:n].transpose(0, 1).repeat_interleave(H // kv_heads, 0)
        v = torch.cat([pool_v[b] for b in tables[s]])[:n].transpose(0, 1).repeat_interleave(H // kv_heads, 0)
        qs = q[row:row + c].transpose(0, 1)  # (H, c, D)
        mask = torch.arange(n)[None, :] <= torch.arange(n - c, n)[:, None]
        att = (qs @ k.transpose(-1, -2) / D ** 0.5).masked_fill(~mask, float("-inf")).softmax(-1)
        want.append((att @ v).transpose(0, 1))
        row += c
    assert (got - torch.cat(want)).abs().max() < 1e-5
    # a block outside every table changes nothing; a block inside one changes that request only
    spare = order[used]
    pool_v2 = pool_v.clone()
    pool_v2[spare] += 100
    assert torch.equal(paged_attention(q, *gathered(pool_k, pool_v2), group), got)
    pool_v2[tables[1][0]] += 100
    moved = (paged_attention(q, *gathered(pool_k, pool_v2), group) - got).abs().amax(dim=(1, 2))
    assert moved[1:6].min() > 0 and moved[:1].max() == 0 and moved[6:].max() == 0


@pytest.mark.parametrize("policy,num_blocks,max_seqs", [("static", 16, 4), ("continuous", 64, 8),
                                                        ("continuous", 9, 8)],
                         ids=["static", "continuous", "continuous-preempting"])
def test_batched_outputs_equal_one_request_at_a_time(tiny, trace, reference, policy, num_blocks, max_seqs):
    engine = ServingEngine(tiny, num_blocks=num_blocks, block_size=4, policy=policy, max_seqs=max_seqs,
                           max_batched_tokens=24, check_invariants=True)
    result = engine.run(trace)
    assert result.outputs == reference
    s = result.summary()
    assert s["generated_tokens"] == sum(r.max_tokens for r in trace)
    assert engine.blocks.num_free == num_blocks  # everything returned
    if policy == "continuous":
        assert s["mixed_steps"] > 0  # prefill chunks and decode tokens in one batch
        assert (s["preemptions"] > 0) == (num_blocks == 9)  # 9 blocks: too few for 8 requests
    else:
        assert s["mixed_steps"] == 0 and s["preemptions"] == 0


def test_memory_used_never_exceeds_reserved(tiny, trace):
    for policy in ("static", "continuous"):
        r = ServingEngine(tiny, num_blocks=16, block_size=4, policy=policy, max_seqs=8).run(trace)
        for step in r.steps:
            assert step["kv_used_tokens"] <= step["kv_reserved_tokens"] <= 16 * 4
        if policy == "static":  # each admitted request holds a whole context window (32 tokens)
            assert {s["kv_reserved_tokens"] for s in r.steps} <= {32, 64}
        else:  # paged: at most one partly filled block per request
            assert all(s["kv_reserved_tokens"] - s["kv_used_tokens"] < 4 * max(s["requests"], 1)
                       for s in r.steps)


def test_a_write_touches_only_its_own_blocks():
    blocks, cache = BlockManager(6, 4), PagedKVCache(TINY, 6, 4)
    assert blocks.ensure(0, 7) and blocks.ensure(1, 5)  # request 0: 2 blocks, request 1: 2 blocks
    assert not blocks.ensure(2, 12) and 2 not in blocks.tables and blocks.num_free == 2  # all or nothing
    before = cache.k[0].clone()
    slots = blocks.slots(0, torch.arange(0, 7))
    cache.write(0, slots, torch.ones(7, 4, 8), torch.ones(7, 4, 8))
    changed = {b for b in range(6) if not torch.equal(cache.k[0][b], before[b])}
    assert changed == set(blocks.tables[0])
    blocks.free(0)
    assert blocks.ensure(3, 8) and blocks.tables[3] != blocks.tables[1]
    blocks.check()


BAD_REQUESTS = {
    "longer than the context": (Request(0, [1] * 30, 5),
                                r"longer than the context.*block_size=32.*lower max_tokens"),
    "longer than the whole pool": (Request(0, [1] * 10, 10), r"whole pool holds 16.*more blocks"),
    "zero max tokens": (Request(0, [1, 2], 0), r"max_tokens=0 must be a positive integer"),
    "negative max tokens": (Request(0, [1, 2], -3), r"max_tokens=-3 must be a positive integer"),
    "empty prompt": (Request(0, [], 4), r"prompt is empty"),
    "token outside the vocabulary": (Request(0, [1, 300], 4), r"300.*outside the vocabulary"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_are_refused_before_any_step(tiny, name):
    req, pattern = BAD_REQUESTS[name]
    engine = ServingEngine(tiny, num_blocks=4, block_size=4)
    with pytest.raises(ConfigError, match=pattern):
        engine.run([Request(1, [5, 6], 3), req])
    assert engine.blocks.num_free == 4 and not engine.blocks.tables


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(num_blocks=0), r"num_blocks=0 must be a positive integer"),
    (dict(num_blocks=4, policy="fifo"), r"policy='fifo'"),
    (dict(num_blocks=4, max_seqs=0), r"max_seqs=0"),
    (dict(num_blocks=4, policy="static"), r"reserves a full window.*num_blocks >= 8"),
    (dict(num_blocks=4, clock="sundial"), r"clock='sundial'; use one of \('wall', 'cpu'\)"),
])
def test_bad_engine_settings(tiny, kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ServingEngine(tiny, block_size=4, **kwargs)


def test_a_model_paged_attention_cannot_run_is_refused_up_front(tiny):
    wrapped = copy.deepcopy(tiny)
    for block in wrapped.transformer.h:  # e.g. a tensor-parallel copy's attention: not the plain one
        block.attn = torch.nn.Identity()
    with pytest.raises(ConfigError, match=r"paged serving runs the plain GPT's blocks; Identity is not one"):
        ServingEngine(wrapped, num_blocks=8, block_size=4)
    alibi = GPT(tiny_config("llama", positions="alibi"))
    with pytest.raises(ConfigError, match=r"positions='alibi': paged attention here adds no distance bias"):
        ServingEngine(alibi, num_blocks=8, block_size=4)


def test_trace_is_seeded_and_fits_the_context():
    ids = list(range(256)) * 4
    a, b = make_trace(ids, 50, 32, rate=10.0, seed=3), make_trace(ids, 50, 32, rate=10.0, seed=3)
    assert a == b and a != make_trace(ids, 50, 32, rate=10.0, seed=4)
    assert all(len(r.prompt) + r.max_tokens <= 32 and r.max_tokens >= 1 for r in a)
    times = [r.arrival_s for r in a]
    assert times == sorted(times) and 0.7 < times[-1] * 10 / 50 < 1.3  # Poisson: ~ n / rate seconds


@pytest.mark.parametrize("bits,group", [(8, None), (4, 8)])
def test_quantized_codes_within_half_a_step_and_bytes_equal_formula(tiny, bits, group):
    w = torch.randn(12, 16)
    codes, scales = quantize_absmax(w, bits, group)
    step = scales.repeat_interleave(group or 16, dim=1)
    assert ((codes.float() * step - w).abs() <= step / 2 + 1e-7).all()
    assert codes.abs().max() == 2 ** (bits - 1) - 1  # the largest weight of a channel/group hits qmax
    q = quantize_model(tiny, bits, group)
    assert model_bytes(q) == quantized_weight_bytes(TINY, bits, group) < model_bytes(tiny)
    assert 0 < relative_weight_error(tiny, q) < (0.01 if bits == 8 else 0.15)
    assert all(p.dtype == torch.float32 for p in tiny.parameters())  # the original is untouched
    llama = GPT(tiny_config("llama"))  # q/k/v/o_proj (2 kv heads), gate/up/down_proj, untied head
    q = quantize_model(llama, bits, group)
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 7 * llama.config.n_layer
    assert model_bytes(q) == quantized_weight_bytes(llama.config, bits, group) < model_bytes(llama)


def test_int4_packing_round_trips():
    codes = torch.randint(-8, 8, (5, 16), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 8)
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("bits,group,pattern", [(3, None, r"bits=3"), (4, None, r"int4 needs a group_size"),
                                                (4, 12, r"group_size=12 does not divide")])
def test_bad_quantization_settings(bits, group, pattern):
    with pytest.raises(ConfigError, match=pattern):
        quantize_absmax(torch.randn(4, 32), bits, group)


@pytest.mark.slow  # importing torchao takes seconds
@pytest.mark.parametrize("bits,group", [(8, None), (4, 16)])
def test_full_range_codes_equal_torchao_and_default_within_one_step(tiny, bits, group):
    from journey_dist.serving.quant import compare_with_torchao, torchao_available, torchao_quantize

    assert torchao_available(), "torchao is part of the [test] extra: pip install torchao --no-deps"
    ids = torch.randint(0, 256, (2, 16))
    theirs = torchao_quantize(tiny, bits, group)
    same = compare_with_torchao(quantize_model(tiny, bits, group, full_range=True), theirs, ids)
    assert same["codes_differ"] == 0 and same["max_weight_diff_steps"] == 0 and same["max_logit_diff"] < 1e-5
    ours = compare_with_torchao(quantize_model(tiny, bits, group), theirs, ids)
    assert 0 < ours["codes_differ"] < 0.5 and ours["max_code_diff"] == 1
    # torchao's layout: one byte per code (int4 unpacked), fp32 scale and int8 zero point per scale
    assert model_bytes(theirs) == quantized_weight_bytes(TINY, bits, group, code_bytes=1, zero_point_bytes=1)


def test_the_tables_lab_13_prints(tmp_path):
    """Lab 13's tables from the rows the package returns: each number where its header says."""
    run = {"tokens_per_s": 500.0, "ttft_s": {"p50": 0.011, "p90": 0.052},
           "itl_s": {"p50": 0.0021, "p99": 0.0093}, "mean_requests_per_step": 2.25, "mixed_steps": 3,
           "preemptions": 1, "kv_used_over_reserved": 0.4,
           "identical": True, "kv_timeline": [(0.0, 16, 32), (0.1, 24, 32)]}
    runs = {"static": run, "continuous": {**run, "tokens_per_s": 1000.0, "identical": False}}
    lines = batching_table(runs).splitlines()
    assert lines[0].split()[:3] == ["tok/s", "vs", "static"]
    assert lines[1].split() == ["static", "500", "1.00x", "0.01/0.05", "2.1/9.3", "2.2", "3", "1", "40%",
                                "yes"]
    assert lines[2].split()[1:3] == ["1000", "2.00x"] and lines[2].endswith("NO")
    assert kv_memory_plot(runs, tmp_path / "kv.png").read_bytes()[:4] == b"\x89PNG"
    rank = {"rank": 1, "heads_per_rank": 2, "weight_bytes": 2048, "weight_bytes_formula": 2048,
            "weight_bytes_one_process": 4096, "cache_bytes_per_rank": 512, "cache_bytes_formula": 512,
            "cache_bytes_one_process": 1024, "greedy_identical": True, "max_logit_diff": 1.5e-7}
    assert tp_table([rank]).splitlines()[1].split() == [
        "1", "2", "2.00", "KiB", "2.00", "KiB", "4.00", "KiB", "512", "B", "512", "B", "1.00", "KiB", "yes",
        "1.5e-07"]
    rows = {"fp32": {"weight_bytes": 4096, "formula_bytes": 4096, "bytes_vs_fp32": 1.0, "perplexity": 10.0,
                     "perplexity_vs_fp32": 0.0},
            "int8": {"weight_bytes": 1024, "formula_bytes": 1024, "bytes_vs_fp32": 0.25, "perplexity": 10.1,
                     "perplexity_vs_fp32": 0.01, "relative_weight_error": 0.005}}
    quant = {"rows": rows, "held_out_tokens": 99, "torchao": "not asked for", "agreement": {},
             "noise": {"relative_std": 1.0, "perplexity": 12.0, "perplexity_vs_fp32": 0.2}}
    text = quantization_table(quant).splitlines()
    assert text[3].split() == ["int8", "1.00", "KiB", "1.00", "KiB", "25.0%", "10.100", "+1.00%", "0.50%"]
    assert text[-1].endswith("gives perplexity 12.000 (+20.00%)")
    trace = [Request(0, [1, 2, 3], 4, 0.0), Request(1, [5], 2, 0.5)]
    assert trace_summary(trace) == ("2 requests over 0.50 s: prompts 1..3 tokens (mean 2), outputs 2..4 "
                                    "(mean 3), 6 tokens to generate")
