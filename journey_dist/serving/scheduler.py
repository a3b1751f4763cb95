"""A serving engine: requests arrive over time, a scheduler forms each step's batch, the model
runs it over the paged KV cache (serving/paged.py), tokens and timings come out.

    engine = ServingEngine(model, num_blocks=64, block_size=16, policy="continuous")
    result = engine.run(trace)          # trace: list[Request] (serving/trace.py)
    result.outputs[req_id]              # the generated tokens (greedy)
    result.summary()                    # tokens/s, TTFT and inter-token percentiles, KV used/reserved

Two policies on the same kernels, so only the scheduling differs:

* "static": when the previous batch has finished, take up to `max_seqs` arrived requests (as
  many as fit when each reserves a full context window of cache, as a server with a contiguous
  (B, max_len) cache must), prefill them in one step and decode until the last one finishes.
  New arrivals wait for the whole batch; the window a short request reserved sits unused.
* "continuous" (in-flight, iteration-level batching: Orca; vLLM v1's scheduler): every step takes
  up to `max_batched_tokens` tokens: first one decode token for each running request (a prompt
  still being prefilled takes the next chunk of it), then new requests' prompts (chunked prefill)
  while the budget, `max_seqs` and free blocks allow. Blocks are allocated as a request grows.
  When a running request needs a block and none is free, the most recently admitted request is
  preempted by recomputation (vLLM's default, PreemptionMode.RECOMPUTE): its blocks are freed,
  it goes back to the front of the queue and, when readmitted, prefills its prompt and the
  tokens it had generated, then continues; the greedy tokens are unchanged.

Time: a step's cost is measured (wall time, or this process's CPU time: `Clock`); when nothing is
queued or running, the clock jumps to the next arrival instead of sleeping (so idle gaps cost no
real time and tokens/s stays honest: tokens / (last finish - first arrival) on that clock).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from journey_dist.config import ConfigError
from journey_dist.model import GPT, next_token
from journey_dist.report import fixed, table
from journey_dist.serving.blocks import BlockManager, PagedKVCache
from journey_dist.serving.paged import build_batch, check_model, paged_forward
from journey_dist.serving.trace import Request, validate_request

POLICIES = ("continuous", "static")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class Clock:
    """Seconds since start: measured time plus idle gaps skipped to the next arrival.

    "wall": wall-clock time. "cpu": this process's CPU time, which on a shared machine counts the
    engine's work and not its waits for a core (with torch on one thread it equals wall time on
    an idle machine; with more threads it adds theirs up, so use it with one).
    """

    def __init__(self, kind: str = "wall") -> None:
        if kind not in CLOCKS:
            raise ConfigError(f"clock={kind!r}; use one of {tuple(CLOCKS)}")
        self.read = CLOCKS[kind]
        self.start, self.skipped = self.read(), 0.0

    def now(self) -> float:
        return self.read() - self.start + self.skipped

    def skip_to(self, t: float) -> None:
        self.skipped += max(0.0, t - self.now())


@dataclass
class SeqState:
    """A request being served: its tokens so far and how many of them are in the cache."""

    req: Request
    tokens: list[int]  # prompt + generated
    computed: int = 0  # tokens whose K/V are in the cache
    token_times: list[float] = field(default_factory=list)
    preemptions: int = 0
    finish_s: float | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.req.prompt):]

    @property
    def done(self) -> bool:
        return len(self.tokens) - len(self.req.prompt) >= self.req.max_tokens


@dataclass
class ServeResult:
    policy: str
    outputs: dict[int, list[int]]  # request id -> generated tokens
    requests: list[dict]  # per request: arrival, first token, finish, token times, preemptions
    steps: list[dict]  # per step: time, tokens run (prefill/decode), requests, KV used/reserved
    pool_bytes: int
    bytes_per_token: int
    settings: dict

    def summary(self) -> dict:
        """tokens/s, TTFT, inter-token latency and end-to-end percentiles, KV memory used vs reserved."""
        return summarize(self)

    def to_dict(self) -> dict:
        return {"policy": self.policy, "settings": self.settings, "summary": self.summary(),
                "requests": self.requests}


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """{'p50': ..., ...}, linear interpolation (numpy's default); NaN for no values."""
    if not values:
        return {f"p{q}": float("nan") for q in qs}
    return {f"p{q}": float(np.percentile(values, q)) for q in qs}


def summarize(r: ServeResult) -> dict:
    reqs = r.requests
    made = sum(len(x["token_times"]) for x in reqs)
    span = max(x["finish_s"] for x in reqs) - min(x["arrival_s"] for x in reqs)
    ttft = [x["token_times"][0] - x["arrival_s"] for x in reqs]
    gaps = [b - a for x in reqs for a, b in zip(x["token_times"], x["token_times"][1:])]
    e2e = [x["finish_s"] - x["arrival_s"] for x in reqs]
    busy = [s for s in r.steps if s["tokens"]]
    used = [s["kv_used_tokens"] * r.bytes_per_token for s in busy]
    reserved = [s["kv_reserved_tokens"] * r.bytes_per_token for s in busy]
    return {
        "requests": len(reqs), "generated_tokens": made, "seconds": span, "tokens_per_s": made / span,
        "steps": len(busy), "mean_requests_per_step": float(np.mean([s["requests"] for s in busy])),
        "prefill_tokens": sum(s["prefill_tokens"] for s in busy),
        "decode_tokens": sum(s["decode_tokens"] for s in busy),
        "mixed_steps": sum(1 for s in busy if s["prefill_tokens"] and s["decode_tokens"]),
        "preemptions": sum(x["preemptions"] for x in reqs),
        "ttft_s": percentiles(ttft), "itl_s": percentiles(gaps), "e2e_s": percentiles(e2e),
        "kv_pool_bytes": r.pool_bytes,
        "kv_used_mean_bytes": float(np.mean(used)), "kv_reserved_mean_bytes": float(np.mean(reserved)),
        "kv_used_peak_bytes": max(used), "kv_reserved_peak_bytes": max(reserved),
        "kv_used_over_reserved": float(np.sum(used) / np.sum(reserved)),
    }


class ServingEngine:
    """Greedy generation for a trace of requests under a batching policy (see the module docstring)."""

    def __init__(self, model: GPT, num_blocks: int, block_size: int = 16, policy: str = "continuous",
                 max_seqs: int = 16, max_batched_tokens: int = 256, clock: str = "wall",
                 check_invariants: bool = False):
        if policy not in POLICIES:
            raise ConfigError(f"policy={policy!r}; use one of {POLICIES}")
        for name, value in (("max_seqs", max_seqs), ("max_batched_tokens", max_batched_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer (requests per step / "
                                  f"tokens per step; e.g. 16 and 256)")
        check_model(model)
        self.model, self.config = model.eval(), model.config
        p = next(model.parameters())
        self.device = p.device
        self.cache = PagedKVCache(self.config, num_blocks, block_size, p.device, p.dtype)
        self.blocks = BlockManager(num_blocks, block_size)
        self.policy, self.max_seqs, self.max_batched_tokens = policy, max_seqs, max_batched_tokens
        self.check_invariants, self.clock = check_invariants, clock
        Clock(clock)  # a bad name fails here, before any request
        window = self.blocks.blocks_for(self.config.block_size)
        if policy == "static" and num_blocks < window:
            raise ConfigError(f"static batching reserves a full window ({self.config.block_size} tokens = "
                              f"{window} blocks) per request but the pool has {num_blocks} blocks; "
                              f"use num_blocks >= {window}")

    # ------------------------------------------------------------------ scheduling

    def _preempt(self, seq: SeqState, running: list[SeqState], waiting: deque) -> None:
        self.blocks.free(seq.req.id)
        running.remove(seq)
        seq.computed = 0  # recompute: its prompt and generated tokens are prefilled again
        seq.preemptions += 1
        waiting.appendleft(seq)

    def _schedule_continuous(self, running: list[SeqState], waiting: deque) -> list[tuple[SeqState, int]]:
        budget, plan, preempted = self.max_batched_tokens, [], False
        for seq in list(running):
            if budget == 0:
                break
            if seq not in running:  # preempted below as a victim of an earlier request
                continue
            n = min(len(seq.tokens) - seq.computed, budget)
            while not self.blocks.ensure(seq.req.id, seq.computed + n):
                victim = running[-1]  # the latest admitted goes first
                self._preempt(victim, running, waiting)
                preempted = True
                if victim is seq:
                    break
            else:
                plan.append((seq, n))
                budget -= n
        while waiting and not preempted and budget > 0 and len(running) < self.max_seqs:
            seq = waiting[0]
            n = min(len(seq.tokens) - seq.computed, budget)
            if not self.blocks.ensure(seq.req.id, n):
                break
            running.append(waiting.popleft())
            plan.append((seq, n))
            budget -= n
        return plan

    def _schedule_static(self, running: list[SeqState], waiting: deque) -> list[tuple[SeqState, int]]:
        if not running or all(s.done for s in running):  # the batch is over: release it, form the next
            for seq in running:
                self.blocks.free(seq.req.id)
            running.clear()
            window = self.config.block_size
            while waiting and len(running) < self.max_seqs and self.blocks.ensure(waiting[0].req.id, window):
                running.append(waiting.popleft())
        return [(s, len(s.tokens) - s.computed) for s in running if not s.done]

    # ------------------------------------------------------------------ the loop

    @torch.no_grad()
    def run(self, trace: list[Request]) -> ServeResult:
        """Serve every request of the trace; validates all of them first (ConfigError)."""
        pool = self.blocks.num_blocks * self.blocks.block_size
        ids = [r.id for r in trace]
        if len(set(ids)) != len(ids):
            raise ConfigError("request ids must be unique within a trace; number them 0..n-1")
        for req in trace:
            validate_request(req, self.config, pool)
        pending = deque(sorted(trace, key=lambda r: r.arrival_s))
        waiting: deque[SeqState] = deque()
        running: list[SeqState] = []
        finished: list[SeqState] = []
        steps: list[dict] = []
        clock = Clock(self.clock)
        while pending or waiting or any(not s.done for s in running):
            now = clock.now()
            while pending and pending[0].arrival_s <= now:
                req = pending.popleft()
                waiting.append(SeqState(req, list(req.prompt)))
            if not waiting and not any(not s.done for s in running):
                clock.skip_to(pending[0].arrival_s)
                continue
            schedule = self._schedule_static if self.policy == "static" else self._schedule_continuous
            plan = sorted(schedule(running, waiting), key=lambda sn: sn[1] > 1)  # one-token chunks first
            if self.check_invariants:
                self.blocks.check()
            if not plan:  # validate_request guarantees a lone request fits the pool
                raise RuntimeError(f"{self.policy} scheduler planned nothing with {len(waiting)} waiting and "
                                   f"{len(running)} running requests")
            chunks = [(s.req.id, s.tokens[s.computed:s.computed + n], s.computed) for s, n in plan]
            batch = build_batch(chunks, self.blocks, self.device)
            logits = paged_forward(self.model, self.cache, batch)
            now = clock.now()
            record = self._step_record(now, plan)
            for (seq, n), row in zip(plan, logits):
                seq.computed += n
                if seq.computed == len(seq.tokens):  # all known tokens cached: the row predicts the next
                    seq.tokens.append(int(next_token(row[None], greedy=True)))
                    seq.token_times.append(now)
                    if seq.done:
                        seq.finish_s = now
                        finished.append(seq)
                        if self.policy == "continuous":
                            self.blocks.free(seq.req.id)
                            running.remove(seq)
            steps.append({**record, **self._memory_record(running)})
        for seq in running:  # the last static batch
            self.blocks.free(seq.req.id)
        return ServeResult(
            self.policy, {s.req.id: s.generated for s in finished},
            [{"id": s.req.id, "prompt_tokens": len(s.req.prompt), "max_tokens": s.req.max_tokens,
              "arrival_s": s.req.arrival_s, "token_times": s.token_times, "finish_s": s.finish_s,
              "preemptions": s.preemptions} for s in sorted(finished, key=lambda s: s.req.id)],
            steps, self.cache.nbytes(), self.cache.bytes_per_token(),
            {"num_blocks": self.blocks.num_blocks, "block_size": self.blocks.block_size,
             "max_seqs": self.max_seqs, "max_batched_tokens": self.max_batched_tokens,
             "context": self.config.block_size, "clock": self.clock})

    @staticmethod
    def _step_record(now: float, plan: list[tuple[SeqState, int]]) -> dict:
        """Before the step's tokens are counted in: a decode token is one generated token run alone."""
        decode = sum(1 for s, n in plan if n == 1 and s.computed >= len(s.req.prompt))
        tokens = sum(n for _, n in plan)
        return {"t": now, "tokens": tokens, "requests": len(plan), "decode_tokens": decode,
                "prefill_tokens": tokens - decode}

    def _memory_record(self, running: list[SeqState]) -> dict:
        """KV tokens held for requests (used) vs slots in their blocks (reserved), after the step."""
        holders = [s for s in running if s.req.id in self.blocks.tables]
        return {"kv_used_tokens": sum(s.computed for s in holders),
                "kv_reserved_tokens": self.blocks.num_used * self.blocks.block_size}


def reference_outputs(model: GPT, trace: list[Request]) -> dict[int, list[int]]:
    """One request at a time through GPT.generate (its contiguous KVCache), greedy: the truth."""
    out, p = {}, next(model.parameters())
    for req in trace:
        prompt = torch.tensor([req.prompt], device=p.device)
        out[req.id] = model.generate(prompt, req.max_tokens, greedy=True)[0, len(req.prompt):].tolist()
    return out


def timed_reference(model: GPT, trace: list[Request],
                    clock: str = "wall") -> tuple[dict[int, list[int]], dict]:
    """reference_outputs and its cost on `clock`: generated tokens per second with no batching at all."""
    timer = Clock(clock)
    out = reference_outputs(model, trace)
    seconds = timer.now()
    made = sum(len(v) for v in out.values())
    return out, {"generated_tokens": made, "seconds": seconds, "tokens_per_s": made / seconds}


def compare_batching(model: GPT, trace: list[Request], variants: dict[str, dict],
                     reference: dict[int, list[int]]) -> dict[str, dict]:
    """Serve the same trace under each variant's ServingEngine settings; per variant: the summary,
    the settings, and whether every request's tokens equal `reference` (reference_outputs)."""
    rows = {}
    for name, settings in variants.items():
        result = ServingEngine(model, **settings).run(trace)
        rows[name] = {**result.summary(), "settings": result.settings, "policy": result.policy,
                      "identical": result.outputs == reference,
                      "kv_timeline": [(s["t"], s["kv_used_tokens"], s["kv_reserved_tokens"])
                                      for s in result.steps]}
    return rows


def batching_table(runs: dict[str, dict]) -> str:
    """compare_batching's runs, one line each: tokens/s (and against the first run), time to first
    token p50/p90, inter-token latency p50/p99, requests per step, mixed steps (prefill chunks and
    decode tokens together), preemptions, KV cache used over reserved (cached tokens over the
    slots their blocks hold, summed over steps), and whether the tokens equal one request at a
    time's."""
    first, base = next(iter(runs)), next(iter(runs.values()))["tokens_per_s"]
    rows = [{**r, "name": name, "speedup": r["tokens_per_s"] / base,
             "ttft": f"{r['ttft_s']['p50']:.2f}/{r['ttft_s']['p90']:.2f}",
             "itl": f"{r['itl_s']['p50'] * 1e3:.1f}/{r['itl_s']['p99'] * 1e3:.1f}",
             "same": "yes" if r["identical"] else "NO"} for name, r in runs.items()]
    return table(rows, [("name", "", str), ("tokens_per_s", "tok/s", fixed(0)),
                        ("speedup", f"vs {first}", lambda x: f"{x:.2f}x"), ("ttft", "TTFT p50/p90 s", str),
                        ("itl", "ITL p50/p99 ms", str), ("mean_requests_per_step", "req/step", fixed(1)),
                        ("mixed_steps", "mixed", str), ("preemptions", "preempt", str),
                        ("kv_used_over_reserved", "KV used/reserved", "{:.0%}".format),
                        ("same", "same tokens", str)])
