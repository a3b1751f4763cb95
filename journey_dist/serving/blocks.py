"""A paged KV cache: one pool of fixed-size blocks per layer, handed out to requests on demand.

    cache = PagedKVCache(config, num_blocks=64, block_size=16)
    blocks = BlockManager(num_blocks=64, block_size=16)
    blocks.ensure(req_id, tokens=40)           # 3 blocks, or False when the pool is short
    cache.write(layer, blocks.slots(req_id, positions), k, v)
    k, v = cache.gather(layer, block_tables)     # (S, blocks * block_size, kv_heads, head_dim)
    blocks.free(req_id)

As in vLLM's PagedAttention (Kwon et al. 2023), token t of a request lives in slot
`table[t // block_size] * block_size + t % block_size` of the pool, where `table` is the
request's block table: a request owns whole blocks, wastes at most block_size - 1 slots (the
unfilled end of its last block), and needs no contiguous region, so a freed block can go to any
request. Attention reads a request's keys and values by gathering its blocks through the table.

Sizes come from the config: (n_layer, kv_heads, head_dim), kv_heads = config.n_kv_head when
the config has one (grouped-query attention), else n_head.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from journey_dist.config import ConfigError, GPTConfig


def kv_heads_of(config: GPTConfig) -> int:
    """Key/value heads the cache holds: n_kv_head (GQA/MQA) when the config has it, else n_head."""
    return getattr(config, "n_kv_head", None) or config.n_head


def check_pool(num_blocks: int, block_size: int) -> None:
    """ConfigError unless both are positive integers."""
    for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer (typical block_size: 16 "
                              f"tokens; num_blocks: the KV memory you can spare / bytes per block)")


class PagedKVCache:
    """K and V of every layer in one pool: k[layer], v[layer] of (num_blocks, block_size, kv_heads, D).

    Bytes = 2 (K, V) x layers x num_blocks x block_size x kv_heads x head_dim x element size:
    kv_cache_bytes(config, 1, num_blocks * block_size, kv_heads=...) for the whole pool.
    """

    def __init__(self, config: GPTConfig, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        check_pool(num_blocks, block_size)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_heads, self.head_dim = kv_heads_of(config), config.head_dim
        shape = (num_blocks, block_size, self.kv_heads, self.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]

    def bytes_per_token(self) -> int:
        return 2 * len(self.k) * self.kv_heads * self.head_dim * self.k[0].element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store (N, kv_heads, D) keys and values at N pool slots (block * block_size + offset)."""
        self.k[layer].view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, k)
        self.v[layer].view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, v)

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, max_blocks) block ids -> each request's K and V, (S, max_blocks * block_size, kv_heads, D).

        Token t of request s is row t of its result: the blocks are laid end to end in table order.
        Rows past a request's length (and padded table entries) hold other data; attention masks them.
        """
        ids = block_tables.flatten()  # index_select: one copy per block, ~7x faster than k[tables] on CPU
        shape = (block_tables.size(0), -1, self.kv_heads, self.head_dim)
        return self.k[layer].index_select(0, ids).view(shape), self.v[layer].index_select(0, ids).view(shape)


class BlockManager:
    """Which request owns which block: allocation on demand, free, and the invariants.

    Free blocks sit in a FIFO queue; `ensure` appends blocks to a request's table until it can
    hold the given number of tokens, all or nothing (a request is never left half-grown).
    """

    def __init__(self, num_blocks: int, block_size: int):
        check_pool(num_blocks, block_size)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.tables: dict[int, list[int]] = {}

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def ensure(self, req_id: int, tokens: int) -> bool:
        """Grow req_id's table to hold `tokens` tokens; False (nothing taken) if the pool is short."""
        table = self.tables.setdefault(req_id, [])
        missing = self.blocks_for(tokens) - len(table)
        if missing > len(self.free_blocks):
            if not table:
                del self.tables[req_id]
            return False
        table.extend(self.free_blocks.popleft() for _ in range(max(missing, 0)))
        return True

    def free(self, req_id: int) -> int:
        """Return all of req_id's blocks to the pool; how many."""
        table = self.tables.pop(req_id, [])
        self.free_blocks.extend(table)
        return len(table)

    def slots(self, req_id: int, positions: torch.Tensor) -> torch.Tensor:
        """Pool slots of the tokens at `positions` (a 1-D tensor) of req_id."""
        table = torch.tensor(self.tables[req_id], dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def check(self) -> None:
        """Every block is free or owned by exactly one request (AssertionError otherwise)."""
        owned = [b for table in self.tables.values() for b in table]
        everything = owned + list(self.free_blocks)
        assert len(owned) == len(set(owned)), "a block is owned by two requests"
        assert sorted(everything) == list(range(self.num_blocks)), "a block is lost or both free and owned"
