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
Call `stop()` before the process group is destroyed, or the end of the job looks like a failure.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist

EXIT_PEER_FAILED = 43  # exit code of a rank that stopped because a peer died


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

    def describe(self, now: float) -> str:
        where = f"{self.host} pid {self.pid}" if self.pid >= 0 else "never reported"
        return (f"rank {self.rank} ({where}) silent for {now - self.changed_at:.1f}s, "
                f"last step {self.step}")


class Heartbeat:
    """Background heartbeat over the default process group's store.

        hb = Heartbeat(interval_s=0.5, stale_s=5).start()
        train(..., on_step=lambda step, m, o: hb.beat(step))
        hb.stop()

    With `abort=True` a rank that finds a dead peer prints the PeerFailure message to stderr and
    exits with EXIT_PEER_FAILED (its main thread may be blocked inside a collective that would
    otherwise wait for the full collective timeout).
    """

    def __init__(self, interval_s: float = 0.5, stale_s: float = 5.0, *, abort: bool = True,
                 prefix: str = "journey/heartbeat"):
        if stale_s <= interval_s:
            raise ValueError(f"stale_s={stale_s} must exceed interval_s={interval_s}; use a stale_s of a few "
                             f"intervals (e.g. {3 * interval_s})")
        self.interval_s, self.stale_s, self.abort, self.prefix = interval_s, stale_s, abort, prefix
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        store = dist.distributed_c10d._get_default_store()
        # Own connections: one for the thread, one for beat() on the main thread.
        self.store = store.clone() if hasattr(store, "clone") else store
        self._main_store = store.clone() if hasattr(store, "clone") else store
        self._lock = threading.Lock()
        self.step = -1
        self.failure: PeerFailure | None = None
        self.detected_at: float | None = None  # time.time() when the failure was seen
        self._beats = 0
        self._peers = {r: PeerState(r) for r in range(self.world) if r != self.rank}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="journey-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        now = time.monotonic()
        for peer in self._peers.values():
            peer.changed_at = now  # a peer that never reports is stale stale_s after start
        self._publish()
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        """Record progress (call from the training loop after each step); published at once,
        so a failure report names the last step a dead rank finished (one store round trip)."""
        self.step = step
        self._publish(self._main_store)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval_s + 1)

    def check(self) -> None:
        """Raise the PeerFailure the thread found, if any (for a main thread between steps)."""
        if self.failure is not None:
            raise self.failure

    def _publish(self, store=None) -> None:
        with self._lock:
            self._beats += 1
            value = f"{self._beats}:{self.step}:{socket.gethostname()}:{os.getpid()}"
            (store or self.store).set(f"{self.prefix}/{self.rank}", value)

    def _poll(self) -> list[PeerState]:
        now = time.monotonic()
        keys = [f"{self.prefix}/{r}" for r in self._peers]
        present = [k for k in keys if self.store.check([k])]
        values = dict(zip(present, self.store.multi_get(present))) if present else {}
        for r, peer in self._peers.items():
            raw = values.get(f"{self.prefix}/{r}")
            if raw is None:
                continue
            beats, step, host, pid = raw.decode().split(":", 3)
            if int(beats) != peer.beats:
                peer.beats, peer.step, peer.host, peer.pid = int(beats), int(step), host, int(pid)
                peer.changed_at = now
        return [p for p in self._peers.values() if now - p.changed_at > self.stale_s]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._publish()
                dead = self._poll()
                message = None
                if dead:
                    now = time.monotonic()
                    message = (f"rank {self.rank}: peer(s) stopped responding: "
                               + "; ".join(p.describe(now) for p in dead))
            except Exception as e:  # the store itself is gone: its host died
                if self._stop.is_set():
                    return  # stopping anyway (the job is ending)
                message = (f"rank {self.rank}: the job's key-value store is unreachable ({e}); "
                           "the rank or agent hosting it (rank 0 / MASTER_ADDR) has died")
            if message:
                self._fail(message)
                return

    def _fail(self, message: str) -> None:
        self.failure = PeerFailure(message)
        self.detected_at = time.time()
        if self.abort:
            print(message, file=sys.stderr, flush=True)
            os._exit(EXIT_PEER_FAILED)


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
