"""The launch scripts for real, on one machine (slow: each test starts torchrun agents).

- two torchrun agents (--nnodes=2, c10d rendezvous on 127.0.0.1, one rank each), started by
  launch/torchrun_multi_node.sh as two "nodes", run lab 02 to completion;
- torchrun --max-restarts=1 (launch/torchrun_single_node.sh): rank 1 dies once after a
  checkpoint, torchrun restarts the job, it resumes and ends bitwise equal to an uninterrupted
  run (lab 10 --crash-once);
- without restarts, the same death ends the job within 60 s and torchrun's report names rank 1.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from journey_dist.runtime import find_free_port

ROOT = Path(__file__).resolve().parents[1]
LAB10 = ["labs/10_reliability.py", "--crash-once", "--preset", "tiny", "--steps", "8", "--every", "3",
         "--crash-at", "6"]
pytestmark = pytest.mark.slow


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                         "MASTER_PORT", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), PYTHON=sys.executable, JOURNEY_RUNS_DIR=str(tmp_path / "runs"),
               OMP_NUM_THREADS="1", **extra)
    return env


def test_two_agents_on_loopback_run_lab02(tmp_path):
    port = str(find_free_port())
    cmd = ["bash", "launch/torchrun_multi_node.sh", "labs/02_data_parallel.py", "--preset", "tiny",
           "--steps", "2", "--batch-size", "4", "--variants", "naive,ddp"]
    agents = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=_env(tmp_path, NNODES="2", NODE_RANK=str(n), MASTER_ADDR="127.0.0.1",
                                        PORT=port, NPROC_PER_NODE="1", RDZV_ID=f"test-{port}"))
              for n in range(2)]
    outputs = [a.communicate(timeout=420)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    result = json.loads((tmp_path / "runs/02_data_parallel/result.json").read_text())
    assert result["world_size"] == 2
    for variant in ("naive", "ddp"):  # grads too: AdamW's params would not see a constant grad scale
        v = result["variants"][variant]
        assert v["param_diff"] < 1e-5 and v["loss_diff"] < 1e-5 and v["grad_diff"] < 1e-6, v
    assert "rendezvous 127.0.0.1:" in outputs[0]


def test_max_restarts_resumes_from_the_checkpoint(tmp_path):
    proc = subprocess.run(["bash", "launch/torchrun_single_node.sh", *LAB10], cwd=ROOT, capture_output=True,
                          text=True, timeout=420, env=_env(tmp_path, NPROC="2", MAX_RESTARTS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "runs/10_reliability/torchrun_result.json").read_text())
    assert result["restart_count"] == 1 and result["start_step"] == 6, result
    assert result["bitwise_equal"] and result["world_size"] == 2, result
    assert "failed (exitcode: 1) local_rank: 1" in proc.stderr  # the first attempt did die


def test_dead_rank_ends_the_torchrun_job_naming_it(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "launch/torchrun_single_node.sh", *LAB10], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=_env(tmp_path, NPROC="2", MAX_RESTARTS="0"))
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    report = proc.stderr
    assert "Root Cause (first observed failure)" in report, report[-3000:]
    root_cause = report.split("Root Cause (first observed failure)")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "exitcode  : 1" in root_cause, root_cause
    assert elapsed < 60 + 30, elapsed  # 60 s to notice + start-up of two ranks on a loaded box


def test_lab10_under_plain_python(tmp_path):
    """The notebook path: spawned ranks crash, resume from a file (after skipping a truncated one)
    and from DCP, bitwise equal; the dead rank is named within seconds."""
    proc = subprocess.run([sys.executable, "labs/10_reliability.py", "--preset", "tiny", "--steps", "8",
                           "--every", "3", "--crash-at", "6", "--desync", "none"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "runs/10_reliability/result.json").read_text())
    assert result["truncated"] == "step_00000006.pt" and result["fallback"] == "step_00000003.pt"
    assert result["resume"]["file"]["start_step"] == 3 and result["resume"]["dcp"]["start_step"] == 6
    assert all(r["bitwise_equal"] and r["max_abs_diff"] == 0 for r in result["resume"].values())
    dead = result["dead_rank"]
    assert "stopped responding: rank 1 (" in dead["message"] and dead["detection_s"] < 10, dead
