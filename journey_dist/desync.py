"""Desynchronised collectives on purpose, and the three ways to find them (notes/debugging.md).

A collective is a rendezvous: every rank of the group must call the same operation on tensors of
the same shape and dtype, in the same order. When one rank does not, nothing checks by default:
gloo/NCCL pair the calls by their order, so the job hangs until the collective timeout (an error
that names a socket, not a rank), aborts on a size mismatch, or -- worst -- goes on with wrong
numbers. The scenarios (rank 1 is the buggy rank; rank 0 runs the intended program):

    op         rank 1 all-gathers where rank 0 all-reduces
    shape      rank 1 all-reduces 6 values where rank 0 all-reduces 4
    skip       rank 1 skips one all-reduce (as if its data loader had no batch): its next
               all-reduce pairs with rank 0's skipped one, same op and shape, so it returns a wrong
               sum without an error; rank 0 then waits for a partner that has left
    straggler  rank 1 arrives 2x the collective timeout late (a slow data loader, a stuck disk)

Diagnosis, cheapest first:
1. TORCH_DISTRIBUTED_DEBUG=DETAIL: before each collective the ranks all-gather a fingerprint
   (sequence number, op, shapes, dtypes, devices) on a side gloo group and raise naming the
   difference, and a monitored barrier names a rank that never arrives. It cannot see `skip`'s
   first wrong pairing: op, shape and (per-rank) sequence number all agree.
2. The flight recorder (TORCH_FR_BUFFER_SIZE, formerly TORCH_NCCL_TRACE_BUFFER_SIZE): a ring
   buffer of every collective with its sequence number, sizes and Python stack, dumped per rank
   (NCCL: on its watchdog timeout; here: when the collective fails) and compared across ranks
   (`first_divergence`, or torch's `torchfrtrace`). The stacks show where `skip` went wrong.
3. The job: a rank that never arrives is named (DETAIL's monitored barrier, a peer's heartbeat
   if it is frozen, the launcher's report of who is still running).

Each run is a fresh 2-rank job in a subprocess (`python -m journey_dist.desync ...`), because the
debug level is read when a process group is created and a gloo size mismatch can abort a process.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from journey_dist.config import ConfigError
from journey_dist.runtime import RankFailure, spawn

SCENARIOS = {
    "op": "rank 1 all-gathers where rank 0 all-reduces",
    "shape": "rank 1 all-reduces 6 values where rank 0 all-reduces 4",
    "skip": "rank 1 skips one all-reduce, then both all-reduce again",
    "straggler": "rank 1 arrives at an all-reduce 2x the collective timeout late",
}
DEBUG_LEVELS = ("OFF", "INFO", "DETAIL")
TRACE_PREFIX = "rank_"  # flight-recorder dumps: <dir>/rank_<r>, the names torchfrtrace reads
BUFFER_ENTRIES = 2000  # TORCH_FR_BUFFER_SIZE for a traced run: collectives kept per rank


def short_error(text: str) -> str:
    """One line a table can hold: DETAIL's verdict ("Collectives differ in the following aspects: ...",
    with the op of each rank), or the first line without gloo's source-file prefix and advice."""
    if "Collectives differ in the following aspects:" in text:
        ops = re.findall(r"Rank (\d+) is running collective: CollectiveFingerPrint\(SequenceNumber=(\d+), "
                         r"OpType=(\w+), TensorShape=\[([\d, ]*)\]", text)
        who = "; ".join(f"rank {r}: #{seq} {op} [{shape}]" for r, seq, op, shape in ops)
        return f"mismatch ({who}): {' '.join(text.split('aspects:', 1)[1].split())}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first.split(" This is typically caused by")[0]  # gloo's advice after every socket error
    return re.sub(r"\[/[^\]]*/third_party/gloo/[^\]]*\] ", "", first)


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def step_calls(scenario: str, world: int = 2) -> dict[int, list[tuple[str, float]]]:
    """The all-reduces each rank issues in the scenario's step, as (tensor name, the value of each of
    its elements): every rank all-reduces its gradients (1.0) and then its loss (10 + rank); under
    "skip" rank 1 leaves out the gradients. (The other scenarios differ in op, shape or time.)"""
    calls = {r: [("grads", 1.0), ("loss", 10.0 + r)] for r in range(world)}
    if scenario == "skip":
        calls[1] = calls[1][1:]
    return calls


def pair_by_order(calls: dict[int, list[tuple[str, float]]]) -> dict[int, dict[str, float | None]]:
    """What all-reduce(SUM) hands each rank when the backend pairs calls by their order on the group,
    not by what they mean (as gloo and NCCL do): the k-th call of every rank is one collective.
    A call some rank never matches gets None (it waits until the collective timeout)."""
    out: dict[int, dict[str, float | None]] = {r: {} for r in calls}
    for k in range(max(len(c) for c in calls.values())):
        joined = {r: c[k] for r, c in calls.items() if k < len(c)}
        total = sum(value for _, value in joined.values()) if len(joined) == len(calls) else None
        for r, (name, _) in joined.items():
            out[r][name] = total
    return out


def straggler_probability(p_slow: float, ranks: int) -> float:
    """Chance that at least one of `ranks` independent ranks is slow in a step, when each is with
    probability `p_slow`: 1 - (1 - p)^n. A synchronous step (every collective) waits for it."""
    if not 0 <= p_slow <= 1 or ranks < 1:
        raise ConfigError(f"p_slow={p_slow}, ranks={ranks}: need 0 <= p_slow <= 1 and ranks >= 1")
    return 1 - (1 - p_slow) ** ranks


def _buggy_step(scenario: str, rank: int, timeout_s: float) -> list[float]:
    """One 'training step' of two all-reduces (step_calls); rank 1 gets it wrong as the scenario
    says. Returns this rank's [grads..., loss...] after the step (grads of a skipping rank: as sent)."""
    values = dict(step_calls("none")[rank])
    grads, loss = torch.full((4,), values["grads"]), torch.full((4,), values["loss"])
    if scenario == "op" and rank == 1:
        dist.all_gather_into_tensor(torch.zeros(8), grads)  # the wrong collective
    elif scenario == "shape" and rank == 1:
        dist.all_reduce(torch.ones(6))  # the wrong shape
    elif scenario == "skip" and rank == 1:
        pass  # the skipped all-reduce
    else:
        if scenario == "straggler" and rank == 1:
            time.sleep(2 * timeout_s)
        dist.all_reduce(grads)  # the intended collective
    dist.all_reduce(loss)
    return grads.tolist() + loss.tolist()


def desync_rank(scenario: str, trace_dir: str | None, timeout_s: float) -> dict[str, Any]:
    """What each rank runs: two good collectives, the scenario's step, then a record of what happened
    (its error's first line or its numbers); with `trace_dir`, this rank's flight-recorder dump.
    The process group is destroyed here, so the job's exit runs no collective on a desynced group."""
    rank = dist.get_rank()
    warmup = torch.ones(2)
    dist.all_reduce(warmup)
    dist.broadcast(warmup, src=0)
    out: dict[str, Any] = {"rank": rank, "error": None, "result": None}
    try:
        out["result"] = _buggy_step(scenario, rank, timeout_s)
    except Exception as error:  # the diagnosis is the point: keep the message, then dump the trace
        out["error"] = _first_line(error)
        out["error_text"] = str(error)
    if trace_dir is not None:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        Path(trace_dir, f"{TRACE_PREFIX}{rank}").write_bytes(torch._C._distributed_c10d._dump_fr_trace())
    dist.destroy_process_group()
    return out


def run_desync(scenario: str, *, debug: str = "OFF", trace_dir: str | Path | None = None,
               collective_timeout_s: float = 3.0, timeout_s: float = 90.0) -> dict[str, Any]:
    """Run `scenario` as a fresh 2-rank gloo job in a subprocess with TORCH_DISTRIBUTED_DEBUG=`debug`
    (and the flight recorder on when `trace_dir` is given). Returns {"ranks": [each rank's record]}
    or {"job_error": the launcher's report} (a rank that aborted), plus "aborts" (the what() lines of
    gloo's C++ aborts from the ranks' stderr) and "seconds"."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown desync scenario {scenario!r}; use one of {', '.join(SCENARIOS)}")
    if debug not in DEBUG_LEVELS:
        raise ConfigError(f"TORCH_DISTRIBUTED_DEBUG={debug!r}; use one of {', '.join(DEBUG_LEVELS)}")
    if trace_dir is not None and debug == "DETAIL":
        raise ConfigError("trace with debug='OFF': DETAIL's fingerprint all-gathers on its side group would "
                          "fill the flight recorder between the program's own collectives")
    env = {**os.environ, "TORCH_DISTRIBUTED_DEBUG": debug}
    if trace_dir is not None:
        env["TORCH_FR_BUFFER_SIZE"] = str(BUFFER_ENTRIES)
    cmd = [sys.executable, "-m", "journey_dist.desync", scenario, "--timeout", str(collective_timeout_s)]
    if trace_dir is not None:
        cmd += ["--trace-dir", str(trace_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"the desync job itself failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # a rank killed by gloo's C++ check (SIGABRT) leaves no traceback, only this line on its stderr
    aborts = [line.strip() for line in proc.stderr.splitlines() if line.strip().startswith("what():")]
    return {**out, "aborts": aborts, "seconds": seconds}


# ------------------------------------------------------------------------ the flight recorder


def load_traces(trace_dir: str | Path) -> dict[int, dict]:
    """Every rank's flight-recorder dump in `trace_dir` ({rank: the unpickled dump})."""
    out = {}
    for path in sorted(Path(trace_dir).glob(f"{TRACE_PREFIX}*")):
        out[int(path.name[len(TRACE_PREFIX):])] = pickle.loads(path.read_bytes())
    if not out:
        raise FileNotFoundError(f"no {TRACE_PREFIX}<rank> flight-recorder dumps in {trace_dir}")
    return out


def _call_site(entry: dict) -> str:
    """The innermost frame outside torch and installed packages: where the program issued it."""
    for frame in entry.get("frames", []):
        if "/torch/" not in frame["filename"] and "site-packages" not in frame["filename"]:
            return f"{Path(frame['filename']).name}:{frame['line']} ({frame['name']})"
    return "?"


def _signature(entry: dict) -> tuple:
    return entry["profiling_name"], tuple(map(tuple, entry["input_sizes"])), tuple(entry["input_dtypes"])


def first_divergence(traces: dict[int, dict]) -> dict[str, Any] | None:
    """Compare the ranks' collectives in sequence order (per process group) and return the first
    where they differ: {"seq", "group", "kind", "ranks": {rank: "op sizes at file:line" or
    "never issued"}}. `kind` is "missing" (a rank never issued it), "mismatch" (op, sizes or dtypes
    differ), or "call site" (same op and sizes from different lines: a pairing no check can catch,
    only a stack can show). None when every rank issued the same collectives from the same lines."""
    by_group: dict[str, dict[int, dict[int, dict]]] = {}
    for rank, dump in traces.items():
        for entry in dump["entries"]:
            if entry.get("is_p2p"):
                continue
            group = entry["process_group"][0]
            by_group.setdefault(group, {}).setdefault(rank, {})[entry["collective_seq_id"]] = entry
    for group, ranks in sorted(by_group.items()):
        seqs = sorted({s for entries in ranks.values() for s in entries})
        for seq in seqs:
            here = {r: ranks[r].get(seq) for r in sorted(ranks)}
            present = [e for e in here.values() if e is not None]
            kind = ("missing" if len(present) < len(here) else
                    "mismatch" if len({_signature(e) for e in present}) > 1 else
                    "call site" if len({_call_site(e) for e in present}) > 1 else None)
            if kind is not None:
                return {"seq": seq, "group": group, "kind": kind,
                        "ranks": {r: ("never issued" if e is None else
                                      f"{e['profiling_name']} {e['input_sizes']} at {_call_site(e)}")
                                  for r, e in here.items()}}
    return None


def repair_gloo_dump(src: str | Path, dst: str | Path) -> Path:
    """Copy the dumps in `src` to `dst` with pg_config keyed by each group's name, as torchfrtrace
    expects: torch 2.13's gloo recorder writes pg_config {'': {'name': '', ...}} while its entries
    name the group ('0', 'default_pg'), and torchfrtrace stops with KeyError: ('0', 0)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for rank, dump in load_traces(src).items():
        groups = {e["process_group"] for e in dump["entries"]}
        ranks = next(iter(dump["pg_config"].values()))["ranks"] if dump["pg_config"] else "[]"
        fixed = {name: {"name": name, "desc": desc, "ranks": ranks} for name, desc in groups}
        (dst / f"{TRACE_PREFIX}{rank}").write_bytes(pickle.dumps({**dump, "pg_config": fixed}))
    return dst


def torchfrtrace(trace_dir: str | Path, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """Run torch's flight-recorder analyser (`torchfrtrace DIR --prefix rank_`) on the dumps."""
    exe = shutil.which("torchfrtrace") or str(Path(sys.executable).with_name("torchfrtrace"))
    return subprocess.run([exe, str(trace_dir), "--prefix", TRACE_PREFIX], capture_output=True, text=True,
                          timeout=timeout_s)


# ------------------------------------------------------------------------ the job (a subprocess)


def main(argv: list[str] | None = None) -> None:
    """`python -m journey_dist.desync SCENARIO [--timeout S] [--trace-dir DIR]`: one 2-rank job; prints
    one JSON line: {"ranks": [...]} or {"job_error": ...}."""
    parser = argparse.ArgumentParser(prog="python -m journey_dist.desync", allow_abbrev=False)
    parser.add_argument("scenario", choices=list(SCENARIOS))
    parser.add_argument("--timeout", type=float, default=3.0, help="collective timeout (s)")
    parser.add_argument("--trace-dir", default=None)
    args = parser.parse_args(argv)
    try:
        ranks = spawn(desync_rank, 2, (args.scenario, args.trace_dir, args.timeout),
                      collective_timeout_s=args.timeout, hang_timeout_s=0, timeout_s=10 * args.timeout + 30)
        print(json.dumps({"ranks": ranks}))
    except RankFailure as failure:  # e.g. gloo's C++ check aborted a rank
        print(json.dumps({"job_error": str(failure)}))


if __name__ == "__main__":
    main()
