"""Request traces: prompts from real text, long-tailed lengths, arrivals over time.

    trace = make_trace(val_ids, n=48, context=128, rate=200.0)
    trace[0]  # Request(id=0, prompt=[...], max_tokens=31, arrival_s=0.0041)

Served traffic is bursty and long-tailed: arrivals form a Poisson process (exponential gaps at
`rate` requests per second), and prompt and output lengths are log-normal (most short, a few
long), clipped so prompt + output fits the model's context. Prompts are slices of a token
stream (the held-out text), so the model continues real text. Everything is seeded.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from journey_dist.config import ConfigError, GPTConfig


@dataclass
class Request:
    """One generation request: greedy-decode `max_tokens` tokens after `prompt`."""

    id: int
    prompt: list[int]
    max_tokens: int
    arrival_s: float = 0.0
    meta: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return asdict(self)


def validate_request(req: Request, config: GPTConfig, pool_tokens: int | None = None) -> Request:
    """ConfigError naming the problem and the fix for a request that can never be served."""
    if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
        raise ConfigError(f"request {req.id}: max_tokens={req.max_tokens!r} must be a positive integer "
                          f"(the number of tokens to generate); use max_tokens >= 1")
    if not req.prompt:
        raise ConfigError(f"request {req.id}: the prompt is empty; give at least one token "
                          f"(e.g. a start-of-text token) to condition on")
    bad = [t for t in req.prompt if not isinstance(t, int) or not 0 <= t < config.vocab_size]
    if bad:
        raise ConfigError(f"request {req.id}: prompt token {bad[0]!r} is outside the vocabulary "
                          f"[0, {config.vocab_size}); encode the text with the model's tokenizer")
    total = len(req.prompt) + req.max_tokens
    if total > config.block_size:
        raise ConfigError(
            f"request {req.id}: prompt {len(req.prompt)} + max_tokens {req.max_tokens} = {total} tokens "
            f"is longer than the context (block_size={config.block_size}); shorten the prompt to its "
            f"last {max(config.block_size - req.max_tokens, 0)} tokens or lower max_tokens to "
            f"{max(config.block_size - len(req.prompt), 0)}")
    if pool_tokens is not None and total > pool_tokens:
        raise ConfigError(
            f"request {req.id} needs {total} tokens of KV cache but the whole pool holds {pool_tokens}: "
            f"it could never finish, even alone; give the cache more blocks (>= {total} tokens) or "
            f"lower max_tokens")
    if not math.isfinite(req.arrival_s) or req.arrival_s < 0:
        raise ConfigError(f"request {req.id}: arrival_s={req.arrival_s!r} must be a finite time >= 0")
    return req


def lognormal_lengths(rng: random.Random, n: int, median: float, sigma: float, lo: int, hi: int) -> list[int]:
    """n lengths from a log-normal around `median`, rounded and clipped to [lo, hi]."""
    return [min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def make_trace(ids: Sequence[int], n: int, context: int, rate: float, prompt_median: float = 24,
               output_median: float = 32, sigma: float = 0.7, seed: int = 0) -> list[Request]:
    """n requests: prompts cut from `ids` at random offsets, Poisson arrivals at `rate` per second.

    Output lengths are drawn first (1 .. context - 1), then prompts (1 .. context - output), so
    every request fits the context.
    """
    if n < 1 or rate <= 0 or context < 2:
        raise ConfigError(f"make_trace: n={n} requests, rate={rate}/s, context={context}: need n >= 1, "
                          f"rate > 0 and context >= 2")
    if len(ids) < context + 1:
        raise ConfigError(f"make_trace: the token stream has {len(ids)} tokens; prompts need more than "
                          f"the context ({context}): use a longer text")
    rng = random.Random(seed)
    outputs = lognormal_lengths(rng, n, output_median, sigma, 1, context - 1)
    prompts = [lognormal_lengths(rng, 1, prompt_median, sigma, 1, context - out)[0] for out in outputs]
    t, trace = 0.0, []
    for i, (p, out) in enumerate(zip(prompts, outputs)):
        t += rng.expovariate(rate)
        start = rng.randrange(0, len(ids) - p)
        trace.append(Request(i, [int(x) for x in ids[start:start + p]], out, t))
    return trace


def trace_summary(trace: list[Request]) -> str:
    """One line: how many requests over how long, prompt and output lengths, tokens to generate."""
    prompts, outputs = [len(r.prompt) for r in trace], [r.max_tokens for r in trace]
    return (f"{len(trace)} requests over {trace[-1].arrival_s:.2f} s: prompts {min(prompts)}..{max(prompts)} "
            f"tokens (mean {sum(prompts) / len(trace):.0f}), outputs {min(outputs)}..{max(outputs)} "
            f"(mean {sum(outputs) / len(trace):.0f}), {sum(outputs)} tokens to generate")
