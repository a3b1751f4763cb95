"""Causal attention work per cp rank, plain vs zigzag: FLOPs counted from the layout, time measured.

`rank_times` runs the very block kernel ring attention uses (ring.block_forward) over the blocks
each rank computes, one rank after the other in this process: the ranks of a real run share this
machine's cores, so timing them side by side would measure the contention, not the work.
"""

from __future__ import annotations

import math
import time

import torch

from journey_dist.parallel.context.layout import SequenceLayout, attention_work, rank_blocks
from journey_dist.parallel.context.ring import block_forward, causal_rows, grouped


def rank_times(layout: SequenceLayout, seq_len: int, *, batch: int, heads: int, kv_heads: int, head_dim: int,
               repeats: int = 5, seed: int = 0) -> list[float]:
    """Seconds of forward attention compute per rank (the fastest of `repeats`, one thread), fp32."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, head_dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen) for _ in range(2))
    scale, groups = 1.0 / math.sqrt(head_dim), heads // kv_heads

    def inputs(qr: range, kr: range, kind: str) -> tuple:
        mask = causal_rows(len(qr), groups, q.device) if kind == "diagonal" else None
        keys = slice(kr.start, kr.stop)
        return grouped(q[:, :, qr.start:qr.stop], kv_heads), k[:, :, keys], v[:, :, keys], mask

    work = [[inputs(*block) for block in rank_blocks(layout, seq_len, r)] for r in range(layout.cp)]
    best = [float("inf")] * layout.cp
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as a rank of a cp group on this machine would have at best
    try:
        for _ in range(repeats):  # round-robin: a busy moment of the machine hits every rank alike
            for r, blocks in enumerate(work):
                t0 = time.perf_counter()
                for qg, kb, vb, mask in blocks:
                    block_forward(qg, kb, vb, mask, scale)
                best[r] = min(best[r], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best


def balance_table(cp: int, seq_len: int, *, batch: int, heads: int, kv_heads: int, head_dim: int,
                  repeats: int = 5) -> dict[str, list[dict]]:
    """{layout: per-rank rows (blocks, score entries, forward FLOPs, measured seconds)} and each
    layout's imbalance (max / mean) of FLOPs and of time, for plain and zigzag."""
    out = {}
    for kind in ("plain", "zigzag"):
        layout = SequenceLayout(cp, kind)
        rows = attention_work(layout, seq_len, batch=batch, heads=heads, head_dim=head_dim)
        for row, seconds in zip(rows, rank_times(layout, seq_len, batch=batch, heads=heads,
                                                 kv_heads=kv_heads, head_dim=head_dim, repeats=repeats)):
            row["seconds"] = seconds
        out[kind] = rows
    return out
