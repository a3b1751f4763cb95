"""A 2-rank data-parallel job (preset tiny) that the fault tests break from inside or outside.

    python tests/fault_job.py MODE MARKS [VICTIM]               # ranks spawned by runtime.launch
    python -m torch.distributed.run --nproc_per_node=2 tests/fault_job.py MODE MARKS [VICTIM]

MODE freeze: rank VICTIM writes MARKS/frozen_at (time.time()) and SIGSTOPs itself after the
backward pass of step 3, so its peers wait in the gradient all-reduce (a node that hung: no exit,
no closed socket). freeze-at-end: the other ranks finish (they wait in launch()'s last barrier),
then the victim freezes. forever: train until killed. Every rank writes MARKS/rank<r>.pid first
(so a test can check, and clean up, exactly the processes it started).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from journey_dist.config import get_preset
from journey_dist.model import GPT
from journey_dist.parallel.data.replicas import make_data_parallel
from journey_dist.runtime import launch


def freeze(marks: Path) -> None:
    (marks / "frozen_at").write_text(str(time.time()))
    os.kill(os.getpid(), signal.SIGSTOP)


def rank_main(mode: str, marks: str, victim: int) -> int:
    torch.set_num_threads(1)
    config = get_preset("tiny")
    torch.manual_seed(0)
    model = GPT(config)
    dp = make_data_parallel("naive", model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    me, steps = dist.get_rank(), 2 if mode == "freeze-at-end" else 10**9
    Path(marks, f"rank{me}.pid").write_text(str(os.getpid()))
    for step in range(steps):
        x = torch.randint(0, config.vocab_size, (2, config.block_size))
        _, loss = model(x, x)
        loss.backward()
        if mode == "freeze" and me == victim and step == 3:
            freeze(Path(marks))
        dp.sync_grads()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if me == victim:  # freeze-at-end: the others are already in their last barrier
        time.sleep(1.0)
        freeze(Path(marks))
    return steps


if __name__ == "__main__":
    mode, marks = sys.argv[1], sys.argv[2]
    victim = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    if mode not in ("freeze", "freeze-at-end", "forever"):
        raise SystemExit(f"unknown mode {mode!r}; use freeze, freeze-at-end or forever")
    launch(rank_main, 2, mode, marks, victim)
