"""Which tokens of a sequence each context-parallel rank holds: plain or zigzag.

    plain   rank r holds the r-th of cp equal chunks: tokens [r*S/cp, (r+1)*S/cp)
    zigzag  the sequence is cut into 2*cp chunks; rank r holds chunks r and 2*cp-1-r

Causal attention makes the plain split unfair: rank r's queries see the keys of ranks 0..r, so the
last rank computes cp blocks of scores while rank 0 computes one. Zigzag pairs an early chunk
with a late one, so every rank computes the same 2*cp + 1 half-chunk blocks (Megatron-LM's and
ring-flash-attention's load balancing; torchtitan calls it the head-tail balancer).

Pure arithmetic on (seq_len, cp, rank) plus two helpers that move tensors by these positions:
`shard` (no communication) and `gather` (one all-gather). Chunks are aligned, equal ranges of
global positions, so a block of queries against a block of keys is either fully visible, fully
masked, or the same range (the diagonal, causal inside).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from journey_dist.config import ConfigError

LAYOUTS = ("plain", "zigzag")


@dataclass(frozen=True)
class SequenceLayout:
    """How a sequence of `seq_len` tokens is split over `cp` ranks ('plain' or 'zigzag')."""

    cp: int
    kind: str = "plain"

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ConfigError(f"layout {self.kind!r} is unknown; use one of {', '.join(LAYOUTS)}")
        if not isinstance(self.cp, int) or self.cp < 1:
            raise ConfigError(f"cp={self.cp!r} must be a positive integer (1: not split)")

    @property
    def pieces(self) -> int:
        """Equal chunks the sequence is cut into: cp (plain) or 2*cp (zigzag)."""
        return self.cp * (2 if self.kind == "zigzag" else 1)

    def check(self, seq_len: int) -> None:
        """ConfigError unless seq_len splits into `pieces` equal chunks."""
        if seq_len % self.pieces:
            need = "2*cp" if self.kind == "zigzag" else "cp"
            fit = seq_len - seq_len % self.pieces
            raise ConfigError(
                f"a sequence of {seq_len} tokens does not split into {need} = {self.pieces} equal chunks "
                f"({self.kind} layout over cp={self.cp}); use a sequence length that is a multiple of "
                f"{self.pieces} (e.g. {fit or self.pieces}), or another cp")

    def chunks(self, seq_len: int, rank: int) -> list[range]:
        """The global position ranges rank `rank` holds, in the order it stores them."""
        self.check(seq_len)
        c = seq_len // self.pieces
        ids = [rank] if self.kind == "plain" else [rank, 2 * self.cp - 1 - rank]
        return [range(i * c, (i + 1) * c) for i in ids]

    def positions(self, seq_len: int, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(seq_len/cp,) int64: the global position of each token rank `rank` holds."""
        return torch.cat([torch.arange(r.start, r.stop, device=device) for r in self.chunks(seq_len, rank)])

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a full-sequence tensor (a copy; no communication)."""
        return x.index_select(dim, self.positions(x.size(dim), rank, x.device))

    def gather(self, local: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
        """The full sequence from every rank's local tokens, in global order (one all-gather;
        no gradient). For checks and printing, not for the training step."""
        parts = [torch.empty_like(local) for _ in range(self.cp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        seq_len = local.size(dim) * self.cp
        full = local.new_empty((*local.shape[:dim], seq_len, *local.shape[dim + 1:]))
        for r, part in enumerate(parts):
            full.index_copy_(dim, self.positions(seq_len, r, local.device), part)
        return full


# ----------------------------------------------------------------------------- attention work


def block_kind(q: range, k: range) -> str:
    """A block of queries q against keys k under the causal mask: 'full' (every key at or before
    every query), 'none' (every key after every query) or 'diagonal' (the same aligned range)."""
    if k.stop <= q.start:
        return "full"
    if k.start >= q.stop:
        return "none"
    if (k.start, k.stop) != (q.start, q.stop):
        raise ValueError(f"chunks {q} and {k} overlap without being the same range: the layout's "
                         "chunks must be aligned")
    return "diagonal"


def rank_blocks(layout: SequenceLayout, seq_len: int, rank: int) -> list[tuple[range, range, str]]:
    """(query chunk, key chunk, kind) of every block rank `rank` computes in ring attention,
    over the cp steps of the ring (fully masked blocks are skipped, not computed)."""
    out = []
    for step in range(layout.cp):
        src = (rank - step) % layout.cp
        for q in layout.chunks(seq_len, rank):
            for k in layout.chunks(seq_len, src):
                kind = block_kind(q, k)
                if kind != "none":
                    out.append((q, k, kind))
    return out


def attention_work(layout: SequenceLayout, seq_len: int, *, batch: int = 1, heads: int = 1,
                   head_dim: int = 1) -> list[dict[str, float]]:
    """Per rank: the score entries ring attention computes (a diagonal block in full, then masked)
    and the forward FLOPs, 4 x batch x heads x head_dim per entry (q k^T and p v, 2 FLOPs per
    multiply-add each). A rank's share of the causal pairs (query >= key) is listed too."""
    rows = []
    for r in range(layout.cp):
        entries = sum(len(q) * len(k) for q, k, _ in rank_blocks(layout, seq_len, r))
        causal = sum(p + 1 for chunk in layout.chunks(seq_len, r) for p in chunk)
        rows.append({"rank": r, "blocks": len(rank_blocks(layout, seq_len, r)), "entries": entries,
                     "causal_pairs": causal, "flops": 4 * batch * heads * head_dim * entries})
    return rows


def imbalance(work: list[dict[str, float]], key: str = "flops") -> float:
    """max / mean of a per-rank quantity: 1.0 is perfectly balanced; the step waits for the max."""
    values = [row[key] for row in work]
    return max(values) / (sum(values) / len(values))
