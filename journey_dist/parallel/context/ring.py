"""Ring attention: each cp rank keeps its queries and passes key/value blocks round the ring.

Rank r of a ring of n holds S/n tokens of q, k and v (journey_dist.parallel.context.layout says
which). Attention of its queries over the whole sequence is built in n steps; at step i it holds
the k/v block of rank (r - i) mod n, computes its queries' scores against that block and folds
them into a running result with the online-softmax rule (the log-sum-exp merge of flash
attention), while the next block is already on its way:

    forward, step i < n-1:  send the k/v block it holds to rank r+1, receive the next from r-1
                            (one isend + one irecv of 2·b·kv_heads·(S/n)·d values, overlapped
                            with this step's compute); n-1 blocks sent per layer
    backward, step i:       the same k/v blocks travel again (n-1 sends), and with each block the
                            partial dK/dV of its owner: a rank adds its queries' contribution and
                            sends it on to r+1; after n hops it is back home, complete (n sends)

The backward is written out (an autograd.Function), not left to autograd through the sends:
saving every block the ring delivered would keep the whole sequence's k and v on every rank,
which is what context parallelism is there to avoid. Saved for backward: q, k, v, the output and
the log-sum-exp (fp32, one per query and head), exactly what fused attention keeps.

Causal masking is per block: a key block entirely after a query block is skipped, one entirely
before it is computed without a mask, the diagonal block (the same aligned chunk) is causal inside.
Grouped-query attention sends only the kv heads; query head h reads kv head h // (H/K).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from journey_dist.parallel.context.layout import SequenceLayout, block_kind

KV_TAG, DKV_TAG = 11, 12  # gloo matches messages by (peer, tag): keep the two streams apart


@dataclass
class Ring:
    """The cp group as a ring: this rank's place, its neighbours (global ranks), the layout, and
    counters of the attention work this rank did (score entries computed, compute seconds)."""

    group: dist.ProcessGroup | None
    layout: SequenceLayout
    stats: dict[str, float] = field(default_factory=lambda: {"entries": 0, "seconds": 0.0, "forwards": 0})

    def __post_init__(self) -> None:
        ranks = dist.get_process_group_ranks(self.group or dist.group.WORLD)
        self.rank, self.size = dist.get_rank(self.group), len(ranks)
        self.next, self.prev = ranks[(self.rank + 1) % self.size], ranks[(self.rank - 1) % self.size]

    def exchange(self, t: torch.Tensor, tag: int) -> Exchange:
        """Post: send `t` to the next rank, receive a tensor like it from the previous one."""
        buf = torch.empty_like(t)
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag),
               dist.P2POp(dist.irecv, buf, self.prev, self.group, tag)]
        return Exchange(dist.batch_isend_irecv(ops), t, buf)

    def blocks(self, seq_len: int, src: int) -> list[tuple[int, slice, slice, str]]:
        """(local query chunk index, query slice, key slice in src's block, kind) to compute."""
        out = []
        mine, theirs = self.layout.chunks(seq_len, self.rank), self.layout.chunks(seq_len, src)
        q_off = k_off = 0
        for qi, q in enumerate(mine):
            k_off = 0
            for k in theirs:
                kind = block_kind(q, k)
                if kind != "none":
                    out.append((qi, slice(q_off, q_off + len(q)), slice(k_off, k_off + len(k)), kind))
                k_off += len(k)
            q_off += len(q)
        return out


@dataclass
class Exchange:
    """One posted send and receive. It holds the tensor being sent until `wait`: the caller may drop
    its own reference at once, and a buffer freed (and reused) while the send reads it would send
    garbage, or worse."""

    works: list[dist.Work]
    sending: torch.Tensor | None
    received: torch.Tensor

    def wait(self) -> torch.Tensor:
        """Wait for both; return the received tensor."""
        for w in self.works:
            w.wait()
        self.sending = None
        return self.received


# ----------------------------------------------------------------------------- one block


def grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, K, G·T, D): the G = H/K query heads of each kv head stacked as rows."""
    B, H, T, D = x.shape
    return x.reshape(B, kv_heads, (H // kv_heads) * T, D)


def ungrouped(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, K, G·T, D) -> (B, H, T, D), the inverse of `grouped` (also for (B, K, G·T) rows)."""
    B, K = x.shape[:2]
    rest = x.shape[3:]
    return x.reshape(B, heads, x.size(2) * K // heads, *rest)


def causal_rows(t: int, groups: int, device: torch.device) -> torch.Tensor:
    """(G·t, t) bool: row g·t + i sees keys 0..i (the diagonal block, for every query head)."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril().repeat(groups, 1)


def block_forward(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of grouped queries (B, K, R, D) over one key block (B, K, Tk, D): the block's
    output (B, K, R, D) and log-sum-exp (B, K, R), fp32 statistics."""
    s = (qg @ k.transpose(-1, -2)).float() * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return s.sub_(lse.unsqueeze(-1)).exp_().to(v.dtype) @ v, lse


def merge(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l: torch.Tensor) -> None:  # noqa: E741
    """Fold a block's (o, l) into the running (out, lse) in place: softmax over the union of
    the keys seen so far, without ever holding their scores together (online softmax)."""
    new = torch.logaddexp(lse, l)
    out.mul_((lse - new).exp().unsqueeze(-1)).add_(o.float() * (l - new).exp().unsqueeze(-1))
    lse.copy_(new)


# ----------------------------------------------------------------------------- the ring


class _RingAttention(torch.autograd.Function):
    """q (B, H, T, D), k and v (B, K, T, D): this rank's T = S/n tokens -> output (B, H, T, D).

    Forward: n-1 k/v blocks sent to the next rank (and received from the previous one).
    Backward: n-1 k/v blocks and n partial dK/dV blocks sent to the next rank.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring) -> torch.Tensor:
        B, H, T, D = q.shape
        K, S, scale = k.size(1), T * ring.size, 1.0 / math.sqrt(D)
        chunks = ring.layout.chunks(S, ring.rank)
        bounds = [slice(sum(map(len, chunks[:i])), sum(map(len, chunks[:i + 1]))) for i in range(len(chunks))]
        qg = [grouped(q[:, :, sl], K) for sl in bounds]
        acc = [torch.zeros(*g.shape, dtype=torch.float32, device=q.device) for g in qg]
        lse = [torch.full(g.shape[:-1], float("-inf"), device=q.device) for g in qg]
        kv = torch.cat([k, v], dim=1)  # (B, 2K, T, D): one message per step
        for step in range(ring.size):
            if step + 1 < ring.size:
                nxt = ring.exchange(kv, KV_TAG)
            _attend(ring, S, (ring.rank - step) % ring.size, qg, kv, K, scale,
                    lambda qi, o, l: merge(acc[qi], lse[qi], o, l))  # noqa: E741
            if step + 1 < ring.size:
                kv = nxt.wait()
        out = q.new_empty(B, T, H, D)  # (B, T, H, D) storage: the caller's (B, T, H·D) view is free
        lse_all = torch.empty(B, H, T, device=q.device)
        for sl, a, l in zip(bounds, acc, lse):  # noqa: E741
            out[:, sl] = ungrouped(a, H).transpose(1, 2)
            lse_all[:, :, sl] = ungrouped(l.unsqueeze(-1), H).squeeze(-1)
        out = out.transpose(1, 2)
        ring.stats["forwards"] += 1
        ctx.save_for_backward(q, k, v, out, lse_all)
        ctx.ring, ctx.bounds = ring, bounds
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse_all = ctx.saved_tensors
        ring, bounds = ctx.ring, ctx.bounds
        K, S, scale = k.size(1), q.size(2) * ring.size, 1.0 / math.sqrt(q.size(-1))
        qg = [grouped(q[:, :, sl], K) for sl in bounds]
        dg = [grouped(dout[:, :, sl], K) for sl in bounds]
        lse = [grouped(lse_all[:, :, sl].unsqueeze(-1), K).squeeze(-1) for sl in bounds]
        # D_i = rowsum(dO_i * O_i): the softmax backward's per-row term, the same for every block
        delta = [(d.float() * grouped(out[:, :, sl], K).float()).sum(-1) for d, sl in zip(dg, bounds)]
        dq = [torch.zeros(*g.shape, dtype=torch.float32, device=q.device) for g in qg]
        kv = torch.cat([k, v], dim=1)
        grad_hop = None  # the partial dK/dV on its way to the next rank
        for step in range(ring.size):
            if step + 1 < ring.size:
                nxt = ring.exchange(kv, KV_TAG)
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            _attend_backward(ring, S, (ring.rank - step) % ring.size, (qg, dg, lse, delta), kv, K, scale,
                             dq, dkv)
            if grad_hop is not None:  # the partial dK/dV of this block from the ranks before
                dkv += grad_hop.wait()
            grad_hop = ring.exchange(dkv, DKV_TAG)
            if step + 1 < ring.size:
                kv = nxt.wait()
        own = grad_hop.wait()  # this rank's own block, every rank's contribution added
        dq_all = torch.empty_like(q)
        for sl, d in zip(bounds, dq):
            dq_all[:, :, sl] = ungrouped(d, q.size(1)).to(q.dtype)
        dk, dv = own[:, :K].to(k.dtype), own[:, K:].to(v.dtype)
        return dq_all, dk, dv, None


def _attend(ring: Ring, seq_len: int, src: int, qg: list[torch.Tensor], kv: torch.Tensor, K: int,
            scale: float, fold) -> None:
    """Forward over the blocks of src's k/v this rank computes; fold(qi, o, lse) each result."""
    t0 = time.perf_counter()
    for qi, qs, ks, kind in ring.blocks(seq_len, src):
        kb, vb = kv[:, :K, ks], kv[:, K:, ks]
        groups = qg[qi].size(2) // (qs.stop - qs.start)
        mask = causal_rows(qs.stop - qs.start, groups, kv.device) if kind == "diagonal" else None
        fold(qi, *block_forward(qg[qi], kb, vb, mask, scale))
        ring.stats["entries"] += (qs.stop - qs.start) * (ks.stop - ks.start)
    ring.stats["seconds"] += time.perf_counter() - t0


def _attend_backward(ring: Ring, seq_len: int, src: int, saved: tuple, kv: torch.Tensor, K: int,
                     scale: float, dq: list[torch.Tensor], dkv: torch.Tensor) -> None:
    """Add the gradients of the blocks of src's k/v this rank computed: to dq (its queries) and
    dkv (src's keys and values). Each block's probabilities P = exp(S - lse) are recomputed."""
    qg, dg, lse, delta = saved
    for qi, qs, ks, kind in ring.blocks(seq_len, src):
        kb, vb = kv[:, :K, ks], kv[:, K:, ks]
        s = (qg[qi] @ kb.transpose(-1, -2)).float() * scale
        if kind == "diagonal":
            groups = qg[qi].size(2) // (qs.stop - qs.start)
            s = s.masked_fill(~causal_rows(qs.stop - qs.start, groups, kv.device), float("-inf"))
        p = s.sub_(lse[qi].unsqueeze(-1)).exp_()  # in place: one score-sized buffer, then a second
        dkv[:, K:, ks] += p.transpose(-1, -2) @ dg[qi].float()  # dV = P^T dO
        ds = (dg[qi] @ vb.transpose(-1, -2)).float().sub_(delta[qi].unsqueeze(-1)).mul_(p)  # softmax bwd
        del p, s
        dq[qi] += (ds @ kb.float()) * scale  # dQ = dS K
        dkv[:, :K, ks] += (ds.transpose(-1, -2) @ qg[qi].float()) * scale  # dK = dS^T Q


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence, k/v passed round `ring`.

    q (B, H, T, D), k and v (B, K, T, D), T = S/n tokens at the layout's positions -> (B, H, T, D)
    (a view of (B, T, H, D) storage). Forward: n-1 k/v blocks sent to the next rank. Backward:
    n-1 k/v blocks and n partial dK/dV blocks sent to the next rank.
    """
    return _RingAttention.apply(q, k, v, ring)
