"""Process groups, devices, seeding, rank-0 printing, results, and spawning ranks.

`launch(fn, world_size)` is how every lab starts: under `torchrun` it joins the
job torchrun made; under plain `python` (or a notebook) it spawns `world_size`
local ranks on a free port. The same `spawn` is the test harness's engine, so
tests exercise exactly what users run.

No silent hangs: every collective has a timeout ($JOURNEY_TIMEOUT, default 120 s), every
multi-rank job runs a heartbeat that names a frozen or dead peer within $JOURNEY_HANG_TIMEOUT
(default 30 s; `add_timeout_flags` gives a lab the matching flags), the error path runs no
collective, and spawned ranks die with their launcher.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from journey_dist.config import ConfigError
from journey_dist.fault_tolerance import Heartbeat, exit_with_parent

COLLECTIVE_TIMEOUT_ENV = "JOURNEY_TIMEOUT"
HANG_TIMEOUT_ENV = "JOURNEY_HANG_TIMEOUT"
DEFAULT_COLLECTIVE_TIMEOUT_S = 120.0
DEFAULT_HANG_TIMEOUT_S = 30.0  # + torchrun's 30 s SIGTERM grace for a frozen rank: the job ends in ~60 s
_HEARTBEAT_PREFIX = "journey/job-heartbeat"  # apart from any Heartbeat a lab starts itself
_job_heartbeat: Heartbeat | None = None


class RankFailure(RuntimeError):
    """A spawned rank raised, died, or missed its deadline; the message names it."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank0() -> bool:
    return get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only, flushed so interleaving with other ranks stays readable."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


def pick_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where tensors a group sends must live: this rank's GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch on every device."""
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def default_backend() -> str:
    """nccl when every local rank can have its own GPU, else gloo on CPU.

    NCCL refuses two ranks on one GPU, so e.g. 2 ranks on a 1-GPU Colab run on gloo/CPU.
    """
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        return "nccl"
    if torch.cuda.is_available() and os.environ.get("RANK", "0") == "0":
        print(f"note: {local_world} local ranks but {torch.cuda.device_count()} GPU(s); "
              "NCCL needs one GPU per rank, so this run uses gloo on CPU", flush=True)
    return "gloo"


# --------------------------------------------------------------------- timeouts


def _parse_seconds(text: str, what: str, allow_zero: bool) -> float:
    """`text` as seconds (> 0, or >= 0 with allow_zero); ValueError naming `what` and the fix."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
        floor = "a number of seconds >= 0 (0 turns it off)" if allow_zero else "a number of seconds > 0"
        raise ValueError(f"{what}={text!r} is not a valid timeout; use {floor}, e.g. 60")
    return value


def _seconds_from_env(name: str, default: float, allow_zero: bool) -> float:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return _parse_seconds(text, name, allow_zero)
    except ValueError as e:
        raise ConfigError(f"{e} (or unset {name} for the default {default:g})") from None


def configured_collective_timeout() -> float:
    """Seconds a collective waits for its peers before failing: $JOURNEY_TIMEOUT (set by the
    --collective-timeout flag), default 120. Above the longest legitimate wait (a checkpoint save,
    a first-step compilation). Read at call time; ConfigError for a bad value."""
    return _seconds_from_env(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S, allow_zero=False)


def configured_hang_timeout() -> float:
    """Seconds without a heartbeat after which a peer counts as frozen or dead: $JOURNEY_HANG_TIMEOUT
    (set by the --hang-timeout flag), default 30; 0 turns the job heartbeat off (e.g. to stop a rank
    in gdb). The beats come from a thread, so a rank that is merely slow is never declared dead."""
    return _seconds_from_env(HANG_TIMEOUT_ENV, DEFAULT_HANG_TIMEOUT_S, allow_zero=True)


class _ExportSeconds(argparse.Action):
    """Store a timeout flag in its environment variable, the one place every reader looks
    (launch/spawn in this process, and spawned ranks, which inherit the environment)."""

    def __init__(self, *args: Any, env: str, **kwargs: Any):
        self.env = env
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        os.environ[self.env] = repr(values)


def add_timeout_flags(parser: argparse.ArgumentParser) -> None:
    """Add --hang-timeout and --collective-timeout to a lab's parser. Parsing one sets its
    environment variable (JOURNEY_HANG_TIMEOUT / JOURNEY_TIMEOUT), so the flag wins over the
    environment and reaches launch(), spawn() and every rank; a bad value is argparse's error."""
    def seconds(flag: str, allow_zero: bool) -> Callable[[str], float]:
        def parse(text: str) -> float:
            try:
                return _parse_seconds(text, flag, allow_zero)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        return parse

    parser.add_argument("--hang-timeout", type=seconds("--hang-timeout", True), metavar="S",
                        action=_ExportSeconds, env=HANG_TIMEOUT_ENV,
                        help=f"seconds without a heartbeat before a rank is named as hung and the job "
                             f"stops (default {DEFAULT_HANG_TIMEOUT_S:g}, env {HANG_TIMEOUT_ENV}; 0: off)")
    parser.add_argument("--collective-timeout", type=seconds("--collective-timeout", False), metavar="S",
                        action=_ExportSeconds, env=COLLECTIVE_TIMEOUT_ENV,
                        help=f"seconds a collective waits for its peers (default "
                             f"{DEFAULT_COLLECTIVE_TIMEOUT_S:g}, env {COLLECTIVE_TIMEOUT_ENV})")


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join (or create) the default process group from torchrun-style env variables.

    The backend is default_backend()'s (nccl when every local rank has its own GPU, else gloo)
    unless given. Every collective gets a timeout,
    so a dead peer ends the job with an error instead of a silent hang.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend is None:
        backend = default_backend()
    device = pick_device(local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world_size > 1:
                raise RankFailure("MASTER_PORT is not set; start with torchrun or launch()")
            os.environ["MASTER_PORT"] = str(find_free_port())
            os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # one process hosts its own store
        timeout = datetime.timedelta(seconds=timeout_s or configured_collective_timeout())
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs
        )
    return DistInfo(rank, world_size, local_rank, device, backend)


def start_job_heartbeat(hang_timeout: float | None = None,
                        on_abort: Callable[[str], None] | None = None) -> Heartbeat | None:
    """Start this rank's job heartbeat (every rank of a multi-rank job; launch/spawn call it).

    A peer silent for `hang_timeout` seconds (default: configured_hang_timeout()) is named on stderr and
    to `on_abort`, and this rank exits with EXIT_PEER_FAILED at once, running no collective; its
    launcher then stops the rest. Returns None for one rank or a timeout of 0 (off)."""
    global _job_heartbeat
    timeout = configured_hang_timeout() if hang_timeout is None else hang_timeout
    if timeout == 0 or get_world_size() == 1:
        return None
    hint = f" [hang timeout {timeout:g}s: {HANG_TIMEOUT_ENV} or --hang-timeout; 0 turns it off]"
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # set by torchrun and spawn
    host = os.environ.get(STORE_HOST_ENV) or (
        f"torchrun's agent on {os.environ.get('MASTER_ADDR', '?')}" if agent_store else "rank 0")
    _job_heartbeat = Heartbeat(interval_s=min(1.0, timeout / 5), stale_s=timeout, abort=True,
                               prefix=_HEARTBEAT_PREFIX, on_abort=on_abort, hint=hint,
                               store_host=host).start()
    return _job_heartbeat


def job_heartbeat() -> Heartbeat | None:
    """The heartbeat launch()/spawn() started in this rank (None when off or single-rank);
    `job_heartbeat().beat(step)` adds the last finished step to a failure report."""
    return _job_heartbeat


def shutdown(failed: bool = False) -> None:
    """End this rank's part of the job: stop its heartbeat, then destroy the process group.

    Normally a barrier comes first (a rank that leaves early can make a peer's last collective
    abort); the heartbeat marks this rank done before it, and keeps naming peers that freeze while
    it waits. With `failed=True` (an exception, a dead peer) no collective runs: a barrier on a
    broken group would wait out the collective timeout a second time."""
    global _job_heartbeat
    heartbeat, _job_heartbeat = _job_heartbeat, None
    try:
        if heartbeat is not None and not failed:
            heartbeat.finish()
        if dist.is_available() and dist.is_initialized() and not failed:
            dist.barrier()
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


STORE_HOST_ENV = "JOURNEY_STORE_HOST"  # who hosts the job's store, for the heartbeat's message


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------- spawning


def _rank_main(
    fn: Callable, rank: int, world_size: int, port: int, args: tuple, out_dir: str,
    timeout_s: float, hang_timeout: float, threads: int, parent_pid: int,
) -> None:
    exit_with_parent(parent_pid)  # no orphans: a killed launcher takes its ranks with it
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        TORCHELASTIC_USE_AGENT_STORE="True",  # the launcher hosts the store (as torchrun's agent does)
        **{STORE_HOST_ENV: f"the launcher (pid {parent_pid})"},
    )
    torch.set_num_threads(threads)
    out = Path(out_dir)
    try:
        init_distributed(timeout_s=timeout_s)
        start_job_heartbeat(hang_timeout, on_abort=(out / f"rank{rank}.err").write_text)
        result = fn(*args)
        shutdown()
        torch.save(result, out / f"rank{rank}.tmp")
        os.replace(out / f"rank{rank}.tmp", out / f"rank{rank}.pt")
    except BaseException:  # report everything, including KeyboardInterrupt
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        with contextlib.suppress(Exception):  # reported above; what matters now is exiting
            shutdown(failed=True)
        sys.exit(1)


def _start_method(fn: Callable) -> str:
    # Functions defined in a notebook cannot be re-imported by a spawned child.
    main = sys.modules.get("__main__")
    interactive = fn.__module__ == "__main__" and not hasattr(main, "__file__")
    return "fork" if interactive else "spawn"


def spawn(
    fn: Callable,
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 300.0,
    collective_timeout_s: float | None = None,
    hang_timeout_s: float | None = None,
    failure_grace_s: float = 3.0,
) -> list[Any]:
    """Run `fn(*args)` on `world_size` fresh local ranks; return each rank's return value.

    The backend is runtime.default_backend()'s: gloo on CPU, NCCL when every rank has its own GPU.

    The process group is initialised before `fn` runs and destroyed after. If a
    rank raises or dies, the others get `failure_grace_s` to report their own errors, then
    are stopped, and RankFailure carries the tracebacks; a rank still running at `timeout_s`
    is named and killed. A rank frozen for `hang_timeout_s` (default $JOURNEY_HANG_TIMEOUT or 30;
    0: off) is named by a peer's heartbeat, which ends the job the same way. The ranks die
    with this process (kill -9 included). Bad timeouts are a ConfigError before any rank starts.
    """
    coll_timeout = collective_timeout_s or min(configured_collective_timeout(), timeout_s)
    hang_timeout = configured_hang_timeout() if hang_timeout_s is None else hang_timeout_s
    if not hang_timeout >= 0:
        raise ConfigError(f"hang_timeout_s={hang_timeout_s} is not a timeout; use seconds > 0, or 0 for none")
    ctx = mp.get_context(_start_method(fn))
    # This process hosts the job's store on a port the OS picks and it keeps bound: a port found free
    # and released (find_free_port) could be taken by another job starting on this machine meanwhile.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=coll_timeout))
    port = store.port
    out_dir = tempfile.mkdtemp(prefix="journey-ranks-")
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, r, world_size, port, tuple(args), out_dir, coll_timeout, hang_timeout, threads,
                  os.getpid()),
            daemon=False,
        )
        for r in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        failed: list[int] = []
        while any(p.is_alive() for p in procs):
            failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed:
            # Give peers a moment to report their own errors, then stop them.
            grace = time.monotonic() + failure_grace_s
            while time.monotonic() < grace and any(p.is_alive() for p in procs):
                time.sleep(0.05)
            failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        if failed:
            raise RankFailure(_failure_message(out_dir, procs, failed, hung))
        if hung:
            raise RankFailure(
                f"rank(s) {hung} still running after {timeout_s:.0f}s and were killed "
                "(a collective that some ranks never entered?)"
            )
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(out_dir, ignore_errors=True)
        del store  # the port is released once every rank is gone


def _failure_message(out_dir: str, procs: list, failed: list[int], hung: list[int]) -> str:
    parts = []
    for r in failed:
        err = Path(out_dir) / f"rank{r}.err"
        detail = err.read_text() if err.exists() else f"(no traceback: exit code {procs[r].exitcode})"
        parts.append(f"--- rank {r} failed ---\n{detail}")
    if hung:
        parts.append(f"rank(s) {hung} were still running and were stopped")
    return "\n".join(parts)


def _write_torchrun_error_file(message: str) -> None:
    """Hand `message` to torchrun's failure report ("Root Cause ... traceback: <message>"), in the
    error-file format torch.distributed.elastic reads; a no-op outside torchelastic."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))


def launch(fn: Callable, world_size: int, *args: Any, timeout_s: float = 1800.0) -> list[Any]:
    """Run `fn(*args)` on every rank: torchrun's ranks if under torchrun, else spawn them.

    Under torchrun this process *is* one rank, and the returned list holds only its
    own result; its heartbeat names a frozen peer in torchrun's failure report. A single-rank
    run stays in this process (no spawn cost). Timeouts are read (and checked) first.
    """
    configured_collective_timeout(), configured_hang_timeout()  # a bad value fails before any group
    if under_torchrun():
        init_distributed()
        failed = True
        try:
            start_job_heartbeat(on_abort=_write_torchrun_error_file)
            result = [fn(*args)]
            failed = False
            return result
        finally:
            shutdown(failed=failed)
    if world_size == 1:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(find_free_port()))
        os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # one process hosts its own store
        init_distributed()
        failed = True
        try:
            result = [fn(*args)]
            failed = False
            return result
        finally:
            shutdown(failed=failed)
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                os.environ.pop(key, None)
    return spawn(fn, world_size, args, timeout_s=timeout_s)


def gather_objects(value: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's `value` (any picklable object), in group-rank order, on every rank (collective)."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def requested_world_size(default: int) -> int:
    """WORLD_SIZE under torchrun, else the lab's default (what plain `python` spawns)."""
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else default


# --------------------------------------------------------------------- results


def runs_dir(lab: str) -> Path:
    """Where a lab writes results: $JOURNEY_RUNS_DIR/<lab> (default ./runs/<lab>)."""
    return Path(os.environ.get("JOURNEY_RUNS_DIR", "runs")) / lab


def save_json(lab: str, name: str, data: Any) -> Path | None:
    """Write `data` as runs/<lab>/<name>.json on rank 0 (atomically); return the path.

    Each call writes its own temporary file in the target directory (a unique name, so two
    writers of the same result never share one) and renames it over the result: a reader sees
    the old file or a whole new one, and the last writer wins. A failed write leaves no file."""
    if not is_rank0():
        return None
    path = runs_dir(lab) / f"{name}.json"
    text = json.dumps(data, indent=2, default=_json_default) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        # O_EXCL: never write through a file someone else made; 0o666 & umask, as open() would
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG (creating the folder), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    fig.clf()
    import matplotlib.pyplot as plt  # deferred: matplotlib's import takes ~1 s; its caller imported it

    plt.close(fig)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
