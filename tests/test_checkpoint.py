"""Checkpoints: a run killed at step k and resumed ends bitwise equal to an uninterrupted run
(one process and 2-rank DP, single-file and DCP sharded); broken checkpoints are named and skipped.

Bitwise: torch.equal on every parameter (CPU, fp32, same thread count); dropout is on, so the
RNG state has to be restored for the match to hold.
"""

import json
import os
import re

import pytest
import torch

from journey_dist.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    latest_valid,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from journey_dist.config import get_preset
from journey_dist.data import load_tokens
from journey_dist.parity import fresh_model
from journey_dist.resumable import SimulatedCrash, bitwise_equal, run_resumable
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
    import hashlib

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "step_00000001.pt.json").write_text(
        json.dumps({"files": {path.name: [path.stat().st_size, digest]}}))
    with pytest.raises(CheckpointError, match=r"step_00000001.pt.*torch.load failed"):
        load_checkpoint(path)


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
