"""Checkpoints: a run killed at step k and resumed ends bitwise equal to an uninterrupted run
(one process and 2-rank DP, single-file and DCP sharded); broken checkpoints are named and skipped.

Bitwise: torch.equal on every parameter (CPU, fp32, same thread count); dropout is on, so the
RNG state has to be restored for the match to hold.
"""

import hashlib
import json
import os
import pickle
import re

import pytest
import torch
import torch.distributed.checkpoint as dcp

from journey_dist.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    latest_valid,
    list_checkpoints,
    load_checkpoint,
    load_sharded,
    resume,
    save_checkpoint,
    save_sharded,
)
from journey_dist.config import get_preset
from journey_dist.data import load_tokens
from journey_dist.dcp_safe import SafeReader
from journey_dist.parity import fresh_model
from journey_dist.resumable import SimulatedCrash, bitwise_equal, resume_table, run_resumable
from journey_dist.train import TrainConfig
from tests.dist import RankFailure, run_ranks

CONFIG = get_preset("tiny").with_(dropout=0.1)  # dropout: resume must restore the RNG too
CFG = TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1)


def _train(ckpt_dir=None, crash_after=None, every=3, start=True, dp=None, dcp_dir=None):
    """CONFIG for CFG.steps through run_resumable (the function lab 10 uses): checkpoints every
    `every` steps, a crash after step `crash_after` (os._exit under DP, else SimulatedCrash),
    or a resume from ckpt_dir first. Returns (params, losses of the steps run)."""
    run = run_resumable(CONFIG, load_tokens("handbook"), CFG, file_dir=ckpt_dir, dcp_dir=dcp_dir,
                        resume_from=ckpt_dir if start else None, every=every, crash_after=crash_after,
                        crash="exit" if dp else "raise", dp=dp)
    return run.params, run.losses


def _assert_bitwise(a: dict, b: dict) -> None:
    bad = bitwise_equal(a, b)
    assert not bad, f"parameters differ after resume: {bad}"


@pytest.fixture(scope="module")
def uninterrupted():
    return _train()


def test_resume_single_process_is_bitwise_equal(tmp_path, uninterrupted):
    full, full_losses = uninterrupted
    with pytest.raises(SimulatedCrash):
        _train(tmp_path, crash_after=6)
    assert [c.step for c in list_checkpoints(tmp_path)] == [3, 6]
    resumed, losses = _train(tmp_path)
    _assert_bitwise(resumed, full)
    assert losses == full_losses[6:]  # steps 6 and 7, recomputed after the resume


def test_corrupt_checkpoints_are_named_and_skipped(tmp_path, capsys):
    with pytest.raises(SimulatedCrash):
        _train(tmp_path, crash_after=6, every=2)
    ckpts = {c.step: c.path for c in list_checkpoints(tmp_path)}
    assert sorted(ckpts) == [2, 4, 6]  # keep=3
    newest, previous = ckpts[6], ckpts[4]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a crash mid-copy
    with pytest.raises(CheckpointError, match=rf"{newest.name}.*truncated.*previous valid checkpoint: "
                                              rf".*{previous.name}"):
        load_checkpoint(newest)
    assert latest_valid(tmp_path).path == previous
    assert f"{newest} is unusable" in capsys.readouterr().err
    # Same size, one byte flipped: only the hash sees it.
    data = bytearray(previous.read_bytes())
    data[len(data) // 2] ^= 0xFF
    previous.write_bytes(bytes(data))
    assert latest_valid(tmp_path, warn=False).path == ckpts[2]
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(previous)
    # A save that died before its manifest: not a checkpoint yet.
    os.remove(str(ckpts[2]) + ".json")
    assert "interrupted" in list_checkpoints(tmp_path)[0].reason
    assert latest_valid(tmp_path, warn=False) is None


def test_resume_falls_back_to_the_previous_good_checkpoint(tmp_path, uninterrupted):
    full, _ = uninterrupted
    with pytest.raises(SimulatedCrash):
        _train(tmp_path, crash_after=6)
    newest = list_checkpoints(tmp_path)[-1].path
    newest.write_bytes(b"")
    resumed, losses = _train(tmp_path)  # starts again at step 3
    assert len(losses) == CFG.steps - 3
    _assert_bitwise(resumed, full)


def test_keep_last_k_and_atomic_write(tmp_path):
    model = fresh_model(get_preset("tiny"))
    (tmp_path / ".step_00000001.pt.tmp.99999").write_bytes(b"half a file from a crashed save")
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, keep=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [4, 5]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


class _NotData:
    pass


def test_load_refuses_pickled_code(tmp_path):
    """weights_only=True: a checkpoint holding arbitrary objects is refused, not unpickled."""
    path = tmp_path / "step_00000001.pt"
    torch.save({"format": "journey-checkpoint-v1", "obj": _NotData()}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "step_00000001.pt.json").write_text(
        json.dumps({"files": {path.name: [path.stat().st_size, digest]}}))
    with pytest.raises(CheckpointError, match=r"step_00000001.pt.*torch.load refused it"):
        load_checkpoint(path)


class _RunsCode:
    """Unpickling this runs `touch <marker>`: the payload of a tampered checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _rehash(ckpt) -> None:
    """Rewrite a checkpoint's manifest to match its (tampered) files, as an attacker would."""
    manifest = ckpt.with_name(ckpt.name + ".json")
    meta = json.loads(manifest.read_text())
    for rel in meta["files"]:
        f = ckpt / rel if ckpt.is_dir() else ckpt
        meta["files"][rel] = [f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()]
    manifest.write_text(json.dumps(meta))


def _two_checkpoints(directory, save):
    """Checkpoints at steps 1 and 2 of a tiny model, with different weights; returns
    (model, weights saved at step 1)."""
    model = fresh_model(get_preset("tiny"))
    save(directory, 1, model)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save(directory, 2, model)
    return model, first


def _assert_resumed_from_step_1(directory, model, first, capsys):
    assert resume(directory, model) == 1
    _assert_bitwise(model.state_dict(), first)
    err = capsys.readouterr().err
    assert re.search(r"step_00000002\.(pt|dcp) is unusable: .*; falling back to step_00000001", err), err
    assert "weights_only=False" not in err
    return err


def test_code_in_a_pt_checkpoint_is_refused_and_resume_falls_back(tmp_path, capsys):
    """A re-hashed .pt carrying code: weights_only refuses it, the resume uses step 1, and the
    message names what was refused without repeating torch's weights_only=False advice."""
    marker = tmp_path / "ran"
    model, first = _two_checkpoints(tmp_path, save_checkpoint)
    evil = tmp_path / "step_00000002.pt"
    payload = torch.load(evil, weights_only=True)
    payload["extra"] = {"x": _RunsCode(marker)}
    torch.save(payload, evil)
    _rehash(evil)
    err = _assert_resumed_from_step_1(tmp_path, model, first, capsys)
    assert "refused" in err and "system" in err
    assert not marker.exists()


def test_code_in_dcp_metadata_is_not_run_and_resume_falls_back(tmp_path, capsys):
    """A DCP .metadata replaced by a pickle that runs a command, manifest re-hashed: the command
    does not run (no marker file), the error names the file, the resume uses step 1."""
    marker = tmp_path / "ran"
    model, first = _two_checkpoints(tmp_path / "ckpt", save_sharded)
    evil = tmp_path / "ckpt" / "step_00000002.dcp"
    (evil / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    _rehash(evil)
    refused = r"step_00000002.dcp is unusable: .*posix.system, which is not a class DCP writes"
    with pytest.raises(CheckpointError, match=rf"{refused}.*previous valid checkpoint: .*step_00000001.dcp"):
        load_sharded(evil, model)
    with pytest.raises(pickle.UnpicklingError, match="posix.system"):  # what dcp.load reads through
        SafeReader(evil).read_metadata()
    _assert_resumed_from_step_1(tmp_path / "ckpt", model, first, capsys)
    assert not marker.exists()


def test_code_in_a_dcp_entry_is_not_run_and_the_model_is_untouched(tmp_path, capsys):
    """DCP stores non-tensor entries (the step, param_groups) as torch.save bytes and loads them
    with weights_only=False: one replaced by code must be refused, and the tensors already read
    must not have reached the model."""
    marker = tmp_path / "ran"
    model, first = _two_checkpoints(tmp_path / "ckpt", save_sharded)
    evil = tmp_path / "ckpt" / "step_00000002.dcp"
    dcp.save({"model": model.state_dict(), "optimizer": {}, "step": _RunsCode(marker)},
             checkpoint_id=evil)
    _rehash(evil)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"step_00000002.dcp is unusable: rank 0: it holds the global "
                                              r"posix.system"):
        load_sharded(evil, model)
    _assert_bitwise(model.state_dict(), before)
    _assert_resumed_from_step_1(tmp_path / "ckpt", model, first, capsys)
    assert not marker.exists()


# --------------------------------------------------------------------- 2-rank data parallel


def _dp_crash(file_dir: str, dcp_dir: str):
    torch.set_num_threads(1)
    return _train(file_dir, crash_after=6, dp=True, dcp_dir=dcp_dir, start=False)


def _dp_resume_and_reference(dirs: list[str]):
    torch.set_num_threads(1)
    full = _train(dp=True)
    return full, [_train(d, dp=True) for d in dirs]


def test_resume_two_rank_dp_is_bitwise_equal(tmp_path):
    """Killed (os._exit on both ranks) after the step-6 checkpoints, resumed in fresh processes:
    the same parameters as an uninterrupted 2-rank run, from one file (rank 0 writes) and from
    DCP shards (every rank writes)."""
    dirs = [str(tmp_path / "file"), str(tmp_path / "dcp")]
    with pytest.raises(RankFailure, match="exit code 1"):
        run_ranks(_dp_crash, 2, *dirs, timeout_s=120, collective_timeout_s=30)
    assert [c.step for c in list_checkpoints(dirs[1])] == [3, 6]
    assert all(c.kind == "dcp" and c.valid for c in list_checkpoints(dirs[1]))
    results = run_ranks(_dp_resume_and_reference, 2, dirs, timeout_s=120)
    for (full, full_losses), resumed_runs in results:
        for params, losses in resumed_runs:
            _assert_bitwise(params, full)
            assert losses == full_losses[6:]


def _save_two_sharded(directory: str):
    torch.set_num_threads(1)
    _two_checkpoints(directory, save_sharded)


def _resume_sharded(directory: str):
    torch.set_num_threads(1)
    model = fresh_model(get_preset("tiny"))
    return resume(directory, model), model.state_dict()


@pytest.mark.slow
def test_two_ranks_skip_a_tampered_dcp_checkpoint_together(tmp_path):
    """2 gloo ranks: code in .metadata, then code in rank 1's RNG file only. Both ranks refuse
    the newest checkpoint and resume from step 1 (no hang, no rank left on step 2, no marker)."""
    marker = tmp_path / "ran"
    directory = tmp_path / "ckpt"
    run_ranks(_save_two_sharded, 2, str(directory), timeout_s=120)
    evil = directory / "step_00000002.dcp"
    first = fresh_model(get_preset("tiny")).state_dict()
    for tampered in (".metadata", "rng_rank1.pt"):
        original = (evil / tampered).read_bytes()
        (evil / tampered).write_bytes(pickle.dumps(_RunsCode(marker)))
        _rehash(evil)
        for step, params in run_ranks(_resume_sharded, 2, str(directory), timeout_s=120):
            assert step == 1, tampered
            _assert_bitwise(params, first)
        (evil / tampered).write_bytes(original)
    assert not marker.exists()


def test_cli_lists_checkpoints_with_validity(tmp_path, capsys):
    from journey_dist.cli import main as journey

    model = fresh_model(get_preset("tiny"))
    for step in (2, 4):
        save_checkpoint(tmp_path, step, model)
    newest = tmp_path / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:-10])
    assert journey(["checkpoints", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"step_00000002.pt\s+2\s+pt\s+[\d.]+\s+ok\s+<- resume point", out), out
    assert re.search(r"step_00000004.pt\s+4\s+pt.*INVALID: .*truncated", out), out


def test_resume_table_names_each_resume_and_whether_it_is_bitwise_equal():
    rows = {"file": {"start_step": 3, "bitwise_equal": True, "max_abs_diff": 0.0, "seconds": 1.0},
            "dcp": {"start_step": 6, "bitwise_equal": False, "max_abs_diff": 2e-7, "seconds": 2.0}}
    lines = resume_table(rows).splitlines()  # what lab 10 prints
    assert lines[1].split() == ["file", "3", "0.0e+00", "yes", "1.0"]
    assert lines[2].split() == ["dcp", "6", "2.0e-07", "NO", "2.0"]
