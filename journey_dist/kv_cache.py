"""KV cache: the same tokens faster, what it costs in memory, and what paging saves.

    cmp = compare_generation(model, batch=8, prompt_len=16, new_tokens=112)
    cmp.identical, cmp.speedup
    measure_cache_bytes(model, batch=8, tokens=128)     # measured vs kv_cache_bytes(...)
    paged_vs_preallocated(get_preset("gpt2-small"), sample_lengths(256, 1024), max_len=1024)

Without a cache, step t of generation re-runs the model over all t tokens so far, so making
N tokens costs O(N^2) token-forwards. With one (`model.KVCache`, used by `GPT.generate`),
each layer keeps the keys and values of past tokens and a step runs only the new token:
O(N) token-forwards, paid for with memory
    2 (K, V) x layers x batch x tokens x kv_heads x head_dim x bytes
(`memory.estimate.kv_cache_bytes`, the one formula this module uses).

A server that pre-allocates max_len slots for every request wastes the slots a request never
fills. A paged cache (vLLM's PagedAttention) hands out fixed blocks of `block_size` tokens on
demand, so a request wastes at most block_size - 1 slots (its last, partly filled block).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from journey_dist.config import GPTConfig
from journey_dist.memory.estimate import fmt_bytes, kv_cache_bytes
from journey_dist.model import GPT, KVCache
from journey_dist.report import fixed, table


@dataclass
class GenerationComparison:
    batch: int
    prompt_len: int
    new_tokens: int
    identical: bool  # greedy tokens with and without the cache
    seconds_no_cache: float  # wall clock, median over repeats
    seconds_cache: float
    speedup: float
    tokens_per_s_no_cache: float
    tokens_per_s_cache: float
    # CPU time of this process (time.process_time), median over repeats: on a shared CPU it
    # counts the work done rather than the wait for a core (meaningless for CUDA work)
    cpu_seconds_no_cache: float
    cpu_seconds_cache: float
    cpu_speedup: float

    def to_dict(self) -> dict:
        return asdict(self)


def time_generation(model: GPT, prompt: torch.Tensor, new_tokens: int,
                    use_cache: bool) -> tuple[torch.Tensor, float, float]:
    """One greedy generation; returns (tokens (B, T + new), wall seconds, CPU seconds)."""
    _sync(prompt.device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = model.generate(prompt, new_tokens, greedy=True, use_cache=use_cache)
    _sync(prompt.device)
    return out, time.perf_counter() - t0, time.process_time() - c0


def compare_generation(model: GPT, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3,
                       seed: int = 0) -> GenerationComparison:
    """Generate the same greedy continuation with and without the cache; time both.

    Runs alternate (no cache, cache, no cache, ...) so a change in machine load hits both;
    the reported times are medians over `repeats`.
    """
    if prompt_len + new_tokens > model.config.block_size:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds block_size="
                         f"{model.config.block_size}; the cache covers one window only")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).to(device)
    for use_cache in (False, True):  # warm-up: first-call allocations out of the timing
        model.generate(prompt, 2, greedy=True, use_cache=use_cache)
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    outs = {}
    for _ in range(repeats):
        for use_cache in (False, True):
            outs[use_cache], seconds, cpu_seconds = time_generation(model, prompt, new_tokens, use_cache)
            wall[use_cache].append(seconds)
            cpu[use_cache].append(cpu_seconds)
    t_slow, t_fast = statistics.median(wall[False]), statistics.median(wall[True])
    c_slow, c_fast = statistics.median(cpu[False]), statistics.median(cpu[True])
    made = batch * new_tokens
    return GenerationComparison(batch, prompt_len, new_tokens, torch.equal(outs[False], outs[True]),
                                t_slow, t_fast, t_slow / t_fast, made / t_slow, made / t_fast,
                                c_slow, c_fast, c_slow / max(c_fast, 1e-9))


@torch.no_grad()
def cached_logits_max_diff(model: GPT, ids: torch.Tensor, prefill: int) -> float:
    """Max |logits| difference: one full forward vs prefill + one token at a time with a cache."""
    model.eval()
    full, _ = model(ids)
    p = next(model.parameters())
    cache = KVCache(model.config, ids.size(0), ids.size(1), p.device, p.dtype)
    steps = [model(ids[:, :prefill], cache=cache)[0]]
    steps += [model(ids[:, t:t + 1], cache=cache)[0] for t in range(prefill, ids.size(1))]
    return (torch.cat(steps, dim=1) - full).abs().max().item()


@torch.no_grad()
def measure_cache_bytes(model: GPT, batch: int, tokens: int) -> dict:
    """Fill a cache with `tokens` tokens per sequence; its tensors' bytes vs the formula."""
    model.eval()
    p = next(model.parameters())
    cache = KVCache(model.config, batch, tokens, p.device, p.dtype)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), device=p.device)
    model(ids[:, : tokens // 2], cache=cache)  # prefill half, then decode one at a time
    for t in range(tokens // 2, tokens):
        model(ids[:, t:t + 1], cache=cache)
    measured = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    formula = kv_cache_bytes(model.config, batch, tokens, dtype=p.element_size())
    return {"batch": batch, "tokens": tokens, "filled": cache.pos, "dtype": str(p.dtype),
            "measured_bytes": measured, "formula_bytes": formula, "tensors": len(cache.k) + len(cache.v)}


def kv_memory_table(cfg: GPTConfig, batches: Sequence[int], lengths: Sequence[int],
                    dtype: str = "bf16") -> list[dict]:
    """KV-cache bytes for every (batch, context length): the estimate at scale."""
    return [{"batch": b, "tokens": s, "dtype": dtype, "bytes": kv_cache_bytes(cfg, b, s, dtype)}
            for b in batches for s in lengths]


def sample_lengths(n: int, max_len: int, median: float | None = None, sigma: float = 0.8,
                   seed: int = 0) -> list[int]:
    """Request lengths (prompt + output) from a log-normal clipped to [1, max_len].

    Served traffic is long-tailed: most requests are short, a few fill the window. The
    default median is max_len / 8, so with sigma 0.8 about 0.5% of requests hit max_len
    (P(Z > ln 8 / 0.8 = 2.6)); the mean is median x exp(sigma^2 / 2) = 1.38 x median.
    """
    rng = random.Random(seed)
    mu = math.log(median or max_len / 8)
    return [min(max_len, max(1, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def paged_vs_preallocated(cfg: GPTConfig, lengths: Sequence[int], max_len: int, block_size: int = 16,
                          dtype: str = "bf16", budget_bytes: float | None = None) -> dict:
    """Cache bytes for a batch of requests: pre-allocated max_len each, paged, or exact.

    preallocated: every request reserves max_len token slots.
    paged:        every request holds ceil(len / block_size) blocks of block_size slots.
    With `budget_bytes`, also how many such requests fit at once under each scheme.
    """
    per_token = kv_cache_bytes(cfg, 1, 1, dtype)
    used = sum(lengths)
    paged_slots = sum(math.ceil(n / block_size) * block_size for n in lengths)
    prealloc_slots = len(lengths) * max_len
    out = {
        "requests": len(lengths), "max_len": max_len, "block_size": block_size, "dtype": dtype,
        "bytes_per_token": per_token, "mean_len": used / len(lengths),
        "needed_bytes": used * per_token,
        "preallocated_bytes": prealloc_slots * per_token,
        "paged_bytes": paged_slots * per_token,
        "preallocated_waste": 1 - used / prealloc_slots,
        "paged_waste": 1 - used / paged_slots,
        "saving": 1 - paged_slots / prealloc_slots,
    }
    if budget_bytes is not None:
        out["budget_bytes"] = budget_bytes
        out["fit_preallocated"] = int(budget_bytes // (max_len * per_token))
        out["fit_paged"] = int(budget_bytes // (paged_slots / len(lengths) * per_token))
    return out


def token_forwards(prompt_len: int, new_tokens: int) -> dict[str, int]:
    """Token positions run through the model to generate `new_tokens` after a prompt: without a
    cache step t re-runs all P + t tokens; with one the prompt once, then one token per step."""
    return {"without_cache": sum(prompt_len + t for t in range(new_tokens)),
            "with_cache": prompt_len + new_tokens - 1}


# ----------------------------------------------------------------------------- text (lab 09)


def speed_table(speed: Sequence[dict]) -> str:
    """GenerationComparison.to_dict() rows: seconds without and with the cache, both speedups, the
    cached tokens per second, and whether the greedy tokens were identical."""
    return table(speed, [("batch", "batch", str), ("seconds_no_cache", "no cache s", fixed(2)),
                         ("seconds_cache", "cache s", fixed(2)), ("speedup", "speedup", fixed(1)),
                         ("cpu_speedup", "CPU-time speedup", fixed(1)),
                         ("tokens_per_s_cache", "tokens/s (cache)", fixed(0)),
                         ("identical", "same tokens", lambda x: "yes" if x else "NO")])


def cache_bytes_table(rows: Sequence[dict]) -> str:
    """measure_cache_bytes rows: the cache's tensors' bytes next to the formula."""
    rows = [{**r, "equal": r["measured_bytes"] == r["formula_bytes"]} for r in rows]
    return table(rows, [("batch", "batch", str), ("tokens", "tokens", str),
                        ("measured_bytes", "cache bytes (its K, V tensors)", "{:,}".format),
                        ("formula_bytes", "2 x L x B x S x H x D x bytes", "{:,}".format),
                        ("equal", "equal", lambda x: "yes" if x else "NO")])


def scale_table(rows: Sequence[dict], weight_bytes: int) -> str:
    """kv_memory_table rows: the cache's bytes per token, then per (batch, tokens) its bytes and how
    many times `weight_bytes` (the model's weights) that is."""
    first = rows[0]
    per_token = first["bytes"] // (first["batch"] * first["tokens"])
    head = f"KV cache {fmt_bytes(per_token)} per token ({first['dtype']}), weights {fmt_bytes(weight_bytes)}"
    body = table([{**r, "cache": fmt_bytes(r["bytes"]), "x": r["bytes"] / weight_bytes} for r in rows],
                 [("batch", "batch", str), ("tokens", "tokens", str), ("cache", "KV cache", str),
                  ("x", "x the weights", fixed(1))])
    return f"{head}\n{body}"


def paging_table(paged: dict, lengths: Sequence[int]) -> str:
    """paged_vs_preallocated's result for `lengths`: the sample, then the bytes and waste of each
    scheme and how many such requests fit in its budget."""
    head = (f"{len(lengths)} requests (lengths: median {statistics.median_high(lengths)}, mean "
            f"{paged['mean_len']:.0f}, max {max(lengths)}), window {paged['max_len']}, {paged['dtype']}: "
            f"paging saves {paged['saving']:.0%}")
    rows = [{"scheme": "needed (tokens actually held)", "bytes": paged["needed_bytes"]},
            {"scheme": "pre-allocated max_len each", "bytes": paged["preallocated_bytes"],
             "waste": paged["preallocated_waste"], "fit": paged.get("fit_preallocated")},
            {"scheme": f"paged, {paged['block_size']}-token blocks", "bytes": paged["paged_bytes"],
             "waste": paged["paged_waste"], "fit": paged.get("fit_paged")}]
    body = table(rows, [("scheme", "scheme", str), ("bytes", "cache", fmt_bytes),
                        ("waste", "waste", lambda x: "-" if x is None else f"{x:.1%}"),
                        ("fit", f"requests in {fmt_bytes(paged.get('budget_bytes', 0))}",
                         lambda x: "-" if x is None else f"{x:,}")])
    return f"{head}\n{body}"

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
