"""Checkpoints that survive crashes: atomic writes, validated loads, resume, keep-last-K, DCP.

A checkpoint is `step_<N>.pt` (one file, written by rank 0) or `step_<N>.dcp/` (a directory
written by every rank through torch.distributed.checkpoint), plus a manifest
`step_<N>.{pt,dcp}.json` holding each file's size and SHA-256. N is the next step to run, so
`train(..., start_step=N)` continues exactly where the saved run was.

Why each piece:
- temp file + fsync + os.replace: a crash mid-save leaves the old checkpoint untouched and no
  half-written file under the final name (POSIX rename is atomic within one directory).
- the manifest is written last and is the commit marker; sizes and hashes catch truncation and
  bit rot that a zip reader might not, and the error names the file.
- RNG states (torch CPU/CUDA, Python, NumPy) and the step: batches here are a function of
  (seed, step), so the step is the data position; RNG covers dropout and anything else random.
- torch.load(weights_only=True), and for DCP an allowlisted .metadata unpickler (dcp_safe): a
  checkpoint is data, never code to unpickle. One that validates but will not load is skipped by
  resume() like a truncated one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

FORMAT = "journey-checkpoint-v1"
_NAME = re.compile(r"^step_(\d{8})\.(pt|dcp)$")
_UNSUPPORTED_GLOBAL = re.compile(r"unsupported global:? (?:GLOBAL )?([\w.]+)", re.IGNORECASE)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file, what is wrong (`reason`)
    and the previous valid checkpoint to fall back to."""

    reason: str = ""


def _unusable(path: Path, reason: str) -> CheckpointError:
    error = CheckpointError(f"checkpoint {path} is unusable: {reason}; "
                            f"previous valid checkpoint: {_previous_valid(path)}")
    error.reason = reason
    return error


@dataclass
class CheckpointInfo:
    path: Path
    step: int  # next step to run
    kind: str  # "pt" (one file) or "dcp" (sharded directory)
    valid: bool
    reason: str = ""  # why it is invalid
    nbytes: int = 0

    def to_dict(self) -> dict:
        return {"path": str(self.path), "step": self.step, "kind": self.kind, "valid": self.valid,
                "reason": self.reason, "bytes": self.nbytes}


# --------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------- RNG


def capture_rng() -> dict:
    """Every RNG stream a step may draw from, in a form torch.load(weights_only=True) accepts."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss]
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


# --------------------------------------------------------------------- listing and validation


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def checkpoint_path(directory: str | Path, step: int, kind: str = "pt") -> Path:
    return Path(directory) / f"step_{step:08d}.{kind}"


def _manifest(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def validate(path: str | Path) -> CheckpointInfo:
    """Check one checkpoint against its manifest: present, complete, sizes and hashes match."""
    path = Path(path)
    m = _NAME.match(path.name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint name (expected step_<8 digits>.pt|.dcp)")
    info = CheckpointInfo(path, int(m.group(1)), m.group(2), valid=False)
    manifest = _manifest(path)
    if not manifest.exists():
        info.reason = f"no manifest {manifest.name} (the save was interrupted)"
        return info
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        info.reason = f"unreadable manifest {manifest.name}: {e}"
        return info
    for rel, (size, digest) in meta["files"].items():
        f = path / rel if info.kind == "dcp" else path
        if not f.exists():
            info.reason = f"{f} is missing"
            return info
        actual = f.stat().st_size
        info.nbytes += actual
        if actual != size:
            info.reason = f"{f} is {actual} bytes, the manifest says {size} (truncated?)"
            return info
        if _sha256(f) != digest:
            info.reason = f"{f} does not match its SHA-256 in {manifest.name} (corrupt)"
            return info
    info.valid = True
    return info


def list_checkpoints(directory: str | Path) -> list[CheckpointInfo]:
    """Every checkpoint in `directory`, oldest first, each validated."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((validate(p) for p in directory.iterdir() if _NAME.match(p.name)),
                  key=lambda c: (c.step, c.kind))


def latest_valid(directory: str | Path, *, warn: bool = True) -> CheckpointInfo | None:
    """The newest checkpoint that validates; newer broken ones are reported and skipped."""
    found = list_checkpoints(directory)
    valid = [c for c in found if c.valid]
    best = valid[-1] if valid else None
    if warn:
        _report_skipped(found, best)
    return best


def checkpoints_table(directory: str | Path) -> str:
    """Every checkpoint in `directory`, validated, one per line: name, step, kind, MiB, ok or
    INVALID with the reason, and which one a resume would load (`journey checkpoints DIR`)."""
    found = list_checkpoints(directory)
    if not found:
        return f"no checkpoints in {directory}"
    best = latest_valid(directory, warn=False)
    lines = [f"{'checkpoint':<22} {'step':>6} {'kind':>4} {'MiB':>8}  status"]
    for c in found:
        status = "ok" if c.valid else f"INVALID: {c.reason}"
        mark = "  <- resume point" if best is not None and c.path == best.path else ""
        lines.append(f"{c.path.name:<22} {c.step:>6} {c.kind:>4} {c.nbytes / 2**20:>8.2f}  {status}{mark}")
    if best is None:
        lines.append("no valid checkpoint: a resume would start from step 0")
    return "\n".join(lines)


def _report_skipped(found: list[CheckpointInfo], best: CheckpointInfo | None) -> None:
    """Name each invalid checkpoint newer than `best` and the one used instead."""
    for c in found:
        if not c.valid and (best is None or c.step > best.step):
            _report_fallback(c.path, c.reason, best)


def _report_fallback(path: Path, reason: str, fallback: CheckpointInfo | None) -> None:
    instead = fallback.path.name if fallback else "none (starting from step 0)"
    print(f"checkpoint {path} is unusable: {reason}; falling back to {instead}", file=sys.stderr, flush=True)


def _previous_valid(path: Path) -> str:
    older = [c for c in list_checkpoints(path.parent) if c.valid and c.step < validate(path).step]
    return str(older[-1].path) if older else "none"


# --------------------------------------------------------------------- single-file checkpoints


def save_checkpoint(directory: str | Path, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *, extra: dict | None = None,
                    keep: int = 3) -> Path:
    """Save model, optimizer, RNG and `step` (the next step to run) atomically; keep the newest
    `keep` valid checkpoints. Call on every rank: rank 0 writes, the others wait for it."""
    directory = Path(directory)
    path = checkpoint_path(directory, step)
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "step": step, "time": time.time(),
                   "model": _unwrap(model).state_dict(),
                   "optimizer": optimizer.state_dict() if optimizer is not None else None,
                   "rng": capture_rng(), "extra": extra or {}}
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
        atomic_write_bytes(path, data)
        digest = hashlib.sha256(data).hexdigest()
        atomic_write_bytes(_manifest(path), json.dumps(
            {"format": FORMAT, "step": step, "files": {path.name: [len(data), digest]}}).encode())
        prune(directory, keep)
    _barrier()
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Validate and load one .pt checkpoint (weights_only); a bad one raises CheckpointError
    naming the file, the problem, and the previous valid checkpoint to fall back to."""
    path = Path(path)
    info = validate(path)
    if info.valid:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("format") == FORMAT:
                return payload
            info.reason = f"format {payload.get('format')!r} is not {FORMAT!r}"
        except pickle.UnpicklingError as e:  # weights_only met a global it does not allow
            info.reason = f"torch.load refused it: {_refusal(e)}"
        except Exception as e:  # a zip or unpickling error: report it with the file name
            info.reason = f"torch.load failed: {e}"
    raise _unusable(path, info.reason)


def _refusal(error: BaseException) -> str:
    """What torch.load(weights_only=True) refused, without its advice to retry with
    weights_only=False (that would run the code)."""
    found = _UNSUPPORTED_GLOBAL.search(str(error))
    what = f"the global {found.group(1)}" if found else "an object"
    return f"it holds {what}, which is not a tensor or plain data; refused unread"


def resume(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
           ) -> int:
    """Load the newest valid checkpoint into model/optimizer/RNG; return the step to start at
    (0 when there is none). Every rank calls it and reads the same files.

    A checkpoint that validates but does not load (code where data should be, a DCP error) is
    named and skipped like a truncated one: the next older valid one is tried. Every rank reads
    the same files, so every rank skips the same ones."""
    warn = _rank() == 0
    found = list_checkpoints(directory)
    candidates = [c for c in found if c.valid]
    if warn:
        _report_skipped(found, candidates[-1] if candidates else None)
    while candidates:
        best = candidates.pop()
        try:
            return _load_into(best, model, optimizer)
        except CheckpointError as e:
            if warn:
                _report_fallback(best.path, e.reason, candidates[-1] if candidates else None)
    return 0


def _load_into(info: CheckpointInfo, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    if info.kind == "dcp":
        return load_sharded(info.path, model, optimizer)
    payload = load_checkpoint(info.path)
    _unwrap(model).load_state_dict(payload["model"])
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    restore_rng(payload["rng"])
    return int(payload["step"])


def prune(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` valid checkpoints (and broken ones older than those),
    and temp files a crashed save left behind; keep < 1 keeps every checkpoint. Rank 0 only,
    after its save completed."""
    for stale in Path(directory).glob(".step_*.tmp*"):
        if not stale.name.endswith(f".tmp.{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    found = list_checkpoints(directory)
    valid = [c for c in found if c.valid]
    if keep < 1 or len(valid) <= keep:
        return []
    oldest_kept = valid[-keep].step
    removed = []
    for c in found:
        if c.step < oldest_kept:
            shutil.rmtree(c.path) if c.path.is_dir() else c.path.unlink(missing_ok=True)
            _manifest(c.path).unlink(missing_ok=True)
            removed.append(c.path)
    return removed


# --------------------------------------------------------------------- sharded (DCP) checkpoints


def save_sharded(directory: str | Path, step: int, model: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None, *, keep: int = 3) -> Path:
    """Every rank writes its shards with torch.distributed.checkpoint (replicated tensors are
    written once), plus its own RNG state; rank 0 renames the finished directory into place and
    writes the manifest. Collective: all ranks must call it."""
    # deferred: torch.distributed.checkpoint takes seconds to import and most runs never save DCP
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    final = checkpoint_path(directory, step, "dcp")
    tmp = final.with_name(f".{final.name}.tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(_unwrap(model), optimizer if optimizer is not None else [])
    dcp.save({"model": model_sd, "optimizer": optim_sd, "step": step}, checkpoint_id=tmp)
    buffer = io.BytesIO()
    torch.save(capture_rng(), buffer)
    atomic_write_bytes(tmp / f"rng_rank{_rank()}.pt", buffer.getvalue())
    _barrier()
    if _rank() == 0:
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():  # DCP's FileSystemWriter fsyncs its files (sync_files=True)
                files[str(f.relative_to(tmp))] = [f.stat().st_size, _sha256(f)]
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
        atomic_write_bytes(_manifest(final), json.dumps(
            {"format": FORMAT, "step": step, "files": files, "world_size": _world()}).encode())
        prune(directory, keep)
    _barrier()
    return final


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 ) -> int:
    """Load a DCP checkpoint into model/optimizer (each rank reads what it owns); return its step.

    Nothing in the directory is run as code (dcp_safe: allowlisted .metadata, weights_only byte
    entries and RNG files). The shards are read into a copy of the state, so a load that fails
    halfway leaves the model and optimizer as they were; any failure, including DCP's
    CheckpointException (a BaseException), becomes a CheckpointError naming the file."""
    # deferred: torch.distributed.checkpoint takes seconds to import and most runs never load DCP
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from journey_dist import dcp_safe

    path = Path(path)
    info = validate(path)
    if not info.valid:
        raise _unusable(path, info.reason)
    module = _unwrap(model)
    optimizers = optimizer if optimizer is not None else []
    model_sd, optim_sd = get_state_dict(module, optimizers)
    state = {"model": _cloned(model_sd), "optimizer": _cloned(optim_sd), "step": -1}
    try:
        # Read first what dcp.load reads again (through SafeReader): a refusal here is one clear
        # line instead of DCP's logged tracebacks. Every rank reads every RNG file, so a bad
        # one makes all ranks fail (and fall back) alike.
        with open(path / ".metadata", "rb") as f:
            dcp_safe.read_metadata(f)
        rngs = {f.name: torch.load(f, map_location="cpu", weights_only=True)
                for f in sorted(path.glob("rng_rank*.pt"))}
        dcp.load(state, storage_reader=dcp_safe.SafeReader(path), planner=dcp_safe.SafePlanner())
    except (Exception, CheckpointException) as e:
        raise _unusable(path, _load_failure(e)) from None
    set_state_dict(module, optimizers, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    rng = rngs.get(f"rng_rank{_rank()}.pt")
    if rng is not None:  # a different world size than at save time: keep this rank's current RNG
        restore_rng(rng)
    return int(state["step"])


def _cloned(tree: Any) -> Any:
    """A copy of a (nested) state dict's tensors for DCP to load into."""
    if isinstance(tree, dict):
        return {k: _cloned(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_cloned(v) for v in tree]
    return tree.detach().clone() if isinstance(tree, torch.Tensor) else tree


def _load_failure(error: BaseException) -> str:
    """One line per failing rank for DCP's CheckpointException, else the error itself."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(f"rank {r}: {_one_error(f[0] if isinstance(f, tuple) else f)}"
                         for r, f in sorted(failures.items()))
    return _one_error(error)


def _one_error(error: BaseException) -> str:
    if isinstance(error, pickle.UnpicklingError):
        return _refusal(error) if "weights_only" in str(error) else str(error)
    return f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------- the train() callback


class Checkpointer:
    """`train(..., on_step=Checkpointer(dir, every=N))`: save after every N-th step and the last.

    sharded=True uses DCP (all ranks write); otherwise rank 0 writes one file.
    `after_save(step)` runs after each save (a lab uses it to simulate a crash).
    """

    def __init__(self, directory: str | Path, every: int, total_steps: int, *, keep: int = 3,
                 sharded: bool = False, extra: dict | None = None,
                 after_save: Callable[[int], None] | None = None):
        if every < 1:
            raise ValueError(f"every={every} must be >= 1; use every=N to save after every N-th step")
        self.directory, self.every, self.total = Path(directory), every, total_steps
        self.keep, self.sharded, self.extra, self.after_save = keep, sharded, extra, after_save
        self.saved: list[int] = []
        self.seconds = 0.0

    def __call__(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        done = step + 1  # steps completed = the next step to run
        if done % self.every and done != self.total:
            return
        t0 = time.perf_counter()
        if self.sharded:
            save_sharded(self.directory, done, model, optimizer, keep=self.keep)
        else:
            save_checkpoint(self.directory, done, model, optimizer, extra=self.extra, keep=self.keep)
        self.seconds += time.perf_counter() - t0
        self.saved.append(done)
        if self.after_save is not None:
            self.after_save(done)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
