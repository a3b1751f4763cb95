"""The collective ledger counts what was really handed to each collective."""

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from journey_dist.comm import CommLedger, analytic, ring_factor
from tests.dist import run_ranks


def _collectives():
    t = torch.ones(16)  # 64 bytes
    with CommLedger() as ledger:
        dist.all_reduce(t)
        dist.all_gather_into_tensor(torch.empty(32), t)
        dist.reduce_scatter_tensor(torch.empty(8), t)
        dist.broadcast(t, 0)
        funcol.wait_tensor(funcol.all_reduce(t, "sum", dist.group.WORLD))
        funcol.wait_tensor(funcol.all_gather_tensor(t, 0, dist.group.WORLD))
        if dist.get_rank() == 0:
            dist.send(t, 1)
        else:
            dist.recv(t, 0)
    return ledger.to_dict(), ledger.total_bytes("all_reduce"), ledger.calls()


def test_ledger_counts_eager_and_functional_collectives():
    rows, all_reduce_bytes, calls = run_ranks(_collectives, 2)[0]
    by_op = {r["op"]: r for r in rows}
    assert calls == 7
    assert all_reduce_bytes == 2 * 64 and by_op["all_reduce"]["calls"] == 2
    assert by_op["all_gather"]["bytes"] == 2 * 128  # the gathered (full) buffer, both APIs
    assert by_op["reduce_scatter"]["bytes"] == 64
    assert by_op["send"]["bytes"] == 64 and by_op["send"]["group"] == [0, 1]
    assert by_op["all_reduce"]["wire_bytes"] == pytest.approx(2 * 64)  # 2(n-1)/n = 1 for n=2


def test_ring_factors():
    assert ring_factor("all_reduce", 4) == 1.5
    assert ring_factor("all_gather", 4) == 0.75
    assert ring_factor("reduce_scatter", 8) == 7 / 8
    assert ring_factor("all_reduce", 1) == 0.0


def test_analytic_volume():
    assert analytic("all_reduce", [64, 64, 32], 4) == {"calls": 3, "bytes": 160, "wire_bytes": 240.0}
    assert analytic("all_gather", [], 2) == {"calls": 0, "bytes": 0, "wire_bytes": 0.0}
