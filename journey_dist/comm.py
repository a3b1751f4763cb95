"""A ledger of collectives: calls and bytes per op and process group, next to the analytic volume.

    with CommLedger() as ledger:
        train_step(...)
    print(ledger.table())

It is a TorchDispatchMode, so it sees every collective that goes through PyTorch's
dispatcher: eager `torch.distributed.*` calls (c10d ops) and the functional
collectives DTensor uses (_c10d_functional ops). DDP's reducer launches its all-reduces
from autograd hooks in C++: on gloo/CPU the dispatcher saw them (measured, torch 2.13), but
that rests on thread-local state reaching autograd's threads (untested on CUDA). So DDP
buckets are recorded by `ddp_allreduce_hook`, a comm hook that records the bucket in every
open ledger and hides its own all-reduce from the dispatcher, so each is counted once.
`analytic(op, buffers, n)` is the volume a scheme should hand to collectives, for comparison.

"bytes" is the size of the full buffer handed to the collective (all-reduce: the
tensor; all-gather: the gathered output; reduce-scatter: the unsharded input; all-to-all: the
input this rank hands over, which with uneven splits is not the size of what it receives).
"wire" is what one rank sends on a ring for that buffer:
all-reduce 2(n-1)/n, all-gather and reduce-scatter (n-1)/n, all-to-all (n-1)/n,
broadcast / send 1x (the sender's copy).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

# dispatcher op name -> ledger op kind
_OPS = {
    "allreduce_": "all_reduce", "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce",
    "allreduce_coalesced_": "all_reduce",
    "_allgather_base_": "all_gather", "allgather_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "broadcast_": "broadcast", "broadcast": "broadcast",
    "alltoall_base_": "all_to_all", "all_to_all_single": "all_to_all", "alltoall_": "all_to_all",
    "send": "send", "recv_": "recv", "recv_any_source_": "recv",
    "barrier": "barrier",
}
_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd")

# Ledgers inside their `with` block, process-wide: DDP's comm hook may run on an autograd
# thread where the thread-local dispatch-mode stack is not the one that entered the ledger.
_OPEN: list[CommLedger] = []
_HIDDEN = threading.local()  # .depth > 0: this thread's collectives were already recorded by hand


def ring_factor(op: str, n: int) -> float:
    """Fraction of the buffer one rank sends on a ring of n ranks."""
    if n <= 1 and op not in ("send", "recv"):
        return 0.0
    return {
        "all_reduce": 2 * (n - 1) / n,
        "all_gather": (n - 1) / n,
        "reduce_scatter": (n - 1) / n,
        "all_to_all": (n - 1) / n,
        "broadcast": 1.0,
        "send": 1.0,
        "recv": 0.0,
        "barrier": 0.0,
    }[op]


@dataclass(frozen=True)
class CommRecord:
    op: str
    group: tuple[int, ...]  # global ranks in the group
    nbytes: int  # full buffer handed to the collective

    @property
    def wire_bytes(self) -> float:
        return ring_factor(self.op, len(self.group)) * self.nbytes


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _group_of(args) -> tuple[int, ...]:
    for a in args:
        pg = None
        if isinstance(a, torch.ScriptObject):
            try:
                pg = dist.ProcessGroup.unbox(a)
            except Exception:  # not a process group (e.g. a ReduceOp)
                continue
        elif isinstance(a, str):
            try:
                pg = dist.distributed_c10d._resolve_process_group(a)
            except Exception:  # a reduce-op string such as "sum"
                continue
        if pg is not None:
            return tuple(dist.get_process_group_ranks(pg))
    return tuple(range(dist.get_world_size()))


# all-to-all ops: which argument is this rank's input (c10d: (output, input, ...); functional: (input, ...))
_ALL_TO_ALL_INPUT = {"alltoall_base_": 1, "alltoall_": 1, "all_to_all_single": 0}


def _buffer_bytes(kind: str, name: str, args) -> int:
    if name in _ALL_TO_ALL_INPUT:
        return sum(t.numel() * t.element_size() for t in _tensors(args[_ALL_TO_ALL_INPUT[name]]))
    tensor_args = [_tensors(a) for a in args]
    sizes = [sum(t.numel() * t.element_size() for t in ts) for ts in tensor_args if ts]
    if not sizes:
        return 0
    if name.startswith("all_gather_into_tensor") and "out" not in name:
        # functional all-gather takes only the shard and the group size
        group_size = next(a for a in args[1:] if isinstance(a, int))
        return sizes[0] * group_size
    return max(sizes)  # the full (unsharded) buffer is the largest tensor argument


class CommLedger(TorchDispatchMode):
    """Record every collective run inside the `with` block (this rank's view)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[CommRecord] = []

    def __enter__(self) -> CommLedger:
        _OPEN.append(self)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        _OPEN.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            # DTensor: let it run its op first (it returns here with local tensors), mode active,
            # so the collectives it issues inside (loss_parallel's all-reduces, Partial grads'
            # reductions) reach us as plain-tensor ops. Handling it here would run it with the
            # mode popped and they would go unseen.
            return NotImplemented
        kwargs = kwargs or {}
        if func.namespace in _NAMESPACES and not getattr(_HIDDEN, "depth", 0):
            name = func._schema.name.split("::")[-1]
            kind = _OPS.get(name)
            if kind is not None:
                self.record(kind, _group_of(args), _buffer_bytes(kind, name, args))
        return func(*args, **kwargs)

    def record(self, op: str, group: tuple[int, ...], nbytes: int) -> None:
        """Add a collective by hand (for C++ paths the dispatcher never sees, like DDP)."""
        self.records.append(CommRecord(op, tuple(group), int(nbytes)))

    def clear(self) -> None:
        self.records.clear()

    def summary(self) -> dict[tuple[str, tuple[int, ...]], dict[str, float]]:
        """{(op, group): {"calls", "bytes", "wire_bytes"}} in first-seen order."""
        out: dict[tuple[str, tuple[int, ...]], dict[str, float]] = defaultdict(
            lambda: {"calls": 0, "bytes": 0, "wire_bytes": 0.0})
        for r in self.records:
            row = out[(r.op, r.group)]
            row["calls"] += 1
            row["bytes"] += r.nbytes
            row["wire_bytes"] += r.wire_bytes
        return dict(out)

    def total_bytes(self, op: str | None = None) -> int:
        return sum(r.nbytes for r in self.records if op is None or r.op == op)

    def calls(self, op: str | None = None) -> int:
        return sum(1 for r in self.records if op is None or r.op == op)

    def to_dict(self) -> list[dict]:
        return [{"op": op, "group": list(g), **row} for (op, g), row in self.summary().items()]

    def table(self) -> str:
        lines = [f"{'collective':<15} {'group':<14} {'calls':>6} {'bytes':>14} {'sent/rank (ring)':>17}"]
        for (op, group), row in self.summary().items():
            lines.append(f"{op:<15} {str(list(group)):<14} {row['calls']:>6} "
                         f"{row['bytes']:>14,} {row['wire_bytes']:>17,.0f}")
        return "\n".join(lines)


def analytic(op: str, buffers: Sequence[int], n: int) -> dict[str, float]:
    """What handing these buffers (bytes each) to `op` on n ranks should cost one rank:
    {"calls", "bytes", "wire_bytes"}, in the ledger's units."""
    total = int(sum(buffers))
    return {"calls": len(buffers), "bytes": total, "wire_bytes": ring_factor(op, n) * total}


def calls_and_bytes(comm: dict[str, dict[str, float]]) -> dict[str, dict[str, int]]:
    """{op: {"calls", "bytes"}}: a ledger summary (or an analytic count) without the wire bytes, the
    two numbers a formula predicts exactly."""
    return {op: {"calls": int(row["calls"]), "bytes": int(row["bytes"])} for op, row in comm.items()}


def ledger_by_op(ledger: CommLedger, group: dist.ProcessGroup | None = None) -> dict[str, dict[str, float]]:
    """{op: {calls, bytes, wire_bytes}} of the ledger's collectives on one group (default: the world)."""
    ranks = tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
    return {op: dict(row) for (op, g), row in ledger.summary().items() if g == ranks}


def record_in_open_ledgers(op: str, group: tuple[int, ...], nbytes: int) -> None:
    """Add one collective to every ledger whose `with` block is open (any thread)."""
    for ledger in _OPEN:
        ledger.record(op, group, nbytes)


@contextmanager
def hidden_from_ledgers() -> Iterator[None]:
    """Collectives dispatched in this block on this thread are not recorded (already recorded)."""
    _HIDDEN.depth = getattr(_HIDDEN, "depth", 0) + 1
    try:
        yield
    finally:
        _HIDDEN.depth -= 1


def ddp_allreduce_hook(process_group, bucket):  # no annotations: DDP compares them to real types
    """DDP comm hook = DDP's default reduction, recorded in the open ledgers.

    Backward (per bucket): all-reduce(SUM) of the flat bucket pre-divided by the group size,
    i.e. the mean gradient; forward: nothing. Register with
    `ddp_model.register_comm_hook(group, ddp_allreduce_hook)`.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    buf = bucket.buffer()
    record_in_open_ledgers("all_reduce", tuple(dist.get_process_group_ranks(group)),
                           buf.numel() * buf.element_size())
    with hidden_from_ledgers():  # on CPU the dispatcher sees this all-reduce too
        return allreduce_hook(process_group, bucket)
