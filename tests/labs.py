"""Run a lab the way a learner does (plain python, or torchrun) and read the JSON it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_lab(name: str, *args: str, runs_dir: Path, torchrun: int = 0, timeout_s: float = 600,
            env: dict[str, str] | None = None) -> tuple[str, dict]:
    """Run labs/<name>.py with `args` (under torchrun with that many ranks if `torchrun`);
    return its stdout and runs/<name>/result.json. Fails with the lab's stderr if it exits non-zero."""
    lab = [str(ROOT / "labs" / f"{name}.py"), *args]
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", *lab] if torchrun
           else [sys.executable, *lab])
    full_env = {**os.environ, "JOURNEY_RUNS_DIR": str(runs_dir), "PYTHONPATH": str(ROOT), **(env or {})}
    out = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    assert out.returncode == 0, f"{name} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout, json.loads((runs_dir / name / "result.json").read_text())
