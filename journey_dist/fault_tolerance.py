"""No silent hangs: notice a dead rank, name it, and stop the survivors with a clear message.

Three layers, cheapest first:
1. Collective timeouts (runtime.init_distributed): a collective whose peer never arrives fails
   after `timeout` instead of waiting forever. Gloo also fails at once when a peer's TCP
   connection closes (the peer process died), but the error names a socket, not a rank.
2. The launcher: runtime.spawn and torchrun's agent both watch the worker processes; when one
   exits non-zero they stop the rest and report the failed rank and its exit code.
3. `Heartbeat` (this module): each rank bumps a counter in the job's key-value store every
   `interval_s`; a peer whose counter has not moved for `stale_s` is dead or stuck. Survivors
   then fail with `PeerFailure` naming the rank, its host/pid, the last step it reported and how
   long it has been silent -- also where no collective would notice (a rank stuck in a data
   loader, a half-open TCP connection after a node vanished, NCCL without async error handling).

Counters, not timestamps: each rank measures silence on its own clock, so host clock skew
does not matter. Every rank polls every other rank's key, O(world^2) store reads per interval:
right for labs and small jobs; at scale torchrun's agent and NCCL's watchdog do this job.
The beats come from a thread, so a rank busy in a long step keeps beating (the GIL is released
by sleeps, I/O and torch kernels, and handed over every few ms by Python code); only a frozen or
dead process goes silent. At the end, `finish()` marks a rank done (peers stop watching it)
before its last barrier, and `stop()` ends the thread; without them the end of a job would look
like a failure. runtime.launch()/spawn() run one for every lab (runtime.start_job_heartbeat).

And the other way round, `exit_with_parent`: a spawned rank dies with its launcher instead of
training on as an orphan.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch.distributed as dist

EXIT_PEER_FAILED = 43  # exit code of a rank that stopped because a peer died
EXIT_PARENT_DIED = 44  # exit code of a rank whose launcher died (where the kernel cannot kill it)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class PeerFailure(RuntimeError):
    """Another rank died or stopped responding; the message names it."""


@dataclass
class PeerState:
    rank: int
    beats: int = -1  # last counter seen (-1: none yet)
    step: int = -1
    host: str = "?"
    pid: int = -1
    changed_at: float = 0.0  # local monotonic time the counter last moved
    done: bool = False  # the rank called finish(): it is in its last barrier or gone

    def describe(self, now: float) -> str:
        where = f"{self.host} pid {self.pid}" if self.pid >= 0 else "never reported"
        progress = f"last step {self.step}" if self.step >= 0 else "no step reported"
        return f"rank {self.rank} ({where}) silent for {now - self.changed_at:.1f}s, {progress}"


class Heartbeat:
    """Background heartbeat over the default process group's store.

        hb = Heartbeat(interval_s=0.5, stale_s=5).start()
        train(..., on_step=lambda step, m, o: hb.beat(step))
        hb.stop()

    With `abort=True` a rank that finds a dead peer prints the PeerFailure message to stderr,
    hands it to `on_abort` (e.g. to write the launcher's error file), and exits with
    EXIT_PEER_FAILED without running any collective (its main thread may be blocked inside one
    that would otherwise wait for the full collective timeout). `hint` is appended to the message;
    `store_host` names the process hosting the store, for when the store itself stops answering.
    The thread is a daemon: it never keeps the process alive.
    """

    def __init__(self, interval_s: float = 0.5, stale_s: float = 5.0, *, abort: bool = True,
                 prefix: str = "journey/heartbeat", on_abort: Callable[[str], None] | None = None,
                 hint: str = "", store_host: str = "the launcher (runtime.spawn or torchrun's agent)"):
        if stale_s <= interval_s:
            raise ValueError(f"stale_s={stale_s} must exceed interval_s={interval_s}; use a stale_s of a few "
                             f"intervals (e.g. {3 * interval_s})")
        self.interval_s, self.stale_s, self.abort, self.prefix = interval_s, stale_s, abort, prefix
        self.on_abort, self.hint, self.store_host = on_abort, hint, store_host
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # The caller's thread (start, beat, finish) uses the process group's own store client. The
        # thread opens its own (in the background: a connection can take seconds on a slow resolver),
        # so it never waits behind a long store wait of the main thread, e.g. in new_group().
        self._default_store = dist.distributed_c10d._get_default_store()
        self.store = None
        self._lock = threading.Lock()  # orders this rank's writes to its key
        self._fail_lock = threading.Lock()  # apart: a write stuck on a frozen store holds _lock
        self.step = -1
        self.failure: PeerFailure | None = None
        self.detected_at: float | None = None  # time.time() when the failure was seen
        self._beats = 0
        self._finished = False
        self._last_round = 0.0  # monotonic time the thread last finished a publish + poll
        self._peers = {r: PeerState(r) for r in range(self.world) if r != self.rank}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="journey-heartbeat", daemon=True)
        # A store whose host froze (a SIGSTOPped launcher) does not fail a store call: the call
        # blocks past the store's timeout. The watchdog notices the heartbeat thread stuck in one
        # and names the store's host instead.
        self._watchdog = threading.Thread(target=self._watch_store, name="journey-heartbeat-watchdog",
                                          daemon=True)

    def start(self) -> Heartbeat:
        now = time.monotonic()
        for peer in self._peers.values():
            peer.changed_at = now  # a peer that never reports is stale stale_s after start
        self._publish(self._default_store)
        self._last_round = now
        self._thread.start()
        self._watchdog.start()
        return self

    def beat(self, step: int) -> None:
        """Record progress (call from the training loop after each step); published at once,
        so a failure report names the last step a dead rank finished (one store round trip)."""
        self.step = step
        self._publish(self._default_store)

    def finish(self) -> None:
        """Mark this rank done, before its last barrier: peers stop watching it, and this rank keeps
        watching the ones still working (a peer that freezes now is still named). After finish, a
        store that stops answering means the job is ending (its host may exit after the barrier):
        the thread then quits quietly, and the barrier's collective timeout is the backstop."""
        with self._lock:
            self._finished = True
            self._beats += 1
            self._default_store.set(f"{self.prefix}/{self.rank}", self._value(done=True))

    def stop(self) -> None:
        """End the threads (call before the process group is destroyed). A thread still opening
        its connection is not waited for: it sees the stop once connected (it is a daemon)."""
        self._stop.set()
        for thread in (self._thread, self._watchdog):
            if self.store is not None and thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout=2 * self.interval_s + 1)

    def peers(self) -> dict[int, PeerState]:
        """What this rank last saw of each peer (copies): beats, step, done, host, pid."""
        return {r: replace(p) for r, p in self._peers.items()}

    def check(self) -> None:
        """Raise the PeerFailure the thread found, if any (for a main thread between steps)."""
        if self.failure is not None:
            raise self.failure

    def _value(self, done: bool = False) -> str:
        return f"{self._beats}:{self.step}:{int(done)}:{os.getpid()}:{socket.gethostname()}"

    def _publish(self, store=None) -> None:
        with self._lock:
            if self._finished:  # keep the done mark
                return
            self._beats += 1
            (store or self.store).set(f"{self.prefix}/{self.rank}", self._value())

    def _poll(self) -> list[PeerState]:
        now = time.monotonic()
        keys = [f"{self.prefix}/{r}" for r in self._peers]
        present = [k for k in keys if self.store.check([k])]
        values = dict(zip(present, self.store.multi_get(present))) if present else {}
        for r, peer in self._peers.items():
            raw = values.get(f"{self.prefix}/{r}")
            if raw is None:
                continue
            beats, step, done, pid, host = raw.decode().split(":", 4)
            if int(beats) != peer.beats:
                peer.beats, peer.step, peer.done = int(beats), int(step), done == "1"
                peer.host, peer.pid, peer.changed_at = host, int(pid), now
        return [p for p in self._peers.values() if not p.done and now - p.changed_at > self.stale_s]

    def _loop(self) -> None:
        try:
            store = self._default_store
            self.store = store.clone() if hasattr(store, "clone") else store
        except Exception as e:
            if not (self._stop.is_set() or self._finished):
                self._fail(self._store_lost(str(e).splitlines()[0] if str(e) else type(e).__name__))
            return
        while not self._stop.wait(self.interval_s):
            try:
                self._publish()
                dead = self._poll()
            except Exception as e:  # the store is gone: so is the process hosting it
                if self._stop.is_set() or self._finished:
                    return  # the job is ending: the store's host may already have exited
                self._fail(self._store_lost(str(e).splitlines()[0] if str(e) else type(e).__name__))
                return
            self._last_round = time.monotonic()
            if dead:
                now = time.monotonic()
                self._fail(f"rank {self.rank}: peer(s) stopped responding: "
                           + "; ".join(p.describe(now) for p in dead))
                return

    def _watch_store(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.failure is not None:
                return
            stuck = time.monotonic() - self._last_round
            if stuck > self.stale_s and not self._finished:
                self._fail(self._store_lost(f"no answer for {stuck:.1f}s"))
                return

    def _store_lost(self, why: str) -> str:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        return (f"rank {self.rank}: the job's key-value store at {where} stopped answering ({why}): "
                f"{self.store_host}, which hosts it, died or froze")

    def _fail(self, message: str) -> None:
        with self._fail_lock:
            if self.failure is not None:  # the other thread got there first
                return
            message += self.hint
            self.failure = PeerFailure(message)
            self.detected_at = time.time()
        if self.abort:
            print(message, file=sys.stderr, flush=True)
            if self.on_abort is not None:
                with contextlib.suppress(Exception):  # the report is best effort; exiting is not
                    self.on_abort(message)
            os._exit(EXIT_PEER_FAILED)


def exit_with_parent(parent_pid: int) -> None:
    """End this process when `parent_pid` (its launcher) dies, so no rank trains on as an orphan.

    Linux: PR_SET_PDEATHSIG makes the kernel send SIGKILL when the parent exits (it also works
    on a stopped or blocked process). Elsewhere, or if prctl fails: a daemon thread polls
    os.getppid() twice a second and exits with EXIT_PARENT_DIED once the parent is gone. Call it
    first thing in a child of `parent_pid`; a parent that died before the call is caught too.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
            if os.getppid() != parent_pid:  # died before prctl took effect
                _parent_died(parent_pid)
            return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        _parent_died(parent_pid)

    threading.Thread(target=watch, name="journey-parent-watch", daemon=True).start()


def _parent_died(parent_pid: int) -> None:
    print(f"rank pid {os.getpid()}: its launcher (pid {parent_pid}) died; exiting", file=sys.stderr,
          flush=True)
    os._exit(EXIT_PARENT_DIED)


@contextlib.contextmanager
def name_failed_peer(heartbeat: Heartbeat, wait_s: float | None = None) -> Iterator[None]:
    """Turn a collective's socket error into a PeerFailure naming the dead rank.

    When the block raises, wait up to `wait_s` (default: the heartbeat's staleness window plus
    two beats) for the heartbeat to identify which peer went silent, then raise PeerFailure
    from the original error. If no peer goes silent the original error propagates unchanged.
    """
    try:
        yield
    except PeerFailure:
        raise
    except Exception as error:
        deadline = time.monotonic() + (wait_s if wait_s is not None
                                       else heartbeat.stale_s + 2 * heartbeat.interval_s)
        while heartbeat.failure is None and time.monotonic() < deadline:
            time.sleep(heartbeat.interval_s / 4)
        if heartbeat.failure is not None:
            raise heartbeat.failure from error
        raise
