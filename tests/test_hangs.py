"""Every job launch()/spawn() starts is guarded: a frozen rank is named and the job ends, a slow
rank is left alone, ranks die with their launcher, and bad timeouts fail before any rank starts.

The fault cases (slow suite) run tests/fault_job.py, a 2-rank data-parallel job on preset tiny,
as a learner runs a lab: plain python (runtime.spawn) or torchrun. The collective timeout is
pinned at 120 s there, so a job that ends well before it was ended by the heartbeat. Hang
timeouts here are 6 s, not 1 s: opening the heartbeat's store connection can take 5 s on a
machine whose resolver drops queries (c10d looks up the peer's name), and such a rank must not
look frozen.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

from journey_dist.config import ConfigError
from journey_dist.runtime import (
    COLLECTIVE_TIMEOUT_ENV,
    DEFAULT_HANG_TIMEOUT_S,
    HANG_TIMEOUT_ENV,
    add_timeout_flags,
    configured_collective_timeout,
    configured_hang_timeout,
    job_heartbeat,
    launch,
    spawn,
)
from tests.dist import run_ranks

ROOT = Path(__file__).resolve().parents[1]
JOB = str(ROOT / "tests" / "fault_job.py")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", COLLECTIVE_TIMEOUT_ENV: "120", **extra}


def _tail(text: str, n: int) -> str:
    return "\n".join([line for line in text.splitlines() if line.strip()][-n:])


def _kill_leftovers(marks: Path, started: float) -> None:
    """Kill rank processes this test started that are still there (only on a failing run)."""
    for pid_file in marks.glob("rank*.pid"):
        try:
            p = psutil.Process(int(pid_file.read_text()))
            if p.create_time() >= started - 1:  # not a recycled pid
                p.kill()
        except (psutil.NoSuchProcess, ValueError):
            pass


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --------------------------------------------------------------------- timeouts: env, flags, checks


def test_timeouts_come_from_env_and_flags(monkeypatch):
    monkeypatch.delenv(HANG_TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(COLLECTIVE_TIMEOUT_ENV, raising=False)
    assert configured_hang_timeout() == DEFAULT_HANG_TIMEOUT_S <= 60
    assert configured_collective_timeout() == 120
    monkeypatch.setenv(HANG_TIMEOUT_ENV, "7")
    assert configured_hang_timeout() == 7
    parser = argparse.ArgumentParser()
    add_timeout_flags(parser)
    args = parser.parse_args(["--hang-timeout", "9", "--collective-timeout", "45"])
    assert (args.hang_timeout, args.collective_timeout) == (9, 45)
    assert configured_hang_timeout() == 9 and configured_collective_timeout() == 45  # the flag wins
    assert parser.parse_args(["--hang-timeout", "0"]).hang_timeout == 0  # off


@pytest.mark.parametrize("argv, problem", [
    (["--hang-timeout", "-1"], r"--hang-timeout='-1' is not a valid timeout; use a number of seconds >= 0"),
    (["--collective-timeout", "0"], r"--collective-timeout='0' is not a valid timeout; use .* > 0"),
    (["--hang-timeout", "soon"], r"--hang-timeout='soon' is not a valid timeout"),
])
def test_bad_timeout_flag_is_argparse_error(argv, problem, capsys):
    parser = argparse.ArgumentParser()
    add_timeout_flags(parser)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 2 and re.search(problem, capsys.readouterr().err)


def _never_runs() -> None:
    raise AssertionError("no rank may start with a bad timeout")


@pytest.mark.parametrize("name, value", [(HANG_TIMEOUT_ENV, "-3"), (HANG_TIMEOUT_ENV, "nan"),
                                         (COLLECTIVE_TIMEOUT_ENV, "0"), (COLLECTIVE_TIMEOUT_ENV, "2 min")])
def test_bad_timeout_env_fails_before_any_rank(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    for start in (lambda: launch(_never_runs, 2), lambda: spawn(_never_runs, 2)):
        with pytest.raises(ConfigError, match=rf"{name}='{value}' is not a valid timeout; use a number of "
                                              rf"seconds .*\(or unset {name} for the default"):
            start()
    assert not dist.is_initialized()


# --------------------------------------------------------------------- a slow rank is not a dead one

HANG_S = 6.0
HANG_ENV = {HANG_TIMEOUT_ENV: str(HANG_S)}


def _slow_rank() -> tuple[int, int]:
    """Rank 1 sleeps 2x the hang timeout twice: mid-step, while rank 0 waits in an all-reduce, and
    at the end, while rank 0 (finished) waits in launch's last barrier. Rank 0 returns the beats it
    saw from rank 1 during the first sleep."""
    hb = job_heartbeat()
    assert hb is not None and hb.stale_s == HANG_S
    peer = 1 - dist.get_rank()
    before = hb.peers()[peer].beats
    if dist.get_rank() == 1:
        time.sleep(2 * HANG_S)  # the main thread is busy; the heartbeat thread keeps beating
    dist.all_reduce(torch.ones(1))
    seen = hb.peers()[peer].beats - before
    if dist.get_rank() == 1:
        time.sleep(2 * HANG_S)
    return seen, hb.peers()[peer].beats


@pytest.mark.slow
def test_slow_rank_is_not_declared_dead():
    (seen_by_0, _), _ = run_ranks(_slow_rank, 2, hang_timeout_s=HANG_S, timeout_s=120)
    assert seen_by_0 >= 3, f"rank 0 saw only {seen_by_0} beats from rank 1 in {2 * HANG_S}s: not watching?"


# --------------------------------------------------------------------- a frozen rank is named


@pytest.mark.slow
@pytest.mark.parametrize("mode, victim, named", [
    ("freeze", 1, r"rank 0: peer\(s\) stopped responding: rank 1 \(\S+ pid \d+\) silent for"),
    ("freeze", 0, r"rank 1: peer\(s\) stopped responding: rank 0 \(\S+ pid \d+\) silent for"),
    ("freeze-at-end", 1, r"rank 0: peer\(s\) stopped responding: rank 1 \(\S+ pid \d+\) silent for"),
], ids=["rank 1 mid-step", "rank 0 mid-step (the store is the launcher's)",
        "rank 1 while rank 0 waits at the end"])
def test_frozen_rank_under_spawn_is_named(tmp_path, mode, victim, named):
    """python fault_job.py (runtime.spawn), hang timeout 6 s: a survivor names the frozen rank
    within 6 s + a beat, the launcher's 3 s grace stops the rest, and the job exits non-zero
    with the name in its last lines -- far inside the 120 s collective timeout."""
    started = time.time()
    try:
        proc = subprocess.run([sys.executable, JOB, mode, str(tmp_path), str(victim)], cwd=ROOT, text=True,
                              env=_env(**HANG_ENV), capture_output=True, timeout=240)
        elapsed = time.time() - float((tmp_path / "frozen_at").read_text())
    finally:
        _kill_leftovers(tmp_path, started)
    tail = _tail(proc.stdout + proc.stderr, 4)
    assert proc.returncode != 0 and re.search(named, tail), tail
    assert f"rank(s) [{victim}] were still running and were stopped" in tail, tail
    assert elapsed < 60, f"{elapsed:.1f}s from the freeze to the end of the job: not the heartbeat"


@pytest.mark.slow
def test_frozen_rank_under_torchrun_is_named(tmp_path):
    """torchrun, hang timeout 6 s: rank 0 names rank 1 in torchrun's failure report, the last lines
    of the job's output; the job ends after torchrun's 30 s SIGTERM grace for the frozen rank."""
    started = time.time()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", JOB, "freeze", str(tmp_path),
           "1"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(**HANG_ENV), capture_output=True,
                              text=True, timeout=300)
        elapsed = time.time() - float((tmp_path / "frozen_at").read_text())
    finally:
        _kill_leftovers(tmp_path, started)
    tail = _tail(proc.stderr, 10)
    assert proc.returncode != 0, tail
    assert re.search(r"traceback : rank 0: peer\(s\) stopped responding: rank 1 \(\S+ pid \d+\)", tail), tail
    assert elapsed <= 90, f"{elapsed:.1f}s from the freeze to the end of the job"


# --------------------------------------------------------------------- no orphans


@pytest.mark.slow
def test_killed_launcher_leaves_no_ranks(tmp_path):
    """kill -9 of `python fault_job.py forever` (its ranks train until killed): both ranks are
    gone within 5 s (PR_SET_PDEATHSIG), not training on as orphans."""
    started = time.time()
    launcher = subprocess.Popen([sys.executable, JOB, "forever", str(tmp_path)], cwd=ROOT, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while len(list(tmp_path.glob("rank*.pid"))) < 2 and time.monotonic() < deadline:
            assert launcher.poll() is None, "the job ended on its own"
            time.sleep(0.2)
        time.sleep(0.5)  # a complete pid file
        ranks = [psutil.Process(int(f.read_text())) for f in sorted(tmp_path.glob("rank*.pid"))]
        assert len(ranks) == 2 and not any(_gone(p) for p in ranks)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        t0 = time.monotonic()
        while not all(_gone(p) for p in ranks) and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        alive = [p.pid for p in ranks if not _gone(p)]
        assert not alive, f"rank processes {alive} outlived their launcher by 5 s"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        _kill_leftovers(tmp_path, started)
