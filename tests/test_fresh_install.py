"""Slow: every lab runs after README command 1 alone, in a virtual environment that command builds.

The command is read from README.md (as tests/test_readme.py does) and run exactly, in a copy of
the repository: `-e .` without extras, so no DeepSpeed; it ends with the flagship lab under
torchrun. Then each lab runs with its default arguments under plain python, in lab order (as a
learner goes: later labs reuse lab 01's checkpoint), and must exit 0 and write its result JSON.
The seconds each step took are printed (pytest -s) and written to <tmp>/timings.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_readme import _quick_start_commands

ROOT = Path(__file__).resolve().parents[1]
LABS = sorted(p.stem for p in (ROOT / "labs").glob("[0-9][0-9]_*.py"))
# Not part of a clone: the environments, results and caches of this checkout.
NOT_IN_A_CLONE = (".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
                  "build", "dist", "checkpoints")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _clean_env() -> dict[str, str]:
    """This process's environment without what points into another checkout or a running job."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("JOURNEY_")}


def test_every_lab_runs_after_readme_command_1(tmp_path):
    command = next(c for c in _quick_start_commands() if "pytest" not in c)
    assert "-e ." in command and "deepspeed" not in command, command  # the no-extras install
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(*NOT_IN_A_CLONE))
    env = _clean_env()
    timings = {}

    t0 = time.monotonic()
    proc = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=1800)
    timings["readme command 1"] = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    python = repo / ".venv" / "bin" / "python"
    missing = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('deepspeed'))"],
                             capture_output=True, text=True, env=env)
    assert missing.stdout.strip() == "None"  # what a learner has after command 1

    outputs = {}
    for lab in LABS:
        t0 = time.monotonic()
        proc = subprocess.run([python, f"labs/{lab}.py"], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=1800)
        timings[lab] = time.monotonic() - t0
        tail = proc.stdout[-2000:] + "\n" + proc.stderr[-3000:]
        assert proc.returncode == 0, f"{lab}: exit {proc.returncode}\n{tail}"
        result = repo / "runs" / lab / "result.json"
        assert result.is_file() and result.stat().st_mtime >= time.time() - timings[lab] - 1, lab
        json.loads(result.read_text())
        outputs[lab] = proc.stdout
    assert "note: DeepSpeed is not installed" in outputs["06_zero_and_fsdp"]
    (tmp_path / "timings.json").write_text(json.dumps(timings, indent=1))
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
          + f"; total {sum(timings.values()):.0f}")
