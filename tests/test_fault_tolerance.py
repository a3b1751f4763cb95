"""No silent hangs: a rank killed mid-step, or frozen, ends the job within seconds, named.

Measured deadlines are generous (60 s) because the box is shared; the collective timeout is
30 s, so a pass under ~30 s also shows the detection did not wait for it.
"""

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from journey_dist.config import get_preset
from journey_dist.data import load_tokens
from journey_dist.fault_tolerance import EXIT_PEER_FAILED, Heartbeat, PeerFailure
from journey_dist.resumable import dp_run_with_a_dead_rank
from journey_dist.train import TrainConfig
from tests.dist import RankFailure, run_ranks

CFG = TrainConfig(steps=6, batch_size=4, warmup_steps=1, log_every=1)


def _dp_rank_dies_mid_step(die_at: int, code: int, marks: str) -> None:
    """2-rank naive DP; rank 1 exits inside the gradient sync of step `die_at` (after backward,
    before its all-reduce), so rank 0 is left waiting in the all-reduce (lab 10's step 5)."""
    torch.set_num_threads(1)
    dp_run_with_a_dead_rank(get_preset("tiny"), load_tokens("handbook"), CFG, marks, die_at=die_at,
                            exit_code=code)


def test_rank_killed_mid_step_is_named_quickly(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_dp_rank_dies_mid_step, 2, 2, 17, str(tmp_path), timeout_s=90, collective_timeout_s=30,
                  failure_grace_s=20)  # a loaded box: let the survivor report
    elapsed = time.monotonic() - t0
    message = str(info.value)
    assert "rank 1 failed" in message and "exit code 17" in message  # the launcher's view
    # The survivor's own error names the dead peer (heartbeat), not just a closed socket.
    assert "rank 0 failed" in message and "PeerFailure" in message, message
    assert re.search(r"stopped responding: rank 1 \(\S+ pid \d+\) silent for [\d.]+s, last step", message)
    assert elapsed < 60, elapsed
    # the time stamps lab 10 reads: rank 1's death, then rank 0's error, within the collective timeout
    detected_at, detected = (tmp_path / "detected").read_text().split("\n", 1)
    assert 0 < float(detected_at) - float((tmp_path / "died").read_text()) < 30
    assert detected.startswith("rank 0: peer(s) stopped responding: rank 1 ("), detected


def _rank1_freezes(marks: str) -> None:
    hb = Heartbeat(interval_s=0.2, stale_s=1.5, abort=True).start()
    for step in range(3):  # all alive: the heartbeat stays quiet
        hb.beat(step)
        time.sleep(0.5)
        dist.barrier()
    hb.check()
    if dist.get_rank() == 1:
        Path(marks, "frozen_at").write_text(str(time.time()))
        os.kill(os.getpid(), signal.SIGSTOP)  # like a node that vanished: no exit, no RST
    dist.barrier()  # rank 0 would wait here for the whole collective timeout


def test_frozen_rank_is_detected_before_the_collective_timeout(capfd, tmp_path):
    """From the freeze to the job's end: heartbeat staleness (1.5 s) + a poll + the launcher's
    3 s grace, far below the 60 s collective timeout."""
    with pytest.raises(RankFailure, match=rf"(?s)rank 0 failed.*exit code {EXIT_PEER_FAILED}"):
        run_ranks(_rank1_freezes, 2, str(tmp_path), timeout_s=120, collective_timeout_s=60)
    elapsed = time.time() - float((tmp_path / "frozen_at").read_text())
    err = capfd.readouterr().err
    assert "rank 0: peer(s) stopped responding: rank 1 (" in err, err
    assert elapsed < 30, f"took {elapsed:.1f}s from the freeze: the collective timeout, not the heartbeat"


def test_heartbeat_arguments_are_checked():
    with pytest.raises(ValueError, match="stale_s"):
        Heartbeat.__init__(object.__new__(Heartbeat), interval_s=1.0, stale_s=0.5)
    assert issubclass(PeerFailure, RuntimeError)
