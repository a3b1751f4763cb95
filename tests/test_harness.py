"""The multi-rank harness itself: results in rank order, errors and hangs reported, not hung."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.dist import RankFailure, run_ranks


def _all_reduce_rank() -> tuple[int, int, float]:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def _rank1_raises() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 would wait forever without the harness


def _rank1_hangs() -> None:
    if dist.get_rank() == 1:
        time.sleep(600)


def _rank1_exits() -> None:
    if dist.get_rank() == 1:
        import os

        os._exit(3)
    dist.barrier()


def test_results_in_rank_order():
    assert run_ranks(_all_reduce_rank, 2) == [(0, 2, 3.0), (1, 2, 3.0)]


def test_a_port_taken_by_another_job_cannot_break_the_rendezvous(monkeypatch):
    """spawn's launcher hosts the store on a port it keeps bound. Finding a free port and releasing
    it let another job on the machine take it first: rank 0 then failed to bind, or worse, ranks of
    two jobs met in one store. Simulated: every 'free' port found is already taken."""
    import socket

    import journey_dist.runtime as runtime

    with socket.socket() as other_job:
        other_job.bind(("127.0.0.1", 0))
        other_job.listen()
        monkeypatch.setattr(runtime, "find_free_port", lambda: other_job.getsockname()[1])
        assert run_ranks(_all_reduce_rank, 2) == [(0, 2, 3.0), (1, 2, 3.0)]


def test_four_ranks():
    results = run_ranks(_all_reduce_rank, 4)
    assert [r[0] for r in results] == [0, 1, 2, 3] and all(r[2] == 10.0 for r in results)


def test_rank_exception_reports_traceback():
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"(?s)rank 1 failed.*boom on purpose"):
        run_ranks(_rank1_raises, 2, collective_timeout_s=20)
    assert time.monotonic() - t0 < 60


def test_hung_rank_is_named_and_killed():
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"still running|failed"):
        run_ranks(_rank1_hangs, 2, timeout_s=8, collective_timeout_s=5)
    assert time.monotonic() - t0 < 30


def test_dead_rank_is_named():
    with pytest.raises(RankFailure, match=r"(?s)rank 1 failed.*exit code 3"):
        run_ranks(_rank1_exits, 2, collective_timeout_s=20)
